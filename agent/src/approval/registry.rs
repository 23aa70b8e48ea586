//! The requests waiting for reviewers, shared by every session: pure logic
//! over an injected clock (every call takes `now`), so that expiry, N of M
//! and segregation of duties are tested without sleeping.
//!
//! What happens to requests is also broadcast as [`RequestEvent`]s (for
//! `/v1/watch` and notifications). The channel is bounded: a subscriber
//! that falls behind misses events and is told how many, and the registry
//! never waits for one.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};

use super::{unix_seconds, ApprovalError, GrantSubject, RequestId, Reviewer};
use crate::identity::ProcessIdentity;
use crate::policy::{Approver, GrantScope, ReviewSettings};

/// Requests pending at once; a flood of held statements is refused rather
/// than allowed to grow the agent without bound.
pub const MAX_PENDING: usize = 10_000;
/// Decided requests kept for `show` and for a late reviewer's 409.
const MAX_ENDED: usize = 256;
/// Longest statement text, reason and edit kept or accepted.
pub const MAX_TEXT: usize = 64 * 1024;
/// Request events kept for subscribers that have not read them yet; one
/// further behind is told it lagged.
const EVENT_BUFFER: usize = 1024;

/// What happened to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestEventKind {
    /// Pending when a watcher subscribed (only the start of a watch).
    Pending,
    /// A statement was held.
    Requested,
    /// An approval counted; more are needed.
    ApprovalCounted,
    /// Enough reviewers approved.
    Approved,
    /// A reviewer refused it.
    Denied,
    /// A reviewer replaced the text (the count starts again).
    Edited,
    /// No decision within the timeout.
    Expired,
    /// The client went away.
    Cancelled,
    /// The agent stopped.
    Aborted,
}

impl RequestEventKind {
    /// The name used in JSON, configuration and notifications.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestEventKind::Pending => "pending",
            RequestEventKind::Requested => "requested",
            RequestEventKind::ApprovalCounted => "approval_counted",
            RequestEventKind::Approved => "approved",
            RequestEventKind::Denied => "denied",
            RequestEventKind::Edited => "edited",
            RequestEventKind::Expired => "expired",
            RequestEventKind::Cancelled => "cancelled",
            RequestEventKind::Aborted => "aborted",
        }
    }

    /// The event that ends a request with `outcome`.
    pub fn of_outcome(outcome: &Outcome) -> RequestEventKind {
        match outcome {
            Outcome::Approved { .. } => RequestEventKind::Approved,
            Outcome::Denied { .. } => RequestEventKind::Denied,
            Outcome::Expired => RequestEventKind::Expired,
            Outcome::Cancelled => RequestEventKind::Cancelled,
            Outcome::Aborted => RequestEventKind::Aborted,
        }
    }
}

/// One thing that happened to a request, with the request as it is after
/// it (shared: every subscriber gets the same copy).
#[derive(Debug, Clone, Serialize)]
pub struct RequestEvent {
    /// What happened.
    pub event: RequestEventKind,
    /// When, in Unix seconds.
    pub at: u64,
    /// The request afterwards.
    pub request: Arc<RequestView>,
}

/// Everything a reviewer is shown and segregation of duties is checked
/// against.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestContext {
    /// The target's configured name.
    pub target: String,
    /// The database user the session logged in as.
    pub database_user: Option<String>,
    /// The statement as reviewers see it: as the client sent it, except
    /// that literals meeting a masked column read `'***'`
    /// (`crate::sql::shown_to_reviewer`).
    pub statement: String,
    /// The statement as the client sent it, which runs if approved;
    /// never shown.
    #[serde(skip)]
    pub run_text: String,
    /// How many literals of `statement` are hidden; `None` when the whole
    /// text is withheld (it holds sensitive literals that cannot be cut
    /// out safely).
    pub hidden_literals: Option<usize>,
    /// The session's statements before this one, oldest first (the last
    /// few, shortened, sensitive literals hidden as in `statement`).
    pub session_so_far: Vec<PriorStatement>,
    /// Its shape (pg_query fingerprint), which a grant covers.
    pub fingerprint: Option<String>,
    /// The review rule that held it.
    pub rule: String,
    /// The rule's message.
    pub rule_message: Option<String>,
    /// The rule's approvers, approvals, timeout and grant scope.
    pub review: Arc<ReviewSettings>,
    /// The process behind the session (uid, executable, cgroup, CI job).
    pub identity: ProcessIdentity,
    /// The session the statement came in.
    pub session: Option<String>,
}

/// A statement a session ran (or had refused) before the held one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriorStatement {
    /// Unix seconds when it was decided.
    pub at: u64,
    /// What the policy decided (`allow`, `deny`, `mask`, ...).
    pub action: String,
    /// Whether it was refused.
    pub refused: bool,
    /// Its text as reviewers may see it.
    pub statement: String,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Enough distinct reviewers approved: run `text` (the original, or the
    /// last reviewer's edit, which the policy decides again).
    Approved {
        /// The text to run; not shown to reviewers, whose view of it may
        /// hide literals.
        #[serde(skip)]
        text: String,
        /// Whether `text` is a reviewer's edit.
        edited: bool,
        /// The reviewers whose approvals counted, in order.
        by: Vec<String>,
    },
    /// A reviewer refused it.
    Denied {
        /// The reviewer.
        by: String,
        /// Why.
        reason: String,
        /// How the reviewer authenticated: `unix:UID` or `token:NAME`.
        via: String,
    },
    /// No decision within the rule's timeout.
    Expired,
    /// The client went away while it waited.
    Cancelled,
    /// The agent stopped; pending requests are not kept across restarts.
    Aborted,
}

/// One approval that counts towards a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApprovalRecord {
    /// The reviewer's user name.
    pub by: String,
    /// The reviewer's uid.
    pub uid: u32,
    /// Why, in the reviewer's words.
    pub reason: Option<String>,
    /// A grant this reviewer asked for, in seconds.
    pub grant_seconds: Option<u64>,
    /// When, in Unix seconds.
    pub at: u64,
    /// How the reviewer authenticated: `unix:UID` or `token:NAME`.
    pub via: String,
}

/// A request as `list` and `show` present it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestView {
    /// The request's id.
    pub id: RequestId,
    /// What was held, and by whom.
    pub context: RequestContext,
    /// When it was submitted, in Unix seconds.
    pub submitted_at: u64,
    /// When it expires, in Unix seconds.
    pub expires_at: u64,
    /// The text that runs if approved as reviewers see it (an edit
    /// replaces the original; see [`RequestContext::statement`]).
    pub text: String,
    /// The text that runs if approved; never shown.
    #[serde(skip)]
    pub run_text: String,
    /// Who edited `text`, if someone did.
    pub edited_by: Option<String>,
    /// Approvals so far.
    pub approvals: Vec<ApprovalRecord>,
    /// Approvals needed.
    pub approvals_needed: u32,
    /// `None` while pending.
    pub outcome: Option<Outcome>,
    /// The agent that holds the statement, in a list served from the
    /// shared approvals store (`None` on the agent's own API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// What a reviewer's approval asks for.
#[derive(Debug, Clone, Default)]
pub struct ApprovalAsk {
    /// Why.
    pub reason: Option<String>,
    /// The text to run instead of the held one.
    pub edit: Option<String>,
    /// A grant for the same shape, identity and target, this long.
    pub grant: Option<Duration>,
}

/// What an approval did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalEffect {
    /// Counted; more approvals are needed.
    Counted {
        /// Distinct approvals so far.
        have: u32,
        /// Approvals needed.
        need: u32,
    },
    /// The request is approved; `grant` is set when every counted approval
    /// asked for one (the shortest of them).
    Approved {
        /// The outcome sent to the held session.
        outcome: Outcome,
        /// The grant to store.
        grant: Option<Duration>,
    },
}

struct Pending {
    view: RequestView,
    deadline: SystemTime,
    reply: Option<oneshot::Sender<Outcome>>,
}

#[derive(Default)]
struct State {
    pending: BTreeMap<RequestId, Pending>,
    ended: VecDeque<RequestView>,
}

/// The request registry.
pub struct Registry {
    state: Mutex<State>,
    /// Named reviewer groups of the configuration: name → user names.
    reviewer_groups: BTreeMap<String, Vec<String>>,
    /// What happens to requests, for watchers and notifications.
    events: broadcast::Sender<RequestEvent>,
    /// The sessions that ran under each grant, newest last, so that a
    /// revocation is recorded where the grant was used.
    grant_users: Mutex<BTreeMap<RequestId, Vec<uuid::Uuid>>>,
}

/// Grants whose users are remembered (the newest), and sessions per grant.
const GRANTS_TRACKED: usize = 1024;
const USERS_PER_GRANT: usize = 256;

impl Registry {
    /// An empty registry with the configuration's `[reviewers.NAME]` groups.
    pub fn new(reviewer_groups: BTreeMap<String, Vec<String>>) -> Registry {
        Registry {
            state: Mutex::new(State::default()),
            reviewer_groups,
            events: broadcast::channel(EVENT_BUFFER).0,
            grant_users: Mutex::default(),
        }
    }

    /// Remembers that `session` ran a statement under `grant`.
    pub fn note_grant_use(&self, grant: &RequestId, session: uuid::Uuid) {
        let mut users = self
            .grant_users
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let sessions = users.entry(grant.clone()).or_default();
        if !sessions.contains(&session) {
            if sessions.len() == USERS_PER_GRANT {
                sessions.remove(0);
            }
            sessions.push(session);
        }
        // Ids sort by time: the oldest grant is forgotten first.
        while users.len() > GRANTS_TRACKED {
            users.pop_first();
        }
    }

    /// The sessions remembered to have run under `grant`.
    pub fn grant_users(&self, grant: &RequestId) -> Vec<uuid::Uuid> {
        self.grant_users
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(grant)
            .cloned()
            .unwrap_or_default()
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<RequestEvent> {
        self.events.subscribe()
    }

    /// The pending requests and the events after them, taken together so
    /// that a watcher misses nothing and sees nothing twice.
    pub fn watch(&self) -> (Vec<RequestView>, broadcast::Receiver<RequestEvent>) {
        let state = self.state();
        let pending = state.pending.values().map(|p| p.view.clone()).collect();
        (pending, self.events.subscribe())
    }

    /// Publishes an event; called with the state locked, so events are in
    /// the order of the changes. Never waits: nobody listening is fine.
    fn publish(&self, event: RequestEventKind, view: &RequestView, now: SystemTime) {
        if self.events.receiver_count() == 0 {
            return;
        }
        let _ = self.events.send(RequestEvent {
            event,
            at: unix_seconds(now),
            request: Arc::new(view.clone()),
        });
    }

    /// Moves a pending request to the ended list, tells its session and
    /// publishes how it ended.
    fn end(&self, state: &mut State, id: &RequestId, outcome: Outcome, now: SystemTime) -> bool {
        let kind = RequestEventKind::of_outcome(&outcome);
        if !end(state, id, outcome) {
            return false;
        }
        if let Some(view) = state.ended.back() {
            self.publish(kind, view, now);
        }
        true
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds a statement: its id, and the outcome the session waits for.
    pub fn submit(
        &self,
        mut context: RequestContext,
        now: SystemTime,
    ) -> Result<(RequestId, oneshot::Receiver<Outcome>), ApprovalError> {
        let mut state = self.state();
        if state.pending.len() >= MAX_PENDING {
            return Err(ApprovalError::TooMany);
        }
        truncate(&mut context.statement);
        truncate(&mut context.run_text);
        let id = RequestId::new(now);
        let (reply, outcome) = oneshot::channel();
        let deadline = now + context.review.timeout;
        let view = RequestView {
            id: id.clone(),
            submitted_at: unix_seconds(now),
            expires_at: unix_seconds(deadline),
            text: context.statement.clone(),
            run_text: context.run_text.clone(),
            edited_by: None,
            approvals: Vec::new(),
            approvals_needed: context.review.approvals,
            outcome: None,
            host: None,
            context,
        };
        self.publish(RequestEventKind::Requested, &view, now);
        state.pending.insert(
            id.clone(),
            Pending {
                view,
                deadline,
                reply: Some(reply),
            },
        );
        Ok((id, outcome))
    }

    /// Takes in a request held elsewhere (by the agent named in
    /// `view.host`, through the shared approvals store), to be decided here
    /// as if it were held here: the outcome goes to the returned receiver.
    /// `None` when the id is known already, pending or ended.
    pub fn adopt(
        &self,
        mut view: RequestView,
        now: SystemTime,
    ) -> Option<oneshot::Receiver<Outcome>> {
        let mut state = self.state();
        if state.pending.contains_key(&view.id)
            || state.ended.iter().any(|v| v.id == view.id)
            || state.pending.len() >= MAX_PENDING
        {
            return None;
        }
        view.outcome = None;
        let deadline = std::time::UNIX_EPOCH + Duration::from_secs(view.expires_at);
        let (reply, outcome) = oneshot::channel();
        self.publish(RequestEventKind::Requested, &view, now);
        state.pending.insert(
            view.id.clone(),
            Pending {
                view,
                deadline,
                reply: Some(reply),
            },
        );
        Some(outcome)
    }

    /// Ends a pending request with an outcome decided elsewhere: `decide`
    /// makes it from the request as held here, and may record on it what
    /// was decided (the approvals, an edit). False when the request is not
    /// pending here (it ended already, or was never here).
    pub fn settle(
        &self,
        id: &RequestId,
        now: SystemTime,
        decide: impl FnOnce(&mut RequestView) -> Outcome,
    ) -> bool {
        let mut state = self.state();
        let Some(pending) = state.pending.get_mut(id) else {
            return false;
        };
        let outcome = decide(&mut pending.view);
        self.end(&mut state, id, outcome, now)
    }

    /// Pending requests, oldest first.
    pub fn list(&self) -> Vec<RequestView> {
        self.state()
            .pending
            .values()
            .map(|p| p.view.clone())
            .collect()
    }

    /// One request, pending or recently ended.
    pub fn show(&self, id: &RequestId) -> Option<RequestView> {
        let state = self.state();
        state
            .pending
            .get(id)
            .map(|p| p.view.clone())
            .or_else(|| state.ended.iter().find(|v| &v.id == id).cloned())
    }

    /// Whether `reviewer` belongs to one of `approvers`.
    pub fn is_approver(&self, reviewer: &Reviewer, approvers: &[Approver]) -> bool {
        approvers.iter().any(|a| match a {
            Approver::UnixGroup(group) => reviewer.groups.iter().any(|g| g == group),
            Approver::Reviewers(name) => self
                .reviewer_groups
                .get(name)
                .is_some_and(|users| users.contains(&reviewer.user)),
        })
    }

    /// Checks that `reviewer` may decide the request: an approver, and not
    /// the requester (uid, verified CI actor, or inside its cgroup).
    fn may_decide(&self, reviewer: &Reviewer, view: &RequestView) -> Result<(), ApprovalError> {
        let context = &view.context;
        if !self.is_approver(reviewer, &context.review.approvers) {
            let groups: Vec<String> = context
                .review
                .approvers
                .iter()
                .map(|a| a.to_string())
                .collect();
            return Err(ApprovalError::NotAnApprover(format!(
                "{} is not in any approver group of rule \"{}\" ({})",
                reviewer.user,
                context.rule,
                groups.join(", ")
            )));
        }
        if let Some(why) = same_requester(reviewer, &context.identity) {
            return Err(ApprovalError::SelfApproval(why));
        }
        Ok(())
    }

    /// Records an approval; decides the request once enough distinct
    /// reviewers approved the same text.
    pub fn approve(
        &self,
        id: &RequestId,
        reviewer: &Reviewer,
        ask: ApprovalAsk,
        now: SystemTime,
    ) -> Result<ApprovalEffect, ApprovalError> {
        self.approve_giving(id, reviewer, ask, now, |_, _, _| Ok(()))
    }

    /// [`Registry::approve`], where an approval that gives a grant first
    /// has `give` store it, before the held session is released: the grant
    /// is in force (and recorded) by the time the statement runs, and a
    /// grant that cannot be stored leaves the request pending, its last
    /// approval not counted.
    pub fn approve_giving(
        &self,
        id: &RequestId,
        reviewer: &Reviewer,
        mut ask: ApprovalAsk,
        now: SystemTime,
        give: impl FnOnce(&RequestView, &Outcome, Duration) -> Result<(), ApprovalError>,
    ) -> Result<ApprovalEffect, ApprovalError> {
        let mut state = self.state();
        let pending = match state.pending.get_mut(id) {
            Some(p) => p,
            None => return Err(ended_or_unknown(&state, id)),
        };
        if now >= pending.deadline {
            drop(state);
            self.expire_due(now);
            return Err(ApprovalError::Ended("expired".into()));
        }
        self.may_decide(reviewer, &pending.view)?;
        for text in [&mut ask.reason, &mut ask.edit].into_iter().flatten() {
            if text.len() > MAX_TEXT {
                return Err(ApprovalError::Invalid(format!(
                    "text longer than {MAX_TEXT} bytes"
                )));
            }
        }
        if let Some(edit) = &ask.edit {
            if edit.trim().is_empty() {
                return Err(ApprovalError::Invalid(
                    "the edited statement is empty".into(),
                ));
            }
            if ask.grant.is_some() {
                return Err(ApprovalError::NotAllowed(
                    "a grant covers the held statement's shape; an edited statement cannot give one (approve the edit for this statement only)".into(),
                ));
            }
        }
        if let Some(grant) = ask.grant {
            match pending.view.context.review.grant {
                GrantScope::Statement => {
                    return Err(ApprovalError::NotAllowed(format!(
                    "rule \"{}\" lets an approval cover this statement only; it allows no grant",
                    pending.view.context.rule
                )))
                }
                GrantScope::UpTo(max) if grant > max => {
                    return Err(ApprovalError::NotAllowed(format!(
                        "rule \"{}\" allows grants of at most {}",
                        pending.view.context.rule,
                        humantime::format_duration(max)
                    )))
                }
                GrantScope::UpTo(_) if grant.is_zero() => {
                    return Err(ApprovalError::Invalid("a grant of no time".into()))
                }
                GrantScope::UpTo(_) => {}
            }
            if GrantSubject::identity_key(&pending.view.context.identity).is_none() {
                return Err(ApprovalError::NotAllowed(
                    "the requester has neither a verified CI repository nor a known executable to grant to".into(),
                ));
            }
            if pending.view.context.fingerprint.is_none() {
                return Err(ApprovalError::NotAllowed(
                    "the statement has no shape to grant (it does not parse)".into(),
                ));
            }
        }
        let view = &mut pending.view;
        // An edit that changes the text starts the count again: earlier
        // approvals were for another statement.
        if let Some(edit) = ask.edit.take() {
            if edit != view.text {
                view.run_text.clone_from(&edit);
                view.text = edit;
                view.edited_by = Some(reviewer.user.clone());
                view.approvals.clear();
                self.publish(RequestEventKind::Edited, view, now);
            }
        }
        let record = ApprovalRecord {
            by: reviewer.user.clone(),
            uid: reviewer.uid,
            reason: ask.reason,
            grant_seconds: ask.grant.map(|d| d.as_secs()),
            at: unix_seconds(now),
            via: reviewer.via.clone(),
        };
        let counted_before = view.approvals.clone();
        // The same person counts once: a second approval replaces the first.
        match view.approvals.iter_mut().find(|a| a.uid == reviewer.uid) {
            Some(existing) => *existing = record,
            None => view.approvals.push(record),
        }
        let have = u32::try_from(view.approvals.len()).unwrap_or(u32::MAX);
        let need = view.approvals_needed;
        if have < need {
            self.publish(RequestEventKind::ApprovalCounted, view, now);
            return Ok(ApprovalEffect::Counted { have, need });
        }
        let grant = view
            .approvals
            .iter()
            .map(|a| a.grant_seconds)
            .collect::<Option<Vec<u64>>>()
            .and_then(|all| all.into_iter().min())
            .map(Duration::from_secs);
        let outcome = Outcome::Approved {
            text: view.run_text.clone(),
            edited: view.edited_by.is_some(),
            by: view.approvals.iter().map(|a| a.by.clone()).collect(),
        };
        if let Some(length) = grant {
            if let Err(e) = give(view, &outcome, length) {
                view.approvals = counted_before;
                return Err(e);
            }
        }
        self.end(&mut state, id, outcome.clone(), now);
        Ok(ApprovalEffect::Approved { outcome, grant })
    }

    /// Refuses a request.
    pub fn deny(
        &self,
        id: &RequestId,
        reviewer: &Reviewer,
        reason: String,
        now: SystemTime,
    ) -> Result<Outcome, ApprovalError> {
        let mut state = self.state();
        let pending = match state.pending.get(id) {
            Some(p) => p,
            None => return Err(ended_or_unknown(&state, id)),
        };
        if now >= pending.deadline {
            drop(state);
            self.expire_due(now);
            return Err(ApprovalError::Ended("expired".into()));
        }
        self.may_decide(reviewer, &pending.view)?;
        if reason.trim().is_empty() {
            return Err(ApprovalError::Invalid("a denial needs a reason".into()));
        }
        if reason.len() > MAX_TEXT {
            return Err(ApprovalError::Invalid(format!(
                "reason longer than {MAX_TEXT} bytes"
            )));
        }
        let outcome = Outcome::Denied {
            by: reviewer.user.clone(),
            reason,
            via: reviewer.via.clone(),
        };
        self.end(&mut state, id, outcome.clone(), now);
        Ok(outcome)
    }

    /// Ends every request whose timeout has passed; their ids.
    pub fn expire_due(&self, now: SystemTime) -> Vec<RequestId> {
        let mut state = self.state();
        let due: Vec<RequestId> = state
            .pending
            .iter()
            .filter(|(_, p)| now >= p.deadline)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &due {
            self.end(&mut state, id, Outcome::Expired, now);
        }
        due
    }

    /// The client went away: ends its request, if still pending.
    pub fn cancel(&self, id: &RequestId) -> bool {
        self.end(&mut self.state(), id, Outcome::Cancelled, SystemTime::now())
    }

    /// The agent stops: ends every pending request; how many there were.
    pub fn abort_all(&self) -> usize {
        let mut state = self.state();
        let ids: Vec<RequestId> = state.pending.keys().cloned().collect();
        let now = SystemTime::now();
        for id in &ids {
            self.end(&mut state, id, Outcome::Aborted, now);
        }
        ids.len()
    }

    /// The soonest deadline, so a sweeper knows when to look again.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        self.state().pending.values().map(|p| p.deadline).min()
    }
}

/// Moves a pending request to the ended list and tells its session.
fn end(state: &mut State, id: &RequestId, outcome: Outcome) -> bool {
    let Some(mut pending) = state.pending.remove(id) else {
        return false;
    };
    pending.view.outcome = Some(outcome.clone());
    if let Some(reply) = pending.reply.take() {
        // The session may be gone already (it then cancelled, or will).
        let _ = reply.send(outcome);
    }
    if state.ended.len() >= MAX_ENDED {
        state.ended.pop_front();
    }
    state.ended.push_back(pending.view);
    true
}

fn ended_or_unknown(state: &State, id: &RequestId) -> ApprovalError {
    match state.ended.iter().find(|v| &v.id == id) {
        Some(v) => ApprovalError::Ended(match &v.outcome {
            Some(Outcome::Approved { .. }) => "approved".into(),
            Some(Outcome::Denied { .. }) => "denied".into(),
            Some(Outcome::Expired) => "expired".into(),
            Some(Outcome::Cancelled) => "cancelled (the client went away)".into(),
            Some(Outcome::Aborted) | None => "aborted (the agent stopped)".into(),
        }),
        None => ApprovalError::UnknownRequest,
    }
}

fn truncate(text: &mut String) {
    if text.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// Why `reviewer` counts as the requester itself, if it does.
pub fn same_requester(reviewer: &Reviewer, requester: &ProcessIdentity) -> Option<String> {
    if requester.uid == Some(reviewer.uid) {
        return Some(format!(
            "{} (uid {}) sent the statement and cannot approve or deny it",
            reviewer.user, reviewer.uid
        ));
    }
    let verified_actor = |id: &ProcessIdentity| {
        id.ci
            .as_ref()
            .filter(|ci| ci.verified)
            .and_then(|ci| ci.actor.clone())
    };
    if let (Some(theirs), Some(ours)) = (verified_actor(requester), &reviewer.ci_actor) {
        if theirs == *ours {
            return Some(format!(
                "the CI actor {ours} started the requesting job and cannot approve or deny it"
            ));
        }
    }
    if let (Some(job), Some(ours)) = (&requester.cgroup, &reviewer.cgroup) {
        if within_cgroup(ours, job) {
            return Some(format!(
                "the reviewer runs inside the requesting process's cgroup {job}"
            ));
        }
    }
    None
}

/// Whether cgroup path `inner` is `outer` or below it.
fn within_cgroup(inner: &str, outer: &str) -> bool {
    let outer = outer.trim_end_matches('/');
    inner == outer || outer.is_empty() || inner.starts_with(&format!("{outer}/"))
}
