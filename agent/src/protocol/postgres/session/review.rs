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

use std::time::Instant as WallInstant;

use super::*;
use crate::approval::Outcome;
use crate::protocol::review::{self, ReviewAsk, ShownToReviewers};

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

pub(super) use crate::protocol::review::{fingerprint, grant_used};

/// What reviewers are shown: literals that meet a column a `mask` rule for
/// this target hides are replaced (`crate::sql::shown_to_reviewer`).
fn shown_to_reviewers(side: &ClientSide<'_>, pending: &PendingReview) -> ShownToReviewers {
    let policy = crate::policy::current_policy(&side.ctx.policy);
    let sensitive = policy.masked_column_names(&side.ctx.target);
    let reading = side.text_reading();
    review::shown_to_reviewers(
        &pending.text,
        &pending.session_so_far,
        side.identity,
        |text| crate::sql::shown_to_reviewer(text, reading, &sensitive),
    )
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
    let shown = shown_to_reviewers(side, &pending);
    let held = match review::submit(
        &ctx,
        desk,
        ReviewAsk {
            decision: &pending.decision,
            text: &pending.text,
            fingerprint: pending.fingerprint.as_deref(),
            database_user: side.database_user.as_deref(),
            shown,
        },
    ) {
        Ok(held) => held,
        Err(message) => return Ok(refused(message)),
    };
    let id = held.id().clone();
    let timeout = held.timeout();
    shared.notify_client(&held.notice());

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
                        review::record_end(&ctx, desk, &id, &Outcome::Cancelled, waiting.elapsed());
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
        review::record_end(&ctx, desk, &id, &Outcome::Cancelled, waiting.elapsed());
        return Ok(ReviewOutcome::Refused {
            held_text: pending.text,
            // What the server says of a statement a CancelRequest stopped.
            message: "canceling statement due to user request".to_owned(),
            sqlstate: QUERY_CANCELED,
        });
    };
    review::record_end(&ctx, desk, &id, &outcome, waiting.elapsed());
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
