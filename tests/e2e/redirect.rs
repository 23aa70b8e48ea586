//! The transparent redirect (eBPF), as root: governed processes reach a
//! "remote" PostgreSQL through the proxy without being reconfigured.
//!
//! Each test adds its own non-loopback addresses to `lo` (traffic to them
//! never leaves the host) and runs an agent with its own redirect port, pin
//! directory and exec cgroup.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tollgate_tests::*;

/// Skips (with the reason printed) only where the kernel lacks the feature.
macro_rules! require_ebpf {
    () => {
        if let Some(why) = ebpf_unavailable() {
            eprintln!("skipping: {why}");
            return;
        }
    };
}

/// An agent with the redirect on, cleaned up (pins, cgroups) on drop.
struct Governed {
    agent: Option<Agent>,
    config_text: String,
    pg: Postgres,
    addrs: TestAddresses,
    dir: tempfile::TempDir,
}

impl Governed {
    fn start(unlisted: &str) -> Governed {
        let addrs = TestAddresses::add();
        let pg = Postgres::start_listening(&[addrs.v4.into(), addrs.v6.into()]);
        let dir = tempfile::tempdir().unwrap();
        let config_text = format!(
            "[agent]\n\n{}\n[[target]]\nname = \"remote-pg\"\naddress = \"{}\"\nports = [{}]\nprotocol = \"postgres\"\n\n\
             [[target]]\nname = \"remote-pg6\"\naddress = \"{}/120\"\nports = [{}]\nprotocol = \"postgres\"\n",
            redirect_section(dir.path(), unlisted),
            addrs.v4,
            pg.port,
            addrs.v6,
            pg.port
        );
        let agent = Agent::start(&config_text);
        Governed {
            agent: Some(agent),
            config_text,
            pg,
            addrs,
            dir,
        }
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    /// Runs `sh -c SCRIPT` under `tollgate exec`.
    fn exec_sh(&self, script: &str) -> Output {
        exec_command(self.agent(), &["sh", "-c", script])
            .output()
            .unwrap()
    }

    fn psql_args(&self, host: &str, sql: &str) -> String {
        format!(
            "{} -X -A -t -h {host} -p {} -U postgres -d postgres -c \"{sql}\"",
            pg_tool("psql").display(),
            self.pg.port
        )
    }

    fn sessions_started(&self) -> Vec<Value> {
        self.agent()
            .log_lines()
            .into_iter()
            .filter(|l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("session started"))
            })
            .collect()
    }

    fn config_path(&self) -> PathBuf {
        self.agent().config.clone()
    }
}

impl Drop for Governed {
    fn drop(&mut self) {
        let config = self.config_path();
        let keep = self.dir.path().join("agent.toml");
        let _ = std::fs::copy(&config, &keep);
        drop(self.agent.take());
        cleanup_redirect(&keep);
        let _ = &self.addrs;
        let _ = &self.dir;
        let _ = &self.config_text;
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn exec_psql_to_a_remote_address_goes_through_the_proxy_and_names_the_process() {
    require_ebpf!();
    let g = Governed::start("pass");
    let pidfile = g.dir.path().join("psql.pid");
    // The shell writes its pid, then becomes psql (same pid) as user nobody.
    let script = format!(
        "echo $$ > {}; exec setpriv --reuid=65534 --regid=65534 --clear-groups {}",
        pidfile.display(),
        g.psql_args(
            &g.addrs.v4.to_string(),
            "select inet_client_addr(), 'governed'"
        )
    );
    let out = g.exec_sh(&script);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout(&out), format!("{}|governed", g.addrs.v4));
    let pid: u64 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let started = g
        .agent()
        .wait_for_log(|l| l["arrival"] == "redirect", Duration::from_secs(5))
        .unwrap();
    assert_eq!(started["pid"].as_u64(), Some(pid), "{started}");
    assert_eq!(started["uid"].as_u64(), Some(65534), "{started}");
    let psql = std::fs::canonicalize(pg_tool("psql")).unwrap();
    assert_eq!(started["exe"].as_str(), psql.to_str(), "{started}");
    assert_eq!(started["target"], "remote-pg");
    assert_eq!(
        started["original_destination"].as_str(),
        Some(format!("{}:{}", g.addrs.v4, g.pg.port).as_str())
    );
    assert!(
        started["cgroup"].as_str().unwrap().contains("/exec-"),
        "{started}"
    );
    assert!(started["kernel_cgroup_id"].as_u64().unwrap() > 0);
}

#[test]
fn ipv6_and_v4_mapped_destinations_are_redirected() {
    require_ebpf!();
    let g = Governed::start("pass");
    let out = g.exec_sh(&g.psql_args(&g.addrs.v6.to_string(), "select 'v6'"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout(&out), "v6");
    let mapped = format!("::ffff:{}", g.addrs.v4);
    let out = g.exec_sh(&g.psql_args(&mapped, "select 'mapped'"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout(&out), "mapped");

    let started = g.sessions_started();
    assert_eq!(started.len(), 2, "{started:?}");
    assert_eq!(started[0]["target"], "remote-pg6");
    assert_eq!(
        started[0]["original_destination"].as_str(),
        Some(format!("[{}]:{}", g.addrs.v6, g.pg.port).as_str())
    );
    assert_eq!(started[1]["target"], "remote-pg");
    assert_eq!(
        started[1]["original_destination"].as_str(),
        Some(format!("{}:{}", g.addrs.v4, g.pg.port).as_str())
    );
}

#[test]
fn unlisted_destinations_pass_or_are_denied_by_mode() {
    require_ebpf!();
    // An address no target names (a port the targets do not list).
    let probe = |g: &Governed| {
        let other = std::net::TcpListener::bind((g.addrs.v4, 0)).unwrap();
        let port = other.local_addr().unwrap().port();
        g.exec_sh(&format!(
            "python3 -c \"import socket; socket.create_connection(('{}', {port}), 3); print('connected')\"",
            g.addrs.v4
        ))
    };
    let pass = Governed::start("pass");
    let out = probe(&pass);
    assert_eq!(
        stdout(&out),
        "connected",
        "pass mode lets it through: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(pass.sessions_started().is_empty(), "not proxied");
    drop(pass);

    let deny = Governed::start("deny");
    let out = probe(&deny);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{out:?}"
    );
    // Loopback stays reachable on ports no target names.
    let lo = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let out = deny.exec_sh(&format!(
        "python3 -c \"import socket; socket.create_connection(('127.0.0.1', {}), 3); print('connected')\"",
        lo.local_addr().unwrap().port()
    ));
    assert_eq!(
        stdout(&out),
        "connected",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(deny.sessions_started().is_empty(), "not proxied");
    // Targets are still proxied, and so is the target's port on loopback
    // (the target is on this host).
    let out = deny.exec_sh(&deny.psql_args(&deny.addrs.v4.to_string(), "select 'target'"));
    assert_eq!(
        stdout(&out),
        "target",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = deny.exec_sh(&deny.psql_args("127.0.0.1", "select 'loopback'"));
    assert_eq!(
        stdout(&out),
        "loopback",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(deny.sessions_started().len(), 2);
}

#[test]
fn concurrent_governed_processes_and_an_ungoverned_one() {
    require_ebpf!();
    let g = Governed::start("pass");
    let children: Vec<_> = (0..2)
        .map(|_| {
            exec_command(
                g.agent(),
                &[
                    "sh",
                    "-c",
                    &g.psql_args(&g.addrs.v4.to_string(), "select pg_sleep(3)"),
                ],
            )
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let sessions = loop {
        let s = g.agent().status().unwrap()["sessions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if s.len() == 2 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    let pids: std::collections::HashSet<u64> = sessions
        .iter()
        .filter_map(|s| s["info"]["identity"]["pid"].as_u64())
        .collect();
    assert_eq!(pids.len(), 2, "two distinct processes");
    assert!(sessions.iter().all(|s| s["info"]["arrival"] == "redirect"));

    // A process outside the governed cgroup reaches the server directly.
    let out = Command::new("sh")
        .args([
            "-c",
            &g.psql_args(&g.addrs.v4.to_string(), "select 'direct'"),
        ])
        .output()
        .unwrap();
    assert_eq!(stdout(&out), "direct");
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    assert_eq!(
        g.sessions_started().len(),
        2,
        "the ungoverned session was not proxied"
    );

    let status = g.agent().status().unwrap();
    let redirect = &status["redirect"];
    assert!(
        redirect["kernel"]["redirected"].as_u64().unwrap() >= 2,
        "{redirect}"
    );
    assert!(!redirect["pinned"].as_array().unwrap().is_empty());
}

#[test]
fn exec_propagates_exit_status_and_removes_its_cgroup() {
    require_ebpf!();
    let g = Governed::start("pass");
    let cgfile = g.dir.path().join("cgroup");
    let out = g.exec_sh(&format!(
        "cat /proc/self/cgroup > {}; exit 7",
        cgfile.display()
    ));
    assert_eq!(out.status.code(), Some(7));
    let cgroup = std::fs::read_to_string(&cgfile).unwrap();
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .to_string();
    assert!(path.contains("/exec-"), "{cgroup}");
    let mount = if std::path::Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
        "/sys/fs/cgroup/unified"
    } else {
        "/sys/fs/cgroup"
    };
    let dir = PathBuf::from(format!("{mount}{path}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while dir.exists() {
        assert!(
            Instant::now() < deadline,
            "{} was not removed",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed = exec_command(g.agent(), &["sh", "-c", "kill -TERM $$"])
        .output()
        .unwrap();
    assert_eq!(
        killed.status.code(),
        Some(128 + 15),
        "signals become 128 + signal"
    );
    let missing = exec_command(g.agent(), &["no-such-command-here"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(127));
}

#[test]
fn connections_to_the_redirect_port_without_an_origin_are_closed() {
    require_ebpf!();
    let g = Governed::start("pass");
    let status = g.agent().status().unwrap();
    let listening = status["redirect"]["listening"][0]
        .as_str()
        .unwrap()
        .to_string();
    let mut s = std::net::TcpStream::connect(&listening).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 8];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    g.agent()
        .wait_for_log(
            |l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("without a kernel origin record"))
            },
            Duration::from_secs(5),
        )
        .unwrap();
}

#[test]
fn a_service_cgroup_is_governed_when_it_appears_and_after_it_is_recreated() {
    require_ebpf!();
    let addrs = TestAddresses::add();
    let pg = Postgres::start_listening(&[addrs.v4.into()]);
    let dir = tempfile::tempdir().unwrap();
    let service = format!("tollgate-test-svc-{}", std::process::id());
    let mount = if std::path::Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
        "/sys/fs/cgroup/unified"
    } else {
        "/sys/fs/cgroup"
    };
    let cg = PathBuf::from(mount).join(&service);
    let _ = std::fs::remove_dir(&cg);
    let config = format!(
        "[agent]\n\n{}\n[[cgroup]]\npath = \"{service}\"\n\n[[target]]\nname = \"svc-db\"\naddress = \"{}\"\nports = [{}]\nprotocol = \"postgres\"\n",
        redirect_section(dir.path(), "pass"),
        addrs.v4,
        pg.port
    );
    let agent = Agent::start(&config);
    let keep = dir.path().join("agent.toml");
    std::fs::copy(&agent.config, &keep).unwrap();
    agent
        .wait_for_log(
            |l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("does not exist yet"))
            },
            Duration::from_secs(5),
        )
        .unwrap();

    // The "service" starts: systemd would create its cgroup, then run
    // ExecStartPre=tollgate ensure-governed inside it, then the main process.
    let psql = format!(
        "{} -X -A -t -h {} -p {} -U postgres -d postgres -c \"select 'service'\"",
        pg_tool("psql").display(),
        addrs.v4,
        pg.port
    );
    let run_in_service = |first: &str| {
        std::fs::create_dir_all(&cg).unwrap();
        let script = format!(
            "echo $$ > {}/cgroup.procs && {} ensure-governed --config {} && {first} {psql}",
            cg.display(),
            agent_binary().display(),
            keep.display()
        );
        Command::new("sh").args(["-c", &script]).output().unwrap()
    };
    let out = run_in_service("");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout(&out).contains(&format!("governed: {}", cg.display())),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).ends_with("service"));
    let proxied = |agent: &Agent| {
        agent
            .log_lines()
            .iter()
            .filter(|l| l["arrival"] == "redirect" && l["target"] == "svc-db")
            .count()
    };
    assert_eq!(
        proxied(&agent),
        1,
        "the service's connection went through the proxy"
    );

    // The service restarts: its cgroup is removed and created anew (a new
    // inode without programs); the agent attaches again.
    std::fs::remove_dir(&cg).unwrap();
    std::fs::create_dir(&cg).unwrap();
    agent
        .wait_for_log(
            |l| l["message"] == "governed cgroup appeared; programs attached",
            Duration::from_secs(10),
        )
        .unwrap();
    let out = Command::new("sh")
        .args([
            "-c",
            &format!("echo $$ > {}/cgroup.procs && {psql}", cg.display()),
        ])
        .output()
        .unwrap();
    assert_eq!(
        stdout(&out),
        "service",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(proxied(&agent), 2);

    // A process outside any governed cgroup cannot ask for governance of
    // its own (ungoverned) cgroup. A refusal is final: it is not retried
    // for the time the command waits for an agent that is starting.
    let asked = std::time::Instant::now();
    let refused = Command::new(agent_binary())
        .arg("ensure-governed")
        .arg("--config")
        .arg(&keep)
        .args(["--wait", "60s"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is not a governed [[cgroup]]"));
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(30),
        "a refusal was retried until the wait ran out ({:?})",
        asked.elapsed()
    );

    drop(agent);
    cleanup_redirect(&keep);
    let _ = std::fs::remove_dir(&cg);
}

#[test]
fn psycopg_through_the_redirect() {
    require_ebpf!();
    let governed = PolicyGoverned::start(crate::drivers::SCHEMA, crate::drivers::POLICY, "");
    let script = crate::drivers::psycopg_session(&governed.addrs.v4.to_string(), governed.pg.port);
    let out = exec_command(governed.agent(), &["python3", "-c", &script])
        .output()
        .unwrap();
    crate::drivers::assert_psycopg_session(&out);
    let started = governed.denial_arrived_by_redirect("protect-secrets");
    assert!(
        started["exe"]
            .as_str()
            .is_some_and(|e| e.contains("python3")),
        "{started}"
    );
}

#[test]
fn a_rust_driver_through_the_redirect() {
    require_ebpf!();
    let governed = PolicyGoverned::start(crate::drivers::SCHEMA, crate::drivers::POLICY, "");
    let session = env!("CARGO_BIN_EXE_pg-driver-session");
    let out = exec_command(
        governed.agent(),
        &[
            session,
            &governed.addrs.v4.to_string(),
            &governed.pg.port.to_string(),
        ],
    )
    .output()
    .unwrap();
    crate::drivers::assert_driver_session(&out);
    let started = governed.denial_arrived_by_redirect("protect-secrets");
    assert_eq!(started["exe"].as_str(), Some(session), "{started}");
}

/// A database on a test address, with `setup_sql` run, and an agent
/// redirecting to it under `policy`; the redirect is cleaned up on drop.
struct PolicyGoverned {
    agent: Option<Agent>,
    addrs: TestAddresses,
    pg: Postgres,
    dir: tempfile::TempDir,
}

impl PolicyGoverned {
    /// `agent_extra`: more `[agent]` lines (e.g. client TLS).
    fn start(setup_sql: &str, policy: &str, agent_extra: &str) -> PolicyGoverned {
        let addrs = TestAddresses::add();
        let pg = Postgres::start_listening(&[addrs.v4.into()]);
        psql(pg.port, setup_sql).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.toml"), policy).unwrap();
        let config = format!(
            "[agent]\npolicy_paths = [\"{}\"]\n{agent_extra}\n\n{}\n[[target]]\nname = \"remote-pg\"\naddress = \"{}\"\nports = [{}]\nprotocol = \"postgres\"\n",
            dir.path().join("p.toml").display(),
            redirect_section(dir.path(), "pass"),
            addrs.v4,
            pg.port
        );
        let agent = Agent::start(&config);
        std::fs::copy(&agent.config, dir.path().join("agent.toml")).unwrap();
        PolicyGoverned {
            agent: Some(agent),
            addrs,
            pg,
            dir,
        }
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    /// `psql ARGS... CONNINFO` under `tollgate exec`, CONNINFO naming the
    /// database at its test address (so the connection takes the redirect)
    /// plus `conninfo_extra` (e.g. `sslmode=require`). Its pid is then
    /// [`PolicyGoverned::psql_pid`].
    fn governed_psql(&self, conninfo_extra: &str, args: &[&str]) -> Command {
        let pidfile = self.psql_pidfile();
        let _ = std::fs::remove_file(&pidfile);
        let conninfo = format!(
            "host={} port={} user=postgres dbname=postgres {conninfo_extra}",
            self.addrs.v4, self.pg.port
        );
        let psql = pg_tool("psql");
        let mut command = vec![
            "sh",
            "-c",
            "echo $$ > \"$1\"; shift; exec \"$@\"",
            "sh",
            pidfile.to_str().expect("temporary paths are UTF-8"),
            psql.to_str().expect("the psql path is UTF-8"),
            "-X",
            "-A",
            "-t",
        ];
        command.extend_from_slice(args);
        command.push(&conninfo);
        let mut cmd = exec_command(self.agent(), &command);
        cmd.env("PGCONNECT_TIMEOUT", "10")
            .env_remove("PGSSLMODE")
            .env_remove("PGPASSWORD");
        cmd
    }

    fn psql_pidfile(&self) -> PathBuf {
        self.dir.path().join("psql.pid")
    }

    /// The pid of the psql last started by [`PolicyGoverned::governed_psql`],
    /// waiting for it to start.
    fn psql_pid(&self) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let written = std::fs::read_to_string(self.psql_pidfile()).unwrap_or_default();
            if let Ok(pid) = written.trim().parse() {
                return pid;
            }
            assert!(Instant::now() < deadline, "the governed psql never started");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The "session started" line of the session in which `rule` denied a
    /// statement, checked to have arrived by the redirect.
    fn denial_arrived_by_redirect(&self, rule: &str) -> Value {
        let logs = self.agent().log_lines();
        let denial = logs
            .iter()
            .find(|l| l["statement_action"] == "deny" && l["rule"] == rule)
            .expect("the denial is logged");
        let started = self.session_started(denial);
        assert_eq!(started["arrival"], "redirect", "{started}");
        started
    }

    /// The "session started" line of the session a log line names.
    fn session_started(&self, line: &Value) -> Value {
        let session = &line["session"];
        assert!(session.is_string(), "names no session: {line}");
        self.agent()
            .log_lines()
            .into_iter()
            .find(|l| {
                &l["session"] == session
                    && l["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("session started"))
            })
            .unwrap_or_else(|| panic!("no start of session {session}"))
    }

    /// Asserts that `line`'s session came from governed process `pid`
    /// through the redirect, aimed at the test address.
    fn assert_redirected_from(&self, line: &Value, pid: u32) {
        let started = self.session_started(line);
        assert_eq!(started["arrival"], "redirect", "{started}");
        assert_eq!(started["pid"].as_u64(), Some(pid.into()), "{started}");
        assert_eq!(
            started["original_destination"].as_str(),
            Some(format!("{}:{}", self.addrs.v4, self.pg.port).as_str()),
            "{started}"
        );
    }
}

impl Drop for PolicyGoverned {
    fn drop(&mut self) {
        drop(self.agent.take());
        cleanup_redirect(&self.dir.path().join("agent.toml"));
    }
}

const NO_DROP_POLICY: &str = "[[rule]]\nname = \"no-drop\"\naction = \"deny\"\nmessage = \"not through the redirect either\"\n[rule.match]\nkinds = [\"drop\"]\n";

/// What a client is told when [`NO_DROP_POLICY`] refuses `drop table`.
const DROP_DENIED: &str =
    "tollgate: DROP TABLE denied by rule \"no-drop\": not through the redirect either";

#[test]
fn statements_of_governed_processes_are_decided_through_the_redirect() {
    require_ebpf!();
    let governed = PolicyGoverned::start("create table t (id int)", NO_DROP_POLICY, "");
    let (agent, addrs, pg) = (governed.agent(), &governed.addrs, &governed.pg);
    let host = addrs.v4.to_string();
    let port = pg.port.to_string();
    let psql_bin = pg_tool("psql");
    let psql_args = |sql: &str| {
        vec![
            psql_bin.to_str().unwrap().to_string(),
            "-X".into(),
            "-A".into(),
            "-t".into(),
            "-h".into(),
            host.clone(),
            "-p".into(),
            port.clone(),
            "-U".into(),
            "postgres".into(),
            "-d".into(),
            "postgres".into(),
            "-c".into(),
            sql.to_string(),
        ]
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        exec_command(agent, &refs).output().unwrap()
    };
    let denied = run(psql_args("drop table t"));
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(
        stderr.contains(&format!("ERROR:  {DROP_DENIED}")),
        "{stderr}"
    );
    let ok = run(psql_args(
        "insert into t values (1); select count(*) from t",
    ));
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).trim(),
        "INSERT 0 1\n1",
        "{ok:?}"
    );

    let pgbench = pg_tool("pgbench");
    // pgbench -i drops its tables first, which the policy refuses for
    // governed processes (as it should): initialise from outside.
    let init = Command::new(&pgbench)
        .args([
            "-i",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "postgres",
        ])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    for mode in ["extended", "prepared"] {
        let bench = exec_command(
            agent,
            &[
                pgbench.to_str().unwrap(),
                "-S",
                "-c",
                "2",
                "-t",
                "50",
                "-M",
                mode,
                "-h",
                &host,
                "-p",
                &port,
                "-U",
                "postgres",
                "postgres",
            ],
        )
        .output()
        .unwrap();
        let text = String::from_utf8_lossy(&bench.stdout);
        assert!(
            bench.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&bench.stderr)
        );
        assert!(text.contains("number of failed transactions: 0"), "{text}");
    }
    let logs = agent.log_lines();
    assert!(logs
        .iter()
        .any(|l| l["statement_action"] == "deny" && l["rule"] == "no-drop"));
    assert!(
        logs.iter().filter(|l| l["arrival"] == "redirect").count() >= 5,
        "every session came through the redirect"
    );
}

/// The rest of the PostgreSQL handler through the redirect: `\copy` in,
/// a refused COPY out that sends nothing, pg_dump, and hostile bytes from
/// a governed process that end only its own session.
#[test]
fn copy_pg_dump_and_hostile_input_through_the_redirect() {
    require_ebpf!();
    let governed = PolicyGoverned::start(
        "create table t (x int); create table secrets (s text); insert into secrets values ('k')",
        "[[rule]]\nname = \"no-secrets\"\naction = \"deny\"\nmessage = \"off limits\"\n[rule.match]\ntables = [\"secrets\"]\n",
        "",
    );
    let (agent, addrs, pg) = (governed.agent(), &governed.addrs, &governed.pg);
    let psql_bin = pg_tool("psql");
    let conn = format!("-h {} -p {} -U postgres -d postgres", addrs.v4, pg.port);
    let sh = |script: &str| exec_command(agent, &["sh", "-c", script]).output().unwrap();

    let copied = sh(&format!(
        "printf '1\\n2\\n3\\n' | {} -X -A -t {conn} -c '\\copy t from stdin' -c 'select sum(x) from t'",
        psql_bin.display()
    ));
    assert_eq!(stdout(&copied).trim(), "COPY 3\n6", "{copied:?}");

    let refused = sh(&format!(
        "{} -X -A -t {conn} -c 'copy secrets to stdout'",
        psql_bin.display()
    ));
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(stdout(&refused), "");
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("ERROR:  tollgate: COPY denied by rule \"no-secrets\": off limits"),
        "{refused:?}"
    );

    let dump = sh(&format!(
        "{} {conn} --exclude-table secrets",
        pg_tool("pg_dump").display()
    ));
    assert!(dump.status.success(), "{dump:?}");
    assert!(
        stdout(&dump).contains("COPY public.t (x) FROM stdin;\n1\n2\n3\n"),
        "{dump:?}"
    );

    // A governed process that sends a message type no client sends, after
    // a proper start-up: it gets a FATAL protocol_violation and its session
    // closes, while another governed session is served.
    let hostile = format!(
        r#"
import socket, struct
s = socket.create_connection(("{host}", {port}))
params = b"user\0postgres\0database\0postgres\0\0"
s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
buf = b""
while not buf.endswith(b"Z\0\0\0\x05I"):
    chunk = s.recv(4096)
    assert chunk, buf
    buf += chunk
s.sendall(b"\x01\0\0\0\x04")
rest = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    rest += chunk
print(rest.split(b"\0C")[1].split(b"\0")[0].decode(), rest.count(b"SFATAL"))
"#,
        host = addrs.v4,
        port = pg.port
    );
    let out = exec_command(agent, &["python3", "-c", &hostile])
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), "08P01 1", "{out:?}");
    let still = sh(&format!(
        "{} -X -A -t {conn} -c 'select 7'",
        psql_bin.display()
    ));
    assert_eq!(stdout(&still).trim(), "7", "{still:?}");

    let logs = agent.log_lines();
    assert!(
        logs.iter().filter(|l| l["arrival"] == "redirect").count() >= 5,
        "every session came through the redirect: {}",
        agent.log_text()
    );
}

/// psql's `\conninfo` line for a TLS connection to the agent (rustls
/// follows the client's cipher preference, OpenSSL's).
const TLS_CONNECTION: &str =
    "SSL connection (protocol: TLSv1.3, cipher: TLS_AES_256_GCM_SHA384, compression: off)";

/// Client TLS terminated on redirected connections: a governed psql that
/// insists on TLS (`require`, and `verify-full` against the agent's local
/// CA, whose certificate names the target's IP) gets it, reads results
/// over it, and reads a policy denial (42501) over it.
#[test]
fn governed_clients_get_tls_terminated_on_redirected_connections() {
    require_ebpf!();
    let tls_dir = tempfile::tempdir().unwrap();
    let g = PolicyGoverned::start(
        "create table t (id int)",
        NO_DROP_POLICY,
        &terminating_client_tls(tls_dir.path()),
    );
    let connected = format!(
        "You are connected to database \"postgres\" as user \"postgres\" on host \"{}\" at port \"{}\".",
        g.addrs.v4, g.pg.port
    );

    let out = g
        .governed_psql(
            "sslmode=require",
            &[
                "-v",
                "VERBOSITY=verbose",
                "-c",
                "\\conninfo",
                "-c",
                "select 'over tls'",
                "-c",
                "drop table t",
                "-c",
                "select count(*) from t",
            ],
        )
        .output()
        .unwrap();
    let require_pid = g.psql_pid();
    assert_eq!(
        stdout(&out).lines().collect::<Vec<_>>(),
        [connected.as_str(), TLS_CONNECTION, "over tls", "0"],
        "{out:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("ERROR:  42501: {DROP_DENIED}\n"),
        "{out:?}"
    );
    assert!(out.status.success(), "the last command succeeded: {out:?}");

    let ca = tls_dir.path().join("ca.pem");
    let out = g
        .governed_psql(
            &format!("sslmode=verify-full sslrootcert={}", ca.display()),
            &["-c", "\\conninfo", "-c", "select 'verified'"],
        )
        .output()
        .unwrap();
    let verify_full_pid = g.psql_pid();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out).lines().collect::<Vec<_>>(),
        [connected.as_str(), TLS_CONNECTION, "verified"],
        "{out:?}"
    );

    // Both sessions: redirected from their psql, TLS on the client leg.
    let legs: Vec<Value> = g
        .agent()
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("session legs"))
        })
        .collect();
    assert_eq!(legs.len(), 2, "{legs:?}");
    for (line, pid) in legs.iter().zip([require_pid, verify_full_pid]) {
        assert!(
            line["client_tls"]
                .as_str()
                .is_some_and(|v| v.starts_with("TLSv1")),
            "{line}"
        );
        g.assert_redirected_from(line, pid);
    }
}

/// Ctrl-C in a governed psql: libpq makes its CancelRequest to the target
/// address, like the session itself, so it takes the redirect too, and the
/// agent sends the server's key on. Over a plaintext and a TLS session (the
/// CancelRequest itself is plaintext either way, as libpq sends it).
#[test]
fn ctrl_c_in_a_governed_psql_cancels_through_the_redirect() {
    require_ebpf!();
    let tls_dir = tempfile::tempdir().unwrap();
    let g = PolicyGoverned::start("select 1", "", &terminating_client_tls(tls_dir.path()));
    for (round, sslmode) in ["disable", "require"].into_iter().enumerate() {
        let sql = format!("select pg_sleep(30) as sleep_with_sslmode_{sslmode}");
        let sleeper = g
            .governed_psql(
                &format!("sslmode={sslmode}"),
                &["-v", "VERBOSITY=verbose", "-c", &sql],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = g.psql_pid();
        // Asked of the server directly: cancelling before it runs the
        // statement would cancel nothing.
        let running = format!(
            "select count(*) from pg_stat_activity where state = 'active' and query = '{sql}'"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while psql(g.pg.port, &running).unwrap() != "1" {
            assert!(Instant::now() < deadline, "{sslmode}: never ran");
            std::thread::sleep(Duration::from_millis(20));
        }
        let began = Instant::now();
        send_signal(pid, libc::SIGINT);
        let out = sleeper.wait_with_output().unwrap();
        let elapsed = began.elapsed();
        assert!(elapsed < Duration::from_secs(5), "{sslmode}: {elapsed:?}");
        assert_eq!(out.status.code(), Some(1), "{sslmode}: {out:?}");
        assert_eq!(stdout(&out), "", "{sslmode}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.lines().take(2).collect::<Vec<_>>(),
            [
                "Cancel request sent",
                "ERROR:  57014: canceling statement due to user request"
            ],
            "{sslmode}: {out:?}"
        );

        let forwarded: Vec<Value> = g
            .agent()
            .log_lines()
            .into_iter()
            .filter(|l| l["message"] == "forwarding a CancelRequest upstream")
            .collect();
        assert_eq!(forwarded.len(), round + 1, "{sslmode}: {forwarded:?}");
        g.assert_redirected_from(&forwarded[round], pid);
    }
}

/// A governed client's own CancelRequests take the redirect (new
/// connections to the target address): forged keys cancel nothing, the
/// key it was given cancels its statement.
#[test]
fn cancel_requests_of_a_governed_client_take_the_redirect_and_need_its_key() {
    require_ebpf!();
    let g = PolicyGoverned::start("select 1", "", "");
    let out = exec_command(
        g.agent(),
        &[
            env!("CARGO_BIN_EXE_pg-cancel-probe"),
            &g.addrs.v4.to_string(),
            &g.pg.port.to_string(),
        ],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout_text = stdout(&out);
    let lines: Vec<&str> = stdout_text.lines().collect();
    assert_eq!(lines.len(), 4, "{out:?}");
    let pid: u32 = lines[0]
        .strip_prefix("pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid first: {out:?}"));
    assert_eq!(
        lines[1..3],
        ["forged keys: Ok([\"slept\"])", "own key: Err(\"57014\")"],
        "{out:?}"
    );
    let cancelled_after: u64 = lines[3]
        .strip_prefix("ms after cancel: ")
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no time last: {out:?}"));
    assert!(cancelled_after < 5000, "{cancelled_after} ms");

    // Each CancelRequest came through the redirect from the probe; only
    // the one with its key was sent on.
    let log = g.agent().log_lines();
    let with_message =
        |message: &str| -> Vec<&Value> { log.iter().filter(|l| l["message"] == message).collect() };
    let dropped = with_message("CancelRequest with an unknown key: dropped");
    assert_eq!(dropped.len(), 2, "{dropped:?}");
    let forwarded = with_message("forwarding a CancelRequest upstream");
    assert_eq!(forwarded.len(), 1, "{forwarded:?}");
    for line in dropped.into_iter().chain(forwarded) {
        g.assert_redirected_from(line, pid);
    }
}

/// A target on this host is governed on the host's other addresses as the
/// target, and on the ones it gets after the agent started too: an
/// address added later (an interface coming up) is covered within a
/// look of the agent, and one taken away is dropped.
#[test]
fn a_local_target_is_governed_on_addresses_the_host_gets_after_start() {
    require_ebpf!();
    let g = Governed::start("pass");
    let later = TestAddresses::add();
    let changed = g
        .agent()
        .wait_for_log(
            |l| {
                l["message"]
                    == "this host's addresses changed; the targets on it are governed on its addresses as they are now"
                    && l["added"].as_str().is_some_and(|a| a.contains(&later.v4.to_string()))
            },
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", g.agent().log_text()));
    assert!(changed["added"]
        .as_str()
        .unwrap()
        .contains(&later.v6.to_string()));
    // The connection reaches the proxy, which connects upstream to the
    // destination asked for, where no server listens (the test's server
    // listens only on the addresses it had at start): the proxy's own
    // error says the redirect took it. Not redirected, psql would report
    // the kernel's refusal instead.
    let out = g.exec_sh(&g.psql_args(&later.v4.to_string(), "select 'new-address'"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("FATAL:  tollgate: cannot reach the upstream of target \"remote-pg\""),
        "{stderr}"
    );
    let gone = later.v4.to_string();
    drop(later);
    g.agent()
        .wait_for_log(
            |l| l["removed"].as_str().is_some_and(|r| r.contains(&gone)),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", g.agent().log_text()));
}
