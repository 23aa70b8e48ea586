//! Explicit listeners: psql and pgbench through the proxy, identities,
//! concurrency, failures and graceful shutdown.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tollgate_tests::*;

fn session_started(l: &Value) -> bool {
    l["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("session started"))
}

fn session_closed(l: &Value) -> bool {
    l["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("session closed"))
}

#[test]
fn psql_through_a_listener_is_identified() {
    let pg = Postgres::start();
    let port = free_port();
    let agent = Agent::start(&listener_config(port, pg.port, ""));

    let child = psql_command(port, "select 40 + 2")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    let started = agent
        .wait_for_log(session_started, Duration::from_secs(5))
        .unwrap();
    assert_eq!(started["pid"].as_u64(), Some(u64::from(pid)), "{started}");
    let psql_exe = std::fs::canonicalize(pg_tool("psql")).unwrap();
    assert_eq!(started["exe"].as_str(), psql_exe.to_str(), "{started}");
    let my_uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    assert_eq!(
        started["uid"].as_u64(),
        Some(u64::from(my_uid)),
        "{started}"
    );
    assert_eq!(started["target"], "pg");
    assert_eq!(
        started["exe_sha256"].as_str().map(str::len),
        Some(64),
        "{started}"
    );
    assert!(
        started["cmdline"]
            .as_str()
            .unwrap()
            .contains("select 40 + 2"),
        "{started}"
    );

    let closed = agent
        .wait_for_log(session_closed, Duration::from_secs(5))
        .unwrap();
    assert_eq!(closed["reason"], "completed", "{closed}");
    assert!(closed["bytes_from_client"].as_u64().unwrap() > 0);
    assert!(closed["bytes_from_upstream"].as_u64().unwrap() > 0);
}

#[test]
fn pgbench_simple_and_extended_through_a_listener() {
    let pg = Postgres::start();
    let port = free_port();
    let metrics_port = free_port();
    let agent = Agent::start(&listener_config(
        port,
        pg.port,
        &format!("metrics_listen = \"127.0.0.1:{metrics_port}\""),
    ));

    let pgbench = |args: &[&str]| {
        let out = std::process::Command::new(pg_tool("pgbench"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(args)
            .arg("postgres")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "pgbench {args:?} failed: {text}");
        text
    };
    pgbench(&["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        let text = pgbench(&["-S", "-c", "4", "-j", "2", "-t", "100", "-M", mode]);
        assert!(
            text.contains("number of transactions actually processed: 400/400"),
            "{mode}: {text}"
        );
        assert!(
            text.contains("number of failed transactions: 0"),
            "{mode}: {text}"
        );
    }

    let metrics = http_get(metrics_port, "/metrics");
    let (families, samples) = assert_valid_exposition(&metrics);
    assert!(families >= 20 && samples > families, "{metrics}");
    let connections = metric(&metrics, "tollgate_connections_total{target=\"pg\"}");
    // pgbench -i opens 1 connection (plus one for the vacuum), each run opens 4
    // plus one for its own setup checks.
    assert!(connections >= 13.0, "{metrics}");
    assert!(
        metric(
            &metrics,
            "tollgate_bytes_total{target=\"pg\",direction=\"from_upstream\"}"
        ) > 10_000.0
    );
    assert_eq!(
        metric(&metrics, "tollgate_identity_lookup_seconds_count"),
        connections,
        "{metrics}"
    );
    drop(agent);
}

#[test]
fn concurrent_sessions_appear_in_status_with_their_processes() {
    let pg = Postgres::start();
    let port = free_port();
    let agent = Agent::start(&listener_config(port, pg.port, ""));

    let children: Vec<_> = (0..3)
        .map(|_| {
            psql_command(port, "select pg_sleep(4)")
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let pids: Vec<u64> = children.iter().map(|c| u64::from(c.id())).collect();

    let deadline = Instant::now() + Duration::from_secs(10);
    let sessions = loop {
        let status = agent.status().unwrap();
        let sessions = status["sessions"].as_array().cloned().unwrap_or_default();
        if sessions.len() == 3 || Instant::now() > deadline {
            break sessions;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(sessions.len(), 3, "{sessions:?}");
    let mut seen: Vec<u64> = sessions
        .iter()
        .filter_map(|s| s["info"]["identity"]["pid"].as_u64())
        .collect();
    seen.sort();
    let mut expected = pids.clone();
    expected.sort();
    assert_eq!(seen, expected, "status names each psql's pid");

    // The human-readable table shows the same sessions.
    let table = agent.cli(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("Open sessions: 3"), "{table}");
    for pid in &pids {
        assert!(table.contains(&pid.to_string()), "{table}");
    }

    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
}

#[test]
fn unreachable_upstream_ends_the_client_promptly_with_a_logged_reason() {
    let closed_port = free_port();
    let port = free_port();
    let agent = Agent::start(&listener_config(port, closed_port, ""));

    let began = Instant::now();
    let out = psql_command(port, "select 1").output().unwrap();
    assert!(!out.status.success());
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "took {:?}",
        began.elapsed()
    );

    let closed = agent
        .wait_for_log(session_closed, Duration::from_secs(5))
        .unwrap();
    assert_eq!(
        closed["reason"]
            .as_str()
            .map(|r| r.starts_with("upstream unreachable")),
        Some(true),
        "{closed}"
    );
    assert!(
        closed["reason"]
            .as_str()
            .unwrap()
            .contains("Connection refused"),
        "{closed}"
    );
    assert_eq!(closed["level"], "WARN");
}

#[test]
fn a_silent_client_affects_nobody_and_is_closed_when_idle() {
    let pg = Postgres::start();
    let port = free_port();
    let agent = Agent::start(&listener_config(port, pg.port, "idle_timeout = \"2s\""));

    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(
        psql(port, "select 'others still served'").unwrap(),
        "others still served"
    );

    let began = Instant::now();
    let mut buf = [0u8; 16];
    let n = silent.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the idle session is closed, not answered");
    assert!(began.elapsed() < Duration::from_secs(5));
    let closed = agent.wait_for_log(
        |l| session_closed(l) && l["reason"] == "idle timeout",
        Duration::from_secs(5),
    );
    assert!(closed.is_ok(), "{}", agent.log_text());
}

#[test]
fn a_taken_port_is_a_clear_startup_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut agent = Agent::spawn(&listener_config(port, 5432, ""));
    let status = wait_timeout(&mut agent.child, Duration::from_secs(10)).expect("agent exits");
    assert_eq!(status.code(), Some(1));
    let log = agent.log_text();
    assert!(
        log.contains(&format!(
            "cannot listen on 127.0.0.1:{port} for target \"pg\""
        )) && log.contains("in use"),
        "{log}"
    );
}

#[test]
fn sigterm_drains_open_sessions_and_refuses_new_ones() {
    let pg = Postgres::start();
    let port = free_port();
    let agent = Agent::start(&listener_config(port, pg.port, "shutdown_grace = \"20s\""));

    let long = psql_command(port, "select pg_sleep(2), 'drained'")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    agent
        .wait_for_log(session_started, Duration::from_secs(5))
        .unwrap();
    agent.terminate();
    agent
        .wait_for_log(
            |l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("draining"))
            },
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(!accepts(port), "no new connections while draining");

    let out = long.wait_with_output().unwrap();
    assert!(out.status.success(), "the open session finished normally");
    assert!(String::from_utf8_lossy(&out.stdout).contains("drained"));
    let mut agent = agent;
    let status = wait_timeout(&mut agent.child, Duration::from_secs(10))
        .expect("agent exits after draining");
    assert!(status.success(), "{}", agent.log_text());
    assert!(
        !agent.dir.path().join("control.sock").exists(),
        "control socket removed"
    );
}

#[test]
fn sigterm_closes_sessions_that_outlive_the_grace_period() {
    let pg = Postgres::start();
    let port = free_port();
    let agent = Agent::start(&listener_config(port, pg.port, "shutdown_grace = \"1s\""));

    let long = psql_command(port, "select pg_sleep(30)")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    agent
        .wait_for_log(session_started, Duration::from_secs(5))
        .unwrap();
    let began = Instant::now();
    agent.terminate();
    let mut agent = agent;
    let status = wait_timeout(&mut agent.child, Duration::from_secs(10)).expect("agent exits");
    assert!(status.success());
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    let out = long.wait_with_output().unwrap();
    assert!(!out.status.success(), "the cut session fails on the client");
    let closed = agent.log_lines().into_iter().find(session_closed).unwrap();
    assert_eq!(closed["reason"], "closed at shutdown deadline", "{closed}");
}

pub(crate) fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

pub(crate) fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
}

/// One series' value, scraped now from the agent's metrics on `port`.
pub(crate) fn scraped(port: u16, series: &str) -> u64 {
    metric(&http_get(port, "/metrics"), series) as u64
}

#[test]
fn policy_reloads_on_change_and_sighup_and_keeps_the_old_one_when_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\nkinds = [\"drop\"]\n",
    )
    .unwrap();
    let metrics_port = free_port();
    let agent = Agent::start(&listener_config(
        free_port(),
        free_port(),
        &format!(
            "policy_paths = [\"{}\"]\nmetrics_listen = \"127.0.0.1:{metrics_port}\"",
            dir.path().display()
        ),
    ));
    // The policy in force, as status and the metrics report it: the same
    // digest in both.
    let in_force = || {
        let status = agent.status().unwrap();
        let digest = status["policy"]["digest"].as_str().unwrap().to_owned();
        assert_eq!(digest.len(), 64, "{status}");
        let metrics = http_get(metrics_port, "/metrics");
        assert!(
            metrics.contains(&format!("tollgate_policy_info{{digest=\"{digest}\"}} 1")),
            "{metrics}"
        );
        assert_eq!(metric(&metrics, "tollgate_policy_rules "), 1.0);
        digest
    };
    let first = in_force();
    let reloaded = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let count = agent
                .log_lines()
                .iter()
                .filter(|l| l["message"] == "policy reloaded")
                .count();
            if count >= n || Instant::now() > deadline {
                return count;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // An edit is picked up without a signal.
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"b\"\naction = \"deny\"\n[rule.match]\nkinds = [\"truncate\"]\n",
    )
    .unwrap();
    assert_eq!(reloaded(1), 1, "{}", agent.log_text());
    let second = in_force();
    assert_ne!(first, second, "a new policy has a new digest");
    // An invalid edit keeps the policy in force and says why.
    std::fs::write(&policy, "[[rule]]\nname = \"c\"\naction = \"maybe\"\n").unwrap();
    let failed = agent
        .wait_for_log(
            |l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("policy reload failed"))
            },
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(
        failed["message"].as_str().unwrap().contains("p.toml:3:"),
        "{failed}"
    );
    assert_eq!(in_force(), second, "the invalid edit left it in force");
    // SIGHUP reloads at once.
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"d\"\naction = \"deny\"\n[rule.match]\nkinds = [\"drop\"]\n",
    )
    .unwrap();
    send_signal(agent.child.id(), libc::SIGHUP);
    assert!(reloaded(2) >= 2, "{}", agent.log_text());
    assert!(agent.status().is_ok(), "the agent still runs");
}

#[test]
fn an_upstream_that_does_not_resolve_is_a_clear_error_for_that_session_only() {
    let port = free_port();
    let config = format!(
        "[agent]\n\n[[target]]\nname = \"ghost\"\naddress = \"db.does-not-exist.invalid\"\nports = [5432]\nprotocol = \"postgres\"\n\n\
         [[listener]]\nlisten = \"127.0.0.1:{port}\"\ntarget = \"ghost\"\n"
    );
    let agent = Agent::start(&config);
    let began = Instant::now();
    let out = psql_command(port, "select 1").output().unwrap();
    assert!(!out.status.success());
    assert!(
        began.elapsed() < Duration::from_secs(8),
        "{:?}",
        began.elapsed()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot resolve db.does-not-exist.invalid"),
        "{stderr}"
    );
    assert!(agent.status().is_ok(), "the agent keeps serving");
}

/// With `max_connections = 1` and two listeners, each listener keeps
/// serving: an idle listener holds no permit, so sessions one after the
/// other on the same listener (and then on the other) all run.
#[test]
fn an_idle_listener_holds_no_connection_permit() {
    let pg = Postgres::start();
    let (first, second) = (free_port(), free_port());
    let config = format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:{second}\"\ntarget = \"pg\"\n",
        listener_config(first, pg.port, "max_connections = 1")
    );
    let _agent = Agent::start(&config);
    for (round, port) in [first, first, second, second, first]
        .into_iter()
        .enumerate()
    {
        let out = psql_command(port, &format!("select {round}"))
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "round {round} on port {port}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            round.to_string()
        );
    }
}
