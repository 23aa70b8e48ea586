//! Protocol handlers: what happens between an accepted client socket and its
//! upstream once the session is set up. One folder per protocol; each is
//! handed the two sockets and a [`SessionContext`], and returns why the
//! session ended.

pub mod postgres;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::events::{Events, SessionInfo};
use crate::identity::ProcessIdentity;
use crate::metrics::TargetMetrics;
use crate::policy::PolicySet;
use crate::proxy::live::SessionCounters;
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
    /// Client-visible cancel keys, shared by all sessions.
    pub cancel: Arc<postgres::cancel::CancelRegistry>,
    /// TLS material for both legs.
    pub tls: Arc<postgres::tls::TlsState>,
    /// Where statements a `review` rule holds wait for reviewers (`None`:
    /// such statements are refused).
    pub approvals: Option<Arc<crate::approval::Desk>>,
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

/// The loaded policy, swapped atomically on reload.
pub type SharedPolicy = Arc<std::sync::RwLock<Arc<PolicySet>>>;

/// The current policy of a shared handle (the empty set if the lock was
/// poisoned, which cannot happen: writers only swap an `Arc`).
pub fn current_policy(policy: &SharedPolicy) -> Arc<PolicySet> {
    policy
        .read()
        .map(|p| p.clone())
        .unwrap_or_else(|_| Arc::new(PolicySet::empty()))
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
