//! The agent's configuration file (TOML).
//!
//! Parsing happens in two steps, as in ripgrep's raw versus checked arguments:
//! [`raw`] mirrors the file exactly (with the byte span of every value that a
//! later check may complain about), and [`Config::from_toml`] turns it into the
//! validated, ready-to-run [`Config`]. Every error carries `file:line:column`
//! and says what to change.

mod raw;
pub mod secret;
mod target;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use target::{
    BrokeredCredential, ClientCertificate, ClientCredentials, PortRange, Protocol, Target,
    TargetAddress, TargetSet, UpstreamTls,
};

/// The default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tollgate/tollgate.toml";
/// The default location of the control socket that `tollgate status` talks to.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/tollgate/control.sock";

/// The default location of the reviewer API socket (`tollgate approvals`).
pub const DEFAULT_APPROVALS_SOCKET: &str = "/run/tollgate/approvals.sock";

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration was read from.
    pub source: PathBuf,
    /// Agent-wide settings.
    pub agent: AgentSettings,
    /// Every target, in file order (the first match wins).
    pub targets: TargetSet,
    /// Explicit listeners: a local address mapped to one target.
    pub listeners: Vec<Listener>,
    /// cgroups whose processes are governed by the transparent redirect.
    pub cgroups: Vec<GovernedCgroup>,
    /// The transparent redirect, when `[redirect]` is present.
    pub redirect: Option<RedirectSettings>,
    /// Named reviewer groups (`[reviewers.NAME] users = [...]`) that
    /// `review` rules name as `"reviewers:NAME"`: name → user names.
    pub reviewers: std::collections::BTreeMap<String, Vec<String>>,
    /// Host-wide bypass detection, when `[protect]` is present (it needs
    /// `[redirect]`).
    pub protect: Option<ProtectSettings>,
    /// Where review requests are announced (`[[notify]]`), in file order.
    pub notify: Vec<NotifyTarget>,
    /// Recordings uploaded to object storage, when `[upload]` is present.
    pub upload: Option<UploadSettings>,
    /// Where the policy comes from, when `[policy_source]` is present
    /// (then `agent.policy_paths` is its cached copy).
    pub policy_source: Option<PolicySourceSettings>,
    /// The approvals store shared by the fleet, when `[shared_approvals]`
    /// is present.
    pub shared_approvals: Option<SharedApprovalsSettings>,
}

/// Settings under `[shared_approvals]`: review requests kept in a
/// PostgreSQL database that every agent and `tollgate review-server`
/// share, so that reviewers decide any host's statements in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedApprovalsSettings {
    /// The connection string, as the PostgreSQL client takes it (a URL or
    /// `key=value` pairs), without a password.
    pub database: String,
    /// A root-only file holding the password.
    pub password_file: Option<PathBuf>,
    /// PEM certificates that sign the database's certificate; the
    /// system's roots when `None`.
    pub ca_file: Option<PathBuf>,
    /// The name this agent's requests carry (the host name by default).
    pub host: String,
}

/// Settings under `[policy_source]`: the policy fetched from one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySourceSettings {
    /// Where from.
    pub origin: PolicyOrigin,
    /// Where fetched copies are kept (`current` is the one in force).
    pub dir: PathBuf,
    /// How often the source is polled.
    pub interval: Duration,
}

impl PolicySourceSettings {
    /// The default `dir`.
    pub const DEFAULT_DIR: &'static str = "/var/lib/tollgate/policy-source";
    /// The default `interval`.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

    /// The copy in force: a link to the last version that loaded.
    pub fn current(&self) -> PathBuf {
        crate::policy::source::current_dir(&self.dir)
    }
}

/// Where `[policy_source]` fetches policy files from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyOrigin {
    /// The `*.toml` objects directly under a prefix of a bucket.
    S3 {
        /// The bucket.
        s3: S3Access,
        /// The prefix (no slashes around it; may be empty).
        prefix: String,
    },
    /// The `*.toml` files of a directory of a git repository's branch.
    Git {
        /// What `git clone` takes.
        url: String,
        /// The branch.
        branch: String,
        /// The directory in the repository (`.` for its top).
        path: String,
    },
}

impl fmt::Display for PolicyOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyOrigin::S3 { s3, prefix } => write!(f, "s3://{}/{prefix}", s3.bucket),
            PolicyOrigin::Git { url, branch, path } => write!(f, "{url} (branch {branch}, {path})"),
        }
    }
}

/// How to reach an S3-compatible bucket (`[upload]`, `[policy_source]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Access {
    /// The bucket.
    pub bucket: String,
    /// The S3 endpoint (MinIO, Ceph, another provider); AWS when `None`.
    pub endpoint: Option<String>,
    /// The bucket's region.
    pub region: String,
    /// A static access key, with its secret in a root-only file; `None`:
    /// the standard AWS environment variables, web identity or the
    /// instance's role.
    pub access_key_id: Option<String>,
    /// The secret key's file (checked as secret files are).
    pub secret_access_key_file: Option<PathBuf>,
}

/// Settings under `[upload]`: every closed recording goes to an
/// S3-compatible bucket and is deleted locally once the copy is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadSettings {
    /// The bucket and how to reach it.
    pub s3: S3Access,
    /// Keys start with this (no slashes around it); may be empty.
    pub prefix: String,
    /// This host's name in keys (default: the kernel's host name).
    pub host: String,
    /// Most bytes of recordings kept locally, uploaded or not; past it new
    /// sessions are refused until uploads catch up (nothing is dropped).
    pub max_spool_size: u64,
    /// Longest wait between retries while uploads fail (the wait doubles
    /// from one second up to this).
    pub max_retry_interval: Duration,
    /// Object Lock retention set on every uploaded recording, when
    /// `object_lock_mode` is configured (the bucket must have Object Lock).
    pub object_lock: Option<ObjectLock>,
}

/// `[upload] object_lock_mode` and `object_lock_days`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    /// How strictly the object is kept.
    pub mode: ObjectLockMode,
    /// For how long from the upload.
    pub days: u64,
}

/// An Object Lock retention mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectLockMode {
    /// Nobody, root account included, can delete or shorten it.
    Compliance,
    /// Users with a special permission can.
    Governance,
}

impl ObjectLockMode {
    /// The `x-amz-object-lock-mode` value.
    pub fn as_header(self) -> &'static str {
        match self {
            ObjectLockMode::Compliance => "COMPLIANCE",
            ObjectLockMode::Governance => "GOVERNANCE",
        }
    }
}

impl UploadSettings {
    /// `max_spool_size` when not configured.
    pub const DEFAULT_MAX_SPOOL_SIZE: u64 = 10 << 30;
    /// `max_retry_interval` when not configured.
    pub const DEFAULT_MAX_RETRY_INTERVAL: Duration = Duration::from_secs(300);
}

/// This host's name as the kernel has it (`uname -n`), or `localhost`.
pub fn this_host_name() -> String {
    let name = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

/// What a `[[notify]]` entry sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NotifyKind {
    /// A JSON document of the request event and its context.
    Webhook,
    /// A Slack incoming-webhook message (`text` and `blocks`).
    Slack,
}

impl NotifyKind {
    /// `webhook` or `slack`, as configured and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyKind::Webhook => "webhook",
            NotifyKind::Slack => "slack",
        }
    }
}

/// One `[[notify]]` entry: where review request events are sent.
#[derive(Debug, Clone)]
pub struct NotifyTarget {
    /// What is sent.
    pub kind: NotifyKind,
    /// Where (`http://` or `https://`), checked at load.
    pub url: hyper::Uri,
    /// Extra request headers (such as `authorization`), validated.
    pub headers: Vec<(String, String)>,
    /// The reviewers' web page; messages link to `LINK#REQUEST_ID`.
    pub link: Option<String>,
    /// The request events sent (`requested` unless configured).
    pub events: Vec<crate::approval::RequestEventKind>,
}

impl NotifyTarget {
    /// The URL's host, for logs (never the path or query, which may carry
    /// a secret, as Slack's do).
    pub fn host(&self) -> &str {
        self.url.host().unwrap_or("?")
    }
}

/// Settings under `[protect]`: a program on the cgroup v2 root that reports,
/// or refuses, connections to targets that did not come through the
/// redirect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectSettings {
    /// Report only, or refuse too.
    pub mode: ProtectMode,
    /// Names of the protected targets; `None`: every target.
    pub targets: Option<Vec<String>>,
}

impl ProtectSettings {
    /// Whether the target named `name` is protected.
    pub fn covers(&self, name: &str) -> bool {
        self.targets
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name))
    }
}

/// `[protect] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtectMode {
    /// Let a bypassing connection through, log and count it.
    Audit,
    /// Refuse it (`EPERM`), log and count it.
    Deny,
}

impl ProtectMode {
    /// The name used in the configuration, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ProtectMode::Audit => "audit",
            ProtectMode::Deny => "deny",
        }
    }
}

/// Settings under `[redirect]`: the eBPF path.
#[derive(Debug, Clone)]
pub struct RedirectSettings {
    /// Loopback port redirected connections are sent to (on 127.0.0.1 and
    /// [::1]). Fixed, because pinned programs keep pointing at it across
    /// agent restarts.
    pub port: u16,
    /// Where programs, links and maps are pinned (on bpffs).
    pub pin_dir: PathBuf,
    /// Parent cgroup of `tollgate exec` sessions, relative to the cgroup v2
    /// mount.
    pub exec_cgroup: PathBuf,
    /// Treatment of unlisted destinations for `tollgate exec` sessions.
    pub exec_unlisted: UnlistedPolicy,
    /// DNS resolvers reachable on port 53 in deny-unlisted mode.
    pub resolvers: Vec<std::net::IpAddr>,
    /// Unix socket (mode 0666) on which `tollgate exec` asks to be governed.
    pub exec_socket: PathBuf,
    /// Whether governed processes' commands, exits and connects are traced
    /// into job recordings (the job timeline).
    pub job_timeline: bool,
}

impl Default for RedirectSettings {
    fn default() -> Self {
        RedirectSettings {
            port: 15000,
            pin_dir: PathBuf::from("/sys/fs/bpf/tollgate"),
            exec_cgroup: PathBuf::from("tollgate.exec"),
            exec_unlisted: UnlistedPolicy::Pass,
            resolvers: Vec::new(),
            exec_socket: PathBuf::from("/run/tollgate/exec.sock"),
            job_timeline: true,
        }
    }
}

/// Where this host's agent answers and keeps its redirect: what
/// `tollgate detach` and `tollgate exec` need. Read from a configuration
/// file without validating the rest of it, and without opening any file
/// it names, so that detach works for an operator whose configuration no
/// longer validates (a key file gone, a section misspelled) and exec works
/// for a job that may not read the agent's secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    /// `agent.control_socket`.
    pub control_socket: PathBuf,
    /// `redirect.pin_dir`.
    pub pin_dir: PathBuf,
    /// `redirect.exec_socket`.
    pub exec_socket: PathBuf,
}

/// Settings under `[agent]`.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Unix socket that `tollgate status` queries.
    pub control_socket: PathBuf,
    /// Address of the Prometheus endpoint, if enabled.
    pub metrics_listen: Option<SocketAddr>,
    /// Directory session recordings are written to.
    pub recording_dir: PathBuf,
    /// Policy files or directories.
    pub policy_paths: Vec<PathBuf>,
    /// Connections served at once; further clients wait in the kernel backlog.
    pub max_connections: usize,
    /// Threads that run sessions; `None`: half the CPUs, at least one
    /// (see [`AgentSettings::session_threads`]).
    pub worker_threads: Option<usize>,
    /// How long SIGTERM waits for sessions to finish before closing them.
    pub shutdown_grace: Duration,
    /// A session with no bytes in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// How long to wait for an upstream TCP connection.
    pub connect_timeout: Duration,
    /// When recordings are forced to disk.
    pub recording_fsync: RecordingFsync,
    /// What happens when recording fails.
    pub recording_on_failure: RecordingFailure,
    /// PKCS#8 ed25519 private key that signs every recording's trailer.
    pub recording_signing_key: Option<PathBuf>,
    /// Closed recordings last written longer ago than this are removed.
    pub recording_retention: Option<Duration>,
    /// The least recently written closed recordings are removed while all
    /// recordings together take more bytes than this.
    pub recording_max_total_size: Option<u64>,
    /// Whether clients asking for TLS get it (terminated by the agent).
    pub client_tls: ClientTls,
    /// Where the local CA and the agent's server certificate are kept.
    pub tls_dir: PathBuf,
    /// The reviewer API's Unix socket.
    pub approvals_socket: PathBuf,
    /// Its file mode: who may connect (every peer is then authenticated by
    /// its credentials).
    pub approvals_socket_mode: u32,
    /// Its group owner, when connecting is limited to a group.
    pub approvals_socket_group: Option<String>,
    /// The embedded database of grants (root-only).
    pub approvals_store: PathBuf,
    /// Where the reviewer API also listens on TCP, with TLS, for reviewers
    /// not on this host (off unless set).
    pub approvals_listen: Option<std::net::SocketAddr>,
    /// The PEM certificate chain of that listener.
    pub approvals_tls_cert: Option<PathBuf>,
    /// The PEM private key of that listener.
    pub approvals_tls_key: Option<PathBuf>,
    /// The root-only file of reviewer tokens' hashes.
    pub approvals_tokens: PathBuf,
}

/// `[agent] client_tls`: what a client's SSLRequest is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientTls {
    /// `N`: the client goes on in plaintext (on loopback).
    #[default]
    Off,
    /// `S`: the agent terminates TLS with a certificate from its local CA.
    Terminate,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            metrics_listen: None,
            recording_dir: PathBuf::from("/var/lib/tollgate/recordings"),
            policy_paths: Vec::new(),
            max_connections: 1024,
            worker_threads: None,
            shutdown_grace: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(5),
            recording_fsync: RecordingFsync::Interval(Duration::from_secs(1)),
            recording_on_failure: RecordingFailure::Refuse,
            recording_signing_key: None,
            recording_retention: None,
            recording_max_total_size: None,
            client_tls: ClientTls::Off,
            tls_dir: PathBuf::from("/var/lib/tollgate/tls"),
            approvals_socket: PathBuf::from(DEFAULT_APPROVALS_SOCKET),
            approvals_socket_mode: 0o666,
            approvals_socket_group: None,
            approvals_store: PathBuf::from("/var/lib/tollgate/approvals.redb"),
            approvals_listen: None,
            approvals_tls_cert: None,
            approvals_tls_key: None,
            approvals_tokens: PathBuf::from(crate::approval::tokens::DEFAULT_TOKENS_PATH),
        }
    }
}

impl AgentSettings {
    /// How many threads run sessions: `worker_threads`, or half the CPUs
    /// this process may use, at least one. The agent shares its host with
    /// the clients and often the database it governs; measured on two
    /// cores, one thread relaying every session cost less CPU per statement
    /// than two (no wake-ups across threads) and gave more throughput.
    pub fn session_threads(&self) -> usize {
        self.worker_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
        })
    }
}

/// `agent.recording_fsync`: when recordings are forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordingFsync {
    /// After every event.
    EveryEvent,
    /// At most this long after an event.
    Interval(Duration),
    /// When the session closes.
    OnClose,
}

/// `agent.recording_on_failure`: a full disk or an overflowing queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordingFailure {
    /// Refuse new sessions until the agent is restarted (fail closed).
    Refuse,
    /// Keep serving; lost events are counted and marked in the files.
    Continue,
}

/// An explicit listener (`[[listener]]`).
#[derive(Debug, Clone)]
pub struct Listener {
    /// Local address to accept on.
    pub listen: SocketAddr,
    /// Name of the target connections are governed as.
    pub target: String,
    /// Where accepted connections are forwarded.
    pub upstream: Upstream,
}

/// A host (name or IP literal) and port to connect to; resolved per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Host name or IP address literal.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// What the redirect does with a governed connection no target names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnlistedPolicy {
    /// Let it through untouched.
    Pass,
    /// Refuse it (EPERM), except loopback and DNS to the configured resolvers.
    Deny,
}

/// A governed cgroup (`[[cgroup]]`).
#[derive(Debug, Clone)]
pub struct GovernedCgroup {
    /// Path of the cgroup, relative to the cgroup v2 mount or absolute.
    pub path: PathBuf,
    /// Treatment of destinations no target names.
    pub unlisted: UnlistedPolicy,
}

/// One problem found in a configuration file.
pub type ConfigError = crate::located::LocatedError;

/// Every problem found in a configuration file, in file order.
pub type ConfigErrors = crate::located::LocatedErrors;

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Config::from_toml(path, &read_text(path)?)
    }

    /// Reads only [`HostPaths`] from a configuration file, leniently: see
    /// there.
    pub fn load_host_paths(path: &Path) -> Result<HostPaths, ConfigErrors> {
        raw::check_host_paths(path, &read_text(path)?)
    }

    /// Validates configuration text; `path` is used in error messages only.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        raw::check(path, text)
    }

    /// The listener configured for a local address.
    pub fn listener(&self, listen: SocketAddr) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.listen == listen)
    }
}

/// A configuration file's text, or why it cannot be read.
fn read_text(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        crate::located::LocatedErrors(vec![ConfigError::file(
            path,
            format!("cannot read configuration: {e}"),
        )])
    })
}

/// Parses a size in bytes: a whole number, optionally followed (spaces
/// allowed) by a unit: `B`; `KB`, `MB`, `GB`, `TB` (powers of 1000); `KiB`,
/// `MiB`, `GiB`, `TiB` or `K`, `M`, `G`, `T` (powers of 1024). Units are
/// case-insensitive. Examples: `"10GiB"`, `"500 MB"`, `"4096"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let bad = || {
        format!("\"{text}\" is not a size; write it like \"10GiB\", \"500MB\" or a number of bytes")
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(multiplier)
        .ok_or_else(|| format!("\"{text}\" is too large"))
}

/// Converts a byte offset into 1-based (line, column).
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests;
