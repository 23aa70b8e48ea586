//! What a statement's expressions can read: the names its column
//! references use, for masking (see `crate::masking`). The full parse tree
//! is walked generically (every node, through serde), so no kind of
//! expression can hide a reference from it; it costs a full parse, paid
//! only by statements a `mask` rule applies to.

use std::collections::HashSet;

use serde_json::Value;

use super::Reading;

/// The names one statement refers to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ColumnRefs {
    /// The last name of every column reference (`c.email` gives `email`),
    /// lowercased.
    pub columns: HashSet<String>,
    /// A `*` or `t.*` appears.
    pub star: bool,
    /// Names the statement itself gives to rows and values: relations,
    /// aliases (with their column names), CTEs (with theirs), output
    /// names, and functions. A reference to one of them may be a whole row
    /// or a renamed column.
    pub defined: HashSet<String>,
}

impl ColumnRefs {
    /// Whether a value the server computed may hold one of `masked`
    /// (lowercase column names): a reference by that name, a `*`, or a
    /// reference to something the statement named itself.
    pub fn may_read(&self, masked: &[&str]) -> bool {
        self.star
            || self
                .columns
                .iter()
                .any(|c| masked.contains(&c.as_str()) || self.defined.contains(c))
    }
}

/// The references of `sql`, one statement read as `reading` says; `Err`
/// when it does not parse.
pub fn column_refs(sql: &str, reading: Reading) -> Result<ColumnRefs, String> {
    let parsed = pg_query::parse(sql, reading.parser_options()).map_err(|e| e.to_string())?;
    let tree = serde_json::to_value(&parsed.protobuf).map_err(|e| e.to_string())?;
    let mut refs = ColumnRefs::default();
    walk(&tree, &mut refs);
    Ok(refs)
}

/// Keys whose string values (or lists of String nodes) name relations,
/// aliases or functions.
const DEFINING_KEYS: [&str; 6] = [
    "relname",
    "aliasname",
    "ctename",
    "colnames",
    "aliascolnames",
    "funcname",
];

fn walk(value: &Value, refs: &mut ColumnRefs) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| walk(v, refs)),
        Value::Object(map) => {
            for (key, v) in map {
                match key.as_str() {
                    "ColumnRef" => column_ref(v, refs),
                    "AStar" => refs.star = true,
                    "ResTarget" => {
                        if let Some(name) = v.get("name").and_then(Value::as_str) {
                            refs.defined.insert(name.to_lowercase());
                        }
                    }
                    k if DEFINING_KEYS.contains(&k) => names_in(v, &mut refs.defined),
                    _ => {}
                }
                walk(v, refs);
            }
        }
        _ => {}
    }
}

fn column_ref(v: &Value, refs: &mut ColumnRefs) {
    let last = v
        .get("fields")
        .and_then(Value::as_array)
        .and_then(|f| f.last());
    if let Some(name) = last.and_then(string_node) {
        refs.columns.insert(name.to_lowercase());
    }
}

/// The string of a String node (`{"node": {"String": {"sval": ..}}}`).
fn string_node(v: &Value) -> Option<&str> {
    v.get("node")
        .and_then(|n| n.get("String"))
        .and_then(|s| s.get("sval"))
        .and_then(Value::as_str)
}

fn names_in(v: &Value, out: &mut HashSet<String>) {
    match v {
        Value::String(s) => {
            out.insert(s.to_lowercase());
        }
        Value::Array(items) => {
            for item in items {
                if let Some(s) = string_node(item) {
                    out.insert(s.to_lowercase());
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn reads_email(sql: &str) -> bool {
        column_refs(sql, Reading::Standard)
            .unwrap()
            .may_read(&["email"])
    }

    #[test]
    fn computed_values_without_the_column_are_clean() {
        for sql in [
            "SELECT count(*) FROM customers",
            "SELECT count(id), max(name) FROM customers WHERE id > 3",
            "SELECT count(*) || ' customers' FROM customers",
            "SELECT upper(c.name) FROM customers c JOIN orders o ON o.customer_id = c.id",
        ] {
            assert!(!reads_email(sql), "{sql}");
        }
    }

    #[test]
    fn every_way_to_reach_the_column_is_seen() {
        for sql in [
            "SELECT upper(email) FROM customers",
            "SELECT lower(c.\"email\") FROM customers c",
            "SELECT (SELECT max(email) FROM customers) AS x",
            "SELECT coalesce(NULL, CASE WHEN id > 0 THEN email END) FROM customers",
            "SELECT string_agg(email, ',') OVER (ORDER BY id) FROM customers",
            "SELECT upper(x) FROM (SELECT email AS x FROM customers) s",
            "WITH c(x) AS (SELECT email FROM customers) SELECT upper(x) FROM c",
            "SELECT upper(e) FROM customers AS c(i, n, e)",
            "SELECT row_to_json(c) FROM customers c",
            "SELECT to_json(customers) FROM customers",
            "SELECT (c).email FROM customers c",
            "SELECT array_agg(c.*) FROM customers c",
            "SELECT id::text FROM customers UNION SELECT email FROM customers",
            "SELECT t FROM jsonb_to_recordset('[]') AS t(a int)",
            "SELECT x FROM generate_series(1, 2) x",
        ] {
            assert!(reads_email(sql), "{sql}");
        }
        assert!(column_refs("SELECT FROM WHERE", Reading::Standard).is_err());
    }
}
