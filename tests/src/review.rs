//! What the review tests share: `tollgate approvals` as another user, the
//! requests pending, and the recording of a session once it closed.

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{agent_binary, Agent};

/// `tollgate approvals ARGS --socket SOCKET`, run as Unix user `user`.
pub fn approvals_as(socket: &Path, user: &str, args: &[&str]) -> Output {
    Command::new("runuser")
        .args(["-u", user, "--"])
        .arg(agent_binary())
        .arg("approvals")
        .args(args)
        .arg("--socket")
        .arg(socket)
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .unwrap()
}

/// The requests pending as reviewer `daemon` lists them, once there is
/// one; panics with what `client` printed if it exits first or none comes
/// within 15 s.
pub fn pending_from(socket: &Path, client: &mut Child) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = approvals_as(socket, "daemon", &["list", "--json"]);
        let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(items) = list.as_array().filter(|a| !a.is_empty()) {
            return items.clone();
        }
        if Instant::now() > deadline || client.try_wait().unwrap().is_some() {
            let _ = client.kill();
            panic!(
                "no request became pending; the client said: {}",
                output_of(client)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// All that `client` printed on stdout, then stderr (what is left unread).
pub fn output_of(client: &mut Child) -> String {
    use std::io::Read as _;
    let mut all = String::new();
    if let Some(mut out) = client.stdout.take() {
        let _ = out.read_to_string(&mut all);
    }
    if let Some(mut err) = client.stderr.take() {
        let _ = err.read_to_string(&mut all);
    }
    all
}

/// Its stdout, once `out` succeeded.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A request's id, from its view.
pub fn id_of(view: &Value) -> String {
    view["id"].as_str().unwrap().to_owned()
}

/// The recording events of `session`, as `recordings export --format
/// jsonl` gives them once the session closed.
pub fn recorded_session(agent: &Agent, session: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = agent.cli(&["recordings", "export", session, "--format", "jsonl"]);
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("\"trailer\"") {
            return text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter_map(|r| r.get("event").cloned())
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "the recording of {session} did not close: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `program ARGS` in `cgroup` (a requester's, as a CI job's would be),
/// its output piped.
pub fn spawn_in_cgroup(cgroup: &Path, program: &Path, args: &[String]) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
        .arg(cgroup)
        .arg(program)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}
