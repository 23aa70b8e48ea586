//! One PostgreSQL session between a client and its upstream: start-up, then
//! both directions pumped concurrently, every statement decided by the
//! policy before the server sees it.
//!
//! # Phases
//!
//! 1. **Start-up** ([`read_startup`]), on the client socket alone:
//!    GSSENCRequest is answered `N`, and so is SSLRequest unless the agent
//!    terminates client TLS (`[agent] client_tls = "terminate"`: `S`, then
//!    the handshake with the local CA's certificate, see [`super::tls`]);
//!    either is refused when bytes already follow the request (the
//!    CVE-2021-23214 injection). A CancelRequest carries a key of the
//!    proxy's making ([`super::cancel`]): a known one is sent on, with the
//!    server's real key, to the upstream of the session it belongs to, an
//!    unknown one is dropped; the connection then ends without an answer.
//!    A StartupMessage asking for replication is refused (0A000); before
//!    any other is forwarded unchanged, the upstream leg is secured as the
//!    target's `tls` setting says.
//! 2. **Rewritten server messages**: BackendKeyData is replaced by the
//!    proxy's own key (forgotten when the session ends), and
//!    `SCRAM-SHA-256-PLUS` is removed from AuthenticationSASL, since channel
//!    binding cannot cross the proxy.
//! 3. **Authentication and the ready phase** are one loop per direction,
//!    polled together so neither side can stall the other. The only
//!    difference authentication makes is the size limit on client messages
//!    ([`MAX_PRE_AUTH_MESSAGE`] until the server sent AuthenticationOk):
//!    a Query sent before that is decided like any other, so pipelining
//!    cannot slip a statement past the policy.
//!
//! # Refusal: substitute a statement that fails on the server
//!
//! A refused Query, Parse or FunctionCall is not dropped: it is replaced by
//! a statement that fails in parse analysis,
//! `SELECT 1::pg_catalog."tollgate_deny_<nonce>_<n>"` (a Query for Query and
//! FunctionCall, a Parse under the same statement name for Parse). The
//! server fails exactly where the refused message stood, so everything a
//! real error does follows for free and in the right order:
//!
//! - idle: ErrorResponse then ReadyForQuery `I`; in a transaction block the
//!   block is failed (`E`), so the next statement gets 25P02 and COMMIT
//!   answers ROLLBACK; in a failed block the server answers its own 25P02;
//! - extended protocol: the error comes after the replies to the messages
//!   forwarded before it, the server discards everything up to Sync and
//!   rolls back the implicit transaction, writes pipelined before the
//!   refused message included; exactly one ReadyForQuery per Sync;
//! - COPY data the client pipelined after a refused COPY is ignored by the
//!   server, which is not in copy mode.
//!
//! A `DO` block raising the denial would fail only at Execute, after
//! ParseComplete and BindComplete (or a Bind error about parameters), so
//! the substitute fails in parse analysis instead, which both Query and
//! Parse run at once.
//!
//! The server's ErrorResponse for the substitute carries the marker; the
//! upstream pump replaces that one message with the proxy's own
//! (`ERROR 42501` and the policy's message), so the client sees the denial,
//! not a missing type. The nonce is random per session, so a client cannot
//! forge or hide a marker.
//!
//! # Buffers
//!
//! One read buffer per direction. Messages that are only forwarded are
//! written from the buffer as they came (consecutive ones in one write) and
//! passed through in chunks when larger than the buffer, so a 1 GiB DataRow
//! or CopyData is never held whole. Query, Parse and FunctionCall are
//! buffered whole to be analysed, up to [`MAX_INSPECTED_MESSAGE`]; a larger
//! one is refused with 54000 and the session closed.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::prepared::{self as prepared, Decided, Prepared, SqlOp, MAX_TRACKED};
use super::tls::{self, Stream, UpstreamMode};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::backend::{self, BackendMessage, TransactionStatus};
use super::codec::{
    frame, frame_startup, CodecError, FrameHeader, MessageWriter, Reader, MAX_MESSAGE,
    MAX_PRE_AUTH_MESSAGE,
};
use super::error::{error_response, severity, sqlstate, ssl_refused};
use super::fastpath;
use super::frontend::{self, decode_startup, FrontendMessage};
use super::mask::{
    self as masking, Disposition, Expect, ExtendedBatch, LookupScope, MaskPlan, MaskedAnswer,
    PreparedLookup,
};
use crate::events::{CloseReason, RawDirection, SessionEvent, StatementEvent};
use crate::identity::ProcessIdentity;
use crate::policy::{most_restrictive, Action, Decision, DecisionMemo};
use crate::protocol::{current_policy, SessionContext};
use crate::sql::{Analysis, Reading as LiteralReading};

/// Largest Query, Parse or FunctionCall the proxy buffers to analyse (the
/// length field's value). PostgreSQL accepts up to 1 GiB; statements that
/// large are refused here with 54000 program_limit_exceeded rather than
/// buffered or let through unanalysed.
pub const MAX_INSPECTED_MESSAGE: usize = 16 << 20;

/// Initial (and resting) size of each direction's read buffer.
const BUFFER: usize = 16 * 1024;

/// 54000 program_limit_exceeded.
const PROGRAM_LIMIT_EXCEEDED: &str = "54000";

/// Start-up packets (SSLRequest, GSSENCRequest) accepted before the
/// StartupMessage: one of each, as libpq sends at most.
const MAX_NEGOTIATIONS: usize = 2;

/// The SASL mechanism with channel binding, never offered to clients.
const SCRAM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Longest portal and statement names of a Bind read before its parameters.
const MAX_BIND_NAMES: usize = 64 * 1024;

/// Longest CommandComplete body read for the prepared statements it
/// changes (`DEALLOCATE ALL` and its NUL fit); longer ones are other
/// commands' and are passed through.
const MAX_TRACKED_TAG: usize = 32;

/// `client_encoding` UTF8 (or its alias UNICODE): text is read as it is.
const ENCODING_UTF8: u8 = 0;
/// `client_encoding` LATIN1 (ISO 8859-1): every byte is the code point of
/// the same value, so the text converts exactly, as the server converts it.
const ENCODING_LATIN1: u8 = 1;
/// Any other encoding: only ASCII text is read; in multi-byte encodings
/// such as SJIS or BIG5 a quote or backslash byte can sit inside a
/// character, so guessing would misread where literals end.
const ENCODING_OTHER: u8 = 2;

/// Why a `mask` statement decided again (an `EXECUTE`, a stale prepared
/// statement) is refused.
const MASK_EXTENDED: &str = "a statement prepared before the policy masked it is not masked when it runs again; prepare it again";

/// Why the statement run by an `EXECUTE` under `EXPLAIN` or `CREATE TABLE
/// ... AS` is refused when a `mask` rule applies to it.
const MASK_EXECUTE_WRAPPED: &str = "it runs a prepared statement whose rows would go where masking cannot see them (EXPLAIN, CREATE TABLE AS); run EXECUTE alone";

/// Why an `EXECUTE` prepared by Parse is refused when the statement it
/// runs needs masking that its Parse did not plan for.
const MASK_EXECUTE_CHANGED: &str = "the prepared statement it runs needs masking that was not planned when the EXECUTE was prepared (it was prepared again since); prepare the EXECUTE again";

/// Why text sent behind an unanswered statement that may change how the
/// server reads text is refused (see [`super::reading`]).
const READING_CHANGED: &str = "tollgate: this statement was sent behind one that may change how the server reads statement text (SET or RESET of standard_conforming_strings, client_encoding or backslash_quote, RESET ALL, DISCARD ALL, set_config, a DO block, a function whose effect is unknown) in the same extended-protocol batch, or the server did not answer that one in time, so the proxy cannot read it as the server will; refused (send it after the Sync that ends that batch)";

/// Statements reached through `EXECUTE`s of `EXECUTE`s at most.
const MAX_EXECUTE_DEPTH: usize = 8;

/// How long a batch start waits for the server to answer what was sent
/// before it (see [`ClientSide::must_wait`]); then a masked statement in it
/// is refused.
const MASK_WAIT: Duration = Duration::from_secs(30);

/// Prepared statement names the proxy keeps for itself (the masking
/// lookup's, `tollgate_mask_<nonce>_s<k>`), as the server folds them.
const RESERVED_STATEMENT_PREFIX: &[u8] = b"tollgate_mask_";

/// The refusal of a `PREPARE` or Parse under a reserved name.
const RESERVED_STATEMENT_NAME: &str = "tollgate: prepared statement names starting with tollgate_mask_ are reserved for the proxy's masking; refused";

/// Why a `mask` statement in a pipelined extended-protocol batch is
/// refused (a whole client message, see [`ClientSide::join_batch`]).
const MASK_PIPELINED: &str = "tollgate: a statement that requires masking was sent through the extended query protocol while earlier messages were still unanswered (pipelining); masking needs it at the start of a batch, after the answer to the previous Sync; refused";

/// Command label for text that does not parse.
const UNPARSABLE_COMMAND: &str = "statement";

/// State the two directions share. Both run in the session's task; atomics
/// keep the futures `Send`.
struct Shared {
    /// The server sent AuthenticationOk.
    authenticated: AtomicBool,
    /// The status byte of the server's last ReadyForQuery.
    tx_status: AtomicU8,
    /// The session's `client_encoding`, as one of the `ENCODING_*` values:
    /// statement text is read as UTF-8, converted from LATIN1, or (another
    /// encoding) refused as unparsable when it is not ASCII.
    client_encoding: AtomicU8,
    /// `standard_conforming_strings` is off: backslashes in plain literals
    /// are escapes, and the analysis reads them so.
    backslash_escapes: AtomicBool,
    /// `tollgate_deny_<nonce>_`: the marker of substituted statements.
    marker: String,
    /// Next substitute number.
    next_denial: AtomicU64,
    /// Messages for the client, by substitute number, until the server's
    /// error for that substitute arrives.
    denials: Mutex<BTreeMap<u64, String>>,
    /// Unparsable text sent with [`unparsable_guard`] behind it, oldest
    /// first: (the batch it was sent in, its length in characters).
    guarded: Mutex<std::collections::VecDeque<(u64, usize)>>,
    /// The upstream pump is inside a message it passes through in chunks:
    /// the proxy must not write a message of its own to the client now.
    upstream_mid_message: AtomicBool,
    /// The client pump is inside a message: nothing of ours to the server.
    client_mid_message: AtomicBool,
    /// Milliseconds since the session's start of the last byte read.
    last_activity: AtomicU64,
    /// The client-visible cancel key's pid, once registered.
    cancel_pid: Mutex<Option<i32>>,
    /// Prepared statements and portals, decided again when the policy
    /// changes.
    prepared: Mutex<Prepared>,
    /// `tollgate_mask_<nonce>_`: the column name of masking lookups.
    mask_marker: String,
    /// Next masking lookup number.
    next_mask: AtomicU64,
    /// Masked Queries sent, by lookup number, until the lookup's
    /// RowDescription comes back: the plan and the lookup's length.
    masks: Mutex<BTreeMap<u64, (Arc<MaskPlan>, usize)>>,
    /// `masks` is not empty: RowDescriptions are read for the marker.
    masks_pending: AtomicBool,
    /// The session's prepared masking lookup.
    lookup: Mutex<PreparedLookup>,
    /// A Query using `lookup` was sent and the first CommandComplete,
    /// ErrorResponse or RowDescription of its answer has not come (the
    /// upstream pump reads them for the `PREPARE` and `EXECUTE`).
    lookup_pending: AtomicBool,
    /// Queries, Syncs and FunctionCalls sent (the proxy's lookups
    /// included) whose ReadyForQuery has not come: 0 means the server is
    /// idle, waiting for the client. It can only over-count (a Sync the
    /// server ignores during COPY), which refuses masking, never confuses it.
    in_flight: AtomicU64,
    /// The masked extended-protocol batch being answered, if any.
    batch: Mutex<Option<ExtendedBatch>>,
    /// `batch` is set (read without the lock on every message).
    batch_active: AtomicBool,
    /// Notified when `in_flight` falls to 0.
    idle: tokio::sync::Notify,
    /// Syncs the client sent after starting a COPY FROM STDIN and before
    /// its CopyDone or CopyFail: the server ignores them if it entered
    /// copy-in, and then they are taken off the counts of what it answers.
    copy_syncs: AtomicU64,
    /// The server answered CopyInResponse and the copy has not ended.
    copy_in: AtomicBool,
}

/// Denials remembered at most (older ones are forgotten: the server
/// answered them with 25P02 in a failed block, so no marker comes back).
const MAX_PENDING_DENIALS: usize = 1024;

impl Shared {
    fn new() -> Shared {
        // Unpredictable to the client: SipHash under the process's random
        // keys (fresh per `RandomState`) of a time-ordered id.
        let mut hasher = std::hash::BuildHasher::build_hasher(&std::hash::RandomState::new());
        std::hash::Hasher::write_u128(&mut hasher, uuid::Uuid::now_v7().as_u128());
        let nonce = std::hash::Hasher::finish(&hasher);
        Shared {
            authenticated: AtomicBool::new(false),
            tx_status: AtomicU8::new(b'I'),
            client_encoding: AtomicU8::new(ENCODING_UTF8),
            backslash_escapes: AtomicBool::new(false),
            marker: format!("tollgate_deny_{nonce:016x}_"),
            mask_marker: format!("tollgate_mask_{nonce:016x}_"),
            next_mask: AtomicU64::new(1),
            masks: Mutex::new(BTreeMap::new()),
            masks_pending: AtomicBool::new(false),
            lookup: Mutex::new(PreparedLookup::default()),
            lookup_pending: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            batch: Mutex::new(None),
            batch_active: AtomicBool::new(false),
            idle: tokio::sync::Notify::new(),
            copy_syncs: AtomicU64::new(0),
            copy_in: AtomicBool::new(false),
            next_denial: AtomicU64::new(1),
            denials: Mutex::new(BTreeMap::new()),
            guarded: Mutex::new(std::collections::VecDeque::new()),
            upstream_mid_message: AtomicBool::new(false),
            client_mid_message: AtomicBool::new(false),
            last_activity: AtomicU64::new(0),
            cancel_pid: Mutex::new(None),
            prepared: Mutex::new(Prepared::default()),
        }
    }

    /// Registers a denial and returns its marker name, which the server's
    /// error for the substitute will quote.
    fn register_denial(&self, client_message: String) -> String {
        let n = self.next_denial.fetch_add(1, Ordering::Relaxed);
        let mut denials = self.denials.lock().unwrap_or_else(PoisonError::into_inner);
        if denials.len() >= MAX_PENDING_DENIALS {
            denials.pop_first();
        }
        denials.insert(n, client_message);
        format!("{}{n}", self.marker)
    }

    /// Registers a denial and returns the SQL of its substitute.
    fn substitute_sql(&self, client_message: String) -> String {
        format!(
            "SELECT 1::pg_catalog.\"{}\"",
            self.register_denial(client_message)
        )
    }

    /// Registers a masked Query's plan; returns the SQL of its lookup, to
    /// be sent in front of the client's text. `alone`: nothing else is in
    /// flight, so the answer's first messages are the lookup's.
    fn register_mask(&self, plan: MaskPlan, alone: bool) -> String {
        // In front of the Query's text, the lookup runs right before its
        // first statement: when that is the only masked one, the search
        // path finds what it reads, and the prepared form can serve.
        let prepared = if alone && plan.only_first {
            self.lookup().sql(&self.mask_marker, &plan)
        } else {
            None
        };
        let mut masks = self.masks.lock().unwrap_or_else(PoisonError::into_inner);
        let (n, sql) = match prepared {
            Some(sql) => {
                // Nothing in flight: every lookup registered before was
                // answered or failed.
                masks.clear();
                self.lookup_pending.store(true, Ordering::Relaxed);
                (0, sql)
            }
            None => {
                let n = self.next_mask.fetch_add(1, Ordering::Relaxed);
                let scope = if plan.only_first {
                    LookupScope::SearchPath
                } else {
                    LookupScope::EverySchema
                };
                (
                    n,
                    plan.lookup_sql(&format!("{}{n}", self.mask_marker), scope),
                )
            }
        };
        if masks.len() >= MAX_PENDING_DENIALS {
            masks.pop_first();
        }
        masks.insert(n, (Arc::new(plan), sql.len()));
        self.masks_pending.store(true, Ordering::Relaxed);
        sql
    }

    fn lookup(&self) -> std::sync::MutexGuard<'_, PreparedLookup> {
        self.lookup.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The plan of the masked Query whose lookup has `column` as its first
    /// column's name, if it is one. Lookups registered before it were not
    /// answered (their Query failed first) and are forgotten.
    fn mask_for(&self, column: &str) -> Option<(Arc<MaskPlan>, usize)> {
        let n: u64 = column
            .strip_prefix(self.mask_marker.as_str())?
            .parse()
            .ok()?;
        let mut masks = self.masks.lock().unwrap_or_else(PoisonError::into_inner);
        let found = masks.remove(&n);
        while masks.first_key_value().is_some_and(|(&k, _)| k < n) {
            masks.pop_first();
        }
        self.masks_pending
            .store(!masks.is_empty(), Ordering::Relaxed);
        found
    }

    fn batch(&self) -> std::sync::MutexGuard<'_, Option<ExtendedBatch>> {
        self.batch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn prepared(&self) -> std::sync::MutexGuard<'_, Prepared> {
        self.prepared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers unparsable text sent with the guard behind it, in `batch`.
    fn guard_sent(&self, batch: u64, text: &[u8]) {
        let chars = std::str::from_utf8(text).map_or(text.len(), |t| t.chars().count());
        let mut guarded = self.guarded.lock().unwrap_or_else(PoisonError::into_inner);
        if guarded.len() >= MAX_PENDING_DENIALS {
            guarded.pop_front();
        }
        guarded.push_back((batch, chars));
    }

    /// An ErrorResponse of the batch being answered (`answered` batches
    /// were before it) that is the guard's `;` refused behind text which
    /// ended unfinished: rewritten into `out` as what the server says of
    /// that text alone, `syntax error at end of input` at its end. `false`:
    /// it is not (forward it as it is).
    fn unfinished_text_error(&self, answered: u64, body: &[u8], out: &mut Vec<u8>) -> bool {
        let mut guarded = self.guarded.lock().unwrap_or_else(PoisonError::into_inner);
        while guarded.front().is_some_and(|(batch, _)| *batch < answered) {
            guarded.pop_front();
        }
        let Some(&(batch, chars)) = guarded.front() else {
            return false;
        };
        if batch != answered {
            return false;
        }
        // Whatever this error is, it ends the batch's guarded text.
        guarded.pop_front();
        drop(guarded);
        let Ok(BackendMessage::ErrorResponse(fields)) =
            backend::decode_backend(backend::tag::ERROR_RESPONSE, body)
        else {
            return false;
        };
        // The guard's `;` follows the text's last character and a newline.
        let at_guard = fields.get(backend::field::POSITION) == Some(&(chars + 2).to_string());
        if fields.get(backend::field::MESSAGE) != Some("syntax error at or near \";\"") || !at_guard
        {
            return false;
        }
        let end = (chars + 1).to_string();
        let mut w = MessageWriter::new(out, backend::tag::ERROR_RESPONSE);
        for &(code, value) in &fields.0 {
            let value = match code {
                backend::field::MESSAGE => "syntax error at end of input",
                backend::field::POSITION => end.as_str(),
                _ => value,
            };
            w.put_u8(code).put_cstr(value);
        }
        w.put_u8(0);
        w.finish();
        true
    }

    /// Whether an ErrorResponse body answers a refusal's substitute (see
    /// [`Shared::denial_for`], which also takes its message).
    fn is_denial(&self, error_body: &[u8]) -> bool {
        self.marker_at(error_body).is_some()
    }

    /// Where the denial marker starts in an ErrorResponse body.
    fn marker_at(&self, error_body: &[u8]) -> Option<usize> {
        let marker = self.marker.as_bytes();
        error_body.windows(marker.len()).position(|w| w == marker)
    }

    /// The client message of the substitute an ErrorResponse body answers,
    /// if it answers one.
    fn denial_for(&self, error_body: &[u8]) -> Option<String> {
        let at = self.marker_at(error_body)?;
        let digits = error_body.get(at.saturating_add(self.marker.len())..)?;
        let end = digits
            .iter()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(digits.len());
        let n: u64 = std::str::from_utf8(digits.get(..end)?).ok()?.parse().ok()?;
        let mut denials = self.denials.lock().unwrap_or_else(PoisonError::into_inner);
        let message = denials.remove(&n);
        // Earlier substitutes were answered without a marker (25P02).
        while denials.first_key_value().is_some_and(|(&k, _)| k < n) {
            denials.pop_first();
        }
        message
    }

    fn touch(&self, start: Instant) {
        let now = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity.fetch_max(now, Ordering::Relaxed);
    }
}

/// Why a session is being ended by the proxy, with what to tell the client.
#[derive(Debug)]
enum Stop {
    /// An I/O error or end on one side: nothing more to say.
    Closed(CloseReason),
    /// A fault the client should hear about before the connection closes.
    Fatal {
        sqlstate: &'static str,
        message: String,
        reason: CloseReason,
    },
}

impl Stop {
    fn client_fault(sqlstate: &'static str, message: String) -> Stop {
        Stop::Fatal {
            sqlstate,
            reason: CloseReason::ClientError(message.clone()),
            message,
        }
    }

    fn protocol_violation(what: impl std::fmt::Display) -> Stop {
        Stop::client_fault(
            sqlstate::PROTOCOL_VIOLATION,
            format!("tollgate: invalid message from the client: {what}"),
        )
    }
}

/// A read buffer: bytes `start..end` of `data` are received and not yet
/// handled.
struct ReadBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    fn new() -> ReadBuf {
        ReadBuf {
            data: vec![0; BUFFER],
            start: 0,
            end: 0,
        }
    }

    fn filled(&self) -> &[u8] {
        self.data.get(self.start..self.end).unwrap_or_default()
    }

    fn consume(&mut self, n: usize) {
        self.start = self.start.saturating_add(n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.data.len() > BUFFER {
                // One large message does not keep its buffer for the session.
                self.data.truncate(BUFFER);
                self.data.shrink_to_fit();
            }
        }
    }

    /// Makes room to read, so that a message of `need` bytes (at least one
    /// more than what is here) fits whole. `need` is bounded by the caller.
    fn make_room(&mut self, need: usize) {
        let have = self.end.saturating_sub(self.start);
        let need = need.max(have.saturating_add(1));
        if self.data.len().saturating_sub(self.start) < need
            || self.data.len().saturating_sub(self.end) < BUFFER / 4
        {
            self.data.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = have;
        }
        if self.data.len() < need {
            self.data.resize(need.max(BUFFER), 0);
        } else if self.end == self.data.len() {
            self.data.resize(self.data.len().saturating_add(BUFFER), 0);
        }
    }

    /// Reads once; 0 means end of stream.
    async fn read_from<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> io::Result<usize> {
        let Some(space) = self.data.get_mut(self.end..) else {
            return Ok(0);
        };
        let n = r.read(space).await?;
        self.end = self.end.saturating_add(n).min(self.data.len());
        Ok(n)
    }
}

/// A start-up packet, read whole.
enum StartupPacket {
    /// A StartupMessage to forward: its bytes, and what it asks for.
    Startup {
        bytes: Vec<u8>,
        user: Option<String>,
        database: Option<String>,
        application_name: Option<String>,
        replication: Option<String>,
    },
    /// A CancelRequest with the key the client was given.
    Cancel { pid: i32, secret: Vec<u8> },
    /// An SSLRequest the proxy answers `S` to: the caller answers and does
    /// the handshake, then reads on.
    TlsRequested,
}

/// Reads start-up packets until a StartupMessage or a CancelRequest,
/// answering GSSENCRequest with `N`, and SSLRequest with `N` unless
/// `offer_tls` (then [`StartupPacket::TlsRequested`] is returned for the
/// caller to answer). Bytes after the packet stay in `buf`.
async fn read_startup<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    buf: &mut ReadBuf,
    shared: &Shared,
    start: Instant,
    negotiations: &mut usize,
    offer_tls: bool,
) -> Result<StartupPacket, Stop> {
    loop {
        let len = loop {
            match frame_startup(buf.filled()) {
                Err(e) => return Err(startup_fault(e)),
                Ok(Some(len)) if buf.filled().len() >= len => break len,
                Ok(Some(len)) => buf.make_room(len),
                Ok(None) => buf.make_room(8),
            }
            let n = buf
                .read_from(client)
                .await
                .map_err(|e| Stop::Closed(CloseReason::ClientError(e.to_string())))?;
            if n == 0 {
                let got = buf.filled().len();
                return Err(Stop::Closed(CloseReason::ClientError(format!(
                    "the client closed the connection during start-up after {got} bytes of a start-up packet"
                ))));
            }
            shared.touch(start);
        };
        let packet = buf.filled().get(..len).unwrap_or_default();
        let body = packet.get(4..).unwrap_or_default();
        let message = decode_startup(body).map_err(startup_fault)?;
        match message {
            FrontendMessage::SslRequest | FrontendMessage::GssEncRequest => {
                if buf.filled().len() > len {
                    return Err(Stop::client_fault(
                        sqlstate::PROTOCOL_VIOLATION,
                        "tollgate: received unencrypted data after an encryption request \
                         (possible injection, CVE-2021-23214)"
                            .to_owned(),
                    ));
                }
                *negotiations += 1;
                if *negotiations > MAX_NEGOTIATIONS {
                    return Err(Stop::client_fault(
                        sqlstate::PROTOCOL_VIOLATION,
                        "tollgate: too many encryption requests during start-up".to_owned(),
                    ));
                }
                let is_ssl = matches!(message, FrontendMessage::SslRequest);
                buf.consume(len);
                if offer_tls && is_ssl {
                    return Ok(StartupPacket::TlsRequested);
                }
                client
                    .write_all(&ssl_refused())
                    .await
                    .map_err(|e| Stop::Closed(CloseReason::ClientError(e.to_string())))?;
            }
            FrontendMessage::CancelRequest { pid, secret } => {
                let result = StartupPacket::Cancel {
                    pid,
                    secret: secret.to_vec(),
                };
                buf.consume(len);
                return Ok(result);
            }
            FrontendMessage::Startup { params, .. } => {
                let get = |name: &str| {
                    params
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, v)| (*v).to_owned())
                };
                let result = StartupPacket::Startup {
                    user: get("user"),
                    database: get("database"),
                    application_name: get("application_name"),
                    replication: get("replication"),
                    bytes: packet.to_vec(),
                };
                buf.consume(len);
                return Ok(result);
            }
            other => {
                return Err(Stop::protocol_violation(format_args!(
                    "unexpected {} during start-up",
                    other.name()
                )))
            }
        }
    }
}

fn startup_fault(e: CodecError) -> Stop {
    match e {
        CodecError::UnsupportedProtocol { major, minor } => Stop::client_fault(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!(
                "tollgate: unsupported frontend protocol {major}.{minor}: only 3.x is supported"
            ),
        ),
        other => Stop::client_fault(
            sqlstate::PROTOCOL_VIOLATION,
            format!("tollgate: invalid start-up packet: {other}"),
        ),
    }
}

/// The first byte of a TLS handshake record (a ClientHello), which no
/// start-up packet begins with (its length would exceed 256 MiB).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How a client asked for TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Negotiation {
    /// SSLRequest, answered `S`.
    SslRequest,
    /// A ClientHello straight away (`sslnegotiation=direct`).
    Direct,
}

/// The first byte the client sent, left unread; `None` if it closed.
async fn first_byte(client: &Stream) -> io::Result<Option<u8>> {
    let Stream::Plain(tcp) = client else {
        return Ok(None);
    };
    let mut byte = [0u8; 1];
    let n = tcp.peek(&mut byte).await?;
    Ok((n == 1).then_some(byte[0]))
}

/// How long a TLS handshake on either leg may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Forgets the session's client-visible cancel key when the session ends.
struct ForgetCancelKey<'a> {
    ctx: &'a SessionContext,
    shared: &'a Shared,
}

impl Drop for ForgetCancelKey<'_> {
    fn drop(&mut self) {
        let pid = self
            .shared
            .cancel_pid
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(pid) = pid {
            self.ctx.cancel.forget(pid);
        }
    }
}

/// Runs a PostgreSQL session until it ends and says why.
pub async fn run(ctx: &SessionContext, client: TcpStream, upstream: TcpStream) -> CloseReason {
    let start = Instant::now();
    let shared = Shared::new();
    let _forget = ForgetCancelKey {
        ctx,
        shared: &shared,
    };
    let mut client = Stream::Plain(client);
    let mut client_buf = ReadBuf::new();
    let mut negotiations = 0;

    let packet = loop {
        let offer_tls = ctx.tls.client().is_some() && !client.is_tls();
        if offer_tls && negotiations == 0 && client_buf.filled().is_empty() {
            // PostgreSQL 17's `sslnegotiation=direct`: the client opens with
            // a TLS ClientHello instead of an SSLRequest.
            let first = tokio::select! {
                r = first_byte(&client) => r,
                _ = tokio::time::sleep(ctx.idle_timeout) => return CloseReason::IdleTimeout,
                _ = ctx.force_close.cancelled() => return CloseReason::Shutdown,
            };
            match first {
                Ok(Some(TLS_HANDSHAKE_RECORD)) => {
                    negotiations += 1;
                    match accept_client_tls(ctx, client, Negotiation::Direct).await {
                        Ok(tls) => client = tls,
                        Err(reason) => return reason,
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) => return CloseReason::ClientError(e.to_string()),
            }
        }
        let startup = tokio::select! {
            r = read_startup(&mut client, &mut client_buf, &shared, start, &mut negotiations, offer_tls) => r,
            _ = tokio::time::sleep(ctx.idle_timeout) => Err(Stop::Closed(CloseReason::IdleTimeout)),
            _ = ctx.force_close.cancelled() => Err(Stop::Fatal {
                sqlstate: sqlstate::ADMIN_SHUTDOWN,
                message: "tollgate: the agent is shutting down".to_owned(),
                reason: CloseReason::Shutdown,
            }),
        };
        match startup {
            Ok(StartupPacket::TlsRequested) => {
                match accept_client_tls(ctx, client, Negotiation::SslRequest).await {
                    Ok(tls) => client = tls,
                    Err(reason) => return reason,
                }
            }
            Ok(p) => break p,
            Err(stop) => return end_early(ctx, &mut client, stop).await,
        }
    };
    let (bytes, startup_event) = match packet {
        StartupPacket::TlsRequested => return CloseReason::Completed,
        StartupPacket::Cancel { pid, secret } => {
            count(ctx, true, 16);
            return forward_cancel(ctx, upstream, pid, &secret).await;
        }
        StartupPacket::Startup {
            bytes,
            user,
            database,
            application_name,
            replication,
        } => {
            if let Some(mode) = replication.filter(|m| {
                !m.eq_ignore_ascii_case("false")
                    && m != "0"
                    && !m.eq_ignore_ascii_case("off")
                    && !m.eq_ignore_ascii_case("no")
            }) {
                let message = "tollgate: replication connections are not allowed".to_owned();
                let stop = Stop::Fatal {
                    sqlstate: sqlstate::FEATURE_NOT_SUPPORTED,
                    reason: CloseReason::ClientError(format!(
                        "refused a replication connection (replication={mode})"
                    )),
                    message,
                };
                return end_early(ctx, &mut client, stop).await;
            }
            (
                bytes,
                SessionEvent::Startup {
                    session: ctx.id,
                    user,
                    database,
                    application_name,
                },
            )
        }
    };
    let mut upstream = match connect_upstream_tls(ctx, upstream).await {
        Ok(u) => u,
        Err(stop) => return end_early(ctx, &mut client, stop).await,
    };
    tracing::info!(
        session = %ctx.id,
        target = %ctx.target,
        client_tls = client.tls_version().as_deref().unwrap_or("off"),
        upstream_tls = upstream.tls_version().as_deref().unwrap_or("off"),
        "session legs: client {}, upstream {}",
        if client.is_tls() { "TLS" } else { "plaintext" },
        if upstream.is_tls() { "TLS" } else { "plaintext" },
    );
    count(ctx, true, bytes.len());
    if let Err(e) = write_flush(&mut upstream, &bytes).await {
        return CloseReason::UpstreamError(e.to_string());
    }
    // The server authenticates and sets up its backend while the process
    // behind the session is looked up; nothing is decided or recorded
    // before it is known.
    let info = ctx.start.info().await;
    ctx.events.emit(&startup_event);
    if ctx.events.records_raw(&ctx.target) {
        ctx.events.emit_raw(ctx.id, RawDirection::Client, &bytes);
    }

    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let outcome = {
        let from_client = client_pump(
            &mut client_read,
            &mut upstream_write,
            client_buf,
            ctx,
            &info.identity,
            &shared,
            start,
        );
        let from_upstream =
            upstream_pump(&mut upstream_read, &mut client_write, ctx, &shared, start);
        tokio::pin!(from_client, from_upstream);
        let (mut client_done, mut upstream_done) = (false, false);
        loop {
            if client_done && upstream_done {
                break Stop::Closed(CloseReason::Completed);
            }
            let idle_deadline = start
                + Duration::from_millis(shared.last_activity.load(Ordering::Relaxed))
                + ctx.idle_timeout;
            tokio::select! {
                r = &mut from_client, if !client_done => match r {
                    Ok(()) => client_done = true,
                    Err(stop) => break stop,
                },
                r = &mut from_upstream, if !upstream_done => match r {
                    Ok(()) => upstream_done = true,
                    Err(stop) => break stop,
                },
                _ = tokio::time::sleep_until(idle_deadline) => {
                    let idle_for = start.elapsed().saturating_sub(Duration::from_millis(shared.last_activity.load(Ordering::Relaxed)));
                    if idle_for >= ctx.idle_timeout {
                        break Stop::Closed(CloseReason::IdleTimeout);
                    }
                }
                _ = ctx.force_close.cancelled() => break Stop::Fatal {
                    sqlstate: sqlstate::ADMIN_SHUTDOWN,
                    message: "tollgate: the agent is shutting down".to_owned(),
                    reason: CloseReason::Shutdown,
                },
            }
        }
    };
    match outcome {
        Stop::Closed(reason) => reason,
        Stop::Fatal {
            sqlstate,
            message,
            reason,
        } => {
            tracing::warn!(session = %ctx.id, sqlstate, "closing the session: {message}");
            if !shared.upstream_mid_message.load(Ordering::Relaxed) {
                let (detail, hint) = match &reason {
                    CloseReason::RecordingFailed(cause) => {
                        (Some(cause.as_str()), Some(RECORDING_HINT))
                    }
                    _ => (None, None),
                };
                let wire = error_response(severity::FATAL, sqlstate, &message, detail, hint);
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    write_flush(&mut client_write, &wire),
                )
                .await;
            }
            if !shared.client_mid_message.load(Ordering::Relaxed) {
                let terminate = [frontend::tag::TERMINATE, 0, 0, 0, 4];
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    write_flush(&mut upstream_write, &terminate),
                )
                .await;
            }
            let _ = client_write.shutdown().await;
            let _ = upstream_write.shutdown().await;
            reason
        }
    }
}

/// Writes all of `bytes` and flushes (TLS keeps records until flushed; for
/// TCP the flush does nothing).
async fn write_flush<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// Ends a session before the pumps started: tells the client why when
/// there is something to say, logs it, and closes.
async fn end_early<S: AsyncWrite + Unpin>(
    ctx: &SessionContext,
    client: &mut S,
    stop: Stop,
) -> CloseReason {
    match stop {
        Stop::Closed(reason) => {
            if matches!(reason, CloseReason::ClientError(_)) {
                tracing::warn!(session = %ctx.id, "closing the session: {reason}");
            }
            reason
        }
        Stop::Fatal {
            sqlstate,
            message,
            reason,
        } => {
            tracing::warn!(session = %ctx.id, sqlstate, "closing the session: {message}");
            let wire = error_response(severity::FATAL, sqlstate, &message, None, None);
            let _ = tokio::time::timeout(Duration::from_secs(1), write_flush(client, &wire)).await;
            let _ = client.shutdown().await;
            reason
        }
    }
}

/// Answers `S` to the client's SSLRequest and does the TLS handshake with
/// the agent's certificate.
async fn accept_client_tls(
    ctx: &SessionContext,
    client: Stream,
    negotiation: Negotiation,
) -> Result<Stream, CloseReason> {
    let (Some(acceptor), Stream::Plain(mut tcp)) = (ctx.tls.client(), client) else {
        return Err(CloseReason::ClientError(
            "an SSLRequest arrived on a connection already encrypted".to_owned(),
        ));
    };
    if negotiation == Negotiation::SslRequest {
        if let Err(e) = tcp.write_all(b"S").await {
            return Err(CloseReason::ClientError(e.to_string()));
        }
    }
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            // As PostgreSQL does: direct TLS must name the protocol, so
            // that a TLS connection meant for another service is refused.
            let alpn = tls.get_ref().1.alpn_protocol();
            if negotiation == Negotiation::Direct && alpn != Some(tls::ALPN_POSTGRESQL) {
                let why = "direct TLS without the \"postgresql\" ALPN protocol".to_owned();
                tracing::warn!(session = %ctx.id, "closing the session: {why}");
                return Err(CloseReason::ClientError(why));
            }
            Ok(Stream::Tls(Box::new(tls.into())))
        }
        Ok(Err(e)) => {
            let why = format!("the client's TLS handshake failed: {e}");
            tracing::warn!(session = %ctx.id, "closing the session: {why}");
            Err(CloseReason::ClientError(why))
        }
        Err(_) => Err(CloseReason::ClientError(
            "the client's TLS handshake did not finish in time".to_owned(),
        )),
    }
}

/// Secures the upstream leg as the target says: SSLRequest, then the
/// handshake on `S`; `N` is plaintext for `prefer` and a refusal otherwise.
async fn connect_upstream_tls(
    ctx: &SessionContext,
    mut upstream: TcpStream,
) -> Result<Stream, Stop> {
    let target = &ctx.target;
    let mode = ctx.tls.upstream(target);
    let (connector, verify_full, name) = match mode {
        UpstreamMode::Disable => return Ok(Stream::Plain(upstream)),
        UpstreamMode::Prefer(c) | UpstreamMode::Require(c) => (c, false, None),
        UpstreamMode::VerifyFull {
            connector,
            server_name,
        } => (connector, true, server_name.as_deref()),
    };
    let fatal = |message: String| Stop::Fatal {
        sqlstate: sqlstate::CONNECTION_FAILURE,
        reason: CloseReason::UpstreamError(message.clone()),
        message,
    };
    let upstream_err = |e: io::Error| Stop::Closed(CloseReason::UpstreamError(e.to_string()));
    let ssl_request = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    write_flush(&mut upstream, &ssl_request)
        .await
        .map_err(upstream_err)?;
    let mut answer = [0u8; 1];
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, upstream.read_exact(&mut answer)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Err(fatal(format!(
            "tollgate: target \"{target}\": the server closed the connection after SSLRequest: {e}"
        )))
        }
        Err(_) => {
            return Err(fatal(format!(
                "tollgate: target \"{target}\": the server did not answer SSLRequest in time"
            )))
        }
    }
    match answer {
        [b'S'] => {}
        [b'N'] if matches!(mode, UpstreamMode::Prefer(_)) => {
            tracing::debug!(session = %ctx.id, "the server does not offer TLS; going on in plaintext (tls = \"prefer\")");
            return Ok(Stream::Plain(upstream));
        }
        [b'N'] => {
            return Err(fatal(format!(
                "tollgate: target \"{target}\" requires TLS but the server does not offer it"
            )))
        }
        [other] => {
            return Err(fatal(format!(
                "tollgate: target \"{target}\": the server answered SSLRequest with {} instead of S or N",
                printable(other)
            )))
        }
    }
    let name = name.unwrap_or(&ctx.upstream_name);
    let server_name = tls::server_name(name).map_err(|e| {
        fatal(format!(
            "tollgate: target \"{target}\": {e}; set tls_server_name"
        ))
    })?;
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, connector.connect(server_name, upstream)).await {
        Ok(Ok(tls)) => Ok(Stream::Tls(Box::new(tls.into()))),
        Ok(Err(e)) => Err(fatal(format!(
            "tollgate: target \"{target}\": TLS to the server failed ({} mode, server name \"{name}\"): {}",
            mode.name(),
            tls::describe_handshake_error(&e, verify_full)
        ))),
        Err(_) => Err(fatal(format!(
            "tollgate: target \"{target}\": the TLS handshake with the server did not finish in time"
        ))),
    }
}

/// Sends the real CancelRequest for a client-visible key to the upstream
/// of the session it belongs to; an unknown key is dropped. No answer
/// either way, as the protocol says.
async fn forward_cancel(
    ctx: &SessionContext,
    mut upstream: TcpStream,
    pid: i32,
    secret: &[u8],
) -> CloseReason {
    let Some(backend) = ctx.cancel.lookup(pid, secret) else {
        tracing::debug!(session = %ctx.id, pid, "CancelRequest with an unknown key: dropped");
        return CloseReason::Completed;
    };
    let mut wire = Vec::with_capacity(16);
    FrontendMessage::CancelRequest {
        pid: backend.pid,
        secret: &backend.secret,
    }
    .encode(&mut wire);
    if backend.upstream != ctx.upstream_addr {
        // The session's own connection goes elsewhere: reach the backend's.
        drop(upstream);
        upstream =
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, TcpStream::connect(backend.upstream))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return CloseReason::UpstreamError(format!(
                        "cannot forward a CancelRequest to {}: {e}",
                        backend.upstream
                    ))
                }
                Err(_) => {
                    return CloseReason::UpstreamError(format!(
                        "cannot forward a CancelRequest to {}: timed out",
                        backend.upstream
                    ))
                }
            };
    }
    tracing::info!(session = %ctx.id, backend_pid = backend.pid, upstream = %backend.upstream, "forwarding a CancelRequest upstream");
    if let Err(e) = upstream.write_all(&wire).await {
        return CloseReason::UpstreamError(e.to_string());
    }
    let _ = upstream.shutdown().await;
    CloseReason::Completed
}

/// Refuses a client whose upstream cannot be reached, in PostgreSQL's own
/// terms (see [`refuse_at_startup`]).
pub async fn refuse_unreachable(
    client: TcpStream,
    tls: Option<&TlsAcceptor>,
    target: &str,
    cause: &str,
    timeout: Duration,
) {
    let message = format!("tollgate: cannot reach the upstream of target \"{target}\": {cause}");
    let fatal = Refusal {
        sqlstate: sqlstate::CONNECTION_FAILURE,
        message: &message,
        detail: None,
        hint: None,
    };
    refuse_at_startup(client, tls, &fatal, timeout).await;
}

/// What a refused client is told: a FATAL ErrorResponse's fields.
#[derive(Debug, Clone, Copy)]
pub struct Refusal<'a> {
    /// SQLSTATE.
    pub sqlstate: &'a str,
    /// The message.
    pub message: &'a str,
    /// DETAIL, if any.
    pub detail: Option<&'a str>,
    /// HINT, if any.
    pub hint: Option<&'a str>,
}

/// Answers a client the agent will not serve: reads its start-up packets
/// (over TLS when `tls` is given and the client asks for it, so a client
/// that insists on TLS still reads why), then sends `refusal` as a FATAL
/// error and closes. An invalid start-up gets the protocol violation
/// instead; a CancelRequest, or a client that leaves or stays silent for
/// `timeout`, gets nothing.
pub async fn refuse_at_startup(
    client: TcpStream,
    tls: Option<&TlsAcceptor>,
    refusal: &Refusal<'_>,
    timeout: Duration,
) {
    let shared = Shared::new();
    let start = Instant::now();
    let exchange = async {
        let mut buf = ReadBuf::new();
        let mut negotiations = 0;
        let mut stream = Stream::Plain(client);
        loop {
            let offer_tls = tls.is_some() && !stream.is_tls();
            let packet = read_startup(
                &mut stream,
                &mut buf,
                &shared,
                start,
                &mut negotiations,
                offer_tls,
            )
            .await;
            let wire = match packet {
                Ok(StartupPacket::TlsRequested) => {
                    let (Some(acceptor), Stream::Plain(mut tcp)) = (tls, stream) else {
                        return None;
                    };
                    tcp.write_all(b"S").await.ok()?;
                    let secured = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                        .await
                        .ok()?
                        .ok()?;
                    stream = Stream::Tls(Box::new(secured.into()));
                    continue;
                }
                Ok(StartupPacket::Startup { .. }) => error_response(
                    severity::FATAL,
                    refusal.sqlstate,
                    refusal.message,
                    refusal.detail,
                    refusal.hint,
                ),
                Err(Stop::Fatal {
                    sqlstate, message, ..
                }) => error_response(severity::FATAL, sqlstate, &message, None, None),
                Ok(StartupPacket::Cancel { .. }) | Err(Stop::Closed(_)) => return None,
            };
            write_flush(&mut stream, &wire).await.ok()?;
            return Some(stream);
        }
    };
    if let Ok(Some(mut stream)) = tokio::time::timeout(timeout, exchange).await {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    }
}

/// The HINT of the FATAL error that ends a session when recording failed.
const RECORDING_HINT: &str = "nothing may run unrecorded (agent.recording_on_failure = \"refuse\"); fix the cause, e.g. free space in the recording directory, then restart the agent";

/// Fail closed: a session whose events can no longer be recorded ends
/// before it forwards another statement (a relaxed atomic load when all
/// is well).
fn check_recording(ctx: &SessionContext) -> Result<(), Stop> {
    match ctx.events.recording_failure() {
        None => Ok(()),
        Some(cause) => Err(Stop::Fatal {
            sqlstate: sqlstate::CANNOT_CONNECT_NOW,
            message: "tollgate: session ended: session recording has failed".to_owned(),
            reason: CloseReason::RecordingFailed(cause),
        }),
    }
}

/// Records the last `n` bytes of `buf` (just read) as raw bytes from `dir`.
fn record_raw(ctx: &SessionContext, dir: RawDirection, buf: &ReadBuf, n: usize) {
    let filled = buf.filled();
    let read = filled
        .get(filled.len().saturating_sub(n)..)
        .unwrap_or_default();
    ctx.events.emit_raw(ctx.id, dir, read);
}

fn count(ctx: &SessionContext, from_client: bool, n: usize) {
    let n = n as u64;
    if from_client {
        ctx.counters.from_client.fetch_add(n, Ordering::Relaxed);
        ctx.target_metrics
            .bytes_from_client
            .fetch_add(n, Ordering::Relaxed);
    } else {
        ctx.counters.from_upstream.fetch_add(n, Ordering::Relaxed);
        ctx.target_metrics
            .bytes_from_upstream
            .fetch_add(n, Ordering::Relaxed);
    }
}

/// What to do with the message at the start of the unhandled bytes.
enum Step {
    /// Wait until this many bytes (the whole message) are here.
    Need(usize),
    /// Forward the next `n` bytes as they are (a whole message, or the part
    /// of one passed through in chunks that is here).
    Forward(usize),
    /// Replace the next `n` bytes (one whole message) with `out`.
    Replace(usize),
    /// Forward the next `n` bytes, then stop reading (Terminate).
    Last(usize),
    /// Step this message again once the server has answered everything
    /// sent before it (see [`ClientSide::must_wait`]).
    Wait,
}

/// Whether `tag` is a message type clients send.
fn is_frontend_tag(tag: u8) -> bool {
    use frontend::tag::*;
    matches!(
        tag,
        BIND | CLOSE
            | COPY_DATA
            | COPY_DONE
            | COPY_FAIL
            | DESCRIBE
            | EXECUTE
            | FLUSH
            | FUNCTION_CALL
            | PARSE
            | PASSWORD
            | QUERY
            | SYNC
            | TERMINATE
    )
}

/// The client → server direction.
struct ClientSide<'a> {
    ctx: &'a SessionContext,
    /// The process behind the session, as policy rules see it.
    identity: &'a ProcessIdentity,
    shared: &'a Shared,
    /// Bytes of a passed-through message still to come.
    streaming: usize,
    /// Replacement bytes for [`Step::Replace`].
    out: Vec<u8>,
    /// Decisions for statements of one shape, made once per policy.
    memo: RefCell<DecisionMemo>,
    /// What to mask in the answer to the Query or Parse just decided.
    mask_plan: RefCell<Option<MaskPlan>>,
    /// Extended-protocol messages were sent since the last Sync.
    extended_open: Cell<bool>,
    /// A masked batch is open: what the client sends up to its Sync is
    /// told to the upstream pump, in order.
    batch_open: Cell<bool>,
    /// Bytes to send in front of the message just stepped (the masking
    /// lookup that opens a batch).
    prefix: RefCell<Vec<u8>>,
    /// The wait for the server to be idle before this batch timed out
    /// (reset at Sync): its masked messages are refused.
    waited: Cell<bool>,
    /// A statement that may change how the server reads statement text
    /// (see [`super::reading`]) was sent to run in this batch (the count of
    /// Syncs, Queries and FunctionCalls sent before it): until the server
    /// answered that batch, later text cannot be read as the server will.
    reading_changed: Cell<Option<u64>>,
    /// A wait for that answer timed out: text is refused until it comes.
    reading_waited: Cell<bool>,
    /// A COPY FROM STDIN was sent to run and the client has not ended its
    /// data (CopyDone, CopyFail): its Syncs may be ignored.
    copy_open: Cell<bool>,
    /// Such a statement ran in the open transaction block, so ending the
    /// block (or rolling back to a savepoint) may change the reading back.
    reading_changed_in_block: Cell<bool>,
    /// The message just refused is text the analysis could not parse,
    /// refused by the default: the server reads it for its own syntax
    /// error (see [`ClientSide::substitute`]).
    server_reads_refused: Cell<bool>,
}

/// What a Query, Parse or FunctionCall may do while a statement that may
/// change how text is read is unanswered.
enum Reading {
    /// Nothing pending: analyse it under the settings the server reported.
    Settled,
    /// Sent in a later batch: wait for the server's answer.
    Wait,
    /// Sent in the same batch (or the wait timed out): refuse it.
    Refuse,
}

impl ClientSide<'_> {
    fn step(&mut self, data: &[u8]) -> Result<Step, Stop> {
        if self.streaming > 0 {
            let n = self.streaming.min(data.len());
            self.streaming -= n;
            return Ok(Step::Forward(n));
        }
        let Some(&tag) = data.first() else {
            return Ok(Step::Need(FrameHeader::SIZE));
        };
        if !is_frontend_tag(tag) {
            return Err(Stop::client_fault(
                sqlstate::PROTOCOL_VIOLATION,
                format!(
                    "tollgate: invalid message from the client: unknown message type {} (0x{tag:02x})",
                    printable(tag)
                ),
            ));
        }
        let limit = if self.shared.authenticated.load(Ordering::Relaxed) {
            frontend::max_len(tag)
        } else {
            MAX_PRE_AUTH_MESSAGE
        };
        let header = match frame(data, limit) {
            Err(e) => return Err(Stop::protocol_violation(e)),
            Ok(None) => return Ok(Step::Need(FrameHeader::SIZE)),
            Ok(Some(h)) => h,
        };
        use frontend::tag::*;
        if matches!(tag, PARSE | BIND | EXECUTE) && self.must_wait() {
            return Ok(Step::Wait);
        }
        match tag {
            QUERY | PARSE | FUNCTION_CALL => {
                check_recording(self.ctx)?;
                if header.len > MAX_INSPECTED_MESSAGE {
                    return Err(Stop::client_fault(
                        PROGRAM_LIMIT_EXCEEDED,
                        format!(
                            "tollgate: a {} message of {} bytes exceeds the {MAX_INSPECTED_MESSAGE}-byte limit of statements the proxy analyses",
                            message_name(tag),
                            header.len
                        ),
                    ));
                }
                let Some(body) = header.body(data) else {
                    return Ok(Step::Need(header.len));
                };
                let reading = self.reading();
                if matches!(reading, Reading::Wait) {
                    return Ok(Step::Wait);
                }
                if tag != PARSE && self.batch_open.get() {
                    return Err(Stop::client_fault(
                        sqlstate::PROTOCOL_VIOLATION,
                        format!(
                            "tollgate: a {} inside an extended-protocol batch with a masked statement, before its Sync, cannot be told apart from the batch's answers; the session is closed",
                            message_name(tag)
                        ),
                    ));
                }
                let decided = match reading {
                    Reading::Refuse => {
                        tracing::warn!(session = %self.ctx.id, "refused: text sent behind an unanswered statement that may change how the server reads it");
                        Some(READING_CHANGED.to_owned())
                    }
                    _ => self.decide(tag, body)?,
                };
                if tag == PARSE {
                    self.extended_open.set(true);
                    self.expect(Expect::Complete)?;
                } else {
                    self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
                    self.shared.prepared().batch_sent();
                }
                match decided {
                    None if self.mask_plan.get_mut().is_some() => {
                        self.masked_query(body);
                        Ok(Step::Replace(header.len))
                    }
                    None if !self.prefix.get_mut().is_empty() => {
                        self.prefixed(data, header.len);
                        Ok(Step::Replace(header.len))
                    }
                    None => Ok(Step::Forward(header.len)),
                    Some(refusal) => {
                        self.substitute(tag, body, refusal)?;
                        // A lookup that opened a batch still goes first:
                        // the upstream pump expects its answer.
                        let prefix = std::mem::take(self.prefix.get_mut());
                        self.out.splice(0..0, prefix);
                        Ok(Step::Replace(header.len))
                    }
                }
            }
            SYNC => {
                if header.message(data).is_none() {
                    return Ok(Step::Need(header.len));
                }
                self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
                self.shared.prepared().batch_sent();
                if self.copy_open.get() {
                    self.shared.copy_syncs.fetch_add(1, Ordering::Relaxed);
                }
                self.extended_open.set(false);
                self.expect(Expect::Sync)?;
                self.batch_open.set(false);
                self.waited.set(false);
                Ok(Step::Forward(header.len))
            }
            DESCRIBE => {
                let Some(body) = header.body(data) else {
                    return Ok(Step::Need(header.len));
                };
                self.extended_open.set(true);
                let kind = Reader::new("Describe", body)
                    .get_u8("kind")
                    .map_err(Stop::protocol_violation)?;
                self.expect(if kind == b'S' {
                    Expect::DescribeStatement
                } else {
                    Expect::DescribePortal(None)
                })?;
                Ok(Step::Forward(header.len))
            }
            FLUSH => {
                if header.message(data).is_none() {
                    return Ok(Step::Need(header.len));
                }
                // A Flush asks the server to send what it has; it creates
                // nothing to answer, so it neither opens a batch nor makes
                // one pipelined (psycopg ends every pipeline and
                // `executemany` with Sync then Flush).
                Ok(Step::Forward(header.len))
            }
            BIND => {
                check_recording(self.ctx)?;
                let step = self.bind(data, header)?;
                // After the Bind: a masked one may open a batch, which
                // only a batch's first message can.
                if !matches!(step, Step::Need(_)) {
                    self.extended_open.set(true);
                }
                Ok(step)
            }
            EXECUTE | CLOSE => {
                if tag == EXECUTE {
                    check_recording(self.ctx)?;
                }
                let Some(body) = header.body(data) else {
                    return Ok(Step::Need(header.len));
                };
                if tag == CLOSE {
                    self.extended_open.set(true);
                    let mut r = Reader::new("Close", body);
                    let kind = r.get_u8("kind").map_err(Stop::protocol_violation)?;
                    let name = r.get_cstr_bytes("name").map_err(Stop::protocol_violation)?;
                    self.shared.prepared().close_sent(kind, name);
                    self.expect(Expect::Complete)?;
                    return Ok(Step::Forward(header.len));
                }
                let portal = Reader::new("Execute", body)
                    .get_cstr_bytes("portal name")
                    .map_err(Stop::protocol_violation)?;
                let step = self.execute(data, portal, header.len)?;
                self.extended_open.set(true);
                Ok(step)
            }
            COPY_DONE | COPY_FAIL => {
                self.copy_open.set(false);
                let n = header.len.min(data.len());
                self.streaming = header.len - n;
                Ok(Step::Forward(n))
            }
            TERMINATE => match header.message(data) {
                Some(_) => Ok(Step::Last(header.len)),
                None => Ok(Step::Need(header.len)),
            },
            _ => {
                let n = header.len.min(data.len());
                self.streaming = header.len - n;
                Ok(Step::Forward(n))
            }
        }
    }

    /// Decides a Query, Parse or FunctionCall; `Some(message)` when refused.
    fn decide(&self, tag: u8, body: &[u8]) -> Result<Option<String>, Stop> {
        use frontend::tag::*;
        self.server_reads_refused.set(false);
        let mut r = Reader::new(message_name(tag), body);
        let text: &[u8];
        let owned;
        let mut statement_name: &[u8] = b"";
        let mut fast_path = None;
        match tag {
            QUERY => {
                text = r
                    .get_cstr_bytes("query string")
                    .map_err(Stop::protocol_violation)?;
                r.finish().map_err(Stop::protocol_violation)?;
            }
            PARSE => {
                statement_name = r
                    .get_cstr_bytes("statement name")
                    .map_err(Stop::protocol_violation)?;
                text = r
                    .get_cstr_bytes("query string")
                    .map_err(Stop::protocol_violation)?;
            }
            _ => {
                let oid = r
                    .get_u32("function oid")
                    .map_err(Stop::protocol_violation)?;
                fast_path = fastpath::builtin_function(oid).map(|name| (name, oid));
                owned = match fast_path {
                    Some((name, oid)) => fastpath::text(name, oid),
                    None => format!("FunctionCall oid {oid}"),
                };
                text = owned.as_bytes();
            }
        }
        let (text, analysis) = match fast_path {
            // A built-in the catalog numbers the same in every version:
            // decided as a call of the function it names.
            Some((name, oid)) => {
                let text = fastpath::text(name, oid);
                let analysis = Arc::new(crate::sql::function_call(name, &text));
                (std::borrow::Cow::Owned(text), analysis)
            }
            None => self.analyse(text),
        };
        let policy = current_policy(&self.ctx.policy);
        let ops = prepared::sql_ops(&analysis);
        let prepares_reserved = ops.iter().any(|(op, _)| match op {
            SqlOp::Prepare(name) => name.starts_with(RESERVED_STATEMENT_PREFIX),
            _ => false,
        });
        if prepares_reserved || statement_name.starts_with(RESERVED_STATEMENT_PREFIX) {
            // Another statement under the prepared lookup's name would
            // answer for it (see `mask::PreparedLookup`).
            tracing::warn!(session = %self.ctx.id, "refused: a statement prepared under a name reserved for masking");
            return Ok(Some(RESERVED_STATEMENT_NAME.to_owned()));
        }
        // A FunctionCall's result is not masked.
        let unmaskable = (tag == FUNCTION_CALL).then_some(MASK_EXTENDED);
        let mut refusal =
            self.decide_with_executed(&policy, &text, &analysis, &ops, None, unmaskable);
        if refusal.is_some() {
            self.mask_plan.take();
        }
        // A masked Parse opens (or joins) a masked batch.
        let mut mask = None;
        if tag == PARSE && refusal.is_none() {
            if let Some(plan) = self.mask_plan.take() {
                let plan = Arc::new(plan);
                refusal = self.join_batch(&plan);
                mask = Some(plan);
            }
        }
        if tag != PARSE && refusal.is_none() {
            // A Query runs now, and a FunctionCall (unknown effect) too.
            self.note_reading_change(&analysis);
            self.note_copy_in(&analysis);
        }
        if tag == QUERY && refusal.is_none() && !ops.is_empty() {
            let refusal = self.sql_sent(&policy, &ops);
            if refusal.is_some() {
                self.mask_plan.take();
            }
            return Ok(refusal);
        }
        if tag == PARSE && refusal.is_none() {
            let mut prepared = self.shared.prepared();
            if !prepared.has_room() {
                return Ok(Some(too_many_prepared()));
            }
            let name = Reader::new("Parse", body)
                .get_cstr_bytes("statement name")
                .map_err(Stop::protocol_violation)?;
            prepared.parse_sent(
                name,
                Decided {
                    text: Arc::from(&*text),
                    analysis,
                    policy: Arc::downgrade(&policy),
                    mask,
                },
            );
        }
        Ok(refusal)
    }

    /// Decides a prepared statement again (a reload since it was decided):
    /// refused where it now needs masking, which a Bind cannot add.
    fn decide_prepared_again(
        &self,
        policy: &Arc<crate::policy::PolicySet>,
        decided: &Decided,
        ops: &[(SqlOp, &crate::sql::StatementSummary)],
    ) -> Option<String> {
        self.decide_with_executed(
            policy,
            &decided.text,
            &decided.analysis,
            ops,
            None,
            Some(MASK_EXTENDED),
        )
    }

    /// Decides analysed text under `policy` and reports the decisions;
    /// `Some(message for the client)` when refused, naming `label` (when
    /// given) rather than the refused statement's command. `unmaskable`:
    /// why the result cannot be masked, `None` for a fresh Query or Parse,
    /// whose result can.
    fn decide_labelled(
        &self,
        policy: &crate::policy::PolicySet,
        text: &str,
        analysis: &Analysis,
        label: Option<&str>,
        unmaskable: Option<&'static str>,
    ) -> Option<String> {
        let decisions =
            self.memo
                .borrow_mut()
                .decide(policy, &self.ctx.target, self.identity, text, analysis);
        let top = most_restrictive(&decisions);
        if top.is_some_and(|d| d.action == Action::Mask) {
            let refusal = self.plan_mask(&decisions, analysis, label, unmaskable);
            self.report(text, analysis, &decisions, refusal.is_some());
            return refusal;
        }
        self.report(text, analysis, &decisions, false);
        let top = top.filter(|d| d.action.is_refused())?;
        let command = match (label, analysis) {
            (Some(label), _) => label,
            (None, Analysis::Parsed { statements }) => decisions
                .iter()
                .position(|d| std::ptr::eq(d, top))
                .and_then(|i| statements.get(i))
                .map_or(UNPARSABLE_COMMAND, |s| &*s.command),
            (None, Analysis::Unparsable { .. }) => UNPARSABLE_COMMAND,
        };
        // No rule refused it, only the default for text the analysis could
        // not read: the client gets the server's own syntax error where the
        // server has one.
        self.server_reads_refused.set(
            label.is_none()
                && matches!(analysis, Analysis::Unparsable { .. })
                && top.deciding_rule().is_none(),
        );
        tracing::debug!(
            session = %self.ctx.id,
            transaction_status = %char::from(self.shared.tx_status.load(Ordering::Relaxed)),
            "substituting a failing message for a refused statement"
        );
        Some(top.client_message(command))
    }

    /// A message with statements a `mask` rule applies to: in a fresh
    /// Query or Parse (`unmaskable` is `None`) whose masked statements are
    /// all queries that write nothing, the plan for its answer is kept in
    /// `mask_plan`; anything else is refused, saying why (`label` names an
    /// `EXECUTE`).
    fn plan_mask(
        &self,
        decisions: &[Decision],
        analysis: &Analysis,
        label: Option<&str>,
        unmaskable: Option<&'static str>,
    ) -> Option<String> {
        let statements = match analysis {
            Analysis::Parsed { statements } => statements.as_slice(),
            Analysis::Unparsable { .. } => &[],
        };
        let mut plan = MaskPlan {
            rules: Vec::new(),
            statements: Vec::with_capacity(decisions.len()),
            relations: Vec::new(),
            only_first: decisions.iter().skip(1).all(|d| d.action != Action::Mask),
        };
        for (i, decision) in decisions.iter().enumerate() {
            if decision.action != Action::Mask {
                plan.statements.push(None);
                continue;
            }
            let statement = statements.get(i);
            let command = label
                .or(statement.map(|s| &*s.command))
                .unwrap_or(UNPARSABLE_COMMAND);
            let why = decision
                .mask_obstacle(statement)
                .or(unmaskable.map(std::borrow::Cow::Borrowed));
            if let Some(why) = why {
                return Some(decision.mask_refused_message(command, &why));
            }
            for table in statement.iter().flat_map(|s| &s.tables_read) {
                if !plan.relations.contains(table) {
                    plan.relations.push(table.clone());
                }
            }
            for rule in decision
                .matched
                .iter()
                .filter(|r| r.action == Action::Mask)
                .filter_map(|r| r.mask.as_ref())
            {
                if !plan.rules.iter().any(|known| Arc::ptr_eq(known, rule)) {
                    plan.rules.push(Arc::clone(rule));
                }
            }
            // A computed field is masked, with the strictest method of the
            // rules whose columns the statement's expressions may read (all
            // of them when its text cannot be walked).
            let refs =
                statement.and_then(|s| self.ctx.analysis.column_refs(&s.text, self.text_reading()));
            let computed = decision
                .mask_rules()
                .filter(|rule| {
                    let names: Vec<&str> = rule.columns.iter().map(|c| &*c.column).collect();
                    refs.as_ref().is_none_or(|r| r.may_read(&names))
                })
                .map(|rule| rule.with)
                .max();
            plan.statements.push(computed);
        }
        *self.mask_plan.borrow_mut() = Some(plan);
        None
    }

    /// Replaces the Query `body` in `out` by the same text with the masking
    /// lookup of `mask_plan` in front.
    fn masked_query(&mut self, body: &[u8]) {
        let Some(plan) = self.mask_plan.get_mut().take() else {
            return;
        };
        let text = body.strip_suffix(&[0]).unwrap_or(body);
        // This Query is counted in `in_flight` already.
        let alone = !self.extended_open.get() && self.shared.in_flight.load(Ordering::Relaxed) == 1;
        let lookup = self.shared.register_mask(plan, alone);
        self.out.clear();
        let mut w = MessageWriter::new(&mut self.out, frontend::tag::QUERY);
        w.put_bytes(lookup.as_bytes()).put_cstr_bytes(text);
        w.finish();
        tracing::debug!(session = %self.ctx.id, "a masked Query: the masking lookup goes in front of it");
    }

    /// Whether text arriving now can be analysed under the settings the
    /// server reported, must wait for its answer to a statement that may
    /// change them, or is refused (sent in the same batch as that
    /// statement, which the server answers only at Sync, or the wait
    /// timed out).
    fn reading(&self) -> Reading {
        let Some(batch) = self.reading_changed.get() else {
            return Reading::Settled;
        };
        let (sent, answered) = self.shared.prepared().batches();
        if answered > batch {
            self.reading_changed.set(None);
            self.reading_waited.set(false);
            if self.shared.tx_status.load(Ordering::Relaxed) == b'I' {
                self.reading_changed_in_block.set(false);
            }
            return Reading::Settled;
        }
        if sent == batch || self.reading_waited.get() {
            return Reading::Refuse;
        }
        Reading::Wait
    }

    /// Records that `analysis` is about to run, if it may change how the
    /// server reads later text.
    fn note_reading_change(&self, analysis: &Analysis) {
        let in_block = self.reading_changed_in_block.get();
        if super::reading::may_change_reading(analysis, in_block) {
            let (sent, _) = self.shared.prepared().batches();
            self.reading_changed.set(Some(sent));
            self.reading_changed_in_block.set(true);
        }
    }

    /// Records that `analysis` is about to run, if it holds a COPY into a
    /// table (FROM STDIN, whose Syncs the server may ignore).
    fn note_copy_in(&self, analysis: &Analysis) {
        let Analysis::Parsed { statements } = analysis else {
            return;
        };
        if statements
            .iter()
            .any(|s| s.kind == crate::sql::StatementKind::Copy && !s.tables_written.is_empty())
        {
            self.copy_open.set(true);
        }
    }

    /// Whether the message about to be stepped starts an extended-protocol
    /// batch while answers are still in flight, under a policy that masks:
    /// it waits for them, since a masked statement can open a batch only
    /// when the server's next answer is known to be its lookup's. (Waiting
    /// for every batch start, not only masked ones, keeps the decision from
    /// being made, and reported, twice.)
    fn must_wait(&self) -> bool {
        !self.extended_open.get()
            && !self.batch_open.get()
            && !self.waited.get()
            && self.shared.in_flight.load(Ordering::Relaxed) > 0
            && current_policy(&self.ctx.policy).masks_target(&self.ctx.target)
    }

    /// Tells the upstream pump what the message being forwarded will be
    /// answered with, when a masked batch is open.
    fn expect(&self, answer: Expect) -> Result<(), Stop> {
        if !self.batch_open.get() {
            return Ok(());
        }
        let room = self
            .shared
            .batch()
            .as_mut()
            .is_none_or(|batch| batch.expect(answer));
        if room {
            return Ok(());
        }
        Err(Stop::client_fault(
            PROGRAM_LIMIT_EXCEEDED,
            format!(
                "tollgate: more than {} messages in one batch with a masked statement",
                super::mask::MAX_EXPECTED
            ),
        ))
    }

    /// A message of an extended-protocol statement a `mask` rule applies
    /// to (`plan`): it joins the open masked batch if that batch's lookup
    /// covers it, or opens one when nothing is in flight (the lookup goes
    /// into `prefix`, in front of the message); `Some(message)` refuses it.
    fn join_batch(&self, plan: &Arc<MaskPlan>) -> Option<String> {
        if self.batch_open.get() {
            let batch = self.shared.batch();
            let covered = batch.as_ref().is_some_and(|b| {
                let known = b.plan();
                let tables = known.table_names();
                plan.relations
                    .iter()
                    .all(|r| tables.contains(&r.name.as_str()))
                    && plan
                        .rules
                        .iter()
                        .all(|r| known.rules.iter().any(|k| Arc::ptr_eq(k, r)))
            });
            return (!covered).then(|| MASK_PIPELINED.to_owned());
        }
        if self.extended_open.get() || self.shared.in_flight.load(Ordering::Relaxed) > 0 {
            return Some(MASK_PIPELINED.to_owned());
        }
        let n = self.shared.next_mask.fetch_add(1, Ordering::Relaxed);
        // Messages of the batch may run between the lookup and a masked
        // statement's parse (a `SET search_path`, another Bind): every schema.
        let sql = plan.lookup_sql(
            &format!("{}{n}", self.shared.mask_marker),
            LookupScope::EverySchema,
        );
        let mut prefix = self.prefix.borrow_mut();
        prefix.clear();
        let mut w = MessageWriter::new(&mut prefix, frontend::tag::QUERY);
        w.put_cstr(&sql);
        w.finish();
        *self.shared.batch() = Some(ExtendedBatch::new(Arc::clone(plan)));
        self.shared.batch_active.store(true, Ordering::Relaxed);
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        self.batch_open.set(true);
        tracing::debug!(session = %self.ctx.id, "a masked batch: the masking lookup goes in front of it");
        None
    }

    /// Replaces the message (`len` bytes of `data`) by `prefix` and itself.
    fn prefixed(&mut self, data: &[u8], len: usize) {
        self.out.clear();
        self.out.append(self.prefix.get_mut());
        self.out
            .extend_from_slice(data.get(..len).unwrap_or_default());
    }

    /// Decides analysed text (its prepared-statement operations `ops`)
    /// under `policy`, then, every time, each named statement it
    /// `EXECUTE`s by that statement's own analysis (a refusal names
    /// `EXECUTE`); `Some(message)` when refused. A lone `EXECUTE` of a
    /// masked statement adds that statement's masking to `mask_plan` at the
    /// `EXECUTE`'s place (its rows are the statement's rows); under
    /// `EXPLAIN` or `CREATE TABLE ... AS` it is refused. An `EXECUTE` of a
    /// name the session never saw prepared fails closed when any rule
    /// could apply. `via` is the `EXECUTE` that runs the text, if one does
    /// (its refusals name that `EXECUTE`).
    fn decide_with_executed(
        &self,
        policy: &Arc<crate::policy::PolicySet>,
        text: &str,
        analysis: &Analysis,
        ops: &[(SqlOp, &crate::sql::StatementSummary)],
        via: Option<Executed<'_>>,
        unmaskable: Option<&'static str>,
    ) -> Option<String> {
        let (label, depth) = via.map_or((None, 0), |v| (Some(v.label), v.depth));
        if let Some(refusal) = self.decide_labelled(policy, text, analysis, label, unmaskable) {
            return Some(refusal);
        }
        let statements = match analysis {
            Analysis::Parsed { statements } => statements.as_slice(),
            Analysis::Unparsable { .. } => &[],
        };
        // The text's own masking; the executed statements' is added to it.
        let mut plan = self.mask_plan.borrow_mut().take();
        for (i, (op, statement)) in ops.iter().enumerate() {
            let SqlOp::Execute(name) = op else {
                continue;
            };
            // Prepared earlier in the same text (and decided with it), or
            // deallocated there (the server fails the EXECUTE): the server
            // stops a Query at its first error, so nothing older runs.
            let replaced = ops.iter().take(i).any(|(earlier, _)| match earlier {
                SqlOp::Prepare(n) | SqlOp::Deallocate(n) => n == name,
                SqlOp::DeallocateAll => true,
                SqlOp::Execute(_) => false,
            });
            if replaced {
                continue;
            }
            let shown = String::from_utf8_lossy(name);
            let candidates = self.shared.prepared().candidates(name);
            if candidates.is_empty() {
                // With no rule, the default decides every statement alike,
                // and it decided this one above.
                if policy.rule_count() == 0 {
                    continue;
                }
                tracing::warn!(session = %self.ctx.id, statement = %shown, "refused: EXECUTE of a prepared statement the session did not see prepared");
                return Some(format!("tollgate: EXECUTE of prepared statement \"{shown}\" refused: it was not prepared through the proxy in this session (it does not exist, or a function or DO block prepared it), so what it runs cannot be decided"));
            }
            if depth >= MAX_EXECUTE_DEPTH {
                return Some(format!("tollgate: EXECUTE of prepared statement \"{shown}\" refused: it runs EXECUTEs nested deeper than {MAX_EXECUTE_DEPTH}"));
            }
            // A lone EXECUTE returns the statement's rows, which can be
            // masked; under EXPLAIN or CREATE TABLE AS they go elsewhere.
            let lone = statement.kind == crate::sql::StatementKind::Prepared;
            let (label, why) = if lone {
                ("EXECUTE".to_owned(), unmaskable)
            } else {
                (
                    format!("{} EXECUTE", statement.command),
                    Some(MASK_EXECUTE_WRAPPED),
                )
            };
            let at = statements.iter().position(|s| std::ptr::eq(s, *statement));
            for decided in candidates {
                let inner_ops = prepared::sql_ops(&decided.analysis);
                let refusal = self.decide_with_executed(
                    policy,
                    &decided.text,
                    &decided.analysis,
                    &inner_ops,
                    Some(Executed {
                        label: &label,
                        depth: depth.saturating_add(1),
                    }),
                    why,
                );
                let executed_plan = self.mask_plan.borrow_mut().take();
                if let Some(refusal) = refusal {
                    return Some(refusal);
                }
                if let (Some(executed_plan), Some(at)) = (executed_plan, at) {
                    merge_executed_plan(&mut plan, statements.len(), at, executed_plan);
                }
            }
        }
        *self.mask_plan.borrow_mut() = plan;
        None
    }

    /// The statement a SQL `PREPARE` prepares, as an `EXECUTE` of it will
    /// be decided: the analysis of the statement after its `AS` (a query
    /// that an `EXECUTE` alone returns rows of, and masking can mask), or,
    /// when that cannot be had, the `PREPARE` itself (kind `prepared`, with
    /// the tables and flags of what it prepares, which masking refuses).
    fn sql_prepared(&self, statement: &crate::sql::StatementSummary) -> Decided {
        let whole = || Decided {
            text: Arc::from(statement.text.as_str()),
            analysis: Arc::new(Analysis::Parsed {
                statements: vec![statement.clone()],
            }),
            policy: std::sync::Weak::new(),
            mask: None,
        };
        let Some(query) = prepared::prepared_query_text(&statement.text) else {
            return whole();
        };
        let analysis = self.ctx.analysis.analyze_read(query, self.text_reading());
        match &*analysis {
            Analysis::Parsed { statements } if statements.len() == 1 => Decided {
                text: Arc::from(query),
                analysis,
                policy: std::sync::Weak::new(),
                mask: None,
            },
            _ => whole(),
        }
    }

    /// Tracks the SQL `PREPARE`s and `DEALLOCATE`s of allowed text about to
    /// be forwarded to run; `Some(message)` when its `PREPARE`s would go
    /// past [`MAX_TRACKED`] (a `DEALLOCATE` is never refused for room: it
    /// is how a client makes some).
    fn sql_sent(
        &self,
        policy: &Arc<crate::policy::PolicySet>,
        ops: &[(SqlOp, &crate::sql::StatementSummary)],
    ) -> Option<String> {
        let mut prepared = self.shared.prepared();
        let prepares = ops
            .iter()
            .filter(|(op, _)| matches!(op, SqlOp::Prepare(_)))
            .count();
        if prepares > 0 && !prepared.has_room_for(prepares) {
            return Some(too_many_prepared());
        }
        for (op, statement) in ops {
            match op {
                SqlOp::Prepare(name) => prepared.prepare_sent(
                    name,
                    Decided {
                        policy: Arc::downgrade(policy),
                        mask: None,
                        ..self.sql_prepared(statement)
                    },
                ),
                SqlOp::Deallocate(name) => prepared.deallocate_sent(name),
                SqlOp::Execute(_) | SqlOp::DeallocateAll => {}
            }
        }
        None
    }

    /// A Bind: forwarded as it is, unless the statement it binds was allowed
    /// under an earlier policy and the current one refuses it; then it is
    /// replaced by a Bind of a statement that does not exist, which the
    /// server fails like the refused one, discarding up to Sync.
    fn bind(&mut self, data: &[u8], header: FrameHeader) -> Result<Step, Stop> {
        // The portal and statement names come first; the parameters, which
        // can be large, are passed through unless the Bind is replaced.
        let here = data
            .get(FrameHeader::SIZE..header.len.min(data.len()))
            .unwrap_or_default();
        let mut nuls = here
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == 0)
            .map(|(i, _)| i);
        let (Some(portal_end), Some(statement_end)) = (nuls.next(), nuls.next()) else {
            if here.len() + FrameHeader::SIZE >= header.len {
                return Err(Stop::protocol_violation(
                    "Bind: the portal and statement names are not terminated",
                ));
            }
            if here.len() >= MAX_BIND_NAMES {
                return Err(Stop::client_fault(
                    PROGRAM_LIMIT_EXCEEDED,
                    format!("tollgate: Bind names longer than {MAX_BIND_NAMES} bytes"),
                ));
            }
            return Ok(Step::Need(
                header.len.min(FrameHeader::SIZE + MAX_BIND_NAMES),
            ));
        };
        let portal = here.get(..portal_end).unwrap_or_default();
        let statement = here.get(portal_end + 1..statement_end).unwrap_or_default();
        let policy = current_policy(&self.ctx.policy);
        if self.shared.prepared().redefined_earlier(statement) {
            // Which statement this binds is known once that is answered.
            if !self.waited.get() {
                return Ok(Step::Wait);
            }
            let shown = String::from_utf8_lossy(statement);
            let refusal = format!("tollgate: Bind of prepared statement \"{shown}\" refused: a Parse or PREPARE of that name is still unanswered by the server, so which statement it binds is not known; send the Bind after that answer");
            return self.replace_bind(data, header, portal, refusal);
        }
        let known = self.shared.prepared().statement(statement).cloned();
        let forward = |side: &mut Self| {
            let n = header.len.min(data.len());
            side.streaming = header.len - n;
            Ok(Step::Forward(n))
        };
        let Some(mut decided) = known else {
            // Not prepared in a way this session saw (a Parse, or a SQL
            // PREPARE of its own): absent (the server's error), or prepared
            // by a function or DO block, which nothing decided. With no
            // rule, the default decides every statement alike.
            if policy.rule_count() == 0 {
                self.expect(Expect::Complete)?;
                return forward(self);
            }
            let shown = String::from_utf8_lossy(statement);
            tracing::warn!(session = %self.ctx.id, statement = %shown, "refused: Bind of a prepared statement the session did not see prepared");
            let refusal = format!("tollgate: Bind of prepared statement \"{shown}\" refused: it was not prepared through the proxy in this session (it does not exist, or a function or DO block prepared it), so what it runs cannot be decided");
            return self.replace_bind(data, header, portal, refusal);
        };
        if !self.shared.prepared().has_room() {
            return self.replace_bind(data, header, portal, too_many_prepared());
        }
        if decided.is_stale(&policy) {
            // Decide once the whole message is here, so that a refused one
            // can be replaced (the decision is reported once).
            if let Some(step) =
                hold_whole_bind(header, data, "a statement the new policy must decide again")
            {
                return step;
            }
            let ops = prepared::sql_ops(&decided.analysis);
            let refusal = self.decide_prepared_again(&policy, &decided, &ops);
            if let Some(refusal) = refusal {
                return self.replace_bind(data, header, portal, refusal);
            }
            self.shared
                .prepared()
                .reallowed_statement(statement, &policy);
            decided.policy = Arc::downgrade(&policy);
        }
        if let Some(plan) = decided.mask.clone().filter(|_| !self.batch_open.get()) {
            // A batch opens here: the lookup goes in front of the whole Bind.
            if let Some(step) = hold_whole_bind(header, data, "a statement that requires masking") {
                return step;
            }
            if let Some(refusal) = self.join_batch(&plan) {
                return self.replace_bind(data, header, portal, refusal);
            }
            self.expect(Expect::Complete)?;
            self.shared.prepared().bind_sent(portal, decided);
            self.prefixed(data, header.len);
            return Ok(Step::Replace(header.len));
        }
        if let Some(plan) = &decided.mask {
            if let Some(refusal) = self.join_batch(plan) {
                return self.replace_bind(data, header, portal, refusal);
            }
        }
        self.expect(Expect::Complete)?;
        self.shared.prepared().bind_sent(portal, decided);
        forward(self)
    }

    fn replace_bind(
        &mut self,
        data: &[u8],
        header: FrameHeader,
        portal: &[u8],
        refusal: String,
    ) -> Result<Step, Stop> {
        if header.len > data.len() {
            return Ok(Step::Need(header.len));
        }
        self.expect(Expect::Complete)?;
        let missing = self.shared.register_denial(refusal);
        self.out.clear();
        let mut w = MessageWriter::new(&mut self.out, frontend::tag::BIND);
        w.put_cstr_bytes(portal)
            .put_cstr(&missing)
            .put_i16(0)
            .put_i16(0)
            .put_i16(0);
        w.finish();
        Ok(Step::Replace(header.len))
    }

    /// An Execute (whole): forwarded, unless its portal's statement was
    /// allowed under an earlier policy and the current one refuses it; then
    /// it is replaced by an Execute of a portal that does not exist. A SQL
    /// `PREPARE` or `DEALLOCATE` in the portal is tracked from here, where
    /// it runs.
    fn execute(&mut self, data: &[u8], portal: &[u8], len: usize) -> Result<Step, Stop> {
        let policy = current_policy(&self.ctx.policy);
        let Some(decided) = self.shared.prepared().portal(portal).cloned() else {
            self.expect(Expect::Execute(None))?;
            return Ok(Step::Forward(len));
        };
        let ops = prepared::sql_ops(&decided.analysis);
        // A SQL EXECUTE runs whatever the name holds now: decided every
        // time, as the statement it runs.
        let executes = ops.iter().any(|(op, _)| matches!(op, SqlOp::Execute(_)));
        let refusal = if executes {
            self.decide_portal_execute(&policy, &decided, &ops)
        } else if decided.is_stale(&policy) {
            self.decide_prepared_again(&policy, &decided, &ops)
        } else {
            None
        };
        if refusal.is_none() && decided.is_stale(&policy) {
            self.shared.prepared().reallowed_portal(portal, &policy);
        }
        // A PREPARE or DEALLOCATE sent by Parse runs here.
        let refusal = match refusal {
            None if !ops.is_empty() => self.sql_sent(&policy, &ops),
            refusal => refusal,
        };
        // A masked portal: the proxy's Describe of it goes in front, so
        // that the rows' fields are known (behind the lookup when a batch
        // opens here).
        let refusal = match (refusal, &decided.mask) {
            (None, Some(plan)) => self.join_batch(plan),
            (refusal, _) => refusal,
        };
        if refusal.is_none() {
            self.note_reading_change(&decided.analysis);
            self.note_copy_in(&decided.analysis);
        }
        match (refusal, &decided.mask) {
            (None, None) => {
                self.expect(Expect::Execute(None))?;
                Ok(Step::Forward(len))
            }
            (None, Some(plan)) => {
                let computed = plan.statements.first().copied().flatten();
                self.expect(Expect::DescribePortal(Some(computed)))?;
                self.expect(Expect::Execute(None))?;
                let mut describe = std::mem::take(self.prefix.get_mut());
                let mut w = MessageWriter::new(&mut describe, frontend::tag::DESCRIBE);
                w.put_u8(b'P').put_cstr_bytes(portal);
                w.finish();
                *self.prefix.get_mut() = describe;
                self.prefixed(data, len);
                Ok(Step::Replace(len))
            }
            (Some(refusal), _) => {
                self.expect(Expect::Execute(None))?;
                let missing = self.shared.register_denial(refusal);
                self.out.clear();
                let mut w = MessageWriter::new(&mut self.out, frontend::tag::EXECUTE);
                w.put_cstr(&missing).put_i32(0);
                w.finish();
                Ok(Step::Replace(len))
            }
        }
    }

    /// Decides a portal whose statement is a SQL `EXECUTE` (`ops`), as it
    /// runs now: a result to mask is masked only when the plan made at
    /// its Parse (which its Describe and the batch's lookup follow) covers
    /// what it needs now; `Some(message)` when refused.
    fn decide_portal_execute(
        &self,
        policy: &Arc<crate::policy::PolicySet>,
        decided: &Decided,
        ops: &[(SqlOp, &crate::sql::StatementSummary)],
    ) -> Option<String> {
        let unmaskable = decided.mask.is_none().then_some(MASK_EXECUTE_CHANGED);
        let refusal = self.decide_with_executed(
            policy,
            &decided.text,
            &decided.analysis,
            ops,
            None,
            unmaskable,
        );
        let needed = self.mask_plan.borrow_mut().take();
        refusal.or_else(|| match (needed, &decided.mask) {
            (Some(needed), Some(known)) if !covers(known, &needed) => {
                Some(format!("tollgate: EXECUTE refused: {MASK_EXECUTE_CHANGED}"))
            }
            _ => None,
        })
    }

    /// The analysis of statement bytes, failing closed on what cannot be
    /// read as the analyser reads it.
    fn analyse<'t>(&self, text: &'t [u8]) -> (std::borrow::Cow<'t, str>, Arc<Analysis>) {
        let unparsable = |text: std::borrow::Cow<'t, str>, error: &str| {
            let analysis = Arc::new(Analysis::Unparsable {
                error: error.to_owned(),
            });
            (text, analysis)
        };
        let encoding = self.shared.client_encoding.load(Ordering::Relaxed);
        let text: std::borrow::Cow<'t, str> = if encoding == ENCODING_LATIN1 && !text.is_ascii() {
            text.iter()
                .map(|&b| char::from(b))
                .collect::<String>()
                .into()
        } else {
            match std::str::from_utf8(text) {
                Ok(text) => text.into(),
                Err(_) if encoding == ENCODING_UTF8 => {
                    return unparsable(
                        String::from_utf8_lossy(text),
                        "the statement text is not valid UTF-8",
                    )
                }
                Err(_) => String::from_utf8_lossy(text),
            }
        };
        if encoding == ENCODING_OTHER && !text.is_ascii() {
            return unparsable(
                text,
                "client_encoding is neither UTF8 nor LATIN1 and the text is not ASCII; the analysis reads UTF-8 and LATIN1 only",
            );
        }
        let analysis = self.ctx.analysis.analyze_read(&text, self.text_reading());
        (text, analysis)
    }

    /// How the server reads backslashes in plain literals now, as it last
    /// reported (a change in flight makes later text wait: `reading.rs`).
    fn text_reading(&self) -> LiteralReading {
        if self.shared.backslash_escapes.load(Ordering::Relaxed) {
            LiteralReading::BackslashEscapes
        } else {
            LiteralReading::Standard
        }
    }

    /// One Statement event per decided statement.
    /// Reports each statement's decision (`mask_refused`: the message's
    /// `mask` statements cannot be masked, so they do not run) and counts
    /// it.
    fn report(&self, text: &str, analysis: &Analysis, decisions: &[Decision], mask_refused: bool) {
        let session = self.ctx.id;
        let event =
            |text: &str, command: Arc<str>, kind, fingerprint: Option<Arc<str>>, d: &Decision| {
                self.ctx.target_metrics.statement(d.action);
                SessionEvent::Statement(Arc::new(StatementEvent {
                    session,
                    text: text.to_owned(),
                    command,
                    kind,
                    fingerprint,
                    action: d.action,
                    refused: d.action.is_refused() || (mask_refused && d.action == Action::Mask),
                    rule: d.deciding_rule().map(|r| Arc::clone(&r.name)),
                    rules: d.matched.iter().map(|r| Arc::clone(&r.name)).collect(),
                    reason: Arc::clone(&d.reason),
                }))
            };
        match analysis {
            Analysis::Parsed { statements } => {
                for (s, d) in statements.iter().zip(decisions) {
                    self.ctx.events.emit(&event(
                        &s.text,
                        Arc::clone(&s.command),
                        Some(s.kind),
                        Some(Arc::clone(&s.fingerprint)),
                        d,
                    ));
                }
            }
            Analysis::Unparsable { .. } => {
                for d in decisions {
                    self.ctx.events.emit(&event(
                        text,
                        Arc::from(UNPARSABLE_COMMAND),
                        None,
                        None,
                        d,
                    ));
                }
            }
        }
    }

    /// Writes the substitute of a refused message into `out`.
    ///
    /// The substitute fails on the server with an error that quotes a
    /// marker, which the upstream pump replaces by `refusal`. For text the
    /// analysis could not parse and no rule refused, the substitute is the
    /// client's own text followed by [`unparsable_guard`]: the server parses
    /// a whole message before it runs any of it, so either the client's
    /// text has a syntax error of its own, which the server reports as it
    /// would have (message, SQLSTATE and position, so psql prints the same
    /// `LINE 1: ... ^`), or the server reaches the guard, which cannot
    /// parse, and its error quotes the marker. Nothing of the text runs
    /// either way.
    fn substitute(&mut self, tag: u8, body: &[u8], refusal: String) -> Result<(), Stop> {
        let server_reads = self.server_reads_refused.take();
        self.out.clear();
        let mut r = Reader::new(message_name(tag), body);
        let name = if tag == frontend::tag::PARSE {
            Some(
                r.get_cstr_bytes("statement name")
                    .map_err(Stop::protocol_violation)?,
            )
        } else {
            None
        };
        let client_text = match tag {
            frontend::tag::PARSE | frontend::tag::QUERY if server_reads => Some(
                r.get_cstr_bytes("query string")
                    .map_err(Stop::protocol_violation)?,
            ),
            _ => None,
        };
        let mut sql = Vec::new();
        match client_text {
            Some(text) => {
                let marker = self.shared.register_denial(refusal);
                sql.extend_from_slice(text);
                sql.extend_from_slice(unparsable_guard(&marker).as_bytes());
                // A Query was counted as a batch of its own already; a
                // Parse belongs to the batch its Sync will end.
                let (sent, _) = self.shared.prepared().batches();
                let batch = if name.is_some() {
                    sent
                } else {
                    sent.saturating_sub(1)
                };
                self.shared.guard_sent(batch, text);
            }
            None => sql.extend_from_slice(self.shared.substitute_sql(refusal).as_bytes()),
        }
        match name {
            Some(name) => {
                let mut w = MessageWriter::new(&mut self.out, frontend::tag::PARSE);
                w.put_cstr_bytes(name).put_cstr_bytes(&sql).put_i16(0);
                w.finish();
            }
            None => {
                let mut w = MessageWriter::new(&mut self.out, frontend::tag::QUERY);
                w.put_cstr_bytes(&sql);
                w.finish();
            }
        }
        Ok(())
    }
}

/// What follows refused unparsable text in its substitute: text that can
/// never parse, whatever state the client's text leaves the lexer in. It
/// holds no quote, `$`, `*/` or backslash, so it cannot close a string,
/// identifier, dollar quote or comment the client's text left open (the
/// lexer then fails on that, quoting the marker); its newline ends a `--`
/// comment; where a statement can end, the `;` is taken and two
/// identifiers are no statement (an error quoting `marker`); where it
/// cannot, the error is at the `;`, which the upstream pump turns into the
/// server's `syntax error at end of input` for the text alone.
fn unparsable_guard(marker: &str) -> String {
    format!("\n;\n{marker} {marker}")
}

/// Whether `known` masks everything `needed` does: its relations, its
/// rules, and each statement's computed fields as strictly.
fn covers(known: &MaskPlan, needed: &MaskPlan) -> bool {
    needed.relations.iter().all(|r| known.relations.contains(r))
        && needed
            .rules
            .iter()
            .all(|r| known.rules.iter().any(|k| Arc::ptr_eq(k, r)))
        && needed.statements.iter().enumerate().all(|(i, method)| {
            method.is_none() || known.statements.get(i).copied().flatten() >= *method
        })
}

/// The `EXECUTE` through which a statement is decided: the label its
/// refusals name, and how many `EXECUTE`s deep it is (a Parse can prepare
/// an `EXECUTE` of another statement).
#[derive(Clone, Copy)]
struct Executed<'a> {
    label: &'a str,
    depth: usize,
}

/// Adds the masking of a statement run by an `EXECUTE` (`executed`, the
/// plan of its own text) to `plan`, the plan of a text of `n` statements,
/// at the `EXECUTE`'s place `at`.
fn merge_executed_plan(plan: &mut Option<MaskPlan>, n: usize, at: usize, executed: MaskPlan) {
    let plan = plan.get_or_insert_with(|| MaskPlan {
        rules: Vec::new(),
        statements: vec![None; n],
        relations: Vec::new(),
        only_first: false,
    });
    if let Some(slot) = plan.statements.get_mut(at) {
        let executed_method = executed.statements.iter().copied().max().flatten();
        *slot = (*slot).max(executed_method);
    }
    for relation in executed.relations {
        if !plan.relations.contains(&relation) {
            plan.relations.push(relation);
        }
    }
    for rule in executed.rules {
        if !plan.rules.iter().any(|known| Arc::ptr_eq(known, &rule)) {
            plan.rules.push(rule);
        }
    }
    // The statement was prepared earlier, its relations resolved on the
    // search path of then: the lookup searches every schema.
    plan.only_first = false;
}

/// The refusal of a Parse or Bind past [`MAX_TRACKED`].
/// `Some` until the whole Bind is in `data`: wait for it, or refuse one
/// too large to hold; `to` says what it binds that needs it whole.
fn hold_whole_bind(header: FrameHeader, data: &[u8], to: &str) -> Option<Result<Step, Stop>> {
    if header.len <= data.len() {
        return None;
    }
    if header.len > MAX_INSPECTED_MESSAGE {
        return Some(Err(Stop::client_fault(
            PROGRAM_LIMIT_EXCEEDED,
            format!(
                "tollgate: a Bind of {} bytes to {to} exceeds the {MAX_INSPECTED_MESSAGE}-byte limit",
                header.len
            ),
        )));
    }
    Some(Ok(Step::Need(header.len)))
}

fn too_many_prepared() -> String {
    format!(
        "tollgate: this session has {MAX_TRACKED} prepared statements and portals open, the most the proxy tracks; close some (Close, DEALLOCATE) first"
    )
}

fn message_name(tag: u8) -> &'static str {
    match tag {
        frontend::tag::QUERY => "Query",
        frontend::tag::PARSE => "Parse",
        frontend::tag::FUNCTION_CALL => "FunctionCall",
        _ => "message",
    }
}

fn printable(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("'{}'", tag as char)
    } else {
        "(not printable)".to_owned()
    }
}

/// Pumps client messages to the upstream until the client ends its side.
async fn client_pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    mut buf: ReadBuf,
    ctx: &SessionContext,
    identity: &ProcessIdentity,
    shared: &Shared,
    start: Instant,
) -> Result<(), Stop>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut side = ClientSide {
        ctx,
        identity,
        shared,
        streaming: 0,
        out: Vec::new(),
        memo: RefCell::default(),
        mask_plan: RefCell::new(None),
        server_reads_refused: Cell::new(false),
        extended_open: Cell::new(false),
        batch_open: Cell::new(false),
        prefix: RefCell::new(Vec::new()),
        waited: Cell::new(false),
        reading_changed: Cell::new(None),
        reading_waited: Cell::new(false),
        reading_changed_in_block: Cell::new(false),
        copy_open: Cell::new(false),
    };
    let raw = ctx.events.records_raw(&ctx.target);
    if raw && !buf.filled().is_empty() {
        // Sent right behind the start-up packet, in the same read.
        ctx.events
            .emit_raw(ctx.id, RawDirection::Client, buf.filled());
    }
    let write_err = |e: io::Error| Stop::Closed(CloseReason::UpstreamError(e.to_string()));
    let mut spliced = Vec::new();
    loop {
        let Batch {
            handled,
            need,
            last,
            wait,
        } = forward_batch(&mut side, writer, buf.filled(), &mut spliced, write_err).await?;
        buf.consume(handled);
        shared
            .client_mid_message
            .store(side.streaming > 0, Ordering::Relaxed);
        if last {
            let _ = writer.shutdown().await;
            return Ok(());
        }
        if wait {
            // The upstream pump, polled alongside, brings `in_flight` down.
            let idle = async {
                while shared.in_flight.load(Ordering::Relaxed) > 0 {
                    shared.idle.notified().await;
                }
            };
            if tokio::time::timeout(MASK_WAIT, idle).await.is_err() {
                side.waited.set(true);
                side.reading_waited.set(true);
            }
            continue;
        }
        buf.make_room(need);
        let n = buf
            .read_from(reader)
            .await
            .map_err(|e| Stop::Closed(CloseReason::ClientError(e.to_string())))?;
        if n == 0 {
            if !buf.filled().is_empty() || side.streaming > 0 {
                tracing::debug!(session = %ctx.id, "the client closed its side inside a message");
            }
            let _ = writer.shutdown().await;
            return Ok(());
        }
        count(ctx, true, n);
        if raw {
            record_raw(ctx, RawDirection::Client, &buf, n);
        }
        shared.touch(start);
    }
}

/// The server → client direction.
struct UpstreamSide<'a> {
    ctx: &'a SessionContext,
    shared: &'a Shared,
    streaming: usize,
    out: Vec<u8>,
    warned_encoding: bool,
    /// Inside the answer to a masked Query.
    masked: Option<MaskedAnswer>,
    /// The target records raw bytes: what goes to the client is recorded,
    /// as rewritten (masked rows, never the server's originals).
    raw: bool,
    /// The start-up's ReadyForQuery came (later ones answer the client's
    /// Queries, Syncs and FunctionCalls, counted in `in_flight`).
    ready: bool,
}

impl UpstreamSide<'_> {
    fn step(&mut self, data: &[u8]) -> Result<Step, Stop> {
        if self.streaming > 0 {
            let n = self.streaming.min(data.len());
            self.streaming -= n;
            return Ok(Step::Forward(n));
        }
        let header = match frame(data, MAX_MESSAGE) {
            Err(e) => return Err(upstream_fault(e)),
            Ok(None) => return Ok(Step::Need(FrameHeader::SIZE)),
            Ok(Some(h)) => h,
        };
        use backend::tag::*;
        if header.tag == COPY_IN_RESPONSE {
            self.shared.copy_in.store(true, Ordering::Relaxed);
        } else if matches!(header.tag, COMMAND_COMPLETE | ERROR_RESPONSE)
            && self.shared.copy_in.swap(false, Ordering::Relaxed)
        {
            self.copy_ended();
        }
        if self.shared.batch_active.load(Ordering::Relaxed) {
            if let Some(step) = self.batch_step(header, data)? {
                return Ok(step);
            }
        }
        if matches!(
            header.tag,
            COMMAND_COMPLETE | ERROR_RESPONSE | ROW_DESCRIPTION
        ) && self.shared.lookup_pending.load(Ordering::Relaxed)
        {
            if let Some(step) = self.prepared_lookup_step(header, data)? {
                return Ok(step);
            }
        }
        let mask_relevant = self.masked.is_some()
            || (header.tag == ROW_DESCRIPTION && self.shared.masks_pending.load(Ordering::Relaxed));
        if mask_relevant {
            if let Some(step) = self.mask_step(header, data)? {
                return Ok(step);
            }
        }
        match header.tag {
            READY_FOR_QUERY | PARAMETER_STATUS | BACKEND_KEY_DATA | AUTHENTICATION
            | ERROR_RESPONSE => {
                if header.len > MAX_INSPECTED_MESSAGE {
                    return Err(upstream_fault(format_args!(
                        "a message of type {} of {} bytes is larger than the proxy inspects",
                        printable(header.tag),
                        header.len
                    )));
                }
                let Some(body) = header.body(data) else {
                    return Ok(Step::Need(header.len));
                };
                if self.inspect(header.tag, body)? {
                    return Ok(Step::Replace(header.len));
                }
                if header.tag == ERROR_RESPONSE {
                    let (_, answered) = self.shared.prepared().batches();
                    self.out.clear();
                    if self
                        .shared
                        .unfinished_text_error(answered, body, &mut self.out)
                    {
                        return Ok(Step::Replace(header.len));
                    }
                    if let Some(message) = self.shared.denial_for(body) {
                        self.out.clear();
                        super::error::write_error_response(
                            &mut self.out,
                            severity::ERROR,
                            sqlstate::INSUFFICIENT_PRIVILEGE,
                            &message,
                            None,
                            None,
                        );
                        return Ok(Step::Replace(header.len));
                    }
                }
                Ok(Step::Forward(header.len))
            }
            COMMAND_COMPLETE if header.len <= FrameHeader::SIZE + MAX_TRACKED_TAG => {
                let Some(body) = header.body(data) else {
                    return Ok(Step::Need(header.len));
                };
                let tag = body.strip_suffix(&[0]).unwrap_or(body);
                if prepared::changes_statements(tag) {
                    self.shared.prepared().command_complete(tag);
                    if matches!(tag, b"DEALLOCATE ALL" | b"DISCARD ALL") {
                        self.shared.lookup().deallocated();
                    }
                }
                Ok(Step::Forward(header.len))
            }
            PARSE_COMPLETE | BIND_COMPLETE | CLOSE_COMPLETE => {
                let mut prepared = self.shared.prepared();
                match header.tag {
                    PARSE_COMPLETE => prepared.parse_complete(),
                    BIND_COMPLETE => prepared.bind_complete(),
                    _ => prepared.close_complete(),
                }
                drop(prepared);
                let n = header.len.min(data.len());
                self.streaming = header.len - n;
                Ok(Step::Forward(n))
            }
            _ => {
                let n = header.len.min(data.len());
                self.streaming = header.len - n;
                Ok(Step::Forward(n))
            }
        }
    }

    /// A message while a masked Query may be answered (see [`super::mask`]):
    /// the lookup's messages are dropped, its rows resolve the masked
    /// columns, and the rows of the client's results are masked. `None`
    /// leaves the message to the usual handling.
    fn mask_step(&mut self, header: FrameHeader, data: &[u8]) -> Result<Option<Step>, Stop> {
        use backend::tag::*;
        let whole = match header.tag {
            ROW_DESCRIPTION | COMMAND_COMPLETE | ERROR_RESPONSE => true,
            DATA_ROW => self
                .masked
                .as_ref()
                .is_some_and(|m| m.in_lookup() || m.rows().is_some()),
            READY_FOR_QUERY | EMPTY_QUERY_RESPONSE => {
                if header.tag == READY_FOR_QUERY {
                    if let Some(done) = self.masked.take() {
                        tracing::debug!(session = %self.ctx.id, columns = done.resolved(), "answer to a masked Query ends");
                    }
                } else if let Some(masked) = &mut self.masked {
                    masked.statement_done();
                }
                return Ok(None);
            }
            _ => false,
        };
        if !whole {
            return Ok(None);
        }
        if header.len > MAX_INSPECTED_MESSAGE {
            // Rows whose fields the proxy cannot read must not pass.
            if self.masked.is_some() && matches!(header.tag, DATA_ROW | ROW_DESCRIPTION) {
                return Err(masked_too_large(header.len));
            }
            return Ok(None);
        }
        let Some(body) = header.body(data) else {
            return Ok(Some(Step::Need(header.len)));
        };
        let drop_it = Step::Replace(header.len);
        self.out.clear();
        match header.tag {
            ROW_DESCRIPTION => {
                if let Some(masked) = self.masked.as_mut().filter(|m| !m.in_lookup()) {
                    masked.row_description(body).map_err(upstream_fault)?;
                    return Ok(None);
                }
                let first = match backend::decode_backend(ROW_DESCRIPTION, body) {
                    Ok(BackendMessage::RowDescription(fields)) => fields.first().map(|f| f.name),
                    _ => None,
                };
                if let Some((plan, shift)) = first.and_then(|name| self.shared.mask_for(name)) {
                    self.masked = Some(MaskedAnswer::new(plan, shift));
                    return Ok(Some(drop_it));
                }
                Ok(None)
            }
            DATA_ROW => {
                let Some(masked) = self.masked.as_mut() else {
                    return Ok(None);
                };
                if masked.in_lookup() {
                    masked.lookup_row(body).map_err(upstream_fault)?;
                    return Ok(Some(drop_it));
                }
                let Some(masks) = masked.rows() else {
                    return Ok(None);
                };
                mask_row(self.ctx, body, masks, &mut self.out)?;
                Ok(Some(Step::Replace(header.len)))
            }
            COMMAND_COMPLETE => {
                let Some(masked) = self.masked.as_mut() else {
                    return Ok(None);
                };
                let lookup = masked.in_lookup();
                masked.statement_done();
                Ok(lookup.then_some(drop_it))
            }
            _ => {
                let Some(masked) = self.masked.as_ref().filter(|m| !m.in_lookup()) else {
                    return Ok(None);
                };
                if self.shared.is_denial(body) {
                    // A refusal's substitute: left to the usual handling.
                    return Ok(None);
                }
                Ok(masking::answer_error(body, masked.shift(), &mut self.out)
                    .then_some(Step::Replace(header.len)))
            }
        }
    }

    /// The first CommandComplete, ErrorResponse or RowDescription of the
    /// answer to a Query using the prepared lookup: the `PREPARE`'s
    /// CommandComplete is dropped, an error tells the lookup whether its
    /// statement may still exist, and the RowDescription (the lookup's) is
    /// left to [`UpstreamSide::mask_step`].
    fn prepared_lookup_step(
        &mut self,
        header: FrameHeader,
        data: &[u8],
    ) -> Result<Option<Step>, Stop> {
        use backend::tag::*;
        if header.tag == ROW_DESCRIPTION || header.len > MAX_INSPECTED_MESSAGE {
            self.shared.lookup_pending.store(false, Ordering::Relaxed);
            return Ok(None);
        }
        let Some(body) = header.body(data) else {
            return Ok(Some(Step::Need(header.len)));
        };
        if header.tag == COMMAND_COMPLETE {
            let tag = body.strip_suffix(&[0]).unwrap_or(body);
            if self.shared.lookup().command_complete(tag) {
                self.out.clear();
                return Ok(Some(Step::Replace(header.len)));
            }
        } else if let Ok(BackendMessage::ErrorResponse(fields)) =
            backend::decode_backend(ERROR_RESPONSE, body)
        {
            self.shared
                .lookup()
                .failed(fields.sqlstate().unwrap_or_default());
        }
        self.shared.lookup_pending.store(false, Ordering::Relaxed);
        Ok(None)
    }

    /// The copy-in the server was in ended: the Syncs the client sent
    /// during it were ignored, and are taken off what is in flight.
    fn copy_ended(&mut self) {
        let ignored = self.shared.copy_syncs.swap(0, Ordering::Relaxed);
        if ignored == 0 {
            return;
        }
        self.shared.prepared().syncs_ignored(ignored);
        let before =
            self.shared
                .in_flight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(ignored))
                });
        if before.is_ok_and(|n| n > 0 && n <= ignored) {
            self.shared.idle.notify_one();
        }
    }

    /// A ReadyForQuery: one Query, Sync or FunctionCall fewer in flight
    /// (the start-up's own is not one of them).
    fn answered(&mut self) {
        if !self.ready {
            self.ready = true;
            return;
        }
        let before =
            self.shared
                .in_flight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if before == Ok(1) {
            self.shared.idle.notify_one();
        }
    }

    /// A message while a masked extended-protocol batch is answered (see
    /// [`super::mask::ExtendedBatch`]). `None` leaves it to the usual
    /// handling.
    fn batch_step(&mut self, header: FrameHeader, data: &[u8]) -> Result<Option<Step>, Stop> {
        use backend::tag::*;
        let mut guard = self.shared.batch();
        let Some(batch) = guard.as_mut() else {
            self.shared.batch_active.store(false, Ordering::Relaxed);
            return Ok(None);
        };
        let body = if batch.needs_body(header.tag)
            || matches!(header.tag, READY_FOR_QUERY | ERROR_RESPONSE)
        {
            if header.len > MAX_INSPECTED_MESSAGE {
                return Err(masked_too_large(header.len));
            }
            match header.body(data) {
                Some(body) => Some(body),
                None => return Ok(Some(Step::Need(header.len))),
            }
        } else {
            None
        };
        let disposition = batch.answer(header.tag, body).map_err(|e| {
            masking_fault(
                sqlstate::PROTOCOL_VIOLATION,
                format!("masking lost track of the server's answers ({e})"),
            )
        })?;
        self.out.clear();
        let step = match disposition {
            Disposition::Forward => {
                if header.tag == READY_FOR_QUERY && batch.is_done() {
                    *guard = None;
                    self.shared.batch_active.store(false, Ordering::Relaxed);
                }
                match body {
                    // An error in a masked batch may quote a masked value;
                    // a refusal's substitute is left to the usual handling.
                    Some(body)
                        if header.tag == ERROR_RESPONSE
                            && !self.shared.is_denial(body)
                            && masking::answer_error(body, 0, &mut self.out) =>
                    {
                        Some(Step::Replace(header.len))
                    }
                    _ => None,
                }
            }
            Disposition::Drop => Some(Step::Replace(header.len)),
            Disposition::LookupDone => {
                // The lookup's own ReadyForQuery: the client never asked for it.
                drop(guard);
                self.answered();
                Some(Step::Replace(header.len))
            }
            Disposition::Mask => {
                let masks = batch.row_masks().unwrap_or_default();
                mask_row(self.ctx, body.unwrap_or_default(), masks, &mut self.out)?;
                Some(Step::Replace(header.len))
            }
        };
        Ok(step)
    }

    /// Reads a message the session tracks; `true` when it is to be replaced
    /// by `out` (BackendKeyData, an AuthenticationSASL offering `-PLUS`).
    fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<bool, Stop> {
        if tag == backend::tag::ERROR_RESPONSE {
            return Ok(false);
        }
        let message = backend::decode_backend(tag, body).map_err(upstream_fault)?;
        match message {
            BackendMessage::ReadyForQuery(status) => {
                // The start-up's answers no message of the client's.
                let startup = !self.ready;
                self.answered();
                self.shared
                    .tx_status
                    .store(status.byte(), Ordering::Relaxed);
                if !startup {
                    self.shared.prepared().ready_for_query(status.byte());
                }
                if !self.shared.copy_in.load(Ordering::Relaxed) {
                    // A COPY that never entered copy-in (it failed first):
                    // its Syncs were answered like any other.
                    self.shared.copy_syncs.store(0, Ordering::Relaxed);
                }
                if matches!(status, TransactionStatus::Unknown(_)) {
                    tracing::debug!(session = %self.ctx.id, "ReadyForQuery with an unknown status byte");
                }
            }
            BackendMessage::Authentication(backend::Auth::Ok) => {
                self.shared.authenticated.store(true, Ordering::Relaxed);
            }
            BackendMessage::BackendKeyData { pid, secret } => {
                tracing::debug!(session = %self.ctx.id, backend_pid = pid, "upstream backend");
                return Ok(self.replace_cancel_key(pid, secret));
            }
            BackendMessage::Authentication(backend::Auth::Sasl { mechanisms })
                if mechanisms.contains(&SCRAM_PLUS) =>
            {
                // Channel binding cannot cross the proxy (see the tls module).
                let mechanisms = mechanisms
                    .into_iter()
                    .filter(|m| *m != SCRAM_PLUS)
                    .collect();
                self.out.clear();
                BackendMessage::Authentication(backend::Auth::Sasl { mechanisms })
                    .encode(&mut self.out);
                tracing::debug!(session = %self.ctx.id, "removed SCRAM-SHA-256-PLUS from the server's SASL mechanisms");
                return Ok(true);
            }
            BackendMessage::ParameterStatus { name, value } => match name {
                "client_encoding" => {
                    let encoding = if value.eq_ignore_ascii_case("UTF8")
                        || value.eq_ignore_ascii_case("UNICODE")
                    {
                        ENCODING_UTF8
                    } else if value.eq_ignore_ascii_case("LATIN1") {
                        ENCODING_LATIN1
                    } else {
                        ENCODING_OTHER
                    };
                    self.shared
                        .client_encoding
                        .store(encoding, Ordering::Relaxed);
                    if encoding == ENCODING_OTHER && !self.warned_encoding {
                        self.warned_encoding = true;
                        tracing::warn!(session = %self.ctx.id, client_encoding = value,
                            "client_encoding is {value}: the statement analysis reads UTF-8 and LATIN1, so statements with non-ASCII text are refused as unparsable");
                    }
                }
                "standard_conforming_strings" => {
                    let off = value.eq_ignore_ascii_case("off");
                    self.shared.backslash_escapes.store(off, Ordering::Relaxed);
                }
                _ => {}
            },
            _ => {}
        }
        Ok(false)
    }

    /// Registers the backend's cancel key and puts the client-visible one
    /// in `out`; `false` (forward the server's own) only if the random
    /// source failed.
    fn replace_cancel_key(&mut self, pid: i32, secret: &[u8]) -> bool {
        let Some((client_pid, client_secret)) =
            self.ctx
                .cancel
                .register(pid, secret, self.ctx.upstream_addr)
        else {
            tracing::warn!(session = %self.ctx.id, "cannot make a cancel key (no randomness); the client gets the server's own");
            return false;
        };
        let previous = self
            .shared
            .cancel_pid
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(client_pid);
        if let Some(previous) = previous {
            self.ctx.cancel.forget(previous);
        }
        self.out.clear();
        BackendMessage::BackendKeyData {
            pid: client_pid,
            secret: &client_secret,
        }
        .encode(&mut self.out);
        true
    }
}

/// Writes the DataRow `body` masked by `masks` into `out`, counting the
/// values masked.
fn mask_row(
    ctx: &SessionContext,
    body: &[u8],
    masks: &[crate::masking::FieldMask],
    out: &mut Vec<u8>,
) -> Result<(), Stop> {
    let masked = masking::mask_data_row(body, masks, out).map_err(upstream_fault)?;
    ctx.target_metrics
        .masked_values
        .fetch_add(masked, Ordering::Relaxed);
    Ok(())
}

/// Ends the session rather than let a row pass unmasked: `what` went wrong.
fn masking_fault(sqlstate: &'static str, what: String) -> Stop {
    let message = format!(
        "tollgate: {what}; the session is closed so that nothing unmasked reaches the client"
    );
    Stop::Fatal {
        sqlstate,
        reason: CloseReason::UpstreamError(message.clone()),
        message,
    }
}

/// A masked result's message too large to read whole.
fn masked_too_large(len: usize) -> Stop {
    masking_fault(
        PROGRAM_LIMIT_EXCEEDED,
        format!("a message of a masked result has {len} bytes, more than the {MAX_INSPECTED_MESSAGE} bytes the proxy masks"),
    )
}

fn upstream_fault(what: impl std::fmt::Display) -> Stop {
    let message = format!("tollgate: invalid message from the server: {what}");
    Stop::Fatal {
        sqlstate: sqlstate::PROTOCOL_VIOLATION,
        reason: CloseReason::UpstreamError(message.clone()),
        message,
    }
}

/// Pumps server messages to the client until the server ends its side.
async fn upstream_pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    ctx: &SessionContext,
    shared: &Shared,
    start: Instant,
) -> Result<(), Stop>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut side = UpstreamSide {
        ctx,
        shared,
        streaming: 0,
        out: Vec::new(),
        warned_encoding: false,
        masked: None,
        raw: ctx.events.records_raw(&ctx.target),
        ready: false,
    };
    let mut buf = ReadBuf::new();
    let write_err = |e: io::Error| Stop::Closed(CloseReason::ClientError(e.to_string()));
    let mut spliced = Vec::new();
    loop {
        // The server sends no message that ends the session (`last`).
        let Batch { handled, need, .. } =
            forward_batch(&mut side, writer, buf.filled(), &mut spliced, write_err).await?;
        buf.consume(handled);
        shared
            .upstream_mid_message
            .store(side.streaming > 0, Ordering::Relaxed);
        buf.make_room(need);
        let n = buf
            .read_from(reader)
            .await
            .map_err(|e| Stop::Closed(CloseReason::UpstreamError(e.to_string())))?;
        if n == 0 {
            let _ = writer.shutdown().await;
            return Ok(());
        }
        count(ctx, false, n);
        shared.touch(start);
    }
}

/// One direction's message handling: [`ClientSide`] or [`UpstreamSide`].
trait Side {
    /// What to do with the next message, `data` starting at its first byte.
    fn step(&mut self, data: &[u8]) -> Result<Step, Stop>;
    /// The bytes that replace the message of the last [`Step::Replace`].
    fn replacement(&self) -> &[u8];
    /// Sees the bytes about to be written on, in order.
    fn forwarded(&self, _bytes: &[u8]) {}
}

impl Side for ClientSide<'_> {
    fn step(&mut self, data: &[u8]) -> Result<Step, Stop> {
        ClientSide::step(self, data)
    }

    fn replacement(&self) -> &[u8] {
        &self.out
    }
}

impl Side for UpstreamSide<'_> {
    fn step(&mut self, data: &[u8]) -> Result<Step, Stop> {
        UpstreamSide::step(self, data)
    }

    fn replacement(&self) -> &[u8] {
        &self.out
    }

    fn forwarded(&self, bytes: &[u8]) {
        if self.raw {
            self.ctx
                .events
                .emit_raw(self.ctx.id, RawDirection::Server, bytes);
        }
    }
}

/// What [`forward_batch`] made of one read.
struct Batch {
    /// Bytes handled (forwarded or replaced), to consume from the buffer.
    handled: usize,
    /// Bytes the next message needs before it can be handled.
    need: usize,
    /// A message that ends the session was forwarded (Terminate).
    last: bool,
    /// The next message waits for the server to be idle ([`Step::Wait`]).
    wait: bool,
}

/// Handles every whole message in `data`, forwarding runs of unchanged
/// messages and replacements in one write (see [`write_batch`]), then
/// flushes (TLS holds records until flushed; for TCP this does nothing).
async fn forward_batch<S: Side, W: AsyncWrite + Unpin>(
    side: &mut S,
    writer: &mut W,
    data: &[u8],
    spliced: &mut Vec<u8>,
    write_err: fn(io::Error) -> Stop,
) -> Result<Batch, Stop> {
    let mut batch = Batch {
        handled: 0,
        need: FrameHeader::SIZE,
        last: false,
        wait: false,
    };
    let mut from = 0;
    while batch.handled < data.len() && !batch.last {
        let rest = data.get(batch.handled..).unwrap_or_default();
        match side.step(rest)? {
            Step::Need(n) => {
                batch.need = n;
                break;
            }
            Step::Wait => {
                batch.wait = true;
                break;
            }
            Step::Forward(n) => batch.handled += n,
            Step::Last(n) => {
                batch.handled += n;
                batch.last = true;
            }
            Step::Replace(n) => {
                spliced.extend_from_slice(data.get(from..batch.handled).unwrap_or_default());
                spliced.extend_from_slice(side.replacement());
                batch.handled += n;
                from = batch.handled;
            }
        }
    }
    let tail = data.get(from..batch.handled).unwrap_or_default();
    if !spliced.is_empty() {
        side.forwarded(spliced);
    }
    if !tail.is_empty() {
        side.forwarded(tail);
    }
    write_batch(writer, spliced, tail)
        .await
        .map_err(write_err)?;
    writer.flush().await.map_err(write_err)?;
    Ok(batch)
}

/// Writes what one read produced in one call: `tail`, the run of
/// unchanged messages after the last replaced one, behind `spliced`, the
/// runs and replacements before it (empty when nothing was replaced; then
/// `tail` is written from the read buffer without a copy). One write per
/// read, so a replaced message (the server's BackendKeyData in its
/// start-up answer) does not split the answer into three packets and three
/// wake-ups of the peer.
async fn write_batch<W: AsyncWrite + Unpin>(
    writer: &mut W,
    spliced: &mut Vec<u8>,
    tail: &[u8],
) -> io::Result<()> {
    if spliced.is_empty() {
        if tail.is_empty() {
            return Ok(());
        }
        return writer.write_all(tail).await;
    }
    spliced.extend_from_slice(tail);
    let written = writer.write_all(spliced).await;
    spliced.clear();
    // A replacement inside a large read is rare: do not keep its buffer.
    if spliced.capacity() > SPLICE_KEEP {
        *spliced = Vec::new();
    }
    written
}

/// The most a session keeps allocated for splicing between reads.
const SPLICE_KEEP: usize = 64 * 1024;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// Keeps each write call's bytes apart.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.0.push(buf.to_vec());
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_read_with_a_replaced_message_is_written_in_one_call() {
        let mut writes = Writes::default();
        let mut spliced = Vec::new();
        // Nothing replaced: the tail alone, and nothing for an empty read.
        write_batch(&mut writes, &mut spliced, b"abc")
            .await
            .unwrap();
        write_batch(&mut writes, &mut spliced, b"").await.unwrap();
        assert_eq!(writes.0, [b"abc".to_vec()]);
        // A run, its replacement, then the tail: one write, in order.
        spliced.extend_from_slice(b"run+");
        spliced.extend_from_slice(b"KEY+");
        write_batch(&mut writes, &mut spliced, b"tail")
            .await
            .unwrap();
        assert_eq!(writes.0, [b"abc".to_vec(), b"run+KEY+tail".to_vec()]);
        assert!(spliced.is_empty());
        // A large splice is not kept between reads.
        spliced.resize(SPLICE_KEEP + 1, b'x');
        write_batch(&mut writes, &mut spliced, b"").await.unwrap();
        assert_eq!(spliced.capacity(), 0);
        assert_eq!(writes.0.len(), 3);
    }

    #[test]
    fn a_denial_is_found_by_its_marker_once() {
        let shared = Shared::new();
        let sql = shared.substitute_sql("tollgate: DROP TABLE denied".to_owned());
        assert!(
            sql.starts_with("SELECT 1::pg_catalog.\"tollgate_deny_"),
            "{sql}"
        );
        let n = sql.trim_end_matches('"').rsplit('_').next().unwrap();
        // The server's message quotes the type name.
        let body = format!(
            "SERROR\0C42704\0Mtype \"pg_catalog.{}{n}\" does not exist\0\0",
            shared.marker
        );
        assert_eq!(
            shared.denial_for(body.as_bytes()).as_deref(),
            Some("tollgate: DROP TABLE denied")
        );
        assert_eq!(shared.denial_for(body.as_bytes()), None, "answered once");
        // Another session's marker, or none, is not ours.
        let other = Shared::new();
        assert_ne!(other.marker, shared.marker);
        let sql = other.substitute_sql("x".to_owned());
        assert_eq!(shared.denial_for(sql.as_bytes()), None);
        assert_eq!(shared.denial_for(b"SERROR\0Mtype does not exist\0\0"), None);
    }

    #[test]
    fn denials_answered_without_a_marker_are_forgotten() {
        let shared = Shared::new();
        let first = shared.substitute_sql("first".to_owned());
        let second = shared.substitute_sql("second".to_owned());
        assert!(first != second);
        // The first was answered with 25P02 (no marker); the second's error
        // arrives and clears it too.
        assert_eq!(
            shared.denial_for(second.as_bytes()).as_deref(),
            Some("second")
        );
        assert!(shared.denials.lock().unwrap().is_empty());
        for i in 0..(MAX_PENDING_DENIALS + 10) {
            shared.substitute_sql(format!("m{i}"));
        }
        assert_eq!(shared.denials.lock().unwrap().len(), MAX_PENDING_DENIALS);
    }

    #[test]
    fn the_read_buffer_grows_for_a_whole_message_and_shrinks_back() {
        let mut buf = ReadBuf::new();
        buf.make_room(BUFFER * 4);
        assert!(buf.data.len() >= BUFFER * 4);
        buf.end = 10;
        buf.consume(4);
        assert_eq!(buf.filled().len(), 6);
        buf.make_room(BUFFER * 5);
        assert_eq!((buf.start, buf.end), (0, 6), "compacted");
        buf.consume(6);
        assert_eq!(buf.data.len(), BUFFER, "back to its resting size");
        assert!(buf.filled().is_empty());
        buf.consume(100);
        assert_eq!((buf.start, buf.end), (0, 0));
    }

    #[test]
    fn only_client_message_types_are_accepted() {
        for tag in b"BCdcfDEHFPpQSX" {
            assert!(is_frontend_tag(*tag), "{}", *tag as char);
        }
        for tag in [0u8, b'y', b'Z', b'K', 0xff] {
            assert!(!is_frontend_tag(tag));
        }
    }
}
