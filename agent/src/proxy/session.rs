//! Setting up one session: identity, upstream, events, then the handler.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::net::TcpStream;
use uuid::Uuid;

use super::live::SessionCounters;
use super::Shared;
use crate::config::{Listener, Protocol, Upstream};
use crate::events::{Arrival, CloseReason, SessionEvent, SessionInfo};
use crate::identity::ProcessIdentity;
use crate::protocol::{self, SessionContext};

pub(super) async fn serve(
    shared: Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    listener: Arc<Listener>,
) {
    let began = Instant::now();
    let id = Uuid::now_v7();
    let local = client.local_addr().unwrap_or(listener.listen);
    let _ = client.set_nodelay(true);

    // The process is looked up first thing, while it is most likely still
    // alive, and on a blocking thread because it reads /proc.
    let resolver = shared.identity.clone();
    let lookup = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let identity = resolver.identify_peer(peer, local);
        (identity, t.elapsed())
    });
    let connect = connect_upstream(&listener.upstream, shared.config.agent.connect_timeout);
    let (looked_up, upstream) = tokio::join!(lookup, connect);

    let identity = match looked_up {
        Ok((identity, took)) => {
            shared
                .metrics
                .identity_lookup(took, failure_label(&identity));
            identity
        }
        Err(e) => {
            shared
                .metrics
                .identity_lookup(began.elapsed(), Some("internal"));
            ProcessIdentity {
                gaps: vec![format!("identity lookup did not finish: {e}")],
                ..ProcessIdentity::default()
            }
        }
    };
    let protocol = shared
        .config
        .targets
        .get(&listener.target)
        .map_or(Protocol::Tcp, |t| t.protocol);
    let info = Arc::new(SessionInfo {
        id,
        started_at: SystemTime::now(),
        arrival: Arrival::Listener,
        local,
        client: peer,
        target: listener.target.clone(),
        protocol,
        upstream: listener.upstream.to_string(),
        identity,
    });
    let counters = Arc::new(SessionCounters::default());
    shared.live.insert(info.clone(), counters.clone());
    shared.events.emit(&SessionEvent::Started(info.clone()));

    let reason = match upstream {
        Err(reason) => reason,
        Ok((stream, peer, connect_time)) => {
            shared.events.emit(&SessionEvent::UpstreamConnected {
                session: id,
                peer,
                connect_time,
            });
            let ctx = SessionContext {
                info: info.clone(),
                counters: counters.clone(),
                target_metrics: shared.metrics.target(&info.target),
                idle_timeout: shared.config.agent.idle_timeout,
                force_close: shared.force_close.clone(),
            };
            protocol::tcp::relay(&ctx, client, stream).await
        }
    };

    shared.live.remove(&id);
    shared.metrics.session_closed(&info.target, reason.label());
    shared.events.emit(&SessionEvent::Closed {
        session: id,
        bytes_from_client: counters
            .from_client
            .load(std::sync::atomic::Ordering::Relaxed),
        bytes_from_upstream: counters
            .from_upstream
            .load(std::sync::atomic::Ordering::Relaxed),
        duration: began.elapsed(),
        reason,
    });
}

/// Which lookup failure, if any, a resolved identity shows.
fn failure_label(identity: &ProcessIdentity) -> Option<&'static str> {
    match (identity.pid, identity.uid) {
        (None, None) => Some("socket_not_found"),
        (None, Some(_)) => Some("owner_not_found"),
        (Some(_), _) if identity.exe.is_none() => Some("process_exited"),
        _ => None,
    }
}

/// Resolves and connects to the upstream, trying each address in turn.
async fn connect_upstream(
    upstream: &Upstream,
    timeout: std::time::Duration,
) -> Result<(TcpStream, SocketAddr, std::time::Duration), CloseReason> {
    let began = Instant::now();
    let attempt = async {
        let addrs: Vec<SocketAddr> =
            tokio::net::lookup_host((upstream.host.as_str(), upstream.port))
                .await
                .map_err(|e| format!("cannot resolve {}: {e}", upstream.host))?
                .collect();
        let mut last_error = format!("{} resolved to no address", upstream.host);
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok((stream, addr));
                }
                Err(e) => last_error = format!("connecting to {addr}: {e}"),
            }
        }
        Err(last_error)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok((stream, addr))) => Ok((stream, addr, began.elapsed())),
        Ok(Err(e)) => Err(CloseReason::UpstreamUnreachable(e)),
        Err(_) => Err(CloseReason::UpstreamUnreachable(format!(
            "connecting to {upstream} timed out after {}",
            humantime::format_duration(timeout)
        ))),
    }
}
