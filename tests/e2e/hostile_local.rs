//! The redirect against a hostile local process: an unprivileged user
//! (nobody, uid 65534) who squats pin directories on a world-writable bpffs,
//! tampers with the pins, or asks `tollgate exec` to move it out of a
//! stricter cgroup. As root, with real PostgreSQL and real eBPF.

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

fn cgroup_mount() -> &'static Path {
    if Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
        Path::new("/sys/fs/cgroup/unified")
    } else {
        Path::new("/sys/fs/cgroup")
    }
}

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
        let addrs = TestAddresses::add();
        let pg = Postgres::start_listening(&[addrs.v4.into()]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let section = redirect_section(dir.path(), exec_unlisted);
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
    assert_eq!(pins.len(), 3, "{pins:?}");

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
    assert_eq!(points, ["connect4", "connect6", "sock_ops"], "{status}");
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

/// Empty directories (cgroups) removed in order on drop.
struct RemovedOnDrop(Vec<PathBuf>);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir(dir);
        }
    }
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
