//! Real drivers and tools through the PostgreSQL handler: a Rust driver
//! with binary parameters and prepared statements, psycopg 3, and pg_dump.
//! (psql's Ctrl-C is tested in postgres.rs, with the cancel keys.)

use std::process::Command;
use std::time::Duration;

use tollgate_tests::*;

pub(crate) const POLICY: &str = include_str!("../data/policy/protect-secrets.toml");

/// A server with a `secrets` table, an agent with the policy above, and the
/// agent's listener port.
pub(crate) const SCHEMA: &str =
    "create table items (id int primary key, name text, payload bytea, at timestamptz);\
     create table secrets (id int, value text); insert into secrets values (1, 'hunter2');\
     create view item_names as select name from items;\
     create function double_it(int) returns int language sql as 'select $1 * 2';";

fn setup() -> Governed {
    Governed::start(POLICY, SCHEMA, "")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A tokio-postgres client of the agent's listener, its connection driven
/// by a task of the current runtime.
async fn connect(port: u16) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    client
}

#[test]
fn rust_driver_with_binary_parameters_prepared_statements_and_a_denial() {
    let governed = setup();
    let port = governed.port;
    let out = Command::new(env!("CARGO_BIN_EXE_pg-driver-session"))
        .args(["127.0.0.1", &port.to_string()])
        .output()
        .unwrap();
    assert_driver_session(&out);
}

/// What `pg-driver-session` prints when every step went as expected (it
/// panics, exiting non-zero, at the first that did not).
pub(crate) fn assert_driver_session(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "binary parameters: ok\ndenied: 42501\nin a transaction: 25P02, rolled back\n"
    );
}

/// A statement prepared (and a portal bound) under one policy is decided
/// again at Bind and Execute once a reload refuses it; statements the new
/// policy still allows keep running on the same connection.
#[test]
fn prepared_statements_and_portals_are_decided_again_after_a_policy_reload() {
    let governed = setup();
    let (agent, port, policy) = (&governed.agent, governed.port, &governed.policy);
    runtime().block_on(async {
        let mut client = connect(port).await;
        client
            .batch_execute("insert into items (id, name) select g, 'n' || g from generate_series(1, 10) g")
            .await
            .unwrap();
        let by_id = client
            .prepare("select name from items where id = $1")
            .await
            .unwrap();
        let count = client.prepare("select count(*) from secrets").await;
        assert!(count.is_err(), "secrets are refused from the start");
        let name: String = client.query_one(&by_id, &[&3i32]).await.unwrap().get(0);
        assert_eq!(name, "n3");
        // A simple query of the shape asked again after the reload: the
        // session's memo of decisions must not outlive the policy.
        assert!(client
            .simple_query("select name from items where id = 6")
            .await
            .is_ok());

        // A portal bound now, executed after the reload.
        let tx = client.transaction().await.unwrap();
        let portal = tx.bind(&by_id, &[&4i32]).await.unwrap();

        std::fs::write(
            policy.path(),
            format!(
                "{POLICY}\n[[rule]]\nname = \"items-frozen\"\naction = \"deny\"\nmessage = \"items are frozen\"\n[rule.match]\ntables = [\"items\"]\n"
            ),
        )
        .unwrap();
        send_signal(agent.child.id(), libc::SIGHUP);
        agent
            .wait_for_log(|l| l["message"] == "policy reloaded", Duration::from_secs(10))
            .unwrap();

        let err = tx.query_portal(&portal, 10).await.unwrap_err();
        let db = err.as_db_error().expect("a server-style error");
        assert_eq!(db.code().code(), "42501", "{db:?}");
        assert!(db.message().contains("items-frozen"), "{}", db.message());
        assert!(db.message().contains("items are frozen"), "{}", db.message());
        // The failed Execute failed the transaction, as a server error would.
        let aborted = tx.query("select 1", &[]).await.unwrap_err();
        assert_eq!(aborted.as_db_error().map(|e| e.code().code()), Some("25P02"));
        tx.rollback().await.unwrap();

        // The shape decided before the reload, with a new literal.
        let err = client
            .simple_query("select name from items where id = 7")
            .await
            .unwrap_err();
        let db = err.as_db_error().expect("a server-style error");
        assert_eq!(db.code().code(), "42501", "{db:?}");
        assert!(db.message().contains("items-frozen"), "{}", db.message());

        // The statement prepared before the reload is refused at Bind.
        let err = client.query_one(&by_id, &[&3i32]).await.unwrap_err();
        let db = err.as_db_error().expect("a server-style error");
        assert_eq!(db.code().code(), "42501", "{db:?}");
        assert!(db.message().contains("items-frozen"), "{}", db.message());
        // Again, and the connection goes on with what is still allowed.
        assert!(client.query_one(&by_id, &[&5i32]).await.is_err());
        let one: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
        let doubled: i32 = client
            .query_one("select double_it($1)", &[&21i32])
            .await
            .unwrap()
            .get(0);
        assert_eq!(doubled, 42);
    });
    // Each refusal was reported as a decision of the items-frozen rule.
    let frozen = agent
        .log_lines()
        .iter()
        .filter(|l| l["rule"] == "items-frozen")
        .count();
    assert!(frozen >= 4, "{}", agent.log_text());
}

/// The rule a reload adds in the reload tests: `items` is frozen.
const ITEMS_FROZEN: &str = "\n[[rule]]\nname = \"items-frozen\"\naction = \"deny\"\nmessage = \"items are frozen\"\n[rule.match]\ntables = [\"items\"]\n";

/// Statements prepared with SQL PREPARE in a psql session are decided again
/// at EXECUTE once a reload refuses them; DEALLOCATE still works, and what
/// the new policy allows keeps running on the same connection.
#[test]
fn sql_prepare_and_execute_are_decided_again_after_a_policy_reload() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;

    let governed = setup();
    let (agent, port, policy) = (&governed.agent, governed.port, &governed.policy);
    psql(
        port,
        "insert into items (id, name) values (1, 'one'), (2, 'two')",
    )
    .unwrap();
    let mut child = Command::new(pg_tool("psql"))
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=0"])
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
        .args(["-p", &port.to_string()])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    writeln!(
        stdin,
        "\\set VERBOSITY verbose\n\
         PREPARE by_id (int) AS SELECT name FROM items WHERE id = $1;\n\
         PREPARE \"Count\" AS SELECT count(*) FROM items \\; PREPARE two AS SELECT 2;\n\
         EXECUTE by_id(1);\nEXECUTE \"Count\";\n\\echo prepared"
    )
    .unwrap();
    stdin.flush().unwrap();
    let mut before = Vec::new();
    loop {
        let mut line = String::new();
        assert_ne!(
            stdout.read_line(&mut line).unwrap(),
            0,
            "psql ended: {before:?}"
        );
        if line.trim_end() == "prepared" {
            break;
        }
        before.push(line.trim_end().to_owned());
    }
    assert_eq!(before, ["one", "2"], "allowed before the reload");

    std::fs::write(policy.path(), format!("{POLICY}{ITEMS_FROZEN}")).unwrap();
    send_signal(agent.child.id(), libc::SIGHUP);
    agent
        .wait_for_log(
            |l| l["message"] == "policy reloaded",
            Duration::from_secs(10),
        )
        .unwrap();

    writeln!(
        stdin,
        "EXECUTE by_id(2);\n\
         EXECUTE \"Count\";\n\
         EXECUTE two;\n\
         SELECT double_it(21);\n\
         BEGIN; EXECUTE by_id(1); SELECT 1; ROLLBACK;\n\
         EXECUTE by_id(2);\n\
         execute count;\n\
         DEALLOCATE by_id;\n\
         EXECUTE by_id(2);\n\
         PREPARE by_id AS SELECT 3; EXECUTE by_id;\n\
         DEALLOCATE \"Count\" \\; PREPARE \"Count\" AS SELECT 4 \\; EXECUTE \"Count\";\n\
         DEALLOCATE ALL;\n\
         EXECUTE \"Count\";\n\
         \\echo done"
    )
    .unwrap();
    drop(stdin);
    let status = wait_timeout(&mut child, Duration::from_secs(20)).expect("psql ends");
    let mut after = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut after).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    // What the new policy allows ran, in order: a statement prepared before
    // the reload that it still allows, a new statement, statements prepared
    // anew under deallocated names (in the same message as the EXECUTE:
    // decided with it, not as the refused statement that had the name).
    assert_eq!(
        after.lines().collect::<Vec<_>>(),
        ["2", "42", "3", "4", "done"],
        "{stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.split_once("ERROR:  ").map(|(_, e)| e))
        .collect();
    let denied = "42501: tollgate: EXECUTE denied by rule \"items-frozen\": items are frozen";
    let unknown = |name: &str| {
        format!("42501: tollgate: EXECUTE of prepared statement \"{name}\" refused: it was not prepared through the proxy in this session (it does not exist, or a function or DO block prepared it), so what it runs cannot be decided")
    };
    assert_eq!(
        errors,
        [
            denied,
            denied,
            // In a transaction block: the denial fails the block, as the
            // server's own error would.
            denied,
            "25P02: current transaction is aborted, commands ignored until end of transaction block",
            // Refused again: an attempt after a refusal is decided again.
            denied,
            // Unquoted names fold to lower case: "Count" is not count, a
            // name the proxy never saw prepared, which fails closed.
            &unknown("count"),
            // DEALLOCATE reached the server (and the proxy forgot by_id).
            &unknown("by_id"),
            // DEALLOCATE ALL too.
            &unknown("Count"),
        ],
        "{stderr}"
    );
    // Each refusal was reported as a decision of the items-frozen rule on
    // the statement prepared (the text after PREPARE's AS).
    let log = agent.log_lines();
    let decisions = |text: &str| {
        log.iter()
            .filter(|l| {
                l["rule"] == "items-frozen"
                    && l["statement_action"] == "deny"
                    && l["text"].as_str().is_some_and(|t| t.starts_with(text))
            })
            .count()
    };
    assert_eq!(
        decisions("SELECT name FROM items WHERE id = $1"),
        3,
        "{}",
        agent.log_text()
    );
    assert_eq!(
        decisions("SELECT count(*) FROM items"),
        1,
        "{}",
        agent.log_text()
    );
}

/// The extended protocol's side of the same: an EXECUTE sent by Parse is
/// decided again, and so is a statement prepared by Parse and run by a SQL
/// EXECUTE (the two share one namespace on the server).
#[test]
fn an_execute_by_parse_and_a_parsed_statement_run_by_execute_are_decided_again() {
    let governed = setup();
    let (agent, port, policy) = (&governed.agent, governed.port, &governed.policy);
    runtime().block_on(async {
        let client = connect(port).await;
        client
            .batch_execute("insert into items (id, name) values (1, 'one'); PREPARE by_sql AS SELECT name FROM items")
            .await
            .unwrap();
        let parsed = client.prepare("select count(*) from items").await.unwrap();
        // The driver's name for it, as the server has it.
        let named = client
            .query_one(
                "select name from pg_prepared_statements where not from_sql and statement = $1",
                &[&"select count(*) from items"],
            )
            .await
            .unwrap();
        let run_parsed = format!("EXECUTE {}", named.get::<_, String>(0));
        let n: i64 = client.query_one(&parsed, &[]).await.unwrap().get(0);
        assert_eq!(n, 1);
        let counted: Vec<String> = client
            .simple_query(&run_parsed)
            .await
            .unwrap()
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })
            .collect();
        assert_eq!(counted, ["1"]);
        let name: String = client.query_one("EXECUTE by_sql", &[]).await.unwrap().get(0);
        assert_eq!(name, "one");

        std::fs::write(policy.path(), format!("{POLICY}{ITEMS_FROZEN}")).unwrap();
        send_signal(agent.child.id(), libc::SIGHUP);
        agent
            .wait_for_log(|l| l["message"] == "policy reloaded", Duration::from_secs(10))
            .unwrap();

        let denied = "tollgate: EXECUTE denied by rule \"items-frozen\": items are frozen";
        let err = client.query("EXECUTE by_sql", &[]).await.unwrap_err();
        let db = err.as_db_error().expect("a server-style error");
        assert_eq!((db.code().code(), db.message()), ("42501", denied));
        let err = client.simple_query(&run_parsed).await.unwrap_err();
        let db = err.as_db_error().expect("a server-style error");
        assert_eq!((db.code().code(), db.message()), ("42501", denied));
        let one: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
    });
}

#[test]
fn pg_dump_of_a_real_schema_through_the_proxy() {
    let governed = setup();
    let port = governed.port;
    psql(
        port,
        "insert into items (id, name) select g, 'n' || g from generate_series(1, 500) g",
    )
    .unwrap();
    let out = Command::new(pg_tool("pg_dump"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["--exclude-table", "secrets"])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dump.contains("CREATE TABLE public.items"), "{dump}");
    assert!(dump.contains("CREATE VIEW public.item_names"));
    assert!(dump.contains("CREATE FUNCTION public.double_it"));
    assert!(dump.contains("COPY public.items (id, name, payload, at) FROM stdin;"));
    assert!(dump.contains("500\tn500"));
}

/// psycopg 3 (installed by scripts/setup.sh): simple and server-side
/// prepared statements, binary parameters, a denial and a failed transaction.
#[test]
fn python_psycopg3_through_the_proxy() {
    let governed = setup();
    let port = governed.port;
    let out = Command::new("python3")
        .arg("-c")
        .arg(psycopg_session("127.0.0.1", port))
        .output()
        .unwrap();
    assert_psycopg_session(&out);
}

/// A psycopg 3 session against [`SCHEMA`] under [`POLICY`] at host:port:
/// binary prepared inserts, a denial, a function call, a denial inside a
/// transaction. [`assert_psycopg_session`] checks what it prints.
pub(crate) fn psycopg_session(host: &str, port: u16) -> String {
    format!(
        r#"
import psycopg, sys
conn = psycopg.connect("host={host} port={port} user=postgres dbname=postgres", autocommit=True)
cur = conn.cursor()
for i in range(10):
    cur.execute("insert into items (id, name, payload) values (%s, %s, %s)", (i, f"py {{i}}", bytes(range(256)) * 4), prepare=True, binary=True)
cur.execute("select count(*), sum(length(payload)) from items", binary=True)
print("rows", cur.fetchone())
try:
    cur.execute("select value from secrets where id = %s", (1,))
    print("secrets readable")
except psycopg.Error as e:
    print("denied", e.sqlstate, e.diag.message_primary)
cur.execute("select double_it(%s)", (21,), prepare=True)
print("after", cur.fetchone()[0])
conn.autocommit = False
cur.execute("insert into items (id, name) values (1000, 'tx')")
try:
    cur.execute("select * from secrets")
except psycopg.Error as e:
    print("in tx", e.sqlstate)
try:
    cur.execute("select 1")
except psycopg.Error as e:
    print("then", e.sqlstate)
conn.rollback()
cur.execute("select count(*) from items where id = 1000")
print("kept", cur.fetchone()[0])
"#
    )
}

pub(crate) fn assert_psycopg_session(out: &std::process::Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "rows (10, 10240)");
    assert!(
        lines[1].starts_with("denied 42501 tollgate: SELECT denied by rule \"protect-secrets\""),
        "{stdout}"
    );
    assert_eq!(lines[2], "after 42");
    assert_eq!(lines[3], "in tx 42501");
    assert_eq!(lines[4], "then 25P02");
    assert_eq!(lines[5], "kept 0");
}
