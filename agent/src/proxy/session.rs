//! Setting up one session: identity, upstream, events, then the handler.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::AgentState;
use crate::config::{Protocol, Upstream};
use crate::events::{Arrival, CloseReason, SessionEvent, SessionInfo};
use crate::identity::{ConnectInstance, IdentityResolver, PendingHash, ProcessIdentity};
use crate::protocol::{Announce, Refusal, SessionContext, SessionCounters, SessionStart};
use crate::redirect::KernelOrigin;

/// Where an accepted connection goes and how it arrived.
pub(super) struct Route {
    pub(super) arrival: Arrival,
    pub(super) target: String,
    pub(super) protocol: Protocol,
    pub(super) upstream: UpstreamAddr,
    /// The kernel's record, for redirected connections.
    pub(super) origin: Option<KernelOrigin>,
}

/// The upstream of a session.
pub(super) enum UpstreamAddr {
    /// A configured host and port, resolved per connection.
    Named(Upstream),
    /// The original destination of a redirected connection.
    Direct(SocketAddr),
}

impl std::fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamAddr::Named(u) => write!(f, "{u}"),
            UpstreamAddr::Direct(a) => write!(f, "{a}"),
        }
    }
}

pub(super) async fn serve(
    shared: Arc<AgentState>,
    client: TcpStream,
    peer: SocketAddr,
    route: Route,
) {
    let began = Instant::now();
    let id = Uuid::now_v7();
    let local = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(error = %e, "accepted connection vanished before set-up");
            return;
        }
    };
    let _ = client.set_nodelay(true);

    // The process is looked up first thing, while it is most likely still
    // alive, and on a blocking thread because it reads /proc. The handler
    // waits for it only when it must (see `SessionStart`).
    let resolver = shared.identity.clone();
    let origin = route.origin.clone();
    // A large executable's hash is computed in the background; the session
    // goes on without it and records it when it is ready.
    let pending_hash: Arc<Mutex<Option<PendingHash>>> = Arc::default();
    let hash_task: Arc<Mutex<Option<JoinHandle<()>>>> = Arc::default();
    let lookup = tokio::task::spawn_blocking({
        let pending_hash = pending_hash.clone();
        move || {
            let t = Instant::now();
            let (identity, pending) = identify(&resolver, peer, local, origin.as_ref());
            *lock(&pending_hash) = pending;
            (identity, t.elapsed())
        }
    });
    let started_at = SystemTime::now();
    let upstream = connect_upstream(&route.upstream, shared.config.agent.connect_timeout).await;

    let counters = Arc::new(SessionCounters::default());
    let announce: Announce = {
        let shared = shared.clone();
        let counters = counters.clone();
        let (target, protocol) = (route.target.clone(), route.protocol);
        let (arrival, upstream_name, kernel) = (
            route.arrival,
            route.upstream.to_string(),
            route.origin.clone(),
        );
        let connected = upstream.as_ref().ok().map(|(_, peer, took)| (*peer, *took));
        let hash_task = hash_task.clone();
        Box::new(move |looked_up| {
            let identity = match looked_up {
                Ok((identity, took)) => {
                    shared
                        .metrics
                        .identity_lookup(took, failure_label(&identity));
                    identity
                }
                Err(e) => {
                    shared
                        .metrics
                        .identity_lookup(began.elapsed(), Some("internal"));
                    ProcessIdentity {
                        gaps: vec![format!("identity lookup did not finish: {e}")],
                        ..ProcessIdentity::default()
                    }
                }
            };
            let job = match (&shared.jobs, &kernel) {
                (Some(jobs), Some(k)) => {
                    jobs.session_opened(k.cgroup_id, id, &target, k.tgid, identity.ci.as_ref())
                }
                _ => None,
            };
            let info = Arc::new(SessionInfo {
                id,
                started_at,
                arrival,
                local,
                client: peer,
                target,
                protocol,
                upstream: upstream_name,
                identity,
                kernel,
                job,
            });
            shared.live.insert(info.clone(), counters.clone());
            shared.events.emit(&SessionEvent::Started(info.clone()));
            if let Some((peer, connect_time)) = connected {
                shared.events.emit(&SessionEvent::UpstreamConnected {
                    session: id,
                    peer,
                    connect_time,
                });
            }
            // After `Started`, so the recording has its header first.
            if let Some(pending) = lock(&pending_hash).take() {
                let events = shared.events.clone();
                let counters = counters.clone();
                let task = tokio::spawn(async move {
                    let (exe_sha256, error) = match pending.wait().await {
                        Ok(digest) => {
                            let _ = counters.late_exe_sha256.set(digest.clone());
                            (Some(digest), None)
                        }
                        Err(why) => (None, Some(why)),
                    };
                    events.emit(&SessionEvent::ExeHashed {
                        session: id,
                        exe_sha256,
                        error,
                    });
                });
                *lock(&hash_task) = Some(task);
            }
            info
        })
    };
    let start = SessionStart::new(lookup, announce);
    let handler = shared.handlers.for_protocol(route.protocol);

    let (reason, start) = match upstream {
        Err(reason) => {
            start.info().await;
            if let CloseReason::UpstreamUnreachable(cause) = &reason {
                let refusal = Refusal::UpstreamUnreachable {
                    target: &route.target,
                    cause,
                };
                handler
                    .refuse(client, refusal, shared.config.agent.connect_timeout)
                    .await;
            }
            (reason, start)
        }
        Ok((stream, upstream_addr, _)) => {
            let ctx = SessionContext {
                id,
                target: route.target.clone(),
                start,
                counters: counters.clone(),
                target_metrics: shared.metrics.target(&route.target),
                idle_timeout: shared.config.agent.idle_timeout,
                force_close: shared.force_close.clone(),
                policy: shared.policy.clone(),
                analysis: shared.analysis.clone(),
                events: shared.events.clone(),
                upstream_addr,
                upstream_name: match &route.upstream {
                    UpstreamAddr::Named(u) => u.host.clone(),
                    UpstreamAddr::Direct(a) => a.ip().to_string(),
                },
                approvals: Some(shared.review_desk.clone()),
            };
            let reason = handler.serve(&ctx, client, stream).await;
            (reason, ctx.start)
        }
    };
    // A session that ended before its handler needed the identity (a
    // CancelRequest, a client that gave up) is announced now, so that every
    // closed session was started.
    start.info().await;
    // The hash of a new large executable belongs in this session's
    // recording: wait for it a little (the client has gone already).
    let hash_task = lock(&hash_task).take();
    if let Some(mut task) = hash_task {
        // Not past the shutdown grace period either.
        let finished = tokio::select! {
            done = tokio::time::timeout(HASH_WAIT_AT_CLOSE, &mut task) => done.is_ok(),
            _ = shared.force_close.cancelled() => false,
        };
        if !finished {
            task.abort();
            // Said in the recording, so a missing hash is never silent; the
            // hashing itself goes on, and the cache gives the executable's
            // next session its hash.
            shared.events.emit(&SessionEvent::ExeHashed {
                session: id,
                exe_sha256: None,
                error: Some(format!(
                    "still being hashed when the session closed (waited up to {} s)",
                    HASH_WAIT_AT_CLOSE.as_secs()
                )),
            });
        }
    }

    shared.live.remove(&id);
    shared.metrics.session_closed(&route.target, reason.label());
    shared.events.emit(&SessionEvent::Closed {
        session: id,
        bytes_from_client: counters
            .from_client
            .load(std::sync::atomic::Ordering::Relaxed),
        bytes_from_upstream: counters
            .from_upstream
            .load(std::sync::atomic::Ordering::Relaxed),
        duration: began.elapsed(),
        reason,
    });
}

/// The identity of the process behind a connection. With a kernel record
/// the process is known without searching the socket table, and the
/// kernel's view (captured at connect time) fills what `/proc` no longer
/// shows when the process already exited.
fn identify(
    resolver: &IdentityResolver,
    peer: SocketAddr,
    local: SocketAddr,
    origin: Option<&KernelOrigin>,
) -> (ProcessIdentity, Option<PendingHash>) {
    let Some(origin) = origin else {
        return resolver.identify_peer_deferred(peer, local);
    };
    let (mut identity, pending) = resolver.describe_process_deferred(origin.tgid);
    identity.pid = Some(origin.tgid);
    if identity.uid.is_some_and(|uid| uid != origin.uid) {
        identity.gaps.push(format!(
            "the process's uid changed after connecting: {} at connect time",
            origin.uid
        ));
    }
    identity.uid = Some(origin.uid);
    identity.gid.get_or_insert(origin.gid);
    identity.comm.get_or_insert_with(|| origin.comm.clone());
    // Without BTF nothing was captured: identity stays as /proc shows it
    // (logged once at load). Otherwise compare, after everything above was
    // read, so an execve racing those reads shows as a change.
    if origin.instance != ConnectInstance::NotCaptured {
        let check = resolver.check_instance(origin.tgid, origin.instance);
        if let Some(reason) = &check.reason {
            identity
                .gaps
                .push(format!("executable rules do not apply: {reason}"));
        }
        identity.instance = Some(check);
    }
    (identity, pending)
}

/// How long a closing session waits for its executable's background hash.
const HASH_WAIT_AT_CLOSE: Duration = Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only `Option`s are kept here: a panic cannot leave one half-updated.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Which lookup failure, if any, a resolved identity shows.
fn failure_label(identity: &ProcessIdentity) -> Option<&'static str> {
    match (identity.pid, identity.uid) {
        (None, None) => Some("socket_not_found"),
        (None, Some(_)) => Some("owner_not_found"),
        (Some(_), _) if identity.exe.is_none() => Some("process_exited"),
        _ => None,
    }
}

/// Resolves and connects to the upstream, trying each address in turn.
async fn connect_upstream(
    upstream: &UpstreamAddr,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr, Duration), CloseReason> {
    let began = Instant::now();
    let attempt = async {
        let addrs: Vec<SocketAddr> = match upstream {
            UpstreamAddr::Direct(addr) => vec![*addr],
            UpstreamAddr::Named(u) => tokio::net::lookup_host((u.host.as_str(), u.port))
                .await
                .map_err(|e| format!("cannot resolve {}: {e}", u.host))?
                .collect(),
        };
        let mut last_error = format!("{upstream} resolved to no address");
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok((stream, addr));
                }
                Err(e) => last_error = format!("connecting to {addr}: {e}"),
            }
        }
        Err(last_error)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok((stream, addr))) => Ok((stream, addr, began.elapsed())),
        Ok(Err(e)) => Err(CloseReason::UpstreamUnreachable(e)),
        Err(_) => Err(CloseReason::UpstreamUnreachable(format!(
            "connecting to {upstream} timed out after {}",
            humantime::format_duration(timeout)
        ))),
    }
}
