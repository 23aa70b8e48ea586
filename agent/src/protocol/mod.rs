//! Protocol handlers: what happens between an accepted client socket and its
//! upstream once the session is set up.
//!
//! The proxy accepts a connection, identifies the process behind it while
//! it connects upstream, and then hands both sockets to the [`Handler`] of
//! the target's protocol with a [`SessionContext`]. A handler owns the
//! session from there: its protocol's start-up (waiting for the identity
//! with [`SessionStart::info`] before it decides or records anything), the
//! decisions, the events, and why the session ended. State a protocol
//! shares between its sessions (PostgreSQL's cancel keys and TLS material)
//! lives in its handler, not in the proxy. [`Handlers`] holds one handler
//! per protocol; adding a protocol means a folder here, an implementation of
//! [`Handler`], and one arm in [`Handlers::for_protocol`]
//! (docs/architecture.md, "Adding a protocol").
//!
//! Dependencies run one way: `proxy` → `protocol` → `sql`, `policy`,
//! `masking`, `approval`, `recording` (through `events`).

pub mod mysql;
pub mod postgres;
pub mod review;
pub mod ssh;
pub mod tcp;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::OnceCell;
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{Config, Protocol};
use crate::events::{CloseReason, Events, SessionInfo};
use crate::identity::ProcessIdentity;
use crate::metrics::TargetMetrics;
use crate::policy::SharedPolicy;
use crate::sql::AnalysisCache;

/// What a protocol handler gets to know and to update about its session.
pub struct SessionContext {
    /// The session's id.
    pub id: Uuid,
    /// The target's name.
    pub target: String,
    /// The session as it started, once the process behind it is known.
    pub start: SessionStart,
    /// Per-session byte counters (for status).
    pub counters: Arc<SessionCounters>,
    /// Per-target counters (for metrics).
    pub target_metrics: Arc<TargetMetrics>,
    /// Close the session when nothing flowed for this long.
    pub idle_timeout: Duration,
    /// Cancelled when the agent's shutdown grace period is over.
    pub force_close: CancellationToken,
    /// The policy in force; replaced as a whole on reload, so a session reads
    /// the current set once per decision.
    pub policy: SharedPolicy,
    /// Statement analyses, cached by text across sessions.
    pub analysis: Arc<AnalysisCache>,
    /// Where the handler reports what happens in the session, and whether
    /// recording has failed (fail closed) or records raw bytes.
    pub events: Events,
    /// The address the upstream connection was made to.
    pub upstream_addr: SocketAddr,
    /// The host name or IP the upstream was reached by (the TLS server name
    /// unless the target sets one).
    pub upstream_name: String,
    /// Where statements a `review` rule holds wait for reviewers (`None`:
    /// such statements are refused).
    pub approvals: Option<Arc<crate::approval::Desk>>,
}

/// A handler's future: boxed, so that handlers of different protocols can
/// be chosen at run time (one allocation per session).
pub type HandlerFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a protocol implements to serve the sessions of its targets.
pub trait Handler: Send + Sync {
    /// Serves one session until it ends and says why. Both sockets are
    /// the handler's; the session is announced by the first
    /// [`SessionStart::info`] (or by the proxy after this returns).
    fn serve<'a>(
        &'a self,
        ctx: &'a SessionContext,
        client: TcpStream,
        upstream: TcpStream,
    ) -> HandlerFuture<'a, CloseReason>;

    /// Turns a client away before its session starts, telling it why in
    /// the protocol's own terms where the protocol has a way to (a relay
    /// that has none closes the connection). Waits at most `timeout` for
    /// the client.
    fn refuse<'a>(
        &'a self,
        client: TcpStream,
        refusal: Refusal<'a>,
        timeout: Duration,
    ) -> HandlerFuture<'a, ()>;
}

/// Why a client is turned away before its session starts.
#[derive(Debug, Clone, Copy)]
pub enum Refusal<'a> {
    /// The target's server could not be reached.
    UpstreamUnreachable {
        /// The target's name.
        target: &'a str,
        /// What connecting said.
        cause: &'a str,
    },
    /// Session recording has failed, and nothing may run unrecorded.
    RecordingFailed {
        /// What failed.
        failure: &'a str,
    },
    /// Too many recordings wait for upload (`[upload] max_spool_size`):
    /// new sessions wait until uploads catch up, so nothing is dropped.
    SpoolFull {
        /// How full, in words.
        why: &'a str,
    },
}

/// One handler per protocol, with the state each shares between its
/// sessions.
pub struct Handlers {
    postgres: postgres::PostgresHandler,
    mysql: mysql::MysqlHandler,
    ssh: ssh::SshHandler,
    tcp: tcp::TcpRelay,
}

impl Handlers {
    /// The handlers for `config`'s targets (their TLS material is loaded
    /// here, so a bad certificate stops the start).
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        Ok(Handlers {
            postgres: postgres::PostgresHandler::new(config)?,
            mysql: mysql::MysqlHandler::new(config)?,
            ssh: ssh::SshHandler::new(config)?,
            tcp: tcp::TcpRelay,
        })
    }

    /// The handler of `protocol`'s sessions.
    pub fn for_protocol(&self, protocol: Protocol) -> &dyn Handler {
        match protocol {
            Protocol::Postgres => &self.postgres,
            Protocol::Mysql => &self.mysql,
            Protocol::Ssh => &self.ssh,
            Protocol::Tcp => &self.tcp,
        }
    }
}

/// Byte counters of one session, updated by its handler as data flows and
/// read by `tollgate status`.
#[derive(Debug, Default)]
pub struct SessionCounters {
    /// Bytes from the client.
    pub from_client: AtomicU64,
    /// Bytes from the upstream.
    pub from_upstream: AtomicU64,
    /// The executable's SHA-256 when it was hashed after the session
    /// started (a large executable is hashed off the session's path), so
    /// `tollgate status` shows it once known.
    pub late_exe_sha256: std::sync::OnceLock<String>,
}

/// The outcome of a process identity lookup: the identity and how long
/// the lookup took.
pub type IdentityLookup = Result<(ProcessIdentity, Duration), JoinError>;

/// Turns a finished identity lookup into the session's [`SessionInfo`] and
/// announces the session (the `Started` event, the live table).
pub type Announce = Box<dyn FnOnce(IdentityLookup) -> Arc<SessionInfo> + Send + Sync>;

/// The start of a session, completed when the process behind it is known.
///
/// The identity lookup reads `/proc` and takes about a millisecond. A
/// handler starts its protocol's set-up at once (PostgreSQL forwards the
/// start-up packet, so the server authenticates and builds its backend
/// meanwhile) and waits with [`SessionStart::info`] before anything is
/// decided or recorded. Nothing reaches the recording before the session's
/// `Started` event, which needs the identity.
pub struct SessionStart {
    info: OnceCell<Arc<SessionInfo>>,
    /// Awaited by reference, so a caller cancelled while waiting leaves it
    /// for the next one.
    lookup: tokio::sync::Mutex<JoinHandle<(ProcessIdentity, Duration)>>,
    announce: Mutex<Option<Announce>>,
}

impl SessionStart {
    pub fn new(lookup: JoinHandle<(ProcessIdentity, Duration)>, announce: Announce) -> Self {
        SessionStart {
            info: OnceCell::new(),
            lookup: tokio::sync::Mutex::new(lookup),
            announce: Mutex::new(Some(announce)),
        }
    }

    /// The session's information, waiting for the identity lookup if it is
    /// still running; the first call announces the session.
    pub async fn info(&self) -> &Arc<SessionInfo> {
        self.info
            .get_or_init(|| async {
                let looked_up = {
                    let mut lookup = self.lookup.lock().await;
                    (&mut *lookup).await
                };
                let announce = self.announce.lock().ok().and_then(|mut a| a.take());
                match announce {
                    Some(announce) => announce(looked_up),
                    // The cell is set right after the one announcement.
                    None => unreachable!("a session is announced once"),
                }
            })
            .await
    }

    /// The session's information if the lookup has finished and been
    /// announced.
    pub fn get(&self) -> Option<&Arc<SessionInfo>> {
        self.info.get()
    }
}

/// A session's description for unit tests: a listener session of target
/// `db` from `identity`.
#[cfg(test)]
pub(crate) fn test_session_info(identity: ProcessIdentity) -> Arc<SessionInfo> {
    use crate::config::Protocol;
    use crate::events::Arrival;
    Arc::new(SessionInfo {
        id: Uuid::now_v7(),
        started_at: std::time::SystemTime::now(),
        arrival: Arrival::Listener,
        local: SocketAddr::from(([127, 0, 0, 1], 6432)),
        client: SocketAddr::from(([127, 0, 0, 1], 50000)),
        target: "db".to_owned(),
        protocol: Protocol::Postgres,
        upstream: "127.0.0.1:5432".to_owned(),
        identity,
        kernel: None,
        job: None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::panic)]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A start whose lookup finishes when `release` is notified, counting
    /// announcements.
    fn gated_start(release: Arc<tokio::sync::Notify>, announced: Arc<AtomicUsize>) -> SessionStart {
        let lookup = tokio::spawn(async move {
            release.notified().await;
            let identity = ProcessIdentity {
                pid: Some(4242),
                ..ProcessIdentity::default()
            };
            (identity, Duration::from_micros(700))
        });
        SessionStart::new(
            lookup,
            Box::new(move |looked_up| {
                announced.fetch_add(1, Ordering::SeqCst);
                let (identity, _) = looked_up.expect("the lookup task does not fail");
                super::test_session_info(identity)
            }),
        )
    }

    #[tokio::test]
    async fn the_session_is_announced_once_when_its_identity_is_known() {
        let release = Arc::new(tokio::sync::Notify::new());
        let announced = Arc::new(AtomicUsize::new(0));
        let start = gated_start(release.clone(), announced.clone());

        // Nothing is announced while the lookup runs.
        let waited = tokio::time::timeout(Duration::from_millis(50), start.info()).await;
        assert!(
            waited.is_err(),
            "info() returned before the lookup finished"
        );
        assert!(start.get().is_none());
        assert_eq!(announced.load(Ordering::SeqCst), 0);

        // A caller cancelled while waiting (above) leaves the lookup for the
        // next one, which gets the identity.
        release.notify_one();
        let info = start.info().await;
        assert_eq!(info.identity.pid, Some(4242));
        assert_eq!(start.info().await.id, info.id);
        assert_eq!(start.get().map(|i| i.id), Some(info.id));
        assert_eq!(announced.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_waiters_share_one_announcement() {
        let release = Arc::new(tokio::sync::Notify::new());
        let announced = Arc::new(AtomicUsize::new(0));
        let start = gated_start(release.clone(), announced.clone());
        let (a, b, ()) = tokio::join!(start.info(), start.info(), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            release.notify_one();
        });
        assert_eq!(a.id, b.id);
        assert_eq!(announced.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_lookup_that_panicked_is_announced_with_the_failure() {
        let lookup = tokio::spawn(async { panic!("reading /proc failed badly") });
        let start = SessionStart::new(
            lookup,
            Box::new(|looked_up| {
                let identity = match looked_up {
                    Ok((identity, _)) => identity,
                    Err(e) => ProcessIdentity {
                        gaps: vec![format!("identity lookup did not finish: {e}")],
                        ..ProcessIdentity::default()
                    },
                };
                super::test_session_info(identity)
            }),
        );
        let info = start.info().await;
        assert_eq!(info.identity.pid, None);
        assert!(
            info.identity.gaps[0].contains("identity lookup did not finish"),
            "{:?}",
            info.identity.gaps
        );
    }
}
