//! Protocol handlers: what happens between an accepted client socket and its
//! upstream once the session is set up. One folder per protocol; each is
//! handed the two sockets and a [`SessionContext`], and returns why the
//! session ended.

pub mod postgres;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::events::{Events, SessionInfo};
use crate::metrics::TargetMetrics;
use crate::policy::PolicySet;
use crate::proxy::live::SessionCounters;
use crate::sql::AnalysisCache;

/// What a protocol handler gets to know and to update about its session.
pub struct SessionContext {
    /// The session as it started.
    pub info: Arc<SessionInfo>,
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
