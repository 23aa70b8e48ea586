//! MySQL targets: the real `mariadb` client through the agent's listener to
//! a real MariaDB server, with the same policy files as PostgreSQL. Each
//! refusal is checked on the server too: what was refused did not happen.

use std::process::Output;

use tollgate_tests::mariadb::{mariadb, mariadb_command, Mariadb};
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
    _policy: PolicyFile,
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
            _policy: policy,
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
fn reading_a_table_with_masked_columns_is_refused_until_masking_exists_for_mysql() {
    let shop = Shop::start();
    for sql in ["SELECT email FROM customers", "SELECT id FROM customers"] {
        let out = mariadb(shop.port, sql);
        let all = text(&out);
        assert!(!out.status.success(), "{sql}: {all}");
        assert!(
            all.contains("rule \"mask-contact\" masks its result, and masking is not supported for MySQL targets yet"),
            "{sql}: {all}"
        );
        assert!(!all.contains("ada@"), "{sql} leaked: {all}");
    }
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
