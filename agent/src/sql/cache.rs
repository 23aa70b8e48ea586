//! [`AnalysisCache`]: analyses kept by exact statement text, least recently
//! used first out.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};

use lru::LruCache;

use super::{analyze, Analysis};

/// Texts longer than this are analysed but not cached: they are rarely sent
/// twice, and each entry holds its text about twice (key and statement
/// texts), so an entry costs at most about 128 KiB plus its summaries.
pub const MAX_CACHED_TEXT_LEN: usize = 64 * 1024;

/// A bounded LRU cache of [`analyze`] results keyed by the exact SQL text.
///
/// Shared by all sessions (`&self` methods, a mutex inside). A hit costs one
/// hash lookup under the lock; a miss analyses without holding the lock, so
/// two sessions missing on the same text at once both analyse it and the
/// second insert wins, with equal results.
///
/// Keys are exact text: ORMs that inline literals miss every time (the
/// summaries' `fingerprint` groups those), while prepared statements and
/// repeated utility statements (`BEGIN`, `SET ...`) hit.
pub struct AnalysisCache {
    /// `None` when built with capacity 0: every call analyses.
    entries: Option<Mutex<LruCache<Box<str>, Arc<Analysis>>>>,
}

impl AnalysisCache {
    /// A cache holding at most `capacity` analyses; 0 turns caching off.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: NonZeroUsize::new(capacity).map(|cap| Mutex::new(LruCache::new(cap))),
        }
    }

    /// The analysis of `sql`, from the cache or computed and then cached
    /// (unless `sql` is longer than [`MAX_CACHED_TEXT_LEN`]). As with
    /// [`analyze`], `sql` must already be converted from the client encoding.
    pub fn analyze(&self, sql: &str) -> Arc<Analysis> {
        let Some(entries) = &self.entries else {
            return Arc::new(analyze(sql));
        };
        if sql.len() > MAX_CACHED_TEXT_LEN {
            return Arc::new(analyze(sql));
        }
        if let Some(hit) = lock(entries).get(sql) {
            return Arc::clone(hit);
        }
        let analysis = Arc::new(analyze(sql));
        lock(entries).put(sql.into(), Arc::clone(&analysis));
        analysis
    }

    /// How many analyses are cached.
    pub fn len(&self) -> usize {
        self.entries
            .as_ref()
            .map_or(0, |entries| lock(entries).len())
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most analyses kept (0 when caching is off).
    pub fn capacity(&self) -> usize {
        self.entries
            .as_ref()
            .map_or(0, |entries| lock(entries).cap().get())
    }
}

impl std::fmt::Debug for AnalysisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnalysisCache")
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .finish()
    }
}

/// Locks the map. Nothing panics while holding the lock (analysis runs
/// outside it), and the map stays consistent even so, so a poisoned lock is
/// used as is.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
