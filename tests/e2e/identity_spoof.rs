//! Executable identity through the redirect, as root with eBPF: the
//! executable and start time captured at `connect()` are compared with the
//! process the agent reads at accept.
//!
//! The spoof: a governed process (as nobody) connects, then `execve`s an
//! executable that a policy rule trusts, and that program speaks PostgreSQL
//! on the inherited socket. To make "exec before the agent looks" certain
//! rather than a race, the agent is stopped (SIGSTOP) while the spoofer
//! connects and executes: the kernel records the connection and completes it
//! into the listen backlog without the agent, which accepts it only after
//! the exec is done.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
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

/// Speaks just enough of the PostgreSQL protocol (trust authentication,
/// one simple query) over an inherited socket, or one it opens itself.
/// Prints `OK <rows>` or `ERROR <message>`.
const CLIENT_PY: &str = r#"
import os, socket, struct, sys
mode, arg, sql, marker = sys.argv[1:5]
if mode == "fd":
    sock = socket.socket(fileno=int(arg))
else:
    host, port = arg.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
with open(marker, "w") as f:
    f.write(str(os.getpid()))
def read_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise SystemExit("ERROR connection closed")
        buf += chunk
    return buf
def message():
    tag = read_exact(1)
    (length,) = struct.unpack("!i", read_exact(4))
    return tag, read_exact(length - 4)
params = b"user\0postgres\0database\0postgres\0\0"
sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
while True:
    tag, body = message()
    if tag == b"R" and struct.unpack("!i", body[:4])[0] != 0:
        raise SystemExit("ERROR authentication required")
    if tag == b"E":
        raise SystemExit("ERROR " + body.decode(errors="replace"))
    if tag == b"Z":
        break
q = sql.encode() + b"\0"
sock.sendall(b"Q" + struct.pack("!i", 4 + len(q)) + q)
rows, error = [], None
while True:
    tag, body = message()
    if tag == b"D":
        (n,) = struct.unpack("!h", body[:2])
        at, cols = 2, []
        for _ in range(n):
            (l,) = struct.unpack("!i", body[at:at + 4]); at += 4
            cols.append(body[at:at + l].decode()); at += l
        rows.append("|".join(cols))
    elif tag == b"E":
        fields = dict((f[:1], f[1:]) for f in body.split(b"\0") if f)
        error = fields.get(b"M", b"").decode(errors="replace")
    elif tag == b"Z":
        break
print("ERROR " + error if error is not None else "OK " + ",".join(rows), flush=True)
"#;

/// Waits for a line on stdin, connects (the kernel records this process:
/// python3), then becomes the trusted executable, which talks on the
/// connected socket.
const SPOOF_PY: &str = r#"
import os, socket, sys
addr, trusted, client, sql, marker = sys.argv[1:6]
print("ready", flush=True)
sys.stdin.readline()
host, port = addr.rsplit(":", 1)
sock = socket.create_connection((host, int(port)))
fd = sock.detach()
os.set_inheritable(fd, True)
os.execv(trusted, [trusted, client, "fd", str(fd), sql, marker])
"#;

/// Waits for a line on stdin, connects (the kernel records this process),
/// hands the socket to a child that talks on it, writes its own pid and
/// exits: the pid is free for another process before the agent looks.
const REUSE_PY: &str = r#"
import os, socket, sys
addr, client, sql, marker, pidfile = sys.argv[1:6]
print("ready", flush=True)
sys.stdin.readline()
host, port = addr.rsplit(":", 1)
sock = socket.create_connection((host, int(port)))
fd = sock.detach()
os.set_inheritable(fd, True)
if os.fork() == 0:
    os.execv(sys.executable, [sys.executable, client, "fd", str(fd), sql, marker])
with open(pidfile, "w") as f:
    f.write(str(os.getpid()))
os._exit(0)
"#;

/// An agent redirecting a test address to a database that logs every
/// statement, a policy whose only grant is keyed on an executable, and a
/// directory (readable by nobody) with the scripts and that executable.
struct Spoof {
    agent: Option<Agent>,
    addrs: TestAddresses,
    pg: Postgres,
    dir: tempfile::TempDir,
    trusted: PathBuf,
}

impl Spoof {
    fn start(agent_extra: &str) -> Spoof {
        let addrs = TestAddresses::add();
        let pg = Postgres::start_with(&[addrs.v4.into()], &[], &["-c", "log_statement=all"]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // Where the governed programs (as nobody) write their markers.
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o1777)).unwrap();
        // A copy of the interpreter under its own path: the "trusted tool".
        let trusted = dir.path().join("trusted-tool");
        let python = std::fs::canonicalize("/usr/bin/python3").unwrap();
        std::fs::copy(&python, &trusted).unwrap();
        std::fs::set_permissions(&trusted, std::fs::Permissions::from_mode(0o755)).unwrap();
        for (name, text) in [
            ("client.py", CLIENT_PY),
            ("spoof.py", SPOOF_PY),
            ("reuse.py", REUSE_PY),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let policy = format!(
            "[defaults]\naction = \"deny\"\n\n[[rule]]\nname = \"trusted-tool\"\naction = \"allow\"\n[rule.match]\nexe = [\"{}\"]\n",
            trusted.display()
        );
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
        Spoof {
            agent: Some(agent),
            addrs,
            pg,
            dir,
            trusted,
        }
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    /// The database at its test address: connections to it take the
    /// redirect.
    fn remote(&self) -> String {
        format!("{}:{}", self.addrs.v4, self.pg.port)
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    /// `ARGS` as nobody, governed (`tollgate exec`).
    fn governed_as_nobody(&self, args: &[&str]) -> Command {
        let mut all = vec!["runuser", "-u", "nobody", "--"];
        all.extend_from_slice(args);
        exec_command(self.agent(), &all)
    }

    /// The "session started" log line of the session whose statement
    /// carried `text`.
    fn session_of_statement(&self, text: &str) -> Value {
        let line = self
            .agent()
            .wait_for_log(
                |l| l["text"].as_str().is_some_and(|s| s.contains(text)),
                Duration::from_secs(10),
            )
            .unwrap_or_else(|e| panic!("statement {text}: {e}\n{}", self.agent().log_text()));
        let session = line["session"].clone();
        self.agent()
            .wait_for_log(
                |l| {
                    l["session"] == session
                        && l["message"]
                            .as_str()
                            .is_some_and(|m| m.starts_with("session started"))
                },
                Duration::from_secs(10),
            )
            .unwrap()
    }

    /// The recording header of the session whose log line is `started`.
    fn recording_header(&self, started: &Value) -> Value {
        let id = started["session"].as_str().unwrap();
        self.recording_lines(id)
            .into_iter()
            .find(|l| l["record"] == "header")
            .expect("a header record")
    }

    /// The recording of session `id`, as JSON lines, once it is complete.
    fn recording_lines(&self, id: &str) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = self
                .agent()
                .cli(&["recordings", "export", id, "--format", "jsonl"]);
            let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let closed = lines.iter().any(|l| l["event"]["type"] == "closed");
            if closed || Instant::now() > deadline {
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                return lines;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Spoof {
    fn drop(&mut self) {
        drop(self.agent.take());
        cleanup_redirect(&self.dir.path().join("agent.toml"));
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Waits until `path` exists (written by a child), or panics.
fn wait_for_file(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(15);
    // Written whole: the file exists a moment before its content does.
    let written = || std::fs::read_to_string(path).is_ok_and(|t| !t.trim().is_empty());
    while !written() {
        if let Ok(Some(status)) = child.try_wait() {
            if written() {
                return;
            }
            panic!(
                "the child exited ({status}) before writing {}",
                path.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_exec_after_connect_does_not_inherit_the_trusted_executables_grant() {
    require_ebpf!();
    let spoof = Spoof::start("");
    let remote = spoof.remote();
    let trusted = spoof.trusted.to_str().unwrap().to_owned();
    let client = spoof.path("client.py");

    // No false positive: the trusted executable connecting by itself
    // matches its rule, and the agent says it is the process that connected.
    let marker = spoof.path("out/direct.pid");
    let direct = spoof
        .governed_as_nobody(&[
            &trusted,
            &client,
            "addr",
            &remote,
            "select 'trusted-direct-4411'",
            &marker,
        ])
        .output()
        .unwrap();
    assert_eq!(stdout(&direct), "OK trusted-direct-4411", "{direct:?}");
    let started = spoof.session_of_statement("trusted-direct-4411");
    assert_eq!(started["arrival"], "redirect", "{started}");
    assert_eq!(started["exe"].as_str(), Some(trusted.as_str()), "{started}");
    assert_eq!(started["identity_instance"], "same", "{started}");
    assert!(spoof.pg.log_text().contains("trusted-direct-4411"));

    // The spoof, governed and as nobody: python3 waits for a go, connects
    // (the kernel records python3), and becomes the trusted tool, which
    // talks on the connected socket.
    let marker = spoof.path("out/spoof.pid");
    let mut spoofer = spoof
        .governed_as_nobody(&[
            "python3",
            &spoof.path("spoof.py"),
            &remote,
            &trusted,
            &client,
            "select 'spoofed-7319'",
            &marker,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut spoofer_out = BufReader::new(spoofer.stdout.take().unwrap());
    let mut line = String::new();
    spoofer_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    // The agent is stopped while the spoofer connects and executes: the
    // kernel completes the connection into the listen backlog and records
    // it, and the agent can only look at the process after the exec.
    let agent_pid = spoof.agent().child.id();
    send_signal(agent_pid, libc::SIGSTOP);
    let resumed = Resume(agent_pid);
    // SIGSTOP takes effect a moment after kill() returns: on a busy machine
    // an agent thread could still accept and look before it.
    wait_until_stopped(agent_pid);
    writeln!(spoofer.stdin.take().unwrap(), "go").unwrap();
    wait_for_file(Path::new(&marker), &mut spoofer);
    // The exec happened: /proc now shows the trusted tool for that pid.
    let pid = std::fs::read_to_string(&marker).unwrap().trim().to_owned();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, spoof.trusted);
    drop(resumed);

    let mut rest = String::new();
    let status = wait_for(spoofer, spoof.agent());
    spoofer_out.read_to_string(&mut rest).unwrap();
    assert!(status.success() || !rest.is_empty(), "{status}");
    let out = rest;
    let result = out.trim();
    assert!(
        result.starts_with("ERROR ") && result.contains("denied by the default policy"),
        "the spoofed statement must be refused: {result}"
    );
    assert!(
        !spoof.pg.log_text().contains("spoofed-7319"),
        "the server must never see the spoofed statement"
    );

    let started = spoof.session_of_statement("spoofed-7319");
    assert_eq!(started["pid"].as_u64(), pid.trim().parse::<u64>().ok());
    assert_eq!(started["exe"].as_str(), Some(trusted.as_str()), "{started}");
    assert_eq!(started["identity_instance"], "changed", "{started}");
    assert!(
        started["identity_gaps"]
            .as_str()
            .is_some_and(|g| g.contains("executed another program after connecting")),
        "{started}"
    );
    let denial = spoof
        .agent()
        .log_lines()
        .into_iter()
        .find(|l| l["statement_action"] == "deny" && l["session"] == started["session"])
        .expect("the denial is logged");
    assert!(denial["rule"].is_null(), "no rule applied: {denial}");

    let header = spoof.recording_header(&started);
    let instance = &header["identity"]["instance"];
    assert_eq!(instance["verdict"], "changed", "{header}");
    assert_ne!(
        instance["at_connect"]["exe_ino"], instance["at_accept"]["exe_ino"],
        "{header}"
    );
    assert_eq!(
        instance["at_connect"]["start_ticks"], instance["at_accept"]["start_ticks"],
        "same process, other executable: {header}"
    );
    assert_eq!(
        header["kernel"]["instance"]["state"], "captured",
        "{header}"
    );
}

/// The process that connected exits before the agent looks, and a process
/// of the trusted executable gets its pid: the start time recorded at
/// connect tells them apart, so the trusted executable's grant is not
/// given to a connection it did not make.
#[test]
fn a_pid_reused_between_connect_and_accept_does_not_lend_its_grant() {
    require_ebpf!();
    let spoof = Spoof::start("");
    let remote = spoof.remote();
    let client = spoof.path("client.py");
    let pidfile = spoof.path("out/connected.pid");
    let marker = spoof.path("out/reuse-client.pid");
    let mut connecter = spoof
        .governed_as_nobody(&[
            "python3",
            &spoof.path("reuse.py"),
            &remote,
            &client,
            "select 'reused-pid-6203'",
            &marker,
            &pidfile,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(connecter.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let agent_pid = spoof.agent().child.id();
    send_signal(agent_pid, libc::SIGSTOP);
    let resumed = Resume(agent_pid);
    wait_until_stopped(agent_pid);
    writeln!(connecter.stdin.take().unwrap(), "go").unwrap();
    wait_for_file(Path::new(&pidfile), &mut connecter);
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "process {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The trusted executable, under the pid that connected.
    let mut sleeper = None;
    for _ in 0..200 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut child = Command::new(&spoof.trusted)
            .args(["-c", "import time; time.sleep(30)"])
            .spawn()
            .unwrap();
        if child.id() == pid {
            sleeper = Some(child);
            break;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut sleeper = sleeper.expect("no process got the pid in 200 attempts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .as_deref()
        != Some(spoof.trusted.as_path())
    {
        assert!(Instant::now() < deadline, "the sleeper did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(resumed);

    let mut rest = String::new();
    let _ = wait_for(connecter, spoof.agent());
    out.read_to_string(&mut rest).unwrap();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let result = rest.trim();
    assert!(
        result.starts_with("ERROR ") && result.contains("denied by the default policy"),
        "the statement must be refused: {result}"
    );
    assert!(!spoof.pg.log_text().contains("reused-pid-6203"));
    let started = spoof.session_of_statement("reused-pid-6203");
    assert_eq!(started["pid"].as_u64(), Some(u64::from(pid)), "{started}");
    assert_eq!(started["identity_instance"], "changed", "{started}");
    assert!(
        started["identity_gaps"]
            .as_str()
            .is_some_and(|g| g.contains("its pid was reused")),
        "{started}"
    );
}

/// Sends SIGCONT to the stopped agent when dropped (also on a failed
/// assertion, so it never stays stopped).
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        send_signal(self.0, libc::SIGCONT);
    }
}

/// `child`'s exit status once it exits (within 20 s).
fn wait_for(mut child: Child, agent: &Agent) -> std::process::ExitStatus {
    if let Some(status) = wait_timeout(&mut child, Duration::from_secs(20)) {
        return status;
    }
    {
        let _ = child.kill();
        panic!(
            "the child did not finish; status: {:?}\nagent log:\n{}",
            agent.status(),
            agent.log_text()
        );
    }
}

#[test]
fn a_large_executables_hash_is_computed_off_the_session_path_and_recorded_later() {
    require_ebpf!();
    let spoof = Spoof::start("");
    let remote = spoof.remote();
    let client = spoof.path("client.py");
    // A 200 MB executable: the interpreter with padding after its image
    // (the loader ignores bytes no segment maps). A fresh inode per run,
    // so the agent has never hashed it.
    let big = spoof.dir.path().join("big-tool");
    std::fs::copy(&spoof.trusted, &big).unwrap();
    {
        let mut f = std::fs::OpenOptions::new().append(true).open(&big).unwrap();
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..200 {
            f.write_all(&chunk).unwrap();
        }
    }
    let digest = Command::new("sha256sum").arg(&big).output().unwrap();
    let digest = String::from_utf8_lossy(&digest.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let big = big.to_str().unwrap().to_owned();
    // The policy allows the trusted tool only; this one is denied by
    // default, which needs no hash either way.
    let run = |marker: &str, sql: &str| {
        let marker = spoof.path(marker);
        spoof
            .governed_as_nobody(&[&big, &client, "addr", &remote, sql, &marker])
            .output()
            .unwrap()
    };

    let first = run("out/big1.pid", "select 'big-first-5150'");
    assert!(
        stdout(&first).contains("denied by the default policy"),
        "{first:?}"
    );
    let started = spoof.session_of_statement("big-first-5150");
    assert_eq!(started["exe"].as_str(), Some(big.as_str()), "{started}");
    let id = started["session"].as_str().unwrap();
    let lines = spoof.recording_lines(id);
    let header = lines.iter().find(|l| l["record"] == "header").unwrap();
    // The session started (its header was written) before the hash was
    // known...
    assert!(header["identity"]["exe_sha256"].is_null(), "{header}");
    // ...and the hash arrived later in the same recording, before its end.
    let seq_of = |kind: &str| {
        lines
            .iter()
            .find(|l| l["event"]["type"] == kind)
            .and_then(|l| l["seq"].as_u64())
            .unwrap_or_else(|| panic!("no {kind} event in {lines:?}"))
    };
    let hashed = lines
        .iter()
        .find(|l| l["event"]["type"] == "exe_hashed")
        .unwrap_or_else(|| panic!("no exe_hashed event in {lines:?}"));
    assert_eq!(
        hashed["event"]["exe_sha256"].as_str(),
        Some(digest.as_str())
    );
    assert!(seq_of("exe_hashed") < seq_of("closed"));

    // The next session of the same executable has the hash from the start.
    let second = run("out/big2.pid", "select 'big-second-5150'");
    assert!(!second.stdout.is_empty(), "{second:?}");
    let started = spoof.session_of_statement("big-second-5150");
    assert_eq!(started["exe_sha256"].as_str(), Some(digest.as_str()));
}

/// Creates an LRU hash map with `value_size`-byte values and pins it at
/// `path` (as an agent of another record layout would have).
const PIN_MAP_PY: &str = r#"
import ctypes, struct, sys
path, value_size = sys.argv[1].encode(), int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
SYS_BPF, MAP_CREATE, OBJ_PIN, LRU_HASH = 321, 0, 6, 9
attr = ctypes.create_string_buffer(struct.pack("=5I", LRU_HASH, 20, value_size, 16, 0), 128)
fd = libc.syscall(SYS_BPF, MAP_CREATE, attr, 128)
if fd < 0:
    raise SystemExit("map create: errno %d" % ctypes.get_errno())
name = ctypes.create_string_buffer(path)
attr = ctypes.create_string_buffer(struct.pack("=QII", ctypes.addressof(name), fd, 0), 128)
if libc.syscall(SYS_BPF, OBJ_PIN, attr, 128) < 0:
    raise SystemExit("pin: errno %d" % ctypes.get_errno())
"#;

#[test]
fn pins_of_another_origin_record_layout_are_refused_until_detached() {
    require_ebpf!();
    if !cfg!(target_arch = "x86_64") {
        eprintln!("skipping: the map is made with the x86_64 bpf syscall number");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start();
    let config = format!(
        "{}\n[[target]]\nname = \"pg\"\naddress = \"127.0.0.1\"\nports = [{}]\nprotocol = \"postgres\"\n",
        redirect_section(dir.path(), "pass"),
        pg.port
    );
    let pin_dir = config
        .lines()
        .find_map(|l| l.strip_prefix("pin_dir = \""))
        .map(|l| PathBuf::from(l.trim_end_matches('"')))
        .unwrap();
    let maps = pin_dir.join("pass").join("maps");
    for level in [&pin_dir, &pin_dir.join("pass"), &maps] {
        std::fs::create_dir_all(level).unwrap();
        std::fs::set_permissions(level, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let made = Command::new("python3")
        .args(["-c", PIN_MAP_PY])
        .arg(maps.join("ORIGINS"))
        .arg("64")
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");

    let mut agent = Agent::spawn(&config);
    let status = wait_timeout(&mut agent.child, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the agent kept running:\n{}", agent.log_text()));
    assert!(!status.success());
    let log = agent.log_text();
    assert!(
        log.contains("holds 64-byte origin records") && log.contains("tollgate detach"),
        "{log}"
    );

    let detached = agent.cli(&["detach"]);
    assert!(detached.status.success(), "{detached:?}");
    let keep = dir.path().join("agent.toml");
    std::fs::copy(&agent.config, &keep).unwrap();
    drop(agent);
    let agent = Agent::start(&config);
    assert!(agent.status().is_ok());
    drop(agent);
    cleanup_redirect(&keep);
    let _ = std::fs::remove_dir_all(&pin_dir);
}

/// Mounts `args` at `target` (made first), unmounted on drop.
struct Mounted(PathBuf);

impl Mounted {
    fn new(target: &Path, args: &[&str]) -> Mounted {
        std::fs::create_dir_all(target).unwrap();
        let out = Command::new("mount")
            .args(args)
            .arg(target)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount {args:?}: {out:?}");
        Mounted(target.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// Where the device a file's `stat` reports is not the device of its
/// filesystem's superblock, which the kernel records at connect (an
/// overlay whose lower layer is another filesystem, as container images
/// are; a btrfs subvolume), an executable that did not change is still the
/// one that connected: the identity is `same`, not `changed`.
#[test]
fn executables_on_overlayfs_and_btrfs_subvolumes_are_recognised_as_the_ones_that_connected() {
    require_ebpf!();
    let spoof = Spoof::start("");
    let remote = spoof.remote();
    let client = spoof.path("client.py");
    let root = spoof.dir.path().join("mounts");
    let mut mounts = Vec::new();
    let mut cases = Vec::new();

    // An overlay with every layer on one filesystem.
    for d in ["same/lower", "same/upper", "same/work"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(&spoof.trusted, root.join("same/lower/tool")).unwrap();
    let options = format!(
        "lowerdir={0}/same/lower,upperdir={0}/same/upper,workdir={0}/same/work",
        root.display()
    );
    mounts.push(Mounted::new(
        &root.join("same/merged"),
        &["-t", "overlay", "overlay", "-o", &options],
    ));
    cases.push(("overlay, one filesystem", root.join("same/merged/tool")));

    // An overlay whose lower layer is a tmpfs (another filesystem).
    mounts.push(Mounted::new(&root.join("tmp"), &["-t", "tmpfs", "tmpfs"]));
    std::fs::create_dir_all(root.join("tmp/lower")).unwrap();
    std::fs::copy(&spoof.trusted, root.join("tmp/lower/tool")).unwrap();
    for d in ["cross/upper", "cross/work"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let options = format!(
        "lowerdir={0}/tmp/lower,upperdir={0}/cross/upper,workdir={0}/cross/work",
        root.display()
    );
    mounts.push(Mounted::new(
        &root.join("cross/merged"),
        &["-t", "overlay", "overlay", "-o", &options],
    ));
    cases.push((
        "overlay over another filesystem",
        root.join("cross/merged/tool"),
    ));

    // A btrfs subvolume (its files report the subvolume's own device).
    let image = root.join("btrfs.img");
    let made = Command::new("truncate")
        .args(["-s", "160M"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let mkfs = Command::new("mkfs.btrfs")
        .arg("-q")
        .arg(&image)
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "mkfs.btrfs: {mkfs:?}");
    let btrfs = root.join("btrfs");
    mounts.push(Mounted::new(
        &btrfs,
        &["-o", "loop", image.to_str().unwrap()],
    ));
    let sub = Command::new("btrfs")
        .args(["subvolume", "create"])
        .arg(btrfs.join("sub"))
        .output()
        .unwrap();
    assert!(sub.status.success(), "{sub:?}");
    std::fs::copy(&spoof.trusted, btrfs.join("sub/tool")).unwrap();
    cases.push(("btrfs subvolume", btrfs.join("sub/tool")));
    std::fs::copy(&spoof.trusted, btrfs.join("tool")).unwrap();
    cases.push(("btrfs top level", btrfs.join("tool")));

    for (n, (case, tool)) in cases.iter().enumerate() {
        std::fs::set_permissions(tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let marker = spoof.path(&format!("out/mounted-{n}.pid"));
        let text = format!("select 'mounted-{n}-5521'");
        let out = spoof
            .governed_as_nobody(&[
                tool.to_str().unwrap(),
                &client,
                "addr",
                &remote,
                &text,
                &marker,
            ])
            .output()
            .unwrap();
        // The policy allows only the trusted tool's own path: refused, but
        // the session names the process.
        assert!(stdout(&out).starts_with("ERROR "), "{case}: {out:?}");
        let started = spoof.session_of_statement(&format!("mounted-{n}-5521"));
        assert_eq!(started["exe"].as_str(), tool.to_str(), "{case}: {started}");
        assert_eq!(started["identity_instance"], "same", "{case}: {started}");
    }
    drop(mounts);
}

/// Waits until every thread of `pid` is stopped (state `T` in its stat).
fn wait_until_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all_stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(Result::ok)
            .all(|task| {
                std::fs::read_to_string(task.path().join("stat"))
                    .ok()
                    .and_then(|stat| {
                        stat.rsplit_once(") ")
                            .map(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
                    })
                    .unwrap_or(true)
            });
        if all_stopped {
            return;
        }
        assert!(Instant::now() < deadline, "the agent did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}
