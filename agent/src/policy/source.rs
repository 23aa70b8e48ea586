//! Policies from one place (`[policy_source]`): a prefix in an
//! S3-compatible bucket, or a directory of a git repository, polled.
//!
//! Each poll fetches the policy files into `DIR/incoming`, loads them as
//! the agent would (every rule compiled, review rules checked against the
//! configured reviewer groups), and only when they load and differ from
//! the copy in force moves them to a version directory `DIR/v-<n>` and
//! points the `DIR/current` symbolic link at it, in one rename. The agent's
//! policy path is `DIR/current`: the usual reload (a poll of the files)
//! takes the new version, and an invalid or unreachable source leaves the
//! policy in force, and the cached copy for the next start.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::config::{PolicyOrigin, PolicySourceSettings};

/// Most policy files taken from a source, and the most bytes of one.
const MAX_FILES: usize = 256;
const MAX_FILE_BYTES: u64 = 1 << 20;
/// Longest a fetch may take (a git clone, a listing and its downloads).
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// What one poll did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    /// The source holds the policy in force (fetched at this revision).
    Unchanged { revision: String },
    /// A new version is in place (its digest and where it came from).
    Updated { digest: String, revision: String },
    /// The source's files do not load; the copy in force stays.
    Invalid(String),
}

/// Counters and the last outcome, for metrics and status.
#[derive(Debug, Default)]
pub struct SourceStats {
    pub unchanged: AtomicU64,
    pub updated: AtomicU64,
    pub invalid: AtomicU64,
    pub failed: AtomicU64,
    /// When a poll last reached the source (Unix seconds; 0: never).
    pub last_success_unix: AtomicU64,
    /// The revision in force (a git commit, or the bucket's files' ETags).
    pub revision: Mutex<Option<String>>,
    /// The last failure or invalid update, in words.
    pub last_error: Mutex<Option<String>>,
}

impl SourceStats {
    fn record(&self, result: &Result<Synced, String>) {
        let counter = match result {
            Ok(Synced::Unchanged { .. }) => &self.unchanged,
            Ok(Synced::Updated { .. }) => &self.updated,
            Ok(Synced::Invalid(_)) => &self.invalid,
            Err(_) => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if result.is_ok() {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.last_success_unix.store(now, Ordering::Relaxed);
        }
        match result {
            Ok(Synced::Updated { revision, .. } | Synced::Unchanged { revision }) => {
                *lock(&self.revision) = Some(revision.clone());
                *lock(&self.last_error) = None;
            }
            Ok(Synced::Invalid(why)) | Err(why) => *lock(&self.last_error) = Some(why.clone()),
        }
    }

    /// The Prometheus lines for these counters.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(out, "# HELP tollgate_policy_source_polls_total Polls of the policy source, by outcome.\n# TYPE tollgate_policy_source_polls_total counter");
        for (outcome, counter) in [
            ("unchanged", &self.unchanged),
            ("updated", &self.updated),
            ("invalid", &self.invalid),
            ("failed", &self.failed),
        ] {
            let _ = writeln!(
                out,
                "tollgate_policy_source_polls_total{{outcome=\"{outcome}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_policy_source_last_success_timestamp_seconds When a poll last reached the policy source (0: never).\n# TYPE tollgate_policy_source_last_success_timestamp_seconds gauge\ntollgate_policy_source_last_success_timestamp_seconds {}",
            self.last_success_unix.load(Ordering::Relaxed)
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Fetches once before the agent loads its policy: a source that cannot
/// be reached leaves the cached copy of the last run, and only with no
/// copy at all does the agent refuse to start.
pub async fn sync_at_start(
    settings: &PolicySourceSettings,
    reviewers: &std::collections::BTreeMap<String, Vec<String>>,
    stats: &SourceStats,
) -> anyhow::Result<()> {
    let result = sync_once(settings, reviewers).await;
    stats.record(&result);
    match result {
        Ok(synced) => {
            log(settings, &synced);
            if let Synced::Invalid(why) = &synced {
                if !settings.current().exists() {
                    anyhow::bail!(
                        "the policy from {} is invalid and no earlier copy is cached in {}:\n{why}",
                        settings.origin,
                        settings.dir.display()
                    );
                }
            }
            Ok(())
        }
        Err(why) if settings.current().exists() => {
            tracing::warn!(source = %settings.origin, "cannot fetch the policy ({why}); starting with the copy cached in {}", settings.current().display());
            Ok(())
        }
        Err(why) => anyhow::bail!(
            "cannot fetch the policy from {} and no copy is cached in {}: {why}",
            settings.origin,
            settings.dir.display()
        ),
    }
}

/// Polls the source every `interval` until `stop`.
pub async fn keep_syncing(
    settings: PolicySourceSettings,
    reviewers: std::collections::BTreeMap<String, Vec<String>>,
    stats: Arc<SourceStats>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(settings.interval) => {}
        }
        let result = sync_once(&settings, &reviewers).await;
        stats.record(&result);
        match result {
            Ok(synced) => log(&settings, &synced),
            Err(why) => {
                tracing::warn!(source = %settings.origin, "cannot fetch the policy; keeping the policy in force: {why}")
            }
        }
    }
}

fn log(settings: &PolicySourceSettings, synced: &Synced) {
    match synced {
        Synced::Unchanged { .. } => {
            tracing::debug!(source = %settings.origin, "policy source unchanged")
        }
        Synced::Updated { digest, revision } => {
            tracing::info!(source = %settings.origin, %digest, %revision, "new policy fetched; it is in force at the next reload (within seconds)")
        }
        Synced::Invalid(why) => {
            tracing::error!(source = %settings.origin, "the policy source holds an invalid policy; keeping the policy in force:\n{why}")
        }
    }
}

/// One poll: fetch, load, and put in place when it loads and differs.
pub async fn sync_once(
    settings: &PolicySourceSettings,
    reviewers: &std::collections::BTreeMap<String, Vec<String>>,
) -> Result<Synced, String> {
    let incoming = settings.dir.join("incoming");
    fresh_dir(&settings.dir, &incoming)?;
    let fetched = tokio::time::timeout(FETCH_TIMEOUT, fetch(settings, &incoming))
        .await
        .map_err(|_| format!("no answer within {} s", FETCH_TIMEOUT.as_secs()))?;
    let revision = match fetched {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&incoming);
            return Err(e);
        }
    };
    let (settings, reviewers) = (settings.clone(), reviewers.clone());
    tokio::task::spawn_blocking(move || put_in_place(&settings, &reviewers, &incoming, revision))
        .await
        .map_err(|e| e.to_string())?
}

/// Loads `incoming` as the agent would and, when it loads and differs
/// from the copy in force, makes it current.
fn put_in_place(
    settings: &PolicySourceSettings,
    reviewers: &std::collections::BTreeMap<String, Vec<String>>,
    incoming: &Path,
    revision: String,
) -> Result<Synced, String> {
    let loaded = crate::policy::PolicySet::load(&[incoming.to_path_buf()])
        .map_err(|e| e.to_string())
        .and_then(|set| {
            crate::approval::check_review_rules(&set, reviewers).map_err(|e| e.to_string())?;
            Ok(set)
        });
    let set = match loaded {
        Ok(set) => set,
        Err(why) => {
            let _ = std::fs::remove_dir_all(incoming);
            return Ok(Synced::Invalid(format!("{why} (fetched {revision})")));
        }
    };
    let current = settings.current();
    let in_force = std::fs::canonicalize(&current)
        .ok()
        .and_then(|dir| crate::policy::PolicySet::load(&[dir]).ok())
        .map(|p| p.digest());
    if in_force.as_deref() == Some(set.digest().as_str()) {
        let _ = std::fs::remove_dir_all(incoming);
        return Ok(Synced::Unchanged { revision });
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let version = format!("v-{nanos}");
    let cannot =
        |what: &str, e: std::io::Error| format!("cannot {what} in {}: {e}", settings.dir.display());
    std::fs::rename(incoming, settings.dir.join(&version))
        .map_err(|e| cannot("keep the fetched policy", e))?;
    let link = settings.dir.join("current.new");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&version, &link).map_err(|e| cannot("link the new policy", e))?;
    let previous = std::fs::read_link(&current).ok();
    std::fs::rename(&link, &current).map_err(|e| cannot("switch to the new policy", e))?;
    // The version just replaced stays: a reload reading it while the link
    // moved finishes on whole files. Older ones go.
    for entry in std::fs::read_dir(&settings.dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let keep = name == version.as_str()
            || previous
                .as_ref()
                .is_some_and(|p| p.as_os_str() == entry.file_name().as_os_str());
        if name.starts_with("v-") && !keep {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(Synced::Updated {
        digest: set.digest(),
        revision,
    })
}

/// Makes `incoming` an empty directory under `dir` (both root-only).
fn fresh_dir(dir: &Path, incoming: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt as _;
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true).mode(0o700);
    builder
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let _ = std::fs::remove_dir_all(incoming);
    builder
        .create(incoming)
        .map_err(|e| format!("cannot create {}: {e}", incoming.display()))
}

/// Fetches the policy files into `into`; returns the revision fetched.
async fn fetch(settings: &PolicySourceSettings, into: &Path) -> Result<String, String> {
    match &settings.origin {
        PolicyOrigin::S3 { s3, prefix } => fetch_s3(s3, prefix, into).await,
        PolicyOrigin::Git { url, branch, path } => {
            fetch_git(url, branch, path, &settings.dir.join("git"), into).await
        }
    }
}

/// The `*.toml` objects directly under `prefix`.
async fn fetch_s3(
    s3: &crate::config::S3Access,
    prefix: &str,
    into: &Path,
) -> Result<String, String> {
    use futures_util::StreamExt as _;
    use object_store::{ObjectStore as _, ObjectStoreExt as _};
    let store = crate::recording::upload::open_store(s3)?;
    let under = object_store::path::Path::from(prefix);
    let mut listing = store.list((!prefix.is_empty()).then_some(&under));
    let mut objects = Vec::new();
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|e| format!("cannot list s3://{}/{prefix}: {e}", s3.bucket))?;
        let key = meta.location.to_string();
        let name = key
            .strip_prefix(prefix)
            .unwrap_or(&key)
            .trim_start_matches('/')
            .to_string();
        if name.contains('/') || !name.ends_with(".toml") {
            continue;
        }
        if meta.size > MAX_FILE_BYTES {
            return Err(format!(
                "{key} holds {} bytes; a policy file may hold {MAX_FILE_BYTES}",
                meta.size
            ));
        }
        objects.push((name, meta));
    }
    if objects.len() > MAX_FILES {
        return Err(format!(
            "more than {MAX_FILES} policy files under s3://{}/{prefix}",
            s3.bucket
        ));
    }
    objects.sort_by(|a, b| a.0.cmp(&b.0));
    let mut revision = Vec::new();
    for (name, meta) in &objects {
        let bytes = store
            .get(&meta.location)
            .await
            .map_err(|e| format!("cannot read {}: {e}", meta.location))?
            .bytes()
            .await
            .map_err(|e| format!("cannot read {}: {e}", meta.location))?;
        std::fs::write(into.join(name), &bytes)
            .map_err(|e| format!("cannot write {}: {e}", into.join(name).display()))?;
        revision.push(format!(
            "{name}@{}",
            meta.e_tag.as_deref().unwrap_or("?").trim_matches('"')
        ));
    }
    Ok(format!(
        "s3://{}/{prefix} [{}]",
        s3.bucket,
        revision.join(", ")
    ))
}

/// Clones (once) or fetches `branch` of `url` into `checkout`, then copies
/// the regular `*.toml` files of `path` in it into `into`.
async fn fetch_git(
    url: &str,
    branch: &str,
    path: &str,
    checkout: &Path,
    into: &Path,
) -> Result<String, String> {
    if checkout.join(".git").is_dir() {
        git(
            Some(checkout),
            &["fetch", "--quiet", "--depth", "1", "origin", branch],
        )
        .await?;
        git(
            Some(checkout),
            &["reset", "--quiet", "--hard", "FETCH_HEAD"],
        )
        .await?;
    } else {
        let _ = std::fs::remove_dir_all(checkout);
        let target = checkout.to_string_lossy().into_owned();
        git(
            None,
            &[
                "clone",
                "--quiet",
                "--depth",
                "1",
                "--single-branch",
                "--branch",
                branch,
                "--",
                url,
                &target,
            ],
        )
        .await?;
    }
    let commit = git(Some(checkout), &["rev-parse", "HEAD"]).await?;
    let dir = checkout.join(path);
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| format!("no directory {path} in {url} at {branch}: {e}"))?;
    let mut copied = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().ends_with(".toml") {
            continue;
        }
        // A link in the repository could name any file on this host.
        let meta = std::fs::symlink_metadata(entry.path()).map_err(|e| e.to_string())?;
        if !meta.is_file() {
            return Err(format!(
                "{path}/{} in {url} is not a regular file (links are refused)",
                name.to_string_lossy()
            ));
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(format!(
                "{path}/{} holds {} bytes; a policy file may hold {MAX_FILE_BYTES}",
                name.to_string_lossy(),
                meta.len()
            ));
        }
        copied += 1;
        if copied > MAX_FILES {
            return Err(format!("more than {MAX_FILES} policy files in {path}"));
        }
        std::fs::copy(entry.path(), into.join(&name)).map_err(|e| e.to_string())?;
    }
    Ok(format!("{url} {branch} {}", commit.trim()))
}

/// Runs git, never asking for credentials on a terminal; its output.
async fn git(dir: Option<&Path>, args: &[&str]) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new("git");
    if let Some(dir) = dir {
        cmd.arg("-C").arg(dir);
    }
    let out = cmd
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "git {} failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The policy directory a source's settings put in force.
pub fn current_dir(dir: &Path) -> PathBuf {
    dir.join("current")
}
