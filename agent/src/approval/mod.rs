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
//! - `hold`: what a session needs to hold one statement: the request made
//!   from a `review` decision, a guard that cancels it when the session
//!   stops waiting, and the notice and errors the client is shown.
//! - `api`: the reviewer API, HTTP and JSON on a local Unix socket whose
//!   peers are authenticated by their credentials (`SO_PEERCRED`), and
//!   optionally on TCP with TLS for reviewers who sign in with a token.
//! - `tokens`: reviewer tokens, kept as SHA-256 hashes in a root-only file.
//! - `web`: the reviewers' web page the API serves at `/`.
//! - `client`: the same API from the `tollgate approvals` command.
//! - `shared`: the approvals store a fleet shares (`[shared_approvals]`):
//!   each agent mirrors its requests into PostgreSQL and applies the
//!   decisions `tollgate review-server` writes there.
//! - `server`: `tollgate review-server`, the same API over the shared
//!   store, for reviewers of a whole fleet.
//! - `notify`: webhook and Slack notifications of request events, sent by a
//!   task of their own with a bounded queue, retried, never deciding.
//!
//! A PostgreSQL session holds a statement through `hold::Desk` (see
//! `protocol/postgres/session/review.rs`).

pub mod api;
pub mod client;
pub mod grants;
pub mod hold;
pub mod notify;
pub mod registry;
pub mod reviewers;
pub mod server;
pub mod shared;
#[cfg(test)]
mod tests;
pub mod tokens;
pub mod web;

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::policy::Approver;

pub use grants::{Grant, GrantStore, GrantSubject, Merged};
pub use hold::{Desk, HeldStatement, Hold};
pub use registry::{
    ApprovalAsk, ApprovalEffect, ApprovalRecord, Outcome, PriorStatement, Registry, RequestContext,
    RequestEvent, RequestEventKind, RequestView,
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
    /// The grant was revoked or has expired already.
    #[error("{0}")]
    GrantEnded(String),
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
            ApprovalError::Ended(_) | ApprovalError::GrantEnded(_) => 409,
            ApprovalError::NotAnApprover(_)
            | ApprovalError::SelfApproval(_)
            | ApprovalError::NotAllowed(_) => 403,
            ApprovalError::Invalid(_) => 400,
            ApprovalError::TooMany => 503,
            ApprovalError::Store(_) => 500,
        }
    }
}

/// Checks the `review` rules of `policy` against the configuration's named
/// reviewer groups: every `reviewers:NAME` exists, and when every approver
/// of a rule is such a group, it has at least `approvals` distinct users.
/// (Unix groups change at run time: they are not counted.)
pub fn check_review_rules(
    policy: &crate::policy::PolicySet,
    reviewer_groups: &BTreeMap<String, Vec<String>>,
) -> Result<(), String> {
    for (rule, review) in policy.review_rules() {
        let mut possible: Vec<&str> = Vec::new();
        let mut countable = true;
        for approver in &review.approvers {
            match approver {
                Approver::UnixGroup(_) => countable = false,
                Approver::Reviewers(name) => match reviewer_groups.get(name) {
                    Some(users) => possible.extend(users.iter().map(String::as_str)),
                    None => {
                        return Err(format!(
                            "rule \"{rule}\" names approvers \"reviewers:{name}\", but the configuration has no [reviewers.{name}]"
                        ))
                    }
                },
            }
        }
        possible.sort_unstable();
        possible.dedup();
        if countable && possible.len() < review.approvals as usize {
            let users = match possible.len() {
                1 => "1 user".to_owned(),
                n => format!("{n} users"),
            };
            return Err(format!(
                "rule \"{rule}\" needs {} approvals, but its approver groups have only {users}",
                review.approvals
            ));
        }
    }
    Ok(())
}

/// Binds the reviewer socket with the configured mode and group.
pub fn bind_socket(
    agent: &crate::config::AgentSettings,
) -> anyhow::Result<tokio::net::UnixListener> {
    use anyhow::Context as _;
    let path = &agent.approvals_socket;
    let listener = crate::accept::bind_unix_socket(
        path,
        "reviewer socket",
        agent.approvals_socket_mode,
        "agent.approvals_socket",
    )?;
    if let Some(group) = &agent.approvals_socket_group {
        let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
        let gid = reviewers::group_id(&groups, group).with_context(|| {
            format!("agent.approvals_socket_group: no group \"{group}\" in /etc/group")
        })?;
        std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
            format!(
                "cannot give the reviewer socket {} to group {group}",
                path.display()
            )
        })?;
    }
    Ok(listener)
}

/// Binds the reviewer API's TCP listener and loads its certificate, when
/// `approvals_listen` is set. Also looks at the token file once, so that an
/// unsafe one is reported at start rather than at the first login.
pub async fn bind_tls_listener(
    agent: &crate::config::AgentSettings,
    tokens: &tokens::TokenStore,
) -> anyhow::Result<Option<(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)>> {
    use anyhow::Context as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let Some(addr) = agent.approvals_listen else {
        return Ok(None);
    };
    // The configuration check makes both required with a listen address.
    let (Some(cert_path), Some(key_path)) = (&agent.approvals_tls_cert, &agent.approvals_tls_key)
    else {
        anyhow::bail!("agent.approvals_listen needs approvals_tls_cert and approvals_tls_key");
    };
    let chain = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "agent.approvals_tls_cert: cannot read a PEM certificate chain from {}",
                cert_path.display()
            )
        })?;
    if chain.is_empty() {
        anyhow::bail!(
            "agent.approvals_tls_cert: {} holds no PEM certificate",
            cert_path.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key_path).with_context(|| {
        format!(
            "agent.approvals_tls_key: cannot read a PEM private key from {}",
            key_path.display()
        )
    })?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("reviewer API: TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "reviewer API: the key {} does not go with the certificate {}",
                key_path.display(),
                cert_path.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("agent.approvals_listen: cannot listen on {addr} (in use, or not an address of this host?)")
    })?;
    match tokens.current() {
        Ok(file) if file.entries.is_empty() => tracing::warn!(
            path = %tokens.path().display(),
            "reviewer API: no reviewer tokens yet; add one with tollgate approvals tokens add"
        ),
        // An unsafe file was logged as an error already.
        Ok(_) | Err(_) => {}
    }
    Ok(Some((
        listener,
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)),
    )))
}

/// Ends requests whose timeout passed, once a second, until `stop`.
pub async fn expire_requests(
    registry: std::sync::Arc<Registry>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        for id in registry.expire_due(SystemTime::now()) {
            tracing::info!(request = %id, "review: request expired without a decision");
        }
    }
}
