//! [`AnalysisCache`]: analyses kept by statement shape (text with literal
//! values blanked), least recently used first out, and the column
//! references of masked statements ([`super::column_refs`]) kept the same
//! way.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};

use lru::LruCache;

use super::analyze::single_statement_text;
use super::refs::{column_refs, ColumnRefs};
use super::shape::shape_into;
use super::{analyze_read, Analysis, Reading, StatementKind};

/// Texts longer than this are analysed but not cached: they are rarely sent
/// twice, and each entry holds its text about three times (key, source and
/// statement texts), so an entry costs at most about 192 KiB plus its
/// summaries.
pub const MAX_CACHED_TEXT_LEN: usize = 64 * 1024;

/// A bounded LRU cache of [`analyze`] results.
///
/// Shared by all sessions (`&self` methods, a mutex inside). A hit costs a
/// scan of the text and one hash lookup under the lock; a miss analyses
/// without holding the lock, so two sessions missing on the same text at
/// once both analyse it and the second insert wins, with equal results.
///
/// Entries are keyed by [`shape_into`]: statements that differ only in literal
/// values (`WHERE id = 17`, `WHERE id = 42`) share one entry, so an ORM or
/// pgbench sending a new literal every time still hits. The analysis is
/// reused for another text of the same shape only when it cannot depend on
/// literal values: a single SELECT, INSERT, UPDATE, DELETE or MERGE (an
/// EXPLAIN's options or a COPY's file name are literals the analysis reads).
/// Other texts hit only on identical text. Text the shape scanner cannot
/// vouch for (dollar quotes, backslashes, prefixed strings) is keyed by its
/// exact text.
pub struct AnalysisCache {
    /// `None` when built with capacity 0: every call analyses.
    entries: Option<Mutex<LruCache<Box<[u8]>, Entry>>>,
    /// Column references by statement shape (`None`: capacity 0). A
    /// reference never reads a literal's value, so every text of one shape
    /// has the same references, whatever its kind.
    refs: Option<Mutex<RefsByShape>>,
}

type RefsByShape = LruCache<Box<[u8]>, Arc<ColumnRefs>>;

/// Column references kept at most: only masked statements ask for them.
const REFS_CAPACITY: usize = 256;

struct Entry {
    /// The text that was analysed.
    source: Box<str>,
    analysis: Arc<Analysis>,
    /// Whether `analysis` holds for every text of the same shape.
    literal_free: bool,
}

/// Key prefixes: a shape and an exact text never compare equal.
const SHAPE_KEY: u8 = 0;
const EXACT_KEY: u8 = 1;
/// An exact text read with backslash escapes ([`Reading::BackslashEscapes`]),
/// which may not share an entry with the same text read as standard.
const ESCAPED_KEY: u8 = 2;

impl AnalysisCache {
    /// A cache holding at most `capacity` analyses; 0 turns caching off.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: NonZeroUsize::new(capacity).map(|cap| Mutex::new(LruCache::new(cap))),
            refs: NonZeroUsize::new(capacity.min(REFS_CAPACITY))
                .map(|cap| Mutex::new(LruCache::new(cap))),
        }
    }

    /// [`column_refs`] of one statement's text, from the cache or computed
    /// (a full parse, about 50 µs) and then cached; `None` when it does not
    /// parse (not cached: the caller masks every computed field).
    pub fn column_refs(&self, sql: &str, reading: Reading) -> Option<Arc<ColumnRefs>> {
        let Some(refs) = self
            .refs
            .as_ref()
            .filter(|_| sql.len() <= MAX_CACHED_TEXT_LEN)
        else {
            return column_refs(sql, reading).ok().map(Arc::new);
        };
        let key = cache_key(sql, reading);
        if let Some(found) = lock(refs).get(key.as_slice()) {
            return Some(Arc::clone(found));
        }
        let found = Arc::new(column_refs(sql, reading).ok()?);
        lock(refs).put(key.into_boxed_slice(), Arc::clone(&found));
        Some(found)
    }

    /// The analysis of `sql`, from the cache or computed and then cached
    /// (unless `sql` is longer than [`MAX_CACHED_TEXT_LEN`]). As with
    /// [`analyze`], `sql` must already be converted from the client encoding.
    pub fn analyze(&self, sql: &str) -> Arc<Analysis> {
        self.analyze_read(sql, Reading::Standard)
    }

    /// [`AnalysisCache::analyze`] with plain string literals read as
    /// `reading` says.
    pub fn analyze_read(&self, sql: &str, reading: Reading) -> Arc<Analysis> {
        let Some(entries) = &self.entries else {
            return Arc::new(analyze_read(sql, reading));
        };
        if sql.len() > MAX_CACHED_TEXT_LEN {
            return Arc::new(analyze_read(sql, reading));
        }
        let key = cache_key(sql, reading);
        if let Some(entry) = lock(entries).get(key.as_slice()) {
            if *entry.source == *sql {
                return Arc::clone(&entry.analysis);
            }
            if entry.literal_free {
                return Arc::new(with_text(&entry.analysis, sql));
            }
        }
        let analysis = Arc::new(analyze_read(sql, reading));
        let entry = Entry {
            source: sql.into(),
            literal_free: key.first() == Some(&SHAPE_KEY) && is_literal_free(sql, &analysis),
            analysis: Arc::clone(&analysis),
        };
        lock(entries).put(key.into_boxed_slice(), entry);
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

/// The key `sql` is cached under: its shape, else its exact text, and for
/// text whose reading matters, the exact text under its own prefix. Boxed
/// only when inserted; a lookup borrows it.
fn cache_key(sql: &str, reading: Reading) -> Vec<u8> {
    let mut key = Vec::with_capacity(sql.len() + 1);
    if reading.matters_for(sql) {
        key.push(ESCAPED_KEY);
        key.extend_from_slice(sql.as_bytes());
        return key;
    }
    key.push(SHAPE_KEY);
    if !shape_into(sql, &mut key) {
        key.clear();
        key.push(EXACT_KEY);
        key.extend_from_slice(sql.as_bytes());
    }
    key
}

/// Whether `analysis` of `sql` holds for any text of the same shape: one
/// statement, analysed on its own (no `;` inside to split on), of a kind
/// whose summary reads no literal value.
fn is_literal_free(sql: &str, analysis: &Analysis) -> bool {
    let Analysis::Parsed { statements } = analysis else {
        return false;
    };
    let [statement] = statements.as_slice() else {
        return false;
    };
    let body = sql.trim_end_matches(|c: char| c == ';' || c.is_ascii_whitespace());
    !body.contains(';')
        && matches!(
            statement.kind,
            StatementKind::Select
                | StatementKind::Insert
                | StatementKind::Update
                | StatementKind::Delete
                | StatementKind::Merge
        )
}

/// A literal-free analysis (see [`is_literal_free`]) applied to another
/// text of the same shape: only the statement's text changes.
fn with_text(analysis: &Analysis, sql: &str) -> Analysis {
    match analysis {
        Analysis::Parsed { statements } => Analysis::Parsed {
            statements: statements
                .iter()
                .map(|statement| super::StatementSummary {
                    text: single_statement_text(sql).to_owned(),
                    ..statement.clone()
                })
                .collect(),
        },
        Analysis::Unparsable { error } => Analysis::Unparsable {
            error: error.clone(),
        },
    }
}
