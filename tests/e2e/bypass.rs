//! The redirect bypass suite: user nobody, inside a governed cgroup, tries
//! every other way we know to reach a governed database with a statement
//! the policy denies (`drop table precious`): IPv6 and v4-mapped
//! addresses, TCP fast open, io_uring connects, non-blocking, bound and
//! MPTCP connects, a new network namespace, a connected socket handed to an
//! ungoverned process, and a killed agent.
//!
//! Each case is judged by the server's own log (`log_statement = all`,
//! `log_connections = on`) and the table still being there, not only by
//! the client's error. Each also runs an allowed statement the same way
//! and finds it in the server's log through the proxy, so a case cannot
//! pass because its connection went nowhere at all.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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

const NOBODY: u64 = 65534;

/// The statement every case tries; the policy denies it.
const DENIED: &str = "drop table precious";

const NO_DROP_POLICY: &str = "[[rule]]\nname = \"no-drop\"\naction = \"deny\"\nmessage = \"not by any way round\"\n[rule.match]\nkinds = [\"drop\"]\n";

/// What psql prints (with `VERBOSITY=verbose`) when the policy refuses it.
const PSQL_DENIED: &str =
    "ERROR:  42501: tollgate: DROP TABLE denied by rule \"no-drop\": not by any way round";

/// The attacker's connect, by `MODE HOST PORT SQL [EXTRA]`. It prints
/// `connect: ok` or `connect: <errno name>`, then what became of SQL on that
/// connection: `query: ok <rows>`, `query: error <SQLSTATE>`, or how the
/// connection ended. Modes: `plain`, `nonblocking`, `bind` (to source
/// address EXTRA and a port chosen first), `mptcp` (`connect: unsupported
/// <errno>` where the kernel has none), `fastopen-sendto`
/// (`sendto` with `MSG_FASTOPEN`, the start-up packet in the SYN),
/// `fastopen-connect` (`TCP_FASTOPEN_CONNECT`), `pass-fd` (connect, then
/// hand the socket over the Unix socket EXTRA) and `receive-fd` (listen on
/// the Unix socket EXTRA, take a socket from it, print its own cgroup v2
/// path, and
/// run SQL on the socket).
const ATTACKER: &str = r#"
import errno, select, socket, struct, sys

def startup():
    params = b"user\0postgres\0database\0postgres\0\0"
    return struct.pack("!ii", 8 + len(params), 196608) + params

def query(sql):
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", 4 + len(body)) + body

def receive(s, n):
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            raise EOFError
        got += chunk
    return got

def until_ready(s):
    error, rows = None, []
    while True:
        header = receive(s, 5)
        tag, length = header[:1], struct.unpack("!i", header[1:])[0]
        body = receive(s, length - 4)
        if tag == b"E" and error is None:
            error = [f[1:] for f in body.split(b"\0") if f[:1] == b"C"][0].decode()
        elif tag == b"D":
            n = struct.unpack("!i", body[2:6])[0]
            rows.append(body[6:6 + n].decode())
        elif tag == b"Z":
            return error, rows

def name(e):
    return errno.errorcode.get(e.errno, str(e.errno))

def converse(s, sql, startup_sent):
    s.settimeout(15)
    try:
        if not startup_sent:
            s.sendall(startup())
        error, _ = until_ready(s)
        if error:
            print("startup: error " + error)
            return
        s.sendall(query(sql))
        error, rows = until_ready(s)
        print("query: error " + error if error else "query: ok " + ",".join(rows))
    except EOFError:
        print("query: closed")
    except OSError as e:
        print("query: " + name(e))

def connect(how, host, port, extra):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    proto = 262 if how == "mptcp" else 0  # IPPROTO_MPTCP
    try:
        s = socket.socket(family, socket.SOCK_STREAM, proto)
    except OSError as e:
        if how == "mptcp" and e.errno in (errno.EPROTONOSUPPORT, errno.EINVAL, errno.ENOPROTOOPT):
            print("connect: unsupported " + name(e))
            sys.exit(0)
        raise
    if how == "bind":
        probe = socket.socket(family, socket.SOCK_STREAM)
        probe.bind((extra, 0))
        source_port = probe.getsockname()[1]
        probe.close()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((extra, source_port))
    if how == "nonblocking":
        s.setblocking(False)
        rc = s.connect_ex((host, port))
        if rc not in (0, errno.EINPROGRESS):
            raise OSError(rc, "connect")
        select.select([], [s], [], 10)
        rc = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if rc:
            raise OSError(rc, "connect")
        s.setblocking(True)
        return s, False
    if how == "fastopen-sendto":
        s.sendto(startup(), socket.MSG_FASTOPEN, (host, port))
        return s, True
    if how == "fastopen-connect":
        s.setsockopt(socket.IPPROTO_TCP, 30, 1)  # TCP_FASTOPEN_CONNECT
    s.connect((host, port))
    return s, False

how, host, port, sql = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
extra = sys.argv[5] if len(sys.argv) > 5 else None
if how == "receive-fd":
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(extra)
    listener.listen(1)
    conn, _ = listener.accept()
    _, fds, _, _ = socket.recv_fds(conn, 1, 1)
    unified = [l for l in open("/proc/self/cgroup").read().splitlines() if l.startswith("0::")]
    print("cgroup: " + unified[0])
    converse(socket.socket(fileno=fds[0]), sql, False)
    sys.exit(0)
try:
    s, startup_sent = connect(how, host, port, extra)
except OSError as e:
    print("connect: " + name(e))
    sys.exit(0)
print("connect: ok")
if how == "pass-fd":
    courier = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    courier.connect(extra)
    socket.send_fds(courier, [b"x"], [s.fileno()])
    print("passed")
else:
    converse(s, sql, startup_sent)
"#;

/// A database on test addresses (IPv4 and IPv6) logging every connection
/// and statement, with table `precious`; an agent under [`NO_DROP_POLICY`]
/// governing a `deny` and a `pass` cgroup; the attacker's script.
struct Suite {
    agent: Option<Agent>,
    addrs: TestAddresses,
    pg: Postgres,
    dir: tempfile::TempDir,
    deny_cg: PathBuf,
    pass_cg: PathBuf,
    attacker: PathBuf,
    _cgroups: RemovedOnDrop,
}

impl Suite {
    fn start() -> Suite {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let tag = format!(
            "tollgate-test-bypass-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let deny_cg = cgroup_mount().join(format!("{tag}-deny"));
        let pass_cg = cgroup_mount().join(format!("{tag}-pass"));
        let cgroups = RemovedOnDrop(vec![deny_cg.clone(), pass_cg.clone()]);
        std::fs::create_dir_all(&deny_cg).unwrap();
        std::fs::create_dir_all(&pass_cg).unwrap();

        let addrs = TestAddresses::add();
        // Also on ::1: a local target's loopback is redirected as the
        // target, and the proxy then connects where the client aimed.
        let pg = Postgres::start_with(
            &[
                addrs.v4.into(),
                addrs.v6.into(),
                std::net::Ipv6Addr::LOCALHOST.into(),
            ],
            &[],
            &["-c", "log_statement=all", "-c", "log_connections=on"],
        );
        psql(pg.port, "create table precious (id int)").unwrap();
        // Others may enter it: nobody runs the attacker's script from here.
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let attacker = dir.path().join("attacker.py");
        std::fs::write(&attacker, ATTACKER).unwrap();
        std::fs::set_permissions(&attacker, std::fs::Permissions::from_mode(0o644)).unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, NO_DROP_POLICY).unwrap();
        let config = format!(
            "[agent]\npolicy_paths = [\"{}\"]\n\n{}\n\
             [[cgroup]]\npath = \"{tag}-deny\"\nunlisted = \"deny\"\n\n\
             [[cgroup]]\npath = \"{tag}-pass\"\nunlisted = \"pass\"\n\n\
             [[target]]\nname = \"remote-pg\"\naddress = \"{}\"\nports = [{}]\nprotocol = \"postgres\"\n\n\
             [[target]]\nname = \"remote-pg6\"\naddress = \"{}\"\nports = [{}]\nprotocol = \"postgres\"\n",
            policy.display(),
            redirect_section(dir.path(), "pass"),
            addrs.v4,
            pg.port,
            addrs.v6,
            pg.port
        );
        let agent = Agent::start(&config);
        std::fs::copy(&agent.config, dir.path().join("agent.toml")).unwrap();
        Suite {
            agent: Some(agent),
            addrs,
            pg,
            dir,
            deny_cg,
            pass_cg,
            attacker,
            _cgroups: cgroups,
        }
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    /// The governed cgroups, by their mode for unlisted destinations.
    fn governed(&self) -> [(&'static str, &Path); 2] {
        [("deny", &self.deny_cg), ("pass", &self.pass_cg)]
    }

    /// `args` as user nobody (`runuser -u nobody`), after root moved the
    /// shell into `cgroup`; with `None` it stays in the test's own,
    /// ungoverned cgroup.
    fn nobody(&self, cgroup: Option<&Path>, args: &[&str]) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "if [ -n \"$1\" ]; then echo $$ > \"$1/cgroup.procs\" || exit 97; fi; shift; exec runuser -u nobody -- \"$@\"",
            "sh",
        ])
        .arg(cgroup.map(Path::as_os_str).unwrap_or_default())
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10");
        cmd
    }

    /// The attacker's script as nobody in `cgroup`: its output lines.
    fn attack(&self, cgroup: Option<&Path>, args: &[&str]) -> Vec<String> {
        let mut all = vec!["/usr/bin/python3", self.attacker.to_str().unwrap()];
        all.extend_from_slice(args);
        lines(&self.nobody(cgroup, &all).output().unwrap())
    }

    /// psql as nobody in `cgroup` to `host` (the server's port), running
    /// `sql` with verbose errors (so the SQLSTATE shows).
    fn psql_as_nobody(&self, cgroup: &Path, host: &str, sql: &str) -> Output {
        let argv = tollgate_tests::psql_argv(host, self.pg.port, "VERBOSITY=verbose", sql);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.nobody(Some(cgroup), &argv).output().unwrap()
    }

    /// Sessions that came through the redirect from user nobody.
    fn redirected_from_nobody(&self) -> usize {
        self.agent()
            .log_lines()
            .iter()
            .filter(|l| {
                l["arrival"] == "redirect"
                    && l["uid"].as_u64() == Some(NOBODY)
                    && l["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("session started"))
            })
            .count()
    }

    /// The server never ran the denied statement: its own statement log
    /// does not have it, and the table is still there.
    fn assert_never_reached(&self) {
        let log = self.pg.log_text();
        assert!(
            log.contains("statement: create table precious"),
            "the server logs statements: {log}"
        );
        assert!(!log.to_lowercase().contains(DENIED), "{log}");
        assert_eq!(
            psql(self.pg.port, "select to_regclass('precious') is not null").unwrap(),
            "t"
        );
    }

    /// The server's log has `marker` as a statement it ran.
    fn assert_ran(&self, marker: &str) {
        let log = self.pg.log_text();
        assert!(
            log.contains(&format!("statement: select '{marker}'")),
            "{marker}: {log}"
        );
    }
}

impl Drop for Suite {
    fn drop(&mut self) {
        drop(self.agent.take());
        cleanup_redirect(&self.dir.path().join("agent.toml"));
    }
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// An allowed statement's text, naming the case and the cgroup's mode.
fn marker(case: &str, mode: &str) -> String {
    format!("reached by {case} from {mode}")
}

#[test]
fn ipv6_and_v4_mapped_destinations_of_nobody_are_decided_by_policy() {
    require_ebpf!();
    let s = Suite::start();
    // The target's IPv6 address and its IPv4 one v4-mapped; the target is
    // on this host, so loopback (v6 and v4-mapped) is the target as well.
    let mapped = format!("::ffff:{}", s.addrs.v4);
    let hosts = [
        ("v6", s.addrs.v6.to_string()),
        ("v4-mapped", mapped),
        ("v6-loopback", "::1".to_string()),
        ("v4-mapped-loopback", "::ffff:127.0.0.1".to_string()),
    ];
    let mut allowed = 0;
    for (mode, cgroup) in s.governed() {
        for (case, host) in &hosts {
            let out = s.psql_as_nobody(cgroup, host, DENIED);
            assert!(!out.status.success(), "{case} from {mode}: {out:?}");
            assert_eq!(
                String::from_utf8_lossy(&out.stderr).trim(),
                PSQL_DENIED,
                "{case} from {mode}: {out:?}"
            );
            let marker = marker(case, mode);
            let out = s.psql_as_nobody(cgroup, host, &format!("select '{marker}'"));
            assert_eq!(lines(&out), [marker.as_str()], "{out:?}");
            s.assert_ran(&marker);
            allowed += 1;
        }
    }
    assert_eq!(s.redirected_from_nobody(), 2 * allowed);
    s.assert_never_reached();
}

#[test]
fn tcp_fast_open_connects_of_nobody_are_redirected_and_decided_by_policy() {
    require_ebpf!();
    let s = Suite::start();
    let port = s.pg.port.to_string();
    let (v4, v6) = (s.addrs.v4.to_string(), s.addrs.v6.to_string());
    let mut allowed = 0;
    for (mode, cgroup) in s.governed() {
        for how in ["fastopen-sendto", "fastopen-connect"] {
            for host in [&v4, &v6] {
                let case = format!("{how} to {host}");
                let denied = s.attack(Some(cgroup), &[how, host, &port, DENIED]);
                assert_eq!(
                    denied,
                    ["connect: ok", "query: error 42501"],
                    "{case} from {mode}"
                );
                let marker = marker(&case, mode);
                let got = s.attack(
                    Some(cgroup),
                    &[how, host, &port, &format!("select '{marker}'")],
                );
                assert_eq!(
                    got,
                    ["connect: ok".to_string(), format!("query: ok {marker}")]
                );
                s.assert_ran(&marker);
                allowed += 1;
            }
        }
    }
    assert_eq!(s.redirected_from_nobody(), 2 * allowed);
    s.assert_never_reached();
}

#[test]
fn nonblocking_bound_and_mptcp_connects_of_nobody_are_redirected_and_decided_by_policy() {
    require_ebpf!();
    let s = Suite::start();
    let port = s.pg.port.to_string();
    let (v4, v6) = (s.addrs.v4.to_string(), s.addrs.v6.to_string());
    // The kernel says whether it has MPTCP when asked for such a socket.
    let probe = s.attack(None, &["mptcp", "127.0.0.1", "1", "-"]);
    let mptcp_available = probe == ["connect: ECONNREFUSED"];
    if !mptcp_available {
        assert!(probe[0].starts_with("connect: unsupported "), "{probe:?}");
        eprintln!("MPTCP case left out: socket(IPPROTO_MPTCP) says {probe:?}");
    }
    let (unlisted, unlisted_port) = s.unlisted_listener();
    let mut allowed = 0;
    for (mode, cgroup) in s.governed() {
        for how in ["plain", "nonblocking", "bind", "mptcp"] {
            if how == "mptcp" && !mptcp_available {
                continue;
            }
            for host in [&v4, &v6] {
                let case = format!("{how} to {host}");
                // Bound to the host's own address of the same family, on a
                // port it chose, as if to look like another client.
                let source = host.as_str();
                let denied = s.attack(Some(cgroup), &[how, host, &port, DENIED, source]);
                assert_eq!(
                    denied,
                    ["connect: ok", "query: error 42501"],
                    "{case} from {mode}"
                );
                let marker = marker(&case, mode);
                let sql = format!("select '{marker}'");
                let got = s.attack(Some(cgroup), &[how, host, &port, &sql, source]);
                assert_eq!(
                    got,
                    ["connect: ok".to_string(), format!("query: ok {marker}")]
                );
                s.assert_ran(&marker);
                allowed += 1;
            }
            if mode == "deny" {
                let v4 = v4.as_str();
                let refused = s.attack(Some(cgroup), &[how, v4, &unlisted_port, DENIED, v4]);
                assert_eq!(refused, ["connect: EPERM"], "{how} to an unlisted port");
            }
        }
    }
    assert_nothing_accepted(&unlisted);
    assert_eq!(s.redirected_from_nobody(), 2 * allowed);
    s.assert_never_reached();
}

#[test]
fn io_uring_connects_of_nobody_are_redirected_and_decided_by_policy() {
    require_ebpf!();
    let s = Suite::start();
    let probe = env!("CARGO_BIN_EXE_uring-connect");
    let port = s.pg.port.to_string();
    let (v4, v6) = (s.addrs.v4.to_string(), s.addrs.v6.to_string());
    let (unlisted, unlisted_port) = s.unlisted_listener();
    let mut allowed = 0;
    for (mode, cgroup) in s.governed() {
        for how in ["plain", "async", "sqpoll"] {
            for socket_by in ["syscall", "ring"] {
                let run = |host: &str, port: &str, sql: &str| {
                    let out = s
                        .nobody(Some(cgroup), &[probe, how, socket_by, host, port, sql])
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success(),
                        "{how} {socket_by} from {mode}: {out:?}"
                    );
                    lines(&out)
                };
                for host in [&v4, &v6] {
                    let case = format!("io_uring {how} ({socket_by} socket) to {host}");
                    assert_eq!(
                        run(host, &port, DENIED),
                        ["connect: ok", "query: error 42501"],
                        "{case} from {mode}"
                    );
                    let marker = marker(&case, mode);
                    assert_eq!(
                        run(host, &port, &format!("select '{marker}'")),
                        ["connect: ok".to_string(), format!("query: ok {marker}")]
                    );
                    s.assert_ran(&marker);
                    allowed += 1;
                }
                if mode == "deny" {
                    let refused = run(&v4, &unlisted_port, DENIED);
                    assert_eq!(refused, ["connect: EPERM"], "{how} {socket_by}, unlisted");
                }
            }
        }
    }
    assert_nothing_accepted(&unlisted);
    assert_eq!(s.redirected_from_nobody(), 2 * allowed);
    s.assert_never_reached();
}

/// Nobody connected to `listener` (made by [`Suite::unlisted_listener`]).
fn assert_nothing_accepted(listener: &std::net::TcpListener) {
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("an unlisted destination was reached: {other:?}"),
    }
}

#[test]
fn a_new_network_namespace_reaches_nothing() {
    require_ebpf!();
    let s = Suite::start();
    let port = s.pg.port.to_string();
    let v4 = s.addrs.v4.to_string();
    let script = s.attacker.to_str().unwrap();
    let userns = s
        .nobody(Some(&s.deny_cg), &["unshare", "-rn", "true"])
        .output()
        .unwrap();
    if !userns.status.success() {
        // Without unprivileged user namespaces nobody cannot make a
        // network namespace at all: that closes this way.
        assert!(
            String::from_utf8_lossy(&userns.stderr).contains("Operation not permitted"),
            "{userns:?}"
        );
        eprintln!("unprivileged user namespaces are disabled here: unshare -rn is refused");
        s.assert_never_reached();
        return;
    }
    eprintln!("unprivileged user namespaces are enabled here: nobody makes a network namespace");
    let before = s.pg.log_text().len();
    let redirected = |s: &Suite| {
        s.agent().status().unwrap()["redirect"]["kernel"]["redirected"]
            .as_u64()
            .unwrap()
    };
    let redirected_before = redirected(&s);
    let v6 = s.addrs.v6.to_string();
    let mut attempts = 0;
    for (mode, cgroup) in s.governed() {
        // Its own loopback down (as unshare leaves it: no route, and no
        // IPv6 loopback address to send from), then up (nothing listens).
        for (lo, prelude) in [("down", ""), ("up", "ip link set lo up && ")] {
            for host in [v4.as_str(), v6.as_str(), "127.0.0.1"] {
                let refused = match (lo, host == v6) {
                    ("down", false) => "connect: ENETUNREACH",
                    ("down", true) => "connect: EADDRNOTAVAIL",
                    _ => "connect: ECONNREFUSED",
                };
                let shell = format!(
                    "{prelude}exec /usr/bin/python3 {script} plain {host} {port} \"{DENIED}\""
                );
                let out = s
                    .nobody(Some(cgroup), &["unshare", "-rn", "sh", "-c", &shell])
                    .output()
                    .unwrap();
                assert_eq!(
                    lines(&out),
                    [refused],
                    "lo {lo}, {host}, from {mode}: {out:?}"
                );
                attempts += 1;
            }
        }
    }
    // The connect hooks ran in the new namespace too (they belong to the
    // cgroup, not to a network namespace), and sent each connect to a proxy
    // port that nothing there listens on.
    assert_eq!(redirected(&s) - redirected_before, attempts);
    s.assert_never_reached_connections_since(before);
    assert_eq!(s.redirected_from_nobody(), 0);
    s.assert_never_reached();
}

impl Suite {
    /// A listener on the test's IPv4 address and a port no target names
    /// (non-blocking, for [`assert_nothing_accepted`]), and that port.
    fn unlisted_listener(&self) -> (std::net::TcpListener, String) {
        let listener = std::net::TcpListener::bind((self.addrs.v4, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        (listener, port)
    }

    /// A new directory in the test's, owned by nobody.
    fn nobodys_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(NOBODY as u32), Some(NOBODY as u32)).unwrap();
        dir
    }

    /// No connection reached the server since its log was `since` bytes
    /// long (nothing else connects to it meanwhile).
    fn assert_never_reached_connections_since(&self, since: usize) {
        let log = self.pg.log_text();
        let window = log.get(since..).unwrap_or_default();
        assert!(!window.contains("connection received"), "{window}");
    }
}

#[test]
fn a_connected_socket_passed_to_an_ungoverned_process_stays_governed() {
    require_ebpf!();
    let s = Suite::start();
    let port = s.pg.port.to_string();
    let v4 = s.addrs.v4.to_string();
    // For the Unix socket the two talk over.
    let meeting = s.nobodys_dir("meeting");
    let script = s.attacker.to_str().unwrap();

    // Ungoverned, nobody's own connection goes straight to the server: the
    // receiver's connections are not governed by themselves.
    let direct = s.attack(None, &["plain", &v4, &port, "select 'direct'"]);
    assert_eq!(direct, ["connect: ok", "query: ok direct"]);
    s.assert_ran("direct");
    assert_eq!(s.redirected_from_nobody(), 0, "not through the proxy");

    let mut handed = 0;
    for (mode, cgroup) in s.governed() {
        for sql in [
            DENIED.to_string(),
            format!("select '{}'", marker("a passed socket", mode)),
        ] {
            let path = meeting.join(format!("{mode}-{handed}.sock"));
            let path_text = path.to_str().unwrap();
            let receiver = s
                .nobody(
                    None,
                    &[
                        "/usr/bin/python3",
                        script,
                        "receive-fd",
                        "-",
                        "0",
                        &sql,
                        path_text,
                    ],
                )
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !path.exists() {
                assert!(Instant::now() < deadline, "the receiver never listened");
                std::thread::sleep(Duration::from_millis(20));
            }
            let sent = s.attack(Some(cgroup), &["pass-fd", &v4, &port, "-", path_text]);
            assert_eq!(sent, ["connect: ok", "passed"], "from {mode}");
            let out = receiver.wait_with_output().unwrap();
            let got = lines(&out);
            assert_eq!(got.len(), 2, "{out:?}");
            assert!(
                got[0].starts_with("cgroup: 0::/") && !got[0].contains("tollgate-test"),
                "the receiver is in no governed cgroup: {got:?}"
            );
            let expected = if sql == DENIED {
                "query: error 42501".to_string()
            } else {
                format!("query: ok {}", marker("a passed socket", mode))
            };
            assert_eq!(got[1], expected, "from {mode}: {out:?}");
            handed += 1;
        }
        s.assert_ran(&marker("a passed socket", mode));
    }
    assert_eq!(s.redirected_from_nobody(), handed);
    s.assert_never_reached();
}

/// The ids of the agent's sessions denied by `no-drop` whose start names
/// `uid` nobody and the redirect.
fn denials_through_the_redirect(agent: &Agent) -> usize {
    let log = agent.log_lines();
    log.iter()
        .filter(|l| l["statement_action"] == "deny" && l["rule"] == "no-drop")
        .filter(|denial| {
            log.iter().any(|l| {
                l["session"] == denial["session"]
                    && l["arrival"] == "redirect"
                    && l["uid"].as_u64() == Some(NOBODY)
            })
        })
        .count()
}

#[test]
fn a_killed_agent_fails_closed_for_nobody_and_a_restarted_one_decides_by_policy_again() {
    require_ebpf!();
    let mut s = Suite::start();
    let v4 = s.addrs.v4.to_string();
    let v6 = s.addrs.v6.to_string();
    let port = s.pg.port.to_string();
    let uring = env!("CARGO_BIN_EXE_uring-connect");

    // Governed before the kill.
    for (mode, cgroup) in s.governed() {
        let out = s.psql_as_nobody(cgroup, &v4, DENIED);
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim(),
            PSQL_DENIED,
            "{mode}"
        );
    }
    assert_eq!(denials_through_the_redirect(s.agent()), 2);

    // A shell in a `tollgate exec` session, started before the kill, tries
    // again after it (its session's cgroup outlives the agent).
    let ready = s.nobodys_dir("handshake").join("ready");
    let killed = s.dir.path().join("killed");
    let psql = pg_tool("psql");
    let waiting = format!(
        "{psql} -X -A -t -h {v4} -p {port} -U postgres -d postgres -c \"select 'before the kill'\" > {ready}.tmp && mv {ready}.tmp {ready}; \
         while [ ! -e {killed} ]; do sleep 0.05; done; \
         {psql} -X -A -t -v VERBOSITY=verbose -h {v4} -p {port} -U postgres -d postgres -c \"{DENIED}\"",
        psql = psql.display(),
        ready = ready.display(),
        killed = killed.display(),
    );
    let survivor = exec_command(
        s.agent(),
        &["runuser", "-u", "nobody", "--", "sh", "-c", &waiting],
    )
    .env("PGCONNECT_TIMEOUT", "10")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        assert!(
            Instant::now() < deadline,
            "the governed shell never connected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut agent = s.agent.take().unwrap();
    send_signal(agent.child.id(), libc::SIGKILL);
    let _ = agent.child.wait();
    let before = s.pg.log_text().len();
    std::fs::write(&killed, "").unwrap();
    let out = survivor.wait_with_output().unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Connection refused"),
        "{out:?}"
    );

    // Every way in, from both governed cgroups, is refused: the pinned
    // programs still send target connections to the dead proxy's port.
    for (mode, cgroup) in s.governed() {
        for host in [&v4, &v6, &"::1".to_string()] {
            let out = s.psql_as_nobody(cgroup, host, DENIED);
            assert!(!out.status.success(), "{host} from {mode}: {out:?}");
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("Connection refused"),
                "{host} from {mode}: {out:?}"
            );
        }
        for how in ["plain", "fastopen-sendto", "nonblocking"] {
            let got = s.attack(Some(cgroup), &[how, &v4, &port, DENIED]);
            assert_eq!(got, ["connect: ECONNREFUSED"], "{how} from {mode}");
        }
        let out = s
            .nobody(Some(cgroup), &[uring, "async", "ring", &v4, &port, DENIED])
            .output()
            .unwrap();
        assert_eq!(
            lines(&out),
            ["connect: ECONNREFUSED"],
            "io_uring from {mode}"
        );
    }
    s.assert_never_reached_connections_since(before);

    // A new agent with the same configuration re-adopts the pinned programs
    // and decides again.
    let config = std::fs::read_to_string(&agent.config).unwrap();
    let body = config
        .lines()
        .filter(|l| !l.starts_with("control_socket") && !l.starts_with("recording_dir"))
        .collect::<Vec<_>>()
        .join("\n");
    drop(agent);
    let restarted = Agent::start(&body);
    restarted
        .wait_for_log(
            |l| l["message"] == "re-adopted pinned redirect programs",
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("{e}: {}", restarted.log_text()));
    let status = restarted.status().unwrap();
    let cgroups = status["redirect"]["cgroups"].as_array().unwrap();
    assert!(
        cgroups
            .iter()
            .all(|c| c["readopted"] == true && c["kernel"]["state"] == "attached"),
        "{status}"
    );
    s.agent = Some(restarted);
    for (mode, cgroup) in s.governed() {
        let out = s.psql_as_nobody(cgroup, &v4, DENIED);
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim(),
            PSQL_DENIED,
            "{mode}"
        );
        let marker = marker("the restarted agent", mode);
        let out = s.psql_as_nobody(cgroup, &v4, &format!("select '{marker}'"));
        assert_eq!(lines(&out), [marker.as_str()], "{out:?}");
        s.assert_ran(&marker);
    }
    assert_eq!(denials_through_the_redirect(s.agent()), 2);
    s.assert_ran("before the kill");
    s.assert_never_reached();
}
