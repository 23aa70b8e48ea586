//! Statements after which the server may read statement text differently.
//!
//! The analysis reads a message's text under the session's
//! `standard_conforming_strings` and `client_encoding` as the server last
//! reported them (ParameterStatus). A statement that changes either (or may:
//! a `DO` block, a function whose effect is unknown) makes that report stale
//! until the server has answered it: text sent behind it, in a later message
//! of the same write or later in the same extended-protocol batch, could be
//! read by the server in a way the analysis did not see (a literal whose end
//! moves, hiding or revealing `; DROP TABLE ...`). The session holds such
//! text until the answer came, or refuses it (see `session.rs`).
//!
//! Statements of one simple Query are parsed by the server together, before
//! any of them runs, so a `SET` changes nothing for the text of its own
//! message.

use crate::sql::{Analysis, StatementKind, StatementSummary};

/// Built-in functions (as the analysis lists them: lower case, bare or
/// `pg_catalog.`-qualified) known to change no setting. Any other function
/// may run `set_config` or a `SET`, so a call of it counts as a change.
const KNOWN_FUNCTIONS: &[&str] = &[
    "abs",
    "age",
    "array_agg",
    "array_append",
    "array_cat",
    "array_length",
    "array_position",
    "array_remove",
    "array_to_string",
    "avg",
    "bool_and",
    "bool_or",
    "btrim",
    "cardinality",
    "ceil",
    "ceiling",
    "char_length",
    "clock_timestamp",
    "col_description",
    "concat",
    "concat_ws",
    "count",
    "cume_dist",
    "current_database",
    "current_schema",
    "current_setting",
    "currval",
    "date_part",
    "date_trunc",
    "decode",
    "dense_rank",
    "encode",
    "every",
    "extract",
    "first_value",
    "floor",
    "format",
    "format_type",
    "gen_random_uuid",
    "generate_series",
    "has_table_privilege",
    "initcap",
    "json_agg",
    "json_array_elements",
    "json_build_object",
    "json_each",
    "json_extract_path_text",
    "json_object_agg",
    "jsonb_agg",
    "jsonb_array_elements",
    "jsonb_array_length",
    "jsonb_build_object",
    "jsonb_each",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "jsonb_object_agg",
    "jsonb_set",
    "jsonb_typeof",
    "lag",
    "last_value",
    "lastval",
    "lead",
    "left",
    "length",
    "lower",
    "lpad",
    "ltrim",
    "make_date",
    "make_interval",
    "max",
    "md5",
    "min",
    "mod",
    "nextval",
    "now",
    "ntile",
    "obj_description",
    "octet_length",
    "percent_rank",
    "pg_backend_pid",
    "pg_get_expr",
    "pg_get_userbyid",
    "pg_sleep",
    "pg_table_is_visible",
    "pg_typeof",
    "position",
    "power",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "random",
    "rank",
    "regexp_match",
    "regexp_matches",
    "regexp_replace",
    "regexp_split_to_array",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "row_number",
    "row_to_json",
    "rpad",
    "rtrim",
    "setval",
    "split_part",
    "sqrt",
    "starts_with",
    "statement_timestamp",
    "string_agg",
    "string_to_array",
    "strpos",
    "substr",
    "substring",
    "sum",
    "to_char",
    "to_date",
    "to_json",
    "to_jsonb",
    "to_number",
    "to_regclass",
    "to_timestamp",
    "transaction_timestamp",
    "trim",
    "trunc",
    "unnest",
    "upper",
    "version",
];

/// Whether running `analysis` may change how the server reads the text
/// of statements sent after it. `in_transaction_with_change`: an earlier
/// statement of the open transaction block changed a reading setting, so
/// ending the block (or rolling back to a savepoint) may change it back.
pub fn may_change_reading(analysis: &Analysis, in_transaction_with_change: bool) -> bool {
    match analysis {
        // Not read as the server reads it: anything.
        Analysis::Unparsable { .. } => true,
        Analysis::Parsed { statements } => statements
            .iter()
            .any(|s| statement_may_change_reading(s, in_transaction_with_change)),
    }
}

/// Whether one statement may change the reading of later text.
fn statement_may_change_reading(s: &StatementSummary, in_transaction_with_change: bool) -> bool {
    if s.flags.config_change || matches!(s.kind, StatementKind::Do | StatementKind::Call) {
        return true;
    }
    if s.functions.iter().any(|f| !known_function(f)) {
        return true;
    }
    match s.kind {
        StatementKind::Transaction => in_transaction_with_change,
        // SET and RESET; DISCARD ALL (kind other) resets every setting;
        // EXECUTE runs a statement that may call anything.
        StatementKind::Set | StatementKind::Other | StatementKind::Prepared => {
            crate::sql::changes_reading_setting(&s.text)
        }
        _ => false,
    }
}

/// Whether `name` (as the analysis lists functions) is a built-in known
/// to change no setting.
fn known_function(name: &str) -> bool {
    let bare = name.strip_prefix("pg_catalog.").unwrap_or(name);
    !bare.contains('.') && KNOWN_FUNCTIONS.binary_search(&bare).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(sql: &str) -> bool {
        may_change_reading(&crate::sql::analyze(sql), false)
    }

    #[test]
    fn the_known_functions_are_sorted_for_binary_search() {
        assert!(KNOWN_FUNCTIONS.is_sorted());
    }

    #[test]
    fn what_may_change_how_text_is_read() {
        for sql in [
            "SET standard_conforming_strings = off",
            "set local STANDARD_CONFORMING_STRINGS to off",
            "SET client_encoding = 'SJIS'",
            "SET NAMES 'SJIS'",
            "RESET client_encoding",
            "RESET ALL",
            "DISCARD ALL",
            "SET backslash_quote = on",
            "SELECT set_config('standard_conforming_strings', 'off', false)",
            "SELECT pg_catalog.set_config('client_encoding', 'SJIS', false)",
            "DO $$ BEGIN PERFORM 1; END $$",
            "CALL p()",
            "SELECT my_function()",
            "SELECT 1; SET standard_conforming_strings = off",
            "EXECUTE q",
            "SELECT 'unterminated",
        ] {
            assert!(changes(sql), "{sql}");
        }
        for sql in [
            "SET search_path = crm, public",
            "SET application_name = 'x'",
            "SHOW standard_conforming_strings",
            "DISCARD PLANS",
            "SELECT count(*), now(), upper(name) FROM t",
            "SELECT pg_catalog.lower('A')",
            "INSERT INTO t VALUES (1)",
            "BEGIN",
            "COMMIT",
            "PREPARE q AS SELECT 1",
        ] {
            assert!(!changes(sql), "{sql}");
        }
        // Ending a block in which a reading setting changed.
        let rollback = crate::sql::analyze("ROLLBACK");
        assert!(may_change_reading(&rollback, true));
        assert!(!may_change_reading(&rollback, false));
    }
}
