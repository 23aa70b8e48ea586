//! SSH targets: a real OpenSSH server, the real ssh, scp, sftp and git
//! clients, and the agent between them holding the only key the server
//! accepts.

use std::net::TcpStream;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tollgate_tests::sshd::{both, client_options, ssh_command, Sshd};
use tollgate_tests::*;

/// Denies `rm` commands and every port forward; the rest is allowed.
const POLICY: &str = r#"
[defaults]
action = "allow"

[[rule]]
name = "no-rm"
action = "deny"
message = "deleting files on hosts goes through the runbook"
[rule.match]
kinds = ["exec"]
commands = ["rm *"]

[[rule]]
name = "no-tunnels"
action = "deny"
message = "no tunnels into production"
[rule.match]
kinds = ["forward"]
"#;

/// An agent with one SSH target (`web`, the server at `address`) and a
/// listener on 127.0.0.1 for it, and a known-hosts file for clients that
/// trusts the agent's host CA for the listener and for `address`.
struct Setup {
    sshd: Sshd,
    agent: Agent,
    listen: u16,
    known_hosts: PathBuf,
    _policy: PolicyFile,
    dir: tempfile::TempDir,
}

impl Setup {
    fn start(policy: &str, address: &str, sshd: Sshd, extra: &str, credential: &str) -> Setup {
        let policy = policy_file(policy);
        let dir = tempfile::tempdir().unwrap();
        let listen = free_port();
        let agent = Agent::start(&format!(
            "[agent]\n{}\ntls_dir = \"{}\"\n{extra}\n\n[[target]]\nname = \"web\"\naddress = \"{address}\"\n\
             ports = [{}]\nprotocol = \"ssh\"\nssh_known_hosts = \"{}\"\n\
             [[target.credential]]\nuser = \"{}\"\n{key}\n{credential}\n\n\
             [[listener]]\nlisten = \"127.0.0.1:{listen}\"\ntarget = \"web\"\n",
            policy.line,
            dir.path().join("tls").display(),
            sshd.port,
            sshd.known_hosts.display(),
            sshd.user,
            // A credential that logs in with a certificate has no key.
            key = if credential.contains("ssh_certificate") {
                String::new()
            } else {
                format!("ssh_key_file = \"{}\"", sshd.agent_key.display())
            },
        ));
        // What an operator appends to /etc/ssh/ssh_known_hosts, and the same
        // for the listener's address.
        let out = agent.cli(&["ssh", "known-hosts"]);
        assert!(out.status.success(), "{}", both(&out));
        let line = String::from_utf8(out.stdout).unwrap();
        let mut fields = line.split_whitespace();
        assert_eq!(fields.next(), Some("@cert-authority"), "{line}");
        assert_eq!(
            fields.next(),
            Some(format!("[{address}]:{}", sshd.port).as_str()),
            "{line}"
        );
        let key: Vec<&str> = fields.take(2).collect();
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!(
                "{}@cert-authority [127.0.0.1]:{listen} {}\n",
                line,
                key.join(" ")
            ),
        )
        .unwrap();
        Setup {
            sshd,
            agent,
            listen,
            known_hosts,
            _policy: policy,
            dir,
        }
    }

    /// A port something listens on that no rule allows a forward to: the
    /// agent's own listener.
    fn agent_port(&self) -> u16 {
        self.listen
    }

    /// `ssh` to the listener, as the server's user.
    fn ssh(&self) -> Command {
        ssh_command(
            &self.known_hosts,
            self.listen,
            &format!("{}@127.0.0.1", self.sshd.user),
        )
    }

    /// The recording of the session `wanted` picks from the newest first,
    /// as `recordings show` prints it.
    fn shown(&self, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let list = self.agent.cli(&["recordings", "list", "--json"]);
            let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap_or_default();
            let ids: Vec<String> = list
                .as_array()
                .map(|a| {
                    a.iter()
                        .rev()
                        .filter_map(|r| {
                            r["session"]
                                .as_str()
                                .or(r["id"].as_str())
                                .map(str::to_owned)
                        })
                        .collect()
                })
                .unwrap_or_default();
            for id in ids {
                let shown = self.agent.cli(&["recordings", "show", "--no-color", &id]);
                let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
                if wanted(&shown) && shown.contains("closed:") {
                    return shown;
                }
            }
            assert!(Instant::now() < deadline, "no recording matched");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

#[test]
fn commands_are_decided_exit_statuses_pass_back_and_a_refusal_names_its_rule() {
    let metrics_port = free_port();
    let s = Setup::start(
        POLICY,
        "127.0.0.1",
        Sshd::start(&[]),
        &format!("metrics_listen = \"127.0.0.1:{metrics_port}\""),
        "",
    );
    let marker = s.sshd.dir().join("keep-me");
    std::fs::write(&marker, "precious").unwrap();

    // An allowed command runs on the host and its exit status comes back.
    let out = run(s.ssh().arg("echo hello from the host; exit 3"));
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the host\n"
    );

    // A denied one never reaches the host; the client is told which rule.
    let out = run(s.ssh().arg(format!("rm -f {}", marker.display())));
    assert_eq!(out.status.code(), Some(255), "{}", both(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "tollgate: rm -f {} denied by rule \"no-rm\": deleting files on hosts goes through the runbook",
            marker.display()
        )),
        "{stderr}"
    );
    assert!(marker.exists(), "the refused command ran");

    // A refusal leaves the connection usable: over one multiplexed
    // connection, a refused command and then an allowed one.
    let control = s.dir.path().join("control");
    let mut master = s
        .ssh()
        .args(["-M", "-N", "-S"])
        .arg(&control)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !control.exists() {
        assert!(
            Instant::now() < deadline,
            "the master connection did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let over_master = |command: &str| run(s.ssh().arg("-S").arg(&control).arg(command));
    let refused = over_master(&format!("rm -f {}", marker.display()));
    assert_ne!(refused.status.code(), Some(0), "{}", both(&refused));
    let after = over_master("echo still usable");
    assert_eq!(after.status.code(), Some(0), "{}", both(&after));
    assert_eq!(String::from_utf8_lossy(&after.stdout), "still usable\n");
    let _ = master.kill();
    let _ = master.wait();
    assert!(marker.exists());

    // Decisions are counted per target and action.
    let metrics = crate::listener::http_get(metrics_port, "/metrics");
    assert!(
        metrics.contains("tollgate_statements_total{target=\"web\",action=\"deny\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_statements_total{target=\"web\",action=\"allow\"} 2"),
        "{metrics}"
    );

    // Both decisions and the exit status are in the session's recording.
    let shown = s.shown(|r| r.contains("echo hello from the host"));
    assert!(
        shown.contains("ALLOW  echo hello from the host; exit 3"),
        "{shown}"
    );
    assert!(shown.contains("exit status 3"), "{shown}");
    assert!(
        shown.contains(&format!(
            "logged in to the host by the agent as {}",
            s.sshd.user
        )),
        "{shown}"
    );
    let shown = s.shown(|r| r.contains("still usable"));
    assert!(shown.contains("DENY   rm -f"), "{shown}");
    assert!(shown.contains("[rule no-rm]"), "{shown}");
}

#[test]
fn an_allow_list_of_commands_is_not_widened_by_shell_syntax() {
    // Only `uptime` and `systemctl status <unit>` may run: a deny rule with
    // the allowed command lines as anchored regular expressions in its
    // `except`.
    let policy = r#"
[defaults]
action = "allow"

[[rule]]
name = "listed-commands-only"
action = "deny"
message = "only listed commands run on web"
[rule.match]
kinds = ["exec", "shell", "subsystem"]
[rule.except]
text_regex = '^(uptime|systemctl status [a-z0-9@.-]+)$'
"#;
    let s = Setup::start(policy, "127.0.0.1", Sshd::start(&[]), "", "");
    let out = run(s.ssh().arg("uptime"));
    assert!(out.status.success(), "{}", both(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("load average"));
    let marker = s.sshd.dir().join("smuggled");
    for attempt in [
        format!("uptime; touch {}", marker.display()),
        format!("uptime && touch {}", marker.display()),
        format!("uptime\ntouch {}", marker.display()),
        format!("uptime $(touch {})", marker.display()),
        format!("systemctl status x`touch {}`", marker.display()),
        format!("touch {}", marker.display()),
    ] {
        let out = run(s.ssh().arg(&attempt));
        assert_eq!(out.status.code(), Some(255), "{attempt:?}: {}", both(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("rule \"listed-commands-only\""),
            "{attempt:?}: {}",
            both(&out)
        );
    }
    // Bytes that are not UTF-8 are refused whatever the rules say: the
    // decided text would not be what the host runs.
    let mut bytes = b"uptime".to_vec();
    bytes.push(0xff);
    let out = run(s.ssh().arg(std::ffi::OsStr::from_bytes(&bytes)));
    assert_eq!(out.status.code(), Some(255), "{}", both(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not UTF-8 text"),
        "{}",
        both(&out)
    );
    // An interactive shell and sftp are not listed either.
    let out = run(s.ssh().arg("-tt"));
    assert_eq!(out.status.code(), Some(255), "{}", both(&out));
    let out = Command::new("sftp")
        .args(client_options(&s.known_hosts))
        .args(["-b", "-", "-P", &s.listen.to_string()])
        .arg(format!("{}@127.0.0.1", s.sshd.user))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", both(&out));
    assert!(!marker.exists(), "a smuggled command ran");
}

#[test]
fn port_forwards_are_refused_unless_allowed_and_agent_and_x11_forwarding_always() {
    let s = Setup::start(POLICY, "127.0.0.1", Sshd::start(&[]), "", "");
    // ssh -L: the tunnel opens locally, and each connection through it is
    // refused by the agent before the host is asked.
    let local = free_port();
    let mut tunnel = s
        .ssh()
        .arg("-N")
        .arg("-L")
        .arg(format!("127.0.0.1:{local}:127.0.0.1:{}", s.sshd.port))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut through = loop {
        if let Ok(c) = TcpStream::connect(("127.0.0.1", local)) {
            break c;
        }
        assert!(Instant::now() < deadline, "the tunnel did not open");
        std::thread::sleep(Duration::from_millis(50));
    };
    through
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut through, &mut got);
    assert!(
        !String::from_utf8_lossy(&got).contains("SSH-2.0"),
        "the forward reached the host's sshd: {got:?}"
    );
    let _ = tunnel.kill();
    let tunnel = tunnel.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&tunnel.stderr).contains("administratively prohibited"),
        "{}",
        both(&tunnel)
    );

    // Agent forwarding: the host never sees the job's agent.
    let agent_dir = tempfile::tempdir().unwrap();
    let agent_sock = agent_dir.path().join("agent.sock");
    let ssh_agent = Command::new("ssh-agent")
        .arg("-a")
        .arg(&agent_sock)
        .output()
        .unwrap();
    assert!(ssh_agent.status.success(), "{}", both(&ssh_agent));
    let out = run(s
        .ssh()
        .args(["-A", "-X"])
        .env("SSH_AUTH_SOCK", &agent_sock)
        .env("DISPLAY", ":0")
        .arg("echo \"agent=[$SSH_AUTH_SOCK] display=[$DISPLAY]\""));
    let _ = Command::new("ssh-agent")
        .arg("-k")
        .env("SSH_AUTH_SOCK", &agent_sock)
        .env("SSH_AGENT_PID", pid_of_agent(&ssh_agent))
        .output();
    assert!(out.status.success(), "{}", both(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "agent=[] display=[]\n",
        "{}",
        both(&out)
    );
    let shown = s.shown(|r| r.contains("AGENT FORWARDING"));
    assert!(
        shown.contains("DENY   AGENT FORWARDING") && shown.contains("DENY   X11 FORWARDING"),
        "{shown}"
    );
    let shown = s.shown(|r| r.contains("FORWARD 127.0.0.1"));
    assert!(shown.contains("[rule no-tunnels]"), "{shown}");
}

/// The pid `ssh-agent` printed.
fn pid_of_agent(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("SSH_AGENT_PID=")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_host_key_that_does_not_match_is_refused_and_the_client_is_told_why() {
    let sshd = Sshd::start(&[]);
    // The known-hosts file lists another key for the host.
    let other = tempfile::tempdir().unwrap();
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(other.path().join("k"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let other_key = std::fs::read_to_string(other.path().join("k.pub")).unwrap();
    std::fs::write(
        &sshd.known_hosts,
        format!("[127.0.0.1]:{} {}", sshd.port, other_key.trim()),
    )
    .unwrap();
    let s = Setup::start(POLICY, "127.0.0.1", sshd, "", "");
    let marker = s.sshd.dir().join("ran");
    let out = run(s.ssh().arg(format!("touch {}", marker.display())));
    assert_eq!(out.status.code(), Some(255), "{}", both(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not match line 1") && stderr.contains("refused"),
        "{stderr}"
    );
    assert!(!marker.exists());
    assert!(s.agent.log_text().contains("does not match line 1"));
}

#[test]
fn a_process_no_credential_is_for_is_turned_away_saying_so() {
    let s = Setup::start(
        POLICY,
        "127.0.0.1",
        Sshd::start(&[]),
        "",
        "match = { users = [\"deploy-bot\"] }",
    );
    let marker = s.sshd.dir().join("ran");
    let out = run(s.ssh().arg(format!("touch {}", marker.display())));
    assert_eq!(out.status.code(), Some(255), "{}", both(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "target \"web\" logs in with brokered credentials and none of them is for this process"
        ),
        "{}",
        both(&out)
    );
    assert!(!marker.exists());
}

#[test]
fn through_the_redirect_ssh_scp_sftp_git_and_a_shell_work_with_no_key_in_the_job() {
    if let Some(why) = ebpf_unavailable() {
        eprintln!("skipping: {why}");
        return;
    }
    let addrs = TestAddresses::add();
    let sshd = Sshd::start(&[addrs.v4.into()]);
    let redirect_dir = tempfile::tempdir().unwrap();
    let s = Setup::start(
        POLICY,
        &addrs.v4.to_string(),
        sshd,
        &redirect_section(redirect_dir.path(), "pass"),
        "",
    );
    let keep = redirect_dir.path().join("agent.toml");
    std::fs::copy(&s.agent.config, &keep).unwrap();
    let host = format!("{}@{}", s.sshd.user, addrs.v4);
    let port = s.sshd.port.to_string();
    let options = client_options(&s.known_hosts);

    // Not governed, the same client has no key the host accepts, even
    // trusting any host key.
    let direct = run(Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
        ])
        .args([
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-p",
            &port,
            &host,
            "true",
        ]));
    assert_eq!(direct.status.code(), Some(255), "{}", both(&direct));
    assert!(
        String::from_utf8_lossy(&direct.stderr).contains("Permission denied (publickey)"),
        "{}",
        both(&direct)
    );

    // Governed: ssh, unchanged, reaches the host through the agent.
    let governed = |args: &[&str]| exec_command(&s.agent, args);
    let mut ssh_line: Vec<&str> = vec!["ssh"];
    ssh_line.extend(options.iter().map(String::as_str));
    ssh_line.extend(["-p", &port, &host]);
    let mut line = ssh_line.clone();
    line.push("echo governed; exit 7");
    let out = run(&mut governed(&line));
    assert_eq!(out.status.code(), Some(7), "{}", both(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "governed\n");

    // scp up and down.
    let local = s.dir.path().join("payload.txt");
    std::fs::write(&local, "a file that travels\n").unwrap();
    let remote = s.sshd.dir().join("uploaded.txt");
    let mut scp: Vec<String> = vec!["scp".into()];
    scp.extend(options.iter().cloned());
    scp.extend(["-P".into(), port.clone()]);
    let mut up = scp.clone();
    up.push(local.display().to_string());
    up.push(format!("{host}:{}", remote.display()));
    let out = run(&mut governed(
        &up.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(out.status.success(), "{}", both(&out));
    assert_eq!(
        std::fs::read_to_string(&remote).unwrap(),
        "a file that travels\n"
    );
    let back = s.dir.path().join("back.txt");
    let mut down = scp.clone();
    down.push(format!("{host}:{}", remote.display()));
    down.push(back.display().to_string());
    let out = run(&mut governed(
        &down.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(out.status.success(), "{}", both(&out));
    assert_eq!(
        std::fs::read_to_string(&back).unwrap(),
        "a file that travels\n"
    );

    // sftp in batch mode.
    let batch = s.dir.path().join("batch");
    let by_sftp = s.sshd.dir().join("by-sftp.txt");
    let renamed = s.sshd.dir().join("renamed.txt");
    let fetched = s.dir.path().join("fetched.txt");
    std::fs::write(
        &batch,
        format!(
            "put {local} {up}\nrename {up} {renamed}\nls -l {renamed}\nget {renamed} {fetched}\nrm {renamed}\n",
            local = local.display(),
            up = by_sftp.display(),
            renamed = renamed.display(),
            fetched = fetched.display(),
        ),
    )
    .unwrap();
    let mut sftp: Vec<String> = vec!["sftp".into()];
    sftp.extend(options.iter().cloned());
    sftp.extend([
        "-P".into(),
        port.clone(),
        "-b".into(),
        batch.display().to_string(),
        host.clone(),
    ]);
    let out = run(&mut governed(
        &sftp.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(out.status.success(), "{}", both(&out));
    assert_eq!(
        std::fs::read_to_string(&fetched).unwrap(),
        "a file that travels\n"
    );
    assert!(!by_sftp.exists() && !renamed.exists());
    // Its file operations are in the session's recording, with sizes.
    let shown = s.shown(|r| r.contains("sftp: rename"));
    for line in [
        format!(
            "sftp: file {} (0 bytes read, 20 written)",
            by_sftp.display()
        ),
        format!(
            "sftp: rename {} -> {}",
            by_sftp.display(),
            renamed.display()
        ),
        format!(
            "sftp: file {} (20 bytes read, 0 written)",
            renamed.display()
        ),
        format!("sftp: remove {}", renamed.display()),
    ] {
        assert!(shown.contains(&line), "{line}\n{shown}");
    }

    // git push to and clone from a bare repository over SSH.
    let bare = s.sshd.dir().join("repo.git");
    let git = |dir: &Path, args: &[&str]| {
        let out = run(Command::new("git").current_dir(dir).args(args));
        assert!(out.status.success(), "git {args:?}: {}", both(&out));
    };
    git(
        s.sshd.dir(),
        &[
            "init",
            "-q",
            "--bare",
            "-b",
            "main",
            &bare.display().to_string(),
        ],
    );
    let work = s.dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("README"), "pushed over ssh\n").unwrap();
    git(&work, &["add", "README"]);
    git(
        &work,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "commit",
            "-q",
            "-m",
            "one",
        ],
    );
    let url = format!("ssh://{host}:{port}{}", bare.display());
    let git_ssh = format!("ssh {}", options.join(" "));
    let mut push = governed(&["git", "push", "-q", &url, "main"]);
    push.current_dir(&work).env("GIT_SSH_COMMAND", &git_ssh);
    let out = run(&mut push);
    assert!(out.status.success(), "{}", both(&out));
    let clone = s.dir.path().join("clone");
    let mut cloning = governed(&["git", "clone", "-q", &url, &clone.display().to_string()]);
    cloning.env("GIT_SSH_COMMAND", &git_ssh);
    let out = run(&mut cloning);
    assert!(out.status.success(), "{}", both(&out));
    assert_eq!(
        std::fs::read_to_string(clone.join("README")).unwrap(),
        "pushed over ssh\n"
    );

    // An interactive shell on a terminal, then replayed from its recording.
    // ssh runs on a pseudo-terminal of its own (script(1)), as a person's
    // would, and asks for one on the host.
    let mut shell_line = ssh_line.clone();
    shell_line.insert(1, "-t");
    let shell_line = shell_line.join(" ");
    let shell = ["script", "-q", "-e", "-c", &shell_line, "/dev/null"];
    let mut child = governed(&shell)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"echo answer=$((6*7))\nexit 4\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", both(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("answer=42"));
    let shown = s.shown(|r| r.contains("SHELL"));
    assert!(shown.contains("ALLOW  SHELL"), "{shown}");
    assert!(shown.contains("exit status 4"), "{shown}");
    assert!(shown.contains("answer=42"), "{shown}");
    let session = shown
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("session "))
        .unwrap()
        .trim()
        .to_owned();
    let replayed = s
        .agent
        .cli(&["recordings", "replay", "--speed", "0", &session]);
    assert!(replayed.status.success(), "{}", both(&replayed));
    assert!(String::from_utf8_lossy(&replayed.stdout).contains("answer=42"));
    let cast = s
        .agent
        .cli(&["recordings", "export", "--format", "asciicast", &session]);
    assert!(cast.status.success(), "{}", both(&cast));
    let cast = String::from_utf8_lossy(&cast.stdout).into_owned();
    let mut lines = cast.lines();
    let head: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(head["version"], 2);
    let frames: Vec<serde_json::Value> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(frames
        .iter()
        .all(|f| f[1] == "o" && f[0].as_f64().is_some()));
    assert!(frames
        .iter()
        .any(|f| f[2].as_str().unwrap_or("").contains("answer=42")));

    // The job holds no key: nothing in its environment, and the agent's key
    // file is not readable by it.
    let key = std::fs::read_to_string(&s.sshd.agent_key).unwrap();
    let key_body: String = key.lines().nth(1).unwrap().to_owned();
    let probe = format!(
        "env; cat {} 2>&1; ls -la ~/.ssh 2>&1",
        s.sshd.agent_key.display()
    );
    let out = run(&mut governed(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "sh",
        "-c",
        &probe,
    ]));
    let seen = both(&out);
    assert!(!seen.contains(&key_body), "the job can read the key");
    assert!(seen.contains("Permission denied"), "{seen}");
    assert_eq!(
        std::fs::metadata(&s.sshd.agent_key)
            .unwrap()
            .permissions()
            .mode()
            & 0o077,
        0
    );
    // Nor does anything the agent wrote or answers.
    let mut everything = s.agent.log_text();
    everything.push_str(&String::from_utf8_lossy(
        &s.agent.cli(&["status", "--json"]).stdout,
    ));
    assert!(!everything.contains(&key_body));

    drop(s);
    // The key files the configuration names went with the setup, so it no
    // longer validates; detach reads only where the agent answers and pins,
    // and still removes them (cleanup_redirect fails the test otherwise).
    let check = Command::new(tollgate_tests::agent_binary())
        .args(["config", "check", "--config"])
        .arg(&keep)
        .output()
        .unwrap();
    assert!(!check.status.success(), "{check:?}");
    cleanup_redirect(&keep);
}

#[test]
fn install_adds_the_cert_authority_lines_once_keeping_the_files_other_lines() {
    let root = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(&[]);
    let etc = root.path().join("etc/tollgate");
    std::fs::create_dir_all(&etc).unwrap();
    let listen = free_port();
    std::fs::write(
        etc.join("tollgate.toml"),
        format!(
            "[agent]\ntls_dir = \"{}\"\n\n[[target]]\nname = \"web\"\naddress = \"127.0.0.1\"\n\
             ports = [{listen}]\nprotocol = \"ssh\"\nssh_known_hosts = \"{}\"\n\
             [[target.credential]]\nuser = \"{}\"\nssh_key_file = \"{}\"\n",
            root.path().join("tls").display(),
            sshd.known_hosts.display(),
            sshd.user,
            sshd.agent_key.display(),
        ),
    )
    .unwrap();
    let known = root.path().join("etc/ssh/ssh_known_hosts");
    std::fs::create_dir_all(known.parent().unwrap()).unwrap();
    std::fs::write(&known, "[other.example]:22 ssh-ed25519 AAAAkeepme\n").unwrap();
    for _ in 0..2 {
        let out = Command::new(workspace_root().join("scripts/install.sh"))
            .arg("--root")
            .arg(root.path())
            .arg("--binary")
            .arg(agent_binary())
            .arg("--no-start")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", both(&out));
    }
    let text = std::fs::read_to_string(&known).unwrap();
    assert!(
        text.starts_with("[other.example]:22 ssh-ed25519 AAAAkeepme\n"),
        "{text}"
    );
    assert_eq!(text.matches("@cert-authority").count(), 1, "{text}");
    let ca = std::fs::read_to_string(root.path().join("tls/ssh_host_ca.pub")).unwrap();
    let ca: Vec<&str> = ca.split_whitespace().take(2).collect();
    assert!(
        text.contains(&format!(
            "@cert-authority [127.0.0.1]:{listen} {}",
            ca.join(" ")
        )),
        "{text}"
    );
    assert_eq!(
        std::fs::metadata(root.path().join("tls/ssh_host_ca"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
}

#[test]
fn a_held_command_runs_once_another_user_approves_it_and_a_grant_covers_it_again() {
    use tollgate_tests::review::{approvals_as, id_of, ok, pending_from};
    let policy = r#"
[defaults]
action = "allow"

[[rule]]
name = "review-touch"
action = "review"
message = "changes on web need a second person"
approvers = ["group:daemon"]
timeout = "30s"
grant = "1h"
[rule.match]
kinds = ["exec"]
commands = ["touch *"]
"#;
    let s = Setup::start(policy, "127.0.0.1", Sshd::start(&[]), "", "");
    // Reviewers reach the agent's socket.
    std::fs::set_permissions(s.agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = s.agent.dir.path().join("approvals.sock");
    let marker = s.sshd.dir().join("approved");
    // The requester runs in a cgroup of its own, as a CI job would: a
    // reviewer in the requester's cgroup is refused.
    let cgroup = cgroup_mount().join(format!("tollgate-ssh-review-{}", s.listen));
    std::fs::create_dir_all(&cgroup).unwrap();
    let _cgroup = RemovedOnDrop(vec![cgroup.clone()]);
    let spawn = |command: &str| {
        let mut args = client_options(&s.known_hosts);
        args.extend([
            "-p".to_owned(),
            s.listen.to_string(),
            format!("{}@127.0.0.1", s.sshd.user),
            command.to_owned(),
        ]);
        tollgate_tests::review::spawn_in_cgroup(&cgroup, Path::new("/usr/bin/ssh"), &args)
    };

    // Denied by the reviewer: it never runs, and the client says why.
    let denied_marker = s.sshd.dir().join("denied");
    let mut client = spawn(&format!("touch {}", denied_marker.display()));
    let pending = pending_from(&socket, &mut client);
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(
        pending[0]["text"].as_str(),
        Some(format!("touch {}", denied_marker.display()).as_str()),
        "{pending:?}"
    );
    ok(&approvals_as(
        &socket,
        "daemon",
        &["deny", &id_of(&pending[0]), "--reason", "not now"],
    ));
    let out = client.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(255), "{}", both(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("held for review"), "{stderr}");
    assert!(
        stderr.contains("denied by reviewer daemon: not now"),
        "{stderr}"
    );
    assert!(!denied_marker.exists());

    // Approved: it runs, and its exit status comes back.
    let mut client = spawn(&format!("touch {}; exit 5", marker.display()));
    let pending = pending_from(&socket, &mut client);
    ok(&approvals_as(
        &socket,
        "daemon",
        &["approve", &id_of(&pending[0]), "--for", "30m"],
    ));
    let out = client.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", both(&out));
    assert!(marker.exists());

    // The approval's grant covers the same command from the same identity.
    std::fs::remove_file(&marker).unwrap();
    let out = spawn(&format!("touch {}; exit 5", marker.display()))
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", both(&out));
    assert!(marker.exists());
    let shown = s.shown(|r| r.contains("grant"));
    assert!(shown.contains("grant"), "{shown}");
}

#[test]
fn a_rule_with_on_match_kill_ends_the_ssh_that_sent_the_command() {
    let policy = r#"
[defaults]
action = "allow"

[[rule]]
name = "no-shadow"
action = "deny"
on_match = "kill"
[rule.match]
kinds = ["exec"]
text_regex = "/etc/shadow"
"#;
    let s = Setup::start(policy, "127.0.0.1", Sshd::start(&[]), "", "");
    let out = run(s.ssh().arg("cat /etc/shadow"));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(9), "{}", both(&out));
    // Other commands of other clients go on.
    let out = run(s.ssh().arg("echo fine"));
    assert!(out.status.success(), "{}", both(&out));
    let shown = s.shown(|r| r.contains("cat /etc/shadow"));
    assert!(shown.contains("on_match:"), "{shown}");
    assert!(shown.contains("DENY   cat /etc/shadow"), "{shown}");
}

#[test]
fn a_forward_a_rule_allows_reaches_the_host_and_others_are_refused() {
    let sshd = Sshd::start(&[]);
    let policy = format!(
        r#"
[defaults]
action = "allow"

[[rule]]
name = "only-the-listed-tunnel"
action = "deny"
[rule.match]
kinds = ["forward"]
[rule.except]
text_regex = '^127\.0\.0\.1:{}$'
"#,
        sshd.port
    );
    let s = Setup::start(&policy, "127.0.0.1", sshd, "", "");
    let allowed = free_port();
    let other = free_port();
    let mut tunnel = s
        .ssh()
        .arg("-N")
        .arg("-L")
        .arg(format!("127.0.0.1:{allowed}:127.0.0.1:{}", s.sshd.port))
        .arg("-L")
        .arg(format!("127.0.0.1:{other}:127.0.0.1:{}", s.agent_port()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let read_through = |port: u16| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut through = loop {
            if let Ok(c) = TcpStream::connect(("127.0.0.1", port)) {
                break c;
            }
            assert!(Instant::now() < deadline, "the tunnel did not open");
            std::thread::sleep(Duration::from_millis(50));
        };
        through
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = [0u8; 64];
        let n = std::io::Read::read(&mut through, &mut got).unwrap_or(0);
        String::from_utf8_lossy(&got[..n]).into_owned()
    };
    // The listed destination: the host's own sshd answers through it.
    assert!(read_through(allowed).starts_with("SSH-2.0-OpenSSH"));
    // Another one is refused by the agent.
    assert_eq!(read_through(other), "");
    let _ = tunnel.kill();
    let _ = tunnel.wait();
    let shown = s.shown(|r| r.contains("FORWARD"));
    assert!(
        shown.contains(&format!("ALLOW  FORWARD 127.0.0.1:{}", s.sshd.port)),
        "{shown}"
    );
    assert!(shown.contains("[rule only-the-listed-tunnel]"), "{shown}");
}

#[test]
fn rsync_over_ssh_copies_through_the_agent() {
    let s = Setup::start(POLICY, "127.0.0.1", Sshd::start(&[]), "", "");
    let source = s.dir.path().join("tree");
    std::fs::create_dir_all(source.join("sub")).unwrap();
    std::fs::write(source.join("a.txt"), "first\n").unwrap();
    std::fs::write(source.join("sub/b.txt"), "second\n").unwrap();
    let target = s.sshd.dir().join("copied");
    let shell = format!(
        "ssh {} -p {}",
        client_options(&s.known_hosts).join(" "),
        s.listen
    );
    let out = run(Command::new("rsync")
        .args(["-a", "-e", &shell])
        .arg(format!("{}/", source.display()))
        .arg(format!("{}@127.0.0.1:{}/", s.sshd.user, target.display())));
    assert!(out.status.success(), "{}", both(&out));
    assert_eq!(
        std::fs::read_to_string(target.join("sub/b.txt")).unwrap(),
        "second\n"
    );
    let shown = s.shown(|r| r.contains("rsync --server"));
    assert!(shown.contains("ALLOW  rsync --server"), "{shown}");
    assert!(shown.contains("exit status 0"), "{shown}");
}

#[test]
fn a_remote_forward_a_rule_allows_brings_the_hosts_connections_back_to_the_job() {
    let sshd = Sshd::start(&[]);
    let allowed = free_port();
    let policy = format!(
        r#"
[defaults]
action = "allow"

[[rule]]
name = "only-the-listed-tunnel"
action = "deny"
[rule.match]
kinds = ["forward"]
[rule.except]
text_regex = '^127\.0\.0\.1:{allowed}$'
"#
    );
    let s = Setup::start(&policy, "127.0.0.1", sshd, "", "");
    // A service on the job's side that greets whoever connects.
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let service_port = service.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in service.incoming().flatten() {
            let mut conn = conn;
            let _ = std::io::Write::write_all(&mut conn, b"hello from the job\n");
        }
    });
    let mut tunnel = s
        .ssh()
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-R"])
        .arg(format!("127.0.0.1:{allowed}:127.0.0.1:{service_port}"))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // On the host (this machine), the forwarded port reaches the service.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = String::new();
    while !got.contains("hello from the job") {
        assert!(
            Instant::now() < deadline,
            "the forward did not bring the service back: {got:?}"
        );
        if let Ok(mut c) = TcpStream::connect(("127.0.0.1", allowed)) {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            got.clear();
            let _ = std::io::Read::read_to_string(&mut c, &mut got);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = tunnel.kill();
    let _ = tunnel.wait();

    // Another port is refused, and ssh says so.
    let other = free_port();
    let out = run(s
        .ssh()
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-R"])
        .arg(format!("127.0.0.1:{other}:127.0.0.1:{service_port}")));
    assert_eq!(out.status.code(), Some(255), "{}", both(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("remote port forwarding failed"),
        "{}",
        both(&out)
    );
    assert!(TcpStream::connect(("127.0.0.1", other)).is_err());
    let shown = s.shown(|r| r.contains(&format!("REMOTE FORWARD 127.0.0.1:{other}")));
    assert!(shown.contains("[rule only-the-listed-tunnel]"), "{shown}");
}

#[test]
fn a_host_vouched_for_by_a_trusted_ca_is_accepted_and_one_signed_by_another_is_refused() {
    let cas = tempfile::tempdir().unwrap();
    for name in ["ca", "other-ca"] {
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(cas.path().join(name))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", both(&out));
    }
    let ca = cas.path().join("ca");
    let ca_pub = cas.path().join("ca.pub");
    // The host's certificate is signed by the CA the known-hosts file
    // trusts: the session runs, with no host key listed anywhere.
    let s = Setup::start(
        POLICY,
        "127.0.0.1",
        Sshd::start_certified(&ca, &ca_pub),
        "",
        "",
    );
    let known = std::fs::read_to_string(&s.sshd.known_hosts).unwrap();
    assert!(
        known.starts_with("@cert-authority ") && !known.contains(&s.sshd.host_key),
        "{known}"
    );
    let out = run(s.ssh().arg("echo vouched for"));
    assert!(out.status.success(), "{}", both(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "vouched for\n");
    drop(s);

    // Signed by another CA: refused, and the client is told why.
    let other = cas.path().join("other-ca");
    let s = Setup::start(
        POLICY,
        "127.0.0.1",
        Sshd::start_certified(&other, &ca_pub),
        "",
        "",
    );
    let marker = s.sshd.dir().join("ran");
    let out = run(s.ssh().arg(format!("touch {}", marker.display())));
    assert_eq!(out.status.code(), Some(255), "{}", both(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the host certificate of 127.0.0.1"),
        "{}",
        both(&out)
    );
    assert!(!marker.exists());
}

#[test]
fn a_host_that_trusts_the_agents_user_ca_takes_a_certificate_signed_for_the_session() {
    let sshd = Sshd::start(&[]);
    // The host authorizes no key at all.
    std::fs::write(sshd.dir().join("authorized_keys"), "").unwrap();
    let s = Setup::start(POLICY, "127.0.0.1", sshd, "", "ssh_certificate = true");
    let out = run(s.ssh().arg("echo before the host trusts the CA"));
    assert_eq!(out.status.code(), Some(255), "{}", both(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TrustedUserCAKeys"),
        "{}",
        both(&out)
    );
    let ca = s.agent.cli(&["ssh", "user-ca"]);
    assert!(ca.status.success(), "{}", both(&ca));
    s.sshd.trust_user_ca(&String::from_utf8_lossy(&ca.stdout));
    let out = run(s.ssh().arg("echo with a certificate"));
    assert!(out.status.success(), "{}", both(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "with a certificate\n");
    // The host logged the certificate's id: the agent's session.
    let log = s.sshd.log_text();
    assert!(log.contains("ID tollgate session"), "{log}");
}
