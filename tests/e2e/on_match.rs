//! A hand on the offending process: a rule's `on_match` freezes the job
//! (the `tollgate exec` command's cgroup) or kills the process that sent a
//! matching statement, through the real redirect, a real psql and a real
//! PostgreSQL.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tollgate_tests::*;

const POLICY: &str = r#"
[[rule]]
name = "freeze-on-drop"
action = "deny"
on_match = "stop"
on_match_scope = "job"
[rule.match]
kinds = ["drop"]

[[rule]]
name = "kill-on-secrets"
action = "deny"
on_match = "kill"
[rule.match]
tables = ["secrets"]
"#;

/// On drop (a failed assertion included): the job's cgroup thawed and
/// killed, the agent stopped and its redirect removed, so nothing stays
/// frozen or attached.
struct Cleanup {
    cgroup: Option<std::path::PathBuf>,
    agent: Option<Agent>,
    config: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(dir) = &self.cgroup {
            let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        drop(self.agent.take());
        cleanup_redirect(&self.config);
    }
}

#[test]
fn a_matching_statement_freezes_the_job_until_thawed_or_kills_the_process() {
    if let Some(why) = ebpf_unavailable() {
        eprintln!("skipping: {why}");
        return;
    }
    let addrs = TestAddresses::add();
    let pg = Postgres::start_listening(&[addrs.v4.into()]);
    psql(
        pg.port,
        "CREATE TABLE orders (id int); CREATE TABLE secrets (s text)",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(POLICY);
    let agent = Agent::start(&format!(
        "[agent]\n{}\n\n{}\n[[target]]\nname = \"remote-pg\"\naddress = \"{}\"\nports = [{}]\nprotocol = \"postgres\"\n",
        policy.line,
        redirect_section(dir.path(), "pass"),
        addrs.v4,
        pg.port
    ));
    let keep = dir.path().join("agent.toml");
    std::fs::copy(&agent.config, &keep).unwrap();
    let mut cleanup = Cleanup {
        cgroup: None,
        agent: Some(agent),
        config: keep,
    };
    let agent = cleanup.agent.as_ref().unwrap();
    let psql_line = |sql: &str| {
        format!(
            "{} -X -A -t -h {} -p {} -U postgres -d postgres -c '{sql}'",
            pg_tool("psql").display(),
            addrs.v4,
            pg.port
        )
    };

    // The job drops a table: denied, and the whole job is frozen before
    // its next command runs.
    let mut job = exec_command(
        agent,
        &[
            "sh",
            "-c",
            &format!("{}; echo after-the-drop", psql_line("drop table orders")),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let froze = agent
        .wait_for_log(|l| l["event"] == "intervention", Duration::from_secs(10))
        .unwrap();
    assert_eq!(froze["rule"], "freeze-on-drop", "{froze}");
    assert!(froze["error"].is_null(), "{froze}");
    let cgroup = froze["cgroup"].as_str().unwrap().to_owned();
    assert!(cgroup.contains("/exec-"), "only the job's cgroup: {cgroup}");
    let job_dir = cgroup_mount().join(cgroup.trim_start_matches('/'));
    cleanup.cgroup = Some(job_dir.clone());
    let events = job_dir.join("cgroup.events");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&events)
        .unwrap()
        .contains("frozen 1")
    {
        assert!(Instant::now() < deadline, "the job was not frozen");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Frozen: the job goes no further, and status lists it.
    std::thread::sleep(Duration::from_millis(500));
    assert!(job.try_wait().unwrap().is_none(), "a frozen job finished");
    let status = agent.cli(&["status"]);
    let status_text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status_text.contains("Stopped by on_match") && status_text.contains(&cgroup),
        "{status_text}"
    );
    let thawed = std::process::Command::new(agent_binary())
        .args(["thaw", &cgroup])
        .output()
        .unwrap();
    assert!(
        thawed.status.success(),
        "{}",
        String::from_utf8_lossy(&thawed.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = job.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the thawed job did not finish");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success());
    let mut out = String::new();
    job.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let mut err = String::new();
    job.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(out.contains("after-the-drop"), "{out}");
    assert!(err.contains("denied by rule \"freeze-on-drop\""), "{err}");
    assert_eq!(
        psql(
            pg.port,
            "select count(*) from pg_tables where tablename = 'orders'"
        )
        .unwrap(),
        "1"
    );
    let status = agent.cli(&["status"]);
    assert!(!String::from_utf8_lossy(&status.stdout).contains("Stopped by on_match"));
    // The job's timeline shows the statement, the freeze and what ran
    // after the thaw, in order.
    let name = cgroup.rsplit('/').next().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let timeline = loop {
        let out = agent.cli(&["jobs", "show", name, "--json"]);
        if out.status.success() {
            let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if t["complete"] == true {
                break t;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the job's recording did not close"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let kinds: Vec<&str> = timeline["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["type"].as_str().unwrap())
        .collect();
    let at = |kind: &str| {
        kinds
            .iter()
            .position(|k| *k == kind)
            .unwrap_or_else(|| panic!("no {kind} in {kinds:?}"))
    };
    assert!(at("process_exec") < at("job_session"), "{kinds:?}");
    assert!(at("job_session") < at("statement"), "{kinds:?}");
    assert!(at("job_session") < at("intervention"), "{kinds:?}");
    let exits_after = kinds[at("intervention")..]
        .iter()
        .filter(|k| **k == "process_exit")
        .count();
    assert_eq!(
        exits_after, 3,
        "psql, sh and tollgate exec ended after the thaw: {kinds:?}"
    );

    // A read of secrets kills the psql that sent it; the job goes on.
    let out = exec_command(
        agent,
        &[
            "sh",
            "-c",
            &format!("{}; echo psql-exit-$?", psql_line("select * from secrets")),
        ],
    )
    .output()
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("psql-exit-137"), "killed by SIGKILL: {said}");
    let killed = agent
        .wait_for_log(
            |l| l["event"] == "intervention" && l["rule"] == "kill-on-secrets",
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(killed["action"], "kill", "{killed}");
    // Recorded in the session's recording.
    let session = killed["session"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(500));
    let shown = agent.cli(&["recordings", "show", &session]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("on_match: killed the process pid") && shown.contains("kill-on-secrets"),
        "{shown}"
    );
    let _ = job.wait();
}
