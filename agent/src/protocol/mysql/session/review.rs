//! MySQL statements a `review` rule holds (docs/approvals.md).
//!
//! A `COM_QUERY`, or a `COM_STMT_EXECUTE` of a prepared statement, that a
//! `review` rule takes is not forwarded: the request goes to the agent's
//! reviewers and the command waits for the outcome, then runs (approved, or
//! a grant covers its shape), runs a reviewer's edit in its place (decided
//! again), or gets an ERR. Preparing runs nothing and is not held; each
//! execution is.
//!
//! The protocol has no message a server may send while a command runs, so
//! the client is told nothing until the outcome (the request's id is in the
//! agent's log, `tollgate approvals list` and the notifications). While it
//! waits, the client socket is watched: a client that goes away cancels
//! the request. A `KILL QUERY` of the connection (the `mariadb` client's
//! Ctrl-C) ends the wait with the server's own ERR 1317.

use std::time::Instant as WallInstant;

use tokio::io::AsyncBufReadExt;

use super::{command_label, Session, Stop, ER_TABLEACCESS_DENIED};
use crate::approval::Outcome;
use crate::events::CloseReason;
use crate::identity::ProcessIdentity;
use crate::policy::{most_restrictive, Decision};
use crate::protocol::review::{self, ReviewAsk};
use crate::sql::Analysis;

/// `ER_QUERY_INTERRUPTED`, what the server answers a statement a `KILL
/// QUERY` stopped with (SQLSTATE 70100).
pub(super) const ER_QUERY_INTERRUPTED: u16 = 1317;

/// What the review of a held statement came to.
pub(super) enum Reviewed {
    /// It runs, as its other rules decide.
    Approved,
    /// A reviewer's edit runs in its place, decided again.
    Edited(String),
    /// It does not run; the client gets this ERR.
    Refused {
        /// The error code.
        code: u16,
        /// Its message.
        message: String,
    },
}

fn refused(message: String) -> Reviewed {
    Reviewed::Refused {
        code: ER_TABLEACCESS_DENIED,
        message,
    }
}

impl Session<'_> {
    /// Reviews `text`, which `decisions` send to review: a grant or the
    /// approval of an earlier edit lets it run, else it is held until its
    /// request ends. `edited_under`: the rule whose reviewers approved the
    /// edit that `text` is.
    pub(super) async fn review(
        &mut self,
        text: &str,
        analysis: &Analysis,
        decisions: &[Decision],
        identity: &ProcessIdentity,
        edited_under: Option<String>,
    ) -> Result<Reviewed, Stop> {
        let Some(top) = most_restrictive(decisions) else {
            return Ok(Reviewed::Approved);
        };
        let rule = top.deciding_rule().map(|r| r.name.to_string());
        if let Some(edited_under) = edited_under {
            // The approvals counted for the edit cover it under the rule
            // that held it, not under another, whose approvers were not
            // asked.
            let by = rule.unwrap_or_default();
            if by == edited_under {
                return Ok(Reviewed::Approved);
            }
            return Ok(refused(format!(
                "tollgate: the statement as a reviewer edited it requires review by rule \"{by}\", whose approvers were not asked (the held statement's rule was \"{edited_under}\"); refused"
            )));
        }
        let Some(desk) = self.ctx.approvals.clone() else {
            return Ok(refused(
                "tollgate: this statement requires review, and this agent takes no review requests; refused".to_owned(),
            ));
        };
        let Some(settings) = top.deciding_rule().and_then(|r| r.review.as_ref()) else {
            // A default of `review`: nobody is named to approve it.
            return Ok(refused(top.client_message(command_label(analysis))));
        };
        let fingerprint = review::fingerprint(analysis);
        if let Some(shape) = &fingerprint {
            let grant = desk.grant_for(
                &self.ctx.target,
                shape,
                identity,
                settings.grant_hours,
                std::time::SystemTime::now(),
            );
            if let Some(grant) = grant {
                review::grant_used(self.ctx, &grant);
                return Ok(Reviewed::Approved);
            }
        }
        if text.len() > crate::approval::registry::MAX_TEXT {
            return Ok(refused(format!(
                "tollgate: this statement requires review, and at {} bytes it is longer than the {} bytes a review request holds; refused",
                text.len(),
                crate::approval::registry::MAX_TEXT
            )));
        }
        let policy = crate::policy::current_policy(&self.ctx.policy);
        let sensitive = policy.masked_column_names(&self.ctx.target);
        let escapes = self.escapes;
        let shown = review::shown_to_reviewers(text, &self.recent.to_vec(), identity, |t| {
            crate::sql::mysql::shown_to_reviewer(t, escapes, &sensitive)
        });
        let held = match review::submit(
            self.ctx,
            &desk,
            ReviewAsk {
                decision: top,
                text,
                fingerprint: fingerprint.as_deref(),
                database_user: self.database_user.as_deref(),
                shown,
            },
        ) {
            Ok(held) => held,
            Err(message) => return Ok(refused(message)),
        };
        let id = held.id().clone();
        let timeout = held.timeout();
        let waiting = WallInstant::now();
        let interrupt = self.interrupt.clone();
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
            // A client that sends something while it waits (it should
            // not) keeps it for its turn; only its going away matters.
            let mut watching = true;
            loop {
                tokio::select! {
                    outcome = &mut outcome => break Some(outcome),
                    // Dropping `outcome` cancels the request.
                    () = &mut interrupted => break None,
                    read = self.client_in.fill_buf(), if watching => match read {
                        Ok(bytes) if !bytes.is_empty() => watching = false,
                        gone => {
                            review::record_end(self.ctx, &desk, &id, &Outcome::Cancelled, waiting.elapsed());
                            let why = match gone {
                                Err(e) => e.to_string(),
                                Ok(_) => "it closed the connection".to_owned(),
                            };
                            return Err(Stop::Closed(CloseReason::ClientError(format!(
                                "the client went away while its statement was held for review ({why})"
                            ))));
                        }
                    },
                }
            }
        };
        let Some(outcome) = outcome else {
            tracing::info!(session = %self.ctx.id, request = %id, "review: a KILL ended the held statement");
            review::record_end(self.ctx, &desk, &id, &Outcome::Cancelled, waiting.elapsed());
            return Ok(Reviewed::Refused {
                code: ER_QUERY_INTERRUPTED,
                message: "Query execution was interrupted".to_owned(),
            });
        };
        review::record_end(self.ctx, &desk, &id, &outcome, waiting.elapsed());
        Ok(match outcome {
            Outcome::Approved {
                text, edited: true, ..
            } => Reviewed::Edited(text),
            Outcome::Approved { .. } => Reviewed::Approved,
            other => refused(other.client_error(timeout).unwrap_or_default()),
        })
    }
}
