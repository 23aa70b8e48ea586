//! The fast-path `FunctionCall` message names a function by its oid, with
//! no SQL. The built-in large-object functions, which libpq's
//! large-object interface (psql's `\lo_import`, `\lo_export`, `\lo_list`)
//! calls this way, have oids fixed in the server's catalog since they were
//! added, the same in every version; those are decided as calls of the
//! function they name. Any other oid could be anything (a function of the
//! database's own), so it stays unparsable text, refused unless a rule
//! names it.

/// The built-in large-object functions by oid (`pg_proc.dat`).
const BUILTIN_FUNCTIONS: &[(u32, &str)] = &[
    (715, "lo_create"),
    (764, "lo_import"),
    (765, "lo_export"),
    (767, "lo_import"),
    (952, "lo_open"),
    (953, "lo_close"),
    (954, "loread"),
    (955, "lowrite"),
    (956, "lo_lseek"),
    (957, "lo_creat"),
    (958, "lo_tell"),
    (964, "lo_unlink"),
    (1004, "lo_truncate"),
    (3170, "lo_lseek64"),
    (3171, "lo_tell64"),
    (3172, "lo_truncate64"),
    (3457, "lo_from_bytea"),
    (3458, "lo_get"),
    (3459, "lo_get"),
    (3460, "lo_put"),
];

/// The name of the built-in function with this oid, if it is one of
/// [`BUILTIN_FUNCTIONS`].
pub fn builtin_function(oid: u32) -> Option<&'static str> {
    BUILTIN_FUNCTIONS
        .iter()
        .find(|(known, _)| *known == oid)
        .map(|(_, name)| *name)
}

/// The text a decided fast-path call is recorded and matched under:
/// `FunctionCall pg_catalog.lo_open (oid 952)`.
pub fn text(name: &str, oid: u32) -> String {
    format!("FunctionCall pg_catalog.{name} (oid {oid})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_object_functions_are_known_and_others_are_not() {
        assert_eq!(builtin_function(952), Some("lo_open"));
        assert_eq!(builtin_function(955), Some("lowrite"));
        assert_eq!(
            builtin_function(177),
            None,
            "int4pl is not a large-object function"
        );
        assert_eq!(
            builtin_function(16_384),
            None,
            "a function of the database's own"
        );
        assert_eq!(
            text("lo_open", 952),
            "FunctionCall pg_catalog.lo_open (oid 952)"
        );
    }
}
