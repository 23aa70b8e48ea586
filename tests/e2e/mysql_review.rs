//! MySQL statements held for human review: the real `mariadb` client and
//! mysql-connector-python (prepared statements) through the agent to a
//! real MariaDB, decided by reviewers through `tollgate approvals` as
//! other users, as for PostgreSQL (tests/e2e/review.rs). The requesting
//! client runs in a cgroup of its own, as a CI job's would.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use tollgate_tests::mariadb::{mariadb, Mariadb, DATABASE, PASSWORD, USER};
use tollgate_tests::review::{
    approvals_as, id_of, ok, output_of, pending_from, recorded_session, spawn_in_cgroup,
};
use tollgate_tests::*;

/// `daemon` and `bin` review; the requester (root) may not.
const POLICY: &str = r#"
[[rule]]
name = "review-deletes"
action = "review"
approvers = ["group:daemon", "group:bin"]
grant = "1h"
timeout = "20s"
[rule.match]
kinds = ["delete"]

[[rule]]
name = "review-truncate"
action = "review"
approvers = ["group:bin"]
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

const SCHEMA: &str = "CREATE TABLE orders (id INT PRIMARY KEY, note TEXT);
INSERT INTO orders SELECT seq, CONCAT('n', seq) FROM seq_1_to_20;
CREATE TABLE customers (id INT PRIMARY KEY, email TEXT);
INSERT INTO customers VALUES (1, 'ada@example.com'), (2, 'grace@example.com');";

struct Desk {
    db: Mariadb,
    agent: Agent,
    port: u16,
    socket: PathBuf,
    cgroup: RemovedOnDrop,
    _policy: PolicyFile,
}

impl Desk {
    fn start() -> Desk {
        let db = Mariadb::start(SCHEMA);
        let policy = policy_file(POLICY);
        let port = free_port();
        let agent = Agent::start(&format!(
            "[agent]\n{}\n\n[[target]]\nname = \"shop\"\naddress = \"127.0.0.1\"\nports = [{}]\nprotocol = \"mysql\"\n\n\
             [[listener]]\nlisten = \"127.0.0.1:{port}\"\ntarget = \"shop\"\n",
            policy.line, db.port
        ));
        // The agent's directory is private; reviewers must reach the socket.
        std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = agent.dir.path().join("approvals.sock");
        let cgroup = cgroup_mount().join(format!("tollgate-mysql-review-{port}"));
        std::fs::create_dir_all(&cgroup).unwrap();
        Desk {
            db,
            agent,
            port,
            socket,
            cgroup: RemovedOnDrop(vec![cgroup]),
            _policy: policy,
        }
    }

    /// `program ARGS` in the requesters' cgroup.
    fn spawn(&self, program: &str, args: &[String]) -> Child {
        spawn_in_cgroup(&self.cgroup.0[0], Path::new(program), args)
    }

    /// The `mariadb` client running `sql` (unbuffered: each result is
    /// printed as it comes).
    fn spawn_mariadb(&self, sql: &str) -> Child {
        let args: Vec<String> = [
            "--no-defaults",
            "-h",
            "127.0.0.1",
            "-P",
            &self.port.to_string(),
            "-u",
            USER,
            &format!("-p{PASSWORD}"),
            "--protocol=TCP",
            "--skip-ssl",
            "--batch",
            "--skip-column-names",
            "--unbuffered",
            "-D",
            DATABASE,
            "-e",
            sql,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        self.spawn("mariadb", &args)
    }

    /// `tollgate approvals ARGS` as `user`.
    fn approvals(&self, user: &str, args: &[&str]) -> Output {
        approvals_as(&self.socket, user, args)
    }

    /// Waits until a request is pending; its view.
    fn pending(&self, client: &mut Child) -> Value {
        pending_from(&self.socket, client).remove(0)
    }

    fn nothing_pending(&self) -> bool {
        let out = self.approvals("daemon", &["list", "--json"]);
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().map(Vec::is_empty))
            .unwrap_or(false)
    }

    fn orders(&self) -> String {
        self.db
            .as_root("SELECT count(*) FROM shop.orders")
            .trim()
            .to_owned()
    }

    /// The recording events of the session that held `request`, once it
    /// closed.
    fn recorded(&self, request: &str) -> Vec<Value> {
        let shown = ok(&self.approvals("daemon", &["show", request, "--json"]));
        let view: Value = serde_json::from_str(&shown).unwrap();
        let session = view["context"]["session"].as_str().unwrap().to_owned();
        recorded_session(&self.agent, &session)
    }
}

/// Waits for the client; whether it succeeded, and all it printed.
fn finish(mut client: Child) -> (bool, String) {
    let status = client.wait().unwrap();
    (status.success(), output_of(&mut client))
}

#[test]
fn a_held_mysql_delete_runs_once_another_user_approves_it_and_a_grant_covers_its_shape() {
    let d = Desk::start();
    let mut client = d.spawn_mariadb("DELETE FROM orders WHERE id = 1");
    let view = d.pending(&mut client);
    let id = id_of(&view);
    assert_eq!(
        view["context"]["statement"],
        "DELETE FROM orders WHERE id = 1"
    );
    assert_eq!(view["context"]["rule"], "review-deletes");
    assert_eq!(view["context"]["database_user"], USER);
    // Held: the server has not seen it.
    assert_eq!(d.orders(), "20");
    // The requester's own uid may not approve it.
    assert!(!d.approvals("root", &["approve", &id]).status.success());
    ok(&d.approvals(
        "daemon",
        &["approve", &id, "--for", "30m", "--reason", "OPS-1"],
    ));
    let (success, out) = finish(client);
    assert!(success, "{out}");
    assert_eq!(d.orders(), "19");

    let events = d.recorded(&id);
    let at = |kind: &str| {
        events
            .iter()
            .position(|e| e["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in {events:?}"))
    };
    assert!(at("review_requested") < at("review_ended"));
    assert!(at("review_ended") < at("statement"));
    assert_eq!(events[at("review_ended")]["outcome"], "approved");
    assert_eq!(events[at("review_ended")]["approvals"][0]["by"], "daemon");
    assert_eq!(events[at("statement")]["action"], "review");
    assert_eq!(events[at("statement")]["refused"], false);

    // The grant: the same shape from the same executable runs at once,
    // with another literal; another shape is held again.
    let (success, out) = finish(d.spawn_mariadb("DELETE FROM orders WHERE id = 2"));
    assert!(success, "{out}");
    assert_eq!(d.orders(), "18");
    let mut client = d.spawn_mariadb("DELETE FROM orders WHERE id > 18");
    let id = id_of(&d.pending(&mut client));
    ok(&d.approvals("daemon", &["deny", &id, "--reason", "too many"]));
    let (success, out) = finish(client);
    assert!(!success);
    assert!(
        out.contains(
            "ERROR 1142 (42000) at line 1: tollgate: statement denied by reviewer daemon: too many"
        ),
        "{out}"
    );
    assert_eq!(d.orders(), "18");
}

#[test]
fn reviewers_see_masked_literals_hidden_and_an_edit_runs_in_place_of_the_held_text() {
    let d = Desk::start();
    // A literal meant for a masked column: hidden from reviewers, in the
    // statement and in the client's command line.
    let sql = "DELETE FROM customers WHERE email = 'ada@example.com'";
    let mut client = d.spawn_mariadb(sql);
    let view = d.pending(&mut client);
    let id = id_of(&view);
    assert_eq!(
        view["context"]["statement"],
        "DELETE FROM customers WHERE email = '***'"
    );
    assert!(
        !view.to_string().contains("ada@example.com"),
        "a reviewer saw the literal: {view}"
    );
    ok(&d.approvals("daemon", &["approve", &id]));
    let (success, out) = finish(client);
    assert!(success, "{out}");
    assert_eq!(
        d.db.as_root("SELECT count(*) FROM shop.customers").trim(),
        "1"
    );

    // The reviewer narrows a delete: the edit runs instead.
    let mut client = d.spawn_mariadb("DELETE FROM orders WHERE id > 10");
    let id = id_of(&d.pending(&mut client));
    ok(&d.approvals(
        "daemon",
        &["approve", &id, "--edit", "DELETE FROM orders WHERE id = 11"],
    ));
    let (success, out) = finish(client);
    assert!(success, "{out}");
    assert_eq!(d.orders(), "19");
    assert_eq!(
        d.db.as_root("SELECT count(*) FROM shop.orders WHERE id = 11")
            .trim(),
        "0"
    );

    // An edit the policy denies is denied; one another review rule takes
    // is refused (its approvers were not asked).
    for (edit, want) in [
        ("DROP TABLE orders", "denied by rule \"no-drop\""),
        (
            "TRUNCATE orders",
            "requires review by rule \"review-truncate\", whose approvers were not asked",
        ),
    ] {
        let mut client = d.spawn_mariadb("DELETE FROM orders WHERE id > 15");
        let id = id_of(&d.pending(&mut client));
        ok(&d.approvals("daemon", &["approve", &id, "--edit", edit]));
        let (success, out) = finish(client);
        assert!(!success, "{edit} ran: {out}");
        assert!(out.contains(want), "{edit}: {out}");
    }
    assert_eq!(d.orders(), "19");
}

#[test]
fn a_kill_query_ends_a_held_statement_and_each_execution_of_a_prepared_one_is_held() {
    let d = Desk::start();
    // The client prints its connection id, then its DELETE is held; a
    // KILL QUERY of that connection (the mariadb client's Ctrl-C) ends
    // the wait with the server's own error, and the request with it.
    let mut client = d.spawn_mariadb("SELECT CONNECTION_ID(); DELETE FROM orders WHERE id = 3");
    d.pending(&mut client);
    let connection = {
        use std::io::BufRead as _;
        let stdout = client.stdout.as_mut().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line.trim().to_owned()
    };
    assert!(connection.parse::<u32>().is_ok(), "{connection:?}");
    let out = mariadb(d.port, &format!("KILL QUERY {connection}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (success, out) = finish(client);
    assert!(!success);
    assert!(
        out.contains("ERROR 1317 (70100) at line 1: Query execution was interrupted"),
        "{out}"
    );
    assert_eq!(d.orders(), "20");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.nothing_pending() {
        assert!(
            Instant::now() < deadline,
            "the request outlived its statement"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // mysql-connector-python prepares and executes: preparing is not
    // held, each execution is.
    let driver = workspace_root().join("tests/data/mysql_driver.py");
    let mut client = d.spawn(
        "python3",
        &[
            driver.display().to_string(),
            "connector".to_owned(),
            d.port.to_string(),
            "DELETE FROM orders WHERE id = 4".to_owned(),
            "DELETE FROM orders WHERE id = 5".to_owned(),
            // The driver does not autocommit.
            "COMMIT".to_owned(),
        ],
    );
    let first = id_of(&d.pending(&mut client));
    ok(&d.approvals("daemon", &["approve", &first]));
    let second = loop {
        let view = d.pending(&mut client);
        if id_of(&view) != first {
            break id_of(&view);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ok(&d.approvals("daemon", &["deny", &second, "--reason", "one is enough"]));
    let (_, out) = finish(client);
    let lines: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].get("error").is_none(), "{out}");
    assert!(
        lines[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("statement denied by reviewer daemon: one is enough")),
        "{out}"
    );
    assert_eq!(d.orders(), "19");
    assert_eq!(
        d.db.as_root("SELECT count(*) FROM shop.orders WHERE id = 5")
            .trim(),
        "1"
    );
}
