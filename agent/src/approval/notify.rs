//! Notifications of review requests (`[[notify]]`): a generic JSON webhook
//! and a Slack incoming-webhook message, with the request's context, the
//! approve and deny commands and a link to the reviewers' page.
//!
//! Off every session's path: a dispatcher task reads the registry's
//! [`RequestEvent`]s and queues one job per configured receiver in a
//! bounded queue (full: the notification is dropped and counted); one
//! worker per receiver posts them, a few at a time, each with up to
//! [`ATTEMPTS`] attempts of at most [`ATTEMPT_TIMEOUT`], waiting
//! [`backoff`] between them; an answer that says another try cannot help
//! (a 4xx other than 408 and 429) ends it. A notification that fails is logged and
//! counted; it never holds, approves or denies anything. Each delivered or
//! failed notification is recorded in the requesting session's recording
//! (`review_notified`) through the same event stream the session records
//! its review with, while that recording is open.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{RequestEvent, RequestEventKind, RequestView};
use crate::config::{NotifyKind, NotifyTarget};
use crate::events::{Events, ReviewUpdate, SessionEvent};
use crate::metrics::Metrics;
use crate::recording::format::ReviewNotifyRecord;

/// Attempts per notification.
pub const ATTEMPTS: u32 = 3;
/// Longest one attempt may take: connect, TLS, request and answer.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// The wait after the first failed attempt; it doubles after each.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Notifications queued per receiver; more are dropped (and counted).
const QUEUE: usize = 256;
/// Notifications posted at once per receiver.
const CONCURRENT: usize = 8;
/// Answer bytes read (and ignored) from a receiver.
const MAX_ANSWER: usize = 64 * 1024;
/// Statement text put in a Slack block (a section holds 3000 characters).
const SLACK_STATEMENT_CHARS: usize = 2500;

/// The wait after failed attempt `attempt` (1-based): 1 s, 2 s, 4 s, ...
pub fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF.saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
}

/// Why one attempt to post a notification failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryError {
    /// No answer: the receiver could not be reached, the TLS handshake or
    /// the HTTP exchange failed, or the attempt timed out.
    NoAnswer(String),
    /// The receiver answered with this non-2xx status.
    Status(u16),
}

impl DeliveryError {
    /// Whether another attempt may succeed: not after a 4xx answer (wrong
    /// URL, token or payload), except 408 (timeout) and 429 (rate limit).
    pub fn worth_retrying(&self) -> bool {
        match self {
            DeliveryError::NoAnswer(_) => true,
            DeliveryError::Status(status) => {
                !(400..500).contains(status) || *status == 408 || *status == 429
            }
        }
    }
}

impl std::fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeliveryError::NoAnswer(reason) => f.write_str(reason),
            DeliveryError::Status(status) if self.worth_retrying() => write!(f, "HTTP {status}"),
            DeliveryError::Status(status) => write!(f, "HTTP {status} (not retried)"),
        }
    }
}

/// The command that approves request `id`.
pub fn approve_command(id: &str) -> String {
    format!("tollgate approvals approve {id}")
}

/// The command that denies request `id`.
pub fn deny_command(id: &str) -> String {
    format!("tollgate approvals deny {id} --reason 'why'")
}

/// The reviewers' page for request `id`: the configured link base with the
/// request id as its fragment.
pub fn request_link(base: &str, id: &str) -> String {
    format!("{}#{id}", base.trim_end_matches('#'))
}

/// Where request events go, and what records their delivery.
struct Notifier {
    metrics: Arc<Metrics>,
    events: Events,
    tls: Option<tokio_rustls::TlsConnector>,
}

/// One notification to post.
struct Job {
    request: String,
    event: RequestEventKind,
    session: Option<uuid::Uuid>,
    body: Bytes,
}

/// Starts notifying `targets` of `registry`'s events: the dispatcher to
/// run until `stop`, and the tracker of the deliveries, which the agent
/// waits for (a while) as it stops (nothing when no `[[notify]]` is
/// configured). Cancel `stop` only after publishing what must still be
/// announced (the requests a stop aborts): the dispatcher routes every
/// event published before it saw the cancellation.
pub fn start(
    targets: &[NotifyTarget],
    registry: &super::Registry,
    metrics: Arc<Metrics>,
    events: Events,
    stop: CancellationToken,
) -> Option<(impl std::future::Future<Output = ()>, TaskTracker)> {
    if targets.is_empty() {
        return None;
    }
    let tls = targets
        .iter()
        .any(|t| t.url.scheme_str() == Some("https"))
        .then(tls_connector)
        .flatten();
    let notifier = Arc::new(Notifier {
        metrics,
        events,
        tls,
    });
    let deliveries = TaskTracker::new();
    let mut queues = Vec::new();
    for target in targets {
        let (tx, rx) = mpsc::channel(QUEUE);
        let target = Arc::new(target.clone());
        deliveries.spawn(work(
            target.clone(),
            rx,
            notifier.clone(),
            deliveries.clone(),
        ));
        queues.push((target, tx));
    }
    tracing::info!(
        receivers = queues.len(),
        "review notifications to {}",
        targets
            .iter()
            .map(|t| format!("{} ({})", t.host(), t.kind.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Some((
        dispatch(registry.subscribe(), queues, notifier, stop),
        deliveries,
    ))
}

/// A TLS connector verifying against the system's CA roots.
fn tls_connector() -> Option<tokio_rustls::TlsConnector> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!(errors = ?found.errors, "review notifications: no CA certificates found in the system store; https receivers will fail (install ca-certificates)");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(builder) => {
            let config = builder.with_root_certificates(roots).with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        }
        Err(e) => {
            tracing::warn!(error = %e, "review notifications: cannot set up TLS; https receivers will fail");
            None
        }
    }
}

async fn dispatch(
    mut requests: broadcast::Receiver<RequestEvent>,
    queues: Vec<(Arc<NotifyTarget>, mpsc::Sender<Job>)>,
    notifier: Arc<Notifier>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                // The requests the stop aborts were published before the
                // cancellation (see `start`): they are queued too, and
                // sent while the agent drains its sessions.
                while let Ok(event) = requests.try_recv() {
                    route(&event, &queues, &notifier);
                }
                return;
            }
            received = requests.recv() => match received {
                Ok(event) => route(&event, &queues, &notifier),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    // Which events were missed is unknown: each receiver
                    // counts them all, whether it asked for them or not.
                    tracing::warn!(missed, "review notifications: fell behind the request events; {missed} were not sent");
                    for (target, _) in &queues {
                        notifier.metrics.review_notifications_add(target.kind.as_str(), "dropped", missed);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// Queues `event` for every receiver that asked for it.
fn route(
    event: &RequestEvent,
    queues: &[(Arc<NotifyTarget>, mpsc::Sender<Job>)],
    notifier: &Notifier,
) {
    for (target, queue) in queues {
        if !target.events.contains(&event.event) {
            continue;
        }
        let payload = match target.kind {
            NotifyKind::Webhook => webhook_payload(event, target.link.as_deref()),
            NotifyKind::Slack => slack_payload(event, target.link.as_deref()),
        };
        let job = Job {
            request: event.request.id.to_string(),
            event: event.event,
            session: event
                .request
                .context
                .session
                .as_deref()
                .and_then(|s| uuid::Uuid::parse_str(s).ok()),
            body: Bytes::from(payload.to_string()),
        };
        if queue.try_send(job).is_err() {
            tracing::warn!(host = target.host(), kind = target.kind.as_str(), request = %event.request.id,
                "review notification dropped: {QUEUE} are waiting for {} already", target.host());
            notifier
                .metrics
                .review_notification(target.kind.as_str(), "dropped");
        }
    }
}

/// Posts the jobs of one receiver, [`CONCURRENT`] at a time, until the
/// dispatcher is gone (what is queued then is still sent, for as long as
/// the agent runs).
async fn work(
    target: Arc<NotifyTarget>,
    mut jobs: mpsc::Receiver<Job>,
    notifier: Arc<Notifier>,
    deliveries: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(CONCURRENT));
    while let Some(job) = jobs.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (target, notifier) = (target.clone(), notifier.clone());
        deliveries.spawn(async move {
            let _slot = slot;
            notifier.deliver(&target, job).await;
        });
    }
}

impl Notifier {
    /// Posts one notification with retries; logs, counts and records the
    /// result.
    async fn deliver(&self, target: &NotifyTarget, job: Job) {
        let mut attempts = 0;
        let result = loop {
            attempts += 1;
            let attempt =
                tokio::time::timeout(ATTEMPT_TIMEOUT, self.post(target, job.body.clone()));
            let failure = match attempt.await {
                Ok(Ok(())) => break Ok(()),
                Ok(Err(e)) => e,
                Err(_) => DeliveryError::NoAnswer(format!(
                    "no answer within {}s",
                    ATTEMPT_TIMEOUT.as_secs()
                )),
            };
            if attempts >= ATTEMPTS || !failure.worth_retrying() {
                break Err(failure.to_string());
            }
            tracing::debug!(host = target.host(), request = %job.request, attempt = attempts, error = %failure,
                "review notification attempt failed; retrying");
            tokio::time::sleep(backoff(attempts)).await;
        };
        let kind = target.kind.as_str();
        match &result {
            Ok(()) => {
                tracing::info!(host = target.host(), kind, request = %job.request, event = job.event.as_str(), attempts,
                    "review notification sent to {}", target.host());
                self.metrics.review_notification(kind, "ok");
            }
            Err(e) => {
                tracing::warn!(host = target.host(), kind, request = %job.request, event = job.event.as_str(), attempts, error = %e,
                    "review notification to {} failed: {e}", target.host());
                self.metrics.review_notification(kind, "failed");
            }
        }
        // Recorded in the session's own recording while it is open; a
        // session that ended meanwhile has its trailer written already.
        if let Some(session) = job.session.filter(|s| self.events.records_session(s)) {
            self.events.emit(&SessionEvent::Review {
                session,
                review: Box::new(ReviewUpdate::Notified(ReviewNotifyRecord {
                    request: job.request,
                    event: job.event.as_str().to_owned(),
                    kind: kind.to_owned(),
                    host: target.host().to_owned(),
                    ok: result.is_ok(),
                    error: result.err(),
                    attempts,
                })),
            });
        }
    }

    /// One attempt: POST the body; a 2xx answer is a delivery.
    async fn post(&self, target: &NotifyTarget, body: Bytes) -> Result<(), DeliveryError> {
        let url = &target.url;
        let https = url.scheme_str() == Some("https");
        let host = url.host().unwrap_or_default();
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
        // An IPv6 literal comes bracketed.
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = TcpStream::connect((bare_host, port)).await.map_err(|e| {
            DeliveryError::NoAnswer(format!("cannot connect to {host}:{port}: {e}"))
        })?;
        let _ = tcp.set_nodelay(true);
        if !https {
            return send(tcp, target, body).await;
        }
        let connector = self.tls.as_ref().ok_or_else(|| {
            DeliveryError::NoAnswer("TLS is not available (see the agent's log at start)".into())
        })?;
        let name = rustls::pki_types::ServerName::try_from(bare_host.to_owned()).map_err(|e| {
            DeliveryError::NoAnswer(format!("\"{host}\" is not a TLS server name: {e}"))
        })?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| DeliveryError::NoAnswer(format!("TLS with {host}: {e}")))?;
        send(tls, target, body).await
    }
}

async fn send<S>(stream: S, target: &NotifyTarget, body: Bytes) -> Result<(), DeliveryError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| DeliveryError::NoAnswer(format!("HTTP handshake: {e}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let path = target
        .url
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let authority = target
        .url
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let mut request = Request::builder()
        .method(hyper::Method::POST)
        .uri(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("tollgate/", env!("CARGO_PKG_VERSION")),
        );
    for (name, value) in &target.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request
        .body(Full::new(body))
        .map_err(|e| DeliveryError::NoAnswer(format!("building the request: {e}")))?;
    let answer = sender
        .send_request(request)
        .await
        .map_err(|e| DeliveryError::NoAnswer(format!("no answer: {e}")))?;
    let status = answer.status();
    // Read what little the receiver says, so the connection ends cleanly.
    let _ = Limited::new(answer.into_body(), MAX_ANSWER).collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(DeliveryError::Status(status.as_u16()))
    }
}

/// The context both payloads carry, as JSON.
fn context(view: &RequestView) -> Value {
    let c = &view.context;
    let id = &c.identity;
    json!({
        "statement": view.text,
        "original_statement": (view.edited_by.is_some()).then_some(&c.statement),
        "edited_by": view.edited_by,
        // Literals meeting masked columns read '***' in the statements
        // (None: the statement is withheld whole).
        "hidden_literals": c.hidden_literals,
        "target": c.target,
        "database_user": c.database_user,
        "process": {
            "pid": id.pid,
            "uid": id.uid,
            "user": id.user,
            "exe": id.exe,
            "exe_sha256": id.exe_sha256,
            "cmdline": id.cmdline,
        },
        "ci": id.ci.as_ref().map(|ci| json!({
            "provider": ci.provider.as_str(),
            "repository": ci.repository,
            "workflow": ci.workflow,
            "job": ci.job,
            "run_id": ci.run_id,
            "actor": ci.actor,
            "commit": ci.commit,
            "run_url": ci.url,
            "verified": ci.verified,
        })),
        "rule": c.rule,
        "rule_description": c.rule_message,
        "approvals": view.approvals.iter().map(|a| &a.by).collect::<Vec<_>>(),
        "approvals_needed": view.approvals_needed,
        "submitted_at": view.submitted_at,
        "deadline": view.expires_at,
        "session": c.session,
    })
}

/// The generic webhook's JSON document.
pub fn webhook_payload(event: &RequestEvent, link: Option<&str>) -> Value {
    let id = event.request.id.as_str();
    json!({
        "event": event.event.as_str(),
        "at": event.at,
        "request": id,
        "context": context(&event.request),
        "outcome": event.request.outcome,
        "commands": {
            "approve": approve_command(id),
            "deny": deny_command(id),
        },
        "link": link.map(|base| request_link(base, id)),
    })
}

/// Text Slack shows as written (`&`, `<` and `>` are its markup).
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// At most `max` characters of `text`, marked when cut.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", text.get(..end).unwrap_or_default()),
        None => text.to_owned(),
    }
}

/// One line saying what happened, for Slack's `text` and header.
fn headline(event: &RequestEvent) -> String {
    let view = &event.request;
    let target = &view.context.target;
    let id = &view.id;
    match (&event.event, &view.outcome) {
        (_, Some(super::Outcome::Approved { by, .. })) => {
            format!(
                "Tollgate: request {id} on {target} approved by {}",
                by.join(", ")
            )
        }
        (_, Some(super::Outcome::Denied { by, .. })) => {
            format!("Tollgate: request {id} on {target} denied by {by}")
        }
        (kind, Some(_)) => format!("Tollgate: request {id} on {target} {}", kind.as_str()),
        (_, None) => format!("Tollgate: statement held for review on {target} (request {id})"),
    }
}

/// The Slack incoming-webhook message: `text` (the notification's
/// fallback) and `blocks` with the statement, its context, the commands
/// and the link.
pub fn slack_payload(event: &RequestEvent, link: Option<&str>) -> Value {
    let view = &event.request;
    let c = &view.context;
    let id = view.id.as_str();
    let headline = headline(event);
    let field = |name: &str, value: &str| json!({ "type": "mrkdwn", "text": format!("*{name}*\n{}", slack_escape(&shorten(value, 500))) });
    let identity = &c.identity;
    let process = format!(
        "{} (uid {}, pid {})\n{}",
        identity.exe.as_deref().unwrap_or("?"),
        identity.uid.map_or("?".to_owned(), |u| u.to_string()),
        identity.pid.map_or("?".to_owned(), |p| p.to_string()),
        shorten(&identity.cmdline.join(" "), 300)
    );
    let ci = identity.ci.as_ref().map_or("none".to_owned(), |ci| {
        format!(
            "{} {} {} {} (actor {}{}){}",
            ci.provider.as_str(),
            ci.repository.as_deref().unwrap_or("?"),
            ci.workflow.as_deref().unwrap_or(""),
            ci.job.as_deref().unwrap_or(""),
            ci.actor.as_deref().unwrap_or("?"),
            if ci.verified { "" } else { ", unverified" },
            ci.url
                .as_deref()
                .map(|u| format!("\n{u}"))
                .unwrap_or_default()
        )
    });
    let rule = match &c.rule_message {
        Some(message) => format!("{}: {message}", c.rule),
        None => c.rule.clone(),
    };
    let deadline = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_secs(view.expires_at),
    )
    .to_string();
    let mut blocks = vec![
        json!({ "type": "header", "text": { "type": "plain_text", "text": shorten(&headline, 140) } }),
        json!({ "type": "section", "text": { "type": "mrkdwn",
            "text": format!("```{}```", slack_escape(&shorten(&view.text, SLACK_STATEMENT_CHARS))) } }),
        json!({ "type": "section", "fields": [
            field("Target", &c.target),
            field("Database user", c.database_user.as_deref().unwrap_or("?")),
            field("Process", &process),
            field("CI job", &ci),
            field("Rule", &rule),
            field("Deadline", &format!("{deadline} ({} of {} approvals)", view.approvals.len(), view.approvals_needed)),
        ] }),
    ];
    if view.outcome.is_none() {
        blocks.push(json!({ "type": "section", "text": { "type": "mrkdwn",
            "text": format!("*Approve:* `{}`\n*Deny:* `{}`", approve_command(id), deny_command(id)) } }));
    }
    if let Some(base) = link {
        blocks.push(json!({ "type": "section", "text": { "type": "mrkdwn",
            "text": format!("<{}|Open request {id} in the reviewers' page>", request_link(base, id)) } }));
    }
    json!({
        "text": format!("{}: {}", headline, shorten(&view.text, 200)),
        "blocks": blocks,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::approval::{RequestContext, RequestEvent, RequestEventKind};
    use crate::identity::{CiContext, CiProvider, ProcessIdentity};
    use crate::policy::{Approver, GrantScope, ReviewSettings};

    fn event() -> RequestEvent {
        let now = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
        let context = RequestContext {
            target: "orders-db".into(),
            database_user: Some("app".into()),
            statement: "DELETE FROM orders WHERE created < '2020-01-01' & <x>".into(),
            run_text: "DELETE FROM orders WHERE created < '2020-01-01' & <x>".into(),
            hidden_literals: Some(0),
            session_so_far: Vec::new(),
            fingerprint: Some("f1".into()),
            rule: "review-deletes".into(),
            rule_message: Some("deletes need a second pair of eyes".into()),
            review: Arc::new(ReviewSettings {
                approvers: vec![Approver::UnixGroup("dba".into())],
                approvals: 1,
                timeout: Duration::from_secs(600),
                grant: GrantScope::Statement,
                grant_hours: None,
            }),
            identity: ProcessIdentity {
                pid: Some(4242),
                uid: Some(1001),
                exe: Some("/usr/bin/psql".into()),
                exe_sha256: Some("ab12".into()),
                cmdline: vec!["psql".into(), "-c".into(), "DELETE ...".into()],
                ci: Some(CiContext {
                    provider: CiProvider::GithubActions,
                    repository: Some("acme/shop".into()),
                    branch: None,
                    job: Some("migrate".into()),
                    run_id: Some("42".into()),
                    workflow: Some("deploy".into()),
                    actor: Some("octo-bot".into()),
                    url: None,
                    commit: None,
                    runner_pid: None,
                    verified: true,
                }),
                ..ProcessIdentity::default()
            },
            session: Some("0192f0c4-0000-7000-8000-000000000001".into()),
        };
        let registry = crate::approval::Registry::new(BTreeMap::new());
        let mut events = registry.subscribe();
        let (_id, _outcome) = registry.submit(context, now).unwrap();
        let event = events.try_recv().unwrap();
        assert_eq!(event.event, RequestEventKind::Requested);
        event
    }

    #[test]
    fn the_webhook_document_carries_the_context_commands_and_link() {
        let e = event();
        let id = e.request.id.to_string();
        let doc = webhook_payload(&e, Some("https://review.example.com/"));
        assert_eq!(doc["event"], "requested");
        assert_eq!(doc["request"], id.as_str());
        let c = &doc["context"];
        assert_eq!(
            c["statement"],
            "DELETE FROM orders WHERE created < '2020-01-01' & <x>"
        );
        assert_eq!(c["target"], "orders-db");
        assert_eq!(c["database_user"], "app");
        assert_eq!(c["process"]["exe"], "/usr/bin/psql");
        assert_eq!(c["process"]["exe_sha256"], "ab12");
        assert_eq!(c["process"]["cmdline"][1], "-c");
        assert_eq!(c["ci"]["repository"], "acme/shop");
        assert_eq!(c["ci"]["actor"], "octo-bot");
        assert_eq!(c["rule"], "review-deletes");
        assert_eq!(c["rule_description"], "deletes need a second pair of eyes");
        assert_eq!(c["deadline"], 1_780_000_600);
        assert_eq!(
            doc["commands"]["approve"],
            format!("tollgate approvals approve {id}")
        );
        assert!(doc["commands"]["deny"]
            .as_str()
            .unwrap()
            .starts_with(&format!("tollgate approvals deny {id} --reason")));
        assert_eq!(
            doc["link"],
            format!("https://review.example.com/#{id}").as_str()
        );
        assert!(doc["outcome"].is_null());
        // No link configured: null, not a broken URL.
        assert!(webhook_payload(&e, None)["link"].is_null());
    }

    #[test]
    fn the_slack_message_has_text_and_blocks_with_the_context_and_commands() {
        let e = event();
        let id = e.request.id.to_string();
        let msg = slack_payload(&e, Some("https://review.example.com"));
        let text = msg["text"].as_str().unwrap();
        assert!(text.contains("held for review on orders-db"), "{text}");
        assert!(text.contains(&id));
        let blocks = msg["blocks"].as_array().unwrap();
        assert_eq!(blocks[0]["type"], "header");
        let all = serde_json::to_string(blocks).unwrap();
        // The statement, with Slack's markup characters escaped.
        assert!(
            all.contains("DELETE FROM orders WHERE created &lt; '2020-01-01' &amp; &lt;x&gt;"),
            "{all}"
        );
        for needle in [
            "orders-db",
            "app",
            "/usr/bin/psql",
            "acme/shop",
            "review-deletes: deletes need a second pair of eyes",
            &format!("`tollgate approvals approve {id}`"),
            &format!("tollgate approvals deny {id}"),
            &format!("<https://review.example.com#{id}|"),
        ] {
            assert!(all.contains(needle), "{needle} missing from {all}");
        }
        for block in blocks {
            assert!(
                ["header", "section"].contains(&block["type"].as_str().unwrap()),
                "{block}"
            );
        }
    }

    #[test]
    fn an_ended_request_is_announced_without_commands() {
        let mut e = event();
        let mut view = (*e.request).clone();
        view.outcome = Some(crate::approval::Outcome::Denied {
            by: "carol".into(),
            reason: "not during the sale".into(),
            via: "token:carol-laptop".into(),
        });
        e.request = Arc::new(view);
        e.event = RequestEventKind::Denied;
        let msg = slack_payload(&e, None);
        let all = serde_json::to_string(&msg).unwrap();
        assert!(msg["text"].as_str().unwrap().contains("denied by carol"));
        assert!(!all.contains("tollgate approvals approve"));
        let doc = webhook_payload(&e, None);
        assert_eq!(doc["event"], "denied");
        assert_eq!(doc["outcome"]["outcome"], "denied");
        assert_eq!(doc["outcome"]["reason"], "not during the sale");
    }

    #[test]
    fn retries_back_off_exponentially() {
        assert_eq!(ATTEMPTS, 3);
        assert_eq!(ATTEMPT_TIMEOUT, Duration::from_secs(5));
        let waits: Vec<u64> = (1..=4).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8]);
        // Far attempts do not overflow.
        assert!(backoff(u32::MAX) >= Duration::from_secs(1 << 16));
        // The whole schedule of one notification stays bounded: every
        // attempt timing out, plus the waits between them.
        let worst: Duration =
            ATTEMPT_TIMEOUT * ATTEMPTS + (1..ATTEMPTS).map(backoff).sum::<Duration>();
        assert_eq!(worst, Duration::from_secs(18));
    }

    #[test]
    fn a_4xx_answer_other_than_408_and_429_is_not_retried() {
        for (status, retried) in [(400, false), (403, false), (404, false), (410, false)] {
            assert_eq!(
                DeliveryError::Status(status).worth_retrying(),
                retried,
                "{status}"
            );
        }
        for status in [408, 429, 500, 502, 503] {
            assert!(DeliveryError::Status(status).worth_retrying(), "{status}");
        }
        assert!(DeliveryError::NoAnswer("refused".into()).worth_retrying());
        assert_eq!(
            DeliveryError::Status(404).to_string(),
            "HTTP 404 (not retried)"
        );
        assert_eq!(DeliveryError::Status(503).to_string(), "HTTP 503");
    }

    #[test]
    fn long_statements_are_shortened_for_slack() {
        let long = "x".repeat(10_000);
        let short = shorten(&long, SLACK_STATEMENT_CHARS);
        assert_eq!(short.chars().count(), SLACK_STATEMENT_CHARS + 1);
        assert!(short.ends_with('…'));
        assert_eq!(shorten("é", 1), "é");
    }

    #[tokio::test]
    async fn an_https_receiver_is_verified_and_gets_the_post_with_its_headers() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = certified.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen, request) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then a body of `content-length` bytes.
            loop {
                let n = tls.read(&mut chunk).await.unwrap();
                got.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if got.len() >= end + 4 + length || n == 0 {
                        break;
                    }
                }
            }
            tls.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap();
            let _ = seen.send(String::from_utf8_lossy(&got).to_string());
            // The untrusting client's handshake fails.
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(tcp).await;
        });

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let notifier = Notifier {
            metrics: Arc::new(crate::metrics::Metrics::default()),
            events: crate::events::Events::new(Arc::new(crate::events::LogSink)),
            tls: Some(tokio_rustls::TlsConnector::from(Arc::new(client))),
        };
        let target = NotifyTarget {
            kind: NotifyKind::Webhook,
            url: format!("https://localhost:{port}/hook?channel=dba")
                .parse()
                .unwrap(),
            headers: vec![("authorization".into(), "Bearer s3cret".into())],
            link: None,
            events: vec![RequestEventKind::Requested],
        };
        let body = webhook_payload(&event(), None).to_string();
        notifier
            .post(&target, Bytes::from(body.clone()))
            .await
            .unwrap();
        let request = request.await.unwrap();
        assert!(
            request.starts_with("POST /hook?channel=dba HTTP/1.1\r\n"),
            "{request}"
        );
        let lower = request.to_ascii_lowercase();
        assert!(
            lower.contains(&format!("host: localhost:{port}\r\n")),
            "{request}"
        );
        assert!(
            lower.contains("authorization: bearer s3cret\r\n"),
            "{request}"
        );
        assert!(
            lower.contains("content-type: application/json\r\n"),
            "{request}"
        );
        assert!(request.ends_with(&body), "{request}");

        // A receiver whose certificate is not trusted gets nothing.
        let untrusted = Notifier {
            tls: tls_connector(),
            ..notifier
        };
        let refused = untrusted
            .post(&target, Bytes::from(body))
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, DeliveryError::NoAnswer(reason) if reason.contains("certificate")),
            "{refused}"
        );
    }
}
