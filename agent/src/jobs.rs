//! The job timeline: what the processes of each governed cgroup did, in
//! one job recording per cgroup.
//!
//! The redirect's process tracepoints and connect hooks send events of
//! governed processes through a ring buffer (`redirect::jobs`). [`watch`]
//! reads them and hands each to [`Jobs`], which keeps one open job per
//! cgroup id: the first event of a cgroup opens its job recording (same
//! format as session recordings, `arrival` "job"), later ones are appended,
//! and a job closes once its cgroup is gone or empty and quiet. A governed
//! session opened from the cgroup is linked both ways: its recording's
//! header names the job, and the job recording gets a `job_session` event
//! naming the session.
//!
//! Events reach the recorder directly, not the log or the metrics: a job
//! that runs thousands of commands must not flood either. Events the kernel
//! dropped (ring buffer full) are counted there and marked in every open
//! job recording by a `kernel_events_dropped` record.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Protocol;
use crate::events::{Arrival, CloseReason, EventSink, SessionEvent, SessionInfo};
use crate::identity::IdentityResolver;
use crate::recording::format::{
    ConnectRecord, JobRecord, JobSessionRecord, ProcessExecRecord, ProcessExitRecord,
    ProcessForkRecord,
};
use crate::recording::{Event, RecordingSink};
use crate::redirect::jobs::{decode, JobActivity, KernelJobEvent};
use crate::redirect::Redirect;

/// A job whose cgroup is gone or empty closes once it has been quiet this
/// long: its last exit is sent before the cgroup empties, and the reader
/// is at most a wake-up behind the kernel.
const QUIET_BEFORE_CLOSE: Duration = Duration::from_millis(300);
/// A job whose cgroup could not be found closes after this long without
/// events.
const QUIET_UNKNOWN_CGROUP: Duration = Duration::from_secs(30);
/// How often open jobs are looked at.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// How often the ring buffers are read without a wake-up: the kernel side
/// wakes the reader only once a sixteenth of a ring is pending, so that a
/// process-heavy job does not cost a context switch per event.
const POLL_EVERY: Duration = Duration::from_millis(20);
/// How deep below a governed cgroup a job's cgroup is looked for.
const MAX_SEARCH_DEPTH: usize = 8;
/// Job events are dropped (and counted) rather than queued while the
/// recorder has this many events queued: a process storm in one job must
/// never fill the queue that sessions' statements go through (a full
/// queue fails sessions closed).
const MAX_QUEUED_FOR_JOBS: u64 = 4096;

struct OpenJob {
    record: JobRecord,
    started: Instant,
    /// Its directory, when found.
    path: Option<PathBuf>,
    last_event: Instant,
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
    /// Seconds since it opened.
    pub open_s: u64,
}

/// The open jobs, by cgroup id.
pub struct Jobs {
    recorder: Arc<RecordingSink>,
    redirect: Arc<Redirect>,
    identity: Arc<IdentityResolver>,
    /// Target names by configured index, for connect verdicts.
    targets: Vec<String>,
    open: Mutex<HashMap<u64, OpenJob>>,
    /// Kernel drops already marked in the recordings.
    dropped_marked: Mutex<u64>,
    /// Events dropped here (recorder busy), not yet marked.
    dropped_here: std::sync::atomic::AtomicU64,
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
    /// Jobs recorded to `recorder`, for the cgroups `redirect` governs.
    pub fn new(
        recorder: Arc<RecordingSink>,
        redirect: Arc<Redirect>,
        identity: Arc<IdentityResolver>,
        targets: Vec<String>,
    ) -> Jobs {
        Jobs {
            recorder,
            redirect,
            identity,
            targets,
            open: Mutex::new(HashMap::new()),
            dropped_marked: Mutex::new(0),
            dropped_here: std::sync::atomic::AtomicU64::new(0),
            boot_to_unix_us: i128::from(unix_us_now()) - boot_us_now(),
        }
    }

    fn unix_us(&self, boot_ns: u64) -> u64 {
        let us = i128::from(boot_ns / 1000) + self.boot_to_unix_us;
        u64::try_from(us.max(0)).unwrap_or(u64::MAX)
    }

    /// The timeline as `tollgate status` shows it.
    pub fn view(&self) -> JobsView {
        let mut open: Vec<OpenJobView> = lock(&self.open)
            .values()
            .map(|j| OpenJobView {
                job: j.record.id,
                cgroup: j.record.cgroup.clone(),
                open_s: j.started.elapsed().as_secs(),
            })
            .collect();
        open.sort_by_key(|j| j.job);
        let kernel = self.redirect.job_event_stats().unwrap_or_default();
        JobsView {
            open,
            events_sent: kernel.sent,
            events_dropped_in_kernel: kernel.dropped,
            events_dropped_by_agent: self.dropped_here.load(std::sync::atomic::Ordering::Relaxed),
            kernel_read_errors: kernel.read_errors,
        }
    }

    /// The job of cgroup `cgroup_id`, opened (its recording started) when
    /// it is not yet. `pid` describes the job in the recording's header.
    fn job_for(&self, open: &mut HashMap<u64, OpenJob>, cgroup_id: u64, pid: u32) -> JobRecord {
        if let Some(job) = open.get_mut(&cgroup_id) {
            job.last_event = Instant::now();
            return job.record.clone();
        }
        let path = self.find_cgroup(cgroup_id);
        let cgroup = path
            .as_deref()
            .map(|p| {
                p.strip_prefix(&self.redirect.cgroup_root)
                    .unwrap_or(p)
                    .display()
                    .to_string()
            })
            .unwrap_or_default();
        let record = JobRecord {
            id: Uuid::now_v7(),
            cgroup: cgroup.clone(),
            cgroup_id,
        };
        let (identity, _) = self.identity.describe_process_deferred(pid);
        let name = path
            .as_deref()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("cgroup-{cgroup_id}"));
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
        tracing::info!(job = %record.id, cgroup = %record.cgroup, cgroup_id, "job recording opened");
        self.recorder.emit(&SessionEvent::Started(Arc::new(info)));
        open.insert(
            cgroup_id,
            OpenJob {
                record: record.clone(),
                started: Instant::now(),
                path,
                last_event: Instant::now(),
            },
        );
        record
    }

    /// The directory of cgroup `id`, looked for below the governed cgroups.
    fn find_cgroup(&self, id: u64) -> Option<PathBuf> {
        self.redirect
            .attached()
            .iter()
            .find_map(|a| find_by_id(&a.path, id, MAX_SEARCH_DEPTH))
    }

    /// A governed session opened from cgroup `cgroup_id` by `pid`: recorded
    /// in the job, whose record is returned for the session's header.
    pub fn session_opened(
        &self,
        cgroup_id: u64,
        session: Uuid,
        target: &str,
        pid: u32,
    ) -> Option<JobRecord> {
        let mut open = lock(&self.open);
        let record = self.job_for(&mut open, cgroup_id, pid);
        self.recorder.emit(&SessionEvent::Job {
            session: record.id,
            record: Box::new(Event::JobSession(JobSessionRecord {
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
        if self.recorder.queued() >= MAX_QUEUED_FOR_JOBS {
            self.dropped_here
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let at_unix_us = self.unix_us(event.boot_ns);
        let body = match event.what {
            JobActivity::Exec {
                ppid,
                filename,
                args,
                args_truncated,
            } => Event::ProcessExec(ProcessExecRecord {
                at_unix_us,
                pid: event.pid,
                ppid,
                uid: event.uid,
                exe: filename,
                args,
                args_truncated,
            }),
            JobActivity::Fork { ppid } => Event::ProcessFork(ProcessForkRecord {
                at_unix_us,
                pid: event.pid,
                ppid,
                uid: event.uid,
                comm: event.comm,
            }),
            JobActivity::Exit { status } => {
                let (exit_code, signal) = wait_status(status);
                Event::ProcessExit(ProcessExitRecord {
                    at_unix_us,
                    pid: event.pid,
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
                pid: event.pid,
                comm: event.comm,
                destination,
                verdict: verdict.to_string(),
                target: target_index
                    .and_then(|i| self.targets.get(usize::try_from(i).ok()?))
                    .cloned(),
            }),
        };
        let mut open = lock(&self.open);
        let record = self.job_for(&mut open, event.cgroup_id, event.pid);
        self.recorder.emit(&SessionEvent::Job {
            session: record.id,
            record: Box::new(body),
        });
    }

    /// Marks new kernel drops in every open job and closes the jobs whose
    /// cgroup is gone or empty and that have been quiet.
    pub fn sweep(&self) {
        let in_kernel = self
            .redirect
            .job_event_stats()
            .map(|s| s.dropped)
            .unwrap_or(0);
        let here = self.dropped_here.load(std::sync::atomic::Ordering::Relaxed);
        let dropped = in_kernel.saturating_add(here);
        let mut open = lock(&self.open);
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
                for job in open.values() {
                    self.recorder.emit(&SessionEvent::Job {
                        session: job.record.id,
                        record: Box::new(Event::KernelEventsDropped { count }),
                    });
                }
            }
        }
        let ended: Vec<u64> = open
            .iter()
            .filter(|(_, job)| {
                let quiet = job.last_event.elapsed();
                match &job.path {
                    Some(path) => {
                        quiet >= QUIET_BEFORE_CLOSE
                            && (!path.exists() || !crate::redirect::cgroup::populated(path))
                    }
                    None => quiet >= QUIET_UNKNOWN_CGROUP,
                }
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            if let Some(job) = open.remove(&id) {
                self.close(&job);
            }
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

/// The directory below `dir` (or `dir` itself) whose inode is `id`.
fn find_by_id(dir: &Path, id: u64, depth: usize) -> Option<PathBuf> {
    if crate::redirect::cgroup::cgroup_id(dir).ok()? == id {
        return Some(dir.to_path_buf());
    }
    if depth == 0 {
        return None;
    }
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .find_map(|e| find_by_id(&e.path(), id, depth - 1))
}

/// Reads the job events of `rings` into `jobs` and sweeps the open jobs
/// until `stop`; then closes every open job.
pub async fn watch(jobs: Arc<Jobs>, rings: Vec<RingBuf<MapData>>, stop: CancellationToken) {
    let mut readers = tokio::task::JoinSet::new();
    for ring in rings {
        readers.spawn(read_ring(jobs.clone(), ring, stop.clone()));
    }
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => jobs.sweep(),
        }
    }
    while readers.join_next().await.is_some() {}
    let open: Vec<OpenJob> = lock(&jobs.open).drain().map(|(_, j)| j).collect();
    for job in &open {
        jobs.close(job);
    }
}

async fn read_ring(jobs: Arc<Jobs>, ring: RingBuf<MapData>, stop: CancellationToken) {
    // SAFETY: the ring buffer owns its map's fd, which stays open, and is the
    // one `as_raw_fd` returns, for as long as the `AsyncFd` holds it.
    #[allow(unsafe_code)]
    let registered = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) };
    let mut ring = match registered {
        Ok(fd) => fd,
        Err(e) => {
            let e = std::io::Error::from(e);
            tracing::warn!(error = %e, "cannot read the job events; job recordings stay empty");
            return;
        }
    };
    let mut poll = tokio::time::interval(POLL_EVERY);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            ready = ring.readable_mut() => match ready {
                Ok(mut guard) => {
                    drain(&jobs, guard.get_inner_mut());
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the job events failed; job recordings stop here");
                    return;
                }
            },
            _ = poll.tick() => drain(&jobs, ring.get_mut()),
        }
    }
}

/// Records every event pending in `ring`.
fn drain(jobs: &Jobs, ring: &mut RingBuf<MapData>) {
    while let Some(item) = ring.next() {
        match decode(&item) {
            Some(event) => jobs.record(event),
            None => tracing::warn!(
                len = item.len(),
                "a job event of unexpected size or kind was skipped"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_give_the_exit_code_or_the_signal() {
        assert_eq!(wait_status(0), (Some(0), None));
        assert_eq!(wait_status(3 << 8), (Some(3), None));
        assert_eq!(wait_status(9), (None, Some(9)));
        // Killed with a core dump: the 0x80 bit is not part of the signal.
        assert_eq!(wait_status(0x80 | 11), (None, Some(11)));
    }
}
