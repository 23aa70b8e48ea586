//! Protocol handlers: what happens between an accepted client socket and its
//! upstream once the session is set up. One folder per protocol; each is
//! handed the two sockets and a [`SessionContext`], and returns why the
//! session ended.

pub mod postgres;
pub mod tcp;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::events::SessionInfo;
use crate::metrics::TargetMetrics;
use crate::proxy::live::SessionCounters;

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
}
