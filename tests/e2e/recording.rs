//! Session recordings from real psql sessions, read back with the CLI.

use std::process::Command;
use std::time::{Duration, Instant};

use tollgate_tests::*;

const POLICY: &str = "[[rule]]\nname = \"no-drop\"\naction = \"deny\"\nmessage = \"not here\"\n[rule.match]\nkinds = [\"drop\"]\n";

fn tollgate(agent: &Agent, args: &[&str]) -> std::process::Output {
    Command::new(agent_binary())
        .args(args)
        .arg("--config")
        .arg(&agent.config)
        .output()
        .unwrap()
}

fn recordings(agent: &Agent, expected: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = tollgate(agent, &["recordings", "list", "--json"]);
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let complete = list.iter().filter(|r| r["complete"] == true).count();
        if complete >= expected || Instant::now() > deadline {
            return list;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_psql_session_is_recorded_shown_verified_and_tampering_is_detected() {
    let pg = Postgres::start();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.toml"), POLICY).unwrap();
    let agent = Agent::start(&listener_config(
        port,
        pg.port,
        &format!("policy_paths = [\"{}\"]", dir.path().display()),
    ));
    let out = psql_command(
        port,
        "create table t (id int); insert into t values (1); select count(*) from t",
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let denied = psql_command(port, "drop table t").output().unwrap();
    assert!(!denied.status.success());

    let list = recordings(&agent, 2);
    assert_eq!(list.len(), 2, "{list:?}");
    let denied_session = list
        .iter()
        .find(|r| r["denied"] == 1)
        .expect("the session with the denial");
    assert_eq!(denied_session["target"], "pg");
    let id = denied_session["id"].as_str().unwrap().to_string();

    let filtered = tollgate(&agent, &["recordings", "list", "--denied", "--json"]);
    let filtered: Vec<serde_json::Value> = serde_json::from_slice(&filtered.stdout).unwrap();
    assert_eq!(filtered.len(), 1);

    // The transcript lists exactly the statements sent and their verdicts.
    let first = list.iter().find(|r| r["denied"] == 0).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let show = tollgate(&agent, &["recordings", "show", &first, "--no-color"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    for statement in [
        "create table t (id int)",
        "insert into t values (1)",
        "select count(*) from t",
    ] {
        assert!(
            text.contains(statement),
            "{statement} missing from:\n{text}"
        );
    }
    let show = tollgate(&agent, &["recordings", "show", &id, "--no-color"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("drop table t") && text.contains("no-drop"),
        "{text}"
    );

    let verify = tollgate(&agent, &["recordings", "verify", "--all"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains("2 verified, 0 failed"));

    let export = tollgate(&agent, &["recordings", "export", &id, "--format", "jsonl"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 4, "header, events, trailer: {lines:?}");

    // One flipped byte in the middle of the file is detected.
    let path = std::path::PathBuf::from(denied_session["path"].as_str().unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let verify = tollgate(&agent, &["recordings", "verify", &id]);
    assert_eq!(
        verify.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

#[test]
fn a_killed_agent_leaves_readable_recordings() {
    let pg = Postgres::start();
    let port = free_port();
    let agent = Agent::start(&listener_config(port, pg.port, ""));
    let child = psql_command(port, "select 1; select pg_sleep(30)")
        .spawn()
        .unwrap();
    agent
        .wait_for_log(
            |l| l["statement_action"] == "allow",
            Duration::from_secs(10),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut agent = agent;
    send_signal(agent.child.id(), libc::SIGKILL);
    let _ = agent.child.wait();
    let _ = child.wait_with_output();
    let files: Vec<_> = walk(&agent.recordings());
    assert_eq!(files.len(), 1, "{files:?}");
    let verify = Command::new(agent_binary())
        .args(["recordings", "verify"])
        .arg(&files[0])
        .arg("--config")
        .arg(&agent.config)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&verify.stdout);
    // No trailer (the agent died), but every written record is intact.
    assert_eq!(verify.status.code(), Some(1), "{report}");
    assert!(
        report.contains("trailer") || report.contains("incomplete") || report.contains("cut"),
        "{report}"
    );
    let show = Command::new(agent_binary())
        .args(["recordings", "show", "--no-color"])
        .arg(&files[0])
        .arg("--config")
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&show.stdout).contains("select 1"),
        "{}",
        String::from_utf8_lossy(&show.stdout)
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
