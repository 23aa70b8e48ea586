//! Harness for Tollgate's end-to-end tests: real servers and real clients.
//!
//! - [`Postgres`]: a throwaway PostgreSQL cluster in a temporary directory on
//!   a free port. PostgreSQL refuses to run as root, so when the tests run as
//!   root (as CI does) the server runs as the `postgres` account that Debian's
//!   package creates. A template cluster is made once per run by `initdb` and
//!   copied for each test, which is much faster than `initdb` every time.
//! - [`Agent`]: the real `tollgate` binary (built on first use with the same
//!   cargo that runs the tests) started with a generated configuration, JSON
//!   logs captured for assertions.
//! - [`pg_tool`]: the real `psql`, `pgbench`, ... of the installed PostgreSQL.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub
)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub mod certs;
pub mod mariadb;
pub mod pg_wire;
pub mod review;
pub mod s3;
pub mod sshd;
pub mod webdriver;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The `tollgate` binary, built once per test run so it is never stale.
pub fn agent_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "tollgate-agent",
                "--bin",
                "tollgate",
            ])
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build for the agent");
        assert!(status.success(), "building the tollgate binary failed");
        let bin = target_dir().join("debug").join("tollgate");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
}

/// A TCP port nobody listens on right now, for a server under test to bind.
///
/// The servers (PostgreSQL, the agent's listeners) take their port from a
/// configuration, so the port is chosen before they bind it. Asking the
/// kernel for port 0 and passing the number on is racy: the kernel hands
/// the same ephemeral range to every later `bind(0)` and to every outgoing
/// connection of the parallel suite, so another test's client can take the
/// port before the server binds it. Ports here come from just below the
/// kernel's ephemeral range (`ip_local_port_range`), which the kernel never
/// assigns on its own, and each is handed out once per test process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_low <= SPAN + 1024 {
        // An unusual range leaves no room below it: fall back to the kernel.
        return TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let base = ephemeral_low - SPAN;
    // Two suites on one machine (a checkout and a CI clone) start apart.
    let start = std::process::id() % SPAN;
    for _ in 0..SPAN {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        let port = u16::try_from(base + offset).unwrap();
        let v4 = TcpListener::bind(("0.0.0.0", port));
        let v6 = TcpListener::bind(("::1", port));
        if v4.is_ok() && (v6.is_ok() || !ipv6_loopback()) {
            return port;
        }
    }
    panic!("no free port in {base}..{}", base + SPAN);
}

fn ipv6_loopback() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| TcpListener::bind("[::1]:0").is_ok())
}

/// Checks a `/metrics` answer (the HTTP answer whole, or its body) with the
/// Prometheus project's own parser and the exposition format's rules
/// (tests/data/check_exposition.py); returns the number of families and of
/// samples.
pub fn assert_valid_exposition(metrics: &str) -> (usize, usize) {
    use std::io::Write as _;
    let metrics = match metrics.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/") => {
            assert!(
                head.contains("Content-Type: text/plain; version=0.0.4"),
                "{head}"
            );
            body
        }
        _ => metrics,
    };
    let mut child = Command::new("python3")
        .arg(workspace_root().join("tests/data/check_exposition.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/setup.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "not a valid exposition: {}{stdout}\n{metrics}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut counts = stdout
        .split_whitespace()
        .map(|n| n.parse::<usize>().unwrap());
    (counts.next().unwrap(), counts.next().unwrap())
}

/// The directory holding PostgreSQL's server and client programs.
pub fn pg_bindir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is not installed (run scripts/setup.sh)")
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").exists().then_some((v, bin))
            })
            .collect();
        versions.sort();
        versions
            .pop()
            .expect("no PostgreSQL server under /usr/lib/postgresql (run scripts/setup.sh)")
            .1
    })
}

/// A PostgreSQL client or server program, by name (`psql`, `pgbench`, ...).
pub fn pg_tool(name: &str) -> PathBuf {
    pg_bindir().join(name)
}

/// The uid/gid servers run as: the `postgres` account when we are root.
fn server_account() -> Option<(u32, u32)> {
    if !is_root() {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        match f.as_slice() {
            ["postgres", _, uid, gid, ..] => Some((uid.parse().ok()?, gid.parse().ok()?)),
            _ => None,
        }
    })
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn chown_tree(path: &Path, account: Option<(u32, u32)>) {
    if let Some((uid, gid)) = account {
        let status = Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

fn as_account(cmd: &mut Command, account: Option<(u32, u32)>) {
    if let Some((uid, gid)) = account {
        cmd.uid(uid).gid(gid);
    }
}

fn template_cluster() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let account = server_account();
        let base = tempfile::Builder::new()
            .prefix("tollgate-pg-template-")
            .tempdir()
            .unwrap()
            .keep();
        chown_tree(&base, account);
        let data = base.join("data");
        let mut cmd = Command::new(pg_tool("initdb"));
        cmd.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        as_account(&mut cmd, account);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        data
    })
}

/// A throwaway PostgreSQL server.
pub struct Postgres {
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl Postgres {
    /// Starts a fresh cluster and waits until it accepts connections.
    pub fn start() -> Postgres {
        Postgres::start_listening(&[])
    }

    /// Like [`Postgres::start`], also listening on `extra` addresses (which
    /// must be configured on this host), with trust authentication for them.
    pub fn start_listening(extra: &[std::net::IpAddr]) -> Postgres {
        Postgres::start_with(extra, &[], &[])
    }

    /// Like [`Postgres::start_listening`], with `files` (name, contents)
    /// written into the data directory first (owned by the server's account,
    /// mode 0600) and `args` added to the server's command line, e.g.
    /// `["-c", "ssl=on", "-c", "ssl_cert_file=server.crt", ...]`.
    pub fn start_with(
        extra: &[std::net::IpAddr],
        files: &[(&str, &[u8])],
        args: &[&str],
    ) -> Postgres {
        let account = server_account();
        let dir = tempfile::Builder::new()
            .prefix("tollgate-pg-")
            .tempdir()
            .unwrap()
            .keep();
        let data = dir.join("data");
        let status = Command::new("cp")
            .arg("-a")
            .arg(template_cluster())
            .arg(&data)
            .status()
            .unwrap();
        assert!(status.success(), "copying the template cluster failed");
        chown_tree(&dir, account);
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
        let mut hba = fs::OpenOptions::new()
            .append(true)
            .open(data.join("pg_hba.conf"))
            .unwrap();
        std::io::Write::write_all(
            &mut hba,
            b"host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n",
        )
        .unwrap();
        for (name, contents) in files {
            let path = data.join(name);
            fs::write(&path, contents).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            if let Some((uid, gid)) = account {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
            }
        }
        let mut listen = vec!["127.0.0.1".to_string()];
        listen.extend(extra.iter().map(|a| a.to_string()));
        let port = free_port();
        let log = fs::File::create(dir.join("server.log")).unwrap();
        let mut cmd = Command::new(pg_tool("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                &format!("listen_addresses={}", listen.join(",")),
                "-c",
                "fsync=off",
            ])
            .args([
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=100",
            ])
            .args(args)
            .arg("-k")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(log);
        as_account(&mut cmd, account);
        let child = cmd.spawn().expect("starting postgres");
        let pg = Postgres { port, dir, child };
        pg.wait_ready();
        pg
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let out = Command::new(pg_tool("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-t", "1"])
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "postgres did not become ready: {}",
            fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
    }

    /// What the server wrote to its log so far (start it with
    /// `-c log_statement=all` to see every statement it ran).
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown.
        unsafe_kill(self.child.id(), libc::SIGINT);
        let _ = wait_timeout(&mut self.child, Duration::from_secs(10));
        let _ = self.child.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[allow(unsafe_code)]
fn unsafe_kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a pid we spawned; no memory is shared.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Sends a signal to a process.
pub fn send_signal(pid: u32, signal: i32) {
    unsafe_kill(pid, signal);
}

/// Waits for a child up to `timeout`; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `tollgate` agent.
pub struct Agent {
    /// The agent process.
    pub child: Child,
    /// Its working directory (configuration, control socket, logs).
    pub dir: tempfile::TempDir,
    /// The configuration file.
    pub config: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Writes `config_body` (TOML, without an `[agent]` control_socket, which
    /// is added) and starts `tollgate run`, waiting until it is ready.
    pub fn start(config_body: &str) -> Agent {
        let agent = Agent::spawn(config_body);
        agent
            .wait_for_log(
                |l| l["message"] == "tollgate ready",
                Duration::from_secs(20),
            )
            .unwrap_or_else(|e| panic!("agent did not start: {e}\n{}", agent.log_text()));
        agent
    }

    /// Like [`Agent::start`] but does not wait (for start-up failure tests).
    pub fn spawn(config_body: &str) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-agent-")
            .tempdir()
            .unwrap();
        let config = dir.path().join("tollgate.toml");
        let socket = dir.path().join("control.sock");
        // Every test agent records into its own directory.
        let mut injected = format!("control_socket = \"{}\"", socket.display());
        // And keeps its own reviewer socket and grant store.
        if !config_body.contains("approvals_socket") {
            injected.push_str(&format!(
                "\napprovals_socket = \"{}\"",
                dir.path().join("approvals.sock").display()
            ));
        }
        if !config_body.contains("approvals_store") {
            injected.push_str(&format!(
                "\napprovals_store = \"{}\"",
                dir.path().join("approvals.redb").display()
            ));
        }
        if !config_body.contains("recording_dir") {
            injected.push_str(&format!(
                "\nrecording_dir = \"{}\"",
                dir.path().join("recordings").display()
            ));
        }
        let body = if config_body.contains("[agent]") {
            config_body.replacen("[agent]", &format!("[agent]\n{injected}"), 1)
        } else {
            format!("[agent]\n{injected}\n{config_body}")
        };
        fs::write(&config, body).unwrap();
        let log = dir.path().join("agent.log");
        let child = Command::new(agent_binary())
            .args([
                "run",
                "--log-format",
                "json",
                "--log-level",
                "debug",
                "--config",
            ])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Agent {
            child,
            dir,
            config,
            log,
        }
    }

    /// Where this agent records sessions (unless the test chose another).
    pub fn recordings(&self) -> PathBuf {
        self.dir.path().join("recordings")
    }

    /// The log so far, raw.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log so far, one JSON object per line.
    pub fn log_lines(&self) -> Vec<Value> {
        let Ok(f) = fs::File::open(&self.log) else {
            return Vec::new();
        };
        BufReader::new(f)
            .lines()
            .map_while(|l| l.ok())
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }

    /// Waits for a log line satisfying `pred` and returns it.
    pub fn wait_for_log(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log_lines().into_iter().find(|l| pred(l)) {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                bail!("no matching log line within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The first log line of a statement decided `action` whose `field`
    /// is `value` (within 5 s).
    pub fn wait_for_statement(&self, action: &str, field: &str, value: &str) -> Value {
        self.wait_for_log(
            |l| l["statement_action"] == action && l[field] == value,
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("{action} statement with {field} = {value}: {e}"))
    }

    /// Runs a `tollgate` subcommand against this agent's configuration.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(agent_binary())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap()
    }

    /// `tollgate status --json`, parsed.
    pub fn status(&self) -> Result<Value> {
        let out = self.cli(&["status", "--json"]);
        if !out.status.success() {
            bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).context("status output is not JSON")
    }

    /// Waits up to `timeout` for `done`; on timeout, fails with the log
    /// lines that contain any of `about`.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        about: &[&str],
        mut done: impl FnMut() -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !done() {
            if Instant::now() > deadline {
                let log: Vec<String> = self
                    .log_text()
                    .lines()
                    .filter(|l| about.iter().any(|a| l.contains(a)))
                    .map(str::to_string)
                    .collect();
                panic!(
                    "timed out waiting for {what}; the agent logged:\n{}",
                    log.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        send_signal(self.child.id(), libc::SIGTERM);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `psql` against 127.0.0.1:port as user postgres, running `sql`.
pub fn psql_command(port: u16, sql: &str) -> Command {
    let argv = psql_argv("127.0.0.1", port, "ON_ERROR_STOP=1", sql);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD");
    cmd
}

/// The argument vector, psql's path first, of an unaligned tuples-only
/// psql (no psqlrc) as user `postgres` on database `postgres` at
/// `host`:`port` running `sql`, with psql variable `variable` (such as
/// `ON_ERROR_STOP=1` or `VERBOSITY=verbose`) set.
pub fn psql_argv(host: &str, port: u16, variable: &str, sql: &str) -> Vec<String> {
    let psql = pg_tool("psql").display().to_string();
    let port = port.to_string();
    [
        psql.as_str(),
        "-X",
        "-A",
        "-t",
        "-v",
        variable,
        "-h",
        host,
        "-p",
        &port,
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-c",
        sql,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs psql and returns its trimmed stdout, failing with its stderr.
pub fn psql(port: u16, sql: &str) -> Result<String> {
    let out = psql_command(port, sql).output()?;
    if !out.status.success() {
        bail!(
            "psql failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether something accepts TCP connections on 127.0.0.1:port.
pub fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
    .is_ok()
}

/// The standard output of a command that must have succeeded (its exit
/// status); fails with both outputs otherwise.
pub fn succeeded(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} failed:\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A policy written to a directory of its own (removed on drop), with the
/// `[agent]` line that loads it.
pub struct PolicyFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
    /// `policy_paths = ["..."]`.
    pub line: String,
}

impl PolicyFile {
    /// The file, to rewrite (the agent reloads it).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes `text` as a policy file.
pub fn policy_file(text: &str) -> PolicyFile {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("policy.toml");
    fs::write(&path, text).expect("the policy file is written");
    PolicyFile {
        line: format!("policy_paths = [\"{}\"]", path.display()),
        path,
        _dir: dir,
    }
}

/// A throwaway PostgreSQL with a schema, and an agent enforcing a policy
/// in front of it through a listener (target `pg`).
pub struct Governed {
    /// The server.
    pub pg: Postgres,
    /// The agent.
    pub agent: Agent,
    /// The agent's listener port.
    pub port: u16,
    /// The policy file the agent loads.
    pub policy: PolicyFile,
}

impl Governed {
    /// Starts both: `schema` is run on the server, `agent_extra` goes into
    /// the agent's `[agent]` table.
    pub fn start(policy: &str, schema: &str, agent_extra: &str) -> Governed {
        let pg = Postgres::start();
        psql(pg.port, schema).expect("the schema is created");
        let policy = policy_file(policy);
        let port = free_port();
        let agent = Agent::start(&listener_config(
            port,
            pg.port,
            &format!("{}\n{agent_extra}", policy.line),
        ));
        Governed {
            pg,
            agent,
            port,
            policy,
        }
    }

    /// The agent's listener.
    pub fn addr(&self) -> (&'static str, u16) {
        ("127.0.0.1", self.port)
    }

    /// psql straight to the server, bypassing the agent.
    pub fn server(&self, sql: &str) -> String {
        psql(self.pg.port, sql).expect("psql to the server")
    }
}

/// A configuration with one postgres target and one listener for it.
pub fn listener_config(listen_port: u16, upstream_port: u16, agent_extra: &str) -> String {
    format!(
        "[agent]\n{agent_extra}\n\n[[target]]\nname = \"pg\"\naddress = \"127.0.0.1\"\nports = [{upstream_port}]\nprotocol = \"postgres\"\n\n\
         [[listener]]\nlisten = \"127.0.0.1:{listen_port}\"\ntarget = \"pg\"\n"
    )
}

/// The `[agent]` lines that terminate client TLS with a local CA kept in
/// `tls_dir` (its certificate is `tls_dir/ca.pem`).
pub fn terminating_client_tls(tls_dir: &Path) -> String {
    format!(
        "client_tls = \"terminate\"\ntls_dir = \"{}\"",
        tls_dir.display()
    )
}

/// `tollgate exec --config <agent's config> -- args...`.
pub fn exec_command(agent: &Agent, args: &[&str]) -> Command {
    let mut cmd = Command::new(agent_binary());
    cmd.arg("exec")
        .arg("--config")
        .arg(&agent.config)
        .arg("--")
        .args(args);
    cmd
}

/// Test addresses on the loopback interface, removed on drop. They are not
/// loopback addresses (so they exercise the redirect as a remote database
/// would), yet traffic to them never leaves the host.
pub struct TestAddresses {
    /// An IPv4 address from 198.18.0.0/15 (benchmarking range).
    pub v4: std::net::Ipv4Addr,
    /// An IPv6 address from a ULA prefix.
    pub v6: std::net::Ipv6Addr,
}

/// Whether the test runs as root; when not, says it skips for lack of
/// `what`, which only root may do. Not being root fails under CI, which
/// runs as root.
pub fn root_or_skip(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "tests that need {what} must run as root under CI"
    );
    eprintln!("skipping: not root ({what} needs root; CI runs this)");
    false
}

impl TestAddresses {
    /// [`TestAddresses::add`] when root; `None` (after saying why)
    /// otherwise, a failure under CI, which runs as root.
    pub fn add_as_root() -> Option<TestAddresses> {
        root_or_skip("adding test addresses to lo").then(TestAddresses::add)
    }

    /// Adds a fresh pair of addresses to `lo`. An address already on `lo`
    /// (another test process, or one a killed run left behind) is skipped,
    /// never shared: its owner would delete it under this test.
    pub fn add() -> TestAddresses {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let tag = std::process::id() % 250;
        let add = |args: &[&str]| -> bool {
            let out = Command::new("ip").args(args).output().expect("running ip");
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                return true;
            }
            assert!(
                stderr.contains("File exists") || stderr.contains("already assigned"),
                "ip {args:?}: {stderr}"
            );
            false
        };
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            assert!(n < 250, "no free test address left in 198.18.{tag}.0/24");
            let v4 = std::net::Ipv4Addr::new(198, 18, tag as u8, n as u8);
            let v6: std::net::Ipv6Addr = format!("fd42:7467:{tag:x}::{n:x}").parse().unwrap();
            if !add(&["addr", "add", &format!("{v4}/32"), "dev", "lo"]) {
                continue;
            }
            let v6_args = [
                "-6",
                "addr",
                "add",
                &format!("{v6}/128"),
                "dev",
                "lo",
                "nodad",
            ];
            if !add(&v6_args) {
                let _ = Command::new("ip")
                    .args(["addr", "del", &format!("{v4}/32"), "dev", "lo"])
                    .output();
                continue;
            }
            return TestAddresses { v4, v6 };
        }
    }
}

impl Drop for TestAddresses {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{}/32", self.v4), "dev", "lo"])
            .output();
        let _ = Command::new("ip")
            .args([
                "-6",
                "addr",
                "del",
                &format!("{}/128", self.v6),
                "dev",
                "lo",
            ])
            .output();
    }
}

/// Why the eBPF tests cannot run here, or `None` when they can. Not being
/// root is a failure under CI (which runs as root), a skip elsewhere.
pub fn ebpf_unavailable() -> Option<String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if !mountinfo.lines().any(|l| {
        l.split(" - ")
            .nth(1)
            .is_some_and(|r| r.starts_with("cgroup2 "))
    }) {
        return Some("the kernel has no cgroup v2 hierarchy mounted".into());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("the kernel exposes no BTF".into());
    }
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the eBPF tests must run as root under CI"
        );
        return Some("not root (the eBPF tests need root; CI runs them)".into());
    }
    None
}

/// A small tmpfs mounted on a fresh directory, unmounted on drop: a disk
/// that fills up. `None` (after saying why) when not root; under CI, which
/// runs as root, not being root is a failure.
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (as `mount -o size=`, e.g. "256k").
    pub fn mount(size: &str) -> Option<SmallDisk> {
        if !root_or_skip("mounting a tmpfs") {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("tollgate-small-disk-")
            .tempdir()
            .unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0750")])
            .arg("tollgate-test")
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(SmallDisk { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a filler file until the disk is full; returns its size.
    pub fn fill(&self) -> u64 {
        use std::io::Write;
        let mut f = fs::File::create(self.path().join("filler")).unwrap();
        let chunk = [0xa5u8; 4096];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the small disk: {e}"),
            }
        }
        let _ = f.sync_all();
        written
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: still detaches if something holds a file open on it.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// The `[redirect]` section for a test agent: its own port, pins, exec
/// cgroup and exec socket, so tests never share kernel state.
pub fn redirect_section(dir: &Path, unlisted: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let id = format!("{}-{n}", std::process::id());
    format!(
        "[redirect]\nport = {}\npin_dir = \"/sys/fs/bpf/tollgate-test-{id}\"\nexec_cgroup = \"tollgate-test-{id}.exec\"\nexec_unlisted = \"{unlisted}\"\nexec_socket = \"{}\"\n",
        free_port(),
        dir.join("exec.sock").display()
    )
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup/unified` on hybrid hosts,
/// `/sys/fs/cgroup` otherwise.
pub fn cgroup_mount() -> &'static Path {
    if Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
        Path::new("/sys/fs/cgroup/unified")
    } else {
        Path::new("/sys/fs/cgroup")
    }
}

/// Empty directories (cgroups) removed in order on drop.
pub struct RemovedOnDrop(pub Vec<PathBuf>);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Removes a test agent's pins, pin directory and exec cgroup (after the
/// agent stopped) with `tollgate detach`, as an operator would. A detach
/// that fails, or pins left behind, fail the test (unless it is already
/// failing): a leak here is a flaw in detach.
pub fn cleanup_redirect(config: &Path) {
    let detach = Command::new(agent_binary())
        .arg("detach")
        .arg("--config")
        .arg(config)
        .output();
    let mut problems = Vec::new();
    match &detach {
        Ok(out) if out.status.success() => {}
        Ok(out) => problems.push(format!(
            "tollgate detach --config {} failed ({}): {}",
            config.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => problems.push(format!("cannot run tollgate detach: {e}")),
    }
    let text = fs::read_to_string(config).unwrap_or_default();
    // detach keeps the emptied pin directory; a test's is its own to remove.
    if let Some(pin_dir) = text
        .lines()
        .find_map(|l| l.strip_prefix("pin_dir = \""))
        .map(|l| l.trim_end_matches('"'))
    {
        if let Err(e) = fs::remove_dir(pin_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                problems.push(format!("pin directory {pin_dir} left behind: {e}"));
            }
        }
    }
    if let Some(cg) = text
        .lines()
        .find_map(|l| l.strip_prefix("exec_cgroup = \""))
        .map(|l| l.trim_end_matches('"'))
    {
        let root = cgroup_mount().join(cg);
        if let Ok(entries) = fs::read_dir(&root) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
        let _ = fs::remove_dir(&root);
    }
    if !problems.is_empty() {
        let problems = problems.join("; ");
        if std::thread::panicking() {
            eprintln!("cleanup after a failed test: {problems}");
        } else {
            panic!("{problems}");
        }
    }
}
