//! What a session needs to hold one statement: the request built from a
//! `review` decision, a guard that cancels the request when the session
//! stops waiting (the client went away), and the words the client is shown.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;

use super::{
    ApprovalError, Grant, GrantStore, GrantSubject, Outcome, Registry, RequestContext, RequestId,
};
use crate::identity::ProcessIdentity;
use crate::policy::{DailyWindow, Decision};

/// The minute of the day (0..1440) of `time` in the host's local time zone
/// (glibc reads `TZ` or `/etc/localtime`).
#[allow(unsafe_code)]
pub fn local_minute(time: SystemTime) -> Option<u16> {
    let seconds = libc::time_t::try_from(super::unix_seconds(time)).ok()?;
    // SAFETY: `tm` is plain data that localtime_r fills in; both pointers
    // are valid for the call, and localtime_r is the thread-safe variant.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let filled = unsafe { libc::localtime_r(&seconds, &mut tm) };
    if filled.is_null() {
        return None;
    }
    u16::try_from(tm.tm_hour * 60 + tm.tm_min).ok()
}

/// What sessions hold statements with: the agent's pending requests and
/// the grants approvals gave.
pub struct Desk {
    /// Pending requests, shared by every session.
    pub registry: Arc<Registry>,
    /// Grants, kept across restarts.
    pub grants: Arc<GrantStore>,
}

impl Desk {
    /// The grant in force for a statement of shape `fingerprint` from
    /// `identity` to `target`, if any. An executable that may not be the
    /// one that connected (it changed or could not be verified since the
    /// connect) is never trusted with a grant given to an executable.
    /// Outside the rule's daily `hours` (the host's local time) no grant
    /// is in force.
    pub fn grant_for(
        &self,
        target: &str,
        fingerprint: &str,
        identity: &ProcessIdentity,
        hours: Option<DailyWindow>,
        now: SystemTime,
    ) -> Option<Grant> {
        if let Some(window) = hours {
            // Fail closed: a time that cannot be read is outside.
            if !local_minute(now).is_some_and(|m| window.contains(m)) {
                return None;
            }
        }
        let key = GrantSubject::identity_key(identity)?;
        if key.starts_with("exe:") && !identity.exe_trusted() {
            return None;
        }
        let subject = GrantSubject {
            target: target.to_owned(),
            fingerprint: fingerprint.to_owned(),
            identity: key,
        };
        match self.grants.find(&subject, now) {
            Ok(grant) => grant,
            Err(e) => {
                // Fail closed: without the store the statement is held.
                tracing::warn!(error = %e, "review: cannot read the grant store");
                None
            }
        }
    }
}

/// A statement held for review. Dropping it before its outcome arrived
/// cancels the request.
pub struct Hold {
    id: RequestId,
    timeout: Duration,
    registry: Arc<Registry>,
    outcome: oneshot::Receiver<Outcome>,
    decided: bool,
}

/// Everything about the statement a request is made from.
pub struct HeldStatement<'a> {
    /// The target's name.
    pub target: &'a str,
    /// The database user of the session.
    pub database_user: Option<&'a str>,
    /// The text as the client sent it.
    pub text: &'a str,
    /// What reviewers are shown of it, when that is not `text`: sensitive
    /// literals hidden, or a note that it is withheld.
    pub shown: Option<String>,
    /// How many literals `shown` hides; `None` when it withholds it all.
    pub hidden_literals: Option<usize>,
    /// The session's statements before it.
    pub session_so_far: Vec<super::registry::PriorStatement>,
    /// Its shape, for grants.
    pub fingerprint: Option<&'a str>,
    /// The process behind the session.
    pub identity: &'a ProcessIdentity,
    /// The session's id.
    pub session: &'a str,
}

impl Hold {
    /// Submits a request for a `review` decision; `None` when the decision
    /// has no review settings (a default decided `review`: nobody is named
    /// to approve it, so the session refuses it).
    pub fn submit(
        registry: &Arc<Registry>,
        decision: &Decision,
        statement: HeldStatement<'_>,
        now: SystemTime,
    ) -> Option<Result<Hold, ApprovalError>> {
        let rule = decision.deciding_rule()?;
        let review = rule.review.clone()?;
        let timeout = review.timeout;
        let context = RequestContext {
            target: statement.target.to_owned(),
            database_user: statement.database_user.map(str::to_owned),
            statement: statement.shown.unwrap_or_else(|| statement.text.to_owned()),
            run_text: statement.text.to_owned(),
            hidden_literals: statement.hidden_literals,
            session_so_far: statement.session_so_far,
            fingerprint: statement.fingerprint.map(str::to_owned),
            rule: rule.name.to_string(),
            rule_message: rule.message.as_deref().map(str::to_owned),
            review,
            identity: statement.identity.clone(),
            session: Some(statement.session.to_owned()),
        };
        Some(registry.submit(context, now).map(|(id, outcome)| Hold {
            id,
            timeout,
            registry: Arc::clone(registry),
            outcome,
            decided: false,
        }))
    }

    /// How long it may wait.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The request's id.
    pub fn id(&self) -> &RequestId {
        &self.id
    }

    /// The notice the client gets at once.
    pub fn notice(&self) -> String {
        format!(
            "tollgate: statement held for review (request {id}), waiting up to {}; approve with: tollgate approvals approve {id}",
            humantime::format_duration(self.timeout),
            id = self.id
        )
    }

    /// Waits for the outcome (the registry ends every request: decided,
    /// expired, cancelled or aborted).
    pub async fn outcome(mut self) -> Outcome {
        let outcome = (&mut self.outcome).await.unwrap_or(Outcome::Aborted);
        self.decided = true;
        outcome
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.decided && self.registry.cancel(&self.id) {
            tracing::info!(request = %self.id, "review: request cancelled (the client went away)");
        }
    }
}

impl Outcome {
    /// The error the client gets when the statement will not run; `None`
    /// for an approval.
    pub fn client_error(&self, timeout: Duration) -> Option<String> {
        match self {
            Outcome::Approved { .. } => None,
            Outcome::Denied { by, reason, .. } => Some(format!(
                "tollgate: statement denied by reviewer {by}: {reason}"
            )),
            Outcome::Expired => Some(format!(
                "tollgate: statement not approved within {}; the review request expired",
                humantime::format_duration(timeout)
            )),
            Outcome::Cancelled => Some("tollgate: review request cancelled".to_owned()),
            Outcome::Aborted => Some(
                "tollgate: review request aborted: the agent stopped before a decision".to_owned(),
            ),
        }
    }
}
