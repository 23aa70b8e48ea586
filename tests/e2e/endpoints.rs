//! Every endpoint the agent serves (the proxy's listener, the control,
//! reviewer and exec sockets, the metrics endpoint) under a flood of idle
//! connections: the connections served at once stay at each endpoint's
//! limit, the agent's memory stays bounded, and the other endpoints keep
//! answering.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tollgate_tests::{
    cleanup_redirect, ebpf_unavailable, free_port, listener_config, redirect_section, Agent,
    Postgres,
};

use crate::listener::{http_get, metric};

/// Connections per endpoint: more than any endpoint but exec serves at
/// once, and fewer than the kernel keeps waiting in a TCP backlog.
const FLOOD: usize = 1000;
/// The exec socket serves 1024 at once and refuses the rest.
const EXEC_FLOOD: usize = 1100;

enum Target {
    Tcp(u16),
    Unix(PathBuf),
}

/// Opens up to `n` connections to `target` that send nothing, until the
/// kernel's backlog takes no more (a connect that does not complete at
/// once).
async fn flood(target: &Target, n: usize) -> Vec<Box<dyn std::any::Any + Send>> {
    let mut open: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    let wait = Duration::from_millis(200);
    for _ in 0..n {
        let connected: Option<Box<dyn std::any::Any + Send>> = match target {
            Target::Tcp(port) => {
                let connect = tokio::net::TcpStream::connect(("127.0.0.1", *port));
                match tokio::time::timeout(wait, connect).await {
                    Ok(Ok(s)) => Some(Box::new(s)),
                    _ => None,
                }
            }
            Target::Unix(path) => {
                let connect = tokio::net::UnixStream::connect(path);
                match tokio::time::timeout(wait, connect).await {
                    Ok(Ok(s)) => Some(Box::new(s)),
                    _ => None,
                }
            }
        };
        match connected {
            Some(s) => open.push(s),
            None => break,
        }
    }
    open
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Raises this process's open file limit to its hard limit.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct passed by
    // reference, which lives across both calls.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit)
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    assert!(
        limit.rlim_cur >= 4 * 1024 + 256,
        "the open file limit ({}) is too low for the flood",
        limit.rlim_cur
    );
}

fn served(metrics: &str, endpoint: &str) -> f64 {
    metric(
        metrics,
        &format!("tollgate_endpoint_connections{{endpoint=\"{endpoint}\"}}"),
    )
}

#[test]
fn a_flood_of_idle_connections_to_every_endpoint_keeps_the_agent_bounded() {
    raise_open_files_limit();
    let pg = Postgres::start();
    let port = free_port();
    let metrics_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    // The exec socket comes with the redirect.
    let redirect = match ebpf_unavailable() {
        None => redirect_section(dir.path(), "pass"),
        Some(why) => {
            println!("the exec socket is not flooded: {why}");
            String::new()
        }
    };
    let agent = Agent::start(&format!(
        "{}\n{redirect}",
        listener_config(
            port,
            pg.port,
            &format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\nmax_connections = 20"),
        )
    ));
    let pid = agent.child.id();
    let socket = |name: &str| agent.dir.path().join(name);
    let exec_socket = agent_exec_socket(&agent.config);
    let before = rss_kib(pid);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut endpoints = vec![
        ("proxy", Target::Tcp(port), 20.0),
        ("control", Target::Unix(socket("control.sock")), 32.0),
        ("reviewer", Target::Unix(socket("approvals.sock")), 64.0),
    ];
    if let Some(path) = exec_socket {
        endpoints.push(("exec", Target::Unix(path), 1024.0));
    }
    let mut held = Vec::new();
    for (name, target, _) in &endpoints {
        let n = if *name == "exec" { EXEC_FLOOD } else { FLOOD };
        let open = runtime.block_on(flood(target, n));
        assert!(
            open.len() as f64 > 20.0,
            "{name}: only {} connections were made",
            open.len()
        );
        held.push(open);
    }
    std::thread::sleep(Duration::from_millis(500));
    let metrics = http_get(metrics_port, "/metrics");
    for (name, _, limit) in &endpoints {
        assert_eq!(served(&metrics, name), *limit, "{name}: {metrics}");
    }
    if endpoints.iter().any(|(name, _, _)| *name == "exec") {
        let refused = metric(
            &metrics,
            "tollgate_endpoint_connections_refused_total{endpoint=\"exec\"}",
        );
        assert!(refused > 0.0, "{metrics}");
    }
    let grew = rss_kib(pid).saturating_sub(before);
    assert!(grew < 64 * 1024, "the agent grew by {grew} KiB");

    // The metrics endpoint flooded too: the control socket still answers
    // once its own flood is gone.
    drop(held.remove(1));
    let metrics_flood = runtime.block_on(flood(&Target::Tcp(metrics_port), FLOOD));
    assert!(metrics_flood.len() > 16);
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.status().is_err() {
        assert!(Instant::now() < deadline, "status did not answer");
        std::thread::sleep(Duration::from_millis(200));
    }
    let grew = rss_kib(pid).saturating_sub(before);
    assert!(grew < 64 * 1024, "the agent grew by {grew} KiB");

    // Everything closed: the endpoints are idle again and serve.
    drop(metrics_flood);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = http_get(metrics_port, "/metrics");
        let busy: Vec<&str> = endpoints
            .iter()
            .map(|(name, _, _)| *name)
            .filter(|name| served(&metrics, name) > 0.0)
            .collect();
        if busy.is_empty() {
            assert!(
                metric(
                    &metrics,
                    "tollgate_endpoint_connections_accepted_total{endpoint=\"metrics\"}"
                ) > 16.0
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still serving {busy:?}: {metrics}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(tollgate_tests::psql(port, "SELECT 1").unwrap().trim(), "1");
    if !redirect.is_empty() {
        let keep = dir.path().join("agent.toml");
        std::fs::copy(&agent.config, &keep).unwrap();
        drop(agent);
        cleanup_redirect(&keep);
    }
}

/// The exec socket a configuration names, if it has a redirect.
fn agent_exec_socket(config: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(config).unwrap();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("exec_socket = "))
        .map(|v| PathBuf::from(v.trim().trim_matches('"')))
}
