#![allow(clippy::panic, clippy::unwrap_used)]

use super::*;

fn parsed(sql: &str) -> Vec<StatementSummary> {
    match analyze(sql) {
        Analysis::Parsed { statements } => statements,
        Analysis::Unparsable { error } => panic!("{sql:?} did not parse: {error}"),
    }
}

fn one(sql: &str) -> StatementSummary {
    let mut statements = parsed(sql);
    assert_eq!(statements.len(), 1, "{sql:?}: {statements:?}");
    statements.remove(0)
}

fn refused(sql: &str) -> String {
    match analyze(sql) {
        Analysis::Unparsable { error } => error,
        Analysis::Parsed { statements } => panic!("{sql:?} was not refused: {statements:?}"),
    }
}

fn t(name: &str) -> TableRef {
    match name.split_once('.') {
        Some((schema, name)) => TableRef {
            schema: Some(schema.to_owned()),
            name: name.to_owned(),
        },
        None => TableRef {
            schema: None,
            name: name.to_owned(),
        },
    }
}

fn tables(names: &[&str]) -> Vec<TableRef> {
    let mut tables: Vec<TableRef> = names.iter().map(|n| t(n)).collect();
    tables.sort();
    tables
}

fn reads(sql: &str) -> Vec<TableRef> {
    one(sql).tables_read
}

#[test]
fn kinds_and_commands() {
    use StatementKind as K;
    let cases: &[(&str, K, &str)] = &[
        ("SELECT 1", K::Select, "SELECT"),
        ("INSERT INTO t VALUES (1)", K::Insert, "INSERT"),
        ("INSERT INTO t SET a = 1", K::Insert, "INSERT"),
        ("REPLACE INTO t VALUES (1)", K::Insert, "REPLACE"),
        ("UPDATE t SET a = 1 WHERE b = 2", K::Update, "UPDATE"),
        ("DELETE FROM t WHERE a = 1", K::Delete, "DELETE"),
        ("CREATE TABLE t (a INT)", K::Create, "CREATE TABLE"),
        ("CREATE INDEX i ON t (a)", K::Create, "CREATE INDEX"),
        ("CREATE DATABASE d", K::Create, "CREATE DATABASE"),
        ("ALTER TABLE t ADD COLUMN c INT", K::Alter, "ALTER TABLE"),
        ("DROP TABLE t", K::Drop, "DROP TABLE"),
        ("DROP VIEW v", K::Drop, "DROP VIEW"),
        ("TRUNCATE TABLE t", K::Truncate, "TRUNCATE TABLE"),
        ("RENAME TABLE a TO b", K::Alter, "RENAME TABLE"),
        ("GRANT SELECT ON db.* TO 'u'@'%'", K::Grant, "GRANT"),
        ("REVOKE SELECT ON db.* FROM 'u'@'%'", K::Revoke, "REVOKE"),
        ("SET @a = 1", K::Set, "SET"),
        ("SET NAMES utf8mb4", K::Set, "SET"),
        ("SHOW TABLES", K::Set, "SHOW TABLES"),
        ("USE db", K::Set, "USE"),
        ("CALL p(1)", K::Call, "CALL"),
        ("EXECUTE s USING @a", K::Prepared, "EXECUTE"),
        ("DEALLOCATE PREPARE s", K::Prepared, "DEALLOCATE PREPARE"),
        ("DROP PREPARE s", K::Prepared, "DEALLOCATE PREPARE"),
        (
            "EXECUTE IMMEDIATE 'SELECT 1'",
            K::Prepared,
            "EXECUTE IMMEDIATE",
        ),
        ("EXPLAIN SELECT * FROM t", K::Explain, "EXPLAIN"),
        ("LOCK TABLES t READ", K::Other, "LOCK TABLES"),
        ("UNLOCK TABLES", K::Other, "UNLOCK TABLES"),
    ];
    for (sql, kind, command) in cases {
        let s = one(sql);
        assert_eq!((s.kind, &*s.command), (*kind, *command), "{sql}");
        assert_eq!(s.transaction, None, "{sql}");
    }
}

#[test]
fn transactions() {
    use TransactionOp as T;
    let cases: &[(&str, T, &str)] = &[
        ("START TRANSACTION", T::Begin, "START TRANSACTION"),
        ("BEGIN", T::Begin, "BEGIN"),
        ("BEGIN WORK", T::Begin, "BEGIN"),
        ("COMMIT", T::Commit, "COMMIT"),
        ("ROLLBACK", T::Rollback, "ROLLBACK"),
        ("SAVEPOINT a", T::Other, "SAVEPOINT"),
        ("ROLLBACK TO SAVEPOINT a", T::Other, "ROLLBACK TO SAVEPOINT"),
        ("RELEASE SAVEPOINT a", T::Other, "RELEASE SAVEPOINT"),
    ];
    for (sql, op, command) in cases {
        let s = one(sql);
        assert_eq!(s.kind, StatementKind::Transaction, "{sql}");
        assert_eq!((s.transaction, &*s.command), (Some(*op), *command), "{sql}");
    }
}

#[test]
fn names_are_lowercased_with_their_database() {
    let s = one("SELECT * FROM Shop.`Orders` o JOIN `customers` c ON o.c = c.id");
    assert_eq!(s.tables_read, tables(&["customers", "shop.orders"]));
    assert!(s.tables_written.is_empty());
}

#[test]
fn embedded_queries_are_read() {
    let cases: &[(&str, &[&str])] = &[
        (
            "SELECT (SELECT s FROM secrets LIMIT 1) FROM t",
            &["secrets", "t"],
        ),
        ("SELECT * FROM t WHERE a IN (SELECT a FROM u)", &["t", "u"]),
        (
            "SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u)",
            &["t", "u"],
        ),
        ("SELECT * FROM (SELECT * FROM secrets) d", &["secrets"]),
        (
            "SELECT * FROM a LEFT JOIN (b JOIN c ON b.x = c.x) ON a.x = b.x",
            &["a", "b", "c"],
        ),
        ("SELECT a FROM t UNION SELECT a FROM u", &["t", "u"]),
        ("SELECT CASE WHEN (SELECT 1 FROM u) THEN 1 END", &["u"]),
        (
            "SELECT a FROM t ORDER BY (SELECT b FROM u LIMIT 1)",
            &["t", "u"],
        ),
    ];
    for (sql, expected) in cases {
        assert_eq!(reads(sql), tables(expected), "{sql}");
    }
}

#[test]
fn insert_and_replace_write_their_table_and_read_their_source() {
    for sql in [
        "INSERT INTO archive SELECT * FROM orders",
        "REPLACE INTO archive SELECT * FROM orders",
        "INSERT INTO archive (a) VALUES ((SELECT a FROM orders LIMIT 1))",
    ] {
        let s = one(sql);
        assert_eq!(s.tables_written, tables(&["archive"]), "{sql}");
        assert_eq!(s.tables_read, tables(&["orders"]), "{sql}");
    }
}

#[test]
fn multi_table_update_writes_the_tables_it_sets() {
    let s = one("UPDATE t1 a JOIN t2 b ON a.id = b.id SET a.x = b.y WHERE b.z = 1");
    assert_eq!(s.tables_written, tables(&["t1"]));
    assert_eq!(s.tables_read, tables(&["t2"]));
    assert!(!s.flags.no_where);

    let s = one("UPDATE t1 JOIN t2 SET t2.x = t1.y");
    assert_eq!(s.tables_written, tables(&["t2"]));
    assert_eq!(s.tables_read, tables(&["t1"]));
    assert!(s.flags.no_where);
    // The comma form is not in the dialect: refused, not misread.
    refused("UPDATE t1, t2 SET t2.x = t1.y");

    // An unqualified column may belong to either table.
    let s = one("UPDATE t1 JOIN t2 ON t1.id = t2.id SET x = 1");
    assert_eq!(s.tables_written, tables(&["t1", "t2"]));

    let s = one("UPDATE t SET a = (SELECT b FROM u LIMIT 1) WHERE c = 1");
    assert_eq!(s.tables_written, tables(&["t"]));
    assert_eq!(s.tables_read, tables(&["u"]));
}

#[test]
fn multi_table_delete_writes_the_tables_it_deletes_from() {
    let s = one("DELETE t1, t2 FROM t1 JOIN t2 ON t1.a = t2.a JOIN t3 WHERE t3.x = 1");
    assert_eq!(s.tables_written, tables(&["t1", "t2"]));
    assert_eq!(s.tables_read, tables(&["t3"]));

    let s = one("DELETE FROM t1, t2 USING t1 JOIN t2 JOIN t3");
    assert_eq!(s.tables_written, tables(&["t1", "t2"]));
    assert_eq!(s.tables_read, tables(&["t3"]));
    assert!(s.flags.no_where);

    let s = one("DELETE a FROM t1 AS a JOIN t2 b ON a.x = b.x WHERE b.y = 1");
    assert_eq!(s.tables_written, tables(&["t1"]));
    assert_eq!(s.tables_read, tables(&["t2"]));

    let s = one("DELETE FROM t WHERE id IN (SELECT id FROM u)");
    assert_eq!(s.tables_written, tables(&["t"]));
    assert_eq!(s.tables_read, tables(&["u"]));
}

#[test]
fn ddl_targets() {
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("CREATE TABLE t2 AS SELECT * FROM t1", &["t1"], &["t2"]),
        ("CREATE TABLE t2 SELECT * FROM t1", &["t1"], &["t2"]),
        ("CREATE TABLE t2 LIKE db.t1", &["db.t1"], &["t2"]),
        (
            "CREATE VIEW v AS SELECT * FROM secrets",
            &["secrets"],
            &["v"],
        ),
        ("ALTER TABLE Db.T ADD COLUMN c INT", &[], &["db.t"]),
        ("DROP TABLE IF EXISTS a, db.b", &[], &["a", "db.b"]),
        ("TRUNCATE TABLE t", &[], &["t"]),
        ("RENAME TABLE a TO b, c TO d", &[], &["a", "b", "c", "d"]),
        ("CREATE INDEX i ON t (a)", &[], &["t"]),
    ];
    for (sql, read, written) in cases {
        let s = one(sql);
        assert_eq!(s.tables_read, tables(read), "{sql}");
        assert_eq!(s.tables_written, tables(written), "{sql}");
    }
}

#[test]
fn cte_names_hide_tables_only_in_their_scope() {
    // A CTE hides the table in its own query's body.
    assert_eq!(
        reads("WITH secrets AS (SELECT 1 AS a) SELECT * FROM secrets"),
        tables(&[])
    );
    // Not in the enclosing query.
    assert_eq!(
        reads("SELECT * FROM secrets WHERE EXISTS (WITH secrets AS (SELECT 1) SELECT 1)"),
        tables(&["secrets"])
    );
    // Not in a sibling query.
    assert_eq!(
        reads("SELECT * FROM (WITH s AS (SELECT 1) SELECT * FROM s) x, s"),
        tables(&["s"])
    );
    // Not in its own definition (no RECURSIVE), nor in an earlier CTE.
    assert_eq!(
        reads("WITH secrets AS (SELECT * FROM secrets) SELECT * FROM secrets"),
        tables(&["secrets"])
    );
    assert_eq!(
        reads("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a, b"),
        tables(&["b"])
    );
    // A later CTE sees an earlier one.
    assert_eq!(
        reads("WITH a AS (SELECT 1), b AS (SELECT * FROM a) SELECT * FROM b"),
        tables(&[])
    );
    // RECURSIVE: the CTE sees itself.
    assert_eq!(
        reads("WITH RECURSIVE r AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r"),
        tables(&[])
    );
    // A qualified name is always a table.
    assert_eq!(
        reads("WITH s AS (SELECT 1) SELECT * FROM db.s"),
        tables(&["db.s"])
    );
    // Visible below: in a subquery of the body.
    assert_eq!(
        reads("WITH s AS (SELECT 1) SELECT * FROM t WHERE EXISTS (SELECT * FROM s)"),
        tables(&["t"])
    );
}

#[test]
fn explain_includes_the_explained_statement() {
    let s = one("EXPLAIN SELECT * FROM secrets WHERE a = LOAD_FILE('/etc/passwd')");
    assert_eq!(s.kind, StatementKind::Explain);
    assert_eq!(s.tables_read, tables(&["secrets"]));
    assert_eq!(s.functions, vec!["load_file".to_owned()]);
    let s = one("EXPLAIN DELETE FROM t");
    assert_eq!(s.tables_written, tables(&["t"]));
    assert!(s.flags.no_where);
}

#[test]
fn functions_are_lowercased_and_qualified() {
    let s = one("SELECT UPPER(a), db.MyFunc(b), `Sleep`(1) FROM t WHERE c = COALESCE(d, 1)");
    assert_eq!(s.functions, vec!["coalesce", "db.myfunc", "sleep", "upper"]);
    let s = one("CALL Db.Proc(1)");
    assert_eq!(s.kind, StatementKind::Call);
    assert_eq!(s.functions, vec!["db.proc"]);
}

#[test]
fn server_file_access() {
    let s = one("SELECT LOAD_FILE('/etc/passwd')");
    assert!(s.flags.server_file_access);
    assert!(!one("SELECT LOAD('/etc/passwd')").flags.server_file_access);

    let s = one("SELECT * FROM secrets INTO OUTFILE '/tmp/x' FIELDS TERMINATED BY ',' OPTIONALLY ENCLOSED BY '\"' LINES TERMINATED BY '\\n'");
    assert!(s.flags.server_file_access);
    assert_eq!(s.kind, StatementKind::Select);
    assert_eq!(s.tables_read, tables(&["secrets"]));

    let s = one("SELECT * INTO OUTFILE '/tmp/x' CHARACTER SET utf8mb4 FROM secrets");
    assert!(s.flags.server_file_access);
    assert_eq!(s.tables_read, tables(&["secrets"]));

    let s = one("SELECT a FROM secrets LIMIT 1 INTO DUMPFILE '/tmp/x'");
    assert!(s.flags.server_file_access);
    assert_eq!(s.tables_read, tables(&["secrets"]));

    // A variable target is not a file.
    let s = one("SELECT a INTO @x FROM t");
    assert!(!s.flags.server_file_access);
}

#[test]
fn load_data() {
    for sql in [
        "LOAD DATA INFILE '/tmp/x' INTO TABLE db.t",
        "LOAD DATA LOCAL INFILE '/tmp/x' REPLACE INTO TABLE db.t FIELDS TERMINATED BY ',' IGNORE 1 LINES (a, @b)",
        "LOAD DATA LOW_PRIORITY LOCAL INFILE 'x' IGNORE INTO TABLE `db`.`T` CHARACTER SET utf8mb4",
    ] {
        let s = one(sql);
        assert_eq!(s.kind, StatementKind::Copy, "{sql}");
        let local = sql.contains("LOCAL");
        let label = if local { "LOAD DATA LOCAL" } else { "LOAD DATA" };
        assert_eq!(&*s.command, label, "{sql}");
        assert_eq!(local_infile(sql).is_some(), local, "{sql}");
        assert!(s.flags.server_file_access, "{sql}");
        assert!(!s.flags.no_where, "{sql}");
        assert_eq!(s.tables_written, tables(&["db.t"]), "{sql}");
        assert!(s.tables_read.is_empty(), "{sql}");
    }
    let s = one("LOAD DATA INFILE 'x' INTO TABLE t (a, @b) SET c = (SELECT s FROM secrets LIMIT 1), d = UPPER(@b)");
    assert_eq!(s.tables_written, tables(&["t"]));
    assert_eq!(s.tables_read, tables(&["secrets"]));
    assert_eq!(s.functions, vec!["upper"]);
    refused("LOAD DATA INFILE 'x' INTO TABLE t WHERE (SELECT 1)");
    refused("LOAD DATA INFILE 'x'");
}

#[test]
fn config_change() {
    for sql in [
        "SET GLOBAL max_connections = 10",
        "SET @@global.max_connections = 10",
        "SET @@GLOBAL.max_connections = 10",
        "SET PERSIST max_connections = 10",
        "SET PERSIST_ONLY max_connections = 10",
        "SET a = 1, GLOBAL b = 2",
    ] {
        let s = one(sql);
        assert_eq!(s.kind, StatementKind::Set, "{sql}");
        assert!(s.flags.config_change, "{sql}");
    }
    for sql in [
        "SET SESSION sql_mode = 'global'",
        "SET @a = 1",
        "SET @@session.x = 1",
    ] {
        assert!(!one(sql).flags.config_change, "{sql}");
    }
    assert_ne!(
        one("SET PERSIST max_connections = 10").fingerprint,
        one("SET GLOBAL max_connections = 10").fingerprint
    );
}

#[test]
fn no_where() {
    assert!(one("UPDATE t SET a = 1").flags.no_where);
    assert!(one("DELETE FROM t").flags.no_where);
    assert!(!one("UPDATE t SET a = 1 WHERE b = 2").flags.no_where);
    assert!(!one("DELETE FROM t WHERE b = 2").flags.no_where);
    assert!(!one("SELECT * FROM t").flags.no_where);
}

#[test]
fn prepare_from_text_counts_its_statement() {
    let s = one("PREPARE s FROM 'SELECT * FROM secrets WHERE a = ?'");
    assert_eq!(s.kind, StatementKind::Prepared);
    assert_eq!(&*s.command, "PREPARE");
    assert_eq!(s.tables_read, tables(&["secrets"]));
    let s = one("PREPARE s FROM 'DELETE FROM t'");
    assert_eq!(s.tables_written, tables(&["t"]));
    assert!(s.flags.no_where);
    // A text in a user variable could be anything.
    assert!(refused("PREPARE s FROM @q").contains("user variable"));
    refused("PREPARE s FROM 'SELECT 1; DROP TABLE t'");
    refused("PREPARE s FROM 'SELECT \\'x\\''");
    // The server reads an executable comment in the prepared text when it
    // prepares it; the string is left as it is, so the PREPARE is refused,
    // saying where.
    let sql = "PREPARE s FROM 'SELECT 1 /*!, (SELECT s FROM secrets) */'";
    let server = ServerVersion {
        id: 101119,
        mariadb: true,
    };
    let resolved = resolve_executable_comments(sql, Escapes::Unknown, server).unwrap();
    assert_eq!(resolved, sql);
    let error = refused(&resolved);
    assert!(
        error.starts_with("PREPARE: in the statement text: executable comment"),
        "{error}"
    );
}

#[test]
fn execute_immediate_counts_the_statement_in_its_text() {
    let s = one("EXECUTE IMMEDIATE 'SELECT s FROM secrets WHERE a = ?' USING (SELECT MAX(id) + 0)");
    assert_eq!(
        (s.kind, &*s.command),
        (StatementKind::Prepared, "EXECUTE IMMEDIATE")
    );
    assert_eq!(s.tables_read, tables(&["secrets"]));
    assert_eq!(s.functions, ["max"]);
    let s = one("execute immediate \"DELETE FROM t\"");
    assert_eq!(s.tables_written, tables(&["t"]));
    assert!(s.flags.no_where);
    // What the values in USING read counts too.
    let s = one("EXECUTE IMMEDIATE 'SELECT ?' USING (SELECT s FROM secrets LIMIT 1)");
    assert_eq!(s.tables_read, tables(&["secrets"]));
    assert_eq!(
        one("EXECUTE IMMEDIATE 'SELECT * FROM t WHERE a = 1' USING 5").fingerprint,
        one("EXECUTE IMMEDIATE 'SELECT * FROM t WHERE a = 2' USING 6").fingerprint
    );
    // A statement the agent cannot read from the text is refused.
    for sql in [
        "EXECUTE IMMEDIATE CONCAT('SELECT * FROM sec', 'rets')",
        "EXECUTE IMMEDIATE @q",
        "EXECUTE IMMEDIATE 'SELECT 1; DROP TABLE t'",
        "EXECUTE IMMEDIATE 'SELECT 1' 'x'",
        "EXECUTE IMMEDIATE 'SELECT 1' USING",
        "EXECUTE IMMEDIATE",
        // A handler's READ is decided by what the handler was opened on
        // only as a statement of its own.
        "EXECUTE IMMEDIATE 'HANDLER h READ NEXT'",
        "EXECUTE IMMEDIATE 'HANDLER t OPEN AS h'",
    ] {
        let error = refused(sql);
        assert!(error.starts_with("EXECUTE IMMEDIATE"), "{sql}: {error}");
    }
    let error = refused("PREPARE s FROM 'HANDLER h READ FIRST'");
    assert!(
        error.contains("HANDLER READ cannot be prepared through the agent"),
        "{error}"
    );
}

#[test]
fn statements_that_give_or_use_a_session_name_say_which() {
    for (sql, expected) in [
        (
            "HANDLER Secrets OPEN",
            NameUse::OpenHandler("secrets".into()),
        ),
        (
            "HANDLER shop.secrets OPEN AS `H`",
            NameUse::OpenHandler("h".into()),
        ),
        (
            "HANDLER shop.secrets OPEN h",
            NameUse::OpenHandler("h".into()),
        ),
        (
            "HANDLER H READ idx = (1) LIMIT 2",
            NameUse::ReadHandler("h".into()),
        ),
        ("HANDLER h CLOSE", NameUse::CloseHandler("h".into())),
        ("PREPARE St FROM 'SELECT 1'", NameUse::Prepare("st".into())),
        ("EXECUTE ST USING @a, @b", NameUse::Execute("st".into())),
        ("DEALLOCATE PREPARE `st`", NameUse::Deallocate("st".into())),
        ("DROP PREPARE St", NameUse::Deallocate("st".into())),
    ] {
        assert_eq!(name_use(&one(sql)), Some(expected), "{sql}");
    }
    for sql in ["SELECT 1", "EXECUTE IMMEDIATE 'SELECT 1'", "USE shop"] {
        assert_eq!(name_use(&one(sql)), None, "{sql}");
    }
}

#[test]
fn fingerprints_ignore_literals_only() {
    let fp = |sql: &str| one(sql).fingerprint;
    let a = fp("SELECT * FROM t WHERE a = 1 AND b = 'x'");
    assert_eq!(a.len(), 16);
    assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(a, fp("SELECT * FROM t WHERE a = 42 AND b = 'other'"));
    assert_eq!(a, fp("select *   from t where a = 7 and b = \"y\""));
    assert_ne!(a, fp("SELECT * FROM u WHERE a = 1 AND b = 'x'"));
    assert_ne!(a, fp("SELECT * FROM t WHERE c = 1 AND b = 'x'"));
    assert_ne!(a, fp("SELECT * FROM t WHERE a = 1 OR b = 'x'"));
    assert_ne!(a, fp("SELECT * FROM db.t WHERE a = 1 AND b = 'x'"));
    assert_eq!(
        fp("INSERT INTO t VALUES (1, 'a')"),
        fp("INSERT INTO t VALUES (2, 'b')")
    );
    assert_ne!(
        fp("SELECT * FROM t INTO OUTFILE '/tmp/a'"),
        fp("SELECT * FROM t")
    );
    assert_eq!(
        fp("LOAD DATA INFILE 'a' INTO TABLE t IGNORE 1 LINES"),
        fp("LOAD DATA INFILE 'b' INTO TABLE t IGNORE 2 LINES")
    );
    assert_ne!(
        fp("LOAD DATA INFILE 'a' INTO TABLE t"),
        fp("LOAD DATA INFILE 'a' INTO TABLE u")
    );
}

#[test]
fn multi_statement_texts() {
    let sql = "  /* lead */ SELECT 1 ; UPDATE t SET a = ';' WHERE b = 2;\n-- note\n DELETE FROM `x;y` # end\n;;";
    let statements = parsed(sql);
    let texts: Vec<&str> = statements.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(
        texts,
        vec![
            "SELECT 1",
            "UPDATE t SET a = ';' WHERE b = 2",
            "DELETE FROM `x;y`"
        ]
    );
    let kinds: Vec<StatementKind> = statements.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        vec![
            StatementKind::Select,
            StatementKind::Update,
            StatementKind::Delete
        ]
    );
    assert_eq!(statements[2].tables_written, tables(&["x;y"]));
    assert!(parsed("").is_empty());
    assert!(parsed(" ; -- x\n ; /* y */").is_empty());
}

#[test]
fn garbage_is_unparsable() {
    for sql in [
        "SELEC 1",
        "SELECT * FROM",
        "DO",
        "DO SELECT 1",
        "SELECT 'unterminated",
        "SELECT 1 /* unterminated",
        "CREATE PROCEDURE p() BEGIN SELECT 1; SELECT * FROM secrets; END",
        "BEGIN NOT ATOMIC DELETE FROM secrets; END",
        "SELECT 1\0",
    ] {
        let error = refused(sql);
        assert!(!error.is_empty(), "{sql}");
    }
}

#[test]
fn do_is_read_as_the_select_of_its_expressions() {
    let s = one("DO SLEEP(1), (SELECT COUNT(*) FROM shop.secrets)");
    assert_eq!((s.kind, &*s.command), (StatementKind::Do, "DO"));
    assert_eq!(s.tables_read, tables(&["shop.secrets"]));
    assert_eq!(s.functions, ["count", "sleep"]);
    assert!(s.tables_written.is_empty());
    let var = one("do @v := (select s from secrets)");
    assert!(var.flags.sets_user_variable);
    assert_eq!(var.tables_read, tables(&["secrets"]));
    assert!(one("DO load_file('/etc/passwd')").flags.server_file_access);
    // Not the select of the same expressions, and literals do not count.
    assert_ne!(one("DO 1").fingerprint, one("SELECT 1").fingerprint);
    assert_eq!(
        one("DO SLEEP(1)").fingerprint,
        one("DO SLEEP(2)").fingerprint
    );
}

#[test]
fn handler_commands_read_the_name_they_use() {
    use StatementKind as K;
    for (sql, command, read) in [
        ("HANDLER secrets OPEN", "HANDLER OPEN", "secrets"),
        (
            "handler shop.Secrets open as s",
            "HANDLER OPEN",
            "shop.secrets",
        ),
        ("HANDLER `secrets` OPEN s", "HANDLER OPEN", "secrets"),
        ("HANDLER s READ FIRST", "HANDLER READ", "s"),
        ("HANDLER s READ NEXT LIMIT 5", "HANDLER READ", "s"),
        ("HANDLER s READ `PRIMARY` LAST", "HANDLER READ", "s"),
        (
            "HANDLER s READ idx >= (1, 'a') WHERE b > 2 LIMIT 3",
            "HANDLER READ",
            "s",
        ),
        ("HANDLER s CLOSE", "HANDLER CLOSE", "s"),
    ] {
        let s = one(sql);
        assert_eq!((s.kind, &*s.command), (K::Other, command), "{sql}");
        assert_eq!(s.tables_read, tables(&[read]), "{sql}");
        assert!(s.tables_written.is_empty(), "{sql}");
    }
    // What a READ's values and condition evaluate counts.
    let s = one("HANDLER s READ idx = ((SELECT id FROM secrets LIMIT 1)) WHERE SLEEP(1) = 0");
    assert_eq!(s.tables_read, tables(&["s", "secrets"]));
    assert_eq!(s.functions, ["sleep"]);
    assert_eq!(
        one("HANDLER s READ idx = (1)").fingerprint,
        one("HANDLER s READ idx = (2)").fingerprint
    );
    for sql in [
        "HANDLER",
        "HANDLER s",
        "HANDLER s DROP",
        "HANDLER s OPEN AS",
        "HANDLER s OPEN x y",
        "HANDLER s CLOSE now",
        "HANDLER s READ",
        "HANDLER s READ idx = 1",
        "HANDLER s READ idx SIDEWAYS",
        "HANDLER s READ FIRST WHERE",
        "HANDLER (SELECT 1) OPEN",
    ] {
        refused(sql);
    }
}

// --- Hostile text -----------------------------------------------------------

#[test]
fn executable_comments_are_refused() {
    for sql in [
        "SELECT 1 /*!, (SELECT s FROM secrets) */",
        "SELECT 1 /*!50000 , (SELECT s FROM secrets) */",
        "SELECT 1 /*M!, (SELECT s FROM secrets) */",
        "SELECT 1 /*M!100100 , (SELECT s FROM secrets) */",
        "/*!40101 SET NAMES utf8 */",
    ] {
        assert!(refused(sql).contains("executable comment"), "{sql}");
    }
    // Ordinary comments, and executable markers inside strings, are fine.
    let s = one("SELECT 1 /* , (SELECT s FROM secrets) */");
    assert!(s.tables_read.is_empty());
    let s = one("SELECT '/*!, (SELECT s FROM secrets) */' FROM t");
    assert_eq!(s.tables_read, tables(&["t"]));
}

#[test]
fn line_comments_read_as_the_server_reads_them() {
    // `--` without whitespace after it is two minus signs.
    let s = one("SELECT 1 --x\nFROM t");
    assert_eq!(s.tables_read, tables(&["t"]));
    assert_eq!(s.text, "SELECT 1 --x\nFROM t");
    // `-- ` and `#` run to the end of the line.
    let s = one("SELECT 1 -- x\n FROM t");
    assert_eq!(s.tables_read, tables(&["t"]));
    let s = one("SELECT 1 #x ; DROP TABLE t\n FROM u");
    assert_eq!(s.tables_read, tables(&["u"]));
    assert_eq!(one("SELECT 1 #x").text, "SELECT 1");
    assert_eq!(one("SELECT 1 --\tx").text, "SELECT 1");
    // A comment-looking `;` hides nothing: one statement, no DROP.
    let statements = parsed("SELECT 1 -- ; DROP TABLE t");
    assert_eq!(statements.len(), 1);
}

#[test]
fn double_quoted_table_names_are_tables() {
    assert_eq!(reads("SELECT * FROM \"secrets\""), tables(&["secrets"]));
    assert_eq!(
        reads("SELECT * FROM t WHERE a IN (SELECT a FROM \"Db\".\"Secrets\")"),
        tables(&["db.secrets", "t"])
    );
    let s = one("DELETE FROM \"secrets\"");
    assert_eq!(s.tables_written, tables(&["secrets"]));
    // A double-quoted function name is refused rather than missed.
    refused("SELECT \"load_file\"('/etc/passwd')");
}

#[test]
fn backslash_escapes_do_not_shift_statements() {
    // One string under either reading of backslashes: one statement.
    for sql in [
        "SELECT 'a''; DROP TABLE t; --'",
        "SELECT \"a\"\"; DROP TABLE t; -- \"",
        "SELECT `a'; DROP TABLE t; --` FROM u",
        "SELECT '\\\\'",
    ] {
        let statements = parsed(sql);
        assert_eq!(statements.len(), 1, "{sql}");
        assert!(
            statements.iter().all(|s| s.kind == StatementKind::Select),
            "{sql}"
        );
        assert!(statements[0].tables_written.is_empty(), "{sql}");
    }
    // A string that ends or not depending on NO_BACKSLASH_ESCAPES: refused.
    for sql in [
        "SELECT '\\'; DROP TABLE t; -- '",
        "SELECT \"\\\"; DROP TABLE t; -- \"",
        "SELECT N'\\'; DROP TABLE t; -- '",
        "SELECT _utf8mb4'\\'; DROP TABLE t; -- '",
        "SELECT 'it\\'s'; DROP TABLE t; -- '",
    ] {
        assert!(refused(sql).contains("backslash"), "{sql}");
    }
    // A backslash-escaped quote, as drivers write it, reads one way only
    // when the session's reading is known.
    let sql = "SELECT 'it\\'s'; DROP TABLE t; -- '";
    match analyze_read(sql, Escapes::Backslash) {
        Analysis::Parsed { statements } => {
            let kinds: Vec<StatementKind> = statements.iter().map(|s| s.kind).collect();
            assert_eq!(kinds, vec![StatementKind::Select, StatementKind::Drop]);
            assert_eq!(statements[1].tables_written, tables(&["t"]));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        analyze_read("SELECT 'it\\'s'", Escapes::Backslash),
        Analysis::Parsed { statements } if statements.len() == 1
    ));
    // Under NO_BACKSLASH_ESCAPES the parser's reading would be wrong.
    assert!(matches!(
        analyze_read("SELECT 'a\\'; DROP TABLE t; -- '", Escapes::NoBackslash),
        Analysis::Unparsable { .. }
    ));
    // Hex literals take no escapes, as on the server.
    let statements = parsed("SELECT X'0a'; SELECT 2");
    assert_eq!(statements.len(), 2);
}

#[test]
fn every_statement_of_a_multi_statement_text_is_summarised() {
    let statements = parsed("SELECT * FROM a; DROP TABLE secrets; INSERT INTO b SELECT * FROM c");
    let kinds: Vec<StatementKind> = statements.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        vec![
            StatementKind::Select,
            StatementKind::Drop,
            StatementKind::Insert
        ]
    );
    assert_eq!(statements[1].tables_written, tables(&["secrets"]));
    assert_eq!(statements[2].tables_read, tables(&["c"]));
    // One bad statement refuses the whole text.
    refused("SELECT 1; SELEC 2");
}

#[test]
fn malformed_prefixes_do_not_panic() {
    let sql = "SELECT a, 'x\\'y', `q` FROM t /* c */ WHERE b = \"z\" -- e\n; LOAD DATA INFILE 'f' INTO TABLE t SET c = 1; PREPARE s FROM 'SELECT 1'";
    for end in 0..=sql.len() {
        if let Some(prefix) = sql.get(..end) {
            let _ = analyze(prefix);
        }
    }
}

#[test]
fn block_comments_do_not_nest() {
    // The server's comment ends at the first `*/`: the subquery runs. Read
    // it or refuse the text, never hide it.
    let sql = "SELECT 1 /* /* */ , (SELECT s FROM secrets) /* */";
    match analyze(sql) {
        Analysis::Parsed { statements } => {
            assert_eq!(statements.len(), 1);
            assert_eq!(statements[0].tables_read, tables(&["secrets"]));
        }
        Analysis::Unparsable { error } => assert!(!error.is_empty()),
    }
}

#[test]
fn values_kept_in_user_variables_are_flagged() {
    for sql in [
        "SELECT email INTO @x FROM customers LIMIT 1",
        "SELECT id FROM t UNION SELECT email INTO @x FROM customers",
        "SELECT @x := email FROM customers",
        "SELECT id FROM customers WHERE (@x := email) IS NOT NULL",
        "SELECT (SELECT @y := email FROM customers LIMIT 1)",
    ] {
        assert!(one(sql).flags.sets_user_variable, "{sql}");
    }
    for sql in [
        "SELECT @x, email FROM customers",
        "SELECT id FROM t WHERE a = @x",
    ] {
        assert!(!one(sql).flags.sets_user_variable, "{sql}");
    }
}

#[test]
fn derived_tables_and_with_queries_are_flagged() {
    for sql in [
        "SELECT customers.id FROM (SELECT email AS id FROM customers) customers",
        "WITH c AS (SELECT email AS id FROM customers) SELECT id FROM c",
        "SELECT a.id FROM t a JOIN (SELECT 1 AS id) b ON a.id = b.id",
        "SELECT (SELECT x FROM (SELECT email AS x FROM customers) d LIMIT 1)",
    ] {
        assert!(one(sql).flags.derived_tables, "{sql}");
    }
    for sql in [
        "SELECT id FROM customers WHERE id IN (SELECT id FROM t)",
        "SELECT c.id FROM customers c JOIN t ON t.id = c.id",
    ] {
        assert!(!one(sql).flags.derived_tables, "{sql}");
    }
}

#[test]
fn expressions_that_may_read_a_column_are_found() {
    let email = &["email"];
    for sql in [
        "SELECT concat(email) FROM customers",
        "SELECT upper(c.`Email`) FROM customers c",
        "SELECT length(\"email\") FROM customers",
        "SELECT (SELECT * FROM only_emails LIMIT 1)",
        "SELECT id * 2 FROM customers",
        "SELECT count(*), (SELECT * FROM t LIMIT 1) FROM customers",
    ] {
        assert!(may_read_columns(sql, email), "{sql}");
    }
    for sql in [
        "SELECT count(*) FROM customers",
        "SELECT COUNT( * ), max(id) FROM customers",
        "SELECT id + 1, 'email' FROM customers",
    ] {
        assert!(!may_read_columns(sql, email), "{sql}");
    }
}

#[test]
fn server_versions_are_read_from_greetings() {
    let v = |s: &str| ServerVersion::parse(s);
    assert_eq!(
        v("5.5.5-10.11.19-MariaDB-0+deb12u1"),
        Some(ServerVersion {
            id: 101119,
            mariadb: true
        })
    );
    assert_eq!(
        v("11.4.2-MariaDB"),
        Some(ServerVersion {
            id: 110402,
            mariadb: true
        })
    );
    assert_eq!(
        v("8.0.36"),
        Some(ServerVersion {
            id: 80036,
            mariadb: false
        })
    );
    assert_eq!(
        v("5.5.5-log"),
        Some(ServerVersion {
            id: 50505,
            mariadb: false
        })
    );
    assert_eq!(v("8.0"), None);
    assert_eq!(v("garbage"), None);
}

#[test]
fn executable_comments_are_resolved_for_the_server() {
    let mariadb = ServerVersion {
        id: 101119,
        mariadb: true,
    };
    let mysql = ServerVersion {
        id: 80036,
        mariadb: false,
    };
    let resolve = |text: &str, server| {
        resolve_executable_comments(text, Escapes::Unknown, server).map(|t| t.into_owned())
    };
    assert_eq!(
        resolve("SELECT /*!40001 SQL_NO_CACHE */ * FROM t", mariadb).unwrap(),
        "SELECT   SQL_NO_CACHE   * FROM t"
    );
    // Newer than the server: dropped.
    assert_eq!(
        resolve("SELECT 1 /*!110000 , (SELECT s FROM secrets) */", mariadb).unwrap(),
        "SELECT 1  "
    );
    // MariaDB's own: run by MariaDB only.
    let text = "SELECT 1 /*M!100100 , (SELECT s FROM secrets) */";
    assert_eq!(
        resolve(text, mariadb).unwrap(),
        "SELECT 1   , (SELECT s FROM secrets)  "
    );
    assert_eq!(resolve(text, mysql).unwrap(), "SELECT 1  ");
    // Without a version: always.
    assert_eq!(
        resolve("SELECT 1 /*!, (SELECT s FROM secrets) */", mysql).unwrap(),
        "SELECT 1  , (SELECT s FROM secrets)  "
    );
    // Inside strings and ordinary comments nothing is resolved.
    assert_eq!(
        resolve("SELECT '/*!1*/' /* /*! */", mariadb).unwrap(),
        "SELECT '/*!1*/' /* /*! */"
    );
    // Markers never join tokens: `-/*!*/-` is not a comment `--`.
    assert_eq!(resolve("SELECT 1-/*!*/-1", mysql).unwrap(), "SELECT 1-  -1");
    // What the reading cannot settle is refused.
    assert!(resolve("SELECT 1 /*!5000 x */", mysql).is_err());
    assert!(resolve("SELECT 1 /*! /* x */", mysql).is_err());
    assert!(resolve("SELECT 1 /*! x", mysql).is_err());
    assert!(resolve("SELECT '\\' /*!, (SELECT s FROM secrets) */ '", mysql).is_err());
    // Content that opens a quote would change the reading of what follows
    // it: here the second comment is inside a name unless the first one
    // is resolved.
    let text = "SELECT /*!40001 `a */ x` /*! , (SELECT s FROM secrets) */ `";
    assert!(resolve(text, mariadb)
        .unwrap_err()
        .contains("leaves a quote open"));
    assert!(resolve("SELECT 1 /*! # x */", mysql).is_err());
    assert!(resolve("SELECT 1 /*! 'a' */", mysql).is_ok());
    // The resolved text is what is analysed.
    let resolved = resolve("SELECT 1 /*M!100100 , (SELECT s FROM secrets) */", mariadb).unwrap();
    assert_eq!(one(&resolved).tables_read, tables(&["secrets"]));
}

#[test]
fn mysqldump_keys_switches_are_changes_to_their_table() {
    for (sql, table) in [
        ("ALTER TABLE `customers` DISABLE KEYS", "customers"),
        ("alter table shop.Customers enable keys", "shop.customers"),
    ] {
        let s = one(sql);
        assert_eq!(s.kind, StatementKind::Alter, "{sql}");
        assert_eq!(s.tables_written, tables(&[table]), "{sql}");
        assert!(s.command.ends_with("KEYS"), "{sql}");
    }
    // Anything more is the parser's to read (and refuse).
    refused("ALTER TABLE t DISABLE KEYS, DROP COLUMN x");
    refused("ALTER TABLE t DISABLE KEYS KEYS");
}

#[test]
fn table_statements_read_their_table() {
    for (sql, read) in [
        (
            "SELECT * FROM t WHERE x IN (TABLE secrets)",
            vec!["t", "secrets"],
        ),
        ("SELECT 1 UNION TABLE shop.secrets", vec!["shop.secrets"]),
        (
            "WITH secrets AS (SELECT 1) SELECT * FROM t WHERE x IN (TABLE secrets)",
            vec!["t"],
        ),
    ] {
        assert_eq!(one(sql).tables_read, tables(&read), "{sql}");
    }
}

#[test]
fn kill_statements_name_their_connection() {
    assert_eq!(kill_target("KILL 42"), Some(42));
    assert_eq!(kill_target("kill query 42"), Some(42));
    assert_eq!(kill_target("KILL CONNECTION 7"), Some(7));
    assert_eq!(kill_target("SELECT 42"), None);
    assert_eq!(kill_target("KILL 1; KILL 2"), None);
    let s = one("KILL QUERY 42");
    assert_eq!(&*s.command, "KILL");
}

#[test]
fn changes_of_the_client_character_set_are_read_plainly_or_not_at_all() {
    let unsafe_names = ["big5", "cp932", "gbk", "gb18030", "sjis"];
    let change = |sql: &str| client_charset_change(sql, &unsafe_names);
    for sql in [
        "SET NAMES utf8mb4",
        "set names 'utf8mb4' collate utf8mb4_unicode_ci",
        "SET CHARACTER SET latin1",
        "SET character_set_client = utf8mb4",
        "SET SESSION character_set_client = 'utf8'",
    ] {
        assert_eq!(change(sql), Some(CharsetChange::Safe), "{sql}");
    }
    for sql in [
        "SET NAMES gbk",
        "SET NAMES 'sjis'",
        "SET @@session.character_set_client = 'GBK'",
        "SET NAMES utf8mb4, character_set_client = big5",
        "SET CHARACTER SET cp932",
    ] {
        assert!(
            matches!(change(sql), Some(CharsetChange::Unsafe(_))),
            "{sql}"
        );
    }
    for sql in [
        "SET character_set_client = @x",
        "SET NAMES DEFAULT",
        "SET NAMES utf8mb4, character_set_client = 'g' 'bk'",
        "SET @@character_set_client = @@character_set_results",
        "SET character_set_client = CONCAT('g', 'bk')",
    ] {
        assert_eq!(change(sql), Some(CharsetChange::Unknown), "{sql}");
    }
    for sql in ["SET @x = 1", "SELECT 'names'", "SET sql_mode = ''"] {
        assert_eq!(change(sql), None, "{sql}");
    }
}

#[test]
fn a_local_load_names_the_clients_file() {
    assert_eq!(
        local_infile("LOAD DATA LOCAL INFILE '/tmp/rows.csv' INTO TABLE t"),
        Some("/tmp/rows.csv".to_owned())
    );
    assert_eq!(
        local_infile("load data low_priority local infile \"x\" into table t"),
        Some("x".to_owned())
    );
    assert_eq!(
        local_infile("LOAD DATA INFILE '/tmp/rows.csv' INTO TABLE t"),
        None
    );
    assert_eq!(local_infile("SELECT 'LOAD DATA LOCAL INFILE'"), None);
}

#[test]
fn reviewers_see_literals_hidden_where_a_masked_column_may_take_them() {
    use crate::sql::Shown;
    let sensitive: HashSet<String> = ["email".to_owned()].into();
    let show = |sql: &str| shown_to_reviewer(sql, Escapes::NoBackslash, &sensitive);
    // Nothing masked, or no masked column within reach: as sent.
    assert_eq!(
        shown_to_reviewer(
            "DELETE FROM t WHERE a = 'x'",
            Escapes::Unknown,
            &HashSet::new()
        ),
        Shown::AsSent
    );
    assert_eq!(show("DELETE FROM orders WHERE id = 7"), Shown::AsSent);
    // Named, by position, or through `*`: every literal hidden, values
    // given for cleaning the command line.
    for (sql, shown, values) in [
        (
            "DELETE FROM customers WHERE `EMAIL` = 'ada@example.com' AND id > 3",
            "DELETE FROM customers WHERE `EMAIL` = '***' AND id > '***'",
            vec!["ada@example.com", "3"],
        ),
        (
            "INSERT INTO customers VALUES (5, N'it''s@x.org')",
            "INSERT INTO customers VALUES ('***', '***')",
            vec!["5", "it's@x.org"],
        ),
        (
            "DELETE FROM customers WHERE id IN (SELECT * FROM c2 WHERE x = \"a@b\")",
            "DELETE FROM customers WHERE id IN (SELECT * FROM c2 WHERE x = '***')",
            vec!["a@b"],
        ),
    ] {
        assert_eq!(
            show(sql),
            Shown::Hidden {
                text: shown.to_owned(),
                literals: values.len(),
                values: values.into_iter().map(str::to_owned).collect(),
            },
            "{sql}"
        );
    }
    // Backslashes the server may read as escapes: the ends of strings are
    // not certain, nothing is shown.
    let sql = "UPDATE customers SET email = 'a\\'b'";
    assert_eq!(
        shown_to_reviewer(sql, Escapes::Backslash, &sensitive),
        Shown::Withheld
    );
}

#[test]
fn tables_named_without_a_database_are_in_the_current_one() {
    let read = |analysis: &Analysis| -> Vec<Vec<TableRef>> {
        match analysis {
            Analysis::Parsed { statements } => {
                statements.iter().map(|s| s.tables_read.clone()).collect()
            }
            Analysis::Unparsable { error } => panic!("{error}"),
        }
    };
    let a = analyze("SELECT * FROM secrets JOIN other.t ON 1");
    assert_eq!(
        read(&in_database(&a, Some("shop"), false).unwrap()),
        vec![tables(&["other.t", "shop.secrets"])]
    );
    // Kept unqualified too, for a later database (a prepared statement).
    assert_eq!(
        read(&in_database(&a, Some("shop"), true).unwrap()),
        vec![tables(&["other.t", "secrets", "shop.secrets"])]
    );
    // After a USE in the same text, its database.
    let a = analyze("SELECT * FROM t; USE Shop; SELECT * FROM secrets");
    assert_eq!(
        read(&in_database(&a, None, false).unwrap()),
        vec![tables(&["t"]), vec![], tables(&["shop.secrets"])]
    );
    assert_eq!(
        read(&in_database(&a, Some("x"), false).unwrap()),
        vec![tables(&["x.t"]), vec![], tables(&["shop.secrets"])]
    );
    // Nothing to do.
    assert!(in_database(&analyze("SELECT * FROM shop.secrets"), Some("x"), false).is_none());
    assert!(in_database(&analyze("SELECT * FROM secrets"), None, false).is_none());
    assert_eq!(used_database("USE `Shop`").as_deref(), Some("shop"));
    assert_eq!(used_database("SELECT 1"), None);
}
