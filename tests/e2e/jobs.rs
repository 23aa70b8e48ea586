//! The job timeline: a shell script under `tollgate exec`, through the real
//! redirect and its process tracepoints, a real psql and a real PostgreSQL;
//! `tollgate jobs show` lists what it did in order.

use std::time::{Duration, Instant};

use serde_json::Value;
use tollgate_tests::*;

const POLICY: &str = r#"
[[rule]]
name = "no-drop"
action = "deny"
[rule.match]
kinds = ["drop"]
"#;

/// An agent governing `tollgate exec` in deny mode, with PostgreSQL on a
/// test address as its one target; removed on drop.
struct Setup {
    agent: Option<Agent>,
    metrics_port: u16,
    config: std::path::PathBuf,
    pg: Postgres,
    addrs: TestAddresses,
    _dir: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        drop(self.agent.take());
        cleanup_redirect(&self.config);
    }
}

impl Setup {
    fn start() -> Setup {
        let addrs = TestAddresses::add();
        let pg = Postgres::start_listening(&[addrs.v4.into()]);
        psql(pg.port, "CREATE TABLE orders (id int)").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_file(POLICY);
        let metrics_port = free_port();
        let agent = Agent::start(&format!(
            "[agent]\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n{}\n\n{}\n[[target]]\nname = \"remote-pg\"\naddress = \"{}\"\nports = [{}]\nprotocol = \"postgres\"\n",
            policy.line,
            redirect_section(dir.path(), "deny"),
            addrs.v4,
            pg.port
        ));
        let keep = dir.path().join("agent.toml");
        std::fs::copy(&agent.config, &keep).unwrap();
        Setup {
            agent: Some(agent),
            metrics_port,
            config: keep,
            pg,
            addrs,
            _dir: dir,
        }
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    fn psql_line(&self, sql: &str) -> String {
        format!(
            "{} -X -A -t -h {} -p {} -U postgres -d postgres -c '{sql}'",
            pg_tool("psql").display(),
            self.addrs.v4,
            self.pg.port
        )
    }

    /// The newest closed job recording that opened `sessions` sessions or
    /// more, as `jobs list --json` shows it.
    fn closed_job(&self, sessions: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = self.agent().cli(&["jobs", "list", "--json"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let jobs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
            if let Some(job) = jobs
                .iter()
                .rev()
                .find(|j| j["complete"] == true && j["sessions"].as_u64() >= Some(sessions))
            {
                return job.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no closed job with {sessions} sessions: {jobs:?}\n{}",
                self.agent().log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn show(&self, job: &str) -> Value {
        let out = self.agent().cli(&["jobs", "show", job, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// The index of the first entry after `from` for which `pred` holds.
fn position(entries: &[Value], from: usize, what: &str, pred: impl Fn(&Value) -> bool) -> usize {
    entries
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, e)| pred(&e["event"]))
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("no {what} after entry {from} in {entries:#?}"))
}

fn is_exec_of(e: &Value, program: &str, arg: &str) -> bool {
    e["type"] == "process_exec"
        && e["exe"].as_str().unwrap_or_default().ends_with(program)
        && e["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap_or_default().contains(arg))
}

fn is_exit_of(e: &Value, pid: &Value) -> bool {
    e["type"] == "process_exit" && &e["pid"] == pid
}

#[test]
fn jobs_show_lists_a_scripts_commands_connects_statements_and_exits_in_order() {
    if let Some(why) = ebpf_unavailable() {
        eprintln!("skipping: {why}");
        return;
    }
    let setup = Setup::start();
    // Several commands, a psql with an allowed and one with a denied
    // statement, a curl to an unlisted address (refused: deny mode), and
    // an exit status of the script's own.
    let script = format!(
        "true; {}; {}; curl -sS --max-time 5 http://192.0.2.10:8080/ 2>/dev/null; echo curl=$?; exit 3",
        setup.psql_line("select 41 + 1"),
        setup.psql_line("drop table orders")
    );
    let out = exec_command(setup.agent(), &["sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.contains("42") && stdout.contains("curl=7"),
        "{stdout}"
    );

    let job = setup.closed_job(2);
    assert_eq!(
        job["commands"].as_u64(),
        Some(4),
        "sh, psql, psql, curl: {job}"
    );
    assert_eq!(job["connects_denied"].as_u64(), Some(1), "{job}");
    assert!(job["cgroup"].as_str().unwrap().contains("/exec-"), "{job}");
    let id = job["job"].as_str().unwrap().to_owned();
    let timeline = setup.show(&id);
    let entries = timeline["entries"].as_array().unwrap();

    let sh = position(entries, 0, "exec of sh", |e| is_exec_of(e, "sh", "curl"));
    let sh_pid = entries[sh]["event"]["pid"].clone();
    let psql1 = position(entries, sh, "the first psql", |e| {
        is_exec_of(e, "psql", "select 41 + 1")
    });
    let psql1_pid = entries[psql1]["event"]["pid"].clone();
    assert_eq!(
        entries[psql1]["event"]["ppid"], sh_pid,
        "the shell ran psql"
    );
    let redirected = position(entries, psql1, "psql's redirected connect", |e| {
        e["type"] == "connect" && e["pid"] == psql1_pid
    });
    assert_eq!(entries[redirected]["event"]["verdict"], "redirect");
    assert_eq!(entries[redirected]["event"]["target"], "remote-pg");
    let session = position(entries, redirected, "the session", |e| {
        e["type"] == "job_session"
    });
    let session_id = entries[session]["event"]["session"]
        .as_str()
        .unwrap()
        .to_owned();
    let allowed = position(entries, session, "the allowed statement", |e| {
        e["type"] == "statement" && e["text"] == "select 41 + 1"
    });
    assert_eq!(entries[allowed]["session"], session_id.as_str());
    assert_eq!(entries[allowed]["event"]["refused"], false);
    let exit1 = position(entries, allowed, "the first psql's exit", |e| {
        is_exit_of(e, &psql1_pid)
    });
    assert_eq!(entries[exit1]["event"]["exit_code"], 0);

    let psql2 = position(entries, exit1, "the second psql", |e| {
        is_exec_of(e, "psql", "drop table orders")
    });
    let psql2_pid = entries[psql2]["event"]["pid"].clone();
    assert_eq!(entries[psql2]["event"]["ppid"], sh_pid);
    let denied = position(entries, psql2, "the refused statement", |e| {
        e["type"] == "statement" && e["text"] == "drop table orders"
    });
    assert_eq!(entries[denied]["event"]["refused"], true);
    assert_eq!(entries[denied]["event"]["rule"], "no-drop");
    let exit2 = position(entries, denied, "the second psql's exit", |e| {
        is_exit_of(e, &psql2_pid)
    });
    assert_eq!(entries[exit2]["event"]["exit_code"], 1);

    let curl = position(entries, exit2, "curl", |e| {
        is_exec_of(e, "curl", "192.0.2.10")
    });
    let curl_pid = entries[curl]["event"]["pid"].clone();
    assert_eq!(entries[curl]["event"]["ppid"], sh_pid);
    let refused = position(entries, curl, "curl's connect", |e| {
        e["type"] == "connect" && e["pid"] == curl_pid
    });
    assert_eq!(entries[refused]["event"]["verdict"], "deny");
    assert_eq!(entries[refused]["event"]["destination"], "192.0.2.10:8080");
    let curl_exit = position(entries, refused, "curl's exit", |e| {
        is_exit_of(e, &curl_pid)
    });
    assert_eq!(entries[curl_exit]["event"]["exit_code"], 7);
    let sh_exit = position(entries, curl_exit, "the shell's exit", |e| {
        is_exit_of(e, &sh_pid)
    });
    assert_eq!(entries[sh_exit]["event"]["exit_code"], 3);
    // The environment is never recorded, only the argument vector.
    let text = serde_json::to_string(&timeline).unwrap();
    assert!(!text.contains("PATH="), "{text}");

    // Linked both ways: the session's recording names the job.
    let export = setup.agent().cli(&["recordings", "export", &session_id]);
    assert!(export.status.success());
    let header: Value = serde_json::from_str(
        String::from_utf8_lossy(&export.stdout)
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["job"]["id"], id.as_str(), "{header}");
    // Exported for a SIEM like a session: one JSON object per record.
    let export = setup.agent().cli(&["recordings", "export", &id]);
    assert!(export.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["protocol"], "job", "{}", lines[0]);
    assert!(
        lines.iter().any(|l| l["event"]["type"] == "process_exec"
            && l["event"]["exe"]
                .as_str()
                .unwrap_or_default()
                .ends_with("curl")),
        "{lines:?}"
    );
    // The job recording is a recording like any other: its chain verifies,
    // and session listings leave it out.
    let verify = setup.agent().cli(&["recordings", "verify", &id]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let sessions = setup.agent().cli(&["recordings", "list", "--json"]);
    let sessions: Vec<Value> = serde_json::from_slice(&sessions.stdout).unwrap();
    assert_eq!(sessions.len(), 2, "{sessions:?}");

    // Status and metrics count the events; nothing was dropped.
    let status = setup.agent().status().unwrap();
    let jobs = &status["redirect"]["jobs"];
    assert!(jobs["events_sent"].as_u64().unwrap() >= 12, "{jobs}");
    assert_eq!(jobs["events_dropped_in_kernel"], 0, "{jobs}");
    let metrics = crate::listener::http_get(setup.metrics_port, "/metrics");
    assert!(
        metrics.contains("tollgate_job_events_total{outcome=\"dropped_in_kernel\"} 0")
            && metrics.contains("tollgate_jobs_open "),
        "{metrics}"
    );

    // The text form, as a responder reads it, by the job's cgroup name.
    let cgroup_name = job["cgroup"].as_str().unwrap().rsplit('/').next().unwrap();
    let out = setup.agent().cli(&["jobs", "show", cgroup_name]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for needle in [
        "exec    pid",
        "select 41 + 1",
        "REFUSED (deny) [rule no-drop] drop table orders",
        "to 192.0.2.10:8080: deny",
        "exit code 3",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

/// A fork bomb that ends: each process starts two more and exits (retrying
/// a fork the process limit refuses), until the file named by its first
/// argument exists or the Unix time in its second has passed. It limits
/// itself to 200 processes of its user (RLIMIT_NPROC, which root would
/// ignore: it refuses to run as root).
const FORK_BOMB: &str = r#"
import os, resource, sys, time
if os.getuid() == 0:
    sys.exit("the fork bomb refuses to run as root")
resource.setrlimit(resource.RLIMIT_NPROC, (200, 200))
stop, deadline = sys.argv[1], float(sys.argv[2])
made = 0
while made < 2 and not os.path.exists(stop) and time.time() < deadline:
    try:
        pid = os.fork()
    except OSError:
        time.sleep(0.001)
        continue
    if pid == 0:
        made = 0
    else:
        made += 1
os._exit(0)
"#;

#[test]
fn a_fork_bomb_in_the_job_does_not_lose_the_psql_events() {
    if let Some(why) = ebpf_unavailable() {
        eprintln!("skipping: {why}");
        return;
    }
    let setup = Setup::start();
    // The bomb runs as nobody under a process limit (RLIMIT_NPROC), so it
    // churns at the limit instead of taking the host down: every process
    // forks two more and exits, until the stop file appears.
    let base = format!("/tmp/tollgate-bomb-{}", std::process::id());
    let (stop, program) = (format!("{base}.stop"), format!("{base}.py"));
    let deadline = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 20;
    let _ = std::fs::remove_file(&stop);
    std::fs::write(&program, FORK_BOMB).unwrap();
    let script = format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 {program} {stop} {deadline} & sleep 1; {}; {}; touch {stop}; wait; exit 0",
        setup.psql_line("select 4242"),
        setup.psql_line("drop table orders"),
    );
    let out = exec_command(setup.agent(), &["sh", "-c", &script])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&stop);
    let _ = std::fs::remove_file(&program);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("4242"), "{stdout}");

    let job = setup.closed_job(2);
    let timeline = setup.show(job["job"].as_str().unwrap());
    let entries = timeline["entries"].as_array().unwrap();
    let forks = entries
        .iter()
        .filter(|e| e["event"]["type"] == "process_fork")
        .count();
    let dropped: u64 = entries
        .iter()
        .filter(|e| e["event"]["type"] == "kernel_events_dropped")
        .map(|e| e["event"]["count"].as_u64().unwrap())
        .sum();
    eprintln!("the bomb: {forks} forks recorded, {dropped} events dropped");
    assert!(forks >= 100, "the bomb did run: {forks} forks");
    let psql1 = position(entries, 0, "the first psql", |e| {
        is_exec_of(e, "psql", "select 4242")
    });
    let psql_pid = entries[psql1]["event"]["pid"].clone();
    let connect = position(entries, psql1, "its connect", |e| {
        e["type"] == "connect" && e["pid"] == psql_pid
    });
    assert_eq!(entries[connect]["event"]["verdict"], "redirect");
    position(entries, connect, "its statement", |e| {
        e["type"] == "statement" && e["text"] == "select 4242"
    });
    let psql2 = position(entries, psql1, "the second psql", |e| {
        is_exec_of(e, "psql", "drop table orders")
    });
    position(entries, psql2, "the refused statement", |e| {
        e["type"] == "statement" && e["refused"] == true
    });
    // And the agent still serves sessions afterwards.
    let after = exec_command(setup.agent(), &["sh", "-c", &setup.psql_line("select 7")])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&after.stdout).contains('7'));
}

/// A CI runner in a governed cgroup runs two jobs in turn (as a GitHub
/// runner's `Runner.Worker` starts each step with the job's environment):
/// each CI job gets a job recording of its own, named by the environment
/// the runner gave it, with its command and its session.
#[test]
fn a_runner_in_the_cgroup_gives_each_ci_job_its_own_recording() {
    if let Some(why) = ebpf_unavailable() {
        eprintln!("skipping: {why}");
        return;
    }
    let setup = Setup::start();
    let runners = tempfile::Builder::new()
        .prefix("tollgate-runner-")
        .tempdir()
        .unwrap();
    let runner = runners.path().join("Runner.Worker");
    std::fs::copy("/bin/sh", &runner).unwrap();
    let step = |run: u32, job: &str, sql: &str| {
        format!(
            "GITHUB_ACTIONS=true GITHUB_REPOSITORY=acme/shop GITHUB_RUN_ID={run} GITHUB_JOB={job} {}",
            setup.psql_line(sql)
        )
    };
    let script = format!(
        "{}; {}; exit 0",
        step(42, "build", "select 4201"),
        step(43, "deploy", "select 4301")
    );
    let out = exec_command(setup.agent(), &[runner.to_str().unwrap(), "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("4201") && stdout.contains("4301"),
        "{stdout}"
    );

    // Both CI jobs close when their processes are done; the runner's own
    // job when its cgroup empties.
    let deadline = Instant::now() + Duration::from_secs(15);
    let jobs = loop {
        let out = setup.agent().cli(&["jobs", "list", "--json"]);
        let jobs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        if jobs.len() == 3 && jobs.iter().all(|j| j["complete"] == true) {
            break jobs;
        }
        assert!(Instant::now() < deadline, "{jobs:#?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let by_ci = |run: &str| {
        jobs.iter()
            .find(|j| {
                j["ci"]
                    .as_str()
                    .is_some_and(|c| c.contains(&format!("run {run} ")))
            })
            .unwrap_or_else(|| panic!("no CI job of run {run}: {jobs:#?}"))
    };
    for (run, job, sql) in [
        ("42", "build", "select 4201"),
        ("43", "deploy", "select 4301"),
    ] {
        let summary = by_ci(run);
        assert!(
            summary["ci"]
                .as_str()
                .unwrap()
                .ends_with(&format!("job {job}")),
            "verified, not claimed: {summary}"
        );
        assert_eq!(summary["commands"], 1, "{summary}");
        assert_eq!(summary["sessions"], 1, "{summary}");
        let timeline = setup.show(summary["job"].as_str().unwrap());
        let entries = timeline["entries"].as_array().unwrap();
        position(entries, 0, "the step's psql", |e| {
            is_exec_of(e, "psql", sql)
        });
        position(entries, 0, "its statement", |e| {
            e["type"] == "statement" && e["text"] == sql
        });
        // Only its own job's statement.
        let statements = entries
            .iter()
            .filter(|e| e["event"]["type"] == "statement")
            .count();
        assert_eq!(statements, 1, "{entries:#?}");
    }
    let runner_job = jobs
        .iter()
        .find(|j| j["ci"].is_null())
        .unwrap_or_else(|| panic!("no runner job: {jobs:#?}"));
    assert_eq!(runner_job["sessions"], 0, "{runner_job}");
}
