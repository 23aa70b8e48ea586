//! The proxy core: listeners, the per-connection session set-up, and the
//! agent's lifecycle (start, serve, drain on shutdown).
//!
//! A connection is accepted (then waits for a permit, so `max_connections`
//! bounds the work in flight), the connecting process is identified on a
//! blocking thread while the upstream connection is made, a
//! [`SessionEvent::Started`] is emitted, and the target's protocol handler
//! takes both sockets until the session ends.

pub mod exec;
pub mod live;
mod refuse;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Listener, Protocol};
use crate::control;
use crate::events::Arrival;
use crate::events::{Events, FanOut, LogSink};
use crate::identity::IdentityResolver;
use crate::metrics::{self, Metrics};
use crate::redirect::Redirect;
use live::LiveSessions;
use session::{Route, UpstreamAddr};

/// State shared by every listener and session.
pub struct Shared {
    /// The configuration the agent runs with.
    pub config: Config,
    /// Counters for Prometheus.
    pub metrics: Arc<Metrics>,
    /// Open sessions, for status.
    pub live: LiveSessions,
    /// Where session events go (the recorder among them).
    pub events: Events,
    /// Resolves the process behind a loopback connection.
    pub identity: Arc<IdentityResolver>,
    /// Bounds the sessions served at once.
    permits: Arc<Semaphore>,
    /// Cancelled when the grace period is over: sessions close.
    force_close: CancellationToken,
    /// Listening addresses actually bound (port 0 resolved).
    pub bound: Vec<(SocketAddr, Listener)>,
    /// The transparent redirect, when configured.
    pub redirect: Option<Arc<Redirect>>,
    /// The policy in force.
    pub policy: crate::protocol::SharedPolicy,
    /// The session recorder (a sink of `events`), checked before each session.
    pub recorder: Arc<crate::recording::RecordingSink>,
    /// Statement analyses shared by every session.
    pub analysis: Arc<crate::sql::AnalysisCache>,
    /// Addresses redirected connections arrive on.
    pub redirect_bound: Vec<SocketAddr>,
    /// Client-visible PostgreSQL cancel keys of open sessions.
    pub cancel: Arc<crate::protocol::postgres::cancel::CancelRegistry>,
    /// TLS material for PostgreSQL sessions.
    pub tls: Arc<crate::protocol::postgres::tls::TlsState>,
    /// Statements held for review.
    pub approvals: Arc<crate::approval::Registry>,
    /// Grants given by approvals, kept across restarts.
    pub grants: Arc<crate::approval::GrantStore>,
    /// The two above, as sessions use them.
    pub review_desk: Arc<crate::approval::Desk>,
}

/// What an accept loop serves.
enum Entry {
    /// An explicit listener for one target.
    Listener(Arc<Listener>),
    /// The redirect port: targets come from the kernel's origin records.
    Redirect,
}

/// A started agent: everything is bound and serving.
pub struct RunningAgent {
    shared: Arc<Shared>,
    recorder: Option<crate::recording::RecorderHandle>,
    stop_accepting: CancellationToken,
    /// Ends the notifications' dispatcher (after the stop's aborts).
    stop_notifying: CancellationToken,
    /// Notifications being delivered, waited for a while at the end.
    notifications: Option<TaskTracker>,
    sessions: TaskTracker,
    background: TaskTracker,
}

impl RunningAgent {
    /// Binds every listener, the metrics endpoint and the control socket, then
    /// serves. Fails before serving anything if an address is taken.
    pub async fn start(config: Config) -> anyhow::Result<RunningAgent> {
        let metrics = Arc::new(Metrics::new(config.targets.iter().map(|t| t.name.as_str())));
        let policy = load_policy(&config)?;
        let (recorder, recorder_handle) = start_recorder(&config, &policy)?;
        metrics.set_recorder(recorder.clone());
        let events = Events::new(Arc::new(
            FanOut::default()
                .with(Arc::new(LogSink))
                .with(metrics.clone())
                .with(recorder.clone()),
        ))
        .with_recorder(
            recorder.clone(),
            config
                .targets
                .iter()
                .filter(|t| t.record_raw)
                .map(|t| t.name.clone()),
        );

        for t in config.targets.iter() {
            if t.protocol == Protocol::Mysql {
                tracing::warn!(
                    target_name = %t.name,
                    "target {}: mysql statement inspection is not available in this version; its sessions are relayed as opaque tcp",
                    t.name
                );
            }
        }

        let mut listeners = Vec::new();
        let mut bound = Vec::new();
        for l in &config.listeners {
            let socket = bind_listener(l.listen).await.with_context(|| {
                format!("cannot listen on {} for target \"{}\"", l.listen, l.target)
            })?;
            let addr = socket
                .local_addr()
                .context("reading a bound listener's address")?;
            bound.push((addr, l.clone()));
            listeners.push((socket, l.clone()));
        }
        let mut redirect_sockets = Vec::new();
        let mut redirect = None;
        let mut exec_socket = None;
        if let Some(settings) = &config.redirect {
            let v4 = SocketAddr::from(([127, 0, 0, 1], settings.port));
            let socket = bind_listener(v4).await.with_context(|| {
                format!("cannot listen on {v4} for redirected connections; change redirect.port or stop what uses it")
            })?;
            redirect_sockets.push(socket);
            let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, settings.port));
            let port6 = match bind_listener(v6).await {
                Ok(socket) => {
                    redirect_sockets.push(socket);
                    settings.port
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen on {v6}; native IPv6 connections to targets will be refused");
                    0
                }
            };
            let started = {
                let config = config.clone();
                tokio::task::spawn_blocking(move || Redirect::start(&config, port6)).await?
            };
            let r = Arc::new(started.context("cannot set up the transparent redirect")?);
            metrics.set_redirect(r.clone());
            exec_socket = Some((exec::bind(&settings.exec_socket)?, r.clone()));
            tracing::info!(modes = ?r.modes(), cgroups = r.attached().len(), "transparent redirect active");
            redirect = Some(r);
        }
        let metrics_socket = match config.agent.metrics_listen {
            Some(addr) => Some(metrics::bind(addr).await?),
            None => None,
        };
        let control_socket = control::bind(&config.agent.control_socket)?;
        let grants = Arc::new(crate::approval::GrantStore::open(
            &config.agent.approvals_store,
            std::time::SystemTime::now(),
        )?);
        let approvals_socket = crate::approval::bind_socket(&config.agent)?;
        let reviewer_tokens = Arc::new(crate::approval::tokens::TokenStore::new(
            config.agent.approvals_tokens.clone(),
        ));
        let approvals_tls =
            crate::approval::bind_tls_listener(&config.agent, &reviewer_tokens).await?;
        let approvals = Arc::new(crate::approval::Registry::new(config.reviewers.clone()));
        let review_desk = Arc::new(crate::approval::Desk {
            registry: approvals.clone(),
            grants: grants.clone(),
        });

        let tls =
            crate::protocol::postgres::tls::TlsState::load(&config).context("cannot set up TLS")?;
        let shared = Arc::new(Shared {
            cancel: Arc::new(crate::protocol::postgres::cancel::CancelRegistry::new()),
            tls: Arc::new(tls),
            permits: Arc::new(Semaphore::new(config.agent.max_connections)),
            approvals,
            grants,
            review_desk,
            config,
            metrics,
            live: LiveSessions::default(),
            events,
            identity: Arc::new(IdentityResolver::new()),
            force_close: CancellationToken::new(),
            bound,
            redirect_bound: redirect_sockets
                .iter()
                .filter_map(|s| s.local_addr().ok())
                .collect(),
            redirect,
            recorder,
            policy: Arc::new(std::sync::RwLock::new(Arc::new(policy))),
            analysis: Arc::new(crate::sql::AnalysisCache::new(ANALYSIS_CACHE_ENTRIES)),
        });
        let stop_accepting = CancellationToken::new();
        let sessions = TaskTracker::new();
        let background = TaskTracker::new();
        // The agent's other endpoints: their connections run on
        // `background`, each endpoint bounded by its own permits.
        use crate::accept::WhenFull;
        let endpoint = |name: &'static str, limit: usize, when_full: WhenFull| {
            let counters = shared.metrics.endpoint(name);
            crate::accept::Endpoint::new(name, limit, when_full, &background, counters)
        };

        for (socket, listener) in listeners {
            let addr = socket.local_addr().unwrap_or(listener.listen);
            tracing::info!(listen = %addr, target = %listener.target, upstream = %listener.upstream, "listening");
            background.spawn(accept_loop(
                socket,
                Entry::Listener(Arc::new(listener)),
                shared.clone(),
                stop_accepting.clone(),
                sessions.clone(),
            ));
        }
        for socket in redirect_sockets {
            if let Ok(addr) = socket.local_addr() {
                tracing::info!(listen = %addr, "listening for redirected connections");
            }
            background.spawn(accept_loop(
                socket,
                Entry::Redirect,
                shared.clone(),
                stop_accepting.clone(),
                sessions.clone(),
            ));
        }
        if let Some((socket, redirect)) = exec_socket {
            background.spawn(exec::serve(
                socket,
                redirect.clone(),
                endpoint(
                    "exec",
                    exec::MAX_EXEC_SESSIONS,
                    WhenFull::Refuse(exec::EXEC_BUSY),
                ),
                stop_accepting.clone(),
            ));
            if let Some(events) = redirect.protect.as_ref().and_then(|p| p.take_events()) {
                let names = shared
                    .config
                    .targets
                    .iter()
                    .map(|t| t.name.clone())
                    .collect();
                background.spawn(crate::redirect::protect::watch(
                    events,
                    names,
                    shared.metrics.clone(),
                    stop_accepting.clone(),
                ));
            }
            background.spawn(reconcile_cgroups(redirect, stop_accepting.clone()));
        }
        if let Some(socket) = metrics_socket {
            if let Ok(addr) = socket.local_addr() {
                tracing::info!(%addr, "metrics at http://{addr}/metrics");
            }
            background.spawn(metrics::serve(
                socket,
                shared.metrics.clone(),
                endpoint("metrics", metrics::MAX_METRICS_CONNECTIONS, WhenFull::Wait),
                stop_accepting.clone(),
            ));
        }
        background.spawn(watch_policy(shared.clone(), stop_accepting.clone()));
        background.spawn(prune_recordings(shared.clone(), stop_accepting.clone()));
        tracing::info!(socket = %shared.config.agent.control_socket.display(), "control socket ready");
        background.spawn(control::serve(
            control_socket,
            shared.clone(),
            endpoint("control", control::MAX_CONTROL_CONNECTIONS, WhenFull::Wait),
            stop_accepting.clone(),
        ));
        tracing::info!(socket = %shared.config.agent.approvals_socket.display(), "reviewer socket ready");
        let api_state = Arc::new(crate::approval::api::ApiState {
            registry: shared.approvals.clone(),
            grants: shared.grants.clone(),
            identity: shared.identity.clone(),
            policy: shared.policy.clone(),
            reviewer_groups: shared.config.reviewers.clone(),
            etc: std::path::PathBuf::from("/etc"),
            tokens: reviewer_tokens,
            events: Some(shared.events.clone()),
        });
        background.spawn(crate::approval::api::serve(
            approvals_socket,
            api_state.clone(),
            endpoint(
                "reviewer",
                crate::approval::api::MAX_CONNECTIONS,
                WhenFull::Wait,
            ),
            stop_accepting.clone(),
        ));
        // Cancelled by `shutdown` once the requests it aborts are
        // published, so that they are announced too.
        let stop_notifying = CancellationToken::new();
        let notifications = crate::approval::notify::start(
            &shared.config.notify,
            &shared.approvals,
            shared.metrics.clone(),
            shared.events.clone(),
            stop_notifying.clone(),
        )
        .map(|(dispatcher, deliveries)| {
            background.spawn(dispatcher);
            deliveries
        });
        if let Some((listener, acceptor)) = approvals_tls {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "reviewer API and web page at https://{addr}/");
            }
            background.spawn(crate::approval::api::serve_tls(
                listener,
                acceptor,
                api_state,
                endpoint(
                    "reviewer_tls",
                    crate::approval::api::MAX_CONNECTIONS,
                    WhenFull::Wait,
                ),
                stop_accepting.clone(),
            ));
        }
        background.spawn(crate::approval::expire_requests(
            shared.approvals.clone(),
            stop_accepting.clone(),
        ));

        Ok(RunningAgent {
            recorder: Some(recorder_handle),
            shared,
            stop_accepting,
            stop_notifying,
            notifications,
            sessions,
            background,
        })
    }

    /// The shared state (for status and tests).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting, lets open sessions finish for up to `grace` (or until
    /// `hurry` resolves, e.g. a second signal), then closes what is left.
    pub async fn shutdown(mut self, grace: Duration, hurry: impl std::future::Future<Output = ()>) {
        self.stop_accepting.cancel();
        self.sessions.close();
        self.background.close();
        // Pending requests are not kept across restarts: their sessions
        // learn now, rather than wait for a reviewer who can no longer act.
        let aborted = self.shared.approvals.abort_all();
        if aborted > 0 {
            tracing::warn!(
                aborted,
                "review: pending requests aborted because the agent is stopping"
            );
        }
        self.stop_notifying.cancel();
        let open = self.shared.live.len();
        if open > 0 {
            tracing::info!(
                open,
                grace_s = grace.as_secs_f64(),
                "draining: waiting for open sessions to finish"
            );
        }
        tokio::select! {
            _ = self.sessions.wait() => {}
            _ = tokio::time::sleep(grace) => {
                tracing::warn!(open = self.shared.live.len(), "shutdown grace period over; closing the remaining sessions");
            }
            _ = hurry => {
                tracing::warn!(open = self.shared.live.len(), "second signal; closing the remaining sessions now");
            }
        }
        self.shared.force_close.cancel();
        if tokio::time::timeout(Duration::from_secs(5), self.sessions.wait())
            .await
            .is_err()
        {
            tracing::error!("sessions did not close within 5 s of the deadline; exiting anyway");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.background.wait()).await;
        if let Some(notifications) = self.notifications.take() {
            // What the stop announced (aborted requests) is still being
            // sent: a while for it, never longer than one delivery's tries.
            notifications.close();
            if tokio::time::timeout(NOTIFICATIONS_AT_STOP, notifications.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    "review notifications still being sent when the agent stopped were given up"
                );
            }
        }
        if let Some(recorder) = self.recorder.take() {
            let report = tokio::task::spawn_blocking(move || recorder.shutdown()).await;
            if let Ok(report) = report {
                if report.lost > 0 || report.failure.is_some() {
                    tracing::warn!(lost = report.lost, failure = ?report.failure, "recordings incomplete");
                }
            }
        }
        control::remove(&self.shared.config.agent.control_socket);
        control::remove(&self.shared.config.agent.approvals_socket);
        if let Some(settings) = &self.shared.config.redirect {
            control::remove(&settings.exec_socket);
        }
        tracing::info!("stopped");
    }
}

/// How long a stopping agent waits for review notifications in flight.
const NOTIFICATIONS_AT_STOP: Duration = Duration::from_secs(10);

/// How often governed cgroups are checked for (re)appearance.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);

/// Attaches to governed cgroups that appear after start (a service's cgroup
/// exists only while it runs, and is new after each restart).
async fn reconcile_cgroups(redirect: Arc<Redirect>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
        }
        let r = redirect.clone();
        match tokio::task::spawn_blocking(move || r.reconcile()).await {
            Ok(newly) => {
                for path in newly {
                    tracing::info!(cgroup = %path.display(), "governed cgroup appeared; programs attached");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cgroup reconciliation failed"),
        }
    }
}

/// Statement analyses kept (by text) across sessions.
const ANALYSIS_CACHE_ENTRIES: usize = 10_000;

/// Loads the configured policy files; none configured gives the empty set
/// (every statement allowed, nothing matched).
fn load_policy(config: &Config) -> anyhow::Result<crate::policy::PolicySet> {
    if config.agent.policy_paths.is_empty() {
        return Ok(crate::policy::PolicySet::empty());
    }
    let set = crate::policy::PolicySet::load(&config.agent.policy_paths)
        .map_err(|e| anyhow::anyhow!("the policy is invalid:\n{e}"))?;
    crate::approval::check_review_rules(&set, &config.reviewers)
        .map_err(|e| anyhow::anyhow!("the policy is invalid: {e}"))?;
    tracing::info!(rules = set.rule_count(), digest = %set.digest(), "policy loaded");
    Ok(set)
}

impl RunningAgent {
    /// Re-reads the policy files; an invalid policy keeps the one in force.
    pub fn reload_policy(&self) {
        reload_policy(&self.shared);
    }
}

fn reload_policy(shared: &Shared) {
    match load_policy(&shared.config) {
        Ok(set) => {
            shared.recorder.set_policy_digest(Some(set.digest()));
            if let Ok(mut current) = shared.policy.write() {
                *current = Arc::new(set);
            }
            tracing::info!("policy reloaded");
        }
        Err(e) => tracing::error!("policy reload failed; keeping the policy in force: {e:#}"),
    }
}

/// Starts the recorder writing under `agent.recording_dir`.
fn start_recorder(
    config: &Config,
    policy: &crate::policy::PolicySet,
) -> anyhow::Result<(
    Arc<crate::recording::RecordingSink>,
    crate::recording::RecorderHandle,
)> {
    let mut settings = crate::recording::RecorderSettings::new(&config.agent.recording_dir);
    settings.policy_digest = Some(policy.digest());
    settings.fsync = match config.agent.recording_fsync {
        crate::config::RecordingFsync::EveryEvent => crate::recording::Fsync::EveryEvent,
        crate::config::RecordingFsync::Interval(d) => crate::recording::Fsync::Interval(d),
        crate::config::RecordingFsync::OnClose => crate::recording::Fsync::OnClose,
    };
    settings.on_overflow = match config.agent.recording_on_failure {
        crate::config::RecordingFailure::Refuse => crate::recording::OnOverflow::FailClosed,
        crate::config::RecordingFailure::Continue => crate::recording::OnOverflow::CountLost,
    };
    if let Some(path) = &config.agent.recording_signing_key {
        let key = crate::recording::SigningKey::load(path).with_context(|| {
            "cannot use agent.recording_signing_key; make a key with `tollgate recordings keygen --out PATH`"
        })?;
        tracing::info!(key_id = %key.public_key().key_id(), "recordings are signed");
        settings.signing_key = Some(Arc::new(key));
    }
    let started = crate::recording::Recorder::start(settings).with_context(|| {
        format!(
            "cannot record sessions under {}; create it or set agent.recording_dir",
            config.agent.recording_dir.display()
        )
    })?;
    tracing::info!(dir = %config.agent.recording_dir.display(), "recording sessions");
    Ok(started)
}

/// How often retention runs (it also runs at start).
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Removes old closed recordings at start and every [`PRUNE_INTERVAL`],
/// as `agent.recording_retention_days` and `recording_max_total_size` say.
async fn prune_recordings(shared: Arc<Shared>, stop: CancellationToken) {
    let policy = crate::recording::Retention {
        max_age: shared.config.agent.recording_retention,
        max_total_size: shared.config.agent.recording_max_total_size,
    };
    if policy.is_off() {
        return;
    }
    loop {
        let s = shared.clone();
        let pass = tokio::task::spawn_blocking(move || {
            let recorder = s.recorder.clone();
            crate::recording::prune(
                &s.config.agent.recording_dir,
                &policy,
                std::time::SystemTime::now(),
                &|id| recorder.is_writing(id),
            )
        })
        .await;
        match pass {
            Ok(report) => log_prune(&shared, &policy, &report),
            Err(e) => tracing::warn!(error = %e, "recording retention pass failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_INTERVAL) => {}
        }
    }
}

fn log_prune(
    shared: &Shared,
    policy: &crate::recording::Retention,
    report: &crate::recording::PruneReport,
) {
    use std::sync::atomic::Ordering::Relaxed;
    for r in &report.removed {
        tracing::info!(
            path = %r.path.display(),
            bytes = r.bytes,
            reason = r.reason.as_str(),
            "recording removed by retention ({})",
            match r.reason {
                crate::recording::retention::RemoveReason::Age => "older than recording_retention_days",
                crate::recording::retention::RemoveReason::Size => "over recording_max_total_size",
            }
        );
    }
    for d in &report.dirs_removed {
        tracing::debug!(dir = %d.display(), "empty recording directory removed");
    }
    for e in &report.errors {
        tracing::warn!("recording retention: {e}");
    }
    shared
        .metrics
        .recordings_pruned
        .fetch_add(report.removed.len() as u64, Relaxed);
    shared
        .metrics
        .recordings_pruned_bytes
        .fetch_add(report.freed(), Relaxed);
    if let Some(max) = policy.max_total_size {
        if report.kept_bytes > max {
            tracing::warn!(
                kept_bytes = report.kept_bytes,
                max_total_size = max,
                "recordings still take more than recording_max_total_size: the rest are open sessions or could not be removed"
            );
        }
    }
    if !report.removed.is_empty() {
        tracing::info!(
            removed = report.removed.len(),
            freed_bytes = report.freed(),
            kept = report.kept_files,
            kept_bytes = report.kept_bytes,
            "recording retention pass"
        );
    }
}

/// How often policy files are checked for changes.
const POLICY_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Name, size and modification time of every policy file: a change in any
/// of them (an edit, a new file in a policy directory) triggers a reload.
fn policy_fingerprint(
    paths: &[std::path::PathBuf],
) -> Vec<(std::path::PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut out = Vec::new();
    for path in paths {
        let mut files = vec![path.clone()];
        if path.is_dir() {
            files = std::fs::read_dir(path)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                        .collect()
                })
                .unwrap_or_default();
        }
        for f in files {
            let meta = std::fs::metadata(&f).ok();
            out.push((
                f,
                meta.as_ref().map_or(0, |m| m.len()),
                meta.and_then(|m| m.modified().ok()),
            ));
        }
    }
    out.sort();
    out
}

/// Reloads the policy when its files change (SIGHUP does it at once).
async fn watch_policy(shared: Arc<Shared>, stop: CancellationToken) {
    let paths = shared.config.agent.policy_paths.clone();
    if paths.is_empty() {
        return;
    }
    let mut last = policy_fingerprint(&paths);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(POLICY_POLL_INTERVAL) => {}
        }
        let now = policy_fingerprint(&paths);
        if now != last {
            tracing::info!("policy files changed; reloading");
            reload_policy(&shared);
            last = now;
        }
    }
}

async fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts sessions until told to stop: at most `max_connections` are
/// served at once across every listener and the redirect port (see
/// [`crate::accept`]).
async fn accept_loop(
    socket: TcpListener,
    entry: Entry,
    shared: Arc<Shared>,
    stop: CancellationToken,
    sessions: TaskTracker,
) {
    let local = socket.local_addr().ok();
    let endpoint = crate::accept::Endpoint {
        name: "proxy",
        permits: shared.permits.clone(),
        when_full: crate::accept::WhenFull::Wait,
        tasks: sessions,
        counters: shared.metrics.endpoint("proxy"),
    };
    crate::accept::accept_each(socket, endpoint, stop, |stream, peer| {
        let shared = shared.clone();
        let route = match &entry {
            Entry::Listener(l) => Some(listener_route(&shared, l)),
            Entry::Redirect => redirect_route(&shared, peer),
        };
        // No route: a connection on the redirect port the kernel did not
        // send. It is closed (fail closed).
        let route = route?;
        Some(async move {
            if shared.recorder.refuse_new_sessions() {
                refuse_unrecorded(shared, stream, peer, route).await;
            } else {
                session::serve(shared, stream, peer, route).await;
            }
        })
    })
    .await;
    tracing::debug!(listen = ?local, "listener closed");
}

/// Refuses a session because recording has failed (fail closed: nothing
/// may run unrecorded).
async fn refuse_unrecorded(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, route: Route) {
    let failure = shared.recorder.failure().unwrap_or_default();
    shared
        .metrics
        .sessions_refused_recording
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::error!(
        client = %peer,
        target = %route.target,
        reason = %failure,
        "session refused: recording has failed"
    );
    if route.protocol == Protocol::Postgres {
        refuse::refuse_postgres(
            stream,
            shared.tls.client(),
            "tollgate: session refused: session recording has failed",
            Some(&failure),
            Some("nothing may run unrecorded (agent.recording_on_failure = \"refuse\"); fix the cause, e.g. free space in the recording directory, then restart the agent"),
            shared.config.agent.connect_timeout,
        )
        .await;
    }
}

fn listener_route(shared: &Shared, listener: &Listener) -> Route {
    Route {
        arrival: Arrival::Listener,
        target: listener.target.clone(),
        protocol: shared
            .config
            .targets
            .get(&listener.target)
            .map_or(Protocol::Tcp, |t| t.protocol),
        upstream: UpstreamAddr::Named(listener.upstream.clone()),
        origin: None,
    }
}

fn redirect_route(shared: &Shared, peer: SocketAddr) -> Option<Route> {
    let redirect = shared.redirect.as_ref()?;
    let Some(origin) = redirect.take_origin(peer) else {
        shared
            .metrics
            .origin_misses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(client = %peer, "connection on the redirect port without a kernel origin record; closed (it did not come through the connect hook)");
        return None;
    };
    let Some(target) = shared.config.targets.iter().nth(origin.target_index) else {
        tracing::warn!(client = %peer, destination = %origin.destination,
            "redirected connection names target #{} which the configuration does not have; closed", origin.target_index);
        return None;
    };
    Some(Route {
        arrival: Arrival::Redirect,
        target: target.name.clone(),
        protocol: target.protocol,
        upstream: UpstreamAddr::Direct(origin.destination),
        origin: Some(origin),
    })
}
