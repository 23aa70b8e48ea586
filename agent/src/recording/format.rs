//! The record types of a recording file, as documented in
//! `docs/recording-format.md`. These types are the format: a field renamed
//! here changes the public contract.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::identity::ProcessIdentity;

/// The `format` field of every header.
pub const FORMAT_NAME: &str = "tollgate-recording";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The largest record body accepted, in bytes (16 MiB).
pub const MAX_RECORD_LEN: u32 = 16 << 20;
/// The largest statement text stored in a record, in bytes (1 MiB); longer
/// texts are cut on a character boundary and their length kept in `text_len`.
pub const MAX_TEXT_LEN: usize = 1 << 20;
/// The recording file extension, without the dot.
pub const FILE_EXTENSION: &str = "tgrec";

/// One record of a recording file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    /// Record 0: who, what, when (boxed: it is much the largest).
    Header(Box<Header>),
    /// One session event.
    Event(EventRecord),
    /// The last record: chain head and counts.
    Trailer(Trailer),
}

/// The first record of every file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The session id (UUIDv7).
    pub session: Uuid,
    /// The agent's host name.
    pub host: String,
    /// The agent's version.
    pub agent_version: String,
    /// Wall-clock start, RFC 3339 UTC with milliseconds.
    pub started_at: String,
    /// Wall-clock start in milliseconds since the Unix epoch.
    pub started_at_unix_ms: u64,
    /// Digest of the policy in force at the start, when known.
    pub policy_digest: Option<String>,
    /// `listener` or `redirect`.
    pub arrival: String,
    /// The address the proxy accepted on.
    pub local: SocketAddr,
    /// The client's address as the proxy saw it.
    pub client: SocketAddr,
    /// The target name.
    pub target: String,
    /// The target's protocol (`postgres`, `mysql`, `tcp`).
    pub protocol: String,
    /// The upstream the session was forwarded to.
    pub upstream: String,
    /// The connecting process.
    pub identity: ProcessIdentity,
    /// What the kernel recorded, for redirected connections.
    pub kernel: Option<KernelRecord>,
    /// A session's job (its governed cgroup's job recording), or, in a job
    /// recording (`arrival` "job"), the job itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobRecord>,
}

/// A job: the processes of one governed cgroup, recorded in a job
/// recording whose id is `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job recording's id.
    pub id: Uuid,
    /// The cgroup's path under the cgroup v2 mount (empty when it was gone
    /// before the agent looked).
    pub cgroup: String,
    /// The cgroup's id.
    pub cgroup_id: u64,
}

/// A process of a job replaced its image (`execve`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessExecRecord {
    /// Wall-clock time of the event in the kernel, microseconds since the
    /// Unix epoch.
    pub at_unix_us: u64,
    /// Process id.
    pub pid: u32,
    /// Its real parent's process id.
    pub ppid: u32,
    /// Real user id.
    pub uid: u32,
    /// The path given to `execve`.
    pub exe: String,
    /// The argument vector (at most 511 bytes of it).
    pub args: Vec<String>,
    /// Whether `args` was cut short.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub args_truncated: bool,
}

/// A process of a job created a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessForkRecord {
    /// As in [`ProcessExecRecord`].
    pub at_unix_us: u64,
    /// The new process.
    pub pid: u32,
    /// The process that forked.
    pub ppid: u32,
    /// Real user id.
    pub uid: u32,
    /// The forking thread's name.
    pub comm: String,
}

/// A process of a job ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessExitRecord {
    /// As in [`ProcessExecRecord`].
    pub at_unix_us: u64,
    /// Process id.
    pub pid: u32,
    /// Its thread name at the end.
    pub comm: String,
    /// The exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
}

/// A process of a job connected somewhere (or tried).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectRecord {
    /// As in [`ProcessExecRecord`].
    pub at_unix_us: u64,
    /// Process id.
    pub pid: u32,
    /// Its thread name.
    pub comm: String,
    /// Where it connected to.
    pub destination: SocketAddr,
    /// `redirect` (to the proxy, governed), `deny` (refused with EPERM) or
    /// `pass` (let through ungoverned).
    pub verdict: String,
    /// The target, for a redirect.
    pub target: Option<String>,
}

/// A governed session of the job opened; its statements are in its own
/// recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSessionRecord {
    /// As in [`ProcessExecRecord`] (when the agent accepted the session).
    pub at_unix_us: u64,
    /// The session (its recording's id).
    pub session: Uuid,
    /// Its target.
    pub target: String,
    /// The process that opened it.
    pub pid: Option<u32>,
}

/// What the kernel recorded about a redirected connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRecord {
    /// Where the process tried to connect.
    pub destination: SocketAddr,
    /// Its process id (thread group id).
    pub tgid: u32,
    /// Its real uid at connect time.
    pub uid: u32,
    /// Its real gid at connect time.
    pub gid: u32,
    /// Its cgroup v2 id.
    pub cgroup_id: u64,
    /// The connecting thread's name.
    pub comm: String,
    /// Index of the configured target the redirect matched.
    pub target_index: u64,
    /// The executable and process start captured at connect (absent in
    /// recordings of agents that did not capture them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<crate::identity::ConnectInstance>,
}

/// An event record: sequence, time, chain link and payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// 0-based, contiguous.
    pub seq: u64,
    /// Microseconds since the session start (monotonic).
    pub t_us: u64,
    /// Hex SHA-256 of the previous record's frame.
    pub prev: String,
    /// What happened.
    pub event: Event,
}

/// A file operation of an sftp channel (`Event::Sftp`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftpRecord {
    /// The channel's number.
    pub channel: u32,
    /// `file`, `list`, `remove`, `mkdir`, `rmdir`, `rename`, `setstat`,
    /// `symlink` or `unfollowed`.
    pub op: String,
    /// The path (for `unfollowed`, why).
    pub path: String,
    /// The new path (`rename`) or the link's target (`symlink`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Bytes read from a `file`.
    #[serde(default)]
    pub bytes_read: u64,
    /// Bytes written to a `file`.
    #[serde(default)]
    pub bytes_written: u64,
}

/// An event payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The upstream connection is established.
    UpstreamConnected {
        /// The resolved upstream address.
        peer: SocketAddr,
        /// Time taken to connect, in microseconds.
        connect_us: u64,
    },
    /// The client asked for a user and database (a PostgreSQL
    /// StartupMessage, a MySQL handshake answer) and it was forwarded.
    Startup {
        /// The database user asked for.
        user: Option<String>,
        /// The database asked for.
        database: Option<String>,
        /// The client's `application_name`.
        application_name: Option<String>,
        /// The role the agent logged in as with a brokered credential, in
        /// place of `user` (absent: the client's own login).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        brokered_user: Option<String>,
    },
    /// One statement was decided.
    Statement(StatementRecord),
    /// The statement and decision of the earlier `statement` record `of`
    /// (its `seq`) of the same file, again: an execution of a prepared
    /// statement under the decisions of the execution before. Readers give
    /// it as that statement ([`super::reader::read_from`]).
    StatementAgain {
        /// The `seq` of the statement record it repeats.
        of: u64,
    },
    /// The session ended.
    Closed {
        /// Bytes from the client to the upstream.
        bytes_from_client: u64,
        /// Bytes from the upstream to the client.
        bytes_from_upstream: u64,
        /// How long the session lasted, in microseconds.
        duration_us: u64,
        /// Why it ended.
        reason: CloseRecord,
    },
    /// At least `count` events of this session were lost before this point.
    EventsLost {
        /// How many.
        count: u64,
    },
    /// The recording ended without a `closed` event.
    RecordingStopped {
        /// Why (`agent shutdown`, ...).
        reason: String,
    },
    /// Bytes read from one side of the session, in order (targets with
    /// `record_raw = true`).
    Raw {
        /// `client` or `server`: who sent them.
        dir: String,
        /// The bytes as read, at most [`MAX_RAW_DATA`] (a MessagePack bin).
        #[serde(with = "bin")]
        data: Vec<u8>,
    },
    /// The executable's SHA-256, computed after the session started.
    ExeHashed {
        /// Lowercase hex digest, when it could be computed.
        exe_sha256: Option<String>,
        /// Why not, otherwise.
        error: Option<String>,
    },
    /// A statement was held for human review (see `docs/approvals.md`).
    ReviewRequested(ReviewRequestRecord),
    /// The review of a held statement ended: approved, denied, expired,
    /// cancelled (the client went away) or aborted (the agent stopped).
    ReviewEnded(ReviewEndRecord),
    /// A statement a `review` rule holds ran without a new review, under a
    /// grant an earlier approval gave.
    GrantUsed(GrantUseRecord),
    /// An approval of a request of this session gave a grant.
    GrantGiven(GrantGivenRecord),
    /// A reviewer revoked a grant this session asked for or ran under.
    GrantRevoked(GrantRevokeRecord),
    /// A notification of a review request was delivered, or failed after
    /// every attempt (`[[notify]]`).
    ReviewNotified(ReviewNotifyRecord),
    /// A rule's `on_match` stopped or killed the process, or froze or
    /// killed its job's cgroup (or could not: `error`).
    Intervention(crate::intervene::Intervention),
    /// SSH: what a channel ran ended, with the host's exit status or the
    /// signal that ended it.
    ChannelExit {
        /// The channel's number.
        channel: u32,
        /// The exit status.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_status: Option<u32>,
        /// The signal's name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_signal: Option<String>,
    },
    /// SSH: a file operation of an sftp channel.
    Sftp(SftpRecord),
    /// Job recordings: a process of the job ran a program.
    ProcessExec(ProcessExecRecord),
    /// Job recordings: a process of the job forked.
    ProcessFork(ProcessForkRecord),
    /// Job recordings: a process of the job ended.
    ProcessExit(ProcessExitRecord),
    /// Job recordings: a connect of a process of the job was decided.
    Connect(ConnectRecord),
    /// Job recordings: a governed session of the job opened.
    JobSession(JobSessionRecord),
    /// Job recordings: at least `count` process or connect events were
    /// dropped before this point, for any job of the agent (the kernel's
    /// ring buffer was full, or the recorder's queue was busy).
    KernelEventsDropped {
        /// How many.
        count: u64,
    },
    /// An event type this reader does not know (written by a later agent).
    #[serde(other)]
    Unknown,
}

/// A statement held for review.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewRequestRecord {
    /// The request's id (what reviewers approve or deny).
    pub request: String,
    /// The `review` rule that held it.
    pub rule: String,
    /// The rule's approver groups (`group:NAME`, `reviewers:NAME`).
    pub approvers: Vec<String>,
    /// Distinct approvals needed.
    pub approvals_needed: u32,
    /// How long it may wait, in seconds.
    pub timeout_s: u64,
    /// The held text (at most [`MAX_TEXT_LEN`] bytes).
    pub text: String,
}

/// One approval that counted towards a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewApprovalRecord {
    /// The reviewer's user name.
    pub by: String,
    /// The reviewer's uid.
    pub uid: u32,
    /// Why, in the reviewer's words.
    pub reason: Option<String>,
    /// The grant the reviewer asked for, in seconds.
    pub grant_s: Option<u64>,
    /// When, in Unix seconds.
    pub at: u64,
    /// How the reviewer authenticated: `unix:UID` (the reviewer socket) or
    /// `token:NAME` (a reviewer token over TLS). Absent in recordings made
    /// before it was kept.
    #[serde(default)]
    pub via: Option<String>,
}

/// How a review ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewEndRecord {
    /// The request's id.
    pub request: String,
    /// `approved`, `denied`, `expired`, `cancelled` or `aborted`.
    pub outcome: String,
    /// How long the statement waited, in milliseconds.
    pub waited_ms: u64,
    /// The approvals that counted, in order.
    pub approvals: Vec<ReviewApprovalRecord>,
    /// The reviewer who denied it.
    pub denied_by: Option<String>,
    /// How that reviewer authenticated (`unix:UID` or `token:NAME`).
    /// Absent in recordings made before it was kept.
    #[serde(default)]
    pub denied_via: Option<String>,
    /// The denying reviewer's reason.
    pub reason: Option<String>,
    /// Who replaced the held text, when a reviewer edited it.
    pub edited_by: Option<String>,
    /// The text that ran instead (decided again by the policy).
    pub edited_text: Option<String>,
}

/// A grant that let a statement run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantUseRecord {
    /// The grant's id.
    pub grant: String,
    /// The request whose approval gave it.
    pub request: String,
    /// The reviewers who gave it.
    pub approved_by: Vec<String>,
    /// When it ends, in Unix seconds.
    pub expires_at: u64,
}

/// A grant an approval gave: later statements of the same shape from the
/// same identity to the same target run without a new review until it ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantGivenRecord {
    /// The grant's id.
    pub grant: String,
    /// The request whose approval gave it.
    pub request: String,
    /// The reviewers who gave it.
    pub approved_by: Vec<String>,
    /// Who it covers: `ci:PROVIDER:REPOSITORY:WORKFLOW` or `exe:PATH@sha256:HEX`.
    pub identity: String,
    /// When it ends, in Unix seconds.
    pub expires_at: u64,
}

/// A grant a reviewer revoked before it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRevokeRecord {
    /// The grant's id.
    pub grant: String,
    /// The request whose approval gave it.
    pub request: String,
    /// The reviewer who revoked it.
    pub by: String,
    /// How that reviewer authenticated (`unix:UID` or `token:NAME`).
    pub via: String,
    /// When, in Unix seconds.
    pub at: u64,
}

/// A notification of a review request, sent or failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewNotifyRecord {
    /// The request's id.
    pub request: String,
    /// The request event announced (`requested`, `approved`, ...).
    pub event: String,
    /// `webhook` or `slack`.
    pub kind: String,
    /// The receiver's host (never its path, which may hold a secret).
    pub host: String,
    /// Whether the receiver accepted it (a 2xx answer).
    pub ok: bool,
    /// The last attempt's failure: an HTTP status or a connection error.
    pub error: Option<String>,
    /// Attempts made.
    pub attempts: u32,
}

/// The largest `data` of a `raw` event, in bytes (64 KiB): longer reads
/// are split into several events.
pub const MAX_RAW_DATA: usize = crate::events::MAX_RAW_CHUNK;

/// Byte strings as MessagePack `bin` (serde's default is an array of
/// integers, five times larger).
mod bin {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(data)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> Visitor<'de> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                // Bounded by the record's own length (at most 16 MiB).
                let mut out = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(Bytes)
    }
}

/// A decided statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementRecord {
    /// The statement text (at most [`MAX_TEXT_LEN`] bytes).
    pub text: String,
    /// The original length in bytes when `text` was cut.
    pub text_len: Option<u64>,
    /// Its command label (`DROP TABLE`), `statement` when unparsable.
    pub command: String,
    /// Its kind (`select`, `drop`, ...), `None` when unparsable.
    pub kind: Option<String>,
    /// Its pg_query fingerprint.
    pub fingerprint: Option<String>,
    /// The decision (`allow`, `audit`, `mask`, `review`, `deny`).
    pub action: String,
    /// Whether the statement was refused (not forwarded).
    pub refused: bool,
    /// The deciding rule, `None` when the default decided.
    pub rule: Option<String>,
    /// Names of the rules that applied, in load order.
    pub rules: Vec<String>,
    /// Why, in one line.
    pub reason: String,
}

/// An event record as the writer writes it: the payload borrowed, so that
/// a statement is written from the session's own copy. Serialises exactly
/// as [`Record::Event`] with the same values (a test compares the bytes).
#[derive(Debug, Serialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub(crate) enum RecordOut<'a, E: Serialize> {
    /// See [`Record::Event`].
    Event(EventRecordOut<'a, E>),
}

/// [`EventRecord`] with a borrowed link and payload.
#[derive(Debug, Serialize)]
pub(crate) struct EventRecordOut<'a, E: Serialize> {
    pub(crate) seq: u64,
    pub(crate) t_us: u64,
    pub(crate) prev: &'a str,
    pub(crate) event: &'a E,
}

/// [`Event::Statement`] borrowed.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum StatementOut<'a> {
    /// See [`Event::Statement`].
    Statement(StatementRecordOut<'a>),
    /// See [`Event::StatementAgain`].
    StatementAgain {
        /// See [`Event::StatementAgain`].
        of: u64,
    },
}

/// [`StatementRecord`] borrowed: the same fields in the same order.
#[derive(Debug, Serialize)]
pub(crate) struct StatementRecordOut<'a> {
    pub(crate) text: &'a str,
    pub(crate) text_len: Option<u64>,
    pub(crate) command: &'a str,
    pub(crate) kind: Option<&'a str>,
    pub(crate) fingerprint: Option<&'a str>,
    pub(crate) action: &'a str,
    pub(crate) refused: bool,
    pub(crate) rule: Option<&'a str>,
    pub(crate) rules: &'a [std::sync::Arc<str>],
    pub(crate) reason: &'a str,
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseRecord {
    /// `completed`, `client_error`, `upstream_error`, `upstream_unreachable`,
    /// `idle_timeout` or `shutdown`.
    pub kind: String,
    /// The error text, when there is one.
    pub detail: Option<String>,
}

impl std::fmt::Display for CloseRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = self.kind.replace('_', " ");
        match &self.detail {
            Some(d) => write!(f, "{kind}: {d}"),
            None => f.write_str(&kind),
        }
    }
}

/// The last record of a complete recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    /// Hex SHA-256 of the last event's frame (the header's when none).
    pub prev: String,
    /// Equal to `prev`; what a signature covers.
    pub chain_head: String,
    /// Number of event records.
    pub events: u64,
    /// Number of statement events.
    pub statements: u64,
    /// Number of refused statements.
    pub denied: u64,
    /// Sum of the `events_lost` counts.
    pub lost: u64,
    /// ed25519 signature of the chain head and counts, when the agent has
    /// a signing key. Absent (not `nil`) when unsigned, so unsigned files
    /// are byte for byte what earlier agents wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<SignatureRecord>,
}

/// An ed25519 signature of the chain head: see
/// [`signed_message`](super::signing::signed_message) for the bytes signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureRecord {
    /// Always `ed25519`.
    pub algorithm: String,
    /// Which key signed: the first 16 hex digits of the SHA-256 of the
    /// 32-byte public key.
    pub key_id: String,
    /// The public key, 64 hex digits (informative: a verifier trusts the
    /// key it was given, never this one alone).
    pub public_key: String,
    /// The signature, 128 hex digits.
    pub value: String,
}
