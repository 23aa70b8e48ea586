//! The PostgreSQL handler: statements decided by a policy, with the exact
//! outcome real clients (psql, pgbench) see, and hostile input.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tollgate_tests::pg_wire::{cancel_request, send_and_read_to_close, startup_packet, RawSession};
use tollgate_tests::*;

const POLICY: &str = concat!(
    include_str!("../data/policy/allow-by-default.toml"),
    include_str!("../data/policy/protect-secrets.toml"),
    r#"
[[rule]]
name = "no-ddl-in-ci"
action = "deny"
message = "schema changes go through the migration pipeline"
[rule.match]
kinds = ["drop"]

[[rule]]
name = "fastpath-int4pl"
action = "allow"
[rule.match]
flags = ["unparsable"]
text_regex = ["^FunctionCall oid 177$"]
"#
);

const DROP_DENIED: &str = "ERROR:  tollgate: DROP TABLE denied by rule \"no-ddl-in-ci\": schema changes go through the migration pipeline";
const SECRETS_DENIED: &str = "denied by rule \"protect-secrets\": the secrets table is off limits";

/// A server with tables `t` and `secrets`, and an agent enforcing
/// [`POLICY`] in front of it.
fn fixture() -> Governed {
    Governed::start(
        POLICY,
        "create table t(x int); create table secrets(s text); insert into secrets values ('k')",
        "",
    )
}

/// psql through the agent without stopping on errors, with `-c` for each
/// command and `stdin` as its input.
fn psql_go_on(port: u16, commands: &[&str], stdin: &str) -> Output {
    let mut cmd = Command::new(pg_tool("psql"));
    cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=0"])
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
        .args(["-p", &port.to_string()])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for c in commands {
        cmd.args(["-c", c]);
    }
    if commands.is_empty() {
        cmd.args(["-f", "-"]);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// psql with `client_encoding` set to `encoding`, running `sql` given as
/// raw bytes (psql sends its input unconverted, in the client encoding).
fn psql_encoded(port: u16, encoding: &str, sql: &[u8]) -> Output {
    use std::os::unix::ffi::OsStrExt;
    Command::new(pg_tool("psql"))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
        .args(["-p", &port.to_string(), "-c"])
        .arg(std::ffi::OsStr::from_bytes(sql))
        .env("PGCLIENTENCODING", encoding)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap()
}

#[test]
fn latin1_text_is_converted_and_other_encodings_fail_closed() {
    let f = fixture();
    f.server("create table \"café\"(x int); insert into \"café\" values (7)");

    // LATIN1: é is the single byte 0xE9. The statement is analysed as the
    // server reads it, so it runs, and its results come back in LATIN1.
    let out = psql_encoded(
        f.port,
        "LATIN1",
        b"select x, 'd\xe9j\xe0 vu' from \"caf\xe9\"",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"7|d\xe9j\xe0 vu\n");
    // A rule naming a table is applied to non-ASCII text, not bypassed by
    // it and not replaced by the unparsable default.
    let out = psql_encoded(
        f.port,
        "LATIN1",
        b"select s from secrets where s <> 'caf\xe9'",
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        text(&out.stderr).trim(),
        format!("ERROR:  tollgate: SELECT {SECRETS_DENIED}")
    );

    // Another single-byte encoding whose bytes the analysis does not map:
    // ASCII text runs, non-ASCII text is refused as unparsable.
    let out = psql_encoded(f.port, "WIN1252", b"select 'plain ascii'");
    assert_eq!(text(&out.stdout), "plain ascii\n", "{out:?}");
    let out = psql_encoded(f.port, "WIN1252", b"select 'd\xe9j\xe0 vu'");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("ERROR:  tollgate: statement denied"),
        "{stderr}"
    );
    assert!(
        f.agent
            .log_text()
            .contains("client_encoding is neither UTF8 nor LATIN1 and the text is not ASCII"),
        "the log names the reason"
    );
}

#[test]
fn simple_query_denials_keep_the_session_and_the_transaction_consistent() {
    let f = fixture();

    assert_eq!(
        psql(f.port, "select count(*) from secrets where false").ok(),
        None,
        "secrets is protected"
    );
    assert_eq!(psql(f.port, "select 40 + 2").unwrap(), "42");

    // A denied DROP: psql prints the rule's message and exits 1; nothing ran.
    let out = psql_command(f.port, "drop table t").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().next(), Some(DROP_DENIED), "{stderr}");
    assert_eq!(f.server("select to_regclass('t') is not null"), "t");

    // The session goes on after a denial.
    let out = psql_go_on(f.port, &["drop table t", "select 'after the denial'"], "");
    assert!(text(&out.stderr).contains(DROP_DENIED), "{out:?}");
    assert_eq!(text(&out.stdout).trim(), "after the denial", "{out:?}");

    // Several statements in one Query: none runs when one is denied.
    let out = psql_command(f.port, "insert into t values (1); drop table t")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains(DROP_DENIED), "{out:?}");
    assert_eq!(f.server("select count(*) from t"), "0");

    // Inside a transaction block the server's transaction fails too: the
    // next statement gets 25P02 and COMMIT answers ROLLBACK.
    let script = "begin;\ninsert into t values (1);\ndrop table t;\nselect 'not run';\ncommit;\nselect 'after';\n";
    let out = psql_go_on(f.port, &[], script);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 2, "{stderr}");
    assert!(errors[0].ends_with(&DROP_DENIED[7..]), "{stderr}");
    assert!(
        errors[1].contains("ERROR:  current transaction is aborted, commands ignored until end of transaction block"),
        "{stderr}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        ["BEGIN", "INSERT 0 1", "ROLLBACK", "after"],
        "{stdout}"
    );
    assert_eq!(f.server("select count(*) from t"), "0");

    // A table rule, and an allowed write.
    let out = psql_command(f.port, "select * from secrets")
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains(&format!("ERROR:  tollgate: SELECT {SECRETS_DENIED}")),
        "{out:?}"
    );
    assert_eq!(
        psql(f.port, "insert into t values (7); select count(*) from t").unwrap(),
        "INSERT 0 1\n1"
    );

    // Every decision is in the log, with the rule.
    let denied = f.agent.wait_for_statement("deny", "rule", "no-ddl-in-ci");
    assert_eq!(denied["command"], "DROP TABLE", "{denied}");
    assert_eq!(denied["level"], "WARN", "{denied}");
    let allowed = f
        .agent
        .wait_for_log(|l| l["statement_action"] == "allow", Duration::from_secs(5))
        .unwrap();
    assert_eq!(allowed["level"], "INFO", "{allowed}");
    f.agent
        .wait_for_log(
            |l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("start-up: "))
                    && l["db_user"] == "postgres"
            },
            Duration::from_secs(5),
        )
        .unwrap();
}

#[test]
fn copy_in_is_allowed_and_a_denied_copy_out_sends_nothing() {
    let f = fixture();
    let out = psql_go_on(
        f.port,
        &[],
        "\\copy t from stdin\n1\n2\n3\n\\.\nselect sum(x) from t;\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("COPY 3"), "{out:?}");
    assert_eq!(f.server("select sum(x) from t"), "6");

    let out = psql_command(f.port, "copy secrets to stdout")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!("ERROR:  tollgate: COPY {SECRETS_DENIED}")),
        "{out:?}"
    );
    assert_eq!(text(&out.stdout), "");

    // A large COPY streams through (rows bigger than the read buffers).
    let big = "x".repeat(200_000);
    let out = psql_go_on(
        f.port,
        &[],
        &format!("create table wide(s text);\n\\copy wide from stdin\n{big}\n{big}\n\\.\nselect sum(length(s)) from wide;\n"),
    );
    assert!(text(&out.stdout).contains("400000"), "{out:?}");
}

fn pgbench(port: u16, args: &[&str]) -> Output {
    Command::new(pg_tool("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-n",
        ])
        .args(args)
        .arg("postgres")
        .output()
        .unwrap()
}

fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

#[test]
fn extended_protocol_runs_and_denials_fail_in_place() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let ok = script(
        dir.path(),
        "ok.sql",
        "\\set v random(1, 100)\nselect :v + 1;\nselect count(*) from t;\n",
    );
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(f.port, &["-c", "2", "-t", "25", "-M", mode, "-f", &ok]);
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{mode}: {all}");
        assert!(
            all.contains("number of transactions actually processed: 50/50"),
            "{mode}: {all}"
        );
        assert!(
            all.contains("number of failed transactions: 0"),
            "{mode}: {all}"
        );
    }

    let denied = script(dir.path(), "denied.sql", "select * from secrets;\n");
    for mode in ["extended", "prepared"] {
        let out = pgbench(f.port, &["-c", "1", "-t", "1", "-M", mode, "-f", &denied]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{mode}: {stderr}");
        assert!(
            stderr.contains(&format!("ERROR:  tollgate: SELECT {SECRETS_DENIED}")),
            "{mode}: {stderr}"
        );
    }

    // A write pipelined before a denied statement in the same batch is
    // rolled back with it: the server failed at the refused Parse.
    let pipelined = script(
        dir.path(),
        "pipeline.sql",
        "\\startpipeline\ninsert into t values (42);\nselect * from secrets;\n\\endpipeline\n",
    );
    let out = pgbench(
        f.port,
        &["-c", "1", "-t", "1", "-M", "extended", "-f", &pipelined],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(SECRETS_DENIED), "{stderr}");
    assert_eq!(f.server("select count(*) from t where x = 42"), "0");

    // The session handler stayed in place: the agent is alive and serves.
    assert_eq!(psql(f.port, "select 'still here'").unwrap(), "still here");
}

/// Starts a session (trust authentication), waits for ReadyForQuery, then
/// sends `garbage` and reads until the agent closes the connection.
fn after_startup(port: u16, garbage: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // A guard against a hang, not a measure: under the whole suite on two
    // cores a start-up once took over 5 s to be answered.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&startup_packet()).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !got.ends_with(b"Z\0\0\0\x05I") {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed during start-up: {got:?}");
        got.extend_from_slice(&chunk[..n]);
    }
    s.write_all(garbage).unwrap();
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the agent did not close the connection: {e}, got {got:?}"),
        }
    }
    got
}

/// The FATAL ErrorResponse at the end of `got`: (SQLSTATE, message).
fn fatal_of(got: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(got);
    let start = text
        .rfind("SFATAL")
        .unwrap_or_else(|| panic!("no FATAL error in {got:?}"));
    let fields: Vec<&str> = text[start..].split('\0').collect();
    let get = |c: char| {
        fields
            .iter()
            .find_map(|f| f.strip_prefix(c))
            .unwrap_or_default()
            .to_string()
    };
    (get('C'), get('M'))
}

#[test]
fn hostile_input_closes_only_its_own_session() {
    let f = fixture();
    let port = f.port;
    // A session that stays open through all of it.
    let long = psql_command(port, "select pg_sleep(3), 'survived'")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();

    // Start-up lengths 2^31-1 and 3.
    let mut huge = i32::MAX.to_be_bytes().to_vec();
    huge.extend_from_slice(&[0, 3, 0, 0]);
    let (code, message) = fatal_of(&send_and_read_to_close(f.addr(), &huge, false));
    assert_eq!(code, "08P01");
    assert_eq!(message, "tollgate: invalid start-up packet: start-up packet length 2147483647 exceeds the 10000-byte limit");
    let (code, message) = fatal_of(&send_and_read_to_close(
        f.addr(),
        &[0, 0, 0, 3, 1, 2, 3, 4],
        false,
    ));
    assert_eq!(code, "08P01");
    assert!(
        message.contains("length 3 is below the minimum of 8"),
        "{message}"
    );

    // A truncated start-up packet, then the client leaves.
    let got = send_and_read_to_close(f.addr(), &startup_packet()[..12], true);
    assert!(got.is_empty(), "{got:?}");

    // Unencrypted bytes right after an SSLRequest (CVE-2021-23214).
    let mut injected = vec![0, 0, 0, 8, 4, 210, 22, 47];
    injected.extend_from_slice(&startup_packet());
    let (code, message) = fatal_of(&send_and_read_to_close(f.addr(), &injected, false));
    assert_eq!(code, "08P01");
    assert!(message.contains("CVE-2021-23214"), "{message}");

    // After start-up: garbage, a typed message of length 3, an oversized
    // Sync, an unknown type, and a Query too large to analyse.
    let cases: [(&[u8], &str, &str); 5] = [
        (
            b"\x01\x02\x03garbage",
            "08P01",
            "unknown message type (not printable) (0x01)",
        ),
        (
            b"Q\0\0\0\x03",
            "08P01",
            "message length 3 is below the minimum of 4",
        ),
        (
            b"S\x00\x10\x00\x00",
            "08P01",
            "exceeds the 10000-byte limit",
        ),
        (b"y\0\0\0\x04", "08P01", "unknown message type 'y' (0x79)"),
        (b"Q\x02\0\0\0", "54000", "exceeds the 16777216-byte limit"),
    ];
    for (garbage, want_code, want) in cases {
        let got = after_startup(port, garbage);
        assert_eq!(
            got.first(),
            Some(&b'R'),
            "authentication answered first: {got:?}"
        );
        let (code, message) = fatal_of(&got);
        assert_eq!(code, want_code, "{message}");
        assert!(message.contains(want), "{garbage:?}: {message}");
    }

    // Each was logged; nobody else was affected; the agent lives.
    let log = f.agent.log_text();
    assert!(log.matches("closing the session").count() >= 8, "{log}");
    assert!(log.contains("during start-up after 12 bytes"), "{log}");
    assert_eq!(psql(port, "select 'others fine'").unwrap(), "others fine");
    let out = long.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("survived"));
    let mut agent = f.agent;
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent is running"
    );
    assert!(!agent.log_text().contains("panicked"));
}

#[test]
fn sslmodes_replication_and_an_unreachable_upstream() {
    let f = fixture();
    let conn = |extra: &str| {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres {extra}",
            f.port
        )
    };
    let run = |conninfo: String| {
        Command::new(pg_tool("psql"))
            .args(["-X", "-A", "-t", "-c", "select 'plaintext'", &conninfo])
            .output()
            .unwrap()
    };
    let out = run(conn("sslmode=prefer"));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout).trim(), "plaintext");
    let out = run(conn("sslmode=require"));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("server does not support SSL"),
        "{out:?}"
    );

    let out = run(conn("replication=database"));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("FATAL:  tollgate: replication connections are not allowed"),
        "{out:?}"
    );

    // Ctrl-C: psql's CancelRequest reaches the server through the agent.
    let sleeper = psql_command(f.port, "select pg_sleep(30)")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    f.agent
        .wait_for_log(
            |l| {
                l["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("pg_sleep(30)"))
            },
            Duration::from_secs(5),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let began = Instant::now();
    send_signal(sleeper.id(), libc::SIGINT);
    let out = sleeper.wait_with_output().unwrap();
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    assert!(
        text(&out.stderr).contains("ERROR:  canceling statement due to user request"),
        "{out:?}"
    );
    f.agent
        .wait_for_log(
            |l| l["message"] == "forwarding a CancelRequest upstream",
            Duration::from_secs(5),
        )
        .unwrap();

    // An unreachable upstream: psql hears why, promptly.
    let closed = free_port();
    let port = free_port();
    let _agent = Agent::start(&listener_config(port, closed, ""));
    let began = Instant::now();
    let out = psql_command(port, "select 1").output().unwrap();
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("FATAL:  tollgate: cannot reach the upstream of target \"pg\": connecting to 127.0.0.1:"),
        "{stderr}"
    );
    assert!(stderr.contains("Connection refused"), "{stderr}");
}

/// FunctionCall carries no SQL: it is decided as the unparsable text
/// `FunctionCall oid N`, so only a rule naming the oid allows it, and a
/// refusal fails in place like a refused Query.
#[test]
fn function_calls_are_decided_by_their_oid() {
    let f = fixture();
    let mut session = RawSession::start(f.addr());
    // int4pl(2, 3), allowed by the rule naming its oid.
    assert_eq!(
        session.function_call(177, &["2", "3"]),
        Ok(Some("5".to_string()))
    );
    // now() (oid 1299): unparsable, refused by the default.
    let (code, message) = session.function_call(1299, &[]).unwrap_err();
    assert_eq!(code, "42501", "{message}");
    assert!(message.starts_with("tollgate: "), "{message}");
    // The session goes on, outside any transaction.
    assert_eq!(
        session.query("select 'after'"),
        Ok(vec!["after".to_string()])
    );
    assert_eq!(
        session.function_call(177, &["40", "2"]),
        Ok(Some("42".to_string()))
    );
    let refused = f
        .agent
        .log_lines()
        .iter()
        .filter(|l| l["text"] == "FunctionCall oid 1299")
        .count();
    assert_eq!(refused, 1, "{}", f.agent.log_text());
}

#[test]
fn cancel_keys_are_the_proxys_own_and_only_they_cancel() {
    let f = fixture();
    let mut session = RawSession::start(f.addr());
    let (pid, secret) = session.key.clone();
    let backend_pid: i32 = session.query("select pg_backend_pid()").unwrap()[0]
        .parse()
        .unwrap();
    assert_ne!(
        pid, backend_pid,
        "the client sees the proxy's key, not the server's"
    );
    assert_eq!(secret.len(), 4, "the server's secret length is kept");

    // A forged key (random pid, or the right pid with a wrong secret)
    // cancels nothing: the query runs to its end.
    session.send_query("select pg_sleep(1.5), 'slept'");
    std::thread::sleep(Duration::from_millis(300));
    cancel_request(f.addr(), pid ^ 0x5a5a_5a5a, &[1, 2, 3, 4]);
    cancel_request(f.addr(), backend_pid, &secret);
    let mut wrong = secret.clone();
    wrong[0] ^= 0xff;
    cancel_request(f.addr(), pid, &wrong);
    assert_eq!(session.results(), Ok(vec![String::new()]));

    // The key the client was given cancels its query.
    session.send_query("select pg_sleep(30)");
    std::thread::sleep(Duration::from_millis(300));
    let began = Instant::now();
    cancel_request(f.addr(), pid, &secret);
    assert_eq!(session.results(), Err("57014".to_string()));
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );

    // Once the session ended its key is forgotten: another session's query
    // is not hit by it.
    drop(session);
    std::thread::sleep(Duration::from_millis(300));
    let mut other = RawSession::start(f.addr());
    other.send_query("select pg_sleep(1), 'done'");
    std::thread::sleep(Duration::from_millis(200));
    cancel_request(f.addr(), pid, &secret);
    assert_eq!(other.results(), Ok(vec![String::new()]));
}
