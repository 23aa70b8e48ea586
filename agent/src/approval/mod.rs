//! Human review: statements a `review` rule holds wait here for approvers.
//!
//! - `registry`: pending requests shared by every session, with N-of-M
//!   approvals, segregation of duties (a reviewer is never the requester:
//!   not its uid, not its verified CI actor, not a process inside its
//!   cgroup), expiry, cancel and abort. Pure logic over an injected clock.
//! - `grants`: time-boxed grants an approval may give for the same
//!   statement shape, identity and target, kept in an embedded database
//!   (redb) so that they survive restarts. Pending requests are not kept:
//!   a restart ends them as aborted.
//! - `reviewers`: who a Unix peer is (user name and groups from the local
//!   `passwd` and `group` files).
//! - `api`: the reviewer API, HTTP and JSON on a local Unix socket whose
//!   peers are authenticated by their credentials (`SO_PEERCRED`).
//! - `client`: the same API from the `tollgate approvals` command.
//!
//! Holding a statement inside a PostgreSQL session is not wired yet: a
//! `review` decision is still refused there.

pub mod grants;
pub mod registry;
pub mod reviewers;
#[cfg(test)]
mod tests;

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use grants::{Grant, GrantStore, GrantSubject};
pub use registry::{
    ApprovalAsk, ApprovalEffect, ApprovalRecord, Outcome, Registry, RequestContext, RequestView,
};
pub use reviewers::Reviewer;

/// A request's id: 26 characters of Crockford base32 over a UUIDv7 (48 bits
/// of milliseconds, then random bits), so ids sort by submission time like
/// ULIDs (`01KBM3...`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(String);

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

impl RequestId {
    /// A new id for a request submitted at `now`.
    pub fn new(now: SystemTime) -> RequestId {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, since.as_secs(), since.subsec_nanos());
        RequestId(crockford(uuid::Uuid::new_v7(ts).as_u128()))
    }

    /// Parses an id given by a reviewer (case-insensitive).
    pub fn parse(text: &str) -> Option<RequestId> {
        let upper = text.trim().to_ascii_uppercase();
        let valid = upper.len() == 26
            && upper.bytes().all(|b| CROCKFORD.contains(&b))
            // 26 characters carry 130 bits: the first holds only 3.
            && upper.as_bytes().first().is_some_and(|b| *b <= b'7');
        valid.then_some(RequestId(upper))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn crockford(mut value: u128) -> String {
    let mut out = [b'0'; 26];
    for slot in out.iter_mut().rev() {
        *slot = CROCKFORD[(value & 31) as usize];
        value >>= 5;
    }
    out.iter().map(|&b| b as char).collect()
}

/// Unix seconds of a time (0 before the epoch).
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// Why a reviewer's action changed nothing. Each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    /// No such request (never, or long ago).
    #[error("no such request")]
    UnknownRequest,
    /// No such grant.
    #[error("no such grant")]
    UnknownGrant,
    /// The request was decided, expired, cancelled or aborted already.
    #[error("the request is no longer pending: {0}")]
    Ended(String),
    /// The reviewer is not in the request's approver groups.
    #[error("{0}")]
    NotAnApprover(String),
    /// The reviewer is the requester.
    #[error("{0}")]
    SelfApproval(String),
    /// The rule does not allow what was asked.
    #[error("{0}")]
    NotAllowed(String),
    /// The ask itself is malformed.
    #[error("{0}")]
    Invalid(String),
    /// Too many pending requests.
    #[error("too many statements are waiting for review; refused")]
    TooMany,
    /// The grant store failed.
    #[error("grant store: {0}")]
    Store(String),
}

impl ApprovalError {
    /// The HTTP status the API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            ApprovalError::UnknownRequest | ApprovalError::UnknownGrant => 404,
            ApprovalError::Ended(_) => 409,
            ApprovalError::NotAnApprover(_)
            | ApprovalError::SelfApproval(_)
            | ApprovalError::NotAllowed(_) => 403,
            ApprovalError::Invalid(_) => 400,
            ApprovalError::TooMany => 503,
            ApprovalError::Store(_) => 500,
        }
    }
}
