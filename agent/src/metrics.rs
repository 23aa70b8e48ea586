//! Prometheus metrics: counters kept in atomics, rendered in the text
//! exposition format by a small HTTP endpoint (`GET /metrics`, `GET /healthz`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::events::{EventSink, SessionEvent};
use crate::policy::Action;

/// Counters for one target.
#[derive(Default, Debug)]
pub struct TargetMetrics {
    /// Connections accepted for this target.
    pub connections: AtomicU64,
    /// Sessions currently open.
    pub active: AtomicU64,
    /// Bytes relayed from clients.
    pub bytes_from_client: AtomicU64,
    /// Bytes relayed from the upstream.
    pub bytes_from_upstream: AtomicU64,
    /// Statements decided, by action (indexed by discriminant, which is
    /// [`Action::ALL`] order).
    statements: [AtomicU64; Action::ALL.len()],
    /// Result values masked (NULLs, which stay NULL, not counted).
    pub masked_values: AtomicU64,
}

impl TargetMetrics {
    /// Counts one statement decided `action`.
    pub fn statement(&self, action: Action) {
        if let Some(counter) = self.statements.get(action as usize) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Statements decided `action` so far.
    pub fn statements(&self, action: Action) -> u64 {
        self.statements
            .get(action as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// The agent's metrics.
#[derive(Default)]
pub struct Metrics {
    targets: HashMap<String, Arc<TargetMetrics>>,
    /// Sessions closed, by (target, reason label).
    closed: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Identity lookups that failed, by reason label.
    identity_failures: Mutex<BTreeMap<&'static str, u64>>,
    /// `on_match` interventions, by (action, scope, outcome).
    interventions: Mutex<BTreeMap<(String, String, &'static str), u64>>,
    /// Connection counters of each endpoint (`proxy`, `control`, ...).
    endpoints: Mutex<BTreeMap<&'static str, Arc<crate::accept::EndpointCounters>>>,
    /// Sum and count of identity lookup time, microseconds.
    identity_lookup_micros: AtomicU64,
    identity_lookups: AtomicU64,
    /// Redirected connections accepted without a kernel origin record.
    pub origin_misses: AtomicU64,
    /// The redirect, whose kernel counters are rendered too.
    redirect: std::sync::OnceLock<Arc<crate::redirect::Redirect>>,
    jobs: std::sync::OnceLock<Arc<crate::jobs::Jobs>>,
    /// The uploader's counters, when `[upload]` is configured.
    uploads: std::sync::OnceLock<Arc<crate::recording::upload::UploadStats>>,
    /// The policy source's counters, with `[policy_source]`.
    policy_source: std::sync::OnceLock<Arc<crate::policy::source::SourceStats>>,
    /// The shared approvals store's link, with `[shared_approvals]`.
    shared_approvals: std::sync::OnceLock<Arc<crate::approval::shared::Link>>,
    /// Connections refused because recording failed (fail closed).
    pub sessions_refused_recording: AtomicU64,
    /// Connections refused because the upload spool was full.
    pub sessions_refused_spool_full: AtomicU64,
    /// Recordings removed by retention.
    pub recordings_pruned: AtomicU64,
    /// Bytes freed by retention.
    pub recordings_pruned_bytes: AtomicU64,
    /// The recorder, whose counters are rendered too.
    recorder: std::sync::OnceLock<Arc<crate::recording::RecordingSink>>,
    /// The policy in force, whose digest and size are rendered.
    policy: std::sync::OnceLock<crate::policy::SharedPolicy>,
    /// Connects to protected targets that skipped the redirect, as
    /// reported by the kernel, by (target, verdict).
    protect_bypass: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Human review: requests made, ended by outcome, the time they
    /// waited, and statements let through by grants.
    reviews: Mutex<ReviewCounts>,
    /// Review notifications by (kind, result): delivered, failed after
    /// every attempt, or dropped before sending (queue full).
    review_notifications: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

/// Counters of human review.
#[derive(Default)]
struct ReviewCounts {
    requested: u64,
    ended: BTreeMap<String, u64>,
    waited_ms_sum: u64,
    waited: u64,
    grants_used: u64,
}

impl Metrics {
    /// Creates counters for every target name.
    pub fn new<'a>(targets: impl IntoIterator<Item = &'a str>) -> Metrics {
        Metrics {
            targets: targets
                .into_iter()
                .map(|t| (t.to_string(), Arc::new(TargetMetrics::default())))
                .collect(),
            ..Metrics::default()
        }
    }

    /// The connection counters of endpoint `name`, created on first use.
    pub fn endpoint(&self, name: &'static str) -> Arc<crate::accept::EndpointCounters> {
        let mut endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        endpoints.entry(name).or_default().clone()
    }

    /// Counters for a target (a detached set for unknown names).
    pub fn target(&self, name: &str) -> Arc<TargetMetrics> {
        self.targets.get(name).cloned().unwrap_or_default()
    }

    /// Records how long an identity lookup took and, if it failed, why.
    pub fn identity_lookup(&self, took: Duration, failure: Option<&'static str>) {
        self.identity_lookup_micros.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.identity_lookups.fetch_add(1, Ordering::Relaxed);
        if let Some(reason) = failure {
            if let Ok(mut m) = self.identity_failures.lock() {
                *m.entry(reason).or_default() += 1;
            }
        }
    }

    /// Counts one connect to protected `target` that skipped the redirect,
    /// let through (`audit`) or refused (`deny`).
    pub fn protect_bypass(&self, target: &str, verdict: &'static str) {
        if let Ok(mut m) = self.protect_bypass.lock() {
            *m.entry((target.to_string(), verdict)).or_default() += 1;
        }
    }

    /// Bypass attempts counted for `target` with `verdict` so far.
    pub fn protect_bypasses(&self, target: &str, verdict: &'static str) -> u64 {
        self.protect_bypass
            .lock()
            .ok()
            .and_then(|m| m.get(&(target.to_string(), verdict)).copied())
            .unwrap_or(0)
    }

    /// Counts one step of a statement's review.
    fn review(&self, update: &crate::events::ReviewUpdate) {
        use crate::events::ReviewUpdate;
        let Ok(mut r) = self.reviews.lock() else {
            return;
        };
        match update {
            ReviewUpdate::Requested(_) => r.requested += 1,
            ReviewUpdate::Ended(end) => {
                *r.ended.entry(end.outcome.clone()).or_default() += 1;
                r.waited_ms_sum = r.waited_ms_sum.saturating_add(end.waited_ms);
                r.waited += 1;
            }
            ReviewUpdate::GrantUsed(_) => r.grants_used += 1,
            // Counted once per grant where it is stored or revoked, not per
            // session told.
            ReviewUpdate::GrantGiven(_) | ReviewUpdate::GrantRevoked(_) => {}
            // Counted by the notifier itself, which also counts the
            // notifications of sessions that ended meanwhile.
            ReviewUpdate::Notified(_) => {}
        }
    }

    /// Counts one review notification of `kind` (`webhook`, `slack`) with
    /// `result` (`ok`, `failed`, `dropped`).
    pub fn review_notification(&self, kind: &'static str, result: &'static str) {
        self.review_notifications_add(kind, result, 1);
    }

    /// Counts `n` review notifications at once (dropped ones).
    pub fn review_notifications_add(&self, kind: &'static str, result: &'static str, n: u64) {
        if let Ok(mut m) = self.review_notifications.lock() {
            *m.entry((kind, result)).or_default() += n;
        }
    }

    /// Review notifications of `kind` with `result` so far.
    pub fn review_notifications(&self, kind: &'static str, result: &'static str) -> u64 {
        self.review_notifications
            .lock()
            .ok()
            .and_then(|m| m.get(&(kind, result)).copied())
            .unwrap_or(0)
    }

    /// Reviews ended with `outcome` so far.
    pub fn reviews_ended(&self, outcome: &str) -> u64 {
        self.reviews
            .lock()
            .ok()
            .and_then(|r| r.ended.get(outcome).copied())
            .unwrap_or(0)
    }

    /// Reports the job timeline's counters.
    pub fn set_jobs(&self, jobs: Arc<crate::jobs::Jobs>) {
        let _ = self.jobs.set(jobs);
    }

    /// The policy source's counters, with `[policy_source]`.
    pub fn policy_source(&self) -> Option<&Arc<crate::policy::source::SourceStats>> {
        self.policy_source.get()
    }

    /// Adds the policy source's counters to the rendered metrics.
    pub fn set_policy_source(&self, stats: Arc<crate::policy::source::SourceStats>) {
        let _ = self.policy_source.set(stats);
    }

    /// The shared approvals store's link, with `[shared_approvals]`.
    pub fn shared_approvals(&self) -> Option<&Arc<crate::approval::shared::Link>> {
        self.shared_approvals.get()
    }

    /// Adds the shared approvals link to the rendered metrics.
    pub fn set_shared_approvals(&self, link: Arc<crate::approval::shared::Link>) {
        let _ = self.shared_approvals.set(link);
    }

    /// The recording uploader's counters, when `[upload]` is configured.
    pub fn uploads(&self) -> Option<&Arc<crate::recording::upload::UploadStats>> {
        self.uploads.get()
    }

    /// Adds the recording uploader's counters to the rendered metrics.
    pub fn set_uploads(&self, uploads: Arc<crate::recording::upload::UploadStats>) {
        let _ = self.uploads.set(uploads);
    }

    /// Adds the redirect's kernel counters to the rendered metrics.
    pub fn set_redirect(&self, redirect: Arc<crate::redirect::Redirect>) {
        let _ = self.redirect.set(redirect);
    }

    /// Adds the policy in force (its digest, its rules) to the rendered
    /// metrics.
    pub fn set_policy(&self, policy: crate::policy::SharedPolicy) {
        let _ = self.policy.set(policy);
    }

    /// Adds the recorder's counters to the rendered metrics.
    pub fn set_recorder(&self, recorder: Arc<crate::recording::RecordingSink>) {
        let _ = self.recorder.set(recorder);
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut names: Vec<&String> = self.targets.keys().collect();
        names.sort();
        let per_target = |out: &mut String,
                          name: &str,
                          kind: &str,
                          help: &str,
                          get: &dyn Fn(&TargetMetrics) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for t in &names {
                if let Some(m) = self.targets.get(*t) {
                    let _ = writeln!(out, "{name}{{target=\"{}\"}} {}", escape(t), get(m));
                }
            }
        };
        if let Some(policy) = self.policy.get() {
            let policy = crate::policy::current_policy(policy);
            let _ = writeln!(
                out,
                "# HELP tollgate_policy_info The policy in force: the digest recordings carry too.\n# TYPE tollgate_policy_info gauge\ntollgate_policy_info{{digest=\"{}\"}} 1\n# HELP tollgate_policy_rules Rules in the policy in force.\n# TYPE tollgate_policy_rules gauge\ntollgate_policy_rules {}",
                policy.digest(),
                policy.rule_count()
            );
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_build_info Agent version.\n# TYPE tollgate_build_info gauge\ntollgate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        per_target(
            &mut out,
            "tollgate_connections_total",
            "counter",
            "Connections accepted, by target.",
            &|m| m.connections.load(Ordering::Relaxed),
        );
        per_target(
            &mut out,
            "tollgate_connections_active",
            "gauge",
            "Sessions open now, by target.",
            &|m| m.active.load(Ordering::Relaxed),
        );
        let _ = writeln!(out, "# HELP tollgate_bytes_total Bytes relayed, by target and direction.\n# TYPE tollgate_bytes_total counter");
        for t in &names {
            if let Some(m) = self.targets.get(*t) {
                let t = escape(t);
                let _ = writeln!(
                    out,
                    "tollgate_bytes_total{{target=\"{t}\",direction=\"from_client\"}} {}",
                    m.bytes_from_client.load(Ordering::Relaxed)
                );
                let _ = writeln!(
                    out,
                    "tollgate_bytes_total{{target=\"{t}\",direction=\"from_upstream\"}} {}",
                    m.bytes_from_upstream.load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(out, "# HELP tollgate_statements_total Statements decided, by target and action.\n# TYPE tollgate_statements_total counter");
        for t in &names {
            if let Some(m) = self.targets.get(*t) {
                let t = escape(t);
                for action in Action::ALL {
                    let _ = writeln!(
                        out,
                        "tollgate_statements_total{{target=\"{t}\",action=\"{action}\"}} {}",
                        m.statements(action)
                    );
                }
            }
        }
        per_target(
            &mut out,
            "tollgate_masked_values_total",
            "counter",
            "Result values masked by mask rules, by target.",
            &|m| m.masked_values.load(Ordering::Relaxed),
        );
        let _ = writeln!(out, "# HELP tollgate_sessions_closed_total Sessions ended, by target and reason.\n# TYPE tollgate_sessions_closed_total counter");
        if let Ok(closed) = self.closed.lock() {
            for ((target, reason), n) in closed.iter() {
                let _ = writeln!(
                    out,
                    "tollgate_sessions_closed_total{{target=\"{}\",reason=\"{reason}\"}} {n}",
                    escape(target)
                );
            }
        }
        let _ = writeln!(out, "# HELP tollgate_identity_lookup_failures_total Connections whose process identity could not be fully resolved, by reason.\n# TYPE tollgate_identity_lookup_failures_total counter");
        if let Ok(f) = self.identity_failures.lock() {
            for (reason, n) in f.iter() {
                let _ = writeln!(
                    out,
                    "tollgate_identity_lookup_failures_total{{reason=\"{reason}\"}} {n}"
                );
            }
        }
        let _ = writeln!(out, "# HELP tollgate_interventions_total Processes or jobs a rule's on_match stopped or killed, by action, scope and outcome (done, failed).\n# TYPE tollgate_interventions_total counter");
        if let Ok(m) = self.interventions.lock() {
            for ((action, scope, outcome), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "tollgate_interventions_total{{action=\"{}\",scope=\"{}\",outcome=\"{outcome}\"}} {n}",
                    escape(action),
                    escape(scope)
                );
            }
        }
        if let Ok(r) = self.reviews.lock() {
            let _ = writeln!(
                out,
                "# HELP tollgate_review_requests_total Statements held for human review.\n# TYPE tollgate_review_requests_total counter\ntollgate_review_requests_total {}",
                r.requested
            );
            let _ = writeln!(out, "# HELP tollgate_review_outcomes_total Reviews ended, by outcome (approved, denied, expired, cancelled, aborted).\n# TYPE tollgate_review_outcomes_total counter");
            for (outcome, n) in &r.ended {
                let _ = writeln!(
                    out,
                    "tollgate_review_outcomes_total{{outcome=\"{}\"}} {n}",
                    escape(outcome)
                );
            }
            let _ = writeln!(
                out,
                "# HELP tollgate_review_wait_seconds Time held statements waited for their outcome.\n# TYPE tollgate_review_wait_seconds summary\ntollgate_review_wait_seconds_sum {}\ntollgate_review_wait_seconds_count {}",
                r.waited_ms_sum as f64 / 1e3,
                r.waited
            );
            let _ = writeln!(
                out,
                "# HELP tollgate_review_grants_used_total Statements a review rule holds that ran under a grant.\n# TYPE tollgate_review_grants_used_total counter\ntollgate_review_grants_used_total {}",
                r.grants_used
            );
        }
        if let Ok(m) = self.review_notifications.lock() {
            let _ = writeln!(out, "# HELP tollgate_review_notifications_total Review notifications by kind (webhook, slack) and result (ok, failed after every attempt, dropped before sending).\n# TYPE tollgate_review_notifications_total counter");
            for ((kind, result), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "tollgate_review_notifications_total{{kind=\"{kind}\",result=\"{result}\"}} {n}"
                );
            }
        }
        let micros = self.identity_lookup_micros.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP tollgate_identity_lookup_seconds Time spent resolving process identities.\n# TYPE tollgate_identity_lookup_seconds summary\ntollgate_identity_lookup_seconds_sum {}\ntollgate_identity_lookup_seconds_count {}",
            micros as f64 / 1e6,
            self.identity_lookups.load(Ordering::Relaxed)
        );
        self.render_endpoints(&mut out);
        if let Some(r) = self.redirect.get() {
            let k = r.stats();
            let _ = writeln!(out, "# HELP tollgate_redirect_connects_total Connects seen by the kernel programs, by verdict; denied also counts refused UDP sends.\n# TYPE tollgate_redirect_connects_total counter");
            for (verdict, n) in [
                ("redirected", k.redirected),
                ("denied", k.denied),
                ("passed", k.passed),
            ] {
                let _ = writeln!(
                    out,
                    "tollgate_redirect_connects_total{{verdict=\"{verdict}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "# HELP tollgate_redirect_kernel_errors_total Internal failures in the kernel programs (each refused a connect).\n# TYPE tollgate_redirect_kernel_errors_total counter\ntollgate_redirect_kernel_errors_total {}",
                k.errors
            );
            let _ = writeln!(
                out,
                "# HELP tollgate_redirect_pending_origins Origin records published and not yet taken by the proxy.\n# TYPE tollgate_redirect_pending_origins gauge\ntollgate_redirect_pending_origins {}",
                r.pending_origins()
            );
            if let Some(p) = &r.protect {
                self.render_protect(&mut out, &p.stats());
            }
            if let Some(jobs) = self.jobs.get() {
                let v = jobs.view();
                let _ = writeln!(out, "# HELP tollgate_job_events_total Process and connect events of governed jobs, by outcome.\n# TYPE tollgate_job_events_total counter");
                for (outcome, n) in [
                    ("sent", v.events_sent),
                    ("dropped_in_kernel", v.events_dropped_in_kernel),
                    ("dropped_by_agent", v.events_dropped_by_agent),
                ] {
                    let _ = writeln!(
                        out,
                        "tollgate_job_events_total{{outcome=\"{outcome}\"}} {n}"
                    );
                }
                let _ = writeln!(
                    out,
                    "# HELP tollgate_jobs_open Job recordings open now.\n# TYPE tollgate_jobs_open gauge\ntollgate_jobs_open {}",
                    v.open.len()
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_redirect_origin_misses_total Connections on the redirect port without a kernel origin record (closed: fail closed).\n# TYPE tollgate_redirect_origin_misses_total counter\ntollgate_redirect_origin_misses_total {}",
            self.origin_misses.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_sessions_refused_total Connections refused before a session started, by reason.\n# TYPE tollgate_sessions_refused_total counter\ntollgate_sessions_refused_total{{reason=\"recording_failed\"}} {}\ntollgate_sessions_refused_total{{reason=\"spool_full\"}} {}",
            self.sessions_refused_recording.load(Ordering::Relaxed),
            self.sessions_refused_spool_full.load(Ordering::Relaxed)
        );
        if let Some(r) = self.recorder.get() {
            let _ = writeln!(
                out,
                "# HELP tollgate_recording_events_lost_total Session events not recorded (queue full, disk error, recorder stopped).\n# TYPE tollgate_recording_events_lost_total counter\ntollgate_recording_events_lost_total {}",
                r.lost()
            );
            let _ = writeln!(
                out,
                "# HELP tollgate_recording_failed 1 once recording has failed (latched until restart).\n# TYPE tollgate_recording_failed gauge\ntollgate_recording_failed {}",
                u8::from(r.failed())
            );
            let _ = writeln!(
                out,
                "# HELP tollgate_recording_queue_depth Events waiting for the recorder's writer.\n# TYPE tollgate_recording_queue_depth gauge\ntollgate_recording_queue_depth {}",
                r.queued()
            );
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_recordings_pruned_total Recordings removed by retention.\n# TYPE tollgate_recordings_pruned_total counter\ntollgate_recordings_pruned_total {}",
            self.recordings_pruned.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_recordings_pruned_bytes_total Bytes freed by retention.\n# TYPE tollgate_recordings_pruned_bytes_total counter\ntollgate_recordings_pruned_bytes_total {}",
            self.recordings_pruned_bytes.load(Ordering::Relaxed)
        );
        if let Some(uploads) = self.uploads.get() {
            uploads.render(&mut out);
        }
        if let Some(source) = self.policy_source.get() {
            source.render(&mut out);
        }
        if let Some(link) = self.shared_approvals.get() {
            link.render(&mut out);
        }
        out
    }
}

impl Metrics {
    fn render_endpoints(&self, out: &mut String) {
        let endpoints: Vec<(&'static str, Arc<crate::accept::EndpointCounters>)> = self
            .endpoints
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default();
        let errors: u64 = endpoints
            .iter()
            .map(|(_, c)| c.accept_errors.load(Ordering::Relaxed))
            .sum();
        let _ = writeln!(
            out,
            "# HELP tollgate_accept_errors_total Errors accepting connections, every endpoint.\n# TYPE tollgate_accept_errors_total counter\ntollgate_accept_errors_total {errors}"
        );
        type Read = fn(&crate::accept::EndpointCounters) -> u64;
        let families: [(&str, &str, &str, Read); 3] = [
            (
                "tollgate_endpoint_connections",
                "gauge",
                "Connections being served, by endpoint (proxy: sessions, control, exec, reviewer, reviewer_tls, metrics).",
                |c| c.open.load(Ordering::Relaxed),
            ),
            (
                "tollgate_endpoint_connections_accepted_total",
                "counter",
                "Connections accepted, by endpoint.",
                |c| c.accepted.load(Ordering::Relaxed),
            ),
            (
                "tollgate_endpoint_connections_refused_total",
                "counter",
                "Connections closed unserved because the endpoint served as many as it may, by endpoint.",
                |c| c.refused.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, read) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (endpoint, counters) in &endpoints {
                let _ = writeln!(out, "{name}{{endpoint=\"{endpoint}\"}} {}", read(counters));
            }
        }
    }

    fn render_protect(&self, out: &mut String, kernel: &crate::redirect::protect::ProtectStats) {
        let _ = writeln!(out, "# HELP tollgate_protect_bypass_attempts_total Connections to a protected target that did not come through the redirect, by target and verdict (audit: let through, deny: refused), as read from the kernel's reports.\n# TYPE tollgate_protect_bypass_attempts_total counter");
        if let Ok(m) = self.protect_bypass.lock() {
            for ((target, verdict), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "tollgate_protect_bypass_attempts_total{{target=\"{}\",verdict=\"{verdict}\"}} {n}",
                    escape(target)
                );
            }
        }
        let _ = writeln!(out, "# HELP tollgate_protect_kernel_connects_total Connects to protected targets seen by the root cgroup's programs without a redirect, by outcome (exempt: the agent's own upstream connections).\n# TYPE tollgate_protect_kernel_connects_total counter");
        for (outcome, n) in [
            ("audited", kernel.audited),
            ("denied", kernel.denied),
            ("exempt", kernel.exempt),
        ] {
            let _ = writeln!(
                out,
                "tollgate_protect_kernel_connects_total{{outcome=\"{outcome}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_protect_events_dropped_total Bypass reports lost because the kernel's ring buffer was full (the verdict still applied).\n# TYPE tollgate_protect_events_dropped_total counter\ntollgate_protect_events_dropped_total {}",
            kernel.dropped
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_protect_kernel_errors_total Connects to protected targets seen while the protect configuration was missing (let through).\n# TYPE tollgate_protect_kernel_errors_total counter\ntollgate_protect_kernel_errors_total {}",
            kernel.errors
        );
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl EventSink for Metrics {
    fn emit(&self, event: &SessionEvent) {
        match event {
            SessionEvent::Started(info) => {
                let m = self.target(&info.target);
                m.connections.fetch_add(1, Ordering::Relaxed);
                m.active.fetch_add(1, Ordering::Relaxed);
            }
            SessionEvent::UpstreamConnected { .. }
            | SessionEvent::Startup { .. }
            | SessionEvent::Statement { .. }
            | SessionEvent::Raw { .. }
            | SessionEvent::ExeHashed { .. }
            | SessionEvent::Job { .. }
            | SessionEvent::ChannelExit { .. }
            | SessionEvent::Sftp { .. }
            | SessionEvent::Closed { .. } => {}
            SessionEvent::Review { review, .. } => self.review(review),
            SessionEvent::Intervention { intervention, .. } => {
                let outcome = if intervention.error.is_none() {
                    "done"
                } else {
                    "failed"
                };
                if let Ok(mut m) = self.interventions.lock() {
                    *m.entry((
                        intervention.action.clone(),
                        intervention.scope.clone(),
                        outcome,
                    ))
                    .or_default() += 1;
                }
            }
        }
    }
}

impl Metrics {
    /// Records the end of a session of `target`.
    pub fn session_closed(&self, target: &str, reason: &'static str) {
        let m = self.target(target);
        // Saturating: a detached counter for an unknown target starts at zero.
        let _ = m
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        if let Ok(mut closed) = self.closed.lock() {
            *closed.entry((target.to_string(), reason)).or_default() += 1;
        }
    }
}

/// Largest HTTP request head the endpoint reads.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Scrapes answered at once; more wait in the socket's backlog.
pub const MAX_METRICS_CONNECTIONS: usize = 16;

/// Serves `/metrics` and `/healthz` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    endpoint: crate::accept::Endpoint,
    shutdown: CancellationToken,
) {
    crate::accept::accept_each(listener, endpoint, shutdown, |stream, _| {
        let metrics = metrics.clone();
        Some(async move {
            if let Err(e) =
                tokio::time::timeout(Duration::from_secs(5), answer(stream, &metrics)).await
            {
                tracing::debug!(error = %e, "metrics endpoint: request timed out");
            }
        })
    })
    .await;
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
        if head.len() > MAX_REQUEST_HEAD {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head too large\n",
            )
            .await;
        }
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &metrics.render(),
            )
            .await
        }
        ("GET", "/healthz") => respond(&mut stream, "200 OK", "text/plain", "ok\n").await,
        ("GET", _) => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "not found; try /metrics\n",
            )
            .await
        }
        _ => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "only GET is served\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds the metrics endpoint, with an error that says what to change.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen for metrics on {addr}: {e}; change agent.metrics_listen or stop what uses the port")
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn renders_counters_per_target_in_text_format() {
        let m = Metrics::new(["b", "a\"x"]);
        m.target("b").connections.fetch_add(3, Ordering::Relaxed);
        m.target("b")
            .bytes_from_client
            .fetch_add(10, Ordering::Relaxed);
        m.session_closed("b", "completed");
        m.identity_lookup(Duration::from_micros(1500), Some("process_exited"));
        let text = m.render();
        assert!(
            text.contains("tollgate_connections_total{target=\"b\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("tollgate_connections_total{target=\"a\\\"x\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("tollgate_bytes_total{target=\"b\",direction=\"from_client\"} 10\n"));
        assert!(
            text.contains("tollgate_sessions_closed_total{target=\"b\",reason=\"completed\"} 1\n")
        );
        assert!(
            text.contains("tollgate_identity_lookup_failures_total{reason=\"process_exited\"} 1\n")
        );
        assert!(text.contains("tollgate_identity_lookup_seconds_sum 0.0015\n"));
        assert_eq!(
            m.target("b").active.load(Ordering::Relaxed),
            0,
            "active never goes below zero"
        );
        let a = text.find("target=\"a\\\"x\"").unwrap();
        let b = text.find("target=\"b\"").unwrap();
        assert!(a < b, "targets are sorted");
    }

    #[tokio::test]
    async fn http_endpoint_serves_metrics_and_404() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let endpoint = crate::accept::Endpoint::new(
            "metrics",
            MAX_METRICS_CONNECTIONS,
            crate::accept::WhenFull::Wait,
            &tokio_util::task::TaskTracker::new(),
            Arc::default(),
        );
        tokio::spawn(serve(
            listener,
            Arc::new(Metrics::new(["t"])),
            endpoint,
            stop.clone(),
        ));
        let get = |path: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("tollgate_connections_total{target=\"t\"} 0"));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        stop.cancel();
    }
}
