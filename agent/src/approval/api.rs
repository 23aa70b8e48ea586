//! The reviewer API: HTTP/1.1 and JSON on a local Unix socket, and
//! optionally on TCP with TLS for reviewers not on this host.
//!
//! On the Unix socket every peer is authenticated by its credentials
//! (`SO_PEERCRED`: uid, gid, pid). On TCP the caller sends
//! `Authorization: Bearer TOKEN`, a reviewer token whose hash is in the
//! token file (`tokens`), and acts as the token's Unix user. Either way the
//! reviewer is named from the local `passwd` and `group` files, and must be
//! root or a member of an approver group of the policy in force (or of a
//! configured reviewer group) to see anything. Approving or denying a
//! request needs membership in that request's approver groups, and never
//! counts the requester. How the reviewer authenticated (`unix:UID`,
//! `token:NAME`) is kept with each approval.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/`, `/index.html` | the reviewers' web page (`web`), no authentication |
//! | GET | `/v1/requests` | pending requests |
//! | GET | `/v1/requests/ID` | one request, pending or recently ended |
//! | POST | `/v1/requests/ID/approve` | `{"reason", "edit", "grant": "30m"}`, all optional |
//! | POST | `/v1/requests/ID/deny` | `{"reason"}` |
//! | GET | `/v1/grants` | grants in force (`?all=1`: also ended ones) |
//! | DELETE | `/v1/grants/ID` | revoke a grant |
//! | GET | `/v1/watch` | request events as Server-Sent Events, pending requests first |
//! | GET | `/v1/whoami` | the caller as the API sees it: `{"user", "uid", "via"}` |
//!
//! Errors are `{"error": "..."}` with 400 (malformed), 401 (no peer
//! credentials; on TCP no token, or one the token file does not hold, with
//! `WWW-Authenticate: Bearer`), 403 (not a reviewer, not an approver of
//! this request, the requester itself, or not allowed by the rule), 404,
//! 405, 409 (no longer pending), 413 (body over 128 KiB); a refused call
//! changes nothing.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::tokens::TokenStore;

use super::{
    unix_seconds, ApprovalAsk, ApprovalEffect, ApprovalError, Grant, GrantStore, GrantSubject,
    Outcome, Registry, RequestId, RequestView, Reviewer,
};
use crate::events::{Events, ReviewUpdate, SessionEvent};
use crate::identity::IdentityResolver;
use crate::policy::SharedPolicy;
use crate::recording::format::{GrantGivenRecord, GrantRevokeRecord};

/// Largest request body accepted.
const MAX_BODY: usize = 128 * 1024;
/// Connections served at once, on each listener.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection is closed after this long, whatever it is doing (a request
/// in flight is answered first, for up to [`DRAIN_TIMEOUT`]).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request in flight may take once the connection is closing.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request's headers may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `Authorization` header value looked at.
const MAX_TOKEN: usize = 256;

/// What the API serves from.
pub struct ApiState {
    /// Pending requests.
    pub registry: Arc<Registry>,
    /// Stored grants: the agent's own, or on the review server the fleet's
    /// as the shared approvals link takes them in.
    pub grants: Arc<GrantStore>,
    /// Names the reviewer's process (cgroup, CI actor).
    pub identity: Arc<IdentityResolver>,
    /// The policy in force, for the approver groups of its review rules.
    pub policy: SharedPolicy,
    /// `[reviewers.NAME]` groups of the configuration.
    pub reviewer_groups: BTreeMap<String, Vec<String>>,
    /// Where `passwd` and `group` are read (`/etc`).
    pub etc: PathBuf,
    /// The reviewer tokens TCP callers sign in with.
    pub tokens: Arc<TokenStore>,
    /// Where grants given and revoked are recorded, in the recordings of
    /// the sessions they concern.
    pub events: Option<Events>,
}

/// The credentials of a connected peer.
#[derive(Debug, Clone, Copy)]
struct Peer {
    uid: u32,
    gid: u32,
    pid: Option<u32>,
}

/// How a caller reached the API, which decides how it authenticates.
#[derive(Debug, Clone, Copy)]
enum Caller {
    /// A peer of the Unix socket, by its credentials (`None`: unreadable).
    Unix(Option<Peer>),
    /// A TLS client at this address, which must present a token.
    Remote(SocketAddr),
}

/// Serves reviewers until `stop` is cancelled. Any local user may
/// connect: `endpoint` bounds the connections served at once.
pub async fn serve(
    listener: UnixListener,
    state: Arc<ApiState>,
    endpoint: crate::accept::Endpoint,
    stop: CancellationToken,
) {
    crate::accept::accept_each(listener, endpoint, stop, |stream, _| {
        let peer = stream.peer_cred().ok().map(|c| Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid().and_then(|p| u32::try_from(p).ok()),
        });
        Some(serve_connection(stream, state.clone(), Caller::Unix(peer)))
    })
    .await;
}

/// Serves reviewers on TCP with TLS until `stop` is cancelled. Plain HTTP
/// is not spoken here: a client that does not start a TLS handshake is
/// disconnected. Anyone who can reach the port may connect: `endpoint`
/// bounds the connections served (and handshakes made) at once.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<ApiState>,
    endpoint: crate::accept::Endpoint,
    stop: CancellationToken,
) {
    crate::accept::accept_each(listener, endpoint, stop, |stream, addr| {
        let (state, acceptor) = (state.clone(), acceptor.clone());
        Some(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %addr, error = %e, "reviewer API: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %addr, "reviewer API: TLS handshake timed out");
                    return;
                }
            };
            serve_connection(tls, state, Caller::Remote(addr)).await;
        })
    })
    .await;
}

/// HTTP/1.1 on one connection, for at most [`CONNECTION_TIMEOUT`], except
/// a watch stream, which lasts as long as its reader.
async fn serve_connection<S>(io: S, state: Arc<ApiState>, caller: Caller)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(&state, caller, req).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), service);
    // The request handlers run inside this scope, where `watch` marks the
    // connection as a stream.
    let streaming = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let marked = streaming.clone();
    STREAMING
        .scope(streaming, async move {
            tokio::pin!(connection);
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "reviewer API: connection failed");
                    }
                }
                _ = tokio::time::sleep(CONNECTION_TIMEOUT) => {
                    if marked.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Err(e) = connection.await {
                            tracing::debug!(error = %e, "reviewer API: watch connection failed");
                        }
                        return;
                    }
                    // A request in flight is answered; then the connection
                    // closes (a browser opens another).
                    connection.as_mut().graceful_shutdown();
                    if tokio::time::timeout(DRAIN_TIMEOUT, connection).await.is_err() {
                        tracing::debug!("reviewer API: connection timed out");
                    }
                }
            }
        })
        .await;
}

type Reply = Response<http_body_util::Either<Full<Bytes>, EventStream>>;

fn reply(status: StatusCode, body: &Value) -> Reply {
    let mut response = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(
        body.to_string(),
    ))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    // Requests and grants are not for any cache between here and a browser.
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    response
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Reply {
    reply(status, &json!({ "error": message.to_string() }))
}

fn refused(e: &ApprovalError) -> Reply {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error(status, e)
}

fn to_json<T: serde::Serialize>(value: &T) -> Reply {
    match serde_json::to_value(value) {
        Ok(v) => reply(StatusCode::OK, &v),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

fn unauthorized(message: impl std::fmt::Display) -> Reply {
    let mut response = error(StatusCode::UNAUTHORIZED, message);
    response.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static("Bearer realm=\"tollgate reviewers\""),
    );
    response
}

async fn handle(state: &ApiState, caller: Caller, req: Request<Incoming>) -> Reply {
    // The page holds no data: served to anyone, on either listener.
    let path = req.uri().path();
    if matches!(*req.method(), Method::GET | Method::HEAD) && (path == "/" || path == "/index.html")
    {
        return super::web::page_response().map(http_body_util::Either::Left);
    }
    let reviewer = match authenticate(state, caller, &req).await {
        Ok(reviewer) => reviewer,
        Err(refusal) => return refusal,
    };
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let now = SystemTime::now();
    match (parts.as_slice(), &method) {
        (["v1", "requests"], &Method::GET) => to_json(&state.registry.list()),
        (["v1", "requests", id], &Method::GET) => match RequestId::parse(id) {
            None => error(
                StatusCode::BAD_REQUEST,
                format!("\"{id}\" is not a request id"),
            ),
            Some(id) => match state.registry.show(&id) {
                Some(view) => to_json(&view),
                None => refused(&ApprovalError::UnknownRequest),
            },
        },
        (["v1", "requests", id, "approve"], &Method::POST) => {
            let Some(id) = RequestId::parse(id) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("\"{id}\" is not a request id"),
                );
            };
            match body::<ApproveBody>(req).await {
                Ok(ask) => approve(state, &id, &reviewer, ask, now),
                Err(reply) => reply,
            }
        }
        (["v1", "requests", id, "deny"], &Method::POST) => {
            let Some(id) = RequestId::parse(id) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("\"{id}\" is not a request id"),
                );
            };
            match body::<DenyBody>(req).await {
                Ok(ask) => match state.registry.deny(&id, &reviewer, ask.reason, now) {
                    Ok(outcome) => {
                        tracing::info!(request = %id, reviewer = %reviewer.user, uid = reviewer.uid, via = %reviewer.via, outcome = ?outcome, "review: request denied");
                        to_json(&json!({ "status": "denied", "outcome": outcome }))
                    }
                    Err(e) => refused_logged(&id, &reviewer, &e),
                },
                Err(reply) => reply,
            }
        }
        (["v1", "watch"], &Method::GET) => {
            // A token may be revoked while its stream is open: the stream
            // checks it again at each event and heartbeat.
            let still_valid: Option<TokenCheck> = match (caller, bearer_token(&req)) {
                (Caller::Remote(_), Ok(token)) => {
                    let (tokens, etc) = (state.tokens.clone(), state.etc.clone());
                    Some(Box::new(move || {
                        token_reviewer(&tokens, &token, &etc).is_ok()
                    }))
                }
                _ => None,
            };
            watch(&state.registry, still_valid)
        }
        (["v1", "whoami"], &Method::GET) => whoami(&reviewer),
        (["v1", "grants"], &Method::GET) => {
            let store = &state.grants;
            let grants = if query.split('&').any(|q| q == "all=1") {
                store.all()
            } else {
                store.active(now)
            };
            match grants {
                Ok(g) => to_json(&g),
                Err(e) => refused(&e),
            }
        }
        (["v1", "grants", id], &Method::DELETE) => match RequestId::parse(id) {
            None => error(
                StatusCode::BAD_REQUEST,
                format!("\"{id}\" is not a grant id"),
            ),
            Some(id) => match state.grants.revoke(&id, &reviewer.user, &reviewer.via, now) {
                Ok(grant) => {
                    tracing::info!(grant = %id, reviewer = %reviewer.user, uid = reviewer.uid, via = %reviewer.via, "review: grant revoked");
                    record_revocation(state.events.as_ref(), &state.registry, &grant);
                    to_json(&json!({ "status": "revoked", "grant": grant }))
                }
                Err(e) => refused(&e),
            },
        },
        (["v1", "requests"] | ["v1", "requests", _] | ["v1", "grants"] | ["v1", "whoami"], _)
        | (["v1", "requests", _, "approve" | "deny"] | ["v1", "grants", _], _) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        ),
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint {path}")),
    }
}

/// Who the caller is, if it may use the API at all; else the refusal.
async fn authenticate(
    state: &ApiState,
    caller: Caller,
    req: &Request<Incoming>,
) -> Result<Reviewer, Reply> {
    let (etc, identity, tokens) = (
        state.etc.clone(),
        state.identity.clone(),
        state.tokens.clone(),
    );
    let reviewer = match caller {
        Caller::Unix(None) => {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "the reviewer socket could not read this connection's credentials",
            ))
        }
        Caller::Unix(Some(peer)) => {
            // Reads /proc and /etc (and hashes the caller's executable once).
            tokio::task::spawn_blocking(move || {
                Reviewer::of_peer(peer.uid, peer.gid, peer.pid, &etc, &identity)
            })
            .await
            .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))?
        }
        Caller::Remote(addr) => {
            let token = bearer_token(req).map_err(|why| {
                tracing::info!(peer = %addr, reason = why, "reviewer API: no token");
                unauthorized(why)
            })?;
            // Looks at the token file (and reads it when it changed).
            let named = tokio::task::spawn_blocking(move || token_reviewer(&tokens, &token, &etc))
                .await
                .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))?;
            named.map_err(|why| {
                tracing::info!(peer = %addr, reason = %why, "reviewer API: token refused");
                unauthorized(why)
            })?
        }
    };
    if !may_use_api(state, &reviewer) {
        tracing::info!(uid = reviewer.uid, user = %reviewer.user, via = %reviewer.via, "reviewer API: refused a caller who is no reviewer");
        return Err(error(
            StatusCode::FORBIDDEN,
            format!(
                "{} (uid {}) is not in any approver group of the policy in force",
                reviewer.user, reviewer.uid
            ),
        ));
    }
    Ok(reviewer)
}

/// The token of an `Authorization: Bearer TOKEN` header.
fn bearer_token(req: &Request<Incoming>) -> Result<String, &'static str> {
    let missing = "no reviewer token: send Authorization: Bearer TOKEN (tollgate approvals tokens add makes one)";
    let header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .ok_or(missing)?;
    if header.len() > MAX_TOKEN {
        return Err("the Authorization header is too long for a reviewer token");
    }
    let text = header
        .to_str()
        .map_err(|_| "the Authorization header is not text")?;
    match text.trim().split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim().to_owned())
        }
        _ => Err(missing),
    }
}

/// The reviewer a token stands for, or why it stands for none. The reason
/// goes to the caller: it names no entry of the file.
fn token_reviewer(
    tokens: &TokenStore,
    token: &str,
    etc: &std::path::Path,
) -> Result<Reviewer, String> {
    let file = tokens.current().map_err(|_| {
        "token logins are refused: the agent's token file is not safe to use (its log says why)"
            .to_owned()
    })?;
    let entry = file
        .find(token)
        .ok_or_else(|| "unknown or revoked reviewer token".to_owned())?;
    Reviewer::of_token_user(&entry.user, &entry.name, etc).ok_or_else(|| {
        format!(
            "the token's user {} does not exist on this host; revoke the token",
            entry.user
        )
    })
}

/// Root, a member of an approver group of a review rule in force, or a
/// user of a configured reviewer group.
fn may_use_api(state: &ApiState, reviewer: &Reviewer) -> bool {
    if reviewer.uid == 0 {
        return true;
    }
    if state
        .reviewer_groups
        .values()
        .any(|users| users.contains(&reviewer.user))
    {
        return true;
    }
    let policy = crate::policy::current_policy(&state.policy);
    let mut approvers: Vec<_> = policy
        .review_rules()
        .flat_map(|(_, review)| review.approvers.iter().cloned())
        .collect();
    // The review server may be given no policy: the rules that held the
    // requests it lists name their approvers too.
    approvers.extend(
        state
            .registry
            .list()
            .into_iter()
            .flat_map(|v| v.context.review.approvers.clone()),
    );
    state.registry.is_approver(reviewer, &approvers)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproveBody {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    edit: Option<String>,
    /// A duration such as `"30m"`.
    #[serde(default)]
    grant: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DenyBody {
    reason: String,
}

async fn body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Reply> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Err(
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("the body is larger than {MAX_BODY} bytes"),
                    )
                } else {
                    error(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read the body: {e}"),
                    )
                },
            )
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("malformed JSON body: {e}")))
}

/// `GET /v1/whoami`: who the caller was authenticated as, so that the web
/// page can say who is signed in.
fn whoami(reviewer: &Reviewer) -> Reply {
    to_json(&json!({ "user": reviewer.user, "uid": reviewer.uid, "via": reviewer.via }))
}

fn refused_logged(id: &RequestId, reviewer: &Reviewer, e: &ApprovalError) -> Reply {
    tracing::info!(request = %id, reviewer = %reviewer.user, uid = reviewer.uid, via = %reviewer.via, error = %e, "review: reviewer action refused");
    refused(e)
}

fn approve(
    state: &ApiState,
    id: &RequestId,
    reviewer: &Reviewer,
    body: ApproveBody,
    now: SystemTime,
) -> Reply {
    let grant = match body.grant.as_deref().map(humantime::parse_duration) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("grant: {e}; give a duration such as \"30m\""),
            )
        }
    };
    let ask = ApprovalAsk {
        reason: body.reason,
        edit: body.edit,
        grant,
    };
    let mut stored = None;
    let give = |view: &RequestView, outcome: &Outcome, length: Duration| {
        stored = Some(store_grant(state, view, outcome, length, now)?);
        Ok(())
    };
    match state.registry.approve_giving(id, reviewer, ask, now, give) {
        Err(e @ ApprovalError::Store(_)) => {
            tracing::error!(request = %id, error = %e, "review: the grant could not be stored; the request is still pending");
            refused(&e)
        }
        Err(e) => refused_logged(id, reviewer, &e),
        Ok(ApprovalEffect::Counted { have, need }) => {
            tracing::info!(request = %id, reviewer = %reviewer.user, uid = reviewer.uid, via = %reviewer.via, have, need, "review: approval counted");
            to_json(&json!({ "status": "counted", "approvals": have, "needed": need }))
        }
        Ok(ApprovalEffect::Approved { outcome, .. }) => {
            tracing::info!(request = %id, reviewer = %reviewer.user, uid = reviewer.uid, via = %reviewer.via, outcome = ?outcome, "review: request approved");
            to_json(&json!({ "status": "approved", "outcome": outcome, "grant": stored }))
        }
    }
}

/// Records the revocation of `grant` (revoked here or elsewhere in the
/// fleet) in the session whose request gave it and in every session
/// remembered to have run under it, where still open here.
pub(super) fn record_revocation(events: Option<&Events>, registry: &Registry, grant: &Grant) {
    let mut sessions: Vec<uuid::Uuid> = grant
        .session
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    for user in registry.grant_users(&grant.id) {
        if !sessions.contains(&user) {
            sessions.push(user);
        }
    }
    record_in(
        events,
        sessions,
        ReviewUpdate::GrantRevoked(GrantRevokeRecord {
            grant: grant.id.to_string(),
            request: grant.request.to_string(),
            by: grant.revoked_by.clone().unwrap_or_default(),
            via: grant.revoked_via.clone().unwrap_or_default(),
            at: grant.revoked_at.unwrap_or_default(),
        }),
    );
}

/// Records that `grant` was given, in the requesting session if it is
/// recorded here and still open (it waits for the approval).
pub(super) fn record_grant_given(events: Option<&Events>, grant: &Grant) {
    record_in(
        events,
        grant.session.iter().filter_map(|s| s.parse().ok()),
        ReviewUpdate::GrantGiven(GrantGivenRecord {
            grant: grant.id.to_string(),
            request: grant.request.to_string(),
            approved_by: grant.approved_by.clone(),
            identity: grant.subject.identity.clone(),
            expires_at: grant.expires_at,
        }),
    );
}

/// Emits `update` for each of `sessions` whose recording is still open
/// (a closed recording cannot take it; the grant store keeps the record).
fn record_in(
    events: Option<&Events>,
    sessions: impl IntoIterator<Item = uuid::Uuid>,
    update: ReviewUpdate,
) {
    let Some(events) = events else {
        return;
    };
    for session in sessions {
        if events.records_session(&session) {
            events.emit(&SessionEvent::Review {
                session,
                review: Box::new(update.clone()),
            });
        }
    }
}

/// Stores the grant an approval of `view` gives, and records it in the
/// requesting session (still open: it waits for this approval).
fn store_grant(
    state: &ApiState,
    view: &RequestView,
    outcome: &Outcome,
    length: Duration,
    now: SystemTime,
) -> Result<Grant, ApprovalError> {
    let id = &view.id;
    let context = &view.context;
    let subject = GrantSubject {
        target: context.target.clone(),
        fingerprint: context
            .fingerprint
            .clone()
            .ok_or_else(|| ApprovalError::NotAllowed("no statement shape".into()))?,
        identity: GrantSubject::identity_key(&context.identity)
            .ok_or_else(|| ApprovalError::NotAllowed("no identity to grant to".into()))?,
    };
    let approved_by = match outcome {
        Outcome::Approved { by, .. } => by.clone(),
        _ => Vec::new(),
    };
    let grant = Grant {
        id: RequestId::new(now),
        subject,
        statement: context.statement.clone(),
        request: id.clone(),
        session: context.session.clone(),
        rule: context.rule.clone(),
        approved_by,
        created_at: unix_seconds(now),
        expires_at: unix_seconds(now + length),
        revoked_by: None,
        revoked_via: None,
        revoked_at: None,
    };
    state.grants.insert(&grant)?;
    record_grant_given(state.events.as_ref(), &grant);
    tracing::info!(grant = %grant.id, request = %id, seconds = length.as_secs(), "review: grant stored");
    Ok(grant)
}

/// Watch streams served at once, so that watchers never take every
/// connection slot from reviewers who act.
const MAX_WATCHERS: usize = 16;
/// A comment line this often keeps a watch stream's idle proxies and
/// clients from closing it, and finds a watcher that went away.
const WATCH_HEARTBEAT: Duration = Duration::from_secs(15);

static WATCH_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_WATCHERS);

tokio::task_local! {
    /// Set by `watch` on its connection: the connection then outlives
    /// [`CONNECTION_TIMEOUT`], as long as the watcher reads.
    static STREAMING: Arc<std::sync::atomic::AtomicBool>;
}

/// `GET /v1/watch`: Server-Sent Events, one JSON object per `data:` line:
/// the pending requests first (`"event": "pending"`), then every request
/// event as it happens (`requested`, `approval_counted`, `edited`,
/// `approved`, `denied`, `expired`, `cancelled`, `aborted`), each with the
/// request as it is afterwards; `{"event": "lagged", "missed": N}` when the
/// watcher fell behind; a comment line every 15 s.
/// Whether the token a watch stream was opened with is still good (reads
/// the token file when it changed: run on a blocking thread).
type TokenCheck = Box<dyn Fn() -> bool + Send + Sync>;

fn watch(registry: &Registry, still_valid: Option<TokenCheck>) -> Reply {
    let Ok(slot) = WATCH_SLOTS.try_acquire() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_WATCHERS} watchers are connected already; try again later"),
        );
    };
    let _ = STREAMING.try_with(|s| s.store(true, std::sync::atomic::Ordering::Relaxed));
    let (pending, mut events) = registry.watch();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let line = |value: &Value| Bytes::from(format!("data: {value}\n\n"));
    let still_valid = still_valid.map(Arc::new);
    let revoked = move || {
        let still_valid = still_valid.clone();
        async move {
            let Some(check) = still_valid else {
                return false;
            };
            !tokio::task::spawn_blocking(move || check())
                .await
                .unwrap_or(false)
        }
    };
    tokio::spawn(async move {
        let _slot = slot;
        let now = unix_seconds(SystemTime::now());
        for view in pending {
            let event = json!({ "event": "pending", "at": now, "request": view });
            if tx.send(line(&event)).await.is_err() {
                return;
            }
        }
        let mut heartbeat = tokio::time::interval(WATCH_HEARTBEAT);
        heartbeat.tick().await;
        loop {
            let chunk = tokio::select! {
                () = tx.closed() => return,
                _ = heartbeat.tick() => Bytes::from_static(b": heartbeat\n\n"),
                received = events.recv() => match received {
                    Ok(event) => match serde_json::to_value(&event) {
                        Ok(value) => line(&value),
                        Err(_) => continue,
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        line(&json!({ "event": "lagged", "missed": missed }))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            };
            if revoked().await {
                let end =
                    json!({ "event": "signed_out", "reason": "the reviewer token was revoked" });
                let _ = tx.send(line(&end)).await;
                return;
            }
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    let mut response = Response::new(http_body_util::Either::Right(EventStream { chunks: rx }));
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    response
}

/// The body of a watch stream: chunks from its feeding task.
pub struct EventStream {
    chunks: tokio::sync::mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.chunks
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(hyper::body::Frame::data(c))))
    }
}
