//! Statements a `review` rule holds (see `docs/approvals.md`).
//!
//! The client side decides a Query or Parse `review` and answers
//! [`Step::Hold`] without forwarding it. The client pump then calls
//! [`hold`]: the request is submitted to the agent's registry, recorded,
//! and the client told at once with a NoticeResponse (the upstream pump
//! writes it between whole server messages). While the statement waits,
//! the client socket is still read, so a client that goes away cancels the
//! request, and the session counts as active. With the outcome the message
//! is stepped again: forwarded (approved), replaced by the reviewer's edit
//! (which the policy decides again), or refused like a denial, by a
//! substitute that fails on the server, so the transaction is left as a
//! server error would leave it.
//!
//! Earlier messages were forwarded before the hold and are not waited for:
//! in the extended protocol they are answered only at Sync, and a denial
//! of the held Parse makes the server discard the rest of the batch and
//! roll back its implicit transaction, writes before it included.

use std::time::{Instant as WallInstant, SystemTime};

use super::*;
use crate::approval::{HeldStatement, Hold, Outcome};
use crate::events::ReviewUpdate;
use crate::recording::format::{
    GrantUseRecord, ReviewApprovalRecord, ReviewEndRecord, ReviewRequestRecord, MAX_TEXT_LEN,
};

/// Bytes a client may send while its statement is held; past this the
/// socket is not read until the outcome (a client waiting for its answer
/// sends nothing).
const HELD_READ_LIMIT: usize = 1 << 20;

/// 57014 query_canceled.
const QUERY_CANCELED: &str = "57014";

/// A statement the client side decided `review`, for the pump to hold.
pub(super) struct PendingReview {
    /// The decision whose rule holds it.
    pub(super) decision: Decision,
    /// The message's text.
    pub(super) text: String,
    /// Its shape, for grants.
    pub(super) fingerprint: Option<String>,
    /// The session's statements before it (texts as sent).
    pub(super) session_so_far: Vec<crate::approval::PriorStatement>,
}

/// How the hold of a message ended, for the message's second step.
pub(super) enum ReviewOutcome {
    /// Run the held text.
    Approved {
        /// The text that was held.
        held_text: String,
    },
    /// Run a reviewer's edit instead, decided again by the policy. The
    /// approvals counted for the edit itself (an edit starts the count
    /// again), so they cover it where the same rule would hold it.
    Edited {
        /// The reviewer's text.
        text: String,
        /// The rule that held the original.
        rule: String,
    },
    /// Refuse the held message with this message.
    Refused {
        /// The text that was held.
        held_text: String,
        /// What the client is told.
        message: String,
        /// With this SQLSTATE.
        sqlstate: &'static str,
    },
}

/// The shape a grant covers: the fingerprints of the text's statements.
pub(super) fn fingerprint(analysis: &Analysis) -> Option<String> {
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
pub(super) fn grant_used(ctx: &PostgresContext<'_>, grant: &crate::approval::Grant) {
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

/// What reviewers are shown of a held statement and of the session before
/// it: literals that meet a column a `mask` rule for this target hides are
/// replaced (`crate::sql::shown_to_reviewer`), and the process's command
/// line, which may carry the same text (`psql -c`), is cleaned of their
/// values.
struct ShownToReviewers {
    /// The held text as shown; `None`: as sent.
    statement: Option<String>,
    /// How many literals it hides; `None`: withheld whole.
    hidden_literals: Option<usize>,
    /// The earlier statements as shown.
    session_so_far: Vec<crate::approval::PriorStatement>,
    /// The process, its command line cleaned.
    identity: crate::identity::ProcessIdentity,
}

fn shown_to_reviewers(side: &ClientSide<'_>, pending: &PendingReview) -> ShownToReviewers {
    use crate::sql::{shown_to_reviewer, Shown, HIDDEN_LITERAL};
    let policy = crate::policy::current_policy(&side.ctx.policy);
    let sensitive = policy.masked_column_names(&side.ctx.target);
    let reading = side.text_reading();
    let mut values: Vec<String> = Vec::new();
    let mut withheld_any = false;
    let mut show = |text: &str| match shown_to_reviewer(text, reading, &sensitive) {
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
    let (statement, hidden_literals) = show(&pending.text);
    let session_so_far = pending
        .session_so_far
        .iter()
        .map(|prior| crate::approval::PriorStatement {
            statement: cut_to(
                &show(&prior.statement)
                    .0
                    .unwrap_or_else(|| prior.statement.clone()),
                512,
            ),
            ..prior.clone()
        })
        .collect();
    let mut identity = side.identity.clone();
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

/// Holds the statement the client side left in `pending_review` until its
/// request ends; the outcome for stepping the message again. The client
/// going away ends the session (and cancels the request).
pub(super) async fn hold<R: AsyncRead + Unpin>(
    side: &mut ClientSide<'_>,
    reader: &mut R,
    buf: &mut ReadBuf,
    start: Instant,
) -> Result<ReviewOutcome, Stop> {
    let (ctx, shared) = (side.ctx, side.shared);
    let Some(pending) = side.pending_review.get_mut().take() else {
        return Err(Stop::Fatal {
            sqlstate: sqlstate::PROTOCOL_VIOLATION,
            message: "tollgate: internal error: a statement was held without a review".to_owned(),
            reason: CloseReason::ClientError("held without a review".to_owned()),
        });
    };
    let refused = |message: String| ReviewOutcome::Refused {
        held_text: pending.text.clone(),
        message,
        sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
    };
    let Some(desk) = ctx.approvals.as_ref() else {
        return Ok(refused(
            "tollgate: this statement requires review, and this agent takes no review requests; refused".to_owned(),
        ));
    };
    let session = ctx.id.to_string();
    let shown = shown_to_reviewers(side, &pending);
    let submitted = Hold::submit(
        &desk.registry,
        &pending.decision,
        HeldStatement {
            target: &ctx.target,
            database_user: side.database_user.as_deref(),
            text: &pending.text,
            shown: shown.statement,
            hidden_literals: shown.hidden_literals,
            session_so_far: shown.session_so_far,
            fingerprint: pending.fingerprint.as_deref(),
            identity: &shown.identity,
            session: &session,
        },
        SystemTime::now(),
    );
    let held = match submitted {
        Some(Ok(held)) => held,
        Some(Err(e)) => {
            tracing::warn!(session = %ctx.id, error = %e, "review: the statement could not be held");
            return Ok(refused(format!(
                "tollgate: this statement requires review and could not be held: {e}"
            )));
        }
        None => {
            return Ok(refused(format!(
                "tollgate: this statement requires review ({}), and no approvers are named for it; refused",
                pending.decision.reason
            )))
        }
    };
    let id = held.id().clone();
    let timeout = held.timeout();
    let review = pending
        .decision
        .deciding_rule()
        .and_then(|r| r.review.clone());
    ctx.events.emit(&SessionEvent::Review {
        session: ctx.id,
        review: Box::new(ReviewUpdate::Requested(ReviewRequestRecord {
            request: id.to_string(),
            rule: pending
                .decision
                .deciding_rule()
                .map(|r| r.name.to_string())
                .unwrap_or_default(),
            approvers: review
                .as_ref()
                .map(|r| r.approvers.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
            approvals_needed: review.as_ref().map_or(1, |r| r.approvals),
            timeout_s: timeout.as_secs(),
            text: cut(&pending.text),
        })),
    });
    shared.notify_client(&held.notice());
    tracing::info!(session = %ctx.id, request = %id, "statement held for review");

    // psql's Ctrl-C (a CancelRequest with the session's key) ends the hold.
    let interrupt = shared
        .cancel_pid
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .and_then(|pid| ctx.cancel.interrupt_of(pid));
    let waiting = WallInstant::now();
    let outcome = {
        let outcome = held.outcome();
        tokio::pin!(outcome);
        let interrupted = async {
            match &interrupt {
                Some(notify) => notify.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(interrupted);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let raw = ctx.events.records_raw(&ctx.target);
        loop {
            let room = buf.filled().len() < HELD_READ_LIMIT;
            if room {
                buf.make_room(0);
            }
            tokio::select! {
                outcome = &mut outcome => break Some(outcome),
                // Dropping `outcome` cancels the request.
                () = &mut interrupted => break None,
                read = buf.read_from(reader), if room => match read {
                    Ok(n) if n > 0 => {
                        count(&ctx, true, n);
                        if raw {
                            record_raw(&ctx, RawDirection::Client, buf, n);
                        }
                        shared.touch(start);
                    }
                    // Dropping `outcome` cancels the request.
                    gone => {
                        record_end(&ctx, desk, &id, &Outcome::Cancelled, waiting.elapsed());
                        let why = match gone {
                            Err(e) => e.to_string(),
                            Ok(_) => "it closed the connection".to_owned(),
                        };
                        return Err(Stop::Closed(CloseReason::ClientError(format!(
                            "the client went away while its statement was held for review ({why})"
                        ))));
                    }
                },
                // A held statement is not an idle session.
                _ = tick.tick() => shared.touch(start),
            }
        }
    };
    let Some(outcome) = outcome else {
        tracing::info!(session = %ctx.id, request = %id, "review: the client cancelled its held statement");
        record_end(&ctx, desk, &id, &Outcome::Cancelled, waiting.elapsed());
        return Ok(ReviewOutcome::Refused {
            held_text: pending.text,
            // What the server says of a statement a CancelRequest stopped.
            message: "canceling statement due to user request".to_owned(),
            sqlstate: QUERY_CANCELED,
        });
    };
    record_end(&ctx, desk, &id, &outcome, waiting.elapsed());
    Ok(match outcome {
        Outcome::Approved {
            text, edited: true, ..
        } => ReviewOutcome::Edited {
            text,
            rule: pending
                .decision
                .deciding_rule()
                .map(|r| r.name.to_string())
                .unwrap_or_default(),
        },
        Outcome::Approved { .. } => ReviewOutcome::Approved {
            held_text: pending.text,
        },
        other => {
            let message = other.client_error(timeout).unwrap_or_default();
            refused(message)
        }
    })
}

/// Records how a request ended, with the approvals that counted.
fn record_end(
    ctx: &PostgresContext<'_>,
    desk: &crate::approval::Desk,
    id: &crate::approval::RequestId,
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
