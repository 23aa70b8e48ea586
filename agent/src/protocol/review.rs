//! What every protocol's sessions share about statements a `review` rule
//! holds (docs/approvals.md): the shape a grant covers, the request made
//! from a held statement and its record, what reviewers are shown of it
//! and of the session before it, and how the request ended. How a session
//! waits meanwhile (what it tells its client, what ends the wait) is its
//! protocol's.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::SessionContext;
use crate::approval::{Desk, Grant, HeldStatement, Hold, Outcome, PriorStatement, RequestId};
use crate::events::{ReviewUpdate, SessionEvent, StatementEvent};
use crate::identity::ProcessIdentity;
use crate::policy::{Action, Decision};
use crate::recording::format::{
    GrantUseRecord, ReviewApprovalRecord, ReviewEndRecord, ReviewRequestRecord, MAX_TEXT_LEN,
};
use crate::sql::{Analysis, Shown, HIDDEN_LITERAL};

/// The shape a grant covers: the fingerprints of the text's statements.
pub fn fingerprint(analysis: &Analysis) -> Option<String> {
    match analysis {
        Analysis::Parsed { statements } if !statements.is_empty() => Some(
            statements
                .iter()
                .map(|s| &*s.fingerprint)
                .collect::<Vec<_>>()
                .join(";"),
        ),
        _ => None,
    }
}

/// Records that a grant let a statement run.
pub fn grant_used(ctx: &SessionContext, grant: &Grant) {
    if let Some(desk) = &ctx.approvals {
        desk.registry.note_grant_use(&grant.id, ctx.id);
    }
    ctx.events.emit(&SessionEvent::Review {
        session: ctx.id,
        review: Box::new(ReviewUpdate::GrantUsed(GrantUseRecord {
            grant: grant.id.to_string(),
            request: grant.request.to_string(),
            approved_by: grant.approved_by.clone(),
            expires_at: grant.expires_at,
        })),
    });
}

/// The last statements of a session, for reviewers of a later one.
#[derive(Debug, Default)]
pub struct RecentStatements(VecDeque<Remembered>);

/// One statement kept: the event the session recorded, shared (keeping it
/// costs no copy of its text), made into what reviewers see only when a
/// statement is held.
#[derive(Debug)]
struct Remembered {
    /// Unix seconds when it was decided.
    at: u64,
    /// Its event; `None` when its text is too long to keep.
    event: Option<Arc<StatementEvent>>,
    action: Action,
    refused: bool,
    len: usize,
}

impl RecentStatements {
    /// How many are kept.
    const KEPT: usize = 10;
    /// Longer text is not kept: cut, it would not parse, and its sensitive
    /// literals could not be found.
    const LONGEST: usize = 4096;

    /// Keeps a decided statement, forgetting the oldest past [`Self::KEPT`].
    pub fn remember(&mut self, at: u64, statement: &Arc<StatementEvent>) {
        if self.0.len() == Self::KEPT {
            self.0.pop_front();
        }
        let len = statement.text.len();
        self.0.push_back(Remembered {
            at,
            event: (len <= Self::LONGEST).then(|| Arc::clone(statement)),
            action: statement.action,
            refused: statement.refused,
            len,
        });
    }

    /// Those kept, oldest first.
    pub fn to_vec(&self) -> Vec<PriorStatement> {
        self.0
            .iter()
            .map(|kept| PriorStatement {
                at: kept.at,
                action: kept.action.as_str().to_owned(),
                refused: kept.refused,
                statement: match &kept.event {
                    Some(event) => event.text.clone(),
                    None => format!("(a statement of {} bytes, not kept)", kept.len),
                },
            })
            .collect()
    }
}

/// What reviewers are shown of a held statement and of the session before
/// it, and of the process: its command line, which may carry the same text
/// (`psql -c`, `mariadb -e`), cleaned of the literals hidden.
pub struct ShownToReviewers {
    /// The held text as shown; `None`: as sent.
    pub statement: Option<String>,
    /// How many literals it hides; `None`: withheld whole.
    pub hidden_literals: Option<usize>,
    /// The earlier statements as shown.
    pub session_so_far: Vec<PriorStatement>,
    /// The process, its command line cleaned.
    pub identity: ProcessIdentity,
}

/// What reviewers are shown of `text`, `session_so_far` and `identity`,
/// where `show` says what of one statement's text may be shown (the
/// protocol's SQL dialect finds its literals).
pub fn shown_to_reviewers(
    text: &str,
    session_so_far: &[PriorStatement],
    identity: &ProcessIdentity,
    show_one: impl Fn(&str) -> Shown,
) -> ShownToReviewers {
    let mut values: Vec<String> = Vec::new();
    let mut withheld_any = false;
    let mut show = |text: &str| match show_one(text) {
        Shown::AsSent => (None, Some(0)),
        Shown::Hidden {
            text,
            literals,
            values: found,
        } => {
            values.extend(found);
            (Some(text), Some(literals))
        }
        Shown::Withheld => {
            withheld_any = true;
            (
                Some(format!(
                    "(withheld: {} bytes that may hold literals a mask rule hides and cannot be cut out)",
                    text.len()
                )),
                None,
            )
        }
    };
    let (statement, hidden_literals) = show(text);
    let session_so_far = session_so_far
        .iter()
        .map(|prior| PriorStatement {
            statement: cut_to(
                &show(&prior.statement)
                    .0
                    .unwrap_or_else(|| prior.statement.clone()),
                512,
            ),
            ..prior.clone()
        })
        .collect();
    let mut identity = identity.clone();
    if withheld_any {
        // Values not found cannot be cleaned out: no arguments are shown.
        identity.cmdline.truncate(1);
        identity.cmdline.push("(arguments withheld)".to_owned());
    } else {
        values.retain(|v| !v.is_empty());
        for argument in identity.cmdline.iter_mut() {
            for value in &values {
                if argument.contains(value.as_str()) {
                    *argument = argument.replace(value.as_str(), HIDDEN_LITERAL);
                }
            }
        }
    }
    ShownToReviewers {
        statement,
        hidden_literals,
        session_so_far,
        identity,
    }
}

/// A held statement, as its session asks for review.
pub struct ReviewAsk<'a> {
    /// The decision whose rule holds it.
    pub decision: &'a Decision,
    /// The text that runs once approved.
    pub text: &'a str,
    /// Its shape, for grants.
    pub fingerprint: Option<&'a str>,
    /// The session's database user.
    pub database_user: Option<&'a str>,
    /// What reviewers see.
    pub shown: ShownToReviewers,
}

/// Submits the request for a held statement to `desk` and records it; the
/// message for the client when it cannot be held (then it is refused).
pub fn submit(ctx: &SessionContext, desk: &Desk, ask: ReviewAsk<'_>) -> Result<Hold, String> {
    let session = ctx.id.to_string();
    let submitted = Hold::submit(
        &desk.registry,
        ask.decision,
        HeldStatement {
            target: &ctx.target,
            database_user: ask.database_user,
            text: ask.text,
            shown: ask.shown.statement,
            hidden_literals: ask.shown.hidden_literals,
            session_so_far: ask.shown.session_so_far,
            fingerprint: ask.fingerprint,
            identity: &ask.shown.identity,
            session: &session,
        },
        SystemTime::now(),
    );
    let held = match submitted {
        Some(Ok(held)) => held,
        Some(Err(e)) => {
            tracing::warn!(session = %ctx.id, error = %e, "review: the statement could not be held");
            return Err(format!(
                "tollgate: this statement requires review and could not be held: {e}"
            ));
        }
        None => {
            return Err(format!(
                "tollgate: this statement requires review ({}), and no approvers are named for it; refused",
                ask.decision.reason
            ))
        }
    };
    let rule = ask.decision.deciding_rule();
    let review = rule.and_then(|r| r.review.as_ref());
    ctx.events.emit(&SessionEvent::Review {
        session: ctx.id,
        review: Box::new(ReviewUpdate::Requested(ReviewRequestRecord {
            request: held.id().to_string(),
            rule: rule.map(|r| r.name.to_string()).unwrap_or_default(),
            approvers: review
                .map(|r| r.approvers.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
            approvals_needed: review.map_or(1, |r| r.approvals),
            timeout_s: held.timeout().as_secs(),
            text: cut(ask.text),
        })),
    });
    tracing::info!(session = %ctx.id, request = %held.id(), "statement held for review");
    Ok(held)
}

/// Records how a request ended, with the approvals that counted.
pub fn record_end(
    ctx: &SessionContext,
    desk: &Desk,
    id: &RequestId,
    outcome: &Outcome,
    waited: Duration,
) {
    let view = desk.registry.show(id);
    let approvals = view
        .as_ref()
        .map(|v| {
            v.approvals
                .iter()
                .map(|a| ReviewApprovalRecord {
                    by: a.by.clone(),
                    uid: a.uid,
                    reason: a.reason.clone(),
                    grant_s: a.grant_seconds,
                    at: a.at,
                    via: Some(a.via.clone()),
                })
                .collect()
        })
        .unwrap_or_default();
    let (name, edited_text) = match outcome {
        Outcome::Approved { text, edited, .. } => ("approved", edited.then(|| cut(text))),
        Outcome::Denied { .. } => ("denied", None),
        Outcome::Expired => ("expired", None),
        Outcome::Cancelled => ("cancelled", None),
        Outcome::Aborted => ("aborted", None),
    };
    let (denied_by, reason, denied_via) = match outcome {
        Outcome::Denied { by, reason, via } => {
            (Some(by.clone()), Some(reason.clone()), Some(via.clone()))
        }
        _ => (None, None, None),
    };
    let edited_by = edited_text
        .as_ref()
        .and_then(|_| view.as_ref().and_then(|v| v.edited_by.clone()));
    ctx.events.emit(&SessionEvent::Review {
        session: ctx.id,
        review: Box::new(ReviewUpdate::Ended(ReviewEndRecord {
            request: id.to_string(),
            outcome: name.to_owned(),
            waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            approvals,
            denied_by,
            denied_via,
            reason,
            edited_by,
            edited_text,
        })),
    });
}

/// `text` cut to what a record keeps.
fn cut(text: &str) -> String {
    cut_to(text, MAX_TEXT_LEN)
}

/// At most `longest` bytes of `text`, cut at a character boundary.
fn cut_to(text: &str, longest: usize) -> String {
    if text.len() <= longest {
        return text.to_owned();
    }
    let mut end = longest;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decided(text: &str, action: Action, refused: bool) -> Arc<StatementEvent> {
        let decision = Decision {
            action,
            matched: Vec::new(),
            default_used: true,
            reason: Arc::from("the default"),
        };
        Arc::new(StatementEvent::decided(
            uuid::Uuid::nil(),
            text,
            Arc::from("SELECT"),
            None,
            None,
            &decision,
            refused,
        ))
    }

    #[test]
    fn the_last_statements_are_kept_oldest_first_and_a_long_one_by_its_length() {
        let mut recent = RecentStatements::default();
        for i in 0..12 {
            recent.remember(i, &decided(&format!("select {i}"), Action::Allow, false));
        }
        let long = "x".repeat(RecentStatements::LONGEST + 1);
        recent.remember(99, &decided(&long, Action::Deny, true));
        let kept = recent.to_vec();
        assert_eq!(kept.len(), RecentStatements::KEPT);
        assert_eq!(kept[0].statement, "select 3");
        assert_eq!(kept[0].at, 3);
        assert_eq!(kept[0].action, "allow");
        assert!(!kept[0].refused);
        let last = &kept[RecentStatements::KEPT - 1];
        assert_eq!(
            last.statement,
            format!("(a statement of {} bytes, not kept)", long.len())
        );
        assert_eq!(
            (last.at, last.action.as_str(), last.refused),
            (99, "deny", true)
        );
    }
}
