//! The policy in force, as sessions read it, and reloading it when its
//! files change.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::PolicySet;

/// The loaded policy, swapped atomically on reload.
pub type SharedPolicy = Arc<std::sync::RwLock<Arc<PolicySet>>>;

/// The current policy of a shared handle (the empty set if the lock was
/// poisoned, which cannot happen: writers only swap an `Arc`).
pub fn current_policy(policy: &SharedPolicy) -> Arc<PolicySet> {
    policy
        .read()
        .map(|p| p.clone())
        .unwrap_or_else(|_| Arc::new(PolicySet::empty()))
}

/// How often policy files are checked for changes.
const POLICY_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Name, size and modification time of every policy file: a change in any
/// of them (an edit, a new file in a policy directory) triggers a reload.
fn policy_fingerprint(paths: &[PathBuf]) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
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

/// Calls `reload` when the policy files under `paths` change (SIGHUP
/// reloads at once, without this).
pub async fn watch(paths: Vec<PathBuf>, stop: CancellationToken, reload: impl Fn()) {
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
            reload();
            last = now;
        }
    }
}
