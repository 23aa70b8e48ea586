//! Statements held for human review in real psql sessions, decided by a
//! reviewer through `tollgate approvals` as another user: the notice, the
//! rows after an approval, the 42501 after a denial or expiry, an edit,
//! self-approval refused, N of M, grants, a client that goes away, the
//! extended protocol and transactions, and the recording of it all.
//!
//! The requesting psql runs in a cgroup of its own (a CI job's, as far as
//! segregation of duties is concerned): a reviewer inside the requester's
//! cgroup is the requester.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tollgate_tests::review::{approvals_as, id_of, ok, pending_from, spawn_in_cgroup};
use tollgate_tests::{agent_binary, cgroup_mount, pg_tool, Governed, RemovedOnDrop};

/// `daemon` (uid 1, group daemon) and `bin` (uid 2, group bin) review;
/// `nobody` does not.
const POLICY: &str = r#"
[[rule]]
name = "review-deletes"
action = "review"
approvers = ["group:daemon", "group:bin"]
grant = "1h"
timeout = "10s"
message = "deletes in production need a second pair of eyes"
[rule.match]
kinds = ["delete"]

[[rule]]
name = "two-for-truncate"
action = "review"
approvers = ["group:daemon", "group:bin"]
approvals = 2
[rule.match]
kinds = ["truncate"]

[[rule]]
name = "no-drop"
action = "deny"
[rule.match]
kinds = ["drop"]

[[rule]]
name = "mask-emails"
action = "mask"
mask_columns = "customers.email"
"#;

const SCHEMA: &str = "CREATE TABLE orders (id int primary key, note text); \
    INSERT INTO orders SELECT g, 'n' || g FROM generate_series(1, 20) g; \
    CREATE TABLE customers (id int primary key, email text); \
    INSERT INTO customers VALUES (1, 'ada@example.com'), (2, 'grace@example.com');";

struct Review {
    g: Governed,
    socket: PathBuf,
    /// The requesters' cgroup, removed at the end.
    cgroup: RemovedOnDrop,
}

impl Review {
    fn start() -> Review {
        let g = Governed::start(POLICY, SCHEMA, "");
        // The agent's directory is private; reviewers must reach the socket.
        std::fs::set_permissions(g.agent.dir.path(), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let socket = g.agent.dir.path().join("approvals.sock");
        let cgroup = cgroup_mount().join(format!("tollgate-review-test-{}", g.port));
        std::fs::create_dir_all(&cgroup).unwrap();
        Review {
            g,
            socket,
            cgroup: RemovedOnDrop(vec![cgroup]),
        }
    }

    fn requester_cgroup(&self) -> &Path {
        &self.cgroup.0[0]
    }

    /// psql running `sql` through the agent, in the requesters' cgroup.
    fn spawn_psql(&self, sql: &str, extra: &[&str]) -> Child {
        let mut args = vec![
            "-X".to_owned(),
            "-A".to_owned(),
            "-t".to_owned(),
            "-v".to_owned(),
            "ON_ERROR_STOP=1".to_owned(),
            "-h".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            self.g.port.to_string(),
            "-U".to_owned(),
            "postgres".to_owned(),
            "-d".to_owned(),
            "postgres".to_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.push("-c".to_owned());
        args.push(sql.to_owned());
        self.spawn_in_cgroup(&pg_tool("psql"), &args)
    }

    fn spawn_in_cgroup(&self, program: &Path, args: &[String]) -> Child {
        spawn_in_cgroup(self.requester_cgroup(), program, args)
    }

    /// `tollgate approvals ARGS` as `user`.
    fn approvals(&self, user: &str, args: &[&str]) -> Output {
        approvals_as(&self.socket, user, args)
    }

    /// Waits until a request is pending; what `child` said if none comes.
    fn pending_from(&self, child: &mut Child) -> Vec<Value> {
        pending_from(&self.socket, child)
    }

    /// Waits until `n` requests are pending; their views, oldest first.
    fn pending(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = self.approvals("daemon", &["list", "--json"]);
            let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if let Some(items) = list.as_array().filter(|a| a.len() >= n) {
                return items.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{n} requests never became pending: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn count(&self) -> String {
        self.g
            .server("SELECT count(*) FROM orders")
            .trim()
            .to_owned()
    }
}

fn finish(child: Child) -> (bool, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The session that held `request`, as the reviewer API shows it.
fn session_of(r: &Review, request: &str) -> String {
    let shown = ok(&r.approvals("daemon", &["show", request, "--json"]));
    let view: Value = serde_json::from_str(&shown).unwrap();
    view["context"]["session"].as_str().unwrap().to_owned()
}

/// The recording events of the session that held `request`, as
/// `recordings export --format jsonl` gives them once the session closed.
fn recorded_review(r: &Review, request: &str) -> Vec<Value> {
    recorded_session(r, &session_of(r, request))
}

/// The recording events of `session`, once it closed.
fn recorded_session(r: &Review, session: &str) -> Vec<Value> {
    tollgate_tests::review::recorded_session(&r.g.agent, session)
}

#[test]
fn a_held_delete_runs_once_another_user_approves_it_and_the_recording_says_who() {
    let r = Review::start();
    let psql = r.spawn_psql("DELETE FROM orders WHERE id = 1 RETURNING id", &[]);
    let pending = r.pending(1);
    let view = &pending[0];
    let id = id_of(view);
    assert_eq!(
        view["context"]["statement"],
        "DELETE FROM orders WHERE id = 1 RETURNING id"
    );
    assert_eq!(view["context"]["rule"], "review-deletes");
    assert_eq!(view["context"]["database_user"], "postgres");
    // Still held: the server has not seen it.
    assert_eq!(r.count(), "20");

    // The requester's own uid cannot approve (root sent it).
    let out = r.approvals("root", &["approve", &id, "--reason", "mine"]);
    assert!(!out.status.success());
    // A non-reviewer cannot either.
    let out = r.approvals("nobody", &["approve", &id, "--reason", "x"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTP 403"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(&r.approvals("daemon", &["approve", &id, "--reason", "ticket OPS-1"]));

    let (success, stdout, stderr) = finish(psql);
    assert!(success, "{stderr}");
    assert_eq!(stdout.lines().next(), Some("1"), "{stdout}");
    assert!(
        stderr.contains(&format!(
            "NOTICE:  tollgate: statement held for review (request {id}), waiting up to 10s; approve with: tollgate approvals approve {id}"
        )),
        "{stderr}"
    );
    assert_eq!(r.count(), "19");

    let events = recorded_review(&r, &id);
    let requested = events
        .iter()
        .find(|e| e["type"] == "review_requested")
        .expect("review_requested recorded");
    assert_eq!(requested["rule"], "review-deletes");
    assert_eq!(requested["approvals_needed"], 1);
    let ended = events
        .iter()
        .find(|e| e["type"] == "review_ended")
        .expect("review_ended recorded");
    assert_eq!(ended["outcome"], "approved");
    assert_eq!(ended["approvals"][0]["by"], "daemon");
    assert_eq!(ended["approvals"][0]["reason"], "ticket OPS-1");
    let statement = events
        .iter()
        .find(|e| e["type"] == "statement" && e["command"] == "DELETE")
        .expect("the statement recorded");
    assert_eq!(statement["action"], "review");
    assert_eq!(statement["refused"], false);
    // In order: held, approved, then decided.
    let at = |t: &str| events.iter().position(|e| e["type"] == t).unwrap();
    assert!(at("review_requested") < at("review_ended"));
    assert!(at("review_ended") < at("statement"));

    // The transcript tells it too.
    let session = session_of(&r, &id);
    let out = r.g.agent.cli(&["recordings", "show", &session]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(&format!("request {id} approved by daemon")),
        "{shown}"
    );
}

#[test]
fn reviewers_see_masked_literals_hidden_and_the_session_so_far_and_the_statement_runs_as_sent() {
    let r = Review::start();
    let psql = r.spawn_psql(
        "DELETE FROM customers WHERE email = 'grace@example.com'",
        &[
            "-c",
            "SELECT count(*) FROM customers WHERE email = 'ada@example.com'",
        ],
    );
    let view = &r.pending(1)[0];
    let id = id_of(view);
    let context = &view["context"];
    assert_eq!(
        context["statement"],
        "DELETE FROM customers WHERE email = '***'"
    );
    assert_eq!(view["text"], "DELETE FROM customers WHERE email = '***'");
    assert_eq!(context["hidden_literals"], 1);
    let prior = context["session_so_far"].as_array().unwrap();
    let last = prior.last().expect("the SELECT before it");
    assert_eq!(
        last["statement"],
        "SELECT count(*) FROM customers WHERE email = '***'"
    );
    assert_eq!(last["action"], "mask");
    // Nowhere in what a reviewer can read: the list, the view, the text.
    let listed = ok(&r.approvals("daemon", &["list", "--json"]));
    let shown = ok(&r.approvals("daemon", &["show", &id]));
    let json = ok(&r.approvals("daemon", &["show", &id, "--json"]));
    for text in [&listed, &shown, &json] {
        assert!(!text.contains("@example.com"), "{text}");
    }
    assert!(shown.contains("session so far 1 statement(s)"), "{shown}");
    assert!(shown.contains("hidden         1 literal(s)"), "{shown}");

    let approved = ok(&r.approvals("bin", &["approve", &id, "--json"]));
    assert!(!approved.contains("@example.com"), "{approved}");
    let (success, stdout, stderr) = finish(psql);
    assert!(success, "{stderr}");
    assert!(stdout.contains("DELETE 1"), "{stdout}");
    // The statement as sent ran: Grace's row is gone, Ada's is not.
    assert_eq!(
        r.g.server("SELECT string_agg(email, ',') FROM customers")
            .trim(),
        "ada@example.com"
    );
}

#[test]
fn a_denial_fails_the_statement_with_42501_and_aborts_the_open_transaction() {
    let r = Review::start();
    // Inside a transaction: the denial fails it like a server error, so
    // the insert before it is rolled back and COMMIT answers ROLLBACK.
    let psql = r.spawn_psql_script(
        "\\set ON_ERROR_STOP 0\n\\set VERBOSITY verbose\nBEGIN;\nINSERT INTO orders VALUES (100, 'x');\nDELETE FROM orders WHERE id = 2;\nCOMMIT;\n",
    );
    let id = id_of(&r.pending(1)[0]);
    ok(&r.approvals("bin", &["deny", &id, "--reason", "use the archive job"]));
    let (_, stdout, stderr) = finish(psql);
    assert!(
        stderr.contains(
            "ERROR:  42501: tollgate: statement denied by reviewer bin: use the archive job"
        ),
        "{stderr}"
    );
    assert!(
        stdout.contains("ROLLBACK"),
        "COMMIT answers ROLLBACK: {stdout}{stderr}"
    );
    assert_eq!(r.count(), "20", "the delete did not run");
    assert_eq!(
        r.g.server("SELECT count(*) FROM orders WHERE id = 100")
            .trim(),
        "0",
        "the insert before it was rolled back"
    );
    let ended: Vec<Value> = recorded_review(&r, &id)
        .into_iter()
        .filter(|e| e["type"] == "review_ended")
        .collect();
    assert_eq!(ended[0]["outcome"], "denied");
    assert_eq!(ended[0]["denied_by"], "bin");
    assert_eq!(ended[0]["denied_via"], format!("unix:{}", uid_of("bin")));
    assert_eq!(ended[0]["reason"], "use the archive job");
}

fn uid_of(user: &str) -> String {
    let out = Command::new("id").args(["-u", user]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Where `kind` is in `events`.
fn position_of(events: &[Value], kind: &str) -> usize {
    events
        .iter()
        .position(|e| e["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {events:?}"))
}

#[test]
fn an_unanswered_request_expires_and_a_client_that_leaves_or_cancels_ends_its_request() {
    let r = Review::start();
    let start = Instant::now();
    let psql = r.spawn_psql("DELETE FROM orders WHERE id = 3", &[]);
    let (success, _, stderr) = finish(psql);
    assert!(!success);
    assert!(
        stderr.contains("tollgate: statement not approved within 10s; the review request expired"),
        "{stderr}"
    );
    assert!(
        start.elapsed() >= Duration::from_secs(9),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(r.count(), "20");

    // A client killed while it waits: its request is cancelled at once.
    let mut psql = r.spawn_psql("DELETE FROM orders WHERE id = 4", &[]);
    let id = id_of(&r.pending(1)[0]);
    psql.kill().unwrap();
    psql.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let shown = ok(&r.approvals("daemon", &["show", &id, "--json"]));
        let view: Value = serde_json::from_str(&shown).unwrap();
        if view["outcome"]["outcome"] == "cancelled" {
            break;
        }
        assert!(Instant::now() < deadline, "not cancelled: {shown}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = r.approvals("daemon", &["approve", &id]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 409"));
    assert_eq!(r.count(), "20");

    // psql's Ctrl-C sends a CancelRequest: the held statement is cancelled
    // as the server cancels a running one.
    let mut psql = r.spawn_psql(
        "DELETE FROM orders WHERE id = 5",
        &["-v", "VERBOSITY=verbose"],
    );
    let id = id_of(&r.pending_from(&mut psql)[0]);
    tollgate_tests::send_signal(psql.id(), libc::SIGINT);
    let (success, _, stderr) = finish(psql);
    assert!(!success);
    assert!(
        stderr.contains("ERROR:  57014: canceling statement due to user request"),
        "{stderr}"
    );
    let shown = ok(&r.approvals("daemon", &["show", &id, "--json"]));
    let view: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(view["outcome"]["outcome"], "cancelled", "{shown}");
    assert_eq!(r.count(), "20");
}

#[test]
fn an_edit_runs_in_place_of_the_held_text_and_is_decided_again() {
    let r = Review::start();
    // The reviewer narrows the delete: the edit runs instead.
    let psql = r.spawn_psql("DELETE FROM orders WHERE id > 10 RETURNING id", &[]);
    let id = id_of(&r.pending(1)[0]);
    ok(&r.approvals(
        "daemon",
        &[
            "approve",
            &id,
            "--edit",
            "DELETE FROM orders WHERE id = 11 RETURNING id",
            "--reason",
            "one at a time",
        ],
    ));
    let (success, stdout, stderr) = finish(psql);
    assert!(success, "{stderr}");
    assert_eq!(stdout.lines().next(), Some("11"), "{stdout}");
    assert_eq!(r.count(), "19");
    let ended: Vec<Value> = recorded_review(&r, &id)
        .into_iter()
        .filter(|e| e["type"] == "review_ended")
        .collect();
    assert_eq!(ended[0]["edited_by"], "daemon");
    assert_eq!(
        ended[0]["edited_text"],
        "DELETE FROM orders WHERE id = 11 RETURNING id"
    );

    // An edit the policy denies is denied; one that another review rule
    // holds is refused (that rule's approvers were not asked).
    for (edit, want) in [
        ("DROP TABLE orders", "denied by rule \"no-drop\""),
        (
            "TRUNCATE orders",
            "requires review by rule \"two-for-truncate\", whose approvers were not asked",
        ),
    ] {
        let psql = r.spawn_psql("DELETE FROM orders WHERE id > 15", &[]);
        let id = id_of(&r.pending(1)[0]);
        ok(&r.approvals("daemon", &["approve", &id, "--edit", edit]));
        let (success, _, stderr) = finish(psql);
        assert!(!success);
        assert!(stderr.contains(want), "{edit}: {stderr}");
    }
    assert_eq!(r.count(), "19");
}

#[test]
fn two_approvals_need_two_people_and_a_grant_lets_the_same_shape_run_until_revoked() {
    let r = Review::start();
    let psql = r.spawn_psql("TRUNCATE orders", &[]);
    let id = id_of(&r.pending(1)[0]);
    ok(&r.approvals("daemon", &["approve", &id]));
    // The same person again counts once.
    let out = r.approvals("daemon", &["approve", &id]);
    assert!(!out.status.success() || String::from_utf8_lossy(&out.stdout).contains("1 of 2"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(r.count(), "20", "one approval of two: still held");
    ok(&r.approvals("bin", &["approve", &id]));
    let (success, _, stderr) = finish(psql);
    assert!(success, "{stderr}");
    assert_eq!(r.count(), "0");
    r.g.server("INSERT INTO orders SELECT g, 'n' FROM generate_series(1, 20) g");

    // A grant: the same shape from the same executable runs without a
    // new request, other literals included.
    let psql = r.spawn_psql("DELETE FROM orders WHERE id = 5", &[]);
    let id = id_of(&r.pending(1)[0]);
    ok(&r.approvals("daemon", &["approve", &id, "--for", "30m"]));
    assert!(finish(psql).0);
    // The grant is recorded in the session whose request gave it, before
    // the statement was released.
    let given = recorded_review(&r, &id);
    let at = position_of(&given, "grant_given");
    assert!(at < position_of(&given, "review_ended"), "{given:?}");
    assert_eq!(given[at]["request"], id.as_str());
    assert!(
        given[at]["identity"]
            .as_str()
            .is_some_and(|i| i.starts_with("exe:")),
        "{given:?}"
    );
    let grant = given[at]["grant"].as_str().unwrap().to_owned();
    // A session runs under it and is still open when it is revoked: both
    // are in its recording, with who revoked it and how.
    let psql = r.spawn_psql(
        "SELECT pg_sleep(3)",
        &["-c", "DELETE FROM orders WHERE id = 6"],
    );
    let used =
        r.g.agent
            .wait_for_log(
                |l| {
                    l["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("statement runs under grant"))
                },
                Duration::from_secs(10),
            )
            .unwrap();
    let user_of_grant = used["session"].as_str().unwrap().to_owned();
    ok(&r.approvals("daemon", &["grants", "--revoke", &grant]));
    let (success, _, stderr) = finish(psql);
    assert!(success, "{stderr}");
    assert!(!stderr.contains("held for review"), "{stderr}");
    assert_eq!(r.count(), "18");
    let ran = recorded_session(&r, &user_of_grant);
    let used_at = position_of(&ran, "grant_used");
    let revoked_at = position_of(&ran, "grant_revoked");
    assert!(used_at < revoked_at, "{ran:?}");
    assert_eq!(ran[used_at]["grant"], grant.as_str());
    assert_eq!(ran[revoked_at]["grant"], grant.as_str());
    assert_eq!(ran[revoked_at]["by"], "daemon");
    assert_eq!(ran[revoked_at]["via"], format!("unix:{}", uid_of("daemon")));
    let shown = r.g.agent.cli(&["recordings", "show", &user_of_grant]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("grant revoked:"), "{shown}");
    // Revoked: held again.
    let psql = r.spawn_psql("DELETE FROM orders WHERE id = 7", &[]);
    let id = id_of(&r.pending(1)[0]);
    ok(&r.approvals("daemon", &["deny", &id, "--reason", "grant revoked"]));
    assert!(!finish(psql).0);
    assert_eq!(r.count(), "18");
}

#[test]
fn a_held_statement_in_the_extended_protocol_and_other_sessions_meanwhile() {
    let r = Review::start();
    // pgbench in the extended protocol sends Parse, Bind, Describe,
    // Execute, Sync at once: the Parse is held, the rest waits behind it.
    let script = r.g.agent.dir.path().join("delete.sql");
    std::fs::write(&script, "DELETE FROM orders WHERE id = 8;\n").unwrap();
    let args: Vec<String> = [
        "-n",
        "-M",
        "extended",
        "-t",
        "1",
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
        "-f",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([
        script.display().to_string(),
        "-p".into(),
        r.g.port.to_string(),
        "postgres".into(),
    ])
    .collect();
    let mut pgbench = r.spawn_in_cgroup(&pg_tool("pgbench"), &args);
    let id = id_of(&r.pending_from(&mut pgbench)[0]);
    // Another session runs meanwhile.
    let other = tollgate_tests::psql(r.g.port, "SELECT count(*) FROM orders").unwrap();
    assert_eq!(other.trim(), "20");
    ok(&r.approvals("daemon", &["approve", &id]));
    let (success, stdout, stderr) = finish(pgbench);
    assert!(success, "{stdout}{stderr}");
    assert_eq!(r.count(), "19");

    // psycopg 3 in a pipeline inside a transaction: an insert, then the
    // held delete. Approved: both run; denied: the transaction fails and
    // the insert is rolled back with it.
    let pipeline = |id: i32| {
        format!(
            r#"
import psycopg
conn = psycopg.connect("host=127.0.0.1 port={port} user=postgres dbname=postgres")
try:
    with conn.pipeline():
        cur = conn.cursor()
        cur.execute("INSERT INTO orders VALUES (%s, 'p')", ({id} + 100,))
        cur.execute("DELETE FROM orders WHERE id = %s RETURNING id", ({id},))
    print("deleted", cur.fetchone()[0])
    conn.commit()
except psycopg.Error as e:
    print("failed", e.sqlstate, e.diag.message_primary)
"#,
            port = r.g.port
        )
    };
    let python = |code: String| r.spawn_in_cgroup(Path::new("python3"), &["-c".to_owned(), code]);
    let mut approved = python(pipeline(9));
    let id = id_of(&r.pending_from(&mut approved)[0]);
    ok(&r.approvals("daemon", &["approve", &id]));
    let (_, stdout, stderr) = finish(approved);
    assert_eq!(stdout.trim(), "deleted 9", "{stderr}");
    assert_eq!(r.count(), "19", "one inserted, one deleted");
    let mut denied = python(pipeline(10));
    let id = id_of(&r.pending_from(&mut denied)[0]);
    ok(&r.approvals("daemon", &["deny", &id, "--reason", "not now"]));
    let (_, stdout, stderr) = finish(denied);
    assert_eq!(
        stdout.trim(),
        "failed 42501 tollgate: statement denied by reviewer daemon: not now",
        "{stderr}"
    );
    assert_eq!(r.count(), "19", "the insert was rolled back with the batch");
    assert_eq!(
        r.g.server("SELECT count(*) FROM orders WHERE id = 110")
            .trim(),
        "0"
    );

    // tokio-postgres: a named statement prepared (the Parse is held),
    // then bound and executed once approved; and a denial.
    let driver = |id: i32| {
        r.spawn_in_cgroup(
            Path::new(env!("CARGO_BIN_EXE_pg-param-query")),
            &[
                "127.0.0.1".to_owned(),
                r.g.port.to_string(),
                "DELETE FROM orders WHERE id = $1 RETURNING id".to_owned(),
                id.to_string(),
            ],
        )
    };
    let mut approved = driver(11);
    let id = id_of(&r.pending_from(&mut approved)[0]);
    ok(&r.approvals("bin", &["approve", &id]));
    let (success, stdout, stderr) = finish(approved);
    assert!(success, "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "11");
    let mut denied = driver(12);
    let id = id_of(&r.pending_from(&mut denied)[0]);
    ok(&r.approvals("bin", &["deny", &id, "--reason", "no"]));
    let (_, stdout, _) = finish(denied);
    assert_eq!(
        stdout.trim(),
        "error 42501 tollgate: statement denied by reviewer bin: no"
    );
    assert_eq!(r.count(), "18");

    // Twenty held sessions at once, approved in reverse order.
    let children: Vec<Child> = (0..20)
        .map(|i| r.spawn_psql(&format!("DELETE FROM orders WHERE note = 'none-{i}'"), &[]))
        .collect();
    let pending = r.pending(20);
    for view in pending.iter().rev() {
        ok(&r.approvals("daemon", &["approve", &id_of(view)]));
    }
    for child in children {
        let (success, _, stderr) = finish(child);
        assert!(success, "{stderr}");
    }
}

impl Review {
    /// psql reading `script` from stdin.
    fn spawn_psql_script(&self, script: &str) -> Child {
        use std::io::Write as _;
        let args: Vec<String> = [
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([
            self.g.port.to_string(),
            "-U".into(),
            "postgres".into(),
            "-d".into(),
            "postgres".into(),
        ])
        .collect();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
            .arg(self.requester_cgroup())
            .arg(pg_tool("psql"))
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        child
    }
}

#[test]
fn an_agent_that_stops_ends_held_statements_as_aborted_and_records_it() {
    let r = Review::start();
    let mut psql = r.spawn_psql("DELETE FROM orders WHERE id = 12", &[]);
    let id = id_of(&r.pending_from(&mut psql)[0]);
    let session = session_of(&r, &id);
    r.g.agent.terminate();
    let (success, _, stderr) = finish(psql);
    assert!(!success);
    assert!(
        stderr.contains("tollgate: review request aborted: the agent stopped before a decision"),
        "{stderr}"
    );
    assert_eq!(r.count(), "20");
    let out =
        r.g.agent
            .cli(&["recordings", "export", &session, "--format", "jsonl"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let ended = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|r| r.get("event").cloned())
        .find(|e| e["type"] == "review_ended")
        .unwrap_or_else(|| panic!("no review_ended: {text}"));
    assert_eq!(ended["outcome"], "aborted");
    assert_eq!(ended["request"], id.as_str());
}

/// A copy of `sh` named `Runner.Worker` (a GitHub Actions runner, as the
/// agent recognises one) in a directory everyone can read, and the command
/// line that runs `command` as its direct child with a verified job
/// environment whose actor is `actor`.
fn under_runner(dir: &Path, actor: &str, command: &[String]) -> (PathBuf, Vec<String>) {
    let runner = dir.join("Runner.Worker");
    if !runner.exists() {
        std::fs::copy("/bin/sh", &runner).unwrap();
        std::fs::set_permissions(&runner, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let quoted: Vec<String> = command.iter().map(|a| format!("'{a}'")).collect();
    // `; exit $?` keeps the runner the parent of its child (the shell does
    // not exec a command that is not its last) and passes on its status.
    let script = format!(
        "env GITHUB_ACTIONS=true GITHUB_ACTOR={actor} GITHUB_REPOSITORY=acme/shop GITHUB_WORKFLOW=deploy GITHUB_RUN_ID=42 GITHUB_SHA=0123abcd {}; exit $?",
        quoted.join(" ")
    );
    (runner, vec!["-c".to_owned(), script])
}

/// The requester is a CI job whose verified actor is `octocat`: a reviewer
/// (another uid, another cgroup) whose own job runs for the same actor is
/// the requester, and is refused; one for another actor approves. The
/// view names the job, its run and commit.
#[test]
fn a_reviewer_running_for_the_requesting_jobs_ci_actor_cannot_approve() {
    let r = Review::start();
    let runners = tempfile::Builder::new()
        .prefix("tollgate-runner-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(runners.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let psql: Vec<String> = [
        pg_tool("psql").to_str().unwrap(),
        "-X",
        "-A",
        "-t",
        "-h",
        "127.0.0.1",
        "-p",
        &r.g.port.to_string(),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-c",
        "DELETE FROM orders WHERE id = 5",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let (runner, args) = under_runner(runners.path(), "octocat", &psql);
    let job = r.spawn_in_cgroup(&runner, &args);
    let view = &r.pending(1)[0];
    let id = id_of(view);
    let ci = &view["context"]["identity"]["ci"];
    assert_eq!(ci["verified"], true, "{view}");
    assert_eq!(ci["actor"], "octocat", "{view}");
    assert_eq!(ci["commit"], "0123abcd", "{view}");
    let shown = ok(&r.approvals("daemon", &["show", &id]));
    assert!(shown.contains("commit 0123abcd"), "{shown}");

    // daemon, but running for octocat too: refused, and nothing changes.
    let approve_as = |actor: &str| {
        let command: Vec<String> = [
            agent_binary().to_str().unwrap(),
            "approvals",
            "approve",
            &id,
            "--reason",
            "ci",
            "--socket",
            r.socket.to_str().unwrap(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let (runner, args) = under_runner(runners.path(), actor, &command);
        Command::new("runuser")
            .args(["-u", "daemon", "--"])
            .arg(&runner)
            .args(&args)
            .env_remove("TOLLGATE_CONFIG")
            .output()
            .unwrap()
    };
    let same_actor = approve_as("octocat");
    let said = String::from_utf8_lossy(&same_actor.stderr);
    assert!(!same_actor.status.success(), "{said}");
    assert!(
        said.contains("HTTP 403") && said.contains("octocat"),
        "{said}"
    );
    assert_eq!(r.count(), "20", "still held");

    let other_actor = approve_as("hubot");
    assert!(
        other_actor.status.success(),
        "{}",
        String::from_utf8_lossy(&other_actor.stderr)
    );
    let (success, stdout, stderr) = finish(job);
    assert!(success, "{stderr}");
    assert!(stdout.contains("DELETE 1"), "{stdout}");
    assert_eq!(r.count(), "19");
}

#[test]
fn an_approval_covers_one_execution_of_a_prepared_statement_and_each_later_one_is_held_again() {
    let r = Review::start();
    // psycopg's `prepare=True`: the first execution sends Parse, Bind,
    // Execute; the later ones only Bind and Execute the prepared
    // statement, with other values.
    let code = format!(
        r#"
import psycopg
conn = psycopg.connect("host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True)
for order in (11, 12, 13):
    try:
        conn.execute("DELETE FROM orders WHERE id = %s", (order,), prepare=True)
        print("deleted", order, flush=True)
    except psycopg.Error as e:
        print("failed", order, e.sqlstate, e.diag.message_primary, flush=True)
prepared = conn.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'DELETE%'").fetchone()[0]
print("prepared", prepared, flush=True)
"#,
        port = r.g.port
    );
    let mut client = r.spawn_in_cgroup(Path::new("python3"), &["-c".to_owned(), code]);
    let first = id_of(&r.pending_from(&mut client)[0]);
    ok(&r.approvals("daemon", &["approve", &first]));
    // The second execution is a Bind alone: held for a review of its own.
    let second = id_of(&r.pending_from(&mut client)[0]);
    assert_ne!(second, first);
    let view: Value =
        serde_json::from_str(&ok(&r.approvals("daemon", &["show", &second, "--json"]))).unwrap();
    assert_eq!(
        view["context"]["statement"], "DELETE FROM orders WHERE id = $1",
        "{view}"
    );
    ok(&r.approvals("daemon", &["deny", &second, "--reason", "one is enough"]));
    let third = id_of(&r.pending_from(&mut client)[0]);
    assert_ne!(third, second);
    ok(&r.approvals("daemon", &["approve", &third]));
    let (_, stdout, stderr) = finish(client);
    assert_eq!(
        stdout.trim(),
        "deleted 11\nfailed 12 42501 tollgate: statement denied by reviewer daemon: one is enough\ndeleted 13\nprepared 1",
        "{stderr}"
    );
    assert_eq!(r.count(), "18");
    assert_eq!(
        r.g.server("SELECT count(*) FROM orders WHERE id = 12")
            .trim(),
        "1"
    );
}
