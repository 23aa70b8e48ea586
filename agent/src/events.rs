//! Session events: the one stream every consumer (logs, metrics, status,
//! recordings) learns about sessions from.
//!
//! Protocol handlers and the proxy core emit [`SessionEvent`]s through an
//! [`EventSink`]. `emit` must not block: sinks that do I/O queue the event and
//! return. The recorder becomes one more sink; the event types are designed so
//! that it can serialise them as they are.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use uuid::Uuid;

use crate::config::Protocol;
use crate::identity::ProcessIdentity;
use crate::policy::Action;
use crate::sql::StatementKind;

/// How the connection reached the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrival {
    /// Through an explicit listener.
    Listener,
    /// Redirected by the eBPF connect hook.
    Redirect,
    /// Not a connection: the job recording of a governed cgroup (see
    /// `jobs`).
    Job,
}

impl Arrival {
    /// The name used in logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Arrival::Listener => "listener",
            Arrival::Redirect => "redirect",
            Arrival::Job => "job",
        }
    }
}

/// What is known about a session when it starts.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    /// Unique, time-ordered session id (UUIDv7).
    pub id: Uuid,
    /// Wall-clock start.
    #[serde(with = "unix_millis")]
    pub started_at: SystemTime,
    /// How the connection arrived.
    pub arrival: Arrival,
    /// The address the proxy accepted on.
    pub local: SocketAddr,
    /// The client's address as the proxy sees it.
    pub client: SocketAddr,
    /// The target name.
    pub target: String,
    /// The target's protocol.
    pub protocol: Protocol,
    /// The upstream the session is forwarded to (host:port as configured or
    /// the original destination).
    pub upstream: String,
    /// The connecting process.
    pub identity: ProcessIdentity,
    /// What the kernel recorded at connect time, for redirected connections.
    pub kernel: Option<crate::redirect::KernelOrigin>,
    /// The job of the session's governed cgroup (a job recording's own).
    pub job: Option<crate::recording::format::JobRecord>,
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum CloseReason {
    /// Both sides finished normally (each closed its direction).
    Completed,
    /// The client reset or broke the connection.
    ClientError(String),
    /// The upstream reset or broke the connection.
    UpstreamError(String),
    /// The upstream could not be reached.
    UpstreamUnreachable(String),
    /// No bytes flowed for the configured idle timeout.
    IdleTimeout,
    /// The agent shut down and the session outlived the grace period.
    Shutdown,
    /// Session recording failed and the agent fails closed
    /// (`agent.recording_on_failure = "refuse"`): the session was ended
    /// rather than run unrecorded. The text is the recorder's failure.
    RecordingFailed(String),
}

impl CloseReason {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::Completed => "completed",
            CloseReason::ClientError(_) => "client_error",
            CloseReason::UpstreamError(_) => "upstream_error",
            CloseReason::UpstreamUnreachable(_) => "upstream_unreachable",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::RecordingFailed(_) => "recording_failed",
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Completed => f.write_str("completed"),
            CloseReason::ClientError(e) => write!(f, "client error: {e}"),
            CloseReason::UpstreamError(e) => write!(f, "upstream error: {e}"),
            CloseReason::UpstreamUnreachable(e) => write!(f, "upstream unreachable: {e}"),
            CloseReason::IdleTimeout => f.write_str("idle timeout"),
            CloseReason::Shutdown => f.write_str("closed at shutdown deadline"),
            CloseReason::RecordingFailed(e) => write!(f, "session recording failed: {e}"),
        }
    }
}

/// A decided statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementEvent {
    /// Session id.
    pub session: Uuid,
    /// The statement's own text (the whole text when it does not parse).
    pub text: String,
    /// Its command label (`DROP TABLE`), `statement` when unparsable.
    pub command: Arc<str>,
    /// Its kind, `None` when unparsable.
    pub kind: Option<StatementKind>,
    /// Its pg_query fingerprint, `None` when unparsable.
    pub fingerprint: Option<Arc<str>>,
    /// The decision.
    pub action: Action,
    /// The statement did not run: its action refuses it, or it is a `mask`
    /// statement whose result cannot be masked (the message was refused).
    pub refused: bool,
    /// The rule that decided (the most restrictive that matched), `None`
    /// when the default decided.
    pub rule: Option<Arc<str>>,
    /// Names of the rules that applied, in load order.
    pub rules: Vec<Arc<str>>,
    /// Why, in one line.
    pub reason: Arc<str>,
}

impl StatementEvent {
    /// The event for one statement and its decision.
    pub fn decided(
        session: Uuid,
        text: &str,
        command: Arc<str>,
        kind: Option<StatementKind>,
        fingerprint: Option<Arc<str>>,
        decision: &crate::policy::Decision,
        refused: bool,
    ) -> StatementEvent {
        StatementEvent {
            session,
            text: text.to_owned(),
            command,
            kind,
            fingerprint,
            action: decision.action,
            refused,
            rule: decision.deciding_rule().map(|r| Arc::clone(&r.name)),
            rules: decision
                .matched
                .iter()
                .map(|r| Arc::clone(&r.name))
                .collect(),
            reason: Arc::clone(&decision.reason),
        }
    }
}

/// One thing that happened in a session.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SessionEvent {
    /// A connection was accepted and its identity resolved.
    Started(Arc<SessionInfo>),
    /// The upstream connection is established.
    UpstreamConnected {
        /// Session id.
        session: Uuid,
        /// The resolved upstream address.
        peer: SocketAddr,
        /// Time taken to connect.
        #[serde(with = "micros")]
        connect_time: Duration,
    },
    /// A PostgreSQL client's StartupMessage was forwarded upstream.
    Startup {
        /// Session id.
        session: Uuid,
        /// The database user asked for.
        user: Option<String>,
        /// The database asked for (PostgreSQL defaults it to the user).
        database: Option<String>,
        /// The client's `application_name`, when it sent one.
        application_name: Option<String>,
        /// The role the agent logged in as with a brokered credential
        /// (`None`: the client's own login).
        brokered_user: Option<String>,
    },
    /// One statement was decided (shared: the log and the recorder read
    /// the session's one copy).
    Statement(Arc<StatementEvent>),
    /// Bytes read from one side, as read (full-fidelity recording, targets
    /// with `record_raw = true`); at most [`MAX_RAW_CHUNK`] bytes each.
    Raw {
        /// Session id.
        session: Uuid,
        /// Which side sent them.
        dir: RawDirection,
        /// The bytes (shared: the recorder's copy of the event is cheap).
        #[serde(serialize_with = "as_bytes")]
        data: Arc<[u8]>,
    },
    /// The SHA-256 of the session's executable, computed in the background
    /// after the session started (large executables; see
    /// `identity::exe_hash`).
    ExeHashed {
        /// Session id.
        session: Uuid,
        /// Lowercase hex digest, when it could be computed.
        exe_sha256: Option<String>,
        /// Why not, otherwise.
        error: Option<String>,
    },
    /// A rule's `on_match` acted on the process behind the session (or
    /// its job), or could not.
    Intervention {
        /// Session id.
        session: Uuid,
        /// What was done.
        intervention: Box<crate::intervene::Intervention>,
    },
    /// Human review of a statement of the session: held, ended, or let
    /// through by a grant.
    Review {
        /// Session id.
        session: Uuid,
        /// What happened (boxed: the largest event otherwise).
        review: Box<ReviewUpdate>,
    },
    /// A file operation of an SSH session's sftp channel.
    Sftp {
        /// Session id.
        session: Uuid,
        /// What was done.
        record: crate::recording::format::SftpRecord,
    },
    /// A command, shell or subsystem of an SSH channel ended.
    ChannelExit {
        /// Session id.
        session: Uuid,
        /// The channel's number (the agent's, towards the client).
        channel: u32,
        /// The exit status the host reported.
        exit_status: Option<u32>,
        /// The signal that ended it, when one did.
        exit_signal: Option<String>,
    },
    /// The session ended.
    Closed {
        /// Session id.
        session: Uuid,
        /// Bytes from the client to the upstream.
        bytes_from_client: u64,
        /// Bytes from the upstream to the client.
        bytes_from_upstream: u64,
        /// How long the session lasted.
        #[serde(with = "micros")]
        duration: Duration,
        /// Why it ended.
        reason: CloseReason,
    },
    /// What a job's processes did, for its job recording only (`session`
    /// is the job recording's id).
    Job {
        /// The job recording's id.
        session: Uuid,
        /// The record's payload (shared: the recorder's copy of the event
        /// is cheap).
        record: Arc<crate::recording::Event>,
    },
}

/// A step of a statement's human review, as recorded.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewUpdate {
    /// The statement is held.
    Requested(crate::recording::format::ReviewRequestRecord),
    /// Its review ended.
    Ended(crate::recording::format::ReviewEndRecord),
    /// A grant let it run without a new review.
    GrantUsed(crate::recording::format::GrantUseRecord),
    /// An approval of its request gave a grant.
    GrantGiven(crate::recording::format::GrantGivenRecord),
    /// A grant it asked for or ran under was revoked.
    GrantRevoked(crate::recording::format::GrantRevokeRecord),
    /// A notification of its request was delivered or failed.
    Notified(crate::recording::format::ReviewNotifyRecord),
}

/// Largest `data` of one [`SessionEvent::Raw`]: longer reads are split,
/// so a recording's records stay small whatever the reads.
pub const MAX_RAW_CHUNK: usize = 64 * 1024;

/// Which side of a session sent raw bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RawDirection {
    /// The client (towards the upstream).
    Client,
    /// The upstream server (towards the client).
    Server,
}

impl RawDirection {
    /// `client` or `server`, as recorded.
    pub fn as_str(self) -> &'static str {
        match self {
            RawDirection::Client => "client",
            RawDirection::Server => "server",
        }
    }
}

fn as_bytes<S: serde::Serializer>(data: &Arc<[u8]>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(data)
}

/// A consumer of session events. `emit` must return promptly.
pub trait EventSink: Send + Sync {
    /// Receives one event.
    fn emit(&self, event: &SessionEvent);
}

/// Sends every event to several sinks in order.
#[derive(Default, Clone)]
pub struct FanOut {
    sinks: Vec<Arc<dyn EventSink>>,
}

impl FanOut {
    /// Adds a sink.
    pub fn with(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sinks.push(sink);
        self
    }
}

impl EventSink for FanOut {
    fn emit(&self, event: &SessionEvent) {
        for s in &self.sinks {
            s.emit(event);
        }
    }
}

/// Where sessions report events, together with what a session needs to ask
/// the recorder: whether recording has failed in fail-closed mode (checked
/// before each statement, a relaxed atomic load) and whether its target
/// records raw bytes.
#[derive(Clone)]
pub struct Events {
    sink: Arc<dyn EventSink>,
    recorder: Option<Arc<crate::recording::RecordingSink>>,
    raw_targets: Arc<std::collections::HashSet<String>>,
}

impl Events {
    /// Events to `sink`, with no recorder to consult.
    pub fn new(sink: Arc<dyn EventSink>) -> Events {
        Events {
            sink,
            recorder: None,
            raw_targets: Arc::default(),
        }
    }

    /// Consults `recorder` (which `sink` must include) for failures, and
    /// records raw bytes for the sessions of `raw_targets`.
    pub fn with_recorder(
        mut self,
        recorder: Arc<crate::recording::RecordingSink>,
        raw_targets: impl IntoIterator<Item = String>,
    ) -> Events {
        self.recorder = Some(recorder);
        self.raw_targets = Arc::new(raw_targets.into_iter().collect());
        self
    }

    /// Sends `event` to every sink.
    pub fn emit(&self, event: &SessionEvent) {
        self.sink.emit(event);
    }

    /// Why open sessions must end now: recording has failed and the agent
    /// fails closed. `None` (a relaxed atomic load, no lock) otherwise.
    pub fn recording_failure(&self) -> Option<String> {
        let recorder = self.recorder.as_ref()?;
        if !recorder.sessions_must_end() {
            return None;
        }
        Some(
            recorder
                .failure()
                .unwrap_or_else(|| "the recorder failed".to_string()),
        )
    }

    /// Whether `session`'s recording is still open, so an event emitted
    /// for it from outside the session (a review notification's result)
    /// is recorded rather than counted lost. True without a recorder.
    pub fn records_session(&self, session: &Uuid) -> bool {
        self.recorder.as_ref().is_none_or(|r| r.is_writing(session))
    }

    /// Whether sessions of `target` record every byte read (asked once per
    /// session, not per read).
    pub fn records_raw(&self, target: &str) -> bool {
        self.recorder.is_some() && self.raw_targets.contains(target)
    }

    /// Emits `data`, read from `dir`, as [`SessionEvent::Raw`] events of at
    /// most [`MAX_RAW_CHUNK`] bytes each.
    pub fn emit_raw(&self, session: Uuid, dir: RawDirection, data: &[u8]) {
        for chunk in data.chunks(MAX_RAW_CHUNK) {
            self.emit(&SessionEvent::Raw {
                session,
                dir,
                data: Arc::from(chunk),
            });
        }
    }
}

impl EventSink for Events {
    fn emit(&self, event: &SessionEvent) {
        self.sink.emit(event);
    }
}

/// Writes session events to the log.
pub struct LogSink;

impl EventSink for LogSink {
    fn emit(&self, event: &SessionEvent) {
        match event {
            SessionEvent::Started(info) => {
                let id = &info.identity;
                tracing::info!(
                    session = %info.id,
                    target = %info.target,
                    arrival = info.arrival.as_str(),
                    client = %info.client,
                    upstream = %info.upstream,
                    pid = id.pid,
                    uid = id.uid,
                    user = id.user.as_deref(),
                    exe = id.exe.as_deref(),
                    exe_sha256 = id.exe_sha256.as_deref(),
                    cmdline = %id.cmdline.join(" "),
                    cgroup = id.cgroup.as_deref(),
                    ci_provider = id.ci.as_ref().map(|c| format!("{:?}", c.provider)),
                    ci_repository = id.ci.as_ref().and_then(|c| c.repository.as_deref()),
                    ci_job = id.ci.as_ref().and_then(|c| c.job.as_deref()),
                    identity_gaps = %id.gaps.join("; "),
                    identity_instance = id.instance.as_ref().map(|c| format!("{:?}", c.verdict).to_lowercase()),
                    original_destination = info.kernel.as_ref().map(|k| k.destination.to_string()),
                    kernel_cgroup_id = info.kernel.as_ref().map(|k| k.cgroup_id),
                    "session started: {}",
                    id.summary()
                );
            }
            SessionEvent::UpstreamConnected {
                session,
                peer,
                connect_time,
            } => {
                tracing::debug!(%session, %peer, connect_us = connect_time.as_micros() as u64, "upstream connected");
            }
            SessionEvent::Startup {
                session,
                user,
                database,
                application_name,
                brokered_user,
            } => {
                tracing::info!(
                    %session,
                    db_user = user.as_deref(),
                    database = database.as_deref(),
                    application_name = application_name.as_deref(),
                    brokered_user = brokered_user.as_deref(),
                    "start-up: user {} database {}{}",
                    user.as_deref().unwrap_or("?"),
                    database.as_deref().or(user.as_deref()).unwrap_or("?"),
                    brokered_user
                        .as_deref()
                        .map(|b| format!(", logged in by the agent as {b}"))
                        .unwrap_or_default()
                );
            }
            SessionEvent::Statement(statement) => {
                let StatementEvent {
                    session,
                    text,
                    command,
                    kind,
                    fingerprint,
                    action,
                    refused,
                    rule,
                    rules: _,
                    reason,
                } = &**statement;
                let rule = rule.as_deref();
                let kind = kind.map(StatementKind::as_str);
                if *refused {
                    tracing::warn!(%session, statement_action = action.as_str(), rule, command = %command,
                        kind,
                        fingerprint = fingerprint.as_deref(), reason = %reason, text = %text,
                        "statement refused ({action}): {command}");
                } else {
                    tracing::info!(%session, statement_action = action.as_str(), rule, command = %command,
                        kind,
                        fingerprint = fingerprint.as_deref(), reason = %reason, text = %text,
                        "statement {action}: {command}");
                }
            }
            // Counted in `closed`; one log line per read would drown the log.
            SessionEvent::Raw { .. } => {}
            // Job recordings are written by the recorder alone.
            SessionEvent::Job { .. } => {}
            SessionEvent::Sftp { session, record } => {
                tracing::info!(%session, op = %record.op, path = %record.path, to = record.to.as_deref(),
                    bytes_read = record.bytes_read, bytes_written = record.bytes_written, "sftp");
            }
            SessionEvent::ChannelExit {
                session,
                channel,
                exit_status,
                exit_signal,
            } => {
                tracing::info!(%session, channel, exit_status, exit_signal = exit_signal.as_deref(),
                    "ssh channel ended");
            }
            SessionEvent::ExeHashed {
                session,
                exe_sha256,
                error,
            } => {
                tracing::info!(%session, exe_sha256 = exe_sha256.as_deref(), error = error.as_deref(),
                    "executable hashed");
            }
            SessionEvent::Intervention {
                session,
                intervention,
            } => {
                tracing::warn!(%session, rule = %intervention.rule, action = %intervention.action,
                    scope = %intervention.scope, pid = intervention.pid, cgroup = intervention.cgroup.as_deref(),
                    error = intervention.error.as_deref(), event = "intervention",
                    "{}", intervention.describe());
            }
            SessionEvent::Review { session, review } => match &**review {
                ReviewUpdate::Requested(r) => {
                    tracing::warn!(%session, request = %r.request, rule = %r.rule,
                        approvals_needed = r.approvals_needed, timeout_s = r.timeout_s, text = %r.text,
                        "statement held for review (request {})", r.request);
                }
                ReviewUpdate::Ended(r) => {
                    let by: Vec<&str> = r.approvals.iter().map(|a| a.by.as_str()).collect();
                    tracing::warn!(%session, request = %r.request, outcome = %r.outcome,
                        waited_ms = r.waited_ms, approved_by = ?by, denied_by = r.denied_by.as_deref(),
                        reason = r.reason.as_deref(), edited_by = r.edited_by.as_deref(),
                        "review of request {} ended: {}", r.request, r.outcome);
                }
                ReviewUpdate::GrantUsed(r) => {
                    tracing::info!(%session, grant = %r.grant, request = %r.request,
                        approved_by = ?r.approved_by, expires_at = r.expires_at,
                        "statement runs under grant {}", r.grant);
                }
                // The reviewer API logs grants it stores and revokes, and
                // the notifier deliveries and failures, themselves.
                ReviewUpdate::GrantGiven(_)
                | ReviewUpdate::GrantRevoked(_)
                | ReviewUpdate::Notified(_) => {}
            },
            SessionEvent::Closed {
                session,
                bytes_from_client,
                bytes_from_upstream,
                duration,
                reason,
            } => {
                let level_warn = matches!(
                    reason,
                    CloseReason::UpstreamUnreachable(_)
                        | CloseReason::Shutdown
                        | CloseReason::RecordingFailed(_)
                );
                if level_warn {
                    tracing::warn!(%session, bytes_from_client, bytes_from_upstream,
                        duration_ms = duration.as_millis() as u64, reason = %reason, "session closed: {reason}");
                } else {
                    tracing::info!(%session, bytes_from_client, bytes_from_upstream,
                        duration_ms = duration.as_millis() as u64, reason = %reason, "session closed: {reason}");
                }
            }
        }
    }
}

mod unix_millis {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub(super) fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        s.serialize_u64(ms)
    }
}

mod micros {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }
}
