//! Retention: removing old closed recordings by age and by total size.
//!
//! [`prune`] is one pass over the dated tree; [`keep_pruning`] runs it at
//! start and every minute. A file the writer has open is never removed, whatever its
//! age or the budget: it is counted in the total but skipped.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use uuid::Uuid;

use super::format::FILE_EXTENSION;
use super::reader::{day_dirs, day_key, day_key_of_path, sorted_entries};

/// What to keep. Both limits off keeps everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Remove recordings last written longer ago than this.
    pub max_age: Option<Duration>,
    /// Remove the least recently written recordings while all of them
    /// together take more bytes than this.
    pub max_total_size: Option<u64>,
}

impl Retention {
    /// Whether neither limit is set (nothing is ever removed).
    pub fn is_off(&self) -> bool {
        self.max_age.is_none() && self.max_total_size.is_none()
    }
}

/// Why a recording was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveReason {
    /// Older than `max_age`.
    Age,
    /// The total was over `max_total_size`.
    Size,
}

impl RemoveReason {
    /// `age` or `size`, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RemoveReason::Age => "age",
            RemoveReason::Size => "size",
        }
    }
}

/// One removed recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The file.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Why.
    pub reason: RemoveReason,
}

/// What one [`prune`] pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Removed recordings, least recently written first.
    pub removed: Vec<Removed>,
    /// Empty date directories removed.
    pub dirs_removed: Vec<PathBuf>,
    /// Recordings left.
    pub kept_files: u64,
    /// Their total size.
    pub kept_bytes: u64,
    /// Files that could not be removed (or examined), with the error.
    pub errors: Vec<String>,
}

impl PruneReport {
    /// Bytes freed.
    pub fn freed(&self) -> u64 {
        self.removed.iter().map(|r| r.bytes).sum()
    }
}

/// One recording file in the dated tree.
#[derive(Debug, Clone)]
pub(crate) struct RecordingFile {
    pub(crate) path: PathBuf,
    pub(crate) bytes: u64,
    /// Last written: when the session ended, for a closed one.
    pub(crate) modified: SystemTime,
    /// The writer has it open.
    pub(crate) writing: bool,
}

/// Every `<uuid>.tgrec` file under `dir`'s day directories (others are
/// left alone), least recently written first, the path (time-ordered ids)
/// breaking ties; `writing(id)` says whether the writer has it open.
/// Files that cannot be examined are reported in `errors`.
pub(crate) fn recording_files(
    days: &[PathBuf],
    now: SystemTime,
    writing: &dyn Fn(&Uuid) -> bool,
    errors: &mut Vec<String>,
) -> Vec<RecordingFile> {
    let mut files = Vec::new();
    for day in days {
        for path in sorted_entries(day) {
            if path.extension().and_then(|e| e.to_str()) != Some(FILE_EXTENSION) {
                continue;
            }
            let Some(id) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| Uuid::parse_str(s).ok())
            else {
                continue;
            };
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_file() => files.push(RecordingFile {
                    bytes: meta.len(),
                    modified: meta.modified().unwrap_or(now),
                    // Asked after listing: a file created after the listing
                    // is not in it, one listed was marked before it existed.
                    writing: writing(&id),
                    path,
                }),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => errors.push(format!("cannot examine {}: {e}", path.display())),
            }
        }
    }
    files.sort_by(|a, b| a.modified.cmp(&b.modified).then(a.path.cmp(&b.path)));
    files
}

/// Removes closed recordings under `dir` (the dated tree) that are older
/// than `policy.max_age` (by last modification, i.e. when the session
/// ended), then the least recently written ones while the total exceeds
/// `policy.max_total_size`, then empty date directories. `writing(id)` says
/// whether the writer has session `id`'s file open; such files are never
/// removed. Files that are not `<uuid>.tgrec` are left alone and not
/// counted. Date directories of `now`'s day and the day before are kept even
/// when empty, since the writer may be about to create a file in them.
pub fn prune(
    dir: &Path,
    policy: &Retention,
    now: SystemTime,
    writing: &dyn Fn(&Uuid) -> bool,
) -> PruneReport {
    let mut report = PruneReport::default();
    if policy.is_off() {
        return report;
    }
    let days = day_dirs(dir);
    let files = recording_files(&days, now, writing, &mut report.errors);

    let mut total: u64 = files.iter().map(|f| f.bytes).sum();
    let mut keep = Vec::with_capacity(files.len());
    for f in files {
        let too_old = policy
            .max_age
            .is_some_and(|age| now.duration_since(f.modified).is_ok_and(|d| d > age));
        let over = policy.max_total_size.is_some_and(|max| total > max);
        let reason = match (too_old, over) {
            _ if f.writing => None,
            (true, _) => Some(RemoveReason::Age),
            (false, true) => Some(RemoveReason::Size),
            (false, false) => None,
        };
        let Some(reason) = reason else {
            keep.push(f);
            continue;
        };
        match fs::remove_file(&f.path) {
            Ok(()) => {
                total = total.saturating_sub(f.bytes);
                report.removed.push(Removed {
                    path: f.path,
                    bytes: f.bytes,
                    reason,
                });
            }
            // Removed by someone else meanwhile: gone all the same.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                total = total.saturating_sub(f.bytes);
            }
            Err(e) => {
                report
                    .errors
                    .push(format!("cannot remove {}: {e}", f.path.display()));
                keep.push(f);
            }
        }
    }
    report.kept_files = keep.len() as u64;
    report.kept_bytes = keep.iter().map(|f| f.bytes).sum();

    let recent = day_key(now.checked_sub(Duration::from_secs(86_400)).unwrap_or(now));
    remove_empty_dirs(&days, &recent, &mut report);
    report
}

/// Removes empty day directories, then months and years left empty, all
/// dated before `recent` (`YYYY/MM/DD`).
fn remove_empty_dirs(days: &[PathBuf], recent: &str, report: &mut PruneReport) {
    for day in days {
        let Some(key) = day_key_of_path(day) else {
            continue;
        };
        // Each level is compared on its own prefix: month "2025/03" is
        // recent while any of its days may be.
        let mut level = Some(day.as_path());
        for len in [10, 7, 4] {
            let Some(dir) = level else { break };
            let (Some(k), Some(r)) = (key.get(..len), recent.get(..len)) else {
                break;
            };
            if k >= r || !is_empty_dir(dir) {
                break;
            }
            match fs::remove_dir(dir) {
                Ok(()) => report.dirs_removed.push(dir.to_path_buf()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => break,
            }
            level = dir.parent();
        }
    }
}

fn is_empty_dir(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}
/// How often retention runs (it also runs at start).
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Removes old closed recordings under `dir` at start and every
/// [`PRUNE_INTERVAL`], as `policy` says, never one that `recorder` is
/// writing, until `stop`; `pruned(files, bytes)` is told what each pass
/// removed.
pub async fn keep_pruning(
    dir: PathBuf,
    policy: Retention,
    recorder: std::sync::Arc<super::RecordingSink>,
    stop: tokio_util::sync::CancellationToken,
    pruned: impl Fn(u64, u64),
) {
    if policy.is_off() {
        return;
    }
    loop {
        let (dir, recorder) = (dir.clone(), recorder.clone());
        let pass = tokio::task::spawn_blocking(move || {
            prune(&dir, &policy, SystemTime::now(), &|id| {
                recorder.is_writing(id)
            })
        })
        .await;
        match pass {
            Ok(report) => {
                log_pass(&policy, &report);
                pruned(report.removed.len() as u64, report.freed());
            }
            Err(e) => tracing::warn!(error = %e, "recording retention pass failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_INTERVAL) => {}
        }
    }
}

fn log_pass(policy: &Retention, report: &PruneReport) {
    for r in &report.removed {
        tracing::info!(
            path = %r.path.display(),
            bytes = r.bytes,
            reason = r.reason.as_str(),
            "recording removed by retention ({})",
            match r.reason {
                RemoveReason::Age => "older than recording_retention_days",
                RemoveReason::Size => "over recording_max_total_size",
            }
        );
    }
    for d in &report.dirs_removed {
        tracing::debug!(dir = %d.display(), "empty recording directory removed");
    }
    for e in &report.errors {
        tracing::warn!("recording retention: {e}");
    }
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
