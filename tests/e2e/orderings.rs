//! The statement gate against message orderings (a hostile or merely
//! unusual client): the orderings real drivers use are not refused, and no
//! ordering lets a statement run other than as it was decided.

use std::process::Command;

use tollgate_tests::pg_wire::{self, RawSession};
use tollgate_tests::*;

const POLICY: &str = concat!(
    include_str!("../data/policy/allow-by-default.toml"),
    include_str!("../data/policy/mask-contact.toml"),
    include_str!("../data/policy/protect-secrets.toml"),
);

const SCHEMA: &str = "create table customers (id int primary key, name text, email text);
insert into customers values (1, 'Ada', 'ada@example.com'), (2, 'Alan', 'alan@example.com');
create table orders (id int primary key, customer_id int, total numeric);
create table secrets (id int, value text); insert into secrets values (1, 'hunter2');
create table notes (id int, body text); insert into notes values (1, 'first'), (2, 'second');";

fn setup() -> Governed {
    Governed::start(POLICY, SCHEMA, "")
}

/// psycopg ends every pipeline and every `executemany` with Sync then
/// Flush; the Flush must not count as the start of a new batch, or the
/// next masked statement is refused, and inside a transaction the refusal
/// rolls back what `executemany` wrote.
#[test]
fn a_flush_after_sync_does_not_make_the_next_masked_statement_pipelined() {
    let g = setup();
    let script = format!(
        r#"
import psycopg
conn = psycopg.connect("host=127.0.0.1 port={port} user=postgres dbname=postgres")
cur = conn.cursor()
cur.executemany("insert into orders (id, customer_id, total) values (%s, %s, %s)", [(i, 1, i) for i in range(1, 4)])
cur.execute("select id, email from customers where id = %s", (1,))
print(cur.fetchall())
conn.commit()
with conn.pipeline():
    cur.execute("insert into orders (id, customer_id, total) values (%s, %s, %s)", (10, 2, 5))
    cur.execute("insert into orders (id, customer_id, total) values (%s, %s, %s)", (11, 2, 5))
cur.execute("select id, email from customers where id = %s", (2,))
print(cur.fetchall())
conn.commit()
with conn.transaction():
    cur.executemany("insert into orders (id, customer_id, total) values (%s, %s, %s)", [(20, 1, 1), (21, 1, 1)])
    cur.execute("select email from customers where id = %s", (1,), prepare=True)
    print(cur.fetchall())
"#,
        port = g.port
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let stdout = succeeded(&out);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["[(1, '****')]", "[(2, '****')]", "[('****',)]"],
        "{stdout}"
    );
    // Every row the client committed is there.
    assert_eq!(
        g.server("select string_agg(id::text, ',' order by id) from orders"),
        "1,2,3,10,11,20,21"
    );
    assert!(
        !g.agent.log_text().contains("pipelining"),
        "{}",
        g.agent.log_text()
    );
}

/// The same on the wire: Sync then Flush, then a masked Parse, Bind,
/// Describe, Execute and Sync, in a transaction block; answered in its
/// own write and pipelined behind it in the same write.
#[test]
fn a_raw_sync_and_flush_then_a_masked_batch_is_masked_not_refused() {
    let g = setup();
    let mut s = RawSession::start(g.addr());
    assert_eq!(s.query("begin"), Ok(vec![]));
    let insert = |id: &str| {
        [
            pg_wire::parse(
                "",
                "insert into orders (id, customer_id, total) values ($1, 1, 1)",
            ),
            pg_wire::bind("", "", &[id]),
            pg_wire::execute(""),
            pg_wire::sync(),
            pg_wire::flush(),
        ]
        .concat()
    };
    let select = [
        pg_wire::parse("", "select id, email from customers where id = $1"),
        pg_wire::bind("", "", &["1"]),
        pg_wire::describe_portal(""),
        pg_wire::execute(""),
        pg_wire::sync(),
    ]
    .concat();
    // In two writes, the first answered before the second is sent.
    s.send(&insert("30"));
    let got = s.read_until_ready(1);
    assert_eq!(pg_wire::errors(&got), vec![]);
    s.send(&select);
    let got = s.read_until_ready(1);
    assert_eq!(pg_wire::errors(&got), vec![]);
    assert_eq!(pg_wire::rows(&got), ["1|****"]);
    assert_eq!(pg_wire::statuses(&got), "T");
    // In one write: the masked batch waits for the first one's answer.
    s.send(&[insert("31"), select].concat());
    let got = s.read_until_ready(2);
    assert_eq!(pg_wire::errors(&got), vec![]);
    assert_eq!(pg_wire::rows(&got), ["1|****"]);
    assert_eq!(pg_wire::statuses(&got), "TT");
    assert_eq!(s.query("commit"), Ok(vec![]));
    assert_eq!(
        g.server("select string_agg(id::text, ',' order by id) from orders"),
        "30,31"
    );
}

/// Sends one simple Query on a raw session and reads its answer.
fn raw_query(s: &mut RawSession, sql: &str) -> Vec<(u8, Vec<u8>)> {
    s.send(&pg_wire::query(sql));
    s.read_until_ready(1)
}

/// The one refusal in `got`: its message, after checking it is 42501.
fn refusal(got: &[(u8, Vec<u8>)]) -> String {
    let errors = pg_wire::errors(got);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "42501", "{errors:?}");
    errors[0].1.clone()
}

/// Why a statement run by EXECUTE under EXPLAIN or CREATE TABLE AS is
/// refused when it needs masking.
const WRAPPED: &str = "requires masking by rule \"mask-contact\" (contact details are personal data), and it runs a prepared statement whose rows would go where masking cannot see them";

/// Why an EXECUTE of a name the proxy never saw prepared is refused.
const UNKNOWN: &str = "was not prepared through the proxy in this session";

/// A statement prepared by Parse and run by a SQL EXECUTE, in every
/// spelling, is decided as the statement it runs: masked when run alone,
/// refused where its rows would escape masking; and a name the proxy never
/// saw prepared fails closed.
#[test]
fn a_sql_execute_of_a_statement_prepared_by_parse_is_decided_as_that_statement() {
    let g = setup();
    let mut s = RawSession::start(g.addr());
    s.send(
        &[
            pg_wire::parse("leak", "SELECT id, email FROM customers ORDER BY id"),
            pg_wire::sync(),
        ]
        .concat(),
    );
    assert_eq!(pg_wire::errors(&s.read_until_ready(1)), vec![]);
    let masked = ["1|****", "2|****"];

    // Alone, as a Query: the prepared statement's rows, masked.
    let got = raw_query(&mut s, "EXECUTE leak");
    assert_eq!(pg_wire::errors(&got), vec![]);
    assert_eq!(pg_wire::rows(&got), masked);
    // Among other statements of one Query.
    let got = raw_query(
        &mut s,
        "select 'x'; execute LEAK; select email from customers where id = 2",
    );
    assert_eq!(pg_wire::errors(&got), vec![]);
    assert_eq!(pg_wire::rows(&got), ["x", "1|****", "2|****", "****"]);
    // Alone, sent by Parse (as psycopg sends `EXECUTE leak`).
    s.send(
        &[
            pg_wire::parse("", "EXECUTE leak"),
            pg_wire::bind("", "", &[]),
            pg_wire::describe_portal(""),
            pg_wire::execute(""),
            pg_wire::sync(),
        ]
        .concat(),
    );
    let got = s.read_until_ready(1);
    assert_eq!(pg_wire::errors(&got), vec![]);
    assert_eq!(pg_wire::rows(&got), masked);

    // Where the rows would go elsewhere: refused, and nothing ran.
    for (sql, command) in [
        (
            "CREATE TABLE copied AS EXECUTE leak",
            "CREATE TABLE AS EXECUTE",
        ),
        ("EXPLAIN EXECUTE leak", "EXPLAIN EXECUTE"),
        ("EXPLAIN ANALYZE EXECUTE leak", "EXPLAIN ANALYZE EXECUTE"),
        (
            "EXPLAIN (ANALYZE, VERBOSE) EXECUTE leak",
            "EXPLAIN ANALYZE EXECUTE",
        ),
    ] {
        let message = refusal(&raw_query(&mut s, sql));
        assert_eq!(message, format!("tollgate: {command} {WRAPPED} (EXPLAIN, CREATE TABLE AS); run EXECUTE alone; refused"), "{sql}");
    }
    s.send(
        &[
            pg_wire::parse("", "CREATE TABLE copied AS EXECUTE leak"),
            pg_wire::bind("", "", &[]),
            pg_wire::execute(""),
            pg_wire::sync(),
        ]
        .concat(),
    );
    assert!(refusal(&s.read_until_ready(1)).contains(WRAPPED));
    assert_eq!(g.server("select to_regclass('copied') is null"), "t");

    // A name the proxy never saw prepared: refused, whether it does not
    // exist or a DO block prepared it where the proxy cannot see.
    assert!(refusal(&raw_query(&mut s, "EXECUTE nosuch")).contains(UNKNOWN));
    let got = raw_query(
        &mut s,
        "DO $$ BEGIN EXECUTE 'PREPARE hidden AS SELECT id, email FROM customers ORDER BY id'; END $$",
    );
    assert_eq!(pg_wire::errors(&got), vec![]);
    for sql in ["EXECUTE hidden", "CREATE TABLE copied AS EXECUTE hidden"] {
        let message = refusal(&raw_query(&mut s, sql));
        assert_eq!(message, format!("tollgate: EXECUTE of prepared statement \"hidden\" refused: it was not prepared through the proxy in this session (it does not exist, or a function or DO block prepared it), so what it runs cannot be decided"), "{sql}");
    }
    // Bound by the extended protocol: refused too.
    s.send(
        &[
            pg_wire::bind("", "hidden", &[]),
            pg_wire::execute(""),
            pg_wire::sync(),
        ]
        .concat(),
    );
    let got = s.read_until_ready(1);
    assert!(refusal(&got).contains("Bind of prepared statement \"hidden\" refused"));
    assert_eq!(pg_wire::rows(&got), Vec::<String>::new());
    assert_eq!(g.server("select to_regclass('copied') is null"), "t");

    // In a transaction block a refusal fails the block, as the server's
    // own error would; the session goes on.
    assert_eq!(pg_wire::statuses(&raw_query(&mut s, "BEGIN")), "T");
    let got = raw_query(&mut s, "EXECUTE hidden");
    assert!(refusal(&got).contains(UNKNOWN));
    assert_eq!(pg_wire::statuses(&got), "E");
    assert_eq!(
        raw_query(&mut s, "select 1").first().map(|m| m.0),
        Some(b'E')
    );
    assert_eq!(pg_wire::statuses(&raw_query(&mut s, "ROLLBACK")), "I");

    // A PREPARE of the name pipelined in front of the EXECUTE fails on the
    // server (the name exists), so the EXECUTE runs the masked statement:
    // both are decided, and the rows are masked.
    s.send(
        &[
            pg_wire::query("PREPARE leak AS SELECT 1, 'plain'"),
            pg_wire::query("EXECUTE leak"),
        ]
        .concat(),
    );
    let got = s.read_until_ready(2);
    let errors = pg_wire::errors(&got);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "42P05", "{errors:?}");
    assert_eq!(pg_wire::rows(&got), masked);

    assert_eq!(s.query("select 1"), Ok(vec!["1".to_owned()]));
}

/// Statements prepared with SQL PREPARE in a psql session are decided at
/// every EXECUTE under the policy of the moment: a reload that masks or
/// denies what they read masks or refuses their EXECUTEs on the same
/// connection.
#[test]
fn a_sql_execute_is_decided_under_the_policy_of_the_moment() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;

    let g = setup();
    psql(g.port, "insert into orders values (1, 1, 10)").unwrap();
    let mut child = Command::new(pg_tool("psql"))
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=0"])
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
        .args(["-p", &g.port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    writeln!(
        stdin,
        "PREPARE bodies AS SELECT id, body FROM notes ORDER BY id;\n\
         PREPARE totals AS SELECT total FROM orders;\n\
         EXECUTE bodies;\nEXECUTE totals;\n\\echo prepared"
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
    assert_eq!(before, ["1|first", "2|second", "10"]);

    let stricter = format!(
        "{POLICY}\n[[rule]]\nname = \"mask-bodies\"\naction = \"mask\"\nmask_columns = [\"notes.body\"]\n\n\
         [[rule]]\nname = \"orders-closed\"\naction = \"deny\"\nmessage = \"orders are closed\"\n[rule.match]\ntables = [\"orders\"]\n"
    );
    std::fs::write(g.policy.path(), stricter).unwrap();
    send_signal(g.agent.child.id(), libc::SIGHUP);
    g.agent
        .wait_for_log(
            |l| l["message"] == "policy reloaded",
            std::time::Duration::from_secs(10),
        )
        .unwrap();

    writeln!(
        stdin,
        "EXECUTE bodies;\n\
         EXECUTE totals;\n\
         CREATE TABLE copied AS EXECUTE bodies;\n\
         EXPLAIN ANALYZE EXECUTE totals;\n\
         BEGIN; EXECUTE totals; COMMIT;\n\
         EXECUTE bodies;\n\\echo done"
    )
    .unwrap();
    drop(stdin);
    let status = wait_timeout(&mut child, std::time::Duration::from_secs(20)).expect("psql ends");
    let mut after = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut after).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    assert_eq!(
        after.lines().collect::<Vec<_>>(),
        ["1|****", "2|****", "1|****", "2|****", "done"],
        "{stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.split_once("ERROR:  ").map(|(_, e)| e))
        .collect();
    let denied = "tollgate: EXECUTE denied by rule \"orders-closed\": orders are closed";
    assert_eq!(
        errors,
        [
            denied,
            "tollgate: CREATE TABLE AS EXECUTE requires masking by rule \"mask-bodies\", and it runs a prepared statement whose rows would go where masking cannot see them (EXPLAIN, CREATE TABLE AS); run EXECUTE alone; refused",
            "tollgate: EXPLAIN ANALYZE EXECUTE denied by rule \"orders-closed\": orders are closed",
            denied,
        ],
        "{stderr}"
    );
    // The refused statements did not run; the refused transaction was
    // rolled back by its COMMIT, as after the server's own error.
    assert_eq!(g.server("select to_regclass('copied') is null"), "t");
}

/// psycopg 3 with stock code: `prepare=True` prepares a statement by Parse,
/// and `EXECUTE` of its name through the same driver is masked or refused
/// as that statement.
#[test]
fn psycopg_execute_of_its_own_prepared_statement_is_masked() {
    let g = setup();
    let script = format!(
        r#"
import psycopg
conn = psycopg.connect("host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True)
cur = conn.cursor()
cur.execute("select id, email from customers where id = %s", (1,), prepare=True)
print(cur.fetchall())
name = conn.execute("select name from pg_prepared_statements where not from_sql and name !~ '^tollgate_mask_'").fetchone()[0]
cur.execute(f"EXECUTE {{name}}(2)")
print(cur.fetchall())
for sql in [f"CREATE TABLE copied AS EXECUTE {{name}}(1)", f"EXPLAIN ANALYZE EXECUTE {{name}}(1)"]:
    try:
        cur.execute(sql)
        print("ran", sql)
    except psycopg.errors.InsufficientPrivilege as e:
        print(e.sqlstate, "refused")
print(conn.execute("select 1").fetchone())
"#,
        port = g.port
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let stdout = succeeded(&out);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "[(1, '****')]",
            "[(2, '****')]",
            "42501 refused",
            "42501 refused",
            "(1,)"
        ],
        "{stdout}"
    );
    assert_eq!(g.server("select to_regclass('copied') is null"), "t");
}

/// The server's reading of `standard_conforming_strings` and the client
/// encoding changes with a SET it has not answered yet: text pipelined
/// behind it (a later Query of the same write, or later in the same
/// extended batch) must not be analysed under the old reading. The texts
/// below are one SELECT of a literal to a reader of standard strings and
/// UTF-8, and to the server after the SET a SELECT then a read of
/// `secrets` (denied), or `DROP TABLE orders` (text in SJIS, which the
/// analysis cannot read, refused).
#[test]
fn a_setting_changed_in_the_same_write_does_not_change_what_runs() {
    let g = setup();
    let exists = || g.server("select to_regclass('orders') is not null");
    let hidden_by_backslash = "SELECT 'a\\''; SELECT value FROM secrets; --'";
    // In SJIS, 0x81 (the last byte of 'ぁ' in UTF-8) and the backslash are
    // one character, so the E-string ends at the quote after it.
    let hidden_by_encoding = "SELECT E'ぁ\\'; DROP TABLE orders; --'";
    let mut s = RawSession::start(g.addr());
    for (set, hidden) in [
        ("SET standard_conforming_strings = off", hidden_by_backslash),
        ("SET client_encoding = 'SJIS'", hidden_by_encoding),
        (
            "SELECT set_config('standard_conforming_strings', 'off', false)",
            hidden_by_backslash,
        ),
    ] {
        // Two Queries in one write: the second waits for the answer to the
        // first, then is read as the server reads it: the read of secrets
        // it hides is denied, and SJIS text, which the analysis cannot
        // read, refused.
        s.send(&[pg_wire::query(set), pg_wire::query(hidden)].concat());
        let got = s.read_until_ready(2);
        let errors = pg_wire::errors(&got);
        assert_eq!(errors.len(), 1, "{set}: {errors:?}");
        assert_eq!(errors[0].0, "42501", "{set}: {errors:?}");
        let why = if hidden == hidden_by_encoding {
            "could not be parsed"
        } else {
            "the secrets table is off limits"
        };
        assert!(errors[0].1.contains(why), "{set}: {errors:?}");
        assert!(!got
            .iter()
            .any(|(_, body)| body.windows(7).any(|w| w == b"hunter2")));
        assert_eq!(exists(), "t", "{set}");
        assert_eq!(s.query("RESET ALL"), Ok(vec![]));
    }

    // In one extended batch: the SET runs at its Execute, and the Parse
    // behind it is refused at once; the server rolls the batch back (the
    // SET with it), and the session goes on.
    s.send(
        &[
            pg_wire::parse("", "SET standard_conforming_strings = off"),
            pg_wire::bind("", "", &[]),
            pg_wire::execute(""),
            pg_wire::parse("", "SELECT 'a\\'' || (SELECT value FROM secrets) || '--'"),
            pg_wire::bind("", "", &[]),
            pg_wire::execute(""),
            pg_wire::sync(),
        ]
        .concat(),
    );
    let got = s.read_until_ready(1);
    let message = refusal(&got);
    assert!(
        message.starts_with("tollgate: this statement was sent behind one that may change how the server reads statement text"),
        "{message}"
    );
    assert_eq!(pg_wire::statuses(&got), "I");
    assert_eq!(
        s.query("SHOW standard_conforming_strings"),
        Ok(vec!["on".to_owned()])
    );
    // The batch that changes the setting, then a Query behind its Sync in
    // the same write: the Query waits for the batch's answer.
    s.send(
        &[
            pg_wire::parse("", "SET standard_conforming_strings = off"),
            pg_wire::bind("", "", &[]),
            pg_wire::execute(""),
            pg_wire::sync(),
            pg_wire::query(hidden_by_backslash),
        ]
        .concat(),
    );
    let got = s.read_until_ready(2);
    assert!(refusal(&got).contains("the secrets table is off limits"));
    assert_eq!(exists(), "t");
    // A DO block may change anything: what follows in its batch is
    // refused too.
    s.send(
        &[
            pg_wire::parse("", "DO $$ BEGIN PERFORM 1; END $$"),
            pg_wire::bind("", "", &[]),
            pg_wire::execute(""),
            pg_wire::parse("", "SELECT 1"),
            pg_wire::sync(),
        ]
        .concat(),
    );
    assert!(refusal(&s.read_until_ready(1)).contains("sent behind one that may change"));
    assert_eq!(s.query("select 1"), Ok(vec!["1".to_owned()]));

    // psql: in one Query the server parses every statement before the SET
    // runs, as the proxy read them (one literal, no read of secrets).
    let out = psql_command(
        g.port,
        &format!("SET standard_conforming_strings = off; {hidden_by_backslash}"),
    )
    .output()
    .unwrap();
    assert_eq!(
        succeeded(&out).trim(),
        "SET\na\\'; SELECT value FROM secrets; --"
    );
    assert_eq!(exists(), "t");
    // A script: psql reads the text under the new setting as the server
    // does and sends what the literal hid as a statement of its own, which
    // the proxy (reading it the same way) decides: the literal runs, the
    // SELECT of secrets is denied.
    let mut psql = Command::new(pg_tool("psql"));
    psql.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=0", "-f", "-"])
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
        .args(["-p", &g.port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = psql.spawn().unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        b"SET standard_conforming_strings = off;\nSELECT 'a\\''; SELECT value FROM secrets; --'\nselect 'still here';\n",
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stderr.contains("ERROR:  tollgate: SELECT denied by rule \"protect-secrets\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("the secrets table is off limits"),
        "{stderr}"
    );
    assert!(!stdout.contains("hunter2"), "{stdout}");
    assert!(stdout.contains("still here"), "{stdout}");
    assert_eq!(exists(), "t");
}

/// A Sync sent during COPY FROM STDIN (as tokio-postgres sends one behind
/// the COPY's Execute) is ignored by the server: the session does not wait
/// for an answer that never comes, so a masked statement after it is
/// masked at once, not refused after a wait.
#[test]
fn a_sync_ignored_during_copy_in_leaves_the_session_in_step() {
    let g = setup();
    let mut s = RawSession::start(g.addr());
    s.send(
        &[
            pg_wire::parse("", "COPY orders (id, customer_id, total) FROM STDIN"),
            pg_wire::bind("", "", &[]),
            pg_wire::execute(""),
            pg_wire::sync(),
            pg_wire::message(b'd', b"40\t1\t2.50\n"),
            pg_wire::message(b'c', b""),
            pg_wire::sync(),
        ]
        .concat(),
    );
    let got = s.read_until_ready(1);
    assert_eq!(pg_wire::errors(&got), vec![]);
    let began = std::time::Instant::now();
    s.send(
        &[
            pg_wire::parse("", "select id, email from customers where id = $1"),
            pg_wire::bind("", "", &["2"]),
            pg_wire::describe_portal(""),
            pg_wire::execute(""),
            pg_wire::sync(),
        ]
        .concat(),
    );
    let got = s.read_until_ready(1);
    assert_eq!(pg_wire::errors(&got), vec![]);
    assert_eq!(pg_wire::rows(&got), ["2|****"]);
    assert!(
        began.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(g.server("select count(*) from orders where id = 40"), "1");
}

/// A Parse of a name that exists fails on the server; a Bind of that name
/// pipelined behind it in a later batch binds the statement that was there
/// and is decided as that one (here refused after a reload), not as the
/// failed Parse's text.
#[test]
fn a_bind_behind_an_unanswered_parse_of_an_existing_name_binds_the_old_statement() {
    const DENY_ONLY: &str = "[[rule]]\nname = \"protect-secrets\"\naction = \"deny\"\n[rule.match]\ntables = [\"secrets\"]\n";
    let g = Governed::start(DENY_ONLY, SCHEMA, "");
    let mut s = RawSession::start(g.addr());
    s.send(
        &[
            pg_wire::parse("totals", "SELECT total FROM orders"),
            pg_wire::sync(),
        ]
        .concat(),
    );
    assert_eq!(pg_wire::errors(&s.read_until_ready(1)), vec![]);
    std::fs::write(
        g.policy.path(),
        format!("{DENY_ONLY}\n[[rule]]\nname = \"orders-closed\"\naction = \"deny\"\nmessage = \"orders are closed\"\n[rule.match]\ntables = [\"orders\"]\n"),
    )
    .unwrap();
    send_signal(g.agent.child.id(), libc::SIGHUP);
    g.agent
        .wait_for_log(
            |l| l["message"] == "policy reloaded",
            std::time::Duration::from_secs(10),
        )
        .unwrap();
    s.send(
        &[
            pg_wire::parse("totals", "SELECT 1"),
            pg_wire::sync(),
            pg_wire::bind("", "totals", &[]),
            pg_wire::execute(""),
            pg_wire::sync(),
        ]
        .concat(),
    );
    let got = s.read_until_ready(2);
    let errors = pg_wire::errors(&got);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0].0, "42P05", "{errors:?}");
    assert_eq!(
        errors[1],
        (
            "42501".to_owned(),
            "tollgate: SELECT denied by rule \"orders-closed\": orders are closed".to_owned()
        )
    );
    assert_eq!(s.query("select 1"), Ok(vec!["1".to_owned()]));
}

/// asyncpg speaks only the extended protocol, prepares every statement and
/// pipelines `executemany` (many Bind/Execute pairs, one Sync): inside a
/// transaction its writes commit, a masked select comes back masked, and a
/// denied read fails with the rule's message while the connection and the
/// transaction go on as the server would leave them.
#[test]
fn asyncpg_executemany_masked_fetch_and_a_denial() {
    let g = setup();
    let script = format!(
        r#"
import asyncio, asyncpg
async def main():
    conn = await asyncpg.connect(host="127.0.0.1", port={port}, user="postgres", database="postgres")
    async with conn.transaction():
        await conn.executemany("insert into orders (id, customer_id, total) values ($1, $2, $3)", [(i, 1, i) for i in range(1, 6)])
        rows = await conn.fetch("select id, email from customers where id = $1", 1)
        print([tuple(r) for r in rows])
    try:
        await conn.fetch("select value from secrets where id = $1", 1)
        print("secrets read")
    except asyncpg.PostgresError as e:
        print("refused", e.sqlstate, e)
    print(await conn.fetchval("select count(*) from orders"))
    await conn.close()
asyncio.run(main())
"#,
        port = g.port
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let stdout = succeeded(&out);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"[(1, '****')]"), "{stdout}");
    assert!(
        lines
            .get(1)
            .is_some_and(|l| l.starts_with("refused 42501")
                && l.contains("denied by rule \"protect-secrets\"")),
        "{stdout}"
    );
    assert_eq!(lines.get(2), Some(&"5"), "{stdout}");
    assert!(!stdout.contains("hunter2") && !stdout.contains("@example.com"));
    assert_eq!(
        g.server("select string_agg(id::text, ',' order by id) from orders"),
        "1,2,3,4,5"
    );
}
