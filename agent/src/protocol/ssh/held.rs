//! SSH requests a `review` rule holds (docs/approvals.md).
//!
//! The request's answer is withheld from the client while reviewers
//! decide: the client waits as for a slow host, its other channels go on,
//! and it is told on the channel's stderr which request to approve. An
//! approval (or a grant an earlier one gave for the same command from the
//! same identity) sends the request to the host and relays the host's
//! answer; anything else refuses it with the reason. Waiting happens in
//! the session's task ([`super::front::run`]), so a client that goes away
//! drops the wait, which cancels the request.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use russh::ChannelId;
use sha2::{Digest, Sha256};

use super::front::{ask, decide_request, ChannelShared, ToRun, REFUSAL_DELAY};
use crate::approval::Outcome;
use crate::events::{CloseReason, SessionInfo};
use crate::policy::{Action, Decision};
use crate::protocol::review::{self, ReviewAsk};
use crate::protocol::SessionContext;

/// A request held for review, as the connection hands it over.
pub(super) struct HeldRequest {
    pub(super) channel: ChannelId,
    pub(super) request: ToRun,
    /// The decision whose rule holds it.
    pub(super) decision: Decision,
    pub(super) shared: Arc<ChannelShared>,
    pub(super) session: russh::server::Handle,
    pub(super) identity: Arc<SessionInfo>,
    /// The user the agent logged in to the host as.
    pub(super) user: String,
}

/// The shape a grant covers: the request's kind and exact text.
fn fingerprint(request: &ToRun) -> String {
    let digest = Sha256::digest(format!("{}\0{}", request.kind().as_str(), request.text()));
    format!("ssh-{}", hex::encode(digest))
}

/// Waits for the reviewers of `held`, then runs or refuses it.
pub(super) async fn wait(ctx: &SessionContext, held: HeldRequest) -> Result<(), CloseReason> {
    let HeldRequest {
        channel,
        request,
        decision,
        shared,
        session,
        identity,
        user,
    } = held;
    let refuse = |message: String| refuse(&session, channel, message);
    let Some(desk) = ctx.approvals.clone() else {
        refuse(decision.client_message(&request.command())).await;
        return Ok(());
    };
    let Some(settings) = decision.deciding_rule().and_then(|r| r.review.clone()) else {
        refuse(decision.client_message(&request.command())).await;
        return Ok(());
    };
    let shape = fingerprint(&request);
    if let Some(grant) = desk.grant_for(
        &ctx.target,
        &shape,
        &identity.identity,
        settings.grant_hours,
        SystemTime::now(),
    ) {
        review::grant_used(ctx, &grant);
        answer_from_host(&session, channel, shared, request).await;
        return Ok(());
    }
    let text = request.command();
    if text.len() > crate::approval::registry::MAX_TEXT {
        refuse(format!(
            "tollgate: this request requires review, and at {} bytes it is longer than the {} bytes a review request holds; refused",
            text.len(),
            crate::approval::registry::MAX_TEXT
        ))
        .await;
        return Ok(());
    }
    let shown = review::shown_to_reviewers(&text, &[], &identity.identity, |_| {
        crate::sql::Shown::AsSent
    });
    let hold = match review::submit(
        ctx,
        &desk,
        ReviewAsk {
            decision: &decision,
            text: &text,
            fingerprint: Some(&shape),
            database_user: Some(&user),
            shown,
        },
    ) {
        Ok(hold) => hold,
        Err(message) => {
            refuse(message).await;
            return Ok(());
        }
    };
    let notice = format!("{}\r\n", hold.notice().replace("statement", "request"));
    let _ = session.extended_data(channel, 1, notice.into_bytes()).await;
    let id = hold.id().clone();
    let timeout = hold.timeout();
    let waiting = Instant::now();
    let outcome = hold.outcome().await;
    review::record_end(ctx, &desk, &id, &outcome, waiting.elapsed());
    match outcome {
        Outcome::Approved {
            text: approved,
            edited: false,
            ..
        } if approved == text => answer_from_host(&session, channel, shared, request).await,
        Outcome::Approved { text: edited, .. } => {
            // Only a command line can be edited; the edit is decided again
            // and runs only if the same rule's approvers covered it.
            let ToRun::Exec(_) = request else {
                refuse(format!(
                    "tollgate: {} was approved with an edit, and only a command line can be edited; refused",
                    request.command()
                ))
                .await;
                return Ok(());
            };
            let edit = ToRun::Exec(edited);
            let again = decide_request(
                &ctx.policy,
                &ctx.target,
                &identity,
                edit.kind(),
                &edit.command(),
                edit.text(),
            );
            let held_by = decision.deciding_rule().map(|r| &r.name);
            let covered = match again.action {
                Action::Allow | Action::Audit => true,
                Action::Review => again.deciding_rule().map(|r| &r.name) == held_by,
                Action::Mask | Action::Deny => false,
            };
            if covered {
                answer_from_host(&session, channel, shared, edit).await;
            } else {
                refuse(format!(
                    "tollgate: the command as a reviewer edited it is not covered by the approval: {}",
                    again.client_message(&edit.command())
                ))
                .await;
            }
        }
        other => {
            let why = other.client_error(timeout).unwrap_or_default();
            refuse(why.replacen("statement", "request", 1)).await;
        }
    }
    Ok(())
}

/// Sends `request` to the host and gives the client the host's answer.
async fn answer_from_host(
    session: &russh::server::Handle,
    channel: ChannelId,
    shared: Arc<ChannelShared>,
    request: ToRun,
) {
    let ok = ask(shared, |shared| async move {
        shared.prepare(&request);
        request.send(&shared.upstream).await
    })
    .await;
    let _ = if ok {
        session.channel_success(channel).await
    } else {
        session.channel_failure(channel).await
    };
}

/// Refuses the request: the message on the channel's stderr, then the
/// failure once the client has had time to print it.
async fn refuse(session: &russh::server::Handle, channel: ChannelId, message: String) {
    let _ = session
        .extended_data(channel, 1, format!("{message}\r\n").into_bytes())
        .await;
    tokio::time::sleep(REFUSAL_DELAY).await;
    let _ = session.channel_failure(channel).await;
}
