//! The opaque TCP handler: relays bytes both ways without looking at them.
//!
//! Each direction has one fixed buffer, so memory per session is bounded and a
//! slow reader slows its writer (backpressure) instead of growing a queue.
//! End of stream in one direction is passed on as a half-close (FIN); the
//! session ends when both directions ended, on an I/O error, on the idle
//! timeout, or when the shutdown grace period is over. When recording has
//! failed and the agent fails closed, the session ends at its next read:
//! nothing is relayed unrecorded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{Handler, HandlerFuture, Refusal, SessionContext};
use crate::events::{CloseReason, RawDirection};

/// Bytes read at once per direction.
const RELAY_BUFFER: usize = 16 * 1024;

/// One end of the relay.
#[derive(Clone, Copy)]
enum Peer {
    Client,
    Upstream,
}

/// Why a direction stopped early.
enum PumpError {
    /// An I/O failure and which peer caused it.
    Io {
        culprit: Peer,
        error: std::io::Error,
    },
    /// Recording failed (fail closed): the recorder's failure.
    Recording(String),
}

/// The opaque relay: serves `tcp` targets.
pub struct TcpRelay;

impl Handler for TcpRelay {
    fn serve<'a>(
        &'a self,
        ctx: &'a SessionContext,
        client: TcpStream,
        upstream: TcpStream,
    ) -> HandlerFuture<'a, CloseReason> {
        Box::pin(relay(ctx, client, upstream))
    }

    /// A relay has no way to tell its client why: the connection is closed.
    fn refuse<'a>(
        &'a self,
        client: TcpStream,
        _refusal: Refusal<'a>,
        _timeout: Duration,
    ) -> HandlerFuture<'a, ()> {
        drop(client);
        Box::pin(std::future::ready(()))
    }
}

/// Relays until the session ends and says why.
async fn relay(ctx: &SessionContext, client: TcpStream, upstream: TcpStream) -> CloseReason {
    // Raw bytes are recorded as they pass, so with `record_raw` the session
    // is announced first; otherwise bytes flow while the process behind it
    // is looked up (nothing here is decided by identity).
    let mut announced = ctx.events.records_raw(&ctx.target);
    if announced {
        ctx.start.info().await;
    }
    let start = Instant::now();
    // Milliseconds since `start` of the last byte seen in either direction.
    let last_activity = AtomicU64::new(0);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();

    let from_client = pump(
        client_read,
        upstream_write,
        Peer::Client,
        ctx,
        start,
        &last_activity,
    );
    let from_upstream = pump(
        upstream_read,
        client_write,
        Peer::Upstream,
        ctx,
        start,
        &last_activity,
    );
    tokio::pin!(from_client, from_upstream);
    let (mut client_done, mut upstream_done) = (false, false);

    loop {
        if client_done && upstream_done {
            return CloseReason::Completed;
        }
        let idle_deadline =
            start + Duration::from_millis(last_activity.load(Ordering::Relaxed)) + ctx.idle_timeout;
        tokio::select! {
            _ = ctx.start.info(), if !announced => announced = true,
            result = &mut from_client, if !client_done => match result {
                Ok(()) => client_done = true,
                Err(e) => return failure(ctx, e),
            },
            result = &mut from_upstream, if !upstream_done => match result {
                Ok(()) => upstream_done = true,
                Err(e) => return failure(ctx, e),
            },
            _ = tokio::time::sleep_until(idle_deadline) => {
                let idle_for = start.elapsed().saturating_sub(Duration::from_millis(last_activity.load(Ordering::Relaxed)));
                if idle_for >= ctx.idle_timeout {
                    return CloseReason::IdleTimeout;
                }
            }
            _ = ctx.force_close.cancelled() => return CloseReason::Shutdown,
        }
    }
}

fn failure(ctx: &SessionContext, e: PumpError) -> CloseReason {
    match e {
        PumpError::Io {
            culprit: Peer::Client,
            error,
        } => CloseReason::ClientError(error.to_string()),
        PumpError::Io {
            culprit: Peer::Upstream,
            error,
        } => CloseReason::UpstreamError(error.to_string()),
        PumpError::Recording(cause) => {
            // Raw TCP has no way to tell the client why: the log does.
            tracing::warn!(session = %ctx.id, target = %ctx.target, reason = %cause,
                "closing the session: session recording has failed");
            CloseReason::RecordingFailed(cause)
        }
    }
}

/// Copies one direction until end of stream, then half-closes the writer.
async fn pump<R, W>(
    mut reader: R,
    mut writer: W,
    from: Peer,
    ctx: &SessionContext,
    start: Instant,
    last_activity: &AtomicU64,
) -> Result<(), PumpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (reader_side, writer_side) = match from {
        Peer::Client => (Peer::Client, Peer::Upstream),
        Peer::Upstream => (Peer::Upstream, Peer::Client),
    };
    let (session_counter, target_counter) = match from {
        Peer::Client => (
            &ctx.counters.from_client,
            &ctx.target_metrics.bytes_from_client,
        ),
        Peer::Upstream => (
            &ctx.counters.from_upstream,
            &ctx.target_metrics.bytes_from_upstream,
        ),
    };
    let raw = ctx.events.records_raw(&ctx.target).then_some(match from {
        Peer::Client => RawDirection::Client,
        Peer::Upstream => RawDirection::Server,
    });
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        let n = reader.read(&mut buf).await.map_err(|error| PumpError::Io {
            culprit: reader_side,
            error,
        })?;
        if let Some(cause) = ctx.events.recording_failure() {
            return Err(PumpError::Recording(cause));
        }
        if n == 0 {
            // The peer closed its sending side: pass the half-close on. A peer
            // that already went away entirely is not an error here.
            let _ = writer.shutdown().await;
            return Ok(());
        }
        let chunk = buf.get(..n).unwrap_or_default();
        if let Some(dir) = raw {
            ctx.events.emit_raw(ctx.id, dir, chunk);
        }
        writer
            .write_all(chunk)
            .await
            .map_err(|error| PumpError::Io {
                culprit: writer_side,
                error,
            })?;
        session_counter.fetch_add(n as u64, Ordering::Relaxed);
        target_counter.fetch_add(n as u64, Ordering::Relaxed);
        let now = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_activity.fetch_max(now, Ordering::Relaxed);
    }
}
