//! The agent's assembly: what `tollgate run` starts, in order, and how it
//! stops.
//!
//! [`RunningAgent::start`] loads the policy, starts the recorder, binds every
//! listener and socket (failing before anything is served if one cannot be
//! had), sets up the redirect, then starts the accept loops (`proxy`), the
//! control, reviewer and exec sockets, the metrics endpoint, policy reloading
//! (`policy::reload`), retention (`recording::retention`), cgroup
//! reconciliation (`redirect`) and review notifications.
//! [`RunningAgent::shutdown`] stops accepting, ends pending reviews, drains
//! sessions for the grace period and closes the recorder.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::control;
use crate::events::{Events, FanOut, LogSink};
use crate::identity::IdentityResolver;
use crate::metrics::{self, Metrics};
use crate::proxy::{self, live::LiveSessions, AgentState, Entry};
use crate::redirect::Redirect;

/// A started agent: everything is bound and serving.
pub struct RunningAgent {
    shared: Arc<AgentState>,
    recorder: Option<crate::recording::RecorderHandle>,
    stop_accepting: CancellationToken,
    /// Ends the notifications' dispatcher (after the stop's aborts).
    stop_notifying: CancellationToken,
    /// Notifications being delivered, waited for a while at the end.
    notifications: Option<TaskTracker>,
    sessions: TaskTracker,
    background: TaskTracker,
    /// Uploads recordings (`[upload]`); one last pass at stop.
    uploader: Option<Arc<crate::recording::upload::Uploader>>,
}

/// How long the stop's last upload pass may take: enough for what the
/// last sessions left, bounded so that a dead bucket cannot hold the stop
/// (what is left is uploaded at the next start).
const UPLOAD_AT_STOP: Duration = Duration::from_secs(20);

impl RunningAgent {
    /// Binds every listener, the metrics endpoint and the control socket, then
    /// serves. Fails before serving anything if an address is taken.
    pub async fn start(config: Config) -> anyhow::Result<RunningAgent> {
        let metrics = Arc::new(Metrics::new(config.targets.iter().map(|t| t.name.as_str())));
        let policy_source = match &config.policy_source {
            Some(source) => {
                let stats = Arc::new(crate::policy::source::SourceStats::default());
                crate::policy::source::sync_at_start(source, &config.reviewers, &stats).await?;
                metrics.set_policy_source(stats.clone());
                Some((source.clone(), stats))
            }
            None => None,
        };
        let policy = load_policy(&config)?;
        let (recorder, recorder_handle) = start_recorder(&config, &policy)?;
        metrics.set_recorder(recorder.clone());
        let uploader = match &config.upload {
            Some(settings) => {
                let store = crate::recording::upload::open_store(&settings.s3)
                    .map_err(|e| anyhow::anyhow!("[upload]: {e}"))?;
                let uploader = Arc::new(crate::recording::upload::Uploader::new(
                    Arc::new(store),
                    settings.clone(),
                ));
                metrics.set_uploads(uploader.stats.clone());
                Some(uploader)
            }
            None => None,
        };
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

        let mut listeners = Vec::new();
        let mut bound = Vec::new();
        for l in &config.listeners {
            let socket = proxy::bind_listener(l.listen).await.with_context(|| {
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
            let socket = proxy::bind_listener(v4).await.with_context(|| {
                format!("cannot listen on {v4} for redirected connections; change redirect.port or stop what uses it")
            })?;
            redirect_sockets.push(socket);
            let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, settings.port));
            let port6 = match proxy::bind_listener(v6).await {
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
            exec_socket = Some((
                crate::redirect::exec::bind(&settings.exec_socket)?,
                r.clone(),
            ));
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

        let handlers = crate::protocol::Handlers::new(&config)?;
        let identity = Arc::new(IdentityResolver::new());
        let job_rings = redirect
            .as_ref()
            .map(|r| r.take_job_events())
            .unwrap_or_default();
        let jobs = match &redirect {
            Some(r) if !job_rings.is_empty() => Some(Arc::new(crate::jobs::Jobs::new(
                recorder.clone(),
                r.clone(),
                identity.clone(),
                config.targets.iter().map(|t| t.name.clone()).collect(),
            ))),
            _ => None,
        };
        if let Some(jobs) = &jobs {
            metrics.set_jobs(jobs.clone());
        }
        let shared = Arc::new(AgentState {
            handlers,
            permits: Arc::new(Semaphore::new(config.agent.max_connections)),
            approvals,
            grants,
            review_desk,
            config,
            metrics,
            live: LiveSessions::default(),
            events,
            identity,
            jobs: jobs.clone(),
            force_close: CancellationToken::new(),
            bound,
            redirect_bound: redirect_sockets
                .iter()
                .filter_map(|s| s.local_addr().ok())
                .collect(),
            redirect,
            recorder,
            policy: crate::policy::SharedPolicy::new(policy),
            analysis: Arc::new(crate::sql::AnalysisCache::new(ANALYSIS_CACHE_ENTRIES)),
        });
        shared.metrics.set_policy(shared.policy.clone());
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

        if let Some(uploader) = &uploader {
            // Before serving: a spool the last run left full refuses the
            // first session already.
            uploader
                .scan(&shared.config.agent.recording_dir, &shared.recorder)
                .await;
        }
        for (socket, listener) in listeners {
            let addr = socket.local_addr().unwrap_or(listener.listen);
            tracing::info!(listen = %addr, target = %listener.target, upstream = %listener.upstream, "listening");
            background.spawn(proxy::accept_loop(
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
            background.spawn(proxy::accept_loop(
                socket,
                Entry::Redirect,
                shared.clone(),
                stop_accepting.clone(),
                sessions.clone(),
            ));
        }
        if let Some((socket, redirect)) = exec_socket {
            background.spawn(crate::redirect::exec::serve(
                socket,
                redirect.clone(),
                endpoint(
                    "exec",
                    crate::redirect::exec::MAX_EXEC_SESSIONS,
                    WhenFull::Refuse(crate::redirect::exec::EXEC_BUSY),
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
            if let Some(jobs) = jobs {
                background.spawn(crate::jobs::watch(jobs, job_rings, stop_accepting.clone()));
            }
            background.spawn(crate::redirect::keep_reconciling(
                redirect,
                stop_accepting.clone(),
            ));
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
        if let Some((source, stats)) = policy_source {
            background.spawn(crate::policy::source::keep_syncing(
                source,
                shared.config.reviewers.clone(),
                stats,
                stop_accepting.clone(),
            ));
        }
        background.spawn(crate::policy::reload::watch(
            shared.config.agent.policy_paths.clone(),
            stop_accepting.clone(),
            {
                let shared = shared.clone();
                move || reload_policy(&shared)
            },
        ));
        background.spawn(crate::recording::retention::keep_pruning(
            shared.config.agent.recording_dir.clone(),
            crate::recording::Retention {
                max_age: shared.config.agent.recording_retention,
                max_total_size: shared.config.agent.recording_max_total_size,
            },
            shared.recorder.clone(),
            stop_accepting.clone(),
            {
                let metrics = shared.metrics.clone();
                move |files, bytes| {
                    use std::sync::atomic::Ordering::Relaxed;
                    metrics.recordings_pruned.fetch_add(files, Relaxed);
                    metrics.recordings_pruned_bytes.fetch_add(bytes, Relaxed);
                }
            },
        ));
        if let Some(uploader) = &uploader {
            tracing::info!(bucket = %shared.config.upload.as_ref().map_or("", |u| u.s3.bucket.as_str()), "uploading closed recordings");
            background.spawn(crate::recording::upload::keep_uploading(
                uploader.clone(),
                shared.config.agent.recording_dir.clone(),
                shared.recorder.clone(),
                stop_accepting.clone(),
            ));
        }
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
        if let Some(settings) = &shared.config.shared_approvals {
            let link = Arc::new(crate::approval::shared::Link::default());
            shared.metrics.set_shared_approvals(link.clone());
            // Stopped with the notifications, after the stop's aborts are
            // published, so that the table learns of them.
            background.spawn(crate::approval::shared::link_agent(
                crate::approval::shared::AgentSide {
                    registry: shared.approvals.clone(),
                    grants: shared.grants.clone(),
                    events: shared.events.clone(),
                },
                settings.clone(),
                link,
                stop_notifying.clone(),
            ));
        }

        Ok(RunningAgent {
            recorder: Some(recorder_handle),
            shared,
            stop_accepting,
            stop_notifying,
            notifications,
            sessions,
            background,
            uploader,
        })
    }

    /// The shared state (for status and tests).
    pub fn shared(&self) -> &Arc<AgentState> {
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
        if let Some(uploader) = self.uploader.take() {
            // Every recording is closed now: ship what the last sessions left.
            let never = CancellationToken::new();
            let pass = uploader.pass(
                &self.shared.config.agent.recording_dir,
                &self.shared.recorder,
                &never,
            );
            match tokio::time::timeout(UPLOAD_AT_STOP, pass).await {
                Ok(true) => tracing::info!("every closed recording is uploaded"),
                _ => tracing::warn!(
                    left = uploader.stats.spool_recordings.load(std::sync::atomic::Ordering::Relaxed),
                    "recordings not yet uploaded stay in the recording directory; the next start uploads them"
                ),
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

/// Statement analyses kept (by text) across sessions.
const ANALYSIS_CACHE_ENTRIES: usize = 10_000;

/// Loads the configured policy files; none configured gives the empty set
/// (every statement allowed, nothing matched).
pub(crate) fn load_policy(config: &Config) -> anyhow::Result<crate::policy::PolicySet> {
    if config.agent.policy_paths.is_empty() {
        return Ok(crate::policy::PolicySet::empty());
    }
    let mut paths = config.agent.policy_paths.clone();
    if config.policy_source.is_some() {
        // Its link resolved once: every file comes from the same version,
        // even if the link moves while they are read.
        paths = paths
            .iter()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
            .collect();
    }
    let set = crate::policy::PolicySet::load(&paths)
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

fn reload_policy(shared: &AgentState) {
    match load_policy(&shared.config) {
        Ok(set) => {
            shared.recorder.set_policy_digest(Some(set.digest()));
            shared.policy.replace(set);
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
