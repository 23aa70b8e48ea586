//! The reviewer API and `tollgate approvals` against a running agent: who
//! may use it (peer credentials), status codes of malformed calls, and the
//! grant store across a restart (written by one agent, listed and revoked
//! through the next).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use tollgate_agent::approval::{Grant, GrantStore, GrantSubject, RequestId};
use tollgate_tests::{agent_binary, Governed};

/// A review rule whose approvers are the `daemon` group: user `daemon`
/// (uid 1, primary group daemon) is a reviewer, `nobody` is not.
const POLICY: &str = r#"
[[rule]]
name = "review-deletes"
action = "review"
approvers = ["group:daemon"]
grant = "1h"
[rule.match]
kinds = ["delete"]
"#;

/// `tollgate approvals ARGS --socket SOCKET`, as `user` (root when `None`).
fn approvals(user: Option<&str>, socket: &Path, args: &[&str]) -> Output {
    let mut cmd = match user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(agent_binary());
            c
        }
        None => Command::new(agent_binary()),
    };
    cmd.arg("approvals")
        .args(args)
        .arg("--socket")
        .arg(socket)
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An HTTP call with curl, as `user`: the status code.
fn http_status(user: &str, socket: &Path, method: &str, path: &str, body: &str) -> String {
    let out = Command::new("runuser")
        .args([
            "-u",
            user,
            "--",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--unix-socket")
        .arg(socket)
        .args(["-X", method, "-H", "content-type: application/json"])
        .args(if body.is_empty() {
            vec![]
        } else {
            vec!["--data-binary", body]
        })
        .arg(format!("http://tollgate{path}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn reviewer_api_serves_approvers_only_and_grants_survive_a_restart() {
    // A grant given before this agent started, as a previous run left it.
    let state = tempfile::tempdir().unwrap();
    let store_path = state.path().join("approvals.redb");
    let now = SystemTime::now();
    let grant = Grant {
        id: RequestId::new(now),
        subject: GrantSubject {
            target: "pg".into(),
            fingerprint: "0123456789abcdef".into(),
            identity: "exe:/usr/bin/psql".into(),
        },
        statement: "DELETE FROM orders WHERE id = 1".into(),
        request: RequestId::new(now),
        session: None,
        rule: "review-deletes".into(),
        approved_by: vec!["daemon".into()],
        created_at: now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        expires_at: (now + Duration::from_secs(3600))
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        revoked_by: None,
        revoked_via: None,
        revoked_at: None,
    };
    GrantStore::open(&store_path, now)
        .unwrap()
        .insert(&grant)
        .unwrap();

    let g = Governed::start(
        POLICY,
        "CREATE TABLE orders (id int);",
        &format!("approvals_store = \"{}\"", store_path.display()),
    );
    // The test's agent directory is private; reviewers must reach the socket.
    std::fs::set_permissions(g.agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = g.agent.dir.path().join("approvals.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o666,
        "peers are authenticated by credentials, not by the file mode"
    );
    let store_mode = std::fs::metadata(&store_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(store_mode, 0o600, "the grant store is root-only");

    // nobody is in no approver group: refused, whatever it asks.
    for args in [
        vec!["list"],
        vec!["grants"],
        vec!["grants", "--revoke", grant.id.as_str()],
    ] {
        let out = approvals(Some("nobody"), &socket, &args);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stdout}{stderr}");
        assert!(
            stderr.contains("refused (HTTP 403): nobody (uid 65534) is not in any approver group"),
            "{args:?}: {stderr}"
        );
    }

    // daemon is a reviewer: nothing is pending yet.
    let out = approvals(Some("daemon"), &socket, &["list"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "no statements are waiting for review\n");
    let out = approvals(Some("daemon"), &socket, &["list", "--json"]);
    assert_eq!(text(&out).0.trim(), "[]");

    // Unknown and malformed ids.
    let unknown = RequestId::new(now);
    let out = approvals(Some("daemon"), &socket, &["show", unknown.as_str()]);
    assert!(
        text(&out).1.contains("refused (HTTP 404): no such request"),
        "{:?}",
        text(&out)
    );
    let out = approvals(
        Some("daemon"),
        &socket,
        &["approve", unknown.as_str(), "--reason", "ok"],
    );
    assert!(
        text(&out).1.contains("refused (HTTP 404)"),
        "{:?}",
        text(&out)
    );
    let out = approvals(
        Some("daemon"),
        &socket,
        &["deny", "not-an-id", "--reason", "no"],
    );
    assert!(
        text(&out).1.contains("refused (HTTP 400)"),
        "{:?}",
        text(&out)
    );

    // Raw calls: malformed bodies, wrong methods, unknown paths.
    let approve_path = format!("/v1/requests/{unknown}/approve");
    #[rustfmt::skip]
    let cases = [
        ("daemon", "POST", approve_path.as_str(), "{not json", "400"),
        ("daemon", "POST", approve_path.as_str(), r#"{"colour": "red"}"#, "400"),
        ("daemon", "POST", approve_path.as_str(), r#"{"grant": "soon"}"#, "400"),
        ("daemon", "POST", approve_path.as_str(), "{}", "404"),
        ("daemon", "DELETE", "/v1/requests", "", "405"),
        ("daemon", "GET", "/v1/nothing", "", "404"),
        ("nobody", "POST", approve_path.as_str(), "{}", "403"),
        ("nobody", "GET", "/v1/nothing", "", "403"),
    ];
    for (user, method, path, body, want) in cases {
        assert_eq!(
            http_status(user, &socket, method, path, body),
            want,
            "{user} {method} {path} {body}"
        );
    }

    // The grant written before the agent started is listed...
    let out = approvals(Some("daemon"), &socket, &["grants"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with(grant.id.as_str()), "{stdout}");
    assert!(stdout.contains("pg  exe:/usr/bin/psql  until "), "{stdout}");
    // ...still there after nobody's refused revocation, and revoked by daemon.
    let out = approvals(
        Some("daemon"),
        &socket,
        &["grants", "--revoke", grant.id.as_str()],
    );
    assert_eq!(
        text(&out).0,
        format!("revoked grant {}\n", grant.id),
        "{:?}",
        text(&out)
    );
    let out = approvals(Some("daemon"), &socket, &["grants"]);
    assert_eq!(text(&out).0, "no grants\n");
    let out = approvals(None, &socket, &["grants", "--all"]);
    assert!(
        text(&out).0.contains("revoked by daemon"),
        "{:?}",
        text(&out)
    );
    let out = approvals(
        Some("daemon"),
        &socket,
        &["grants", "--revoke", grant.id.as_str()],
    );
    assert!(
        text(&out)
            .1
            .contains("refused (HTTP 409): the grant was revoked by daemon already"),
        "{:?}",
        text(&out)
    );
}

#[test]
fn a_review_rule_naming_an_unknown_reviewer_group_stops_the_agent_from_starting() {
    let policy = tollgate_tests::policy_file(
        "[[rule]]\nname = \"review-all\"\naction = \"review\"\napprovers = [\"reviewers:oncall\"]\napprovals = 2\n",
    );
    // No [reviewers.oncall]: refused.
    let mut agent = tollgate_tests::Agent::spawn(&tollgate_tests::listener_config(
        tollgate_tests::free_port(),
        5432,
        &policy.line,
    ));
    let status = tollgate_tests::wait_timeout(&mut agent.child, Duration::from_secs(10))
        .expect("the agent exits");
    assert_eq!(status.code(), Some(1));
    let log = agent.log_text();
    assert!(
        log.contains("rule \"review-all\" names approvers \"reviewers:oncall\", but the configuration has no [reviewers.oncall]"),
        "{log}"
    );
    // One user cannot give two distinct approvals: refused too.
    let config = format!(
        "{}\n[reviewers.oncall]\nusers = [\"alice\"]\n",
        tollgate_tests::listener_config(tollgate_tests::free_port(), 5432, &policy.line)
    );
    let mut agent = tollgate_tests::Agent::spawn(&config);
    let status = tollgate_tests::wait_timeout(&mut agent.child, Duration::from_secs(10))
        .expect("the agent exits");
    assert_eq!(status.code(), Some(1));
    let log = agent.log_text();
    assert!(
        log.contains(
            "rule \"review-all\" needs 2 approvals, but its approver groups have only 1 user"
        ),
        "{log}"
    );
}
