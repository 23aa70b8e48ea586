//! `[protect]`: the cgroup root's programs report, and in deny mode refuse,
//! connections to a protected target that did not come through the
//! redirect: from an ungoverned process, and on a socket created outside a
//! governed cgroup and connected inside it (passed with SCM_RIGHTS, or
//! inherited across fork and exec). As root, with real eBPF, real
//! PostgreSQL (logging every statement) and attackers running as nobody.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tollgate_tests::*;

use crate::listener::{http_get, metric};

/// Skips (with the reason printed) only where the kernel lacks the feature.
macro_rules! require_ebpf {
    () => {
        if let Some(why) = ebpf_unavailable() {
            eprintln!("skipping: {why}");
            return;
        }
    };
}

const NOBODY: u64 = 65534;
const SETPRIV_NOBODY: [&str; 4] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
];

/// The system's interpreter (a user-local one may be out of nobody's reach).
const PYTHON: &str = "/usr/bin/python3";

fn helper() -> PathBuf {
    workspace_root().join("tests/data/socket_pass.py")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The value of `key = "..."` in a configuration text.
fn setting(config: &str, key: &str) -> Option<String> {
    let prefix = format!("{key} = \"");
    config
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim_end_matches('"').to_string())
}

/// A database on a test address with every statement logged, and the
/// agents' configurations, each cleaned up (detached) on drop even when
/// the test fails, so that no protection outlives its test.
struct Setup {
    addrs: TestAddresses,
    pg: Postgres,
    dir: tempfile::TempDir,
    configs: Vec<PathBuf>,
}

impl Setup {
    fn new() -> Setup {
        let addrs = TestAddresses::add();
        let pg = Postgres::start_with(&[addrs.v4.into()], &[], &["-c", "log_statement=all"]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let sockets = dir.path().join("sockets");
        std::fs::create_dir(&sockets).unwrap();
        std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o777)).unwrap();
        Setup {
            addrs,
            pg,
            dir,
            configs: Vec::new(),
        }
    }

    /// A configuration with its own `[redirect]` (pins, port, exec cgroup)
    /// protecting the one target with `protect` (a `[protect]` section or
    /// nothing), kept for the clean-up.
    fn config(&mut self, protect: &str, metrics_port: u16) -> String {
        let n = self.configs.len();
        let section = redirect_section(self.dir.path(), "pass")
            .replace("exec.sock", &format!("exec-{n}.sock"));
        let config = format!(
            "[agent]\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\n{section}\n{protect}\n[[target]]\nname = \"remote-pg\"\naddress = \"{}\"\nports = [{}]\nprotocol = \"postgres\"\n",
            self.addrs.v4, self.pg.port
        );
        let keep = self.dir.path().join(format!("agent-{n}.toml"));
        std::fs::write(&keep, &config).unwrap();
        self.configs.push(keep);
        config
    }

    fn exec_socket(config: &str) -> String {
        setting(config, "exec_socket").unwrap()
    }

    /// nobody, outside every governed cgroup, connects straight to the
    /// target's `host` and runs `select 'marker'`; stays `hold` seconds.
    fn direct(&self, host: &str, marker: &str, hold: u32) -> (u32, Output) {
        let child = Command::new(SETPRIV_NOBODY[0])
            .args(&SETPRIV_NOBODY[1..])
            .arg(PYTHON)
            .arg(helper())
            .args(["connect-new", host, &self.pg.port.to_string(), marker])
            .env("HOLD_SECONDS", hold.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        (pid, child.wait_with_output().unwrap())
    }

    /// nobody, governed (`tollgate exec`), runs psql against the target.
    fn governed_psql(&self, agent: &Agent, sql: &str) -> Output {
        let script = format!(
            "exec setpriv --reuid=65534 --regid=65534 --clear-groups {} -X -A -t -h {} -p {} -U postgres -d postgres -c \"{sql}\"",
            pg_tool("psql").display(),
            self.addrs.v4,
            self.pg.port
        );
        exec_command(agent, &["sh", "-c", &script])
            .output()
            .unwrap()
    }

    /// An unconnected socket made by nobody outside the governed cgroups is
    /// passed (SCM_RIGHTS) to nobody inside one, who connects it to the
    /// target and runs `select 'marker'`. The receiver's output.
    fn passed_socket(&self, agent: &Agent, marker: &str) -> Output {
        let path = self
            .dir
            .path()
            .join("sockets")
            .join(format!("{marker}.sock"));
        let helper = helper();
        let port = self.pg.port.to_string();
        let host = self.addrs.v4.to_string();
        let mut args: Vec<&str> = SETPRIV_NOBODY.to_vec();
        args.extend([
            "env",
            "HOLD_SECONDS=1",
            PYTHON,
            helper.to_str().unwrap(),
            "connect-received",
            path.to_str().unwrap(),
            &host,
            &port,
            marker,
        ]);
        let receiver = exec_command(agent, &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let sender = Command::new(SETPRIV_NOBODY[0])
            .args(&SETPRIV_NOBODY[1..])
            .arg(PYTHON)
            .arg(&helper)
            .args(["send-socket", path.to_str().unwrap()])
            .output()
            .unwrap();
        let out = receiver.wait_with_output().unwrap();
        assert!(
            sender.status.success(),
            "sender: {sender:?}\nreceiver: {out:?}"
        );
        out
    }

    /// nobody, outside the governed cgroups, makes an unconnected socket and
    /// execs `tollgate exec`, whose command (governed) inherits and connects
    /// it.
    fn inherited_socket(&self, config: &str, marker: &str) -> Output {
        Command::new(SETPRIV_NOBODY[0])
            .args(&SETPRIV_NOBODY[1..])
            .arg(PYTHON)
            .arg(helper())
            .args(["inherit", "--"])
            .arg(agent_binary())
            .args(["exec", "--socket", &Setup::exec_socket(config), "--"])
            .args(["env", "HOLD_SECONDS=1", PYTHON])
            .arg(helper())
            .args([
                "connect-fd",
                "{fd}",
                &self.addrs.v4.to_string(),
                &self.pg.port.to_string(),
                marker,
            ])
            .output()
            .unwrap()
    }

    fn assert_server_ran(&self, marker: &str) {
        let log = self.pg.log_text();
        assert!(log.contains(&format!("select '{marker}'")), "{log}");
    }

    fn assert_server_never_saw(&self, marker: &str) {
        let log = self.pg.log_text();
        assert!(!log.contains(marker), "{log}");
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for config in &self.configs {
            cleanup_redirect(config);
        }
    }
}

fn answered(out: &Output, marker: &str) {
    assert!(out.status.success(), "{out:?}");
    assert!(
        text(&out.stdout).contains(&format!("result {marker}")),
        "{out:?}"
    );
}

fn refused(out: &Output) {
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(text(&out.stdout).contains("connect-error EPERM"), "{out:?}");
}

/// The agent's `protect_bypass` log line for process `pid`.
fn bypass_line(agent: &Agent, pred: impl Fn(&Value) -> bool) -> Value {
    agent
        .wait_for_log(
            |l| l["event"] == "protect_bypass" && pred(l),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()))
}

/// This process's cgroup v2 path, as `/proc/self/cgroup` gives it.
fn own_cgroup() -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn audit_logs_and_counts_a_direct_connection_with_its_pid_cgroup_and_exe_and_lets_it_through() {
    require_ebpf!();
    let mut s = Setup::new();
    let metrics_port = free_port();
    let config = s.config("[protect]\nmode = \"audit\"\n", metrics_port);
    let agent = Agent::start(&config);

    let host = s.addrs.v4.to_string();
    let (pid, out) = s.direct(&host, "audit-direct", 2);
    answered(&out, "audit-direct");
    s.assert_server_ran("audit-direct");

    let line = bypass_line(&agent, |l| l["pid"].as_u64() == Some(pid.into()));
    assert_eq!(line["verdict"], "audit", "{line}");
    assert_eq!(line["target_name"], "remote-pg", "{line}");
    assert_eq!(line["uid"].as_u64(), Some(NOBODY), "{line}");
    assert_eq!(
        line["destination"],
        format!("{}:{}", s.addrs.v4, s.pg.port),
        "{line}"
    );
    assert!(
        line["exe"].as_str().is_some_and(|e| e.contains("python3")),
        "{line}"
    );
    assert_eq!(line["cgroup"], own_cgroup(), "{line}");
    assert!(
        line["cgroup_id"].as_u64().is_some_and(|id| id > 0),
        "{line}"
    );
    assert_eq!(line["level"], "WARN", "{line}");

    let metrics = http_get(metrics_port, "/metrics");
    // With the redirect and protect on, every family the agent has.
    assert_valid_exposition(&metrics);
    assert_eq!(
        metric(
            &metrics,
            "tollgate_protect_bypass_attempts_total{target=\"remote-pg\",verdict=\"audit\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "tollgate_protect_kernel_connects_total{outcome=\"audited\"}"
        ),
        1.0
    );
    let check = Command::new(agent_binary())
        .args(["config", "check", "--config"])
        .arg(&s.configs[0])
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let said = text(&check.stdout);
    assert!(
        said.contains("protect (audit): on the cgroup v2 root, connections to these targets that do not come through the redirect are let through, logged and counted"),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "  remote-pg ({} ports {}), and the same ports on this host's local addresses",
            s.addrs.v4, s.pg.port
        )),
        "{said}"
    );
    let shown = text(&agent.cli(&["status"]).stdout);
    assert!(shown.contains("Protect: audit on "), "{shown}");
    assert!(shown.contains("(attached) for remote-pg"), "{shown}");
    assert!(shown.contains("connect4 tollgate_protec"), "{shown}");
    assert!(shown.contains("1 audited, 0 denied"), "{shown}");
    let status = agent.status().unwrap();
    let protect = &status["redirect"]["protect"];
    assert_eq!(protect["mode"], "audit", "{status}");
    assert_eq!(protect["kernel"]["state"], "attached", "{status}");
    assert_eq!(protect["targets"][0], "remote-pg", "{status}");

    // The links' pins removed behind the agent's back: the kernel no longer
    // has the programs, and the status and the log say so.
    let links = PathBuf::from(setting(&config, "pin_dir").unwrap()).join("protect/links");
    for name in ["tollgate_protect4", "tollgate_protect6"] {
        std::fs::remove_file(links.join(name)).unwrap();
    }
    agent
        .wait_for_log(
            |l| {
                l["message"].as_str().is_some_and(|m| {
                    m.starts_with(
                        "the kernel no longer has the protect programs on the cgroup root",
                    )
                })
            },
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    let status = agent.status().unwrap();
    assert_eq!(
        status["redirect"]["protect"]["kernel"]["state"], "detached",
        "{status}"
    );
    let shown = text(&agent.cli(&["status"]).stdout);
    assert!(
        shown.contains("warning: the kernel does not have the protect programs on"),
        "{shown}"
    );
}

#[test]
fn deny_refuses_a_direct_connection_on_every_local_address_while_redirected_and_upstream_connections_work(
) {
    require_ebpf!();
    let mut s = Setup::new();
    let metrics_port = free_port();
    let config = s.config("[protect]\nmode = \"deny\"\n", metrics_port);
    let agent = Agent::start(&config);

    // Straight to the target's address, and to loopback (the target is on
    // this host): refused, and the server never sees the statement.
    let host = s.addrs.v4.to_string();
    let (pid, out) = s.direct(&host, "deny-direct", 0);
    refused(&out);
    let (_, out) = s.direct("127.0.0.1", "deny-loopback", 0);
    refused(&out);
    // The IPv6 program: native IPv6 loopback (the server does not listen
    // there, so without protect this would be ECONNREFUSED, not EPERM), and
    // the target's address v4-mapped on an IPv6 socket.
    let (_, out) = s.direct("::1", "deny-v6-loopback", 0);
    refused(&out);
    let (_, out) = s.direct(&format!("::ffff:{}", s.addrs.v4), "deny-v4-mapped", 0);
    refused(&out);
    let line = bypass_line(&agent, |l| l["pid"].as_u64() == Some(pid.into()));
    assert_eq!(line["verdict"], "deny", "{line}");
    assert_eq!(line["uid"].as_u64(), Some(NOBODY), "{line}");

    // Through the redirect: the governed cgroup's program rewrote the
    // destination to the proxy before the root's program ran, and the
    // agent's own upstream connection to the target is exempt.
    let out = s.governed_psql(&agent, "select 'governed-ok'");
    assert_eq!(text(&out.stdout).trim(), "governed-ok", "{out:?}");
    s.assert_server_ran("governed-ok");
    s.assert_server_never_saw("deny-direct");
    s.assert_server_never_saw("deny-loopback");
    s.assert_server_never_saw("deny-v4-mapped");

    let metrics = http_get(metrics_port, "/metrics");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut counted = 0.0;
    while std::time::Instant::now() < deadline {
        counted = metric(
            &http_get(metrics_port, "/metrics"),
            "tollgate_protect_bypass_attempts_total{target=\"remote-pg\",verdict=\"deny\"}",
        );
        if counted == 4.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(counted, 4.0, "{metrics}");
    let status = agent.status().unwrap();
    let stats = &status["redirect"]["protect"]["stats"];
    assert_eq!(stats["denied"].as_u64(), Some(4), "{status}");
    assert!(stats["exempt"].as_u64().is_some_and(|n| n >= 1), "{status}");
    assert_eq!(stats["audited"].as_u64(), Some(0), "{status}");
}

#[test]
fn a_socket_passed_or_inherited_into_a_governed_cgroup_skips_the_redirect_unless_protect_denies_it()
{
    require_ebpf!();
    let mut s = Setup::new();

    // Without protect: both sockets reach the server, ungoverned (the gap).
    let config = s.config("", free_port());
    let agent = Agent::start(&config);
    let out = s.passed_socket(&agent, "scm-bypass");
    answered(&out, "scm-bypass");
    let out = s.inherited_socket(&config, "inherit-bypass");
    answered(&out, "inherit-bypass");
    s.assert_server_ran("scm-bypass");
    s.assert_server_ran("inherit-bypass");
    assert!(
        !agent.log_lines().iter().any(|l| l["arrival"] == "redirect"),
        "neither came through the redirect: {}",
        agent.log_text()
    );
    drop(agent);
    let first = s.configs[0].clone();
    cleanup_redirect(&first);

    // With protect in deny mode: both refused where they connect.
    let config = s.config("[protect]\nmode = \"deny\"\n", free_port());
    let agent = Agent::start(&config);
    let out = s.passed_socket(&agent, "scm-denied");
    refused(&out);
    let out = s.inherited_socket(&config, "inherit-denied");
    refused(&out);
    s.assert_server_never_saw("scm-denied");
    s.assert_server_never_saw("inherit-denied");
    // The caller was governed; its socket was not.
    let exec_cgroup = setting(&config, "exec_cgroup").unwrap();
    let line = bypass_line(&agent, |l| {
        l["comm"] == "python3"
            && l["cgroup"]
                .as_str()
                .is_some_and(|c| c.contains(&exec_cgroup))
    });
    assert_eq!(line["verdict"], "deny", "{line}");
    // A governed connection on a socket made inside still works.
    let out = s.governed_psql(&agent, "select 'made-inside'");
    assert_eq!(text(&out.stdout).trim(), "made-inside", "{out:?}");
}

#[test]
fn deny_outlives_a_killed_agent_is_readopted_on_restart_and_detach_removes_it() {
    require_ebpf!();
    let mut s = Setup::new();
    let config = s.config("[protect]\nmode = \"deny\"\n", free_port());
    let host = s.addrs.v4.to_string();
    let mut agent = Agent::start(&config);
    let (_, out) = s.direct(&host, "before-kill", 0);
    refused(&out);

    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let (_, out) = s.direct(&host, "while-dead", 0);
    refused(&out);

    let agent = Agent::start(&config);
    agent
        .wait_for_log(
            |l| l["message"] == "re-adopted the pinned protect programs on the cgroup root",
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    let status = agent.status().unwrap();
    let protect = &status["redirect"]["protect"];
    assert_eq!(protect["readopted"], true, "{status}");
    assert_eq!(protect["kernel"]["state"], "attached", "{status}");
    // The new agent's upstream connection is exempt through the old links.
    let out = s.governed_psql(&agent, "select 'after-restart'");
    assert_eq!(text(&out.stdout).trim(), "after-restart", "{out:?}");
    let (_, out) = s.direct(&host, "after-restart-direct", 0);
    refused(&out);
    let pinned: Vec<String> = status["redirect"]["pinned"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect();
    drop(agent);

    let keep: &Path = &s.configs[0];
    let detach = Command::new(agent_binary())
        .args(["detach", "--config"])
        .arg(keep)
        .output()
        .unwrap();
    assert!(detach.status.success(), "{detach:?}");
    assert!(
        text(&detach.stdout).contains("/protect/links/tollgate_protect4"),
        "{detach:?}"
    );
    let (_, out) = s.direct(&host, "after-detach", 0);
    answered(&out, "after-detach");
    s.assert_server_ran("after-detach");
    for marker in ["before-kill", "while-dead", "after-restart-direct"] {
        s.assert_server_never_saw(marker);
    }
    assert!(
        pinned
            .iter()
            .any(|p| p.ends_with("/protect/links/tollgate_protect6")),
        "{pinned:?}"
    );
}

/// A process that gets the pid of an agent that died is not the agent:
/// the exemption of the agent's upstream connections holds for its pid and
/// its start time together (the pid is taken with
/// `/proc/sys/kernel/ns_last_pid`, as root).
#[test]
fn a_process_reusing_a_dead_agents_pid_is_not_exempt() {
    require_ebpf!();
    let mut s = Setup::new();
    let config = s.config("[protect]\nmode = \"deny\"\n", free_port());
    let host = s.addrs.v4.to_string();
    let mut agent = Agent::start(&config);
    let agent_pid = agent.child.id();
    // The agent's own connection is exempt while it runs.
    let out = s.governed_psql(&agent, "select 'while-alive'");
    assert_eq!(text(&out.stdout).trim(), "while-alive", "{out:?}");
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();

    let mut reused = None;
    for attempt in 0..200 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (agent_pid - 1).to_string()).unwrap();
        let marker = format!("reused-pid-{attempt}");
        let (pid, out) = s.direct(&host, &marker, 0);
        if pid == agent_pid {
            reused = Some((marker, out));
            break;
        }
        // Another process took the pid first: this one was refused as any
        // other, and the next attempt tries again.
        refused(&out);
    }
    let (marker, out) = reused.expect("no process got the dead agent's pid in 200 attempts");
    refused(&out);
    s.assert_server_never_saw(&marker);
}
