//! The policy in force, as sessions read it, and reloading it when its
//! files change.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::PolicySet;

/// The loaded policy, shared by every session and replaced whole on a
/// reload. Sessions hold their own copy ([`PolicyView`]) and take the new
/// one when [`SharedPolicy::generation`] moves: a statement then costs one
/// load of a word that changes only on reloads, not a lock and two
/// reference counts every session writes.
#[derive(Clone)]
pub struct SharedPolicy(Arc<PolicySlot>);

struct PolicySlot {
    current: std::sync::RwLock<Arc<PolicySet>>,
    /// The generation of `current`, written after it.
    generation: AtomicU64,
}

impl SharedPolicy {
    /// A handle holding `policy`.
    pub fn new(policy: PolicySet) -> SharedPolicy {
        SharedPolicy(Arc::new(PolicySlot {
            generation: AtomicU64::new(policy.generation()),
            current: std::sync::RwLock::new(Arc::new(policy)),
        }))
    }

    /// The policy in force (the empty set if the lock was poisoned, which
    /// cannot happen: writers only swap an `Arc`).
    pub fn current(&self) -> Arc<PolicySet> {
        self.0
            .current
            .read()
            .map(|p| p.clone())
            .unwrap_or_else(|_| Arc::new(PolicySet::empty()))
    }

    /// Puts `policy` in force.
    pub fn replace(&self, policy: PolicySet) {
        let generation = policy.generation();
        if let Ok(mut current) = self.0.current.write() {
            *current = Arc::new(policy);
        }
        self.0.generation.store(generation, Ordering::Release);
    }

    /// The generation of the policy in force ([`PolicySet::generation`]).
    pub fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Acquire)
    }
}

/// The current policy of a shared handle.
pub fn current_policy(policy: &SharedPolicy) -> Arc<PolicySet> {
    policy.current()
}

/// A session's copy of the policy in force, taken again only after a
/// reload.
pub struct PolicyView(Arc<PolicySet>);

impl PolicyView {
    /// A copy of what `shared` holds now.
    pub fn new(shared: &SharedPolicy) -> PolicyView {
        PolicyView(shared.current())
    }

    /// The policy in force: the copy, unless `shared` was replaced since.
    pub fn get(&mut self, shared: &SharedPolicy) -> &Arc<PolicySet> {
        if shared.generation() != self.0.generation() {
            self.0 = shared.current();
        }
        &self.0
    }
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

#[cfg(test)]
mod view_tests {
    use super::*;

    #[test]
    fn a_sessions_view_keeps_its_copy_until_the_policy_is_replaced() {
        let shared = SharedPolicy::new(PolicySet::empty());
        let mut view = PolicyView::new(&shared);
        let first = Arc::clone(view.get(&shared));
        assert!(Arc::ptr_eq(&first, view.get(&shared)));
        assert_eq!(shared.generation(), first.generation());

        let replacement = PolicySet::empty();
        let generation = replacement.generation();
        shared.replace(replacement);
        assert_eq!(shared.generation(), generation);
        assert_eq!(view.get(&shared).generation(), generation);
        assert!(Arc::ptr_eq(view.get(&shared), &shared.current()));
    }
}
