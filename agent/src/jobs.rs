//! The job timeline: what the processes of each governed job did, in one
//! job recording per job.
//!
//! The redirect's process tracepoints and connect hooks send events of
//! governed processes through a ring buffer (`redirect::jobs`). [`watch`]
//! reads them and hands each to [`Jobs`], which keeps one open job per
//! cgroup and CI job: a process belongs to its cgroup's job, until a CI
//! runner (a process the identity module recognises as one, such as
//! GitHub's `Runner.Worker`) starts it: from there it and its descendants
//! belong to the CI job its environment names (read as the identity reads
//! a runner's child, so the job cannot forge it). So a runner service's
//! one governed cgroup gives one job recording per CI job, and a
//! `tollgate exec` command one in all. The first event of a job opens its
//! recording (same format as session recordings, `arrival` "job"), later
//! ones are appended. A CI job closes once its last process has exited and
//! it has been quiet; a cgroup's job once its cgroup is gone or empty and
//! quiet. A governed session is linked both ways: its recording's header
//! names the job of the process that opened it, and the job recording gets
//! a `job_session` event naming the session.
//!
//! Events reach the recorder directly, not the log or the metrics: a job
//! that runs thousands of commands must not flood either. Events dropped
//! (the kernel's ring full, the recorder busy) are counted and marked in
//! every open job recording by a `kernel_events_dropped` record.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Protocol;
use crate::events::{Arrival, CloseReason, EventSink, SessionEvent, SessionInfo};
use crate::identity::{CiContext, CiProvider, IdentityResolver};
use crate::recording::format::{
    ConnectRecord, JobRecord, JobSessionRecord, ProcessExecRecord, ProcessExitRecord,
    ProcessForkRecord,
};
use crate::recording::{Event, RecordingSink};
use crate::redirect::jobs::{decode, JobActivity, JobEventStats, KernelJobEvent};
use crate::redirect::Redirect;

/// A job whose cgroup is gone or empty, or a CI job whose processes have
/// all exited, closes once it has been quiet this long: its last exit is
/// sent before the cgroup empties, and the reader is at most a poll behind
/// the kernel.
const QUIET_BEFORE_CLOSE: Duration = Duration::from_millis(300);
/// A job whose cgroup could not be found closes after this long without
/// events.
const QUIET_UNKNOWN_CGROUP: Duration = Duration::from_secs(30);
/// How often the ring buffers are read without a wake-up, and the open
/// jobs swept. The kernel side wakes the reader only once a sixteenth of a
/// ring is pending, so that a process-heavy job does not cost a context
/// switch per event. Each read
/// wakes the reader and then the recorder's writer; on these machines the
/// wake-ups, not the events, were most of the timeline's cost on a build
/// (every 20 ms: about 60 ms of agent CPU for a 3.5 s compile of 300
/// files). Events reach the recording at most this much later.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// The same, while a CI runner is among the governed processes: a step's
/// CI job is read from its environment, which is gone once it exits, so a
/// runner's steps are read sooner, at the old cost.
const POLL_EVERY_WITH_RUNNER: Duration = Duration::from_millis(20);
/// Kernel events placed and handed to the recorder together at most: a
/// ring full after a stall is queued in pieces, each within the room
/// [`MAX_QUEUED_FOR_JOBS`] leaves.
const DRAIN_BATCH: usize = 256;
/// How deep below a governed cgroup a job's cgroup is looked for.
const MAX_SEARCH_DEPTH: usize = 8;
/// Job events are dropped (and counted) rather than queued while the
/// recorder has this many events queued: a process storm in one job must
/// never fill the queue that sessions' statements go through (a full
/// queue fails sessions closed).
const MAX_QUEUED_FOR_JOBS: u64 = 4096;
/// Processes followed at most; past this the oldest jobs' processes are
/// forgotten (their later events go to their cgroup's job).
const MAX_TRACKED_PROCESSES: usize = 65536;

/// What the timeline needs from the redirect (a trait, so its rules can be
/// tested without loading programs).
pub trait JobSource: Send + Sync {
    /// The directory of governed cgroup `id`, if it can be found.
    fn cgroup_path(&self, id: u64) -> Option<PathBuf>;
    /// The kernel's counters of job events.
    fn kernel_stats(&self) -> JobEventStats;
}

impl JobSource for Redirect {
    fn cgroup_path(&self, id: u64) -> Option<PathBuf> {
        Redirect::cgroup_path(self, id, MAX_SEARCH_DEPTH)
    }
    fn kernel_stats(&self) -> JobEventStats {
        self.job_event_stats().unwrap_or_default()
    }
}

/// A job: a cgroup, and within it the CI job a runner started (`None`:
/// the cgroup's own job).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct JobKey {
    cgroup_id: u64,
    ci: Option<String>,
}

impl JobKey {
    fn of_cgroup(cgroup_id: u64) -> JobKey {
        JobKey {
            cgroup_id,
            ci: None,
        }
    }
}

/// What tells CI jobs apart: provider, repository, run and job.
fn ci_key(ctx: &CiContext) -> String {
    format!(
        "{}:{}:{}:{}",
        ctx.provider.as_str(),
        ctx.repository.as_deref().unwrap_or("?"),
        ctx.run_id.as_deref().unwrap_or("?"),
        ctx.job.as_deref().unwrap_or("?")
    )
}

struct OpenJob {
    record: JobRecord,
    started: Instant,
    /// Its cgroup's directory, when found.
    path: Option<PathBuf>,
    last_event: Instant,
    /// Its processes seen alive (forked or exec'd and not yet exited).
    live: HashSet<u32>,
    /// When the sweep first saw it ended (see [`ended`]); `None` while it
    /// runs.
    seen_ended: Option<Instant>,
}

/// A process the timeline follows.
struct Tracked {
    job: JobKey,
    /// The CI runner it is, if it is one: the processes it starts begin a
    /// CI job.
    runner: Option<CiProvider>,
}

#[derive(Default)]
struct State {
    open: HashMap<JobKey, OpenJob>,
    processes: HashMap<u32, Tracked>,
}

/// The job timeline in `tollgate status`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct JobsView {
    /// Jobs whose recording is open.
    pub open: Vec<OpenJobView>,
    /// Events the kernel sent.
    pub events_sent: u64,
    /// Events the kernel dropped (ring buffer full, or forks and exits past
    /// three quarters full).
    pub events_dropped_in_kernel: u64,
    /// Events the agent dropped (its recorder queue busy).
    pub events_dropped_by_agent: u64,
    /// Kernel reads that failed (fields of an event left unset).
    pub kernel_read_errors: u64,
}

/// An open job in [`JobsView`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OpenJobView {
    /// The job recording's id.
    pub job: Uuid,
    /// Its cgroup.
    pub cgroup: String,
    /// The CI job, for a job a runner started.
    #[serde(default)]
    pub ci: Option<String>,
    /// Seconds since it opened.
    pub open_s: u64,
}

/// The open jobs and the processes followed.
pub struct Jobs {
    recorder: Arc<RecordingSink>,
    source: Arc<dyn JobSource>,
    identity: Arc<IdentityResolver>,
    /// Target names by configured index, for connect verdicts.
    targets: Vec<String>,
    state: Mutex<State>,
    /// Drops already marked in the recordings.
    dropped_marked: Mutex<u64>,
    /// Events dropped here (recorder busy).
    dropped_here: AtomicU64,
    /// Whether a CI runner was among the followed processes at the last
    /// sweep (the rings are then read every [`POLL_EVERY_WITH_RUNNER`]).
    runner_followed: AtomicBool,
    /// `CLOCK_BOOTTIME` to wall clock, in microseconds (kernel event times
    /// are boot-clock times).
    boot_to_unix_us: i128,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Microseconds since the Unix epoch now.
fn unix_us_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn boot_us_now() -> i128 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    i128::from(t.tv_sec) * 1_000_000 + i128::from(t.tv_nsec) / 1000
}

impl Jobs {
    /// Jobs recorded to `recorder`, for the cgroups `source` governs.
    pub fn new(
        recorder: Arc<RecordingSink>,
        source: Arc<dyn JobSource>,
        identity: Arc<IdentityResolver>,
        targets: Vec<String>,
    ) -> Jobs {
        Jobs {
            recorder,
            source,
            identity,
            targets,
            state: Mutex::new(State::default()),
            dropped_marked: Mutex::new(0),
            dropped_here: AtomicU64::new(0),
            runner_followed: AtomicBool::new(false),
            boot_to_unix_us: i128::from(unix_us_now()) - boot_us_now(),
        }
    }

    fn unix_us(&self, boot_ns: u64) -> u64 {
        let us = i128::from(boot_ns / 1000) + self.boot_to_unix_us;
        u64::try_from(us.max(0)).unwrap_or(u64::MAX)
    }

    /// The timeline as `tollgate status` shows it.
    pub fn view(&self) -> JobsView {
        let mut open: Vec<OpenJobView> = lock(&self.state)
            .open
            .iter()
            .map(|(key, j)| OpenJobView {
                job: j.record.id,
                cgroup: j.record.cgroup.clone(),
                ci: key.ci.clone(),
                open_s: j.started.elapsed().as_secs(),
            })
            .collect();
        open.sort_by_key(|j| j.job);
        let kernel = self.source.kernel_stats();
        JobsView {
            open,
            events_sent: kernel.sent,
            events_dropped_in_kernel: kernel.dropped,
            events_dropped_by_agent: self.dropped_here.load(Ordering::Relaxed),
            kernel_read_errors: kernel.read_errors,
        }
    }

    /// The job `key`, opened (its recording started) when it is not yet.
    /// `pid` describes the job in the recording's header.
    fn job_for(&self, open: &mut HashMap<JobKey, OpenJob>, key: &JobKey, pid: u32) -> JobRecord {
        if let Some(job) = open.get_mut(key) {
            job.last_event = Instant::now();
            return job.record.clone();
        }
        let path = self.source.cgroup_path(key.cgroup_id);
        let cgroup = path
            .as_deref()
            .map(|p| cgroup_name(p).to_string())
            .unwrap_or_default();
        let record = JobRecord {
            id: Uuid::now_v7(),
            cgroup: cgroup.clone(),
            cgroup_id: key.cgroup_id,
        };
        let (identity, _) = self.identity.describe_process_deferred(pid);
        let mut name = path
            .as_deref()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("cgroup-{}", key.cgroup_id));
        if let Some(ci) = &key.ci {
            name = format!("{name} {ci}");
        }
        let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        let info = SessionInfo {
            id: record.id,
            started_at: SystemTime::now(),
            arrival: Arrival::Job,
            local: unspecified,
            client: unspecified,
            target: name,
            protocol: Protocol::Tcp,
            upstream: cgroup,
            identity,
            kernel: None,
            job: Some(record.clone()),
        };
        tracing::info!(job = %record.id, cgroup = %record.cgroup, cgroup_id = key.cgroup_id,
            ci_job = key.ci.as_deref(), "job recording opened");
        self.recorder.emit(&SessionEvent::Started(Arc::new(info)));
        open.insert(
            key.clone(),
            OpenJob {
                record: record.clone(),
                started: Instant::now(),
                path,
                last_event: Instant::now(),
                live: HashSet::new(),
                seen_ended: None,
            },
        );
        record
    }

    /// A governed session opened from cgroup `cgroup_id` by `pid`, whose
    /// identity names CI job `ci`: recorded in that process's job, whose
    /// record is returned for the session's header. A session can be seen
    /// before its process's exec is read from the ring: a CI job its
    /// identity verified (from the environment the runner gave its child,
    /// as the timeline reads it) then places the process.
    pub fn session_opened(
        &self,
        cgroup_id: u64,
        session: Uuid,
        target: &str,
        pid: u32,
        ci: Option<&CiContext>,
    ) -> Option<JobRecord> {
        let mut state = lock(&self.state);
        let verified_ci = ci.filter(|c| c.verified && c.runner_pid.is_some());
        let key = match (state.processes.contains_key(&pid), verified_ci) {
            (false, Some(ctx)) => {
                let key = JobKey {
                    cgroup_id,
                    ci: Some(ci_key(ctx)),
                };
                track(&mut state, pid, key.clone(), None);
                key
            }
            _ => job_of(&state, pid, cgroup_id),
        };
        let record = self.job_for(&mut state.open, &key, pid);
        self.recorder.emit(&SessionEvent::Job {
            session: record.id,
            record: Arc::new(Event::JobSession(JobSessionRecord {
                at_unix_us: unix_us_now(),
                session,
                target: target.to_string(),
                pid: Some(pid),
            })),
        });
        Some(record)
    }

    /// Records one kernel event in its job.
    pub fn record(&self, event: KernelJobEvent) {
        self.record_all(std::iter::once(event));
    }

    /// Records kernel events in their jobs, in order, handed to the
    /// recorder together (one wake-up of its writer for all of them).
    pub fn record_all(&self, events: impl IntoIterator<Item = KernelJobEvent>) {
        let mut room = MAX_QUEUED_FOR_JOBS.saturating_sub(self.recorder.queued());
        let mut out = Vec::new();
        let mut state = lock(&self.state);
        for event in events {
            if room == 0 {
                self.dropped_here.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            room -= 1;
            out.push(self.place(&mut state, event));
        }
        // Under the lock, as every other emission of a job's events: a
        // sweep cannot close a job between placing its events and queueing
        // them.
        self.recorder.emit_all(out);
    }

    /// `event` placed in its job (opening the job if need be), as the
    /// recorder's event for that job.
    fn place(&self, state: &mut State, event: KernelJobEvent) -> SessionEvent {
        let at_unix_us = self.unix_us(event.boot_ns);
        let pid = event.pid;
        let key = self.follow(state, &event);
        let body = match event.what {
            JobActivity::Exec {
                ppid,
                filename,
                args,
                args_truncated,
            } => Event::ProcessExec(ProcessExecRecord {
                at_unix_us,
                pid,
                ppid,
                uid: event.uid,
                exe: filename,
                args,
                args_truncated,
            }),
            JobActivity::Fork { ppid } => Event::ProcessFork(ProcessForkRecord {
                at_unix_us,
                pid,
                ppid,
                uid: event.uid,
                comm: event.comm,
            }),
            JobActivity::Exit { status } => {
                let (exit_code, signal) = wait_status(status);
                Event::ProcessExit(ProcessExitRecord {
                    at_unix_us,
                    pid,
                    comm: event.comm,
                    exit_code,
                    signal,
                })
            }
            JobActivity::Connect {
                destination,
                verdict,
                target_index,
            } => Event::Connect(ConnectRecord {
                at_unix_us,
                pid,
                comm: event.comm,
                destination,
                verdict: verdict.to_string(),
                target: target_index
                    .and_then(|i| self.targets.get(usize::try_from(i).ok()?))
                    .cloned(),
            }),
        };
        let exited = matches!(body, Event::ProcessExit(_));
        let record = self.job_for(&mut state.open, &key, pid);
        if let Some(job) = state.open.get_mut(&key) {
            if exited {
                job.live.remove(&pid);
            } else if !matches!(body, Event::Connect(_)) {
                job.live.insert(pid);
            }
        }
        SessionEvent::Job {
            session: record.id,
            record: Arc::new(body),
        }
    }

    /// The job `event` belongs to, following processes: a fork's child
    /// joins its parent's job, a program a CI runner starts begins the CI
    /// job its environment names, an exit ends the following.
    fn follow(&self, state: &mut State, event: &KernelJobEvent) -> JobKey {
        let pid = event.pid;
        match &event.what {
            JobActivity::Fork { ppid } => {
                if let Some(placed) = placed_in_ci_job(state, pid, event.cgroup_id) {
                    return placed;
                }
                let key = job_of(state, *ppid, event.cgroup_id);
                track(state, pid, key.clone(), None);
                key
            }
            JobActivity::Exec {
                ppid,
                filename,
                args,
                ..
            } => {
                let started_by_runner = state
                    .processes
                    .get(ppid)
                    .and_then(|parent| parent.runner)
                    .filter(|_| {
                        // A runner's own re-exec stays in the runner's job.
                        state
                            .processes
                            .get(&pid)
                            .is_none_or(|me| me.runner.is_none())
                    });
                let placed = placed_in_ci_job(state, pid, event.cgroup_id);
                let key = match (placed, started_by_runner) {
                    (Some(key), _) => key,
                    (None, Some(provider)) => {
                        let ctx = self.identity.runner_child_ci(pid, provider, *ppid);
                        JobKey {
                            cgroup_id: event.cgroup_id,
                            ci: Some(ci_key(&ctx)),
                        }
                    }
                    (None, None) => job_of(state, pid, event.cgroup_id),
                };
                // Moving to a CI job: no longer alive in the one it left.
                if let Some(old) = state.processes.get(&pid).map(|t| t.job.clone()) {
                    if old != key {
                        if let Some(job) = state.open.get_mut(&old) {
                            job.live.remove(&pid);
                        }
                    }
                }
                let runner = crate::identity::runner_of(filename, args);
                track(state, pid, key.clone(), runner);
                key
            }
            JobActivity::Exit { .. } => {
                let key = job_of(state, pid, event.cgroup_id);
                state.processes.remove(&pid);
                key
            }
            JobActivity::Connect { .. } => job_of(state, pid, event.cgroup_id),
        }
    }

    /// Marks new drops in every open job and closes the jobs that ended.
    pub fn sweep(&self) {
        let in_kernel = self.source.kernel_stats().dropped;
        let here = self.dropped_here.load(Ordering::Relaxed);
        let dropped = in_kernel.saturating_add(here);
        let mut state = lock(&self.state);
        {
            let mut marked = lock(&self.dropped_marked);
            if dropped > *marked {
                let count = dropped - *marked;
                *marked = dropped;
                tracing::warn!(
                    count,
                    in_kernel,
                    "job events were dropped (the kernel's ring buffer or the recorder's queue was full)"
                );
                for job in state.open.values() {
                    self.recorder.emit(&SessionEvent::Job {
                        session: job.record.id,
                        record: Arc::new(Event::KernelEventsDropped { count }),
                    });
                }
            }
        }
        // Closed only once seen ended for a while: the events its last
        // processes sent before the cgroup emptied may still be in the ring
        // (a poll behind), and a job quiet for long (a frozen one) must not
        // close before they are read.
        let now = Instant::now();
        let mut ended_jobs = Vec::new();
        for (key, job) in state.open.iter_mut() {
            if !ended(key, job) {
                job.seen_ended = None;
                continue;
            }
            let since = *job.seen_ended.get_or_insert(now);
            if now.duration_since(since) >= QUIET_BEFORE_CLOSE
                && job.last_event.elapsed() >= QUIET_BEFORE_CLOSE
            {
                ended_jobs.push(key.clone());
            }
        }
        let ended: Vec<JobKey> = ended_jobs;
        for key in ended {
            if let Some(job) = state.open.remove(&key) {
                state.processes.retain(|_, t| t.job != key);
                self.close(&job);
            }
        }
        let runner = state.processes.values().any(|t| t.runner.is_some());
        self.runner_followed.store(runner, Ordering::Relaxed);
    }

    /// How long until the rings are read again without a wake-up.
    fn poll_period(&self) -> Duration {
        if self.runner_followed.load(Ordering::Relaxed) {
            POLL_EVERY_WITH_RUNNER
        } else {
            POLL_EVERY
        }
    }

    fn close(&self, job: &OpenJob) {
        tracing::info!(job = %job.record.id, cgroup = %job.record.cgroup, "job recording closed");
        self.recorder.emit(&SessionEvent::Closed {
            session: job.record.id,
            bytes_from_client: 0,
            bytes_from_upstream: 0,
            duration: job.started.elapsed(),
            reason: CloseReason::Completed,
        });
    }

    /// Closes every open job (the agent is stopping).
    fn close_all(&self) {
        let open: Vec<OpenJob> = lock(&self.state).open.drain().map(|(_, j)| j).collect();
        for job in &open {
            self.close(job);
        }
    }
}

/// Whether a job looks ended: a CI job when its processes have all exited,
/// a cgroup's job when the cgroup is gone or empty (one whose cgroup was
/// not found, after a long quiet).
fn ended(key: &JobKey, job: &OpenJob) -> bool {
    if key.ci.is_some() {
        return job.live.is_empty();
    }
    match &job.path {
        Some(path) => !path.exists() || !crate::redirect::cgroup::populated(path),
        None => job.last_event.elapsed() >= QUIET_UNKNOWN_CGROUP,
    }
}

/// The job process `pid` of cgroup `cgroup_id` belongs to: the one it was
/// followed into, else its cgroup's.
fn job_of(state: &State, pid: u32, cgroup_id: u64) -> JobKey {
    state
        .processes
        .get(&pid)
        .map(|t| t.job.clone())
        .filter(|key| key.cgroup_id == cgroup_id)
        .unwrap_or_else(|| JobKey::of_cgroup(cgroup_id))
}

/// The CI job process `pid` was already placed in by its session, read
/// before the ring's events of it.
fn placed_in_ci_job(state: &State, pid: u32, cgroup_id: u64) -> Option<JobKey> {
    state
        .processes
        .get(&pid)
        .map(|t| t.job.clone())
        .filter(|k| k.ci.is_some() && k.cgroup_id == cgroup_id)
}

fn track(state: &mut State, pid: u32, job: JobKey, runner: Option<CiProvider>) {
    if state.processes.len() >= MAX_TRACKED_PROCESSES && !state.processes.contains_key(&pid) {
        // Processes whose exit was never seen (dropped events): forget
        // them all rather than grow without bound.
        tracing::warn!(
            "the job timeline followed {MAX_TRACKED_PROCESSES} processes; forgetting them"
        );
        state.processes.clear();
    }
    state.processes.insert(pid, Tracked { job, runner });
}

/// A cgroup directory as the timeline names it: its path under the cgroup
/// v2 mount.
fn cgroup_name(path: &Path) -> &str {
    let text = path.to_str().unwrap_or_default();
    crate::redirect::cgroup::cgroup2_mount()
        .and_then(|mount| path.strip_prefix(mount).ok())
        .and_then(Path::to_str)
        .unwrap_or(text)
}

/// (exit code, signal) of a wait status.
fn wait_status(status: u32) -> (Option<i32>, Option<i32>) {
    let signal = status & 0x7f;
    if signal == 0 {
        (Some(((status >> 8) & 0xff) as i32), None)
    } else {
        (None, Some(signal as i32))
    }
}

/// Reads the job events of `rings` into `jobs` and sweeps the open jobs
/// until `stop`; then reads what is left and closes every open job. One
/// task and one timer for every ring and the sweep: each wake-up costs
/// more than the events it reads.
pub async fn watch(jobs: Arc<Jobs>, rings: Vec<RingBuf<MapData>>, stop: CancellationToken) {
    let mut rings: Vec<AsyncFd<RingBuf<MapData>>> = rings
        .into_iter()
        .filter_map(|ring| match crate::redirect::async_ring(ring) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the job events; job recordings stay empty");
                None
            }
        })
        .collect();
    let mut next_read = tokio::time::Instant::now() + POLL_EVERY;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(next_read) => {
                for ring in &mut rings {
                    drain(&jobs, ring.get_mut());
                }
                jobs.sweep();
                next_read = tokio::time::Instant::now() + jobs.poll_period();
            }
            ready = first_readable(&rings), if !rings.is_empty() => match ready {
                Ok(i) => {
                    if let Some(ring) = rings.get_mut(i) {
                        drain(&jobs, ring.get_mut());
                    }
                }
                Err((i, e)) => {
                    tracing::warn!(error = %e, "reading the job events failed; job recordings stop here");
                    rings.swap_remove(i);
                }
            },
        }
    }
    for ring in &mut rings {
        drain(&jobs, ring.get_mut());
    }
    jobs.close_all();
}

/// The index of a ring the kernel woke the reader for (its readiness
/// cleared: what is pending is read next, and a later wake-up sets it
/// again).
async fn first_readable(
    rings: &[AsyncFd<RingBuf<MapData>>],
) -> Result<usize, (usize, std::io::Error)> {
    std::future::poll_fn(|cx| {
        for (i, ring) in rings.iter().enumerate() {
            match ring.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => {
                    guard.clear_ready();
                    return Poll::Ready(Ok(i));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err((i, e))),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}

/// Records every event pending in `ring`, up to [`DRAIN_BATCH`] at a time.
fn drain(jobs: &Jobs, ring: &mut RingBuf<MapData>) {
    let mut batch = Vec::with_capacity(DRAIN_BATCH);
    while let Some(item) = ring.next() {
        match decode(&item) {
            Some(event) => batch.push(event),
            None => tracing::warn!(
                len = item.len(),
                "a job event of unexpected size or kind was skipped"
            ),
        }
        if batch.len() == DRAIN_BATCH {
            jobs.record_all(batch.drain(..));
        }
    }
    jobs.record_all(batch);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::recording::{Recorder, RecorderSettings};

    /// A redirect stand-in: cgroup directories by id, no kernel.
    struct FakeSource {
        paths: HashMap<u64, PathBuf>,
    }

    impl JobSource for FakeSource {
        fn cgroup_path(&self, id: u64) -> Option<PathBuf> {
            self.paths.get(&id).cloned()
        }
        fn kernel_stats(&self) -> JobEventStats {
            JobEventStats::default()
        }
    }

    fn event(pid: u32, cgroup_id: u64, what: JobActivity) -> KernelJobEvent {
        KernelJobEvent {
            pid,
            uid: 1000,
            cgroup_id,
            boot_ns: 1,
            comm: "test".into(),
            what,
        }
    }

    fn exec(pid: u32, ppid: u32, exe: &str) -> KernelJobEvent {
        event(
            pid,
            5,
            JobActivity::Exec {
                ppid,
                filename: exe.into(),
                args: vec![exe.rsplit('/').next().unwrap().into()],
                args_truncated: false,
            },
        )
    }

    fn fork(pid: u32, ppid: u32) -> KernelJobEvent {
        event(pid, 5, JobActivity::Fork { ppid })
    }

    fn exit(pid: u32) -> KernelJobEvent {
        event(pid, 5, JobActivity::Exit { status: 0 })
    }

    /// A cgroup directory `name` under `root` whose `cgroup.events` reads
    /// `events`.
    fn cgroup_dir(root: &Path, name: &str, events: &str) -> PathBuf {
        let cgroup = root.join(name);
        std::fs::create_dir_all(&cgroup).unwrap();
        std::fs::write(cgroup.join("cgroup.events"), events).unwrap();
        cgroup
    }

    /// The one recording under `recordings`.
    fn only_recording(recordings: &Path) -> crate::recording::Recording {
        let all = crate::recording::list(recordings, &Default::default());
        assert_eq!(all.len(), 1, "one job recording: {all:?}");
        crate::recording::read_recording(&all[0].path).unwrap()
    }

    /// A timeline recording into `recordings`, with cgroup 5 at `cgroup`
    /// and processes' environments under `proc_root`.
    fn jobs_at(
        cgroup: &Path,
        proc_root: &Path,
        recordings: &Path,
        targets: Vec<String>,
    ) -> (Jobs, crate::recording::RecorderHandle) {
        let (sink, handle) = Recorder::start(RecorderSettings::new(recordings)).unwrap();
        let jobs = Jobs::new(
            sink,
            Arc::new(FakeSource {
                paths: HashMap::from([(5, cgroup.to_path_buf())]),
            }),
            Arc::new(IdentityResolver::with_roots(
                proc_root,
                proc_root.with_file_name("etc"),
            )),
            targets,
        );
        (jobs, handle)
    }

    /// A job quiet for long (frozen by `on_match`, say) whose cgroup empties
    /// while its last exits are still in the ring: it stays open until they
    /// are read, so they land in it, not in a new job.
    #[test]
    fn a_long_quiet_job_whose_cgroup_just_emptied_keeps_its_last_events() {
        let tmp = tempfile::tempdir().unwrap();
        let cgroup = cgroup_dir(tmp.path(), "exec-1-0", "populated 1\nfrozen 1\n");
        let recordings = tmp.path().join("recordings");
        let (jobs, handle) = jobs_at(&cgroup, &tmp.path().join("proc"), &recordings, Vec::new());
        jobs.record(exec(20, 1, "/usr/bin/sh"));
        std::thread::sleep(QUIET_BEFORE_CLOSE + Duration::from_millis(50));
        jobs.sweep();
        assert_eq!(jobs.view().open.len(), 1, "frozen, not ended");
        // Thawed: the processes exit and the cgroup empties before the
        // reader gets to their exits.
        std::fs::write(cgroup.join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        jobs.sweep();
        assert_eq!(jobs.view().open.len(), 1);
        jobs.record(exit(20));
        std::thread::sleep(QUIET_BEFORE_CLOSE + Duration::from_millis(50));
        jobs.sweep();
        assert_eq!(jobs.view().open.len(), 0);
        drop(jobs);
        assert_eq!(handle.shutdown().lost, 0);
        let rec = only_recording(&recordings);
        let kinds: Vec<bool> = rec
            .events()
            .map(|e| matches!(e.event, Event::ProcessExit(_)))
            .collect();
        assert!(kinds.contains(&true), "the exit is in the job");
        assert!(rec.trailer().is_some());
    }

    /// A runner service's one cgroup runs two CI jobs in turn: each gets a
    /// job recording of its own (named by the environment the runner gave
    /// its child), the runner its cgroup's, and a session links to the CI
    /// job of the process that opened it.
    #[test]
    fn processes_a_ci_runner_starts_are_grouped_by_their_ci_job() {
        let tmp = tempfile::tempdir().unwrap();
        let proc_root = tmp.path().join("proc");
        for (pid, run) in [(11, "42"), (13, "43")] {
            let dir = proc_root.join(pid.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("environ"),
                format!("GITHUB_ACTIONS=true\0GITHUB_REPOSITORY=acme/shop\0GITHUB_RUN_ID={run}\0GITHUB_JOB=build\0"),
            )
            .unwrap();
        }
        let cgroup = cgroup_dir(tmp.path(), "runner.service", "populated 1\nfrozen 0\n");
        let recordings = tmp.path().join("recordings");
        let (jobs, handle) = jobs_at(&cgroup, &proc_root, &recordings, vec!["db".into()]);
        jobs.record(exec(10, 1, "/opt/actions-runner/bin/Runner.Worker"));
        jobs.record(fork(11, 10));
        jobs.record(exec(11, 10, "/usr/bin/bash"));
        jobs.record(fork(12, 11));
        jobs.record(exec(12, 11, "/usr/bin/psql"));
        let session = Uuid::now_v7();
        let linked = jobs.session_opened(5, session, "db", 12, None).unwrap();
        jobs.record(exit(12));
        jobs.record(exit(11));
        jobs.record(fork(13, 10));
        jobs.record(exec(13, 10, "/usr/bin/bash"));
        jobs.record(exit(13));
        // A step whose session is seen before its fork and exec are read
        // from the ring, and whose environment is gone by then: its
        // session's verified CI job places it.
        let ci = CiContext {
            provider: CiProvider::GithubActions,
            repository: Some("acme/shop".into()),
            branch: None,
            job: Some("build".into()),
            run_id: Some("44".into()),
            workflow: None,
            actor: None,
            url: None,
            commit: None,
            runner_pid: Some(10),
            verified: true,
        };
        jobs.session_opened(5, Uuid::now_v7(), "db", 14, Some(&ci))
            .unwrap();
        jobs.record(fork(14, 10));
        jobs.record(exec(14, 10, "/usr/bin/psql"));
        jobs.record(exit(14));
        let open = jobs.view().open;
        assert_eq!(open.len(), 4, "{open:?}");
        std::thread::sleep(QUIET_BEFORE_CLOSE + Duration::from_millis(50));
        jobs.sweep();
        assert_eq!(
            jobs.view().open.len(),
            4,
            "a job seen ended only now stays open a while: its last events may still be in the ring"
        );
        std::thread::sleep(QUIET_BEFORE_CLOSE + Duration::from_millis(50));
        jobs.sweep();
        let open = jobs.view().open;
        assert_eq!(
            open.len(),
            1,
            "the CI jobs closed, the runner's stays: {open:?}"
        );
        assert_eq!(open[0].ci, None);
        jobs.close_all();
        drop(jobs);
        assert_eq!(handle.shutdown().lost, 0);

        let mut found: HashMap<String, (Uuid, Vec<String>)> = HashMap::new();
        for summary in crate::recording::list(&recordings, &Default::default()) {
            let rec = crate::recording::read_recording(&summary.path).unwrap();
            let header = rec.header().unwrap();
            assert_eq!(header.protocol, "job");
            assert!(rec.trailer().is_some(), "closed: {}", header.target);
            let kinds = rec
                .events()
                .filter_map(|e| match &e.event {
                    Event::ProcessExec(x) => Some(format!("exec {}", x.pid)),
                    Event::ProcessFork(x) => Some(format!("fork {}", x.pid)),
                    Event::ProcessExit(x) => Some(format!("exit {}", x.pid)),
                    Event::JobSession(x) => Some(format!("session {}", x.pid.unwrap_or(0))),
                    _ => None,
                })
                .collect();
            found.insert(header.target.clone(), (header.session, kinds));
        }
        let runner = &found["runner.service"].1;
        assert_eq!(runner, &["exec 10", "fork 11", "fork 13"]);
        let (first_id, first) = &found["runner.service github_actions:acme/shop:42:build"];
        assert_eq!(
            first,
            &[
                "exec 11",
                "fork 12",
                "exec 12",
                "session 12",
                "exit 12",
                "exit 11"
            ]
        );
        assert_eq!(*first_id, linked.id, "the session links to its CI job");
        let second = &found["runner.service github_actions:acme/shop:43:build"].1;
        assert_eq!(second, &["exec 13", "exit 13"]);
        let third = &found["runner.service github_actions:acme/shop:44:build"].1;
        assert_eq!(third, &["session 14", "fork 14", "exec 14", "exit 14"]);
        assert_eq!(found.len(), 4, "{found:?}");
    }

    /// A drain's events go to the recorder as one batch, in order; past
    /// the room the recorder has for jobs, the rest is dropped and counted,
    /// not queued.
    #[test]
    fn a_batch_is_recorded_in_order_and_what_exceeds_the_room_is_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let cgroup = cgroup_dir(tmp.path(), "exec-1-0", "populated 1\nfrozen 0\n");
        let recordings = tmp.path().join("recordings");
        let (jobs, handle) = jobs_at(&cgroup, &tmp.path().join("proc"), &recordings, Vec::new());
        let extra = 10;
        let total = u32::try_from(MAX_QUEUED_FOR_JOBS).unwrap() + extra;
        jobs.record_all((0..total).map(|i| fork(1000 + i, 999)));
        assert_eq!(jobs.view().events_dropped_by_agent, u64::from(extra));
        jobs.close_all();
        drop(jobs);
        assert_eq!(handle.shutdown().lost, 0);
        let rec = only_recording(&recordings);
        let forked: Vec<u32> = rec
            .events()
            .filter_map(|e| match &e.event {
                Event::ProcessFork(f) => Some(f.pid),
                _ => None,
            })
            .collect();
        let expected: Vec<u32> = (0..total - extra).map(|i| 1000 + i).collect();
        assert_eq!(forked, expected, "every event within the room, in order");
    }

    /// The rings are read sooner while a CI runner is followed (its steps'
    /// environments must be read before they exit), at the slow period
    /// otherwise.
    #[test]
    fn the_rings_are_read_sooner_while_a_ci_runner_is_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let cgroup = cgroup_dir(tmp.path(), "runner.service", "populated 1\nfrozen 0\n");
        let recordings = tmp.path().join("recordings");
        let (jobs, handle) = jobs_at(&cgroup, &tmp.path().join("proc"), &recordings, Vec::new());
        jobs.record(exec(30, 1, "/usr/bin/make"));
        jobs.sweep();
        assert_eq!(jobs.poll_period(), POLL_EVERY);
        jobs.record(exec(31, 1, "/opt/actions-runner/bin/Runner.Worker"));
        jobs.sweep();
        assert_eq!(jobs.poll_period(), POLL_EVERY_WITH_RUNNER);
        jobs.record(exit(31));
        jobs.sweep();
        assert_eq!(jobs.poll_period(), POLL_EVERY);
        jobs.close_all();
        drop(jobs);
        assert_eq!(handle.shutdown().lost, 0);
    }

    #[test]
    fn wait_statuses_give_the_exit_code_or_the_signal() {
        assert_eq!(wait_status(0), (Some(0), None));
        assert_eq!(wait_status(3 << 8), (Some(3), None));
        assert_eq!(wait_status(9), (None, Some(9)));
        // Killed with a core dump: the 0x80 bit is not part of the signal.
        assert_eq!(wait_status(0x80 | 11), (None, Some(11)));
    }
}
