//! The control socket: a Unix socket (mode 0600) on which the running agent
//! answers `tollgate status`. One request line in, one JSON document out.

use std::io::ErrorKind;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::proxy::live::LiveSessionView;
use crate::proxy::AgentState;

/// What `status` returns.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusReport {
    /// Agent version.
    pub version: String,
    /// Agent process id.
    pub pid: u32,
    /// Configuration file in use.
    pub config: String,
    /// Bound listeners.
    pub listeners: Vec<ListenerView>,
    /// Configured targets.
    pub targets: Vec<TargetView>,
    /// Open sessions, oldest first.
    pub sessions: Vec<LiveSessionView>,
    /// The transparent redirect, when active.
    #[serde(default)]
    pub redirect: Option<RedirectView>,
    /// The recorder (absent from older agents' replies).
    #[serde(default)]
    pub recording: Option<RecordingView>,
    /// Processes and job cgroups a rule's `on_match` stopped or froze that
    /// are still stopped (`tollgate thaw` lets them run).
    #[serde(default)]
    pub held: Vec<crate::intervene::Held>,
    /// The policy in force (absent from older agents' replies).
    #[serde(default)]
    pub policy: Option<PolicyView>,
    /// The approvals store shared by the fleet, with `[shared_approvals]`.
    #[serde(default)]
    pub shared_approvals: Option<SharedApprovalsView>,
}

/// `[shared_approvals]` in the status report.
#[derive(Debug, Serialize, Deserialize)]
pub struct SharedApprovalsView {
    /// The name this agent's requests carry.
    pub host: String,
    /// Whether the database is reachable now.
    pub connected: bool,
    /// When it last answered (Unix seconds).
    pub last_success_unix: Option<u64>,
    /// Why the last attempt failed, while not connected.
    pub last_error: Option<String>,
    /// Decisions of the review server applied here since start.
    pub decisions_applied: u64,
}

/// The policy in force in the status report.
#[derive(Debug, Serialize, Deserialize)]
pub struct PolicyView {
    /// Its digest, as recordings carry it.
    pub digest: String,
    /// Its rules.
    pub rules: usize,
    /// Its files, in load order.
    pub files: Vec<String>,
    /// Where it is fetched from, with `[policy_source]`.
    #[serde(default)]
    pub source: Option<PolicySourceView>,
}

/// `[policy_source]` in the status report.
#[derive(Debug, Serialize, Deserialize)]
pub struct PolicySourceView {
    /// The bucket prefix or repository.
    pub origin: String,
    /// The revision last fetched (a git commit, or the objects' ETags).
    pub revision: Option<String>,
    /// When a poll last reached the source (Unix seconds; 0: never).
    pub last_success_unix: u64,
    /// Why the last poll failed or was refused, if it was.
    pub last_error: Option<String>,
}

/// The recorder in the status report.
#[derive(Debug, Serialize, Deserialize)]
pub struct RecordingView {
    /// The recording directory.
    pub dir: String,
    /// Whether recording has failed (latched until restart).
    pub failed: bool,
    /// The first failure, in words.
    pub failure: Option<String>,
    /// `refuse` or `continue`: what a failure does.
    pub on_failure: String,
    /// Events not recorded since start.
    pub events_lost: u64,
    /// Events waiting for the writer.
    pub queued: u64,
    /// Connections refused because recording failed.
    pub sessions_refused: u64,
    /// The signing key's id, when trailers are signed.
    pub signing_key_id: Option<String>,
    /// Recordings removed by retention since start.
    pub pruned: u64,
    /// Bytes they took.
    pub pruned_bytes: u64,
    /// Connections refused because the upload spool was full.
    #[serde(default)]
    pub sessions_refused_spool_full: u64,
    /// Uploads to object storage, when `[upload]` is configured.
    #[serde(default)]
    pub upload: Option<UploadView>,
}

/// Uploads to object storage in the status report.
#[derive(Debug, Serialize, Deserialize)]
pub struct UploadView {
    /// The bucket.
    pub bucket: String,
    /// Recordings on this host (waiting for upload, or open).
    pub spool_recordings: u64,
    /// Their bytes.
    pub spool_bytes: u64,
    /// The spool's bound.
    pub max_spool_size: u64,
    /// Why new sessions are refused, while the spool is full.
    pub spool_full: Option<String>,
    /// Age of the oldest closed recording not yet uploaded (0: none).
    pub oldest_unshipped_seconds: u64,
    /// Uploads since start, by outcome.
    pub uploaded: u64,
    pub already_present: u64,
    pub failed: u64,
    pub conflicts: u64,
    /// The last failure or conflict, in words.
    pub last_error: Option<String>,
}

/// The redirect in the status report.
#[derive(Debug, Serialize, Deserialize)]
pub struct RedirectView {
    /// Addresses redirected connections arrive on.
    pub listening: Vec<String>,
    /// The governed cgroups the agent attached, each with what the kernel
    /// reports attached to it when the status was asked (`kernel.state`).
    pub cgroups: Vec<serde_json::Value>,
    /// The cgroup `tollgate exec` sessions are created under.
    pub exec_cgroup: String,
    /// Pinned objects on bpffs.
    pub pinned: Vec<String>,
    /// Origin records not yet taken by the proxy (map occupancy).
    pub pending_origins: usize,
    /// Kernel counters.
    pub kernel: crate::redirect::KernelStats,
    /// The cgroup root's protect programs, when `[protect]` is set.
    #[serde(default)]
    pub protect: Option<crate::redirect::protect::ProtectView>,
    /// The job timeline (`None`: off).
    #[serde(default)]
    pub jobs: Option<crate::jobs::JobsView>,
}

/// A listener in the status report.
#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerView {
    /// Bound address.
    pub listen: String,
    /// Target name.
    pub target: String,
    /// Upstream host:port.
    pub upstream: String,
}

/// A target in the status report.
#[derive(Debug, Serialize, Deserialize)]
pub struct TargetView {
    /// Name.
    pub name: String,
    /// Address, network or host name.
    pub address: String,
    /// Ports and ranges.
    pub ports: Vec<String>,
    /// Protocol.
    pub protocol: String,
    /// How sessions log in: `client` (their own credentials), or the
    /// brokered credentials' users (never their secrets).
    #[serde(default)]
    pub login: String,
}

/// `client`, or `brokered: USER, USER` (with `, else client` when
/// processes no credential is for use their own).
fn login_summary(target: &crate::config::Target) -> String {
    if target.credentials.is_empty() {
        return "client".to_owned();
    }
    let users: Vec<&str> = target.credentials.iter().map(|c| c.user.as_str()).collect();
    let rest = match target.client_credentials {
        crate::config::ClientCredentials::Pass => ", else client",
        crate::config::ClientCredentials::Refuse => "",
    };
    format!("brokered: {}{rest}", users.join(", "))
}

/// Binds the control socket (mode 0600), replacing a stale one.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    crate::accept::bind_unix_socket(path, "control socket", 0o600, "agent.control_socket")
}

/// Removes the control socket file at exit.
pub fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != ErrorKind::NotFound {
            tracing::warn!(error = %e, path = %path.display(), "cannot remove the control socket");
        }
    }
}

/// Requests answered at once; more wait in the socket's backlog.
pub const MAX_CONTROL_CONNECTIONS: usize = 32;

/// Answers requests until `stop` is cancelled.
pub async fn serve(
    listener: UnixListener,
    shared: Arc<AgentState>,
    endpoint: crate::accept::Endpoint,
    stop: CancellationToken,
) {
    crate::accept::accept_each(listener, endpoint, stop, |stream, _| {
        let shared = shared.clone();
        Some(async move {
            match tokio::time::timeout(Duration::from_secs(5), answer(stream, &shared)).await {
                Ok(Err(e)) => tracing::debug!(error = %e, "control socket: request failed"),
                Err(_) => tracing::debug!("control socket: request timed out"),
                Ok(Ok(())) => {}
            }
        })
    })
    .await;
}

async fn answer(stream: UnixStream, shared: &AgentState) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // A request is one short line; cap it so a confused peer cannot make us buffer.
    BufReader::new(read.take(1024)).read_line(&mut line).await?;
    let reply = match line.trim() {
        "status" => {
            serde_json::to_string(&report(shared)).unwrap_or_else(|e| error_json(&e.to_string()))
        }
        other => error_json(&format!("unknown request \"{other}\"; expected \"status\"")),
    };
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await
}

fn error_json(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

fn report(shared: &AgentState) -> StatusReport {
    StatusReport {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        config: shared.config.source.display().to_string(),
        listeners: shared
            .bound
            .iter()
            .map(|(addr, l)| ListenerView {
                listen: addr.to_string(),
                target: l.target.clone(),
                upstream: l.upstream.to_string(),
            })
            .collect(),
        targets: shared
            .config
            .targets
            .iter()
            .map(|t| TargetView {
                name: t.name.clone(),
                address: t.address.to_string(),
                ports: t.ports.iter().map(|p| p.to_string()).collect(),
                protocol: t.protocol.to_string(),
                login: login_summary(t),
            })
            .collect(),
        sessions: shared.live.snapshot(),
        redirect: shared.redirect.as_ref().map(|r| RedirectView {
            listening: shared
                .redirect_bound
                .iter()
                .map(|a| a.to_string())
                .collect(),
            cgroups: r
                .attachments()
                .iter()
                .filter_map(|c| serde_json::to_value(c).ok())
                .collect(),
            exec_cgroup: r.exec_root.display().to_string(),
            pinned: r.pinned().iter().map(|p| p.display().to_string()).collect(),
            pending_origins: r.pending_origins(),
            kernel: r.stats(),
            protect: r.protect.as_ref().map(|p| p.view()),
            jobs: shared.jobs.as_ref().map(|j| j.view()),
        }),
        recording: Some(recording_view(shared)),
        held: crate::intervene::held(),
        shared_approvals: shared
            .config
            .shared_approvals
            .as_ref()
            .zip(shared.metrics.shared_approvals())
            .map(|(settings, link)| {
                let s = link.status();
                SharedApprovalsView {
                    host: settings.host.clone(),
                    connected: s.connected,
                    last_success_unix: s.last_success_unix,
                    last_error: s.last_error,
                    decisions_applied: s.decisions_applied,
                }
            }),
        policy: Some({
            let policy = crate::policy::current_policy(&shared.policy);
            PolicyView {
                digest: policy.digest(),
                rules: policy.rule_count(),
                files: policy.files().map(|f| f.display().to_string()).collect(),
                source: shared
                    .config
                    .policy_source
                    .as_ref()
                    .zip(shared.metrics.policy_source())
                    .map(|(settings, stats)| PolicySourceView {
                        origin: settings.origin.to_string(),
                        revision: stats
                            .revision
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .clone(),
                        last_success_unix: stats
                            .last_success_unix
                            .load(std::sync::atomic::Ordering::Relaxed),
                        last_error: stats
                            .last_error
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .clone(),
                    }),
            }
        }),
    }
}

fn recording_view(shared: &AgentState) -> RecordingView {
    use std::sync::atomic::Ordering::Relaxed;
    let r = &shared.recorder;
    let m = &shared.metrics;
    RecordingView {
        dir: shared.config.agent.recording_dir.display().to_string(),
        failed: r.failed(),
        failure: r.failure(),
        on_failure: match shared.config.agent.recording_on_failure {
            crate::config::RecordingFailure::Refuse => "refuse",
            crate::config::RecordingFailure::Continue => "continue",
        }
        .to_string(),
        events_lost: r.lost(),
        queued: r.queued(),
        sessions_refused: m.sessions_refused_recording.load(Relaxed),
        signing_key_id: r.signing_key_id().map(str::to_string),
        pruned: m.recordings_pruned.load(Relaxed),
        pruned_bytes: m.recordings_pruned_bytes.load(Relaxed),
        sessions_refused_spool_full: m.sessions_refused_spool_full.load(Relaxed),
        upload: shared
            .config
            .upload
            .as_ref()
            .zip(m.uploads())
            .map(|(settings, stats)| UploadView {
                bucket: settings.s3.bucket.clone(),
                spool_recordings: stats.spool_recordings.load(Relaxed),
                spool_bytes: stats.spool_bytes.load(Relaxed),
                max_spool_size: settings.max_spool_size,
                spool_full: r.spool_full(),
                oldest_unshipped_seconds: stats.oldest_unshipped_age(std::time::SystemTime::now()),
                uploaded: stats.uploaded.load(Relaxed),
                already_present: stats.already_present.load(Relaxed),
                failed: stats.failed.load(Relaxed),
                conflicts: stats.conflict.load(Relaxed),
                last_error: stats
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone(),
            }),
    }
}

/// Asks a running agent for its status.
pub async fn query_status(path: &Path) -> anyhow::Result<StatusReport> {
    let mut stream = UnixStream::connect(path).await.map_err(|e| match e.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "no agent is answering on {} ({e}); is `tollgate run` running with this configuration?",
            path.display()
        ),
        ErrorKind::PermissionDenied => anyhow::anyhow!(
            "cannot open the control socket {} ({e}); it is readable by the agent's user only: run as that user or root",
            path.display()
        ),
        _ => anyhow::anyhow!("cannot connect to the control socket {}: {e}", path.display()),
    })?;
    stream.write_all(b"status\n").await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut reply))
        .await
        .context("the agent did not answer within 10 s")??;
    if let Ok(serde_json::Value::Object(o)) = serde_json::from_str::<serde_json::Value>(&reply) {
        if let Some(e) = o.get("error").and_then(|e| e.as_str()) {
            anyhow::bail!("the agent refused the request: {e}");
        }
    }
    serde_json::from_str(&reply).context("the agent's status reply is not valid")
}
