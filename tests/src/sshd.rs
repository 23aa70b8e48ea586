//! A throwaway OpenSSH server (Debian's `openssh-server`) on a free port in
//! a temporary directory, with its own host key and one authorized key: the
//! key the agent holds (the brokered credential). The user it serves is the
//! one the tests run as.

use std::fs;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running `sshd`, stopped on drop.
pub struct Sshd {
    /// Its port, on every address it listens on.
    pub port: u16,
    /// The user it logs in (the tests' own).
    pub user: String,
    /// The private key only the agent holds (root-only file).
    pub agent_key: PathBuf,
    /// A known-hosts file listing this server's host key for each address.
    pub known_hosts: PathBuf,
    /// The server's host public key (`ssh-ed25519 AAAA...`).
    pub host_key: String,
    dir: tempfile::TempDir,
    child: Child,
}

fn keygen(path: &Path, comment: &str) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .output()
        .expect("running ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Sshd {
    /// Starts a server listening on 127.0.0.1 and `extra` addresses.
    pub fn start(extra: &[IpAddr]) -> Sshd {
        Sshd::start_with(extra, None)
    }

    /// Like [`Sshd::start`], presenting a host certificate that the CA
    /// whose private key is `ca` signed for 127.0.0.1; its known-hosts file
    /// then holds only an `@cert-authority` line for `ca_trusted` (the CA
    /// public key clients are told to trust, `ca`'s own or another).
    pub fn start_certified(ca: &Path, ca_trusted: &Path) -> Sshd {
        Sshd::start_with(&[], Some((ca, ca_trusted)))
    }

    fn start_with(extra: &[IpAddr], certified: Option<(&Path, &Path)>) -> Sshd {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-sshd-")
            .tempdir()
            .unwrap();
        let path = dir.path();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
        keygen(&path.join("host_key"), "test-host");
        let secrets = path.join("secrets");
        fs::create_dir(&secrets).unwrap();
        fs::set_permissions(&secrets, fs::Permissions::from_mode(0o700)).unwrap();
        let agent_key = secrets.join("agent_key");
        keygen(&agent_key, "tollgate-broker");
        fs::copy(
            agent_key.with_extension("pub"),
            path.join("authorized_keys"),
        )
        .unwrap();
        // The public half is not a secret, but nothing else may be in the
        // agent's directory of secrets.
        fs::remove_file(agent_key.with_extension("pub")).unwrap();
        let host_key = fs::read_to_string(path.join("host_key.pub")).unwrap();
        let host_key = host_key
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let port = crate::free_port();
        let mut addresses: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1])];
        addresses.extend_from_slice(extra);
        let listen: String = addresses
            .iter()
            .map(|a| format!("ListenAddress {}\n", SocketAddr::new(*a, port)))
            .collect();
        let known: String = addresses
            .iter()
            .map(|a| format!("[{a}]:{port} {host_key}\n"))
            .collect();
        let mut host_certificate = String::new();
        let known = match certified {
            None => known,
            Some((ca, trusted)) => {
                let out = Command::new("ssh-keygen")
                    .args(["-q", "-s"])
                    .arg(ca)
                    .args(["-I", "test-host", "-h", "-n", "127.0.0.1", "-V", "-5m:+1h"])
                    .arg(path.join("host_key.pub"))
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "ssh-keygen -s: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                host_certificate = format!(
                    "HostCertificate {}\n",
                    path.join("host_key-cert.pub").display()
                );
                let ca_public = fs::read_to_string(trusted).unwrap();
                format!("@cert-authority [127.0.0.1]:{port} {}\n", ca_public.trim())
            }
        };
        let known_hosts = path.join("known_hosts");
        fs::write(&known_hosts, known).unwrap();
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_owned();
        let config = format!(
            "{listen}{host_certificate}HostKey {dir}/host_key\nAuthorizedKeysFile {dir}/authorized_keys\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PidFile {dir}/sshd.pid\nSubsystem sftp internal-sftp\n\
             AllowTcpForwarding yes\nAllowAgentForwarding yes\nX11Forwarding yes\n\
             AcceptEnv LANG\nLogLevel VERBOSE\nTrustedUserCAKeys {dir}/trusted_user_ca\n",
            dir = path.display()
        );
        fs::write(path.join("sshd_config"), config).unwrap();
        // Read at each login: filled by a test that trusts a user CA.
        fs::write(path.join("trusted_user_ca"), "").unwrap();
        // sshd's privilege separation directory (as Debian's unit makes it).
        let _ = fs::create_dir_all("/run/sshd");
        let log = fs::File::create(path.join("sshd.log")).unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(path.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting /usr/sbin/sshd (Debian's openssh-server)");
        let sshd = Sshd {
            port,
            user,
            agent_key,
            known_hosts,
            host_key,
            dir,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not start: {}",
                sshd.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sshd
    }

    /// Trusts the user CA whose public key line is `line` for logins.
    pub fn trust_user_ca(&self, line: &str) {
        fs::write(
            self.dir.path().join("trusted_user_ca"),
            format!("{}\n", line.trim()),
        )
        .unwrap();
    }

    /// What the server logged.
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// A directory for the test's files, readable by the server's user.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An OpenSSH client command for `user@host` port `port` that trusts only
/// the host keys (and `@cert-authority` lines) in `known_hosts`, reads no
/// user configuration and never prompts.
pub fn ssh_command(known_hosts: &Path, port: u16, destination: &str) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.args(client_options(known_hosts))
        .args(["-p", &port.to_string(), destination]);
    cmd
}

/// The options every client (ssh, scp, sftp, git's ssh) gets.
pub fn client_options(known_hosts: &Path) -> Vec<String> {
    vec![
        "-F".into(),
        "/dev/null".into(),
        "-o".into(),
        format!("UserKnownHostsFile={}", known_hosts.display()),
        "-o".into(),
        "GlobalKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "ConnectTimeout=10".into(),
    ]
}

/// The text of both streams of `out`.
pub fn both(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
