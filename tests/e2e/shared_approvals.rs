//! A fleet on one machine: two agents, each governing its own exec cgroup
//! through its own redirect and keeping its own recording directory, share
//! one approvals database (a real PostgreSQL of its own, not a governed
//! target) and one bucket. Statements held on either are listed and
//! decided through `tollgate review-server`, and the held psql goes on
//! within a second of the decision; an agent that loses the database keeps
//! its held statements waiting, never runs them undecided, and reconnects;
//! the recordings of both, with the central decisions in them, are read
//! and verified from the bucket.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tollgate_tests::review::{approvals_as, id_of, ok, output_of};
use tollgate_tests::s3::{S3Server, Upload, BUCKET};
use tollgate_tests::*;

/// `daemon`, `bin` and `root` review deletes (root sends them too, so it
/// may not approve its own) and may grant an hour; updates wait 10 s at
/// most.
const POLICY: &str = r#"
[[rule]]
name = "review-deletes"
action = "review"
approvers = ["group:daemon", "group:bin", "group:root"]
grant = "1h"
timeout = "60s"
message = "deletes need a second pair of eyes"
[rule.match]
kinds = ["delete"]

[[rule]]
name = "review-updates-quickly"
action = "review"
approvers = ["group:daemon"]
timeout = "10s"
[rule.match]
kinds = ["update"]
"#;

/// A TCP forwarder to the approvals database that the test can cut (every
/// connection through it dropped, new ones refused) and restore: the
/// database going away for an agent, as a network partition does.
struct Cuttable {
    port: u16,
    up: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Cuttable {
    fn new(upstream: u16) -> Cuttable {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (accepting, tracked) = (up.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !accepting.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                {
                    let mut list = tracked.lock().unwrap();
                    list.push(client.try_clone().unwrap());
                    list.push(server.try_clone().unwrap());
                }
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_in, mut c_out) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_in, &mut c_out);
                    let _ = c_out.shutdown(Shutdown::Both);
                });
            }
        });
        Cuttable { port, up, open }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

fn shared_section(db_port: u16, host: &str) -> String {
    format!(
        "\n[shared_approvals]\ndatabase = \"host=127.0.0.1 port={db_port} user=postgres dbname=postgres sslmode=disable\"\nhost = \"{host}\"\n"
    )
}

/// `tollgate review-server` on the approvals database, with a reviewer
/// socket of its own.
struct ReviewServer {
    child: Child,
    dir: tempfile::TempDir,
}

impl ReviewServer {
    fn start(db_port: u16, policy_line: &str) -> ReviewServer {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-review-server-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let config = dir.path().join("review-server.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\n{policy_line}\napprovals_socket = \"{}\"\ncontrol_socket = \"{}\"\napprovals_store = \"{}\"\n{}",
                dir.path().join("approvals.sock").display(),
                dir.path().join("control.sock").display(),
                dir.path().join("approvals.redb").display(),
                shared_section(db_port, "central")
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new(agent_binary())
            .args(["--log-format", "json", "review-server", "--config"])
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let server = ReviewServer { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !server.log().contains("connected to the approvals database") {
            assert!(
                Instant::now() < deadline,
                "the review server did not connect: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("approvals.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for ReviewServer {
    fn drop(&mut self) {
        send_signal(self.child.id(), libc::SIGTERM);
        if wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
        }
    }
}

/// One runner host: an agent whose redirect governs its exec cgroup; its
/// pins and cgroup are removed when it is dropped.
struct Runner {
    agent: Option<Agent>,
    /// Holds the exec socket and, at the end, a copy of the configuration.
    dir: tempfile::TempDir,
}

impl Runner {
    fn start(config: &str, dir: tempfile::TempDir) -> Runner {
        let agent = Agent::start(config);
        Runner {
            agent: Some(agent),
            dir,
        }
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    /// psql to the "remote" target at `address`, run by `tollgate exec` as
    /// a CI job on this host would be: nothing tells it about the proxy.
    fn spawn_psql(&self, address: &str, port: u16, sql: &str) -> Child {
        let argv = tollgate_tests::psql_argv(address, port, "ON_ERROR_STOP=1", sql);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        exec_command(self.agent(), &argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let keep = self.dir.path().join("agent.toml");
        if let Some(agent) = &self.agent {
            let _ = std::fs::copy(&agent.config, &keep);
        }
        drop(self.agent.take());
        cleanup_redirect(&keep);
    }
}

/// The requests `user` sees pending on `socket`, once `n` are; panics with
/// what the clients said if they do not come within 20 s.
fn pending(socket: &Path, n: usize, clients: &mut [&mut Child]) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = approvals_as(socket, "daemon", &["list", "--json"]);
        let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(items) = list.as_array().filter(|a| a.len() >= n) {
            return items.clone();
        }
        if Instant::now() > deadline {
            let said: Vec<String> = clients.iter_mut().map(|c| output_of(c)).collect();
            panic!(
                "{n} requests never became pending on {}: {}{} clients: {said:?}",
                socket.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for `client` to exit; its status and what it printed.
fn finished(client: &mut Child, within: Duration) -> (bool, String) {
    let status = wait_timeout(client, within);
    let said = output_of(client);
    match status {
        Some(s) => (s.success(), said),
        None => {
            let _ = client.kill();
            panic!("the held client did not finish within {within:?}: {said}");
        }
    }
}

fn store_rows(store: u16) -> String {
    let out = psql_command(
        store,
        "select id, host, state from tollgate_review_requests order by submitted_at",
    )
    .output()
    .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn two_agents_share_one_approvals_database_and_reviewers_decide_both_through_the_review_server() {
    if let Some(why) = ebpf_unavailable() {
        eprintln!("skipping: {why}");
        return;
    }
    // The target looks remote: jobs reach it at a non-loopback address,
    // each host's redirect takes them to that host's proxy.
    let addrs = TestAddresses::add();
    let remote = addrs.v4.to_string();
    let target = Postgres::start_listening(&[addrs.v4.into()]);
    psql(
        target.port,
        "CREATE TABLE orders (id int primary key, note text); INSERT INTO orders SELECT g, 'n' || g FROM generate_series(1, 10) g",
    )
    .unwrap();
    let store = Postgres::start();
    let link = Cuttable::new(store.port);
    let s3 = S3Server::start();
    s3.create_locked_bucket(BUCKET, false);
    let upload = Upload::with_key_file();
    let policy = policy_file(POLICY);
    let mut agents = Vec::new();
    for host in ["runner-a", "runner-b"] {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-runner-")
            .tempdir()
            .unwrap();
        let config = format!(
            "[agent]\n{}\n{}\n[[target]]\nname = \"orders-db\"\naddress = \"{remote}\"\nports = [{}]\nprotocol = \"postgres\"\n{}{}",
            policy.line,
            redirect_section(dir.path(), "pass"),
            target.port,
            shared_section(link.port, host),
            upload.section(s3.port, host, "")
        );
        let runner = Runner::start(&config, dir);
        let agent = runner.agent();
        std::fs::set_permissions(
            agent.dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        agent.wait_until(
            "the agent to reach the approvals database",
            Duration::from_secs(20),
            &["shared approvals"],
            || {
                agent
                    .status()
                    .is_ok_and(|s| s["shared_approvals"]["connected"] == Value::Bool(true))
            },
        );
        agents.push(runner);
    }
    let server = ReviewServer::start(store.port, &policy.line);
    let central = server.socket();

    // A statement held on each host, both listed in one place.
    let (a, b) = (&agents[0], &agents[1]);
    let mut on_a = a.spawn_psql(&remote, target.port, "DELETE FROM orders WHERE id = 1");
    let mut on_b = b.spawn_psql(&remote, target.port, "DELETE FROM orders WHERE id = 2");
    let listed = pending(&central, 2, &mut [&mut on_a, &mut on_b]);
    let host_of = |text: &str| {
        listed
            .iter()
            .find(|r| r["text"].as_str().unwrap_or("").contains(text))
            .map(|r| (r["host"].as_str().unwrap().to_owned(), id_of(r)))
            .unwrap_or_else(|| panic!("no request for {text}: {listed:?}"))
    };
    let (host_a, id_a) = host_of("id = 1");
    let (host_b, id_b) = host_of("id = 2");
    assert_eq!((host_a.as_str(), host_b.as_str()), ("runner-a", "runner-b"));
    let text = ok(&approvals_as(&central, "daemon", &["list"]));
    assert!(
        text.contains("runner-a:") && text.contains("runner-b:"),
        "{text}"
    );

    // The same checks as on an agent: the requester (root, here) cannot
    // approve its own statement, and nobody is no approver.
    let own = approvals_as(&central, "root", &["approve", &id_a]);
    assert!(!own.status.success());
    assert!(
        String::from_utf8_lossy(&own.stderr).contains("cannot approve or deny it"),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    let refused = approvals_as(&central, "nobody", &["approve", &id_a]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not in any approver group"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        on_a.try_wait().unwrap().is_none(),
        "a refused action decided nothing"
    );

    // Approved centrally, with a grant of ten minutes: the psql on host A
    // goes on within a second.
    ok(&approvals_as(
        &central,
        "daemon",
        &[
            "approve",
            &id_a,
            "--reason",
            "one row, checked",
            "--for",
            "10m",
        ],
    ));
    let decided = Instant::now();
    let (success, said) = finished(&mut on_a, Duration::from_secs(10));
    let took = decided.elapsed();
    assert!(success, "{said}");
    assert!(said.contains("DELETE 1"), "{said}");
    eprintln!("held statement resumed {took:?} after the central approval");
    assert!(
        took < Duration::from_secs(1),
        "the approval took {took:?} to reach the held session"
    );
    // Denied centrally by another reviewer: refused on host B with the reason.
    ok(&approvals_as(
        &central,
        "bin",
        &["deny", &id_b, "--reason", "not this one"],
    ));
    let (success, said) = finished(&mut on_b, Duration::from_secs(10));
    assert!(!success, "{said}");
    assert!(said.contains("not this one"), "{said}");
    assert_eq!(
        psql(
            target.port,
            "select array_agg(id order by id) from orders where id <= 2"
        )
        .unwrap(),
        "{2}",
        "the approved delete ran, the denied one did not"
    );
    let rows = store_rows(store.port);
    assert!(
        rows.contains(&format!("{id_a}|runner-a|approved")),
        "{rows}"
    );
    assert!(rows.contains(&format!("{id_b}|runner-b|denied")), "{rows}");
    assert_eq!(
        a.agent().status().unwrap()["shared_approvals"]["decisions_applied"],
        1
    );

    // The grant is the fleet's: the same statement shape from the same
    // program runs on host B too without waiting, and the central list of
    // grants shows it.
    let mut granted = b.spawn_psql(&remote, target.port, "DELETE FROM orders WHERE id = 6");
    let (success, said) = finished(&mut granted, Duration::from_secs(10));
    assert!(
        success && said.contains("DELETE 1"),
        "ran under the grant: {said}"
    );
    let grants: Vec<Value> = serde_json::from_str(&ok(&approvals_as(
        &central,
        "daemon",
        &["grants", "--json"],
    )))
    .unwrap();
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert_eq!(grants[0]["request"], id_a.as_str());
    let grant_id = grants[0]["id"].as_str().unwrap().to_owned();
    let local_b = b.agent().dir.path().join("approvals.sock");
    let on_b: Vec<Value> = serde_json::from_str(&ok(&approvals_as(
        &local_b,
        "daemon",
        &["grants", "--json"],
    )))
    .unwrap();
    assert_eq!(on_b.len(), 1, "host B holds the grant: {on_b:?}");

    // Revoked centrally: every host learns of it, and the next delete on
    // host A waits for a reviewer again.
    ok(&approvals_as(
        &central,
        "bin",
        &["grants", "--revoke", &grant_id],
    ));
    let local_a = a.agent().dir.path().join("approvals.sock");
    for socket in [&local_a, &local_b] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let active = ok(&approvals_as(socket, "daemon", &["grants", "--json"]));
            if active.trim() == "[]" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} still holds the grant: {active}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let mut again = a.spawn_psql(&remote, target.port, "DELETE FROM orders WHERE id = 7");
    let listed = pending(&central, 1, &mut [&mut again]);
    ok(&approvals_as(
        &central,
        "bin",
        &["deny", &id_of(&listed[0]), "--reason", "grant revoked"],
    ));
    let (success, said) = finished(&mut again, Duration::from_secs(10));
    assert!(!success && said.contains("grant revoked"), "{said}");

    // Host A loses the database: a statement held meanwhile waits there,
    // listed by the agent's own socket, and expires unapproved.
    link.cut();
    let agent_a = a.agent();
    agent_a.wait_until(
        "the agent to notice the database is gone",
        Duration::from_secs(20),
        &["shared approvals"],
        || {
            agent_a
                .status()
                .is_ok_and(|s| s["shared_approvals"]["connected"] == Value::Bool(false))
        },
    );
    let status = String::from_utf8_lossy(&agent_a.cli(&["status"]).stdout).into_owned();
    assert!(status.contains("database UNREACHABLE"), "{status}");
    let local = agent_a.dir.path().join("approvals.sock");
    let mut expiring = a.spawn_psql(
        &remote,
        target.port,
        "UPDATE orders SET note = 'x' WHERE id = 3",
    );
    pending(&local, 1, &mut [&mut expiring]);
    let (success, said) = finished(&mut expiring, Duration::from_secs(20));
    assert!(!success, "never approved by default: {said}");
    assert!(
        said.contains("expired") || said.contains("no decision"),
        "{said}"
    );
    assert_eq!(
        psql(target.port, "select note from orders where id = 3").unwrap(),
        "n3"
    );

    // A statement held while the link is down reaches the reviewers once it
    // is back, and their approval runs it.
    let mut waiting = a.spawn_psql(&remote, target.port, "DELETE FROM orders WHERE id = 4");
    pending(&local, 1, &mut [&mut waiting]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(waiting.try_wait().unwrap().is_none(), "still held");
    link.restore();
    let listed = pending(&central, 1, &mut [&mut waiting]);
    assert_eq!(listed.len(), 1, "the expired one is not listed: {listed:?}");
    assert_eq!(listed[0]["host"], "runner-a");
    ok(&approvals_as(
        &central,
        "bin",
        &["approve", &id_of(&listed[0])],
    ));
    let (success, said) = finished(&mut waiting, Duration::from_secs(10));
    assert!(success && said.contains("DELETE 1"), "{said}");
    let rows = store_rows(store.port);
    // The request that expired while the link was down never reached the
    // table (a, b, the one after the revocation and this one are there);
    // nothing there is left pending.
    assert_eq!(rows.lines().count(), 4, "{rows}");
    assert!(!rows.contains("pending"), "{rows}");

    // An agent that stops ends its held statements in the table too, and
    // the reviewers' list drops them.
    let agent_b = b.agent();
    let mut stopped = b.spawn_psql(&remote, target.port, "DELETE FROM orders WHERE id = 5");
    let listed = pending(&central, 1, &mut [&mut stopped]);
    let id_stopped = id_of(&listed[0]);
    agent_b.terminate();
    let (success, said) = finished(&mut stopped, Duration::from_secs(20));
    assert!(!success, "{said}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let list = ok(&approvals_as(&central, "daemon", &["list", "--json"]));
        if list.trim() == "[]" {
            break;
        }
        assert!(Instant::now() < deadline, "still listed: {list}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let rows = store_rows(store.port);
    assert!(
        rows.contains(&format!("{id_stopped}|runner-b|aborted")),
        "{rows}"
    );
    drop(server);

    // The recordings of both hosts go up on stop; read from the bucket
    // they carry the central decisions and verify.
    drop(agents);
    let responder = upload.responder_config(s3.port);
    let remote = |args: &[&str]| {
        let out = Command::new(agent_binary())
            .args(args)
            .arg("--config")
            .arg(&responder)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let list: Vec<Value> = loop {
        let (_, text) = remote(&["recordings", "list", "--remote", "--json"]);
        let list: Vec<Value> = serde_json::from_str(&text).unwrap_or_default();
        let mut hosts: Vec<&str> = list.iter().filter_map(|r| r["host"].as_str()).collect();
        hosts.sort();
        hosts.dedup();
        if hosts == ["runner-a", "runner-b"] {
            break list;
        }
        assert!(Instant::now() < deadline, "not all hosts uploaded: {text}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut shown = String::new();
    for r in &list {
        let id = r["id"].as_str().unwrap();
        let (success, text) = remote(&["recordings", "show", "--remote", id, "--no-color"]);
        assert!(success, "{text}");
        shown.push_str(&text);
    }
    assert!(
        shown.contains(&format!("request {id_a} approved by daemon"))
            && shown.contains("daemon approved: one row, checked"),
        "{shown}"
    );
    // The grant given centrally, in the session that asked for it on host
    // A, and used by the session on host B.
    assert!(
        shown.contains(&format!("{grant_id} for exe:")),
        "grant given: {shown}"
    );
    assert!(
        shown.contains(&format!("runs under grant {grant_id} (from request {id_a}")),
        "grant used: {shown}"
    );
    assert!(
        shown.contains(&format!("request {id_b} denied by bin")),
        "{shown}"
    );
    let (success, text) = remote(&["recordings", "verify", "--remote", "--all"]);
    assert!(success && text.contains(" 0 failed"), "{text}");
}
