//! What a statement's expressions can read: the names its column
//! references use, for masking (see `crate::masking`). The whole parse tree
//! is walked with the generated visitor ([`super::visit`]), which descends
//! into every node of every message type, so no kind of expression can hide
//! a reference from it; it costs a full parse, paid only by statements a
//! `mask` rule applies to.

use std::collections::HashSet;

use pg_query::protobuf as pb;
use pg_query::NodeEnum;

use super::visit::{self, Visit};
use super::{Reading, TableRef};

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
    /// The one relation every column of the result is named from, when the
    /// statement is a plain query of it ([`direct_source`]): then each
    /// result field the server traces to a table column is that relation's
    /// column of the field's own name.
    pub direct_source: Option<TableRef>,
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

    fn define(&mut self, name: &str) {
        if !name.is_empty() {
            self.defined.insert(name.to_lowercase());
        }
    }

    /// Every String node of a name list (`schema.function`, an alias's
    /// column names).
    fn define_all(&mut self, names: &[pb::Node]) {
        for name in names {
            if let Some(NodeEnum::String(s)) = &name.node {
                self.define(&s.sval);
            }
        }
    }
}

/// The references of `sql`, one statement read as `reading` says; `Err`
/// when it does not parse.
pub fn column_refs(sql: &str, reading: Reading) -> Result<ColumnRefs, String> {
    let parsed = pg_query::parse(sql, reading.parser_options()).map_err(|e| e.to_string())?;
    let mut refs = ColumnRefs::default();
    for statement in &parsed.protobuf.stmts {
        if let Some(node) = &statement.stmt {
            refs.visit_node(node);
        }
    }
    if let [only] = parsed.protobuf.stmts.as_slice() {
        refs.direct_source = only
            .stmt
            .as_ref()
            .and_then(|n| n.node.as_ref())
            .and_then(direct_source);
    }
    Ok(refs)
}

/// The relation a query's result fields are named from, when the server's
/// name for each field it traces to a table column (the RowDescription's
/// table OID and column number) is that column's own name: a `SELECT` of
/// one relation, without a `WITH`, a set operation, `INTO`, `VALUES`, or a
/// column alias list on the relation, and no alias on an item the server
/// may turn into a plain column (a column reference, `(row).field`,
/// `field(row)`, and either of those under a cast or `COLLATE`). The
/// server names an unaliased column reference, `*` and `t.*` by the
/// column's name; a field it computes has no table OID. `None` otherwise.
fn direct_source(statement: &NodeEnum) -> Option<TableRef> {
    let NodeEnum::SelectStmt(select) = statement else {
        return None;
    };
    let plain = select.op == pb::SetOperation::SetopNone as i32
        && select.larg.is_none()
        && select.rarg.is_none()
        && select.with_clause.is_none()
        && select.into_clause.is_none()
        && select.values_lists.is_empty();
    if !plain {
        return None;
    }
    let [from] = select.from_clause.as_slice() else {
        return None;
    };
    let Some(NodeEnum::RangeVar(relation)) = &from.node else {
        return None;
    };
    if !relation.catalogname.is_empty()
        || relation
            .alias
            .as_ref()
            .is_some_and(|a| !a.colnames.is_empty())
    {
        return None;
    }
    // The name the statement's expressions know the relation by.
    let refname = relation
        .alias
        .as_ref()
        .map_or(relation.relname.as_str(), |a| a.aliasname.as_str());
    let renames_a_column = select.target_list.iter().any(|item| match &item.node {
        Some(NodeEnum::ResTarget(target)) => {
            !target.name.is_empty()
                && target
                    .val
                    .as_deref()
                    .is_none_or(|v| may_be_a_column(v, refname))
        }
        _ => true,
    });
    if renames_a_column {
        return None;
    }
    Some(TableRef {
        schema: (!relation.schemaname.is_empty()).then(|| relation.schemaname.clone()),
        name: relation.relname.clone(),
    })
}

/// Whether the server may make `value` a plain column of the relation
/// known as `refname` (a `Var`, whose result field carries the column's
/// table OID and number).
fn may_be_a_column(value: &pb::Node, refname: &str) -> bool {
    if let Some(inner) = under_cast(value) {
        return inner.is_none_or(|v| may_be_a_column(v, refname));
    }
    match &value.node {
        Some(NodeEnum::ColumnRef(_) | NodeEnum::AIndirection(_)) => true,
        // `email(c)` is `c.email` when no function `email` takes the row;
        // the server tries that only for a call that could be written so,
        // of a whole row.
        Some(NodeEnum::FuncCall(call)) => {
            call.funcname.len() == 1
                && !call.agg_star
                && !call.agg_distinct
                && !call.func_variadic
                && call.over.is_none()
                && call.agg_order.is_empty()
                && call.agg_filter.is_none()
                && matches!(call.args.as_slice(), [arg] if may_be_the_row(arg, refname))
        }
        Some(_) => false,
        None => true,
    }
}

/// The value under a cast or `COLLATE` (`Some(None)` when the tree has
/// none); `None` when `value` is neither. A cast to the value's own type is
/// no cast at all to the server, so what is under it counts.
fn under_cast(value: &pb::Node) -> Option<Option<&pb::Node>> {
    match &value.node {
        Some(NodeEnum::TypeCast(cast)) => Some(cast.arg.as_deref()),
        Some(NodeEnum::CollateClause(collate)) => Some(collate.arg.as_deref()),
        _ => None,
    }
}

/// Whether `value` may be the whole row of the relation known as
/// `refname`: a reference whose last name is that (`c`, `public.c`) or a
/// `*`, possibly under a cast or `COLLATE`.
fn may_be_the_row(value: &pb::Node, refname: &str) -> bool {
    if let Some(inner) = under_cast(value) {
        return inner.is_none_or(|v| may_be_the_row(v, refname));
    }
    match &value.node {
        Some(NodeEnum::ColumnRef(column)) => {
            match column.fields.last().and_then(|f| f.node.as_ref()) {
                Some(NodeEnum::String(last)) => last.sval == refname,
                _ => true,
            }
        }
        Some(NodeEnum::AIndirection(_)) | None => true,
        Some(_) => false,
    }
}

/// Every message type with a field that names a relation, an alias, a CTE,
/// a column list or a function is interpreted here; everything else is
/// only descended into.
impl Visit for ColumnRefs {
    fn visit_column_ref(&mut self, node: &pb::ColumnRef) {
        if let Some(NodeEnum::String(last)) = node.fields.last().and_then(|f| f.node.as_ref()) {
            self.columns.insert(last.sval.to_lowercase());
        }
        visit::walk_column_ref(self, node);
    }

    fn visit_a_star(&mut self, node: &pb::AStar) {
        self.star = true;
        visit::walk_a_star(self, node);
    }

    fn visit_res_target(&mut self, node: &pb::ResTarget) {
        self.define(&node.name);
        visit::walk_res_target(self, node);
    }

    fn visit_range_var(&mut self, node: &pb::RangeVar) {
        self.define(&node.relname);
        visit::walk_range_var(self, node);
    }

    fn visit_alias(&mut self, node: &pb::Alias) {
        self.define(&node.aliasname);
        self.define_all(&node.colnames);
        visit::walk_alias(self, node);
    }

    fn visit_common_table_expr(&mut self, node: &pb::CommonTableExpr) {
        self.define(&node.ctename);
        self.define_all(&node.aliascolnames);
        visit::walk_common_table_expr(self, node);
    }

    fn visit_table_func(&mut self, node: &pb::TableFunc) {
        self.define_all(&node.colnames);
        visit::walk_table_func(self, node);
    }

    fn visit_row_expr(&mut self, node: &pb::RowExpr) {
        self.define_all(&node.colnames);
        visit::walk_row_expr(self, node);
    }

    fn visit_func_call(&mut self, node: &pb::FuncCall) {
        self.define_all(&node.funcname);
        visit::walk_func_call(self, node);
    }

    fn visit_range_tbl_entry(&mut self, node: &pb::RangeTblEntry) {
        self.define(&node.ctename);
        visit::walk_range_tbl_entry(self, node);
    }

    fn visit_with_check_option(&mut self, node: &pb::WithCheckOption) {
        self.define(&node.relname);
        visit::walk_with_check_option(self, node);
    }

    fn visit_create_trig_stmt(&mut self, node: &pb::CreateTrigStmt) {
        self.define_all(&node.funcname);
        visit::walk_create_trig_stmt(self, node);
    }

    fn visit_create_event_trig_stmt(&mut self, node: &pb::CreateEventTrigStmt) {
        self.define_all(&node.funcname);
        visit::walk_create_event_trig_stmt(self, node);
    }

    fn visit_create_function_stmt(&mut self, node: &pb::CreateFunctionStmt) {
        self.define_all(&node.funcname);
        visit::walk_create_function_stmt(self, node);
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

    fn direct(sql: &str) -> Option<TableRef> {
        column_refs(sql, Reading::Standard).unwrap().direct_source
    }

    #[test]
    fn a_plain_query_of_one_relation_names_its_fields_from_it() {
        let customers = |schema: Option<&str>| TableRef {
            schema: schema.map(str::to_owned),
            name: "customers".into(),
        };
        for sql in [
            "SELECT id, email FROM customers WHERE id = 1",
            "SELECT * FROM customers ORDER BY id LIMIT 3",
            "SELECT c.*, upper(c.name) AS shout, count(*) OVER () AS n FROM customers c",
            "SELECT DISTINCT email, (c).name, email(c) FROM Customers AS c FOR UPDATE",
            "SELECT email::text, 1 AS one, email || '' AS joined, max(id) FILTER (WHERE true) AS m FROM customers GROUP BY email",
            "SELECT id FROM customers WHERE EXISTS (SELECT 1 FROM secrets s WHERE s.id = customers.id)",
            "SELECT (SELECT email FROM secrets LIMIT 1) AS other FROM customers",
            "SELECT upper(name) AS a, lower(c.name) AS b, length(c.email::text) AS n FROM customers c",
            "TABLE customers",
        ] {
            assert_eq!(direct(sql), Some(customers(None)), "{sql}");
        }
        assert_eq!(
            direct("SELECT email FROM crm.customers"),
            Some(customers(Some("crm")))
        );
        assert_eq!(
            direct("SELECT \"Email\" FROM \"customers\""),
            Some(customers(None))
        );
    }

    #[test]
    fn anything_that_may_rename_a_column_is_not_direct() {
        for sql in [
            // An alias on anything the server may make a plain column.
            "SELECT email AS contact FROM customers",
            "SELECT c.email x FROM customers c",
            "SELECT (c).email AS x FROM customers c",
            "SELECT email(c) AS x FROM customers c",
            "SELECT email::text AS x FROM customers",
            "SELECT (email COLLATE \"C\")::text AS x FROM customers",
            "SELECT max(c) AS x FROM customers c",
            "SELECT email(c.*) AS x FROM customers c",
            "SELECT email(customers) AS x FROM customers",
            "SELECT email(public.customers) AS x FROM public.customers",
            "SELECT email(c::customers) AS x FROM customers c",
            // Column aliases on the relation, or anything but one relation.
            "SELECT x FROM customers AS c(i, x)",
            "SELECT e FROM (SELECT email AS e FROM customers) s",
            "WITH customers AS (SELECT note AS email FROM orders) SELECT email FROM customers",
            "SELECT email FROM customers UNION SELECT note FROM orders",
            "SELECT email FROM customers c JOIN orders o ON o.customer_id = c.id",
            "SELECT email FROM customers, orders",
            "SELECT email FROM ROWS FROM (customers_fn())",
            "SELECT email FROM other_db.public.customers",
            "SELECT email INTO copy FROM customers",
            "VALUES (1)",
            "SELECT 1",
            "SELECT email FROM customers; SELECT 1",
            "UPDATE customers SET email = '' RETURNING email",
        ] {
            assert_eq!(direct(sql), None, "{sql}");
        }
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

    /// The references as a generic walk of the tree's JSON form finds
    /// them, by field name: an oracle for the visitor, which must find the
    /// same names in every statement of PostgreSQL's regression SQL.
    fn by_field_names(sql: &str) -> ColumnRefs {
        use serde_json::Value;
        fn string_node(v: &Value) -> Option<&str> {
            v.get("node")?.get("String")?.get("sval")?.as_str()
        }
        fn define(v: &Value, refs: &mut ColumnRefs) {
            match v {
                Value::String(s) => refs.define(s),
                Value::Array(items) => items
                    .iter()
                    .filter_map(string_node)
                    .for_each(|s| refs.define(s)),
                _ => {}
            }
        }
        fn walk(value: &Value, refs: &mut ColumnRefs) {
            match value {
                Value::Array(items) => items.iter().for_each(|v| walk(v, refs)),
                Value::Object(map) => {
                    for (key, v) in map {
                        match key.as_str() {
                            "ColumnRef" => {
                                let fields = v.get("fields").and_then(Value::as_array);
                                if let Some(name) =
                                    fields.and_then(|f| f.last()).and_then(string_node)
                                {
                                    refs.columns.insert(name.to_lowercase());
                                }
                            }
                            "AStar" => refs.star = true,
                            "ResTarget" => define(v.get("name").unwrap_or(&Value::Null), refs),
                            "relname" | "aliasname" | "ctename" | "colnames" | "aliascolnames"
                            | "funcname" => define(v, refs),
                            _ => {}
                        }
                        walk(v, refs);
                    }
                }
                _ => {}
            }
        }
        let parsed = pg_query::parse(sql, 0).unwrap();
        let mut refs = ColumnRefs::default();
        walk(&serde_json::to_value(&parsed.protobuf).unwrap(), &mut refs);
        refs
    }

    #[test]
    fn the_visitor_finds_what_a_walk_by_field_names_finds() {
        let corpus = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/postgres-regress"
        );
        let mut compared = 0;
        for entry in std::fs::read_dir(corpus).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            // psql's backslash commands are not SQL: only whole statements
            // that parse are compared.
            let Ok(pieces) = pg_query::split_with_scanner(&text) else {
                continue;
            };
            for piece in pieces {
                let Ok(found) = column_refs(piece, Reading::Standard) else {
                    continue;
                };
                let oracle = by_field_names(piece);
                assert_eq!(
                    (found.columns, found.star, found.defined),
                    (oracle.columns, oracle.star, oracle.defined),
                    "{}: {piece}",
                    path.display()
                );
                compared += 1;
            }
        }
        assert!(compared > 10_000, "only {compared} statements compared");
    }
}
