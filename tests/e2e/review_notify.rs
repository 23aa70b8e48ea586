//! Review notifications and live watching, with a real psql held by a
//! `review` rule: a local HTTP receiver gets the generic webhook document
//! and the Slack message, a failing receiver is retried, an unreachable
//! one delays nothing and is counted, the recording says what was
//! delivered, and `tollgate approvals watch --json` (as a reviewer) shows
//! the request held and approved.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tollgate_tests::{agent_binary, cgroup_mount, free_port, pg_tool, Governed, RemovedOnDrop};

const POLICY: &str = r#"
[[rule]]
name = "review-deletes"
action = "review"
approvers = ["group:daemon"]
timeout = "30s"
message = "deletes in production need a second pair of eyes"
[rule.match]
kinds = ["delete"]
"#;

const SCHEMA: &str = "CREATE TABLE orders (id int primary key, note text); \
    INSERT INTO orders SELECT g, 'n' || g FROM generate_series(1, 20) g;";

/// One POST a receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: String,
    body: Value,
}

/// A local HTTP receiver answering with the statuses of `script` in turn
/// (200 once it is used up).
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start(script: &[u16]) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(
            script.iter().copied().collect::<VecDeque<u16>>(),
        ));
        let seen = got.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let status = script.lock().unwrap().pop_front().unwrap_or(200);
                if let Some(received) = serve_one(stream, status) {
                    seen.lock().unwrap().push(received);
                }
            }
        });
        Receiver { port, got }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits until `n` POSTs arrived; all of them.
    fn wait_for(&self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.got.lock().unwrap().clone();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{n} notifications expected, {} arrived: {got:?}",
                got.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Reads one HTTP/1.1 request and answers `status`.
fn serve_one(mut stream: TcpStream, status: u16) -> Option<Received> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut headers = String::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().ok()?;
        }
        headers.push_str(&line);
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let reason = if status == 200 { "OK" } else { "Error" };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
    );
    Some(Received {
        path: request_line.split(' ').nth(1).unwrap_or("").to_owned(),
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    })
}

struct Held {
    g: Governed,
    socket: PathBuf,
    metrics_port: u16,
    cgroup: RemovedOnDrop,
}

impl Held {
    /// An agent with `notify` (`[[notify]]` tables) and a metrics port.
    fn start(notify: &str) -> Held {
        let metrics_port = free_port();
        let g = Governed::start(
            POLICY,
            SCHEMA,
            &format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\n\n{notify}"),
        );
        // The agent's directory is private; reviewers must reach the socket.
        std::fs::set_permissions(g.agent.dir.path(), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let socket = g.agent.dir.path().join("approvals.sock");
        // The requester runs in a cgroup of its own: a reviewer in the
        // requester's cgroup would be the requester.
        let cgroup = cgroup_mount().join(format!("tollgate-notify-test-{}", g.port));
        std::fs::create_dir_all(&cgroup).unwrap();
        Held {
            g,
            socket,
            metrics_port,
            cgroup: RemovedOnDrop(vec![cgroup]),
        }
    }

    fn spawn_psql(&self, sql: &str) -> Child {
        let port = self.g.port.to_string();
        Command::new("sh")
            .arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
            .arg(&self.cgroup.0[0])
            .arg(pg_tool("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args(["-p", &port, "-U", "postgres", "-d", "postgres", "-c", sql])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `tollgate approvals ARGS` as `user`.
    fn approvals(&self, user: &str, args: &[&str]) -> Output {
        tollgate_tests::review::approvals_as(&self.socket, user, args)
    }

    /// The one pending request's view, once there is one.
    fn pending(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = self.approvals("daemon", &["list", "--json"]);
            let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if let Some(first) = list.as_array().and_then(|a| a.first()) {
                return first.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no request became pending: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn approve(&self, id: &str) {
        let out = self.approvals("daemon", &["approve", id, "--reason", "checked"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn metrics(&self) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn notifications(&self, kind: &str, result: &str) -> u64 {
        let series =
            format!("tollgate_review_notifications_total{{kind=\"{kind}\",result=\"{result}\"}}");
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(&series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    }

    /// The closed recording of the session that held `request`: its events
    /// as `jsonl` exports them, and `recordings show`'s transcript.
    fn recording(&self, request: &str) -> (Vec<Value>, String) {
        let out = self.approvals("daemon", &["show", request, "--json"]);
        let view: Value = serde_json::from_slice(&out.stdout).unwrap();
        let session = view["context"]["session"].as_str().unwrap().to_owned();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self
                .g
                .agent
                .cli(&["recordings", "export", &session, "--format", "jsonl"]);
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("\"trailer\"") {
                let events = text
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .filter_map(|r| r.get("event").cloned())
                    .collect();
                let shown = self.g.agent.cli(&["recordings", "show", &session]);
                return (events, String::from_utf8_lossy(&shown.stdout).into_owned());
            }
            assert!(Instant::now() < deadline, "the recording did not close");
            std::thread::sleep(Duration::from_millis(100));
        }
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

fn notify_table(kind: &str, url: &str, extra: &str) -> String {
    format!("[[notify]]\nkind = \"{kind}\"\nurl = \"{url}\"\n{extra}\n")
}

#[test]
fn a_held_statement_is_posted_to_a_webhook_and_to_slack_and_recorded() {
    let webhook = Receiver::start(&[]);
    let slack = Receiver::start(&[]);
    let h = Held::start(&format!(
        "{}{}",
        notify_table(
            "webhook",
            &webhook.url("/hooks/tollgate"),
            "headers = { authorization = \"Bearer s3cret\" }\nlink = \"https://review.example.com/\"\nevents = [\"requested\", \"approved\"]"
        ),
        notify_table("slack", &slack.url("/services/T0/B0/X0"), ""),
    ));
    let psql = h.spawn_psql("DELETE FROM orders WHERE id = 3 RETURNING id");
    let id = h.pending()["id"].as_str().unwrap().to_owned();

    let posted = webhook.wait_for(1, Duration::from_secs(10));
    let w = &posted[0];
    assert_eq!(w.path, "/hooks/tollgate");
    assert!(
        w.headers
            .to_ascii_lowercase()
            .contains("authorization: bearer s3cret"),
        "{}",
        w.headers
    );
    assert!(w
        .headers
        .to_ascii_lowercase()
        .contains("content-type: application/json"));
    let doc = &w.body;
    assert_eq!(doc["event"], "requested");
    assert_eq!(doc["request"], id.as_str());
    assert_eq!(
        doc["context"]["statement"],
        "DELETE FROM orders WHERE id = 3 RETURNING id"
    );
    assert_eq!(doc["context"]["target"], "pg");
    assert_eq!(doc["context"]["database_user"], "postgres");
    assert_eq!(doc["context"]["rule"], "review-deletes");
    assert_eq!(
        doc["context"]["rule_description"],
        "deletes in production need a second pair of eyes"
    );
    assert!(doc["context"]["process"]["exe"]
        .as_str()
        .unwrap()
        .ends_with("psql"));
    assert!(doc["context"]["deadline"].as_u64().unwrap() > 0);
    assert_eq!(
        doc["commands"]["approve"],
        format!("tollgate approvals approve {id}").as_str()
    );
    assert_eq!(
        doc["link"],
        format!("https://review.example.com/#{id}").as_str()
    );

    let posted = slack.wait_for(1, Duration::from_secs(10));
    let s = &posted[0];
    assert_eq!(s.path, "/services/T0/B0/X0");
    assert!(s.body["text"].as_str().unwrap().contains(&id), "{}", s.body);
    let blocks = s.body["blocks"].to_string();
    for needle in [
        "DELETE FROM orders WHERE id = 3 RETURNING id",
        "review-deletes",
        &format!("tollgate approvals approve {id}"),
        &format!("tollgate approvals deny {id}"),
    ] {
        assert!(blocks.contains(needle), "{needle} missing from {blocks}");
    }
    // Both delivered (and recorded) before the statement is decided.
    h.g.agent
        .wait_for_log(
            |l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("review notification sent"))
                    && l["kind"] == "slack"
            },
            Duration::from_secs(10),
        )
        .unwrap();
    h.g.agent
        .wait_for_log(
            |l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("review notification sent"))
                    && l["kind"] == "webhook"
            },
            Duration::from_secs(10),
        )
        .unwrap();

    h.approve(&id);
    let (success, stdout, stderr) = finish(psql);
    assert!(success, "{stderr}");
    assert_eq!(stdout.lines().next(), Some("3"));
    // The webhook asked for `approved` too; Slack only for `requested`.
    let posted = webhook.wait_for(2, Duration::from_secs(10));
    assert_eq!(posted[1].body["event"], "approved");
    assert_eq!(posted[1].body["outcome"]["outcome"], "approved");
    assert_eq!(posted[1].body["outcome"]["by"][0], "daemon");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(slack.got.lock().unwrap().len(), 1);

    let (events, shown) = h.recording(&id);
    let notified: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "review_notified" && e["event"] == "requested")
        .collect();
    assert_eq!(notified.len(), 2, "{events:?}");
    for kind in ["webhook", "slack"] {
        let n = notified
            .iter()
            .find(|e| e["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} notification recorded: {events:?}"));
        assert_eq!(n["ok"], true);
        assert_eq!(n["attempts"], 1);
        assert_eq!(n["request"], id.as_str());
        assert_eq!(n["host"], "127.0.0.1");
        assert!(n["error"].is_null());
    }
    assert!(
        shown.contains(&format!(
            "review notification: slack requested of request {id} to 127.0.0.1: delivered (1 attempt)"
        )),
        "{shown}"
    );
    assert!(h.notifications("webhook", "ok") >= 1);
    assert_eq!(h.notifications("slack", "ok"), 1);
}

#[test]
fn a_receiver_failing_twice_gets_three_attempts_and_the_hold_goes_on_normally() {
    let webhook = Receiver::start(&[500, 500]);
    let h = Held::start(&notify_table("webhook", &webhook.url("/hook"), ""));
    let psql = h.spawn_psql("DELETE FROM orders WHERE id = 4 RETURNING id");
    let id = h.pending()["id"].as_str().unwrap().to_owned();

    let started = Instant::now();
    let posted = webhook.wait_for(3, Duration::from_secs(15));
    // Waits of 1 s and 2 s between the attempts.
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    assert!(posted.iter().all(|p| p.body["request"] == id.as_str()));
    h.g.agent
        .wait_for_log(|l| l["attempts"] == 3, Duration::from_secs(5))
        .unwrap();
    // The failures decided nothing: still held.
    assert_eq!(h.pending()["id"], id.as_str());

    h.approve(&id);
    let (success, stdout, stderr) = finish(psql);
    assert!(success, "{stderr}");
    assert_eq!(stdout.lines().next(), Some("4"));
    assert_eq!(h.notifications("webhook", "ok"), 1);
    assert_eq!(h.notifications("webhook", "failed"), 0);

    let (events, _) = h.recording(&id);
    let n = events
        .iter()
        .find(|e| e["type"] == "review_notified")
        .unwrap_or_else(|| panic!("no review_notified: {events:?}"));
    assert_eq!(n["ok"], true);
    assert_eq!(n["attempts"], 3);
}

#[test]
fn a_receiver_that_answers_404_gets_one_attempt_only() {
    let webhook = Receiver::start(&[404]);
    let h = Held::start(&notify_table("webhook", &webhook.url("/wrong-path"), ""));
    let psql = h.spawn_psql("DELETE FROM orders WHERE id = 4 RETURNING id");
    let id = h.pending()["id"].as_str().unwrap().to_owned();

    webhook.wait_for(1, Duration::from_secs(10));
    let failed =
        h.g.agent
            .wait_for_log(
                |l| l["attempts"] == 1 && l["error"] == "HTTP 404 (not retried)",
                Duration::from_secs(5),
            )
            .unwrap();
    assert_eq!(failed["level"], "WARN", "{failed}");
    // A retry would have come after the first backoff (1 s).
    std::thread::sleep(notify_backoff() + Duration::from_millis(500));
    assert_eq!(webhook.got.lock().unwrap().len(), 1);
    assert_eq!(h.notifications("webhook", "failed"), 1);

    h.approve(&id);
    let (success, _, stderr) = finish(psql);
    assert!(success, "{stderr}");
    let (events, _) = h.recording(&id);
    let n = events
        .iter()
        .find(|e| e["type"] == "review_notified")
        .unwrap_or_else(|| panic!("no review_notified: {events:?}"));
    assert_eq!(n["ok"], false);
    assert_eq!(n["attempts"], 1);
    assert_eq!(n["error"], "HTTP 404 (not retried)");
}

/// The agent's wait after a first failed notification attempt.
fn notify_backoff() -> Duration {
    tollgate_agent::approval::notify::backoff(1)
}

#[test]
fn an_unreachable_receiver_delays_neither_the_notice_nor_the_outcome_and_is_counted() {
    // Accepts connections (the kernel's backlog) and never answers: every
    // attempt runs into its timeout.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!(
        "http://127.0.0.1:{}/hook",
        silent.local_addr().unwrap().port()
    );
    // Nothing listens here: connections are refused.
    let refused_url = format!("http://127.0.0.1:{}/hook", free_port());
    let h = Held::start(&format!(
        "{}{}",
        notify_table("webhook", &silent_url, ""),
        notify_table("slack", &refused_url, ""),
    ));

    // Each attempt at the silent receiver takes its whole 5 s timeout: a
    // notice or an outcome that waited for one would come after 4 s.
    let started = Instant::now();
    let mut psql = h.spawn_psql("DELETE FROM orders WHERE id = 5 RETURNING id");
    // psql prints the notice as it arrives.
    let stderr = psql.stderr.take().unwrap();
    let (tx, notices) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    let (at, notice) = notices.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(notice.contains("statement held for review"), "{notice}");
    assert!(
        at.duration_since(started) < Duration::from_secs(4),
        "the notice took {:?}",
        at.duration_since(started)
    );
    let id = h.pending()["id"].as_str().unwrap().to_owned();

    let approved = Instant::now();
    h.approve(&id);
    let out = psql.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().next(),
        Some("5")
    );
    assert!(
        approved.elapsed() < Duration::from_secs(4),
        "the outcome took {:?}",
        approved.elapsed()
    );

    // Refused thrice (waits of 1 s and 2 s): counted as failed, logged.
    let deadline = Instant::now() + Duration::from_secs(15);
    while h.notifications("slack", "failed") < 1 {
        assert!(Instant::now() < deadline, "{}", h.metrics());
        std::thread::sleep(Duration::from_millis(200));
    }
    let warned =
        h.g.agent
            .wait_for_log(
                |l| l["level"] == "WARN" && l["kind"] == "slack",
                Duration::from_secs(5),
            )
            .unwrap();
    let text = warned.to_string();
    assert!(text.contains("127.0.0.1"), "{text}");
    assert!(text.contains("cannot connect"), "{text}");
    // Timed out thrice (5 s each, waits of 1 s and 2 s): failed too.
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.notifications("webhook", "failed") < 1 {
        assert!(Instant::now() < deadline, "{}", h.metrics());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(h.notifications("webhook", "ok"), 0);
    drop(silent);
}

#[test]
fn approvals_watch_json_shows_a_held_statement_and_its_approval() {
    let h = Held::start("");
    let mut watch = Command::new("runuser")
        .args(["-u", "daemon", "--"])
        .arg(agent_binary())
        .args(["approvals", "watch", "--json", "--socket"])
        .arg(&h.socket)
        .env_remove("TOLLGATE_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let watch_started = Instant::now();
    let stdout = watch.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    // Let the watcher subscribe before anything is held.
    std::thread::sleep(Duration::from_millis(500));
    let psql = h.spawn_psql("DELETE FROM orders WHERE id = 6 RETURNING id");
    let next_of = |kinds: &[&str]| loop {
        let event = lines
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no {kinds:?} event from approvals watch"));
        if kinds.iter().any(|k| event["event"] == *k) {
            return event;
        }
    };
    let next = |kind: &str| next_of(&[kind]);
    // A watcher that subscribed only after the statement was held (a busy
    // machine) is told of it as pending, with the same request.
    let requested = next_of(&["requested", "pending"]);
    let id = requested["request"]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        requested["request"]["context"]["statement"],
        "DELETE FROM orders WHERE id = 6 RETURNING id"
    );
    assert!(requested["at"].as_u64().is_some());
    h.approve(&id);
    let approved = next("approved");
    assert_eq!(approved["request"]["id"], id.as_str());
    assert_eq!(approved["request"]["outcome"]["by"][0], "daemon");
    let (success, _, stderr) = finish(psql);
    assert!(success, "{stderr}");

    // A watcher that joins later starts with what is pending.
    let psql = h.spawn_psql("DELETE FROM orders WHERE id = 7");
    let pending_id = h.pending()["id"].as_str().unwrap().to_owned();
    let out = Command::new("timeout")
        .args(["2", "runuser", "-u", "daemon", "--"])
        .arg(agent_binary())
        .args(["approvals", "watch", "--socket"])
        .arg(&h.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default();
    assert!(first.contains("pending"), "{text}");
    assert!(first.contains(&pending_id), "{text}");
    assert!(first.contains("DELETE FROM orders WHERE id = 7"), "{text}");
    h.approve(&pending_id);
    let (success, _, stderr) = finish(psql);
    assert!(success, "{stderr}");
    let _ = next("approved");

    // The API closes other connections after 30 s; a watch goes on.
    if let Some(left) = Duration::from_secs(32).checked_sub(watch_started.elapsed()) {
        std::thread::sleep(left);
    }
    let psql = h.spawn_psql("DELETE FROM orders WHERE id = 9");
    let late = next("requested");
    assert_eq!(
        late["request"]["context"]["statement"],
        "DELETE FROM orders WHERE id = 9"
    );
    h.approve(late["request"]["id"].as_str().unwrap());
    let (success, _, stderr) = finish(psql);
    assert!(success, "{stderr}");

    let _ = watch.kill();
    let _ = watch.wait();

    // Not a reviewer: refused with the API's reason.
    let out = h.approvals("nobody", &["watch"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTP 403"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No agent: a clear error.
    let out = Command::new(agent_binary())
        .args(["approvals", "watch", "--socket"])
        .arg(Path::new("/nonexistent/approvals.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is the agent running?"), "{stderr}");
}

#[test]
fn an_agent_that_stops_announces_the_requests_it_aborts() {
    let webhook = Receiver::start(&[]);
    let h = Held::start(&notify_table(
        "webhook",
        &webhook.url("/hook"),
        "events = [\"requested\", \"aborted\"]",
    ));
    let psql = h.spawn_psql("DELETE FROM orders WHERE id = 8");
    let id = h.pending()["id"].as_str().unwrap().to_owned();
    webhook.wait_for(1, Duration::from_secs(10));
    h.g.agent.terminate();
    let posted = webhook.wait_for(2, Duration::from_secs(10));
    assert_eq!(posted[1].body["event"], "aborted");
    assert_eq!(posted[1].body["request"], id.as_str());
    assert_eq!(posted[1].body["outcome"]["outcome"], "aborted");
    let (success, _, stderr) = finish(psql);
    assert!(!success);
    assert!(stderr.contains("aborted"), "{stderr}");
}
