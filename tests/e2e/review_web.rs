//! Reviewers not on the host: the reviewer API on TCP with TLS, signed in
//! with per-reviewer tokens made by `tollgate approvals tokens`, and the
//! web page it serves, driven in a real headless Chromium.
//!
//! The held psql runs as `daemon` in a cgroup of its own; tokens act as
//! `daemon` (the requester: refused) or `bin` (another approver).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tollgate_tests::webdriver::{chromium_available, Browser};
use tollgate_tests::{cgroup_mount, free_port, pg_tool, Governed, RemovedOnDrop};

const POLICY: &str = r#"
[[rule]]
name = "review-deletes"
action = "review"
approvers = ["group:daemon", "group:bin"]
timeout = "60s"
message = "deletes in production need a second pair of eyes"
[rule.match]
kinds = ["delete"]
"#;

const SCHEMA: &str = "CREATE TABLE orders (id int primary key, note text); \
    INSERT INTO orders SELECT g, 'n' || g FROM generate_series(1, 20) g;";

struct Remote {
    g: Governed,
    /// The reviewer API's TLS port.
    api_port: u16,
    /// Certificate, key and token file.
    dir: tempfile::TempDir,
    cgroup: RemovedOnDrop,
    /// The `[agent]` settings of the TLS listener, to start the agent again.
    extra: String,
}

/// An answer: status, headers (lowercase), body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

impl Remote {
    fn start() -> Remote {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-review-web-")
            .tempdir()
            .unwrap();
        let cert = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
        ])
        .unwrap();
        std::fs::write(dir.path().join("api.pem"), cert.cert.pem()).unwrap();
        std::fs::write(
            dir.path().join("api-key.pem"),
            cert.signing_key.serialize_pem(),
        )
        .unwrap();
        let api_port = free_port();
        let extra = format!(
            "approvals_listen = \"127.0.0.1:{api_port}\"\napprovals_tls_cert = \"{d}/api.pem\"\napprovals_tls_key = \"{d}/api-key.pem\"\napprovals_tokens = \"{d}/reviewer-tokens\"",
            d = dir.path().display()
        );
        let g = Governed::start(POLICY, SCHEMA, &extra);
        let cgroup = cgroup_mount().join(format!("tollgate-review-web-{}", g.port));
        std::fs::create_dir_all(&cgroup).unwrap();
        Remote {
            g,
            api_port,
            dir,
            cgroup: RemovedOnDrop(vec![cgroup]),
            extra,
        }
    }

    /// Stops the agent (at once, as a crash would) and starts another with
    /// the same configuration, reviewer port and token file.
    fn restart_agent(&mut self, between: impl FnOnce()) {
        let _ = self.g.agent.child.kill();
        let _ = self.g.agent.child.wait();
        between();
        let config = tollgate_tests::listener_config(
            self.g.port,
            self.g.pg.port,
            &format!("{}\n{}", self.g.policy.line, self.extra),
        );
        self.g.agent = tollgate_tests::Agent::start(&config);
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("api.pem")
    }

    /// `tollgate approvals tokens add NAME --user USER`: the token.
    fn token(&self, name: &str, user: &str) -> String {
        let out = self
            .g
            .agent
            .cli(&["approvals", "tokens", "add", name, "--user", user]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(token.starts_with("tgr_"), "{token}");
        token
    }

    /// psql as `daemon`, in the requesters' cgroup, through the agent.
    fn spawn_psql(&self, sql: &str) -> Child {
        Command::new("sh")
            .arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
            .arg(&self.cgroup.0[0])
            .args(["runuser", "-u", "daemon", "--"])
            .arg(pg_tool("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .arg("-p")
            .arg(self.g.port.to_string())
            .args(["-U", "postgres", "-d", "postgres", "-c", sql])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// One HTTPS request to the reviewer API with curl, trusting only the
    /// listener's own certificate.
    fn curl(&self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Answer {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-i", "--max-time", "10", "-X", method, "--cacert"])
            .arg(self.cert())
            .arg(format!("https://127.0.0.1:{}{path}", self.api_port));
        if let Some(token) = token {
            cmd.arg("-H").arg(format!("Authorization: Bearer {token}"));
        }
        if let Some(body) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-raw", body]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Answer {
            status,
            head: head.to_ascii_lowercase(),
            body: body.to_owned(),
        }
    }

    /// Waits until a request is pending, listing with `token`.
    fn pending(&self, token: &str, psql: &mut Child) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let answer = self.curl("GET", "/v1/requests", Some(token), None);
            assert_eq!(answer.status, 200, "{}", answer.body);
            if let Some(first) = answer.json().as_array().and_then(|a| a.first()) {
                return first.clone();
            }
            if Instant::now() > deadline || psql.try_wait().unwrap().is_some() {
                let _ = psql.kill();
                let out = finish(std::mem::replace(psql, dummy()));
                panic!("no request became pending; psql said: {out:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn count(&self) -> String {
        self.g
            .server("SELECT count(*) FROM orders")
            .trim()
            .to_owned()
    }

    /// `tollgate approvals show ID --json` as root on the reviewer socket.
    fn show(&self, id: &str) -> Value {
        let out = self.g.agent.cli(&["approvals", "show", id, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The recording events of a closed session.
    fn recorded(&self, session: &str) -> Vec<Value> {
        tollgate_tests::review::recorded_session(&self.g.agent, session)
    }
}

/// A finished child, to swap for one being finished.
fn dummy() -> Child {
    Command::new("true").spawn().unwrap()
}

fn finish(child: Child) -> (bool, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The approval the recording of `id`'s session holds.
fn recorded_approval(r: &Remote, view: &Value) -> Value {
    let session = view["context"]["session"].as_str().unwrap();
    let events = r.recorded(session);
    let ended = events
        .iter()
        .find(|e| e["type"] == "review_ended")
        .expect("review_ended recorded");
    assert_eq!(ended["outcome"], "approved");
    ended["approvals"][0].clone()
}

fn is_root() -> bool {
    tollgate_tests::is_root()
}

#[test]
fn the_api_over_tls_wants_the_token_of_an_approver_who_is_not_the_requester() {
    if !is_root() {
        eprintln!("skipped: needs root (cgroups, runuser, a token file owned by root)");
        return;
    }
    let r = Remote::start();
    let bin = r.token("web-bin", "bin");
    let daemon = r.token("web-daemon", "daemon");
    let mut psql = r.spawn_psql("DELETE FROM orders WHERE id = 1 RETURNING id");
    let view = r.pending(&bin, &mut psql);
    let id = view["id"].as_str().unwrap().to_owned();
    assert_eq!(view["context"]["identity"]["user"], "daemon");
    let approve = format!("/v1/requests/{id}/approve");

    // The page needs no token and carries its policy.
    let page = r.curl("GET", "/", None, None);
    assert_eq!(page.status, 200);
    assert!(page.head.contains("content-type: text/html; charset=utf-8"));
    assert!(page.head.contains("x-frame-options: deny"));
    assert!(page.head.contains(
        "content-security-policy: default-src 'none'; connect-src 'self'; script-src 'sha256-"
    ));
    assert!(page
        .body
        .contains("Tollgate: statements waiting for review"));

    // Who a token signs in as; on the reviewer socket, the peer, and the
    // same page.
    let me = r.curl("GET", "/v1/whoami", Some(&bin), None);
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.json()["user"], "bin");
    assert_eq!(me.json()["via"], "token:web-bin");
    let socket = r.g.agent.dir.path().join("approvals.sock");
    let on_socket = |path: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--unix-socket"])
            .arg(&socket)
            .arg(format!("http://tollgate{path}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl on the socket failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(on_socket("/").contains("Tollgate: statements waiting for review"));
    let root: Value = serde_json::from_str(&on_socket("/v1/whoami")).unwrap();
    assert_eq!(
        root,
        serde_json::json!({"user": "root", "uid": 0, "via": "unix:0"})
    );

    // No token, a wrong one: 401 with the scheme to use, nothing changes.
    let none = r.curl("GET", "/v1/requests", None, None);
    assert_eq!(none.status, 401, "{}", none.body);
    assert!(
        none.head.contains("www-authenticate: bearer"),
        "{}",
        none.head
    );
    let wrong = r.curl(
        "POST",
        &approve,
        Some(&format!("tgr_{}", "0".repeat(64))),
        Some("{}"),
    );
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    assert!(wrong.head.contains("www-authenticate: bearer"));
    // Malformed: 400.
    let malformed = r.curl("POST", &approve, Some(&bin), Some("{\"reason\": "));
    assert_eq!(malformed.status, 400, "{}", malformed.body);
    assert!(malformed.json()["error"]
        .as_str()
        .unwrap()
        .contains("malformed JSON"));
    // The requester's own user, by token: 403.
    let own = r.curl(
        "POST",
        &approve,
        Some(&daemon),
        Some("{\"reason\": \"mine\"}"),
    );
    assert_eq!(own.status, 403, "{}", own.body);
    assert!(own.body.contains("sent the statement"), "{}", own.body);
    assert_eq!(r.count(), "20");
    assert!(r.show(&id)["outcome"].is_null(), "still pending");

    // Plain HTTP on the TLS port gets no answer.
    let plain = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{}/v1/requests", r.api_port))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plain HTTP was answered");

    // Another approver's token approves; the held psql gets its row.
    let approved = r.curl(
        "POST",
        &approve,
        Some(&bin),
        Some("{\"reason\": \"ticket OPS-7\"}"),
    );
    assert_eq!(approved.status, 200, "{}", approved.body);
    assert_eq!(approved.json()["status"], "approved");
    let (success, stdout, stderr) = finish(psql);
    assert!(success, "{stderr}");
    assert_eq!(stdout.lines().next(), Some("1"), "{stdout}");
    assert_eq!(r.count(), "19");

    // The audit names the token.
    let shown = r.show(&id);
    assert_eq!(shown["approvals"][0]["by"], "bin");
    assert_eq!(shown["approvals"][0]["via"], "token:web-bin");
    let text = r.g.agent.cli(&["approvals", "show", &id]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("approvals      1/1 bin (token:web-bin)"),
        "{text}"
    );
    let recorded = recorded_approval(&r, &view);
    assert_eq!(recorded["by"], "bin");
    assert_eq!(recorded["via"], "token:web-bin");
    assert_eq!(recorded["reason"], "ticket OPS-7");

    // Listed without hashes; a revoked token is refused at once.
    let listed = r.g.agent.cli(&["approvals", "tokens", "list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("web-bin") && listed.contains("web-daemon"),
        "{listed}"
    );
    // A watch stream opened with the token before it was revoked ends at
    // the next event, saying why.
    let watching = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "30", "--cacert"])
        .arg(r.cert())
        .arg("-H")
        .arg(format!("Authorization: Bearer {bin}"))
        .arg(format!("https://127.0.0.1:{}/v1/watch", r.api_port))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = r.g.agent.cli(&["approvals", "tokens", "revoke", "web-bin"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked = r.curl("GET", "/v1/requests", Some(&bin), None);
    assert_eq!(revoked.status, 401, "{}", revoked.body);
    let mut held = r.spawn_psql("DELETE FROM orders WHERE id = 3");
    let began = Instant::now();
    let (_, streamed, _) = finish(watching);
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "the stream went on after its token was revoked: {streamed}"
    );
    assert!(streamed.contains(r#""event":"signed_out""#), "{streamed}");
    assert!(
        !streamed.contains("DELETE FROM orders WHERE id = 3"),
        "{streamed}"
    );
    // The client going away cancels its request.
    let _ = Command::new("pkill")
        .args(["-f", "DELETE FROM orders WHERE id = 3"])
        .status();
    let _ = held.wait();
    assert_eq!(
        r.curl("GET", "/v1/requests", Some(&daemon), None).status,
        200
    );

    // A token file others can read is not used at all.
    let tokens = r.dir.path().join("reviewer-tokens");
    set_mode(&tokens, 0o644);
    let unsafe_file = r.curl("GET", "/v1/requests", Some(&daemon), None);
    assert_eq!(unsafe_file.status, 401, "{}", unsafe_file.body);
    assert!(
        unsafe_file.body.contains("not safe"),
        "{}",
        unsafe_file.body
    );
    r.g.agent
        .wait_for_log(
            |l| {
                l["fields"]["message"]
                    .as_str()
                    .or(l["message"].as_str())
                    .is_some_and(|m| m.contains("the token file is not used"))
            },
            Duration::from_secs(5),
        )
        .unwrap();
    set_mode(&tokens, 0o600);
    assert_eq!(
        r.curl("GET", "/v1/requests", Some(&daemon), None).status,
        200
    );
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The first pending request whose statement is `statement`, listing
/// with `token`.
fn pending_with(r: &Remote, token: &str, statement: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = r.curl("GET", "/v1/requests", Some(token), None);
        assert_eq!(answer.status, 200, "{}", answer.body);
        let found = answer
            .json()
            .as_array()
            .and_then(|a| a.iter().find(|v| v["text"] == statement).cloned());
        if let Some(view) = found {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "{statement} never became pending: {}",
            answer.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_reviewer_signs_in_to_the_web_page_in_a_real_browser_sees_requests_arrive_live_approves_and_signs_out(
) {
    if !is_root() {
        eprintln!("skipped: needs root (cgroups, runuser, a token file owned by root)");
        return;
    }
    if !chromium_available() {
        eprintln!(
            "skipped: /usr/bin/chromium or /usr/bin/chromedriver is absent (scripts/setup.sh installs Debian's chromium and chromium-driver)"
        );
        return;
    }
    let mut r = Remote::start();
    let bin = r.token("web-bin", "bin");

    let browser = Browser::start(true).unwrap();
    browser
        .open(&format!("https://127.0.0.1:{}/", r.api_port))
        .unwrap();
    // Not signed in: the page asks for a token, without an error yet.
    let input = browser
        .wait_for_displayed("#token", Duration::from_secs(20))
        .unwrap();
    let first = browser
        .execute("return document.querySelector('#status').textContent;")
        .unwrap();
    assert_eq!(first, "", "an error before any token was given");
    let sign_in = browser
        .wait_for_displayed("#sign-in", Duration::from_secs(5))
        .unwrap();
    // A wrong token is refused with the reason; the form stays.
    browser
        .type_into(&input, &format!("tgr_{}", "0".repeat(64)))
        .unwrap();
    browser.click(&sign_in).unwrap();
    browser
        .wait_for_text(
            "Sign in again: unknown or revoked reviewer token",
            Duration::from_secs(10),
        )
        .unwrap();
    let input = browser
        .wait_for_displayed("#token", Duration::from_secs(5))
        .unwrap();
    browser.type_into(&input, &bin).unwrap();
    browser.click(&sign_in).unwrap();

    // Signed in with nothing pending: who is signed in, the watch stream
    // open.
    browser
        .wait_for_text(
            "No statements are waiting for review.",
            Duration::from_secs(20),
        )
        .unwrap();
    browser
        .wait_for_text("bin (token:web-bin)", Duration::from_secs(5))
        .unwrap();
    browser
        .wait_for_displayed("#live.live", Duration::from_secs(10))
        .unwrap();
    browser
        .wait_for_displayed("#sign-out", Duration::from_secs(5))
        .unwrap();

    // A statement held now shows within 5 s: the list was loaded at sign-in
    // and the fallback poll comes only every 30 s, so only the watch
    // stream can bring it that soon.
    let statement = "DELETE FROM orders WHERE id = 3 RETURNING id, note";
    let started = Instant::now();
    let mut psql = r.spawn_psql(statement);
    let shown = browser
        .wait_for_text(statement, Duration::from_secs(5))
        .unwrap_or_else(|e| {
            let _ = psql.kill();
            panic!("the held statement did not show within 5 s of psql starting: {e:#}")
        });
    let arrived = started.elapsed();
    eprintln!("the held statement showed {arrived:?} after psql started");
    assert!(arrived < Duration::from_secs(5), "shown after {arrived:?}");
    let view = r.pending(&bin, &mut psql);
    let id = view["id"].as_str().unwrap().to_owned();
    for wanted in [
        id.as_str(),
        "review-deletes: deletes in production need a second pair of eyes",
        "daemon (uid 1)",
        "postgres",
        "psql",
    ] {
        assert!(shown.contains(wanted), "{wanted} not in:\n{shown}");
    }
    assert_eq!(r.count(), "20");

    // A reason typed, then the focus elsewhere: another request arrives and
    // the card is renewed, with what was typed.
    let card = format!("article.request[data-id=\"{id}\"]");
    let reason = browser
        .wait_for_displayed(&format!("{card} input.reason"), Duration::from_secs(5))
        .unwrap();
    browser
        .type_into(&reason, "checked in the browser")
        .unwrap();
    browser
        .execute(&format!(
            "window.typedCard = document.querySelector('{card}'); document.activeElement.blur();"
        ))
        .unwrap();
    let second = "DELETE FROM orders WHERE id = 4";
    let mut second_psql = r.spawn_psql(second);
    browser
        .wait_for_text(second, Duration::from_secs(5))
        .unwrap_or_else(|e| {
            let _ = second_psql.kill();
            panic!("the second statement did not show within 5 s: {e:#}")
        });
    let kept = browser
        .execute(&format!(
            "return [document.contains(window.typedCard), document.querySelector('{card} input.reason').value];"
        ))
        .unwrap();
    assert_eq!(
        kept,
        serde_json::json!([false, "checked in the browser"]),
        "the card is renewed with the reason typed"
    );

    let approve = browser
        .wait_for_displayed(&format!("{card} button.approve"), Duration::from_secs(5))
        .unwrap();
    browser.click(&approve).unwrap();
    browser
        .wait_for_text(&format!("Approved {id}"), Duration::from_secs(10))
        .unwrap();

    let (success, stdout, stderr) = finish(psql);
    assert!(success, "{stderr}");
    assert_eq!(stdout.lines().next(), Some("3|n3"), "{stdout}");
    assert_eq!(r.count(), "19");
    let shown = r.show(&id);
    assert_eq!(shown["approvals"][0]["via"], "token:web-bin");
    assert_eq!(shown["approvals"][0]["reason"], "checked in the browser");
    let recorded = recorded_approval(&r, &view);
    assert_eq!(recorded["via"], "token:web-bin");

    // The second is denied elsewhere; the page follows.
    let second_id = pending_with(&r, &bin, second)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let denied = r.curl(
        "POST",
        &format!("/v1/requests/{second_id}/deny"),
        Some(&bin),
        Some("{\"reason\": \"not this one\"}"),
    );
    assert_eq!(denied.status, 200, "{}", denied.body);
    let (success, _, stderr) = finish(second_psql);
    assert!(!success);
    assert!(stderr.contains("not this one"), "{stderr}");
    assert_eq!(r.count(), "19");
    browser
        .wait_for_text(
            "No statements are waiting for review.",
            Duration::from_secs(5),
        )
        .unwrap();

    // The agent goes away: the page says so, and follows the next agent on
    // the same port by itself (reconnecting after 1 s, 2 s, 4 s, ...).
    r.restart_agent(|| {
        browser
            .wait_for_displayed("#live.reconnecting", Duration::from_secs(10))
            .unwrap();
    });
    browser
        .wait_for_displayed("#live.live", Duration::from_secs(20))
        .unwrap();
    let third = "DELETE FROM orders WHERE id = 5";
    let mut third_psql = r.spawn_psql(third);
    browser
        .wait_for_text(third, Duration::from_secs(5))
        .unwrap_or_else(|e| {
            let _ = third_psql.kill();
            panic!("after the restart, a statement did not show within 5 s: {e:#}")
        });
    let _ = third_psql.kill();
    let _ = third_psql.wait();

    // Signing out forgets the token, stops the stream and asks for one.
    let sign_out = browser
        .wait_for_displayed("#sign-out", Duration::from_secs(5))
        .unwrap();
    browser.click(&sign_out).unwrap();
    browser
        .wait_for_displayed("#token", Duration::from_secs(5))
        .unwrap();
    let after = browser
        .execute(
            "return [sessionStorage.getItem('tollgate-reviewer-token'), \
             document.querySelectorAll('article.request').length, \
             document.querySelector('#empty').hidden, \
             document.querySelector('#sign-out').hidden, \
             document.querySelector('#live').textContent, \
             document.querySelector('#who').textContent];",
        )
        .unwrap();
    assert_eq!(
        after,
        serde_json::json!([null, 0, true, true, "", ""]),
        "signed out"
    );
    assert!(browser
        .page_text()
        .unwrap()
        .contains("Sign in with your reviewer token"));

    // The page on the reviewer socket (reached through a plain TCP bridge
    // that runs as root): no token, no sign-in, no sign-out; the
    // peer is named and the stream is live.
    let bridge = UnixBridge::start(&r.g.agent.dir.path().join("approvals.sock"));
    browser.open(&format!("http://{}/", bridge.addr)).unwrap();
    browser
        .wait_for_displayed("#live.live", Duration::from_secs(10))
        .unwrap();
    browser
        .wait_for_text("root (unix:0)", Duration::from_secs(5))
        .unwrap();
    let on_socket = browser
        .execute(
            "return [document.querySelector('#login').hidden,              document.querySelector('#sign-out').hidden,              document.querySelector('#status').textContent];",
        )
        .unwrap();
    assert_eq!(on_socket, serde_json::json!([true, true, ""]));
}

/// Relays a loopback TCP port to the Unix socket `socket` (a browser
/// cannot open one itself), in a small process of its own: the agent
/// names a socket peer by its executable, and hashing this test binary
/// would take long. Killed on drop.
struct UnixBridge {
    child: Child,
    addr: String,
}

const BRIDGE: &str = r#"
import socket, sys, threading
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(16)
print(server.getsockname()[1], flush=True)
def relay(source, sink):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    try:
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass
while True:
    tcp, _ = server.accept()
    unix = socket.socket(socket.AF_UNIX)
    unix.connect(sys.argv[1])
    threading.Thread(target=relay, args=(tcp, unix), daemon=True).start()
    threading.Thread(target=relay, args=(unix, tcp), daemon=True).start()
"#;

impl UnixBridge {
    fn start(socket: &Path) -> UnixBridge {
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", BRIDGE])
            .arg(socket)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut port = String::new();
        if let Some(out) = child.stdout.take() {
            std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut port).unwrap();
        }
        assert!(!port.trim().is_empty(), "the bridge did not start");
        UnixBridge {
            child,
            addr: format!("127.0.0.1:{}", port.trim()),
        }
    }
}

impl Drop for UnixBridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
