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
//!
//! # Layout
//!
//! - this file: [`run`], the two pumps and the batched forwarding of what
//!   each side decided: with [`startup`], the only code here that touches
//!   sockets;
//! - [`startup`]: start-up packets, TLS negotiation on both legs,
//!   cancel requests and the refusals written before a session starts;
//! - [`shared`]: the state both directions share, why a session stops,
//!   the read buffer and the [`Step`] each side answers with;
//! - [`client`]: client messages decided before the server sees them;
//! - [`upstream`]: server messages (denials, keys, what the server
//!   answered);
//! - [`masking_flow`]: the masking lookups the client side plans and the
//!   upstream side reads, and the rows it masks.
//!
//! The ready phase is sans-IO outside this file: [`client`], [`upstream`]
//! and [`masking_flow`] take bytes and give a [`Step`].
//! [`step_batch`] steps a side over one read; the pumps write what it
//! gives, and `tests.rs` drives both sides with it from tables of
//! messages.

mod broker;
mod client;
mod masking_flow;
mod review;
mod shared;
mod startup;
mod upstream;

pub use startup::{refuse_at_startup, Fatal};

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::cancel::CancelRegistry;
use super::prepared::{self as prepared, Decided, Prepared, SqlOp, MAX_TRACKED};
use crate::protocol::tls::{self, Stream, TlsState, UpstreamMode};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::backend::{self, BackendMessage, TransactionStatus};
use super::codec::{
    frame, frame_startup, CodecError, FrameHeader, MessageWriter, MAX_MESSAGE, MAX_PRE_AUTH_MESSAGE,
};
use super::error::{error_response, severity, sqlstate, ssl_refused};
use super::fastpath;
use super::frontend::{self, decode_startup, FrontendMessage};
use super::mask::{
    self as pg_mask, DirectFields, Disposition, Expect, ExtendedBatch, LookupScope, MaskPlan,
    MaskedAnswer, MaskedMessage, PreparedLookup,
};
use crate::events::{CloseReason, RawDirection, SessionEvent, StatementEvent};
use crate::identity::ProcessIdentity;
use crate::policy::current_policy;
use crate::policy::{most_restrictive, Action, Decision, DecisionMemo};
use crate::protocol::SessionContext;
use crate::sql::{Analysis, Reading as LiteralReading};

use client::*;
use masking_flow::*;
use review::{PendingReview, ReviewOutcome};
use shared::*;
use startup::*;
use upstream::*;

/// Largest Query, Parse or FunctionCall the proxy buffers to analyse (the
/// length field's value). PostgreSQL accepts up to 1 GiB; statements that
/// large are refused here with 54000 program_limit_exceeded rather than
/// buffered or let through unanalysed.
pub const MAX_INSPECTED_MESSAGE: usize = 16 << 20;

/// 54000 program_limit_exceeded.
const PROGRAM_LIMIT_EXCEEDED: &str = "54000";

/// How long a batch start waits for the server to answer what was sent
/// before it (see [`ClientSide::must_wait`]); then a masked statement in it
/// is refused.
const MASK_WAIT: Duration = Duration::from_secs(30);

/// The HINT of the FATAL error that ends a session when recording failed.
pub(super) const RECORDING_HINT: &str = "nothing may run unrecorded (agent.recording_on_failure = \"refuse\"); fix the cause, e.g. free space in the recording directory, then restart the agent";

/// What a PostgreSQL session works with: its generic [`SessionContext`]
/// (reached through `Deref`) and the state every PostgreSQL session shares,
/// which the [`super::PostgresHandler`] owns.
#[derive(Clone, Copy)]
pub struct PostgresContext<'a> {
    common: &'a SessionContext,
    /// Client-visible cancel keys of open sessions.
    pub(super) cancel: &'a CancelRegistry,
    /// TLS material for both legs.
    pub(super) tls: &'a TlsState,
    /// The target, when it has brokered credentials.
    pub(super) brokered: Option<&'a crate::config::Target>,
}

impl<'a> PostgresContext<'a> {
    /// A session's context with PostgreSQL's shared state.
    pub fn new(
        common: &'a SessionContext,
        cancel: &'a CancelRegistry,
        tls: &'a TlsState,
        brokered: Option<&'a crate::config::Target>,
    ) -> PostgresContext<'a> {
        PostgresContext {
            common,
            cancel,
            tls,
            brokered,
        }
    }
}

impl std::ops::Deref for PostgresContext<'_> {
    type Target = SessionContext;

    fn deref(&self) -> &SessionContext {
        self.common
    }
}

/// Forgets the session's client-visible cancel key when the session ends.
struct ForgetCancelKey<'a> {
    ctx: &'a PostgresContext<'a>,
    shared: &'a BetweenSides,
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
pub async fn run(ctx: &PostgresContext<'_>, client: TcpStream, upstream: TcpStream) -> CloseReason {
    let start = Instant::now();
    let shared = BetweenSides::new();
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
    let (mut bytes, mut startup_event) = match packet {
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
                    brokered_user: None,
                },
            )
        }
    };
    // With brokered credentials, the process decides the login before the
    // server hears of the session.
    let credential = match ctx.brokered {
        None => None,
        Some(target) => {
            let info = ctx.start.info().await;
            match broker::choose(target, &info.identity) {
                Ok(credential) => credential,
                Err(stop) => return end_early(ctx, &mut client, stop).await,
            }
        }
    };
    let client_startup = match credential {
        Some((_, credential)) => match broker::startup_as(&bytes, &credential.user) {
            Ok(rewritten) => {
                if let SessionEvent::Startup { brokered_user, .. } = &mut startup_event {
                    *brokered_user = Some(credential.user.clone());
                }
                Some(std::mem::replace(&mut bytes, rewritten))
            }
            Err(stop) => return end_early(ctx, &mut client, stop).await,
        },
        None => None,
    };
    let mut upstream = match connect_upstream_tls(ctx, upstream, credential.map(|(i, _)| i)).await {
        Ok(u) => u,
        Err(stop) => return end_early(ctx, &mut client, stop).await,
    };
    tls::log_legs(ctx, &client, &upstream);
    let withhold_clear_password =
        tls::clear_password_exposed(&client, &upstream, ctx.upstream_addr);
    count(
        ctx,
        true,
        client_startup.as_ref().map_or(bytes.len(), Vec::len),
    );
    if let Err(e) = write_flush(&mut upstream, &bytes).await {
        return CloseReason::UpstreamError(e.to_string());
    }
    let mut upstream_buf = ReadBuf::new();
    if let Some((_, credential)) = credential {
        if let Err(stop) =
            broker::authenticate(ctx, &mut upstream, &mut upstream_buf, credential).await
        {
            return end_early(ctx, &mut client, stop).await;
        }
    }
    // The server authenticates and sets up its backend while the process
    // behind the session is looked up; nothing is decided or recorded
    // before it is known.
    let info = ctx.start.info().await;
    // The user statements run as: the brokered one when the agent logged in.
    let database_user = match &startup_event {
        SessionEvent::Startup {
            user,
            brokered_user,
            ..
        } => brokered_user.clone().or_else(|| user.clone()),
        _ => None,
    };
    ctx.events.emit(&startup_event);
    if ctx.events.records_raw(&ctx.target) {
        // What the client sent (a brokered login's rewritten copy is the
        // agent's).
        let sent = client_startup.as_deref().unwrap_or(&bytes);
        ctx.events.emit_raw(ctx.id, RawDirection::Client, sent);
    }

    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let outcome = {
        let from_client = client_pump(
            &mut client_read,
            &mut upstream_write,
            client_buf,
            ClientSide::new(ctx, &info.identity, &shared, database_user),
            start,
        );
        let from_upstream = upstream_pump(
            &mut upstream_read,
            &mut client_write,
            upstream_buf,
            ctx,
            &shared,
            start,
            withhold_clear_password,
        );
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
    ctx: &PostgresContext<'_>,
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

/// Records the last `n` bytes of `buf` (just read) as raw bytes from `dir`.
fn record_raw(ctx: &PostgresContext<'_>, dir: RawDirection, buf: &ReadBuf, n: usize) {
    let filled = buf.filled();
    let read = filled
        .get(filled.len().saturating_sub(n)..)
        .unwrap_or_default();
    ctx.events.emit_raw(ctx.id, dir, read);
}

fn count(ctx: &PostgresContext<'_>, from_client: bool, n: usize) {
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

/// Pumps client messages to the upstream until the client ends its side.
async fn client_pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    mut buf: ReadBuf,
    mut side: ClientSide<'_>,
    start: Instant,
) -> Result<(), Stop>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (ctx, shared) = (side.ctx, side.shared);
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
            hold,
        } = forward_batch(&mut side, writer, buf.filled(), &mut spliced, write_err).await?;
        buf.consume(handled);
        shared
            .client_mid_message
            .store(side.streaming > 0, Ordering::Relaxed);
        if last {
            let _ = writer.shutdown().await;
            return Ok(());
        }
        if hold {
            let outcome = review::hold(&mut side, reader, &mut buf, start).await?;
            side.review_outcome = Some(outcome);
            continue;
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
        count(&ctx, true, n);
        if raw {
            record_raw(&ctx, RawDirection::Client, &buf, n);
        }
        shared.touch(start);
    }
}

/// Pumps server messages to the client until the server ends its side.
async fn upstream_pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    mut buf: ReadBuf,
    ctx: &PostgresContext<'_>,
    shared: &BetweenSides,
    start: Instant,
    withhold_clear_password: bool,
) -> Result<(), Stop>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut side = UpstreamSide::new(ctx, shared);
    side.withhold_clear_password = withhold_clear_password;
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
        // Between whole messages (nothing passed through in part), the
        // proxy's own messages for the client may go in.
        let between = side.streaming == 0;
        let n = tokio::select! {
            read = buf.read_from(reader) => read
                .map_err(|e| Stop::Closed(CloseReason::UpstreamError(e.to_string())))?,
            () = shared.to_client_ready.notified(), if between => {
                let ours = shared.take_for_client();
                write_flush(writer, &ours).await.map_err(write_err)?;
                continue;
            }
        };
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
    /// The next message is held for review ([`Step::Hold`]).
    hold: bool,
}

/// Steps `side` over `data` (the unhandled bytes of one read) until it
/// needs more bytes, waits or stops: what is to be written goes into
/// `spliced` (the runs and replacements up to the last replaced message),
/// followed by `data[tail..batch.handled]`, the run after it. No I/O: the
/// pumps write the result, the tests read it.
fn step_batch<S: Side>(
    side: &mut S,
    data: &[u8],
    spliced: &mut Vec<u8>,
) -> Result<(Batch, usize), Stop> {
    let mut batch = Batch {
        handled: 0,
        need: FrameHeader::SIZE,
        last: false,
        wait: false,
        hold: false,
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
            Step::Hold => {
                batch.hold = true;
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
    Ok((batch, from))
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
    let (batch, from) = step_batch(side, data, spliced)?;
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
mod tests;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod io_tests {
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
}
