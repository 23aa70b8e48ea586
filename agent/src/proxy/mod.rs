//! The proxy core: the accept loops of the listeners and the redirect port,
//! and the per-connection session set-up. The agent's start and shutdown
//! are in `crate::agent`.
//!
//! A connection is accepted (then waits for a permit, so `max_connections`
//! bounds the work in flight), the connecting process is identified on a
//! blocking thread while the upstream connection is made, a
//! [`SessionEvent::Started`] is emitted, and the target's protocol handler
//! takes both sockets until the session ends.

pub mod live;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Listener, Protocol};
use crate::events::Arrival;
use crate::events::Events;
use crate::identity::IdentityResolver;
use crate::metrics::Metrics;
use crate::protocol::Refusal;
use crate::redirect::Redirect;
use live::LiveSessions;
use session::{Route, UpstreamAddr};

/// State shared by every listener and session.
pub struct AgentState {
    /// The configuration the agent runs with.
    pub config: Config,
    /// Counters for Prometheus.
    pub metrics: Arc<Metrics>,
    /// Open sessions, for status.
    pub live: LiveSessions,
    /// Where session events go (the recorder among them).
    pub events: Events,
    /// Resolves the process behind a loopback connection.
    pub identity: Arc<IdentityResolver>,
    /// Bounds the sessions served at once.
    pub(crate) permits: Arc<Semaphore>,
    /// Cancelled when the grace period is over: sessions close.
    pub(crate) force_close: CancellationToken,
    /// Listening addresses actually bound (port 0 resolved).
    pub bound: Vec<(SocketAddr, Listener)>,
    /// The transparent redirect, when configured.
    pub redirect: Option<Arc<Redirect>>,
    /// The job timeline, when the redirect traces governed processes.
    pub jobs: Option<Arc<crate::jobs::Jobs>>,
    /// The policy in force.
    pub policy: crate::policy::SharedPolicy,
    /// The session recorder (a sink of `events`), checked before each session.
    pub recorder: Arc<crate::recording::RecordingSink>,
    /// Statement analyses shared by every session.
    pub analysis: Arc<crate::sql::AnalysisCache>,
    /// Addresses redirected connections arrive on.
    pub redirect_bound: Vec<SocketAddr>,
    /// One handler per protocol, with what each shares between sessions.
    pub handlers: crate::protocol::Handlers,
    /// Statements held for review.
    pub approvals: Arc<crate::approval::Registry>,
    /// Grants given by approvals, kept across restarts.
    pub grants: Arc<crate::approval::GrantStore>,
    /// The two above, as sessions use them.
    pub review_desk: Arc<crate::approval::Desk>,
}

/// What an accept loop serves.
pub(crate) enum Entry {
    /// An explicit listener for one target.
    Listener(Arc<Listener>),
    /// The redirect port: targets come from the kernel's origin records.
    Redirect,
}

pub(crate) async fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts sessions until told to stop: at most `max_connections` are
/// served at once across every listener and the redirect port (see
/// [`crate::accept`]).
pub(crate) async fn accept_loop(
    socket: TcpListener,
    entry: Entry,
    shared: Arc<AgentState>,
    stop: CancellationToken,
    sessions: TaskTracker,
) {
    let local = socket.local_addr().ok();
    let endpoint = crate::accept::Endpoint {
        name: "proxy",
        permits: shared.permits.clone(),
        when_full: crate::accept::WhenFull::Wait,
        tasks: sessions,
        counters: shared.metrics.endpoint("proxy"),
    };
    crate::accept::accept_each(socket, endpoint, stop, |stream, peer| {
        let shared = shared.clone();
        let route = match &entry {
            Entry::Listener(l) => Some(listener_route(&shared, l)),
            Entry::Redirect => redirect_route(&shared, peer),
        };
        // No route: a connection on the redirect port the kernel did not
        // send. It is closed (fail closed).
        let route = route?;
        Some(async move {
            if shared.recorder.refuse_new_sessions() {
                refuse_unrecorded(shared, stream, peer, route).await;
            } else {
                session::serve(shared, stream, peer, route).await;
            }
        })
    })
    .await;
    tracing::debug!(listen = ?local, "listener closed");
}

/// Refuses a session because recording has failed (fail closed: nothing
/// may run unrecorded), or because the upload spool is full.
async fn refuse_unrecorded(
    shared: Arc<AgentState>,
    stream: TcpStream,
    peer: SocketAddr,
    route: Route,
) {
    use crate::recording::SessionRefusal;
    let why = shared
        .recorder
        .refusal()
        .unwrap_or_else(|| SessionRefusal::RecordingFailed(String::new()));
    let refusal = match &why {
        SessionRefusal::RecordingFailed(failure) => {
            shared
                .metrics
                .sessions_refused_recording
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(client = %peer, target = %route.target, reason = %failure,
                "session refused: recording has failed");
            Refusal::RecordingFailed { failure }
        }
        SessionRefusal::SpoolFull(why) => {
            shared
                .metrics
                .sessions_refused_spool_full
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(client = %peer, target = %route.target, reason = %why,
                "session refused: the recording upload spool is full");
            Refusal::SpoolFull { why }
        }
    };
    shared
        .handlers
        .for_protocol(route.protocol)
        .refuse(stream, refusal, shared.config.agent.connect_timeout)
        .await;
}

fn listener_route(shared: &AgentState, listener: &Listener) -> Route {
    Route {
        arrival: Arrival::Listener,
        target: listener.target.clone(),
        protocol: shared
            .config
            .targets
            .get(&listener.target)
            .map_or(Protocol::Tcp, |t| t.protocol),
        upstream: UpstreamAddr::Named(listener.upstream.clone()),
        origin: None,
    }
}

fn redirect_route(shared: &AgentState, peer: SocketAddr) -> Option<Route> {
    let redirect = shared.redirect.as_ref()?;
    let Some(origin) = redirect.take_origin(peer) else {
        shared
            .metrics
            .origin_misses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(client = %peer, "connection on the redirect port without a kernel origin record; closed (it did not come through the connect hook)");
        return None;
    };
    let Some(target) = shared.config.targets.iter().nth(origin.target_index) else {
        tracing::warn!(client = %peer, destination = %origin.destination,
            "redirected connection names target #{} which the configuration does not have; closed", origin.target_index);
        return None;
    };
    Some(Route {
        arrival: Arrival::Redirect,
        target: target.name.clone(),
        protocol: target.protocol,
        upstream: UpstreamAddr::Direct(origin.destination),
        origin: Some(origin),
    })
}
