//! The proxy core: listeners, the per-connection session set-up, and the
//! agent's lifecycle (start, serve, drain on shutdown).
//!
//! A connection is accepted (a permit is taken first, so `max_connections`
//! bounds the work in flight), the connecting process is identified on a
//! blocking thread while the upstream connection is made, a
//! [`SessionEvent::Started`] is emitted, and the target's protocol handler
//! takes both sockets until the session ends.

pub mod live;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Listener, Protocol};
use crate::control;
use crate::events::{EventSink, FanOut, LogSink};
use crate::identity::IdentityResolver;
use crate::metrics::{self, Metrics};
use live::LiveSessions;

/// State shared by every listener and session.
pub struct Shared {
    /// The configuration the agent runs with.
    pub config: Config,
    /// Counters for Prometheus.
    pub metrics: Arc<Metrics>,
    /// Open sessions, for status.
    pub live: LiveSessions,
    /// Where session events go.
    pub events: Arc<dyn EventSink>,
    /// Resolves the process behind a loopback connection.
    pub identity: Arc<IdentityResolver>,
    /// Bounds the sessions served at once.
    permits: Arc<Semaphore>,
    /// Cancelled when the grace period is over: sessions close.
    force_close: CancellationToken,
    /// Listening addresses actually bound (port 0 resolved).
    pub bound: Vec<(SocketAddr, Listener)>,
}

/// A started agent: everything is bound and serving.
pub struct RunningAgent {
    shared: Arc<Shared>,
    stop_accepting: CancellationToken,
    sessions: TaskTracker,
    background: TaskTracker,
}

impl RunningAgent {
    /// Binds every listener, the metrics endpoint and the control socket, then
    /// serves. Fails before serving anything if an address is taken.
    pub async fn start(config: Config) -> anyhow::Result<RunningAgent> {
        let metrics = Arc::new(Metrics::new(config.targets.iter().map(|t| t.name.as_str())));
        let events: Arc<dyn EventSink> = Arc::new(
            FanOut::default()
                .with(Arc::new(LogSink))
                .with(metrics.clone()),
        );

        for t in config.targets.iter() {
            if matches!(t.protocol, Protocol::Postgres | Protocol::Mysql) {
                tracing::warn!(
                    target_name = %t.name,
                    "target {}: {} statement inspection is not available in this version; its sessions are relayed as opaque tcp",
                    t.name, t.protocol
                );
            }
        }

        let mut listeners = Vec::new();
        let mut bound = Vec::new();
        for l in &config.listeners {
            let socket = bind_listener(l.listen).await.with_context(|| {
                format!("cannot listen on {} for target \"{}\"", l.listen, l.target)
            })?;
            let addr = socket
                .local_addr()
                .context("reading a bound listener's address")?;
            bound.push((addr, l.clone()));
            listeners.push((socket, l.clone()));
        }
        let metrics_socket = match config.agent.metrics_listen {
            Some(addr) => Some(metrics::bind(addr).await?),
            None => None,
        };
        let control_socket = control::bind(&config.agent.control_socket)?;

        let shared = Arc::new(Shared {
            permits: Arc::new(Semaphore::new(config.agent.max_connections)),
            config,
            metrics,
            live: LiveSessions::default(),
            events,
            identity: Arc::new(IdentityResolver::new()),
            force_close: CancellationToken::new(),
            bound,
        });
        let stop_accepting = CancellationToken::new();
        let sessions = TaskTracker::new();
        let background = TaskTracker::new();

        for (socket, listener) in listeners {
            let addr = socket.local_addr().unwrap_or(listener.listen);
            tracing::info!(listen = %addr, target = %listener.target, upstream = %listener.upstream, "listening");
            background.spawn(accept_loop(
                socket,
                Arc::new(listener),
                shared.clone(),
                stop_accepting.clone(),
                sessions.clone(),
            ));
        }
        if let Some(socket) = metrics_socket {
            if let Ok(addr) = socket.local_addr() {
                tracing::info!(%addr, "metrics at http://{addr}/metrics");
            }
            background.spawn(metrics::serve(
                socket,
                shared.metrics.clone(),
                stop_accepting.clone(),
            ));
        }
        tracing::info!(socket = %shared.config.agent.control_socket.display(), "control socket ready");
        background.spawn(control::serve(
            control_socket,
            shared.clone(),
            stop_accepting.clone(),
        ));

        Ok(RunningAgent {
            shared,
            stop_accepting,
            sessions,
            background,
        })
    }

    /// The shared state (for status and tests).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting, lets open sessions finish for up to `grace` (or until
    /// `hurry` resolves, e.g. a second signal), then closes what is left.
    pub async fn shutdown(self, grace: Duration, hurry: impl std::future::Future<Output = ()>) {
        self.stop_accepting.cancel();
        self.sessions.close();
        self.background.close();
        let open = self.shared.live.len();
        if open > 0 {
            tracing::info!(
                open,
                grace_s = grace.as_secs_f64(),
                "draining: waiting for open sessions to finish"
            );
        }
        tokio::select! {
            _ = self.sessions.wait() => {}
            _ = tokio::time::sleep(grace) => {
                tracing::warn!(open = self.shared.live.len(), "shutdown grace period over; closing the remaining sessions");
            }
            _ = hurry => {
                tracing::warn!(open = self.shared.live.len(), "second signal; closing the remaining sessions now");
            }
        }
        self.shared.force_close.cancel();
        if tokio::time::timeout(Duration::from_secs(5), self.sessions.wait())
            .await
            .is_err()
        {
            tracing::error!("sessions did not close within 5 s of the deadline; exiting anyway");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.background.wait()).await;
        control::remove(&self.shared.config.agent.control_socket);
        tracing::info!("stopped");
    }
}

async fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts until told to stop. A permit is taken before accepting, so at most
/// `max_connections` sessions run; accept errors (such as running out of file
/// descriptors) back off instead of spinning.
async fn accept_loop(
    socket: TcpListener,
    listener: Arc<Listener>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    sessions: TaskTracker,
) {
    let mut backoff = Duration::from_millis(1);
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            permit = shared.permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(1);
                let shared = shared.clone();
                let listener = listener.clone();
                sessions.spawn(async move {
                    session::serve(shared, stream, peer, listener).await;
                    drop(permit);
                });
            }
            Err(e) => {
                shared
                    .metrics
                    .accept_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, listen = %listener.listen, backoff_ms = backoff.as_millis() as u64, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    tracing::debug!(listen = %listener.listen, "listener closed");
}
