//! The redirect against a hostile local process: an unprivileged user
//! (nobody, uid 65534) who squats pin directories on a world-writable bpffs,
//! tampers with the pins, asks `tollgate exec` to move it out of a
//! stricter cgroup, or sends UDP datagrams where it may not connect. As
//! root, with real PostgreSQL and real eBPF.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
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

const NOBODY: u32 = 65534;

/// The value of `key = "..."` in a configuration text.
fn setting(config: &str, key: &str) -> PathBuf {
    let prefix = format!("{key} = \"");
    config
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| PathBuf::from(v.trim_end_matches('"')))
        .unwrap_or_else(|| panic!("no {key} in {config}"))
}

/// `sh -c SCRIPT` as user nobody.
fn as_nobody(script: &str) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap()
}

/// Every file (not directory) under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        if meta.is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// A test's pieces: a database on test addresses, a redirect section with
/// its own pin directory and exec cgroup, a directory other users may
/// enter (so nobody can reach the exec socket in it).
struct Setup {
    addrs: TestAddresses,
    pg: Postgres,
    dir: tempfile::TempDir,
    config: String,
    pin_dir: PathBuf,
    exec_root: PathBuf,
}

impl Setup {
    /// `cgroups`: extra `[[cgroup]]` sections.
    fn new(exec_unlisted: &str, cgroups: &str) -> Setup {
        Setup::with_redirect(exec_unlisted, "", cgroups)
    }

    /// Like [`Setup::new`], with `redirect_extra` lines added to `[redirect]`.
    fn with_redirect(exec_unlisted: &str, redirect_extra: &str, cgroups: &str) -> Setup {
        let addrs = TestAddresses::add();
        let pg = Postgres::start_listening(&[addrs.v4.into()]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let section = redirect_section(dir.path(), exec_unlisted) + redirect_extra;
        let config = format!(
            "[agent]\n\n{section}\n{cgroups}\n[[target]]\nname = \"remote-pg\"\naddress = \"{}\"\nports = [{}]\nprotocol = \"postgres\"\n",
            addrs.v4, pg.port
        );
        let pin_dir = setting(&section, "pin_dir");
        let exec_root = cgroup_mount().join(setting(&section, "exec_cgroup"));
        Setup {
            addrs,
            pg,
            dir,
            config,
            pin_dir,
            exec_root,
        }
    }

    fn exec_socket(&self) -> PathBuf {
        self.dir.path().join("exec.sock")
    }

    /// `tollgate exec --socket ... -- ARGS` as nobody, after the shell moved
    /// itself (as root) into `cgroup`, when given.
    fn exec_as_nobody(&self, cgroup: Option<&Path>, args: &str) -> Output {
        let enter = cgroup
            .map(|c| format!("echo $$ > {}/cgroup.procs && ", c.display()))
            .unwrap_or_default();
        let script = format!(
            "{enter}exec setpriv --reuid=65534 --regid=65534 --clear-groups {} exec --socket {} -- {args}",
            agent_binary().display(),
            self.exec_socket().display()
        );
        Command::new("sh").args(["-c", &script]).output().unwrap()
    }

    fn psql_args(&self, sql: &str) -> String {
        format!(
            "{} -X -A -t -h {} -p {} -U postgres -d postgres -c \"{sql}\"",
            pg_tool("psql").display(),
            self.addrs.v4,
            self.pg.port
        )
    }

    /// Keeps a copy of the agent's configuration for the clean-up.
    fn keep_config(&self, agent: &Agent) -> PathBuf {
        let keep = self.dir.path().join("agent.toml");
        std::fs::copy(&agent.config, &keep).unwrap();
        keep
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if let Ok(entries) = std::fs::read_dir(&self.exec_root) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.exec_root);
    }
}

/// Leaves what `script` makes in bpffs owned by nobody. Where bpffs lets
/// every user create (mode 1777, the kernel's default) nobody runs it, as an
/// attacker would; on a bpffs mounted mode=0700 it cannot, so root runs it
/// and hands `made` to nobody, which leaves the same squat behind.
fn squat(script: &str, made: &[&Path]) {
    let open = std::fs::metadata("/sys/fs/bpf").is_ok_and(|m| m.mode() & 0o002 != 0);
    let out = if open {
        as_nobody(script)
    } else {
        let out = Command::new("sh").args(["-c", script]).output().unwrap();
        for path in made {
            let chown = Command::new("chown")
                .args(["-hR", "65534:65534"])
                .arg(path)
                .output()
                .unwrap();
            assert!(chown.status.success(), "{chown:?}");
        }
        out
    };
    assert!(out.status.success(), "{script}: {out:?}");
    for path in made {
        let meta = std::fs::symlink_metadata(path).unwrap();
        assert_eq!(meta.uid(), NOBODY, "{}", path.display());
    }
}

/// Waits for a (failing) agent to exit; its exit code.
fn exit_code(agent: &mut Agent) -> Option<i32> {
    wait_timeout(&mut agent.child, Duration::from_secs(20))
        .expect("the agent should have stopped")
        .code()
}

#[test]
fn squatted_pin_directories_stop_the_agent_and_nothing_is_pinned_there() {
    require_ebpf!();
    let bpffs = Path::new("/sys/fs/bpf");
    let s = Setup::new("pass", "");
    // The exec cgroup exists before the agent (as after an earlier run), so
    // the squatter can name the directory its links would be pinned in.
    std::fs::create_dir_all(&s.exec_root).unwrap();
    let inode = std::fs::metadata(&s.exec_root).unwrap().ino();
    let links = s.pin_dir.join(format!("pass/links/{inode}"));

    // 1. Directories owned by nobody.
    squat(
        &format!(
            "mkdir -p {} {}",
            links.display(),
            s.pin_dir.join("pass/maps").display()
        ),
        &[&s.pin_dir],
    );
    assert_eq!(std::fs::metadata(&links).unwrap().uid(), NOBODY);
    let mut agent = Agent::spawn(&s.config);
    assert_eq!(exit_code(&mut agent), Some(1), "{}", agent.log_text());
    let expected = format!(
        "tollgate: cannot set up the transparent redirect: refusing pin directory {pin}: owned by uid 65534, not root; remove it (rm -r {pin}) and start again",
        pin = s.pin_dir.display()
    );
    assert!(agent.log_text().contains(&expected), "{}", agent.log_text());
    assert_eq!(
        files_under(&s.pin_dir),
        Vec::<PathBuf>::new(),
        "nothing pinned"
    );
    drop(agent);

    // 2. The pin root as nobody's symlink to a directory nobody owns.
    std::fs::remove_dir_all(&s.pin_dir).unwrap();
    let elsewhere = bpffs.join(format!(
        "{}-elsewhere",
        s.pin_dir.file_name().unwrap().to_string_lossy()
    ));
    squat(
        &format!(
            "mkdir -p {e} && ln -s {e} {pin}",
            e = elsewhere.display(),
            pin = s.pin_dir.display()
        ),
        &[&elsewhere, &s.pin_dir],
    );
    let mut agent = Agent::spawn(&s.config);
    assert_eq!(exit_code(&mut agent), Some(1), "{}", agent.log_text());
    let expected = format!(
        "refusing pin directory {}: it is a symlink (to {}), owned by uid 65534",
        s.pin_dir.display(),
        elsewhere.display()
    );
    assert!(agent.log_text().contains(&expected), "{}", agent.log_text());
    assert_eq!(
        files_under(&elsewhere),
        Vec::<PathBuf>::new(),
        "not followed"
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    let _ = std::fs::remove_file(&s.pin_dir);
    let _ = std::fs::remove_dir_all(&elsewhere);

    // 3. With the squat gone, the same configuration starts.
    let agent = Agent::start(&s.config);
    let status = agent.status().unwrap();
    assert_eq!(
        status["redirect"]["cgroups"][0]["kernel"]["state"], "attached",
        "{status}"
    );
    let keep = s.keep_config(&agent);
    drop(agent);
    cleanup_redirect(&keep);
}

#[test]
fn pin_directories_are_root_only_and_unprivileged_users_cannot_change_them() {
    require_ebpf!();
    let s = Setup::new("pass", "");
    let agent = Agent::start(&s.config);
    let keep = s.keep_config(&agent);
    let inode = std::fs::metadata(&s.exec_root).unwrap().ino();
    let links = s.pin_dir.join(format!("pass/links/{inode}"));
    for dir in [
        s.pin_dir.clone(),
        s.pin_dir.join("pass"),
        s.pin_dir.join("pass/maps"),
        s.pin_dir.join("pass/links"),
        links.clone(),
    ] {
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert!(meta.is_dir(), "{}", dir.display());
        assert_eq!(meta.uid(), 0, "{}", dir.display());
        assert_eq!(meta.mode() & 0o7777, 0o700, "{}", dir.display());
    }
    let pins = files_under(&links);
    assert_eq!(pins.len(), 5, "{pins:?}");

    // As nobody, adding, removing and renaming fail at every level.
    for script in [
        format!("mkdir {}/x", s.pin_dir.display()),
        format!("mkdir {}/x", links.display()),
        format!("rm -f {}", pins[0].display()),
        format!("rm -rf {}", s.pin_dir.display()),
        format!("mv {} {}-moved", s.pin_dir.display(), s.pin_dir.display()),
    ] {
        let out = as_nobody(&script);
        assert!(!out.status.success(), "{script}: {out:?}");
    }
    assert_eq!(files_under(&links), pins, "every pin is still there");
    let status = agent.status().unwrap();
    assert_eq!(
        status["redirect"]["cgroups"][0]["kernel"]["state"], "attached",
        "{status}"
    );

    // The agent said that the bpffs mount lets every user in, where it does.
    let open = std::fs::metadata("/sys/fs/bpf").is_ok_and(|m| m.mode() & 0o002 != 0);
    let warned = agent.log_lines().iter().any(|l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("bpffs is writable by every user"))
    });
    assert_eq!(warned, open, "{}", agent.log_text());
    drop(agent);
    cleanup_redirect(&keep);
}

#[test]
fn status_reports_what_the_kernel_has_attached_not_the_pins() {
    require_ebpf!();
    let s = Setup::new("pass", "");
    let agent = Agent::start(&s.config);
    let keep = s.keep_config(&agent);
    let status = agent.status().unwrap();
    let cgroup = &status["redirect"]["cgroups"][0];
    assert_eq!(cgroup["kernel"]["state"], "attached", "{status}");
    let programs = cgroup["kernel"]["programs"].as_array().unwrap();
    let points: Vec<&str> = programs
        .iter()
        .map(|p| p["attach_point"].as_str().unwrap())
        .collect();
    assert_eq!(
        points,
        ["connect4", "connect6", "sock_ops", "sendmsg4", "sendmsg6"],
        "{status}"
    );
    assert!(programs.iter().all(|p| p["ours"] == true), "{status}");
    let text = agent.cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.lines()
            .any(|l| l.contains(s.exec_root.to_str().unwrap()) && l.contains(" attached ")),
        "{text}"
    );

    // A governed connection goes through the proxy.
    let run = || {
        exec_command(&agent, &["sh", "-c", &s.psql_args("select 'here'")])
            .output()
            .unwrap()
    };
    let out = run();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "here",
        "{out:?}"
    );
    let redirected = |agent: &Agent| {
        agent
            .log_lines()
            .iter()
            .filter(|l| l["arrival"] == "redirect")
            .count()
    };
    assert_eq!(redirected(&agent), 1);

    // Behind the agent's back, root removes the pinned links: the agent
    // holds no handle on them, so the kernel detaches the programs.
    let inode = std::fs::metadata(&s.exec_root).unwrap().ino();
    std::fs::remove_dir_all(s.pin_dir.join(format!("pass/links/{inode}"))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let status = agent.status().unwrap();
        if status["redirect"]["cgroups"][0]["kernel"]["state"] != "attached"
            || Instant::now() > deadline
        {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let cgroup = &status["redirect"]["cgroups"][0];
    assert_eq!(cgroup["kernel"]["state"], "detached", "{status}");
    // The agent notices on its own, too (it looks every 2 s).
    let warned = agent
        .wait_for_log(
            |l| {
                l["message"].as_str().is_some_and(|m| {
                    m.starts_with("the kernel no longer has the redirect programs")
                })
            },
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}: {}", agent.log_text()));
    assert_eq!(warned["cgroup"].as_str(), s.exec_root.to_str(), "{warned}");
    assert_eq!(warned["kernel_state"], "detached", "{warned}");
    assert_eq!(
        cgroup["kernel"]["programs"],
        Value::Array(vec![]),
        "{status}"
    );
    let out = agent.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.lines()
            .any(|l| l.contains(s.exec_root.to_str().unwrap()) && l.contains(" DETACHED ")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "warning: {} is not governed as configured: the kernel reports the redirect programs detached on it",
            s.exec_root.display()
        )),
        "{text}"
    );
    // And the status tells the truth: the same command now reaches the
    // server directly, not through the proxy.
    let out = run();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "here",
        "{out:?}"
    );
    assert_eq!(redirected(&agent), 1, "no second session through the proxy");
    drop(agent);
    cleanup_redirect(&keep);
}

#[test]
fn exec_from_a_deny_mode_cgroup_stays_denied_and_from_pass_mode_works_as_before() {
    require_ebpf!();
    let tag = format!("tollgate-test-exec-{}", std::process::id());
    let deny_cg = cgroup_mount().join(format!("{tag}-deny"));
    let pass_cg = cgroup_mount().join(format!("{tag}-pass"));
    let below_deny = deny_cg.join("step");
    // Removed, deepest first, even when an assertion fails.
    let _cgroups = RemovedOnDrop(vec![below_deny.clone(), deny_cg.clone(), pass_cg.clone()]);
    std::fs::create_dir_all(&below_deny).unwrap();
    std::fs::create_dir_all(&pass_cg).unwrap();
    let s = Setup::new(
        "pass",
        &format!(
            "[[cgroup]]\npath = \"{tag}-deny\"\nunlisted = \"deny\"\n\n[[cgroup]]\npath = \"{tag}-pass\"\nunlisted = \"pass\"\n"
        ),
    );
    let agent = Agent::start(&s.config);
    let keep = s.keep_config(&agent);

    // An address and port no target names.
    let unlisted = std::net::TcpListener::bind((s.addrs.v4, 0)).unwrap();
    let port = unlisted.local_addr().unwrap().port();
    let probe = format!(
        "/usr/bin/python3 -c \"import socket; print(open('/proc/self/cgroup').read().strip()); socket.create_connection(('{}', {port}), 3); print('connected')\"",
        s.addrs.v4
    );

    // From the deny-mode cgroup, and from a cgroup below it: refused.
    for (cgroup, name) in [(&deny_cg, "deny"), (&below_deny, "below deny")] {
        let out = s.exec_as_nobody(Some(cgroup), &probe);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{name}: {out:?}");
        assert!(
            stderr.contains("Operation not permitted"),
            "{name}: {out:?}"
        );
        assert!(!stdout.contains("connected"), "{name}: {out:?}");
        let relative = cgroup.strip_prefix(cgroup_mount()).unwrap();
        assert_eq!(
            stdout.lines().find(|l| l.starts_with("0::")),
            Some(format!("0::/{}", relative.display()).as_str()),
            "{name}: it stayed in its own cgroup: {out:?}"
        );
    }
    let stayed = agent
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("stays in its governed cgroup"))
        })
        .count();
    assert_eq!(stayed, 2, "{}", agent.log_text());
    // It is still governed: its connections to a target go through the proxy.
    let out = s.exec_as_nobody(Some(&deny_cg), &s.psql_args("select 'governed'"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "governed",
        "{out:?}"
    );
    let started = agent
        .wait_for_log(|l| l["arrival"] == "redirect", Duration::from_secs(5))
        .unwrap();
    assert_eq!(started["uid"].as_u64(), Some(NOBODY.into()), "{started}");

    // From the pass-mode cgroup, and from no governed cgroup: moved into an
    // exec session (pass mode), as before, and connected.
    for (cgroup, name) in [(Some(pass_cg.as_path()), "pass"), (None, "ungoverned")] {
        let out = s.exec_as_nobody(cgroup, &probe);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{name}: {out:?}");
        assert!(stdout.contains("/exec-"), "{name}: {out:?}");
        assert_eq!(stdout.lines().last(), Some("connected"), "{name}: {out:?}");
    }

    drop(agent);
    cleanup_redirect(&keep);
}

/// The upgrade path (stop, `tollgate detach`, start the new binary) leaves
/// no window in which another user can take the pin directory's name.
#[test]
fn detach_keeps_an_empty_root_only_pin_directory_that_nobody_can_take() {
    require_ebpf!();
    let s = Setup::new("pass", "");
    let agent = Agent::start(&s.config);
    let keep = s.keep_config(&agent);
    drop(agent);

    let out = Command::new(agent_binary())
        .arg("detach")
        .arg("--config")
        .arg(&keep)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        stdout.contains("detached: governed connections are no longer redirected or refused"),
        "{stdout}"
    );
    let meta = std::fs::symlink_metadata(&s.pin_dir).unwrap();
    assert!(meta.is_dir());
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o700));
    assert_eq!(std::fs::read_dir(&s.pin_dir).unwrap().count(), 0, "emptied");

    // Nobody can squat inside it, nor replace it.
    for script in [
        format!("mkdir -p {}/pass/links", s.pin_dir.display()),
        format!("rm -rf {}", s.pin_dir.display()),
    ] {
        let out = as_nobody(&script);
        assert!(!out.status.success(), "{script}: {out:?}");
    }

    // The next start attaches afresh into the directory that was kept.
    let agent = Agent::start(&s.config);
    agent
        .wait_for_log(
            |l| l["message"] == "attached the redirect programs",
            Duration::from_secs(5),
        )
        .unwrap();
    let status = agent.status().unwrap();
    assert_eq!(
        status["redirect"]["cgroups"][0]["kernel"]["state"], "attached",
        "{status}"
    );
    drop(agent);
    cleanup_redirect(&keep);
    assert!(
        !s.pin_dir.exists(),
        "the test's pin directory is cleaned up"
    );
}

/// What nobody tries with UDP, one line `NAME:RESULT` per attempt (`sent`,
/// `EPERM`, or another errno's name). Arguments: the unlisted IPv4 and IPv6
/// addresses, their port, the resolver's IPv4 and IPv6 addresses, and a
/// loopback port.
const UDP_PROBE: &str = r#"
import errno, socket, sys
v4, v6, port, r4, r6, lo = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6])
def attempt(name, fn):
    try:
        fn()
        print(name + ":sent")
    except OSError as e:
        print(name + ":" + errno.errorcode.get(e.errno, str(e.errno)))
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
def connected(family, addr):
    c = socket.socket(family, socket.SOCK_DGRAM)
    c.connect(addr)
    c.send(b"connect")
attempt("sendto4", lambda: s4.sendto(b"sendto4", (v4, port)))
attempt("sendmsg4", lambda: s4.sendmsg([b"sendmsg4"], [], 0, (v4, port)))
attempt("sendto6", lambda: s6.sendto(b"sendto6", (v6, port)))
attempt("sendmsg6", lambda: s6.sendmsg([b"sendmsg6"], [], 0, (v6, port)))
attempt("mapped", lambda: s6.sendto(b"mapped", ("::ffff:" + v4, port)))
attempt("mapped-sendmsg", lambda: s6.sendmsg([b"mapped-sendmsg"], [], 0, ("::ffff:" + v4, port)))
attempt("connect4", lambda: connected(socket.AF_INET, (v4, port)))
attempt("connect6", lambda: connected(socket.AF_INET6, (v6, port)))
attempt("dns4", lambda: s4.sendto(b"dns4", (r4, 53)))
attempt("dns6", lambda: s6.sendto(b"dns6", (r6, 53)))
attempt("loopback", lambda: s4.sendto(b"loopback", ("127.0.0.1", lo)))
# TCP data in the SYN (fast open) is a connect too: the connect hooks see it.
attempt("fastopen", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).sendto(b"fastopen", socket.MSG_FASTOPEN, (v4, port)))
"#;

/// Every datagram `socket` has received, as text, waiting up to 300 ms for
/// the next.
fn received(socket: &std::net::UdpSocket) -> Vec<String> {
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = socket.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out.sort();
    out
}

/// Also TCP fast open (`sendto` with `MSG_FASTOPEN`), which connects and
/// sends in one call.
#[test]
fn udp_sends_to_unlisted_destinations_are_refused_in_deny_mode_and_pass_in_pass_mode() {
    require_ebpf!();
    use std::net::UdpSocket;
    let tag = format!("tollgate-test-udp-{}", std::process::id());
    let deny_cg = cgroup_mount().join(format!("{tag}-deny"));
    let pass_cg = cgroup_mount().join(format!("{tag}-pass"));
    let _cgroups = RemovedOnDrop(vec![deny_cg.clone(), pass_cg.clone()]);
    std::fs::create_dir_all(&deny_cg).unwrap();
    std::fs::create_dir_all(&pass_cg).unwrap();
    // The resolver's addresses are test addresses of their own, so that
    // port 53 on them is free for the test's receivers.
    let resolver = TestAddresses::add();
    let s = Setup::with_redirect(
        "pass",
        &format!("resolvers = [\"{}\", \"{}\"]\n", resolver.v4, resolver.v6),
        &format!(
            "[[cgroup]]\npath = \"{tag}-deny\"\nunlisted = \"deny\"\n\n[[cgroup]]\npath = \"{tag}-pass\"\nunlisted = \"pass\"\n"
        ),
    );
    let agent = Agent::start(&s.config);
    let keep = s.keep_config(&agent);

    // Receivers on addresses and a port no target names, on the resolver's
    // DNS port, and on loopback.
    let unlisted4 = UdpSocket::bind((s.addrs.v4, 0)).unwrap();
    let port = unlisted4.local_addr().unwrap().port();
    let unlisted6 = UdpSocket::bind((s.addrs.v6, port)).unwrap();
    let dns4 = UdpSocket::bind((resolver.v4, 53)).unwrap();
    let dns6 = UdpSocket::bind((resolver.v6, 53)).unwrap();
    let loopback = UdpSocket::bind(("127.0.0.1", 0)).unwrap();
    let lo_port = loopback.local_addr().unwrap().port();
    let probe = s.dir.path().join("udp_probe.py");
    std::fs::write(&probe, UDP_PROBE).unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o644)).unwrap();

    // nobody, in `cgroup`, runs the probe.
    let run = |cgroup: &Path| -> Vec<String> {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 {} {} {} {port} {} {} {lo_port}",
            cgroup.display(),
            probe.display(),
            s.addrs.v4,
            s.addrs.v6,
            resolver.v4,
            resolver.v6,
        );
        let out = Command::new("sh").args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };

    // Deny mode: every send to the unlisted addresses, IPv4, IPv6 and
    // v4-mapped, by sendto and sendmsg, is refused and nothing arrives; a
    // UDP connect() is refused too. DNS to the resolvers and loopback go.
    let denied_before = agent.status().unwrap()["redirect"]["kernel"]["denied"]
        .as_u64()
        .unwrap();
    let results = run(&deny_cg);
    assert_eq!(
        results,
        [
            "sendto4:EPERM",
            "sendmsg4:EPERM",
            "sendto6:EPERM",
            "sendmsg6:EPERM",
            "mapped:EPERM",
            "mapped-sendmsg:EPERM",
            "connect4:EPERM",
            "connect6:EPERM",
            "dns4:sent",
            "dns6:sent",
            "loopback:sent",
            "fastopen:EPERM",
        ]
    );
    assert_eq!(received(&unlisted4), Vec::<String>::new());
    assert_eq!(received(&unlisted6), Vec::<String>::new());
    assert_eq!(received(&dns4), ["dns4"]);
    assert_eq!(received(&dns6), ["dns6"]);
    assert_eq!(received(&loopback), ["loopback"]);
    let denied_after = agent.status().unwrap()["redirect"]["kernel"]["denied"]
        .as_u64()
        .unwrap();
    assert_eq!(denied_after - denied_before, 9, "each refusal is counted");

    // Pass mode: unchanged, everything is sent and arrives (no TCP server
    // listens for the fast open: it is let through and refused there).
    let results = run(&pass_cg);
    let (fast_open, udp) = results.split_last().unwrap();
    assert_eq!(fast_open, "fastopen:ECONNREFUSED", "{results:?}");
    assert!(udp.iter().all(|r| r.ends_with(":sent")), "{results:?}");
    assert_eq!(udp.len(), 11, "{results:?}");
    assert_eq!(
        received(&unlisted4),
        ["connect", "mapped", "mapped-sendmsg", "sendmsg4", "sendto4"]
    );
    assert_eq!(received(&unlisted6), ["connect", "sendmsg6", "sendto6"]);
    assert_eq!(received(&dns4), ["dns4"]);
    assert_eq!(received(&dns6), ["dns6"]);
    assert_eq!(received(&loopback), ["loopback"]);

    drop(agent);
    cleanup_redirect(&keep);
}

/// The ids of the programs the kernel reports attached, by attach point.
fn kernel_program_ids(status: &Value) -> Vec<(String, u64)> {
    status["redirect"]["cgroups"][0]["kernel"]["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["attach_point"].as_str().unwrap().to_string(),
                p["id"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// After an upgrade that added the send hooks, a restarted agent finds only
/// the older programs' pins: it keeps those attached (the cgroup is never
/// without its connect hooks) and attaches the new ones beside them.
#[test]
fn a_restart_keeps_the_pinned_programs_and_attaches_only_the_missing_ones() {
    require_ebpf!();
    let s = Setup::new("pass", "");
    let agent = Agent::start(&s.config);
    let keep = s.keep_config(&agent);
    let before = kernel_program_ids(&agent.status().unwrap());
    assert_eq!(before.len(), 5, "{before:?}");
    drop(agent);

    // What an agent without the send hooks left pinned.
    let inode = std::fs::metadata(&s.exec_root).unwrap().ino();
    let links = s.pin_dir.join(format!("pass/links/{inode}"));
    for name in ["tollgate_sendmsg4", "tollgate_sendmsg6"] {
        std::fs::remove_file(links.join(name)).unwrap();
    }

    let agent = Agent::start(&s.config);
    let line = agent
        .wait_for_log(
            |l| l["message"] == "re-adopted some pinned redirect programs and attached the others",
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("{e}: {}", agent.log_text()));
    assert_eq!(
        line["readopted"],
        "tollgate_connect4,tollgate_connect6,tollgate_sockops"
    );
    assert_eq!(line["attached"], "tollgate_sendmsg4,tollgate_sendmsg6");
    let status = agent.status().unwrap();
    assert_eq!(
        status["redirect"]["cgroups"][0]["kernel"]["state"], "attached",
        "{status}"
    );
    let after = kernel_program_ids(&status);
    assert_eq!(after.len(), 5, "{after:?}");
    assert_eq!(
        after[..3],
        before[..3],
        "the connect hooks were never replaced"
    );
    assert_eq!(files_under(&links).len(), 5);
    // Still governed: a connection to the target goes through the proxy.
    let out = exec_command(&agent, &["sh", "-c", &s.psql_args("select 'here'")])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "here",
        "{out:?}"
    );
    agent
        .wait_for_log(|l| l["arrival"] == "redirect", Duration::from_secs(5))
        .unwrap();
    drop(agent);
    cleanup_redirect(&keep);
}

/// A target on this host also listens on loopback, which unlisted
/// connections may always reach: a governed process must not skip the gate
/// by naming 127.0.0.1 instead of the target's address.
#[test]
fn a_local_target_is_governed_on_loopback_too() {
    require_ebpf!();
    let addrs = TestAddresses::add();
    let pg = Postgres::start_with(&[addrs.v4.into()], &[], &["-c", "log_statement=all"]);
    psql(pg.port, "create table kept (id int)").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let policy = dir.path().join("p.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"no-drop\"\naction = \"deny\"\nmessage = \"not on loopback either\"\n[rule.match]\nkinds = [\"drop\"]\n",
    )
    .unwrap();
    let section = redirect_section(dir.path(), "pass");
    let config = format!(
        "[agent]\npolicy_paths = [\"{}\"]\n\n{section}\n[[target]]\nname = \"local-pg\"\naddress = \"{}\"\nports = [{}]\nprotocol = \"postgres\"\n",
        policy.display(),
        addrs.v4,
        pg.port
    );
    let pin_dir = setting(&section, "pin_dir");
    let agent = Agent::start(&config);
    let keep = dir.path().join("agent.toml");
    std::fs::copy(&agent.config, &keep).unwrap();

    // `config check` says what the redirect adds, and warns of a socket any
    // local user can connect to (one bound here, where a server with
    // `unix_socket_directories = '/tmp'` would put it).
    let socket = PathBuf::from(format!("/tmp/.s.PGSQL.{}", pg.port));
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    let check = Command::new(agent_binary())
        .args(["config", "check", "--config"])
        .arg(&keep)
        .output()
        .unwrap();
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    assert!(check.status.success(), "{check:?}");
    let stdout = String::from_utf8_lossy(&check.stdout).to_string();
    let stderr = String::from_utf8_lossy(&check.stderr).to_string();
    let expected = format!(
        "target local-pg is local: ports {} on 127.0.0.0/8, ::1, 0.0.0.0, ::, ",
        pg.port
    );
    assert!(stdout.contains(&expected), "{stdout}");
    assert!(
        stderr.contains(&format!(
            "warning: target local-pg is also reachable on the Unix socket {}, which any local user can connect to: connections through it are not governed",
            socket.display()
        )),
        "{stderr}"
    );

    // nobody, governed, names loopback: the statement is decided by the
    // policy, refused, and never reaches the server.
    let run = |sql: &str| {
        let script = format!(
            "exec setpriv --reuid=65534 --regid=65534 --clear-groups {} -X -A -t -h 127.0.0.1 -p {} -U postgres -d postgres -c \"{sql}\"",
            pg_tool("psql").display(),
            pg.port
        );
        exec_command(&agent, &["sh", "-c", &script])
            .output()
            .unwrap()
    };
    let out = run("drop table kept");
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("tollgate: DROP TABLE denied by rule \"no-drop\": not on loopback either"),
        "{out:?}"
    );
    let out = run("select 'via loopback'");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "via loopback",
        "{out:?}"
    );
    let started: Vec<Value> = agent
        .log_lines()
        .into_iter()
        .filter(|l| l["arrival"] == "redirect")
        .collect();
    assert_eq!(started.len(), 2, "{}", agent.log_text());
    for s in &started {
        assert_eq!(s["target"], "local-pg", "{s}");
        assert_eq!(
            s["original_destination"].as_str(),
            Some(format!("127.0.0.1:{}", pg.port).as_str()),
            "{s}"
        );
        assert_eq!(s["uid"].as_u64(), Some(NOBODY.into()), "{s}");
    }
    let server_log = pg.log_text();
    assert!(server_log.contains("select 'via loopback'"), "{server_log}");
    assert!(!server_log.contains("drop table kept"), "{server_log}");
    assert_eq!(
        psql(pg.port, "select count(*) from kept").unwrap().trim(),
        "0"
    );

    drop(agent);
    cleanup_redirect(&keep);
    let _ = std::fs::remove_dir(&pin_dir);
}
