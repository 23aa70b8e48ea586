//! The command line as a user meets it: config errors, status, help.

use std::process::Command;

use tollgate_tests::{agent_binary, free_port, listener_config};

#[test]
fn config_check_points_at_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[agent]\nidle_timeout = \"forever\"\n\n[[listener]]\nlisten = \"127.0.0.1:5000\"\ntarget = \"missing\"\n",
    )
    .unwrap();
    let out = Command::new(agent_binary())
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "invalid config exits 2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let p = path.display();
    assert!(
        stderr.contains(&format!(
            "{p}:2:16: idle_timeout \"forever\" is not a duration"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{p}:6:10: listener names target \"missing\", which is not defined"
        )),
        "{stderr}"
    );
}

#[test]
fn config_check_accepts_a_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("good.toml");
    std::fs::write(&path, listener_config(free_port(), 5432, "")).unwrap();
    let out = Command::new(agent_binary())
        .args(["config", "check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("ok (1 targets, 1 listeners, 0 governed cgroups)"));
}

#[test]
fn run_refuses_an_invalid_config_without_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[[target]]\nname = \"t\"\n").unwrap();
    let out = Command::new(agent_binary())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing field `address`"), "{stderr}");
    assert!(stderr.contains("not starting"), "{stderr}");
}

#[test]
fn status_without_an_agent_says_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let out = Command::new(agent_binary())
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no agent is answering on"), "{stderr}");
    assert!(stderr.contains("is `tollgate run` running"), "{stderr}");
}

#[test]
fn help_lists_every_command() {
    let out = Command::new(agent_binary()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "config", "status", "Exit status"] {
        assert!(help.contains(cmd), "--help lacks {cmd}: {help}");
    }
}
