//! MySQL targets: the real `mariadb` client through the agent's listener to
//! a real MariaDB server, with the same policy files as PostgreSQL. Each
//! refusal is checked on the server too: what was refused did not happen.

use std::process::{Command, Output, Stdio};

use tollgate_tests::mariadb::{
    mariadb, mariadb_command, python_driver, DriverResult, Mariadb, PASSWORD, USER,
};
use tollgate_tests::*;

const POLICY: &str = concat!(
    include_str!("../data/policy/allow-by-default.toml"),
    include_str!("../data/policy/no-drop.toml"),
    include_str!("../data/policy/mask-contact.toml"),
    include_str!("../data/policy/protect-secrets.toml"),
);

const SCHEMA: &str = "CREATE TABLE customers (id INT PRIMARY KEY, name TEXT, email TEXT);
INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com'), (2, 'Alan', 'alan@example.com');
CREATE TABLE secrets (s TEXT); INSERT INTO secrets VALUES ('the-key');
CREATE TABLE t (x INT);";

/// A MariaDB server with [`SCHEMA`] and an agent with [`POLICY`] in front
/// of it, through a listener (target `shop`, protocol mysql).
struct Shop {
    db: Mariadb,
    agent: Agent,
    port: u16,
    policy: PolicyFile,
}

impl Shop {
    fn start() -> Shop {
        let db = Mariadb::start(SCHEMA);
        let policy = policy_file(POLICY);
        let port = free_port();
        let agent = Agent::start(&mysql_config(port, db.port, &policy.line));
        Shop {
            db,
            agent,
            port,
            policy,
        }
    }
}

fn mysql_config(listen_port: u16, upstream_port: u16, agent_extra: &str) -> String {
    format!(
        "[agent]\n{agent_extra}\n\n[[target]]\nname = \"shop\"\naddress = \"127.0.0.1\"\nports = [{upstream_port}]\nprotocol = \"mysql\"\n\n\
         [[listener]]\nlisten = \"127.0.0.1:{listen_port}\"\ntarget = \"shop\"\n"
    )
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts `sql` is refused with an ERR naming `rule`, and leaks nothing
/// of the secret.
fn refused(shop: &Shop, sql: &str, expected: &str) {
    let out = mariadb(shop.port, sql);
    let all = text(&out);
    assert!(
        !out.status.success(),
        "{sql}\nran through the agent:\n{all}"
    );
    assert!(all.contains(expected), "{sql}: {all}");
    assert!(!all.contains("the-key"), "{sql} leaked: {all}");
}

#[test]
fn the_mariadb_client_runs_allowed_statements_and_gets_refusals_as_errors_naming_the_rule() {
    let shop = Shop::start();

    let out = mariadb(shop.port, "SELECT CONCAT('a', 'b'), 1 + 1");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ab\t2\n");

    refused(
        &shop,
        "SELECT * FROM secrets",
        "ERROR 1142 (42000) at line 1: tollgate: SELECT denied by rule \"protect-secrets\": the secrets table is off limits",
    );
    refused(
        &shop,
        "DROP TABLE t",
        "tollgate: DROP TABLE denied by rule \"no-drop\": schema changes go through the migration pipeline",
    );
    assert_eq!(shop.db.as_root("SHOW TABLES FROM shop LIKE 't'"), "t\n");

    // A write that is allowed reaches the server.
    let out = mariadb(shop.port, "INSERT INTO t VALUES (7)");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(shop.db.as_root("SELECT x FROM shop.t"), "7\n");
    let out = mariadb(shop.port, "SELECT x FROM t");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "7\n");

    // A large result streams through (written out as it comes, not held
    // whole): 200,000 rows from MariaDB's sequence engine.
    let out = mariadb(
        shop.port,
        "SELECT seq, repeat('x', 100) FROM seq_1_to_200000",
    );
    assert!(out.status.success(), "{}", text(&out));
    let rows = String::from_utf8_lossy(&out.stdout);
    assert_eq!(rows.lines().count(), 200_000);
    assert!(rows.ends_with(&format!("200000\t{}\n", "x".repeat(100))));

    // The session goes on after a refusal, in the same connection.
    let out = mariadb_command(shop.port, "SELECT 1; SELECT * FROM secrets; SELECT 2")
        .arg("--force")
        .output()
        .unwrap();
    let all = text(&out);
    assert!(all.contains("1\n") && all.contains("2\n"), "{all}");
    assert!(all.contains("denied by rule \"protect-secrets\""), "{all}");

    // Each statement is logged and recorded with its verdict.
    let denied = shop
        .agent
        .wait_for_statement("deny", "rule", "protect-secrets");
    assert_eq!(denied["text"], "SELECT * FROM secrets", "{denied}");
    let session = denied["session"].as_str().unwrap();
    // The recording is complete once the session has closed.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = shop.agent.cli(&["recordings", "show", session]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("SELECT * FROM secrets"), "{shown}");
    assert!(shown.contains("protect-secrets"), "{shown}");
    assert!(shown.contains("user app"), "{shown}");
}

#[test]
fn tables_hidden_from_the_analysis_are_still_refused() {
    let shop = Shop::start();
    for sql in [
        // A CTE name hides a table only at its own level.
        "SELECT * FROM customers WHERE EXISTS (WITH secrets AS (SELECT 1) SELECT 1) AND (SELECT s FROM secrets) IS NOT NULL",
        // Executable comments run on the server.
        "SELECT 1 /*!, (SELECT s FROM secrets) */",
        "SELECT 1 /*M!100000 , (SELECT s FROM secrets) */",
        // Backquoted and qualified names.
        "SELECT * FROM `secrets`",
        "SELECT * FROM shop.secrets",
        "SELECT (SELECT s FROM secrets LIMIT 1)",
        "SELECT * FROM customers UNION SELECT 1, s, s FROM secrets",
        "INSERT INTO t SELECT LENGTH(s) FROM secrets",
        // A statement text kept in a user variable cannot be read.
        "SET @q = 'SELECT s FROM secrets'; PREPARE st FROM @q; EXECUTE st",
    ] {
        let out = mariadb(shop.port, sql);
        let all = text(&out);
        assert!(!out.status.success(), "{sql}\nran through the agent:\n{all}");
        assert!(all.contains("tollgate:"), "{sql}: {all}");
        assert!(!all.contains("the-key"), "{sql} leaked: {all}");
    }
    assert_eq!(shop.db.as_root("SELECT COUNT(*) FROM shop.t"), "0\n");
}

#[test]
fn handler_and_do_are_decided_by_what_they_read() {
    let shop = Shop::start();
    shop.db.as_root("INSERT INTO shop.t VALUES (5), (6)");
    // An allowed table is read row by row through a handler.
    let out = mariadb(
        shop.port,
        "HANDLER t OPEN AS h; HANDLER h READ FIRST; HANDLER h READ NEXT; HANDLER h CLOSE",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "5\n6\n");
    // A denied table cannot be opened, however it is spelled or renamed.
    for sql in [
        "HANDLER secrets OPEN",
        "HANDLER shop.`SECRETS` OPEN AS s",
        "HANDLER secrets OPEN AS t; HANDLER t READ FIRST",
    ] {
        refused(
            &shop,
            sql,
            "tollgate: HANDLER OPEN denied by rule \"protect-secrets\"",
        );
    }
    // A handler's rows are not masked: a masked table cannot be opened.
    let out = mariadb(
        shop.port,
        "HANDLER customers OPEN; HANDLER customers READ FIRST",
    );
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("HANDLER OPEN requires masking by rule \"mask-contact\""),
        "{all}"
    );
    assert!(!all.contains("@example.com"), "leaked: {all}");
    // DO evaluates what the select of its expressions would.
    let out = mariadb(shop.port, "DO 1 + 1, SLEEP(0)");
    assert!(out.status.success(), "{}", text(&out));
    refused(
        &shop,
        "DO (SELECT COUNT(*) FROM secrets WHERE s LIKE 'the-%')",
        "tollgate: DO denied by rule \"protect-secrets\"",
    );
    refused(
        &shop,
        "DO @v := (SELECT email FROM customers LIMIT 1)",
        "DO requires masking by rule \"mask-contact\"",
    );
    // Each was decided and logged under its own label and kind.
    let opened = shop
        .agent
        .wait_for_statement("deny", "command", "HANDLER OPEN");
    assert_eq!(opened["kind"], "other", "{opened}");
    let done = shop.agent.wait_for_statement("deny", "command", "DO");
    assert_eq!(done["kind"], "do", "{done}");
}

#[test]
fn handler_and_prepared_names_are_decided_as_what_they_stand_for_under_the_policy_in_force() {
    let shop = Shop::start();
    shop.db.as_root(
        "INSERT INTO shop.t VALUES (5), (6); CREATE TABLE shop.u (y INT); \
         INSERT INTO shop.u VALUES (7); CREATE DATABASE other",
    );
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let wait = format!("-- wait-for {}", go.display());
    // One PyMySQL session opens a handler and prepares a statement on t
    // while t is allowed, and goes on using both after a reload denies t.
    let statements = [
        "HANDLER t OPEN AS h",
        "HANDLER h READ FIRST",
        "PREPARE s FROM 'SELECT x FROM t ORDER BY x'",
        "EXECUTE S",
        &wait,
        "HANDLER h READ NEXT",
        "EXECUTE s",
        // The server refuses an alias already open: h still reads t.
        "HANDLER u OPEN AS h",
        "HANDLER H READ FIRST",
        // In another database the name still stands for shop.t.
        "USE other",
        "HANDLER h READ FIRST",
        // Closed and opened anew, the name stands for the new table only.
        "HANDLER h CLOSE",
        "HANDLER shop.u OPEN AS h",
        "HANDLER h READ FIRST",
        // A text of several statements: the name given in it counts for
        // the statements after it.
        "HANDLER shop.u OPEN AS h2; HANDLER h2 READ FIRST",
        "HANDLER shop.t OPEN AS h3; HANDLER h3 READ FIRST",
        "PREPARE s2 FROM 'SELECT y FROM shop.u'; EXECUTE s2",
        // Inside a prepared statement, a READ would name the handler only.
        "EXECUTE IMMEDIATE 'HANDLER h READ NEXT'",
        "PREPARE s3 FROM 'HANDLER h READ NEXT'",
    ];
    let port = shop.port;
    let owned: Vec<String> = statements.iter().map(|s| s.to_string()).collect();
    let session = std::thread::spawn(move || {
        let borrowed: Vec<&str> = owned.iter().map(String::as_str).collect();
        python_driver("pymysql", port, &borrowed)
    });
    shop.agent
        .wait_for_log(
            |l| l["statement_action"] == "allow" && l["command"] == "EXECUTE",
            std::time::Duration::from_secs(30),
        )
        .unwrap();
    std::fs::write(
        shop.policy.path(),
        format!(
            "{POLICY}\n[[rule]]\nname = \"no-t\"\naction = \"deny\"\n[rule.match]\ntables = [\"shop.t\"]\n"
        ),
    )
    .unwrap();
    shop.agent
        .wait_for_log(
            |l| l["message"] == "policy reloaded",
            std::time::Duration::from_secs(10),
        )
        .unwrap();
    std::fs::write(&go, "").unwrap();
    let results = session.join().unwrap();
    let rows = |i: usize| match &results[i] {
        DriverResult::Rows(rows) => rows.clone(),
        DriverResult::Error(e) => panic!("{}: {e}", statements[i]),
    };
    let error = |i: usize| match &results[i] {
        DriverResult::Error(e) => e.clone(),
        DriverResult::Rows(rows) => panic!("{} ran: {rows:?}", statements[i]),
    };
    let one = |v: &str| vec![vec![vec![Some(v.to_owned())]]];
    assert_eq!(rows(1), one("5"));
    assert_eq!(
        rows(3),
        vec![vec![vec![Some("5".to_owned())], vec![Some("6".to_owned())]]]
    );
    for i in [5, 6, 8, 10] {
        let e = error(i);
        assert!(
            e.contains("denied by rule \"no-t\""),
            "{}: {e}",
            statements[i]
        );
    }
    assert!(error(7).contains("Not unique table/alias"), "{}", error(7));
    assert_eq!(rows(13), one("7"));
    assert_eq!(rows(14), vec![vec![], vec![vec![Some("7".to_owned())]]]);
    // Refused whole: the OPEN of t did not happen either.
    assert!(
        error(15).contains("denied by rule \"no-t\""),
        "{}",
        error(15)
    );
    assert_eq!(rows(16), vec![vec![], vec![vec![Some("7".to_owned())]]]);
    for i in [17, 18] {
        let e = error(i);
        assert!(
            e.contains("HANDLER READ cannot be prepared through the agent"),
            "{}: {e}",
            statements[i]
        );
    }

    // Names this session never gave, and statements from text the agent
    // cannot read, are refused.
    for (sql, expected) in [
        (
            "EXECUTE nothing",
            "EXECUTE nothing refused: no statement of that name was prepared through the agent",
        ),
        (
            "HANDLER nothing READ FIRST",
            "HANDLER nothing READ refused: no handler of that name was opened through the agent",
        ),
        (
            "EXECUTE IMMEDIATE 'SELECT s FROM secrets'",
            "EXECUTE IMMEDIATE denied by rule \"protect-secrets\"",
        ),
        (
            "EXECUTE IMMEDIATE CONCAT('SELECT s FROM sec', 'rets')",
            "EXECUTE IMMEDIATE: the statement must be a string literal",
        ),
        (
            "EXECUTE IMMEDIATE 'SELECT email FROM customers'",
            "EXECUTE IMMEDIATE requires masking by rule \"mask-contact\"",
        ),
        (
            "PREPARE st FROM 'SELECT x FROM t'; EXECUTE st",
            "denied by rule \"no-t\"",
        ),
        // Dropped under MySQL's other spelling, the name is gone.
        (
            "PREPARE s4 FROM 'SELECT 1'; DROP PREPARE S4; EXECUTE s4",
            "EXECUTE s4 refused: no statement of that name was prepared",
        ),
    ] {
        refused(&shop, sql, expected);
    }
    // A handler opened, read and closed by server-side prepared
    // statements (mysql-connector-python) is followed the same way.
    let results = python_driver(
        "connector",
        shop.port,
        &[
            "HANDLER u OPEN AS hp",
            "HANDLER hp READ FIRST",
            "HANDLER hp CLOSE",
            "HANDLER hp READ FIRST",
            "HANDLER t OPEN AS hq",
        ],
    );
    assert!(
        matches!(&results[1], DriverResult::Rows(rows) if rows[0] == vec![row(&[Some("7")])]),
        "{results:?}"
    );
    driver_error(
        &results[3],
        "HANDLER hp READ refused: no handler of that name",
    );
    driver_error(&results[4], "denied by rule \"no-t\"");
    let out = mariadb(
        shop.port,
        "EXECUTE IMMEDIATE 'SELECT y FROM u'; PREPARE St FROM 'SELECT y + 1 FROM u'; EXECUTE sT",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "7\n8\n");
}

/// One row of text values, `None` for NULL.
fn row(values: &[Option<&str>]) -> Vec<Option<String>> {
    values.iter().map(|v| v.map(str::to_owned)).collect()
}

#[test]
fn masked_columns_are_hidden_in_text_and_binary_rows_whatever_they_are_called() {
    let shop = Shop::start();

    // The mariadb client (text rows): by name, through an alias, in an
    // expression; columns the rule does not name are kept.
    let out = mariadb(
        shop.port,
        "SELECT id, name, email FROM customers ORDER BY id; \
         SELECT c.email AS id, c.id AS email FROM customers c ORDER BY c.id; \
         SELECT upper(email), length(email) > 0 FROM customers ORDER BY id; \
         SELECT count(*), max(id) FROM customers",
    );
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "1\tAda\t****\n2\tAlan\t****\n\
         ****\t1\n****\t2\n\
         ****\tNULL\n****\tNULL\n\
         2\t2\n"
    );
    assert!(!all.contains("@example.com"), "{all}");

    // mysql-connector-python's prepared statements (binary rows).
    let results = python_driver(
        "connector",
        shop.port,
        &[
            "SELECT id, email, name FROM customers WHERE id = 1",
            "SELECT email, id FROM customers ORDER BY id",
        ],
    );
    let DriverResult::Rows(first) = &results[0] else {
        panic!("{results:?}");
    };
    assert_eq!(first[0], vec![row(&[Some("1"), Some("****"), Some("Ada")])]);
    let DriverResult::Rows(second) = &results[1] else {
        panic!("{results:?}");
    };
    assert_eq!(
        second[0],
        vec![
            row(&[Some("****"), Some("1")]),
            row(&[Some("****"), Some("2")])
        ]
    );
    // One statement prepared once and executed three times: each
    // execution masked as the first.
    let script = r#"
import sys, mysql.connector
conn = mysql.connector.connect(host="127.0.0.1", port=int(sys.argv[1]), user="app",
                               password="secret", database="shop", ssl_disabled=True, use_pure=True)
cur = conn.cursor(prepared=True)
for _ in range(3):
    cur.execute("SELECT upper(email), id FROM customers WHERE id >= ? ORDER BY id", (2,))
    print(cur.fetchall())
"#;
    let before = shop
        .db
        .as_root("SHOW GLOBAL STATUS LIKE 'Com_stmt_prepare'");
    let out = Command::new("python3")
        .args(["-c", script, &shop.port.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "[('****', 2)]\n".repeat(3)
    );
    let prepares =
        |status: &str| -> u64 { status.split_whitespace().nth(1).unwrap().parse().unwrap() };
    let after = shop
        .db
        .as_root("SHOW GLOBAL STATUS LIKE 'Com_stmt_prepare'");
    assert_eq!(prepares(&after) - prepares(&before), 1, "{after}");

    // The server's data is untouched.
    assert_eq!(
        shop.db
            .as_root("SELECT email FROM shop.customers ORDER BY id"),
        "ada@example.com\nalan@example.com\n"
    );
}

#[test]
fn masking_cannot_be_slipped_past() {
    let shop = Shop::start();
    shop.db.as_root(
        "CREATE TABLE shop.leak (v TEXT);\nDELIMITER //\n\
         CREATE FUNCTION shop.keep(v TEXT) RETURNS INT MODIFIES SQL DATA \
         BEGIN INSERT INTO shop.leak VALUES (v); RETURN 1; END //\nDELIMITER ;",
    );
    for (sql, why) in [
        // A derived table or WITH query reports its own names as the origin.
        (
            "SELECT customers.id FROM (SELECT email AS id FROM customers) customers",
            "derived table",
        ),
        (
            "WITH customers AS (SELECT email AS id FROM shop.customers) SELECT id FROM customers",
            "derived table",
        ),
        // Values kept for later, written elsewhere, or sent out.
        (
            "SELECT email INTO @x FROM customers LIMIT 1",
            "user variable",
        ),
        ("SELECT @x := email FROM customers", "user variable"),
        ("SELECT keep(email) FROM customers", "keep()"),
        ("SELECT shop.keep(email) FROM customers", "shop.keep()"),
        ("SELECT sleep(ascii(email) / 100) FROM customers", "sleep()"),
        (
            "SELECT last_insert_id(ascii(email)) FROM customers",
            "last_insert_id()",
        ),
        ("SELECT get_lock(email, 0) FROM customers", "get_lock()"),
        (
            "SELECT email FROM customers INTO OUTFILE '/tmp/tollgate-leak'",
            "write nothing",
        ),
        (
            "INSERT INTO leak SELECT email FROM customers",
            "write nothing",
        ),
        (
            "CREATE TABLE leak2 AS SELECT email FROM customers",
            "write nothing",
        ),
    ] {
        let out = mariadb(shop.port, sql);
        let all = text(&out);
        assert!(
            !out.status.success(),
            "{sql}\nran through the agent:\n{all}"
        );
        assert!(
            all.contains("requires masking by rule \"mask-contact\"") && all.contains(why),
            "{sql}: {all}"
        );
        assert!(!all.contains("@example.com"), "{sql} leaked: {all}");
    }
    assert_eq!(shop.db.as_root("SELECT COUNT(*) FROM shop.leak"), "0\n");
    assert_eq!(
        shop.db
            .as_root("SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'leak2'"),
        "0\n"
    );
    assert!(!std::path::Path::new("/tmp/tollgate-leak").exists());

    // A user variable set by a masked statement: refused above, so a later
    // read finds nothing.
    let out = mariadb_command(shop.port, "SELECT @x := email FROM customers; SELECT @x")
        .arg("--force")
        .output()
        .unwrap();
    let all = text(&out);
    assert!(
        all.contains("user variable") && all.contains("NULL"),
        "{all}"
    );
    assert!(!all.contains("@example.com"), "{all}");

    // The server's warnings quote values (`Truncated incorrect DOUBLE
    // value: 'ada@example.com'`): withheld, and cleared on the server.
    let out = mariadb_command(
        shop.port,
        "SELECT email + 0 FROM customers; SHOW WARNINGS; SHOW ERRORS; SELECT @@warning_count",
    )
    .arg("--show-warnings")
    .output()
    .unwrap();
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(!all.contains("@example.com"), "warnings leaked: {all}");
    assert!(all.ends_with("0\n"), "{all}");
    // Directly, the same statement leaves them readable.
    let direct = shop
        .db
        .as_root("USE shop; SELECT email + 0 FROM customers; SHOW WARNINGS");
    assert!(direct.contains("ada@example.com"), "{direct}");

    // An error of a masked statement keeps its code, not its message.
    let out = mariadb(shop.port, "SELECT exp(id * 1000), email FROM customers");
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("ERROR 1690 (22003)") && all.contains("withheld"),
        "{all}"
    );

    // A masked statement sent with others in one text (PyMySQL with
    // CLIENT_MULTI_STATEMENTS) is refused whole.
    let results = python_driver(
        "pymysql",
        shop.port,
        &[
            "SELECT 1; SELECT email FROM customers",
            "SELECT email + 0 FROM customers; SHOW WARNINGS",
            "SELECT 1; SELECT 2",
        ],
    );
    for result in &results[..2] {
        let DriverResult::Error(e) = result else {
            panic!("ran: {results:?}");
        };
        assert!(e.contains("must be sent alone"), "{e}");
    }
    let DriverResult::Rows(both) = &results[2] else {
        panic!("{results:?}");
    };
    assert_eq!(both.len(), 2, "{both:?}");
}

fn mysqldump(port: u16, args: &[&str]) -> Output {
    Command::new("mysqldump")
        .arg("--no-defaults")
        .args(["-h", "127.0.0.1", "-P", &port.to_string(), "--protocol=TCP"])
        .args(["-u", USER, &format!("-p{PASSWORD}"), "--skip-ssl"])
        .args(args)
        .output()
        .expect("mysqldump (scripts/setup.sh installs mariadb-client)")
}

#[test]
fn mysqldump_and_a_restore_run_through_the_agent_masked_and_decided() {
    let shop = Shop::start();
    shop.db.as_root(&format!(
        "CREATE DATABASE copy; GRANT ALL ON copy.* TO '{USER}'@'%'"
    ));

    // mysqldump's executable comments (`/*!40001 SQL_NO_CACHE */`) are
    // resolved for the server, and what it reads is masked.
    let out = mysqldump(shop.port, &["--skip-add-drop-table", "shop", "customers"]);
    let dump = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        dump.contains("(1,'Ada','****'),\n(2,'Alan','****');"),
        "{dump}"
    );
    assert!(!dump.contains("@example.com"), "{dump}");

    // Dumping the whole database locks `secrets`, which the policy denies.
    let out = mysqldump(shop.port, &["shop"]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("LOCK TABLES denied by rule \"protect-secrets\""),
        "{all}"
    );
    assert!(!all.contains("the-key"), "{all}");

    // The restore: the dump's own statements (executable comments, ALTER
    // TABLE ... DISABLE KEYS, multi-row INSERT) through the agent.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dump.sql");
    std::fs::write(&file, &dump).unwrap();
    let out = mariadb(shop.port, &format!("USE copy;\nsource {}", file.display()));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        shop.db
            .as_root("SELECT id, name, email FROM copy.customers ORDER BY id"),
        "1\tAda\t****\n2\tAlan\t****\n"
    );

    // A script with a refused statement goes on as with any error of the
    // server's (`source` reports it and reads on): the refused statement
    // did not run, the others did.
    let script = dir.path().join("script.sql");
    std::fs::write(
        &script,
        "INSERT INTO t VALUES (1);\nDROP TABLE customers;\nINSERT INTO t VALUES (2);\n",
    )
    .unwrap();
    let out = mariadb(shop.port, &format!("source {}", script.display()));
    let all = text(&out);
    assert!(
        all.contains("ERROR 1142 (42000) at line 2 in file")
            && all.contains("DROP TABLE denied by rule \"no-drop\""),
        "{all}"
    );
    assert_eq!(shop.db.as_root("SELECT x FROM shop.t ORDER BY x"), "1\n2\n");
    assert_eq!(
        shop.db.as_root("SHOW TABLES FROM shop LIKE 'customers'"),
        "customers\n"
    );

    // A comment for a newer server than this one is dropped, as the server
    // would; one for this server runs, and is decided.
    let out = mariadb(shop.port, "SELECT 1 /*!999999 , (SELECT s FROM secrets) */");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "1\n",
        "{}",
        text(&out)
    );
    refused(
        &shop,
        "SELECT 1 /*!50000 , (SELECT s FROM secrets) */",
        "denied by rule \"protect-secrets\"",
    );
}

/// An agent in front of the MariaDB on `db_port` with `target_tls` for the
/// target and TLS terminated for clients with its local CA (in `tls_dir`).
fn tls_agent(
    db_port: u16,
    target_tls: &str,
    tls_dir: &std::path::Path,
    policy: &str,
) -> (Agent, u16) {
    tls_agent_at("127.0.0.1", db_port, target_tls, tls_dir, policy)
}

/// [`tls_agent`] for a server at `address`.
fn tls_agent_at(
    address: &str,
    db_port: u16,
    target_tls: &str,
    tls_dir: &std::path::Path,
    policy: &str,
) -> (Agent, u16) {
    let port = free_port();
    let config = format!(
        "[agent]\n{policy}\nclient_tls = \"terminate\"\ntls_dir = \"{}\"\n\n\
         [[target]]\nname = \"shop\"\naddress = \"{address}\"\nports = [{db_port}]\n\
         protocol = \"mysql\"\n{target_tls}\n\n\
         [[listener]]\nlisten = \"127.0.0.1:{port}\"\ntarget = \"shop\"\n",
        tls_dir.display()
    );
    (Agent::start(&config), port)
}

#[test]
fn tls_on_both_legs_with_the_agents_ca_and_a_verified_server() {
    let db = Mariadb::start_tls(SCHEMA);
    db.as_root(
        "INSTALL SONAME 'auth_ed25519'; \
         CREATE USER ed@'%' IDENTIFIED VIA ed25519 USING PASSWORD('pw'); \
         GRANT SELECT ON shop.* TO ed@'%'",
    );
    let policy = policy_file(POLICY);
    let tls_dir = tempfile::tempdir().unwrap();
    let ca = db.tls_ca();
    let (agent, port) = tls_agent(
        db.port,
        &format!("tls = \"verify-full\"\ntls_ca_file = \"{}\"", ca.display()),
        tls_dir.path(),
        &policy.line,
    );
    let agent_ca = tls_dir.path().join("ca.pem");

    // A client that verifies the agent's certificate against its CA; the
    // upstream leg is TLS too (the server reports its side).
    let sql = "SHOW STATUS LIKE 'Ssl_version'; SELECT id, email FROM customers ORDER BY id";
    let out = mariadb_command(port, sql)
        .args(["--ssl", "--ssl-verify-server-cert"])
        .arg(format!("--ssl-ca={}", agent_ca.display()))
        .output()
        .unwrap();
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.starts_with("Ssl_version\tTLSv1."), "{all}");
    assert!(all.contains("1\t****\n2\t****\n"), "{all}");
    agent
        .wait_for_log(
            |l| {
                l["client_tls"]
                    .as_str()
                    .is_some_and(|v| v.starts_with("TLSv1"))
                    && l["upstream_tls"]
                        .as_str()
                        .is_some_and(|v| v.starts_with("TLSv1"))
            },
            std::time::Duration::from_secs(5),
        )
        .unwrap();
    refused_on(
        port,
        &["--ssl", &format!("--ssl-ca={}", agent_ca.display())],
    );

    // A client without TLS, through the same agent: its leg is plaintext,
    // the server's still TLS, and authentication is renumbered across.
    let out = mariadb_command(port, "SHOW STATUS LIKE 'Ssl_version'")
        .output()
        .unwrap();
    assert!(
        text(&out).starts_with("Ssl_version\tTLSv1."),
        "{}",
        text(&out)
    );

    // MariaDB's ed25519 authentication, over either client leg.
    for tls_args in [
        vec!["--skip-ssl".to_owned()],
        vec![
            "--ssl".to_owned(),
            format!("--ssl-ca={}", agent_ca.display()),
        ],
    ] {
        let out = Command::new("mariadb")
            .args([
                "--no-defaults",
                "-h",
                "127.0.0.1",
                "-P",
                &port.to_string(),
                "--protocol=TCP",
            ])
            .args(["-u", "ed", "-ppw", "--batch", "--skip-column-names"])
            .args(&tls_args)
            .args(["-e", "SELECT current_user()"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "ed@%\n",
            "{tls_args:?}: {}",
            text(&out)
        );
    }
    drop(agent);

    // verify-full with a name the server's certificate does not carry.
    let dir = tempfile::tempdir().unwrap();
    let (_agent, port) = tls_agent(
        db.port,
        &format!(
            "tls = \"verify-full\"\ntls_ca_file = \"{}\"\ntls_server_name = \"db.example.com\"",
            ca.display()
        ),
        dir.path(),
        &policy.line,
    );
    let out = mariadb(port, "SELECT 1");
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("tollgate: target \"shop\": TLS to the server failed")
            && all.contains("does not match the server name"),
        "{all}"
    );

    // require against a server that does not offer TLS.
    let plain = Mariadb::start(SCHEMA);
    let dir = tempfile::tempdir().unwrap();
    let (_agent, port) = tls_agent(plain.port, "tls = \"require\"", dir.path(), &policy.line);
    let out = mariadb(port, "SELECT 1");
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("tollgate: target \"shop\" requires TLS but the server does not offer it"),
        "{all}"
    );
}

/// A server that asks for the password in clear (MariaDB's
/// `cleartext_plugin_server`, which switches the client to
/// `mysql_clear_password`): the agent must not carry a password the client
/// sent under TLS over a plaintext leg to another host, and carries it
/// everywhere else.
#[test]
fn a_password_sent_in_clear_under_tls_never_crosses_a_plaintext_network_leg() {
    const CLEAR_USER: &str =
        "CREATE USER clear@'%' IDENTIFIED VIA cleartext_plugin_server USING 'clear-pw'; \
         GRANT SELECT ON shop.* TO clear@'%'";
    // The server at an address that is not loopback (on `lo`, so the test
    // stays on this host).
    let Some(addrs) = TestAddresses::add_as_root() else {
        return;
    };
    let bind = format!("--bind-address=127.0.0.1,{}", addrs.v4);
    // The test plugin's maturity is "unknown".
    let options = ["--plugin-maturity=unknown", &bind];
    let db = Mariadb::start_with(SCHEMA, &options);
    db.as_root(&format!("INSTALL SONAME 'auth_test_plugin'; {CLEAR_USER}"));
    let policy = policy_file(POLICY);
    let tls_dir = tempfile::tempdir().unwrap();
    let agent_ca = tls_dir.path().join("ca.pem");
    let client_tls = [
        "--ssl".to_owned(),
        format!("--ssl-ca={}", agent_ca.display()),
    ];
    let plaintext = ["--skip-ssl".to_owned()];
    let login = |port: u16, user: &str, password: &str, tls: &[String]| {
        let tls = if tls.is_empty() { &plaintext[..] } else { tls };
        let out = Command::new("mariadb")
            .args(["--no-defaults", "-h", "127.0.0.1", "-P", &port.to_string()])
            .args(["--protocol=TCP", "-u", user, &format!("-p{password}")])
            .args(["--batch", "--skip-column-names"])
            .args(tls)
            .args([
                "-e",
                "SELECT current_user(), (SELECT count(*) FROM shop.customers)",
            ])
            .output()
            .unwrap();
        (out.status.success(), text(&out))
    };

    let (agent, port) = tls_agent_at(
        &addrs.v4.to_string(),
        db.port,
        "",
        tls_dir.path(),
        &policy.line,
    );
    // The client's leg is TLS, the server's plaintext (it offers no TLS):
    // the server's switch to mysql_clear_password never reaches the client.
    let (ok, all) = login(port, "clear", "clear-pw", &client_tls);
    assert!(!ok, "{all}");
    assert!(
        all.contains("ERROR 1045 (28000)")
            && all.contains("tollgate: target \"shop\": the server asks for the password in clear (an authentication switch to mysql_clear_password)")
            && all.contains("set the target's tls to \"require\""),
        "{all}"
    );
    agent
        .wait_for_log(
            |l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("session closed"))
                    && l["reason"].as_str().is_some_and(|r| r.contains("in clear"))
            },
            std::time::Duration::from_secs(5),
        )
        .unwrap();
    // A scrambled password (mysql_native_password) crosses the same legs.
    let (ok, all) = login(port, USER, PASSWORD, &client_tls);
    assert!(ok && all.starts_with("app@%\t"), "{all}");
    // A COM_CHANGE_USER to that user over the same legs: the server's
    // switch to mysql_clear_password is refused in its place too
    // (mysql-connector-python, logged in as `app` first).
    let script = r#"
import sys, mysql.connector
port, ca = int(sys.argv[1]), sys.argv[2]
conn = mysql.connector.connect(host="127.0.0.1", port=port, user="app", password="secret",
                               database="shop", ssl_ca=ca, ssl_verify_cert=False)
print("logged in", conn.is_connected())
try:
    conn.cmd_change_user(username="clear", password="clear-pw")
    print("changed")
except mysql.connector.Error as e:
    print("ERR", e.errno, e.sqlstate, e.msg)
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            script,
            &port.to_string(),
            &agent_ca.display().to_string(),
        ])
        .output()
        .unwrap();
    let all = text(&out);
    assert!(
        all.starts_with("logged in True\nERR 1045 28000 tollgate: target \"shop\": the server asks for the password in clear (an authentication switch to mysql_clear_password)"),
        "{all}"
    );
    // A client without TLS sends its password in clear itself: the agent
    // relays what the client chose, and the server checks it.
    let (ok, all) = login(port, "clear", "clear-pw", &[]);
    assert!(ok && all.starts_with("clear@%\t2"), "{all}");
    let (ok, all) = login(port, "clear", "wrong", &[]);
    assert!(!ok && all.contains("ERROR 1045"), "{all}");
    drop(agent);

    // The same server on loopback: the password never leaves the host.
    let (_agent, port) = tls_agent(db.port, "", tls_dir.path(), &policy.line);
    let (ok, all) = login(port, "clear", "clear-pw", &client_tls);
    assert!(ok && all.starts_with("clear@%\t2"), "{all}");

    // A server leg on TLS carries it to the other host.
    let tls_db = Mariadb::start_tls_with(SCHEMA, &options);
    tls_db.as_root(&format!("INSTALL SONAME 'auth_test_plugin'; {CLEAR_USER}"));
    let (_agent, port) = tls_agent_at(
        &addrs.v4.to_string(),
        tls_db.port,
        "tls = \"require\"",
        tls_dir.path(),
        &policy.line,
    );
    let (ok, all) = login(port, "clear", "clear-pw", &client_tls);
    assert!(ok && all.starts_with("clear@%\t2"), "{all}");
}

/// Asserts a read of `secrets` through `port` is refused over a client
/// leg set up by `client_args`.
fn refused_on(port: u16, client_args: &[&str]) {
    let out = mariadb_command(port, "SELECT * FROM secrets")
        .args(client_args)
        .output()
        .unwrap();
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("denied by rule \"protect-secrets\""), "{all}");
    assert!(!all.contains("the-key"), "{all}");
}

#[test]
fn a_client_may_kill_only_connections_its_user_opened_through_the_agent() {
    let shop = Shop::start();
    // The id the server gave the connection running `SELECT SLEEP(30),
    // 'word'`.
    let connection_of = |word: &str| -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let id = shop.db.as_root(&format!(
                "SELECT id FROM information_schema.processlist WHERE info = 'SELECT SLEEP(30), ''{word}'''"
            ));
            if !id.trim().is_empty() {
                return id.trim().to_owned();
            }
            assert!(std::time::Instant::now() < deadline, "{word} never ran");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };

    // A query through the agent, cancelled by the same user from a second
    // connection (what the mariadb client's Ctrl-C does).
    let started = std::time::Instant::now();
    let sleeper = mariadb_command(shop.port, "SELECT SLEEP(30), 'mine'")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mine = connection_of("mine");
    let out = mariadb(shop.port, &format!("KILL QUERY {mine}"));
    assert!(out.status.success(), "{}", text(&out));
    let finished = sleeper.wait_with_output().unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert!(
        text(&finished).contains("ERROR 1317 (70100)"),
        "{}",
        text(&finished)
    );

    // A connection made straight to the server is not the agent's to kill.
    let direct = mariadb_command(shop.db.port, "SELECT SLEEP(30), 'direct'")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let theirs = connection_of("direct");
    for sql in [format!("KILL {theirs}"), format!("KILL QUERY {theirs}")] {
        let out = mariadb(shop.port, &sql);
        let all = text(&out);
        assert!(!out.status.success(), "{sql}: {all}");
        assert!(
            all.contains("ERROR 1095 (42000)")
                && all.contains(&format!("KILL of connection {theirs} refused")),
            "{sql}: {all}"
        );
    }
    assert_eq!(connection_of("direct"), theirs, "still running");
    shop.db.as_root(&format!("KILL {theirs}"));
    let _ = direct.wait_with_output();

    // Another user's process may not kill this user's connection either.
    if is_root() {
        let sleeper = mariadb_command(shop.port, "SELECT SLEEP(30), 'root'")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let roots = connection_of("root");
        let out = Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg("mariadb")
            .args(mariadb_command(shop.port, &format!("KILL QUERY {roots}")).get_args())
            .output()
            .unwrap();
        let all = text(&out);
        assert!(all.contains("ERROR 1095 (42000)"), "{all}");
        assert_eq!(connection_of("root"), roots, "still running");
        let out = mariadb(shop.port, &format!("KILL {roots}"));
        assert!(out.status.success(), "{}", text(&out));
        let _ = sleeper.wait_with_output();
    } else {
        println!("not root: the other-user case needs runuser, skipped");
    }
}

/// What `mysql-driver-session` prints when every step went as expected.
const DRIVER_SESSION: &str = "prepared statements with binary parameters: ok\n\
                              masked binary and text rows: ok\n\
                              refusals as server errors, the connection usable: ok\n\
                              a refusal inside a transaction: ok\n";

fn assert_driver_session(out: &Output) {
    assert!(out.status.success(), "{}", text(out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), DRIVER_SESSION);
}

#[test]
fn a_rust_driver_through_a_listener_and_through_the_redirect() {
    let session = env!("CARGO_BIN_EXE_mysql-driver-session");
    let shop = Shop::start();
    let out = Command::new(session)
        .args(["127.0.0.1", &shop.port.to_string()])
        .output()
        .unwrap();
    assert_driver_session(&out);
    assert_eq!(shop.db.as_root("SELECT COUNT(*) FROM shop.t"), "22\n");
    assert_eq!(
        shop.db.as_root("SHOW TABLES FROM shop LIKE 'customers'"),
        "customers\n"
    );
    drop(shop);

    if let Some(why) = ebpf_unavailable() {
        eprintln!("skipping the redirect half: {why}");
        return;
    }
    // The same driver given the database's own address, under `tollgate
    // exec`: the connection takes the redirect.
    let addrs = TestAddresses::add();
    let db = Mariadb::start_listening(SCHEMA, addrs.v4);
    let policy = policy_file(POLICY);
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[agent]\n{}\n\n{}\n[[target]]\nname = \"shop\"\naddress = \"{}\"\nports = [{}]\nprotocol = \"mysql\"\n",
        policy.line,
        redirect_section(dir.path(), "pass"),
        addrs.v4,
        db.port
    );
    let agent = Agent::start(&config);
    let agent_config = dir.path().join("agent.toml");
    std::fs::copy(&agent.config, &agent_config).unwrap();
    let out = exec_command(
        &agent,
        &[session, &addrs.v4.to_string(), &db.port.to_string()],
    )
    .output()
    .unwrap();
    assert_driver_session(&out);
    let logs = agent.log_lines();
    let denial = logs
        .iter()
        .find(|l| l["statement_action"] == "deny" && l["rule"] == "protect-secrets")
        .expect("the denial is logged");
    let started = logs
        .iter()
        .find(|l| {
            l["session"] == denial["session"]
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("session started"))
        })
        .expect("the session's start is logged");
    assert_eq!(started["arrival"], "redirect", "{started}");
    assert_eq!(started["exe"].as_str(), Some(session), "{started}");
    drop(agent);
    cleanup_redirect(&agent_config);
}

#[test]
fn a_multibyte_character_set_cannot_hide_sql_in_a_string() {
    let shop = Shop::start();
    // In GBK the last byte of 中 (e4 b8 ad) and the backslash (5c) are one
    // character, so the quote after them ends the string: the server runs
    // the subquery that a UTF-8 reader sees inside a string.
    let hidden = "SELECT '中\\', (SELECT s FROM secrets LIMIT 1) -- '";
    let with_charset = |port: u16, charset: &str, sql: &str| {
        // --comments: the client strips comments itself otherwise.
        mariadb_command(port, sql)
            .arg(format!("--default-character-set={charset}"))
            .arg("--comments")
            .output()
            .unwrap()
    };
    let direct = with_charset(shop.db.port, "gbk", hidden);
    assert!(
        text(&direct).contains("the-key"),
        "the server reads it as SQL: {}",
        text(&direct)
    );
    let out = with_charset(shop.port, "gbk", hidden);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("non-ASCII characters is refused while the server reads it as"),
        "{all}"
    );
    assert!(!all.contains("the-key"), "{all}");
    // ASCII text is read alike in every character set.
    let out = with_charset(shop.port, "gbk", "SELECT 'plain'");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "plain\n",
        "{}",
        text(&out)
    );

    // Switching within the session: to GBK by name, or to a value the agent
    // cannot read, refuses non-ASCII text until SET NAMES utf8mb4.
    for switch in [
        "SET NAMES gbk",
        "SET @c = 'gbk'; SET character_set_client = @c",
    ] {
        let out = mariadb_command(
            shop.port,
            &format!("{switch}; SELECT 'né'; SET NAMES utf8mb4; SELECT 'né'"),
        )
        .arg("--force")
        .output()
        .unwrap();
        let all = text(&out);
        assert!(
            all.contains("non-ASCII characters is refused"),
            "{switch}: {all}"
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "né\n",
            "{switch}: {all}"
        );
    }
    // A text that both switches and carries non-ASCII characters.
    let results = python_driver("pymysql", shop.port, &["SET NAMES gbk; SELECT 'né'"]);
    let DriverResult::Error(e) = &results[0] else {
        panic!("ran: {results:?}");
    };
    assert!(
        e.contains("may not also change the client character set"),
        "{e}"
    );
}

#[test]
fn a_change_of_user_is_authenticated_by_the_server_and_decided_as_before() {
    let shop = Shop::start();
    shop.db
        .as_root("CREATE USER other@'%' IDENTIFIED BY 'pw2'; GRANT SELECT ON shop.* TO other@'%'");
    let results = python_driver(
        "connector",
        shop.port,
        &[
            "SELECT current_user()",
            "-- change-user other pw2 shop",
            "SELECT current_user()",
            "SELECT id, email FROM customers WHERE id = 1",
            "SELECT s FROM secrets",
            "-- change-user other wrong shop",
        ],
    );
    let rows = |i: usize| match &results[i] {
        DriverResult::Rows(r) => r[0].clone(),
        DriverResult::Error(e) => panic!("{i}: {e}"),
    };
    assert_eq!(rows(0), vec![row(&[Some("app@%")])]);
    assert_eq!(rows(2), vec![row(&[Some("other@%")])]);
    assert_eq!(rows(3), vec![row(&[Some("1"), Some("****")])]);
    let DriverResult::Error(e) = &results[4] else {
        panic!("{results:?}");
    };
    assert!(e.contains("protect-secrets"), "{e}");
    // A wrong password is the server's refusal.
    let DriverResult::Error(e) = &results[5] else {
        panic!("{results:?}");
    };
    assert!(e.contains("Access denied for user 'other'"), "{e}");
    // The new user is recorded as a new start-up of the same session.
    shop.agent
        .wait_for_log(
            |l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("start-up"))
                    && l["db_user"] == "other"
            },
            std::time::Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", shop.agent.log_text()));
}

#[test]
fn load_data_local_needs_a_rule_that_allows_it() {
    let shop = Shop::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rows.csv");
    std::fs::write(&file, "1\n2\n3\n").unwrap();
    let load = format!("LOAD DATA LOCAL INFILE '{}' INTO TABLE t", file.display());
    let run = |port: u16| {
        mariadb_command(port, &load)
            .arg("--local-infile=1")
            .output()
            .unwrap()
    };

    // The default allows every statement, but not this one: no rule does.
    let out = run(shop.port);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("LOAD DATA LOCAL refused: no rule allows it"),
        "{all}"
    );
    assert_eq!(shop.db.as_root("SELECT COUNT(*) FROM shop.t"), "0\n");

    // An agent whose policy has a rule for it: the file reaches the server.
    let policy = policy_file(&format!(
        "{POLICY}\n[[rule]]\nname = \"imports\"\naction = \"allow\"\n[rule.match]\n\
         commands = [\"LOAD DATA LOCAL\"]\ntables = [\"t\"]\n"
    ));
    let port = free_port();
    let _agent = Agent::start(&mysql_config(port, shop.db.port, &policy.line));
    let out = run(port);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(shop.db.as_root("SELECT SUM(x) FROM shop.t"), "6\n");
    // The rule names `t`: into another table it is refused.
    let other = format!(
        "LOAD DATA LOCAL INFILE '{}' INTO TABLE customers (id)",
        file.display()
    );
    let out = mariadb_command(port, &other)
        .arg("--local-infile=1")
        .output()
        .unwrap();
    assert!(
        text(&out).contains("LOAD DATA LOCAL refused: no rule allows it"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_prepared_statement_is_decided_again_after_a_policy_reload() {
    use std::io::BufRead as _;
    let db = Mariadb::start(SCHEMA);
    let policy = policy_file(POLICY);
    let port = free_port();
    let agent = Agent::start(&mysql_config(port, db.port, &policy.line));
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    // One prepared statement, executed before and after the reload (the
    // connector executes the same text again without preparing it anew).
    let select = "SELECT x FROM t WHERE x >= ?";
    let script = r#"
import sys, mysql.connector
port, go = int(sys.argv[1]), sys.argv[2]
conn = mysql.connector.connect(host="127.0.0.1", port=port, user="app", password="secret",
                               database="shop", ssl_disabled=True, use_pure=True)
cur = conn.cursor(prepared=True)
cur.execute("SELECT x FROM t WHERE x >= ?", (0,))
print("first", cur.fetchall(), flush=True)
import os, time
deadline = time.time() + 30
while not os.path.exists(go) and time.time() < deadline:
    time.sleep(0.05)
try:
    cur.execute("SELECT x FROM t WHERE x >= ?", (0,))
    print("second", cur.fetchall(), flush=True)
except Exception as e:
    print("second refused", e, flush=True)
"#;
    assert!(script.contains(select));
    let mut child = Command::new("python3")
        .args(["-c", script, &port.to_string()])
        .arg(&go)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "first []");
    // The policy now denies reading t.
    std::fs::write(
        policy.path(),
        format!(
            "{POLICY}\n[[rule]]\nname = \"no-t\"\naction = \"deny\"\n[rule.match]\ntables = [\"t\"]\n"
        ),
    )
    .unwrap();
    agent
        .wait_for_log(
            |l| l["message"] == "policy reloaded",
            std::time::Duration::from_secs(10),
        )
        .unwrap();
    std::fs::write(&go, "").unwrap();
    let second = lines.next().unwrap().unwrap();
    assert!(
        second.starts_with("second refused") && second.contains("rule \"no-t\""),
        "{second}"
    );
    child.wait().unwrap();
    // The server saw one prepare of the statement: the refusal was of an
    // execution of the statement prepared before the reload.
    assert_eq!(
        db.as_root("SHOW GLOBAL STATUS LIKE 'Com_stmt_prepare'"),
        "Com_stmt_prepare\t1\n"
    );
}

#[test]
fn a_client_that_breaks_the_protocol_gets_an_err_and_only_its_session_ends() {
    let shop = Shop::start();
    // Sessions from now on take packets of at most 1 MiB; the agent holds
    // a client to the same limit.
    shop.db.as_root("SET GLOBAL max_allowed_packet = 1048576");
    // Two PyMySQL sessions: the second sends one broken packet (or a query
    // whose rows it never reads) and prints the ERR that came back (code,
    // SQLSTATE, message) and whether the agent then closed it; the first
    // then runs a statement.
    let script = r#"
import struct, sys, time, pymysql
port, case = int(sys.argv[1]), sys.argv[2]
args = dict(host="127.0.0.1", port=port, user="app", password="secret", database="shop")
bystander, broken = pymysql.connect(**args), pymysql.connect(**args)
sock = broken._sock
frame = lambda seq, payload: struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload
if case == "out-of-order":
    sock.sendall(frame(5, b"\x03SELECT 1"))
elif case == "empty":
    sock.sendall(frame(0, b""))
elif case == "unknown":
    sock.sendall(frame(0, b"\xee\x01"))
elif case == "oversized":
    sock.sendall(frame(0, b"\x03SELECT '" + b"x" * (1 << 20) + b"'"))
elif case == "cut-short":
    sock.sendall(b"\x10\x00\x00\x00\x03SELECT")
    sock.shutdown(1)
elif case == "stalled":
    # 100 MB of rows the client never reads.
    sock.sendall(frame(0, b"\x03SELECT REPEAT('x', 10000) FROM seq_1_to_10000"))
    time.sleep(1)
sock.settimeout(10)
answer = b""
while case != "stalled" and (len(answer) < 4 or len(answer) < 4 + int.from_bytes(answer[:3], "little")):
    data = sock.recv(65536)
    if not data:
        break
    answer += data
if case == "stalled":
    print("stalled")
elif answer[4:5] == b"\xff":
    code = int.from_bytes(answer[5:7], "little")
    print("ERR", code, answer[8:13].decode(), answer[13:].decode())
else:
    print("no answer", answer)
sock.settimeout(2)
try:
    print("closed" if sock.recv(1) == b"" else "open")
except TimeoutError:
    print("open")
cur = bystander.cursor()
cur.execute("SELECT COUNT(*) FROM t")
print("bystander", cur.fetchall())
"#;
    for (case, answer, after) in [
        (
            "out-of-order",
            "ERR 1156 08S01 tollgate: got packets out of order (a command with sequence id 5, not 0)",
            "closed",
        ),
        (
            "empty",
            "ERR 1835 08S01 tollgate: an empty command packet",
            "closed",
        ),
        (
            "unknown",
            "ERR 1047 08S01 tollgate: command 0xee is not supported through the agent",
            "open",
        ),
        (
            "oversized",
            "ERR 1153 08S01 tollgate: a packet of more than 1048586 bytes, above the limit of 1048576 (the server's max_allowed_packet)",
            "closed",
        ),
        // The command never arrived whole: nothing to answer.
        ("cut-short", "no answer b''", "closed"),
        // A client that stops reading holds up only its own session.
        ("stalled", "stalled", "open"),
    ] {
        let out = Command::new("python3")
            .args(["-c", script, &shop.port.to_string(), case])
            .output()
            .unwrap();
        let all = text(&out);
        assert!(out.status.success(), "{case}: {all}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{answer}\n{after}\nbystander ((0,),)\n"),
            "{case}"
        );
    }
    // The broken sessions were logged as the client's fault.
    shop.agent
        .wait_for_log(
            |l| {
                l["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("got packets out of order"))
            },
            std::time::Duration::from_secs(5),
        )
        .unwrap();
}

#[test]
fn an_unreachable_server_is_an_error_in_place_of_the_greeting() {
    let policy = policy_file(POLICY);
    let port = free_port();
    let nobody = free_port();
    let _agent = Agent::start(&mysql_config(port, nobody, &policy.line));
    let out = mariadb(port, "SELECT 1");
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("ERROR 1105 (HY000): tollgate: cannot reach target \"shop\""),
        "{all}"
    );
}

/// Expects `result` to be the driver's error holding `expected`.
fn driver_error(result: &DriverResult, expected: &str) {
    match result {
        DriverResult::Error(e) => assert!(e.contains(expected), "{e}"),
        DriverResult::Rows(rows) => {
            panic!("expected an error with {expected:?}, got rows {rows:?}")
        }
    }
}

/// Expects `result` to be one result of one row of one value.
fn driver_value(result: &DriverResult, expected: &str) {
    match result {
        DriverResult::Rows(rows) => {
            assert_eq!(rows, &vec![vec![vec![Some(expected.to_owned())]]]);
        }
        DriverResult::Error(e) => panic!("expected {expected:?}, got the error {e}"),
    }
}

#[test]
fn a_rule_naming_a_table_with_its_database_holds_however_the_database_was_chosen() {
    let db = Mariadb::start(SCHEMA);
    db.as_root("CREATE DATABASE other; CREATE TABLE other.secrets (s TEXT); INSERT INTO other.secrets VALUES ('not-secret')");
    let policy = policy_file(concat!(
        include_str!("../data/policy/allow-by-default.toml"),
        "[[rule]]\nname = \"shop-secrets\"\naction = \"deny\"\n[rule.match]\ntables = [\"shop.secrets\"]\n",
    ));
    let port = free_port();
    let _agent = Agent::start(&mysql_config(port, db.port, &policy.line));
    let client = |database: &str, sql: &str| {
        let out = Command::new("mariadb")
            .arg("--no-defaults")
            .args(["-h", "127.0.0.1", "-P", &port.to_string()])
            .args(["-u", USER, &format!("-p{PASSWORD}")])
            .args([
                "--protocol=TCP",
                "--skip-ssl",
                "--batch",
                "--skip-column-names",
            ])
            .args(["-D", database, "-e", sql])
            .output()
            .unwrap();
        (out.status.success(), text(&out))
    };
    let denied = "denied by rule \"shop-secrets\"";
    // The database of the handshake, and one switched to with the client's
    // `use` (COM_INIT_DB).
    for (database, sql) in [
        ("shop", "SELECT s FROM secrets"),
        ("other", "use shop\nSELECT s FROM secrets"),
    ] {
        let (success, all) = client(database, sql);
        assert!(!success, "{sql} ran: {all}");
        assert!(all.contains(denied), "{sql}: {all}");
        assert!(!all.contains("the-key"), "{sql}: {all}");
    }
    // The same name in another database is another table.
    let (success, all) = client("other", "SELECT s FROM secrets");
    assert!(success, "{all}");
    assert_eq!(all, "not-secret\n");

    // SQL `USE`, alone and in front of the statement in the same text; a
    // text that switched databases and failed part-way leaves the database
    // unknown until the next USE.
    let results = python_driver(
        "pymysql",
        port,
        &[
            "USE other",
            "SELECT s FROM secrets",
            "USE shop; SELECT s FROM secrets",
            "SELECT s FROM secrets",
            "SELECT 1; USE nosuchdb",
            "SELECT s FROM secrets",
            "USE shop",
            "SELECT s FROM secrets",
        ],
    );
    assert_eq!(results.len(), 8, "{results:?}");
    driver_value(&results[1], "not-secret");
    driver_error(&results[2], denied);
    driver_value(&results[3], "not-secret");
    driver_error(&results[4], "nosuchdb");
    driver_error(&results[5], "current database is not known");
    driver_error(&results[7], denied);
    // A statement prepared in the handshake's database.
    let results = python_driver("connector", port, &["SELECT s FROM secrets"]);
    driver_error(&results[0], denied);
}

/// Kills the child when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_server_that_asks_for_a_client_file_unasked_gets_an_empty_one() {
    // A hostile server asks for a client file in answer to any statement.
    // The client would send it (it runs with --local-infile=1); the agent
    // answers for it with an empty file, whether the statement is a plain
    // SELECT or a LOAD DATA LOCAL that a rule allows for another file.
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("id_ed25519");
    std::fs::write(&private, "the client's private key\n").unwrap();
    let allowed = dir.path().join("rows.csv");
    std::fs::write(&allowed, "1\n").unwrap();
    let received = dir.path().join("received");
    let server_port = free_port();
    let _server = Killed(
        Command::new("python3")
            .arg(workspace_root().join("tests/data/hostile_mysql_server.py"))
            .arg(server_port.to_string())
            .arg(&private)
            .arg(&received)
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", server_port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never listened"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Directly, the client sends the file it is asked for.
    let out = mariadb_command(server_port, "SELECT 1")
        .arg("--local-infile=1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let asked = private.display().to_string();
    let key_hex: String = "the client's private key\n"
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        std::fs::read_to_string(&received).unwrap(),
        format!("{asked}\t{key_hex}\n")
    );
    std::fs::remove_file(&received).unwrap();

    let policy = policy_file(concat!(
        include_str!("../data/policy/allow-by-default.toml"),
        "[[rule]]\nname = \"imports\"\naction = \"allow\"\n[rule.match]\ncommands = [\"LOAD DATA LOCAL\"]\n",
    ));
    let port = free_port();
    let agent = Agent::start(&mysql_config(port, server_port, &policy.line));
    for sql in [
        "SELECT 1".to_owned(),
        format!(
            "LOAD DATA LOCAL INFILE '{}' INTO TABLE shop.t",
            allowed.display()
        ),
    ] {
        let out = mariadb_command(port, &sql)
            .arg("--local-infile=1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{sql}: {}", text(&out));
    }
    // Through the agent, every request was answered with nothing: the two
    // statements', and the one in answer to the agent's own question about
    // the session's character set and database on each connection.
    assert_eq!(
        std::fs::read_to_string(&received).unwrap(),
        format!("{asked}\t\n").repeat(4)
    );
    agent
        .wait_for_log(
            |l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("no allowed LOAD DATA LOCAL names"))
                    && l["file"] == asked.as_str()
            },
            std::time::Duration::from_secs(5),
        )
        .unwrap();
}

#[test]
fn a_binlog_dump_needs_a_rule_that_allows_it() {
    // The binary log holds every change of every table, the secrets too.
    let db = Mariadb::start_with(SCHEMA, &["--log-bin=binlog", "--server-id=1"]);
    let log = db.as_root("SHOW BINARY LOGS");
    let first = log.split_whitespace().next().unwrap().to_owned();
    let dump = |port: u16| {
        let out = Command::new("mariadb-binlog")
            .arg("--no-defaults")
            .arg("--read-from-remote-server")
            .args(["-h", "127.0.0.1", "-P", &port.to_string()])
            .args(["-u", USER, &format!("-p{PASSWORD}")])
            .arg(&first)
            .output()
            .unwrap();
        (out.status.success(), text(&out))
    };
    // Directly, the dump holds the secret.
    let (success, all) = dump(db.port);
    assert!(success, "{all}");
    assert!(all.contains("the-key"), "{all}");

    // Through an agent whose default allows every statement: refused, by
    // name, with nothing of the log.
    let policy = policy_file(POLICY);
    let port = free_port();
    let agent = Agent::start(&mysql_config(port, db.port, &policy.line));
    let (success, all) = dump(port);
    assert!(!success, "{all}");
    assert!(
        all.contains("COM_BINLOG_DUMP refused: no rule allows it"),
        "{all}"
    );
    assert!(!all.contains("the-key"), "{all}");
    let refused = agent.wait_for_statement("allow", "command", "COM_BINLOG_DUMP");
    assert_eq!(
        refused["message"], "statement refused (allow): COM_BINLOG_DUMP",
        "{refused}"
    );
    drop(agent);

    // A rule for it: the whole log comes through, as directly.
    let policy = policy_file(&format!(
        "{POLICY}\n[[rule]]\nname = \"replicas\"\naction = \"allow\"\n[rule.match]\ncommands = [\"COM_BINLOG_DUMP\"]\n"
    ));
    let port = free_port();
    let _agent = Agent::start(&mysql_config(port, db.port, &policy.line));
    let (success, all) = dump(port);
    assert!(success, "{all}");
    assert!(all.contains("the-key"), "{all}");
    assert_eq!(all, dump(db.port).1);
}

#[test]
fn a_character_set_and_database_the_servers_init_connect_sets_are_followed() {
    // The server switches every ordinary user's session to GBK and to the
    // database `shop` when it connects, which the handshake does not show.
    let db = Mariadb::start_with(SCHEMA, &["--init-connect=SET NAMES gbk; USE shop"]);
    db.as_root(
        "CREATE USER 'limited'@'%' IDENTIFIED BY 'pw'; GRANT SELECT ON shop.* TO 'limited'@'%'",
    );
    let hidden = "SELECT '中\\', (SELECT s FROM secrets LIMIT 1) -- '";
    let limited = |port: u16, sql: &str| {
        let out = Command::new("mariadb")
            .arg("--no-defaults")
            .args(["-h", "127.0.0.1", "-P", &port.to_string()])
            .args(["-u", "limited", "-ppw"])
            .args([
                "--protocol=TCP",
                "--skip-ssl",
                "--batch",
                "--skip-column-names",
            ])
            .args(["--default-character-set=utf8mb4", "--comments", "-e", sql])
            .output()
            .unwrap();
        (out.status.success(), text(&out))
    };
    // Directly, the server reads the UTF-8 bytes as GBK and runs the
    // subquery.
    let (_, all) = limited(db.port, hidden);
    assert!(all.contains("the-key"), "the server reads it as SQL: {all}");

    let policy = policy_file(concat!(
        include_str!("../data/policy/allow-by-default.toml"),
        "[[rule]]\nname = \"shop-secrets\"\naction = \"deny\"\n[rule.match]\ntables = [\"shop.secrets\"]\n",
    ));
    let port = free_port();
    let _agent = Agent::start(&mysql_config(port, db.port, &policy.line));
    let (success, all) = limited(port, hidden);
    assert!(!success, "{all}");
    assert!(
        all.contains("non-ASCII characters is refused while the server reads it as gbk"),
        "{all}"
    );
    assert!(!all.contains("the-key"), "{all}");
    // No database in the handshake, `shop` from init_connect: the rule
    // naming shop.secrets holds.
    let (success, all) = limited(port, "SELECT s FROM secrets");
    assert!(!success, "{all}");
    assert!(all.contains("denied by rule \"shop-secrets\""), "{all}");
    let (success, all) = limited(port, "SELECT 'plain'");
    assert!(success, "{all}");
    assert_eq!(all, "plain\n");
}

#[test]
fn a_rule_with_on_match_kill_ends_the_client_that_sent_the_statement() {
    let db = Mariadb::start(SCHEMA);
    let policy = policy_file(concat!(
        include_str!("../data/policy/allow-by-default.toml"),
        "[[rule]]\nname = \"kill-on-secrets\"\naction = \"deny\"\non_match = \"kill\"\n[rule.match]\ntables = [\"secrets\"]\n",
    ));
    let port = free_port();
    let agent = Agent::start(&mysql_config(port, db.port, &policy.line));
    // The shell goes on after its client was killed (SIGKILL: 128 + 9).
    let line = format!(
        "mariadb --no-defaults -h 127.0.0.1 -P {port} -u {USER} -p{PASSWORD} --protocol=TCP --skip-ssl -D shop -e 'SELECT s FROM secrets'; echo client-exit-$?"
    );
    let out = Command::new("sh").args(["-c", &line]).output().unwrap();
    let said = text(&out);
    assert!(said.contains("client-exit-137"), "{said}");
    assert!(!said.contains("the-key"), "{said}");
    let killed = agent
        .wait_for_log(
            |l| l["event"] == "intervention",
            std::time::Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(killed["rule"], "kill-on-secrets", "{killed}");
    assert_eq!(killed["action"], "kill", "{killed}");
    assert!(killed["error"].is_null(), "{killed}");
}
