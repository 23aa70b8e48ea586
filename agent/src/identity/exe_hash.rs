//! SHA-256 of a process's executable, cached by file identity.
//!
//! The file is opened through `/proc/<pid>/exe`, which reaches the running
//! image even after the path was deleted or replaced. The cache key comes from
//! the opened file's own metadata (device, inode, change time, modification
//! time, size), so a binary rewritten or replaced in place gets a new key and
//! is hashed again.
//!
//! Hashing a large executable (node, java: 100 MB and more) takes a second or
//! two, which must not hold up a session. [`ExeHashCache::lookup`] hashes
//! small files at once (a few milliseconds, once per binary) and hands larger
//! ones to one background thread, returning a [`PendingHash`] the session
//! awaits off its path. Concurrent lookups of the same new binary share one
//! computation (single flight); the queue to the thread is bounded.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

/// Files larger than this are not hashed.
pub(super) const MAX_HASHED_SIZE: u64 = 1 << 30;
/// Files up to this size are hashed on the caller's thread (milliseconds);
/// larger ones in the background.
pub(super) const INLINE_HASH_SIZE: u64 = 8 << 20;
/// How many distinct large binaries may wait for the background thread.
const QUEUE: usize = 64;
const CHUNK: usize = 64 * 1024;
/// The cache is cleared when it reaches this many distinct binaries.
const MAX_ENTRIES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
    mtime: i64,
    mtime_nsec: i64,
    size: u64,
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> FileKey {
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            size: meta.size(),
        }
    }
}

/// Why no digest was produced.
#[derive(Debug)]
pub(super) enum HashError {
    Open(io::Error),
    Read(io::Error),
    TooLarge(u64),
    /// The background queue is full: not hashed this time.
    Busy,
}

impl std::fmt::Display for HashError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HashError::Open(e) => write!(f, "cannot open the executable: {e}"),
            HashError::Read(e) => write!(f, "cannot read the executable: {e}"),
            HashError::TooLarge(size) => write!(
                f,
                "{size} bytes, over the {MAX_HASHED_SIZE} byte limit; not hashed"
            ),
            HashError::Busy => {
                f.write_str("too many executables are waiting to be hashed; not hashed")
            }
        }
    }
}

/// A digest being computed in the background: `Ok(hex)` or `Err(why)`.
#[derive(Debug)]
pub struct PendingHash(oneshot::Receiver<Result<String, String>>);

impl PendingHash {
    /// Waits for the digest.
    pub async fn wait(self) -> Result<String, String> {
        self.0
            .await
            .unwrap_or_else(|_| Err("the hashing thread stopped".to_owned()))
    }
}

/// What [`ExeHashCache::lookup`] found.
#[derive(Debug)]
pub(super) enum Lookup {
    Ready(String),
    Pending(PendingHash),
    Failed(HashError),
}

type Waiters = Vec<oneshot::Sender<Result<String, String>>>;

#[derive(Debug, Default)]
struct State {
    done: HashMap<FileKey, String>,
    /// Binaries queued or being hashed, with who waits for each.
    in_flight: HashMap<FileKey, Waiters>,
}

#[derive(Debug, Default)]
pub(super) struct ExeHashCache {
    state: Arc<Mutex<State>>,
    queue: OnceLock<Option<SyncSender<(FileKey, File)>>>,
    #[cfg(test)]
    computed: Arc<std::sync::atomic::AtomicUsize>,
}

impl ExeHashCache {
    /// Hex SHA-256 of the file at `path` (normally `/proc/<pid>/exe`),
    /// computed on this thread whatever its size.
    pub(super) fn sha256(&self, path: &Path) -> Result<String, HashError> {
        let (file, key) = match self.open(path)? {
            Opened::Cached(digest) => return Ok(digest),
            Opened::New(file, key) => (file, key),
        };
        let digest = hash_file(file)?;
        self.count_computed();
        insert(&self.state, key, digest.clone());
        Ok(digest)
    }

    /// The digest of the file at `path` if known or small; otherwise a
    /// [`PendingHash`] filled by the background thread.
    pub(super) fn lookup(&self, path: &Path) -> Lookup {
        let (file, key) = match self.open(path) {
            Ok(Opened::Cached(digest)) => return Lookup::Ready(digest),
            Ok(Opened::New(file, key)) => (file, key),
            Err(e) => return Lookup::Failed(e),
        };
        if key.size <= INLINE_HASH_SIZE {
            return match hash_file(file) {
                Ok(digest) => {
                    self.count_computed();
                    insert(&self.state, key, digest.clone());
                    Lookup::Ready(digest)
                }
                Err(e) => Lookup::Failed(e),
            };
        }
        let (tx, rx) = oneshot::channel();
        let mut state = lock(&self.state);
        if let Some(digest) = state.done.get(&key) {
            return Lookup::Ready(digest.clone());
        }
        if let Some(waiters) = state.in_flight.get_mut(&key) {
            waiters.push(tx);
            return Lookup::Pending(PendingHash(rx));
        }
        let Some(queue) = self.queue() else {
            return Lookup::Failed(HashError::Busy);
        };
        match queue.try_send((key, file)) {
            Ok(()) => {
                state.in_flight.insert(key, vec![tx]);
                Lookup::Pending(PendingHash(rx))
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                Lookup::Failed(HashError::Busy)
            }
        }
    }

    /// The background thread's queue, starting the thread on first use.
    fn queue(&self) -> Option<&SyncSender<(FileKey, File)>> {
        self.queue
            .get_or_init(|| {
                let (tx, rx) = sync_channel::<(FileKey, File)>(QUEUE);
                let state = self.state.clone();
                #[cfg(test)]
                let computed = self.computed.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("exe-hash".into())
                        .spawn(move || {
                            for (key, file) in rx {
                                let result = hash_file(file).map_err(|e| e.to_string());
                                #[cfg(test)]
                                computed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                if let Ok(digest) = &result {
                                    insert(&state, key, digest.clone());
                                }
                                let waiters =
                                    lock(&state).in_flight.remove(&key).unwrap_or_default();
                                for waiter in waiters {
                                    // A session that ended no longer listens.
                                    let _ = waiter.send(result.clone());
                                }
                            }
                        });
                match spawned {
                    Ok(_) => Some(tx),
                    Err(e) => {
                        tracing::warn!("cannot start the executable hashing thread: {e}");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// A cached digest, or the opened file and its key.
    fn open(&self, path: &Path) -> Result<Opened, HashError> {
        // A known binary costs one `stat` (through the link, like `open`);
        // only a new one is opened, and its key is taken again from the
        // opened file, so that the digest stored is of the key's file.
        let meta = std::fs::metadata(path).map_err(HashError::Open)?;
        if let Some(hit) = lock(&self.state).done.get(&FileKey::of(&meta)) {
            return Ok(Opened::Cached(hit.clone()));
        }
        let file = File::open(path).map_err(HashError::Open)?;
        let meta = file.metadata().map_err(HashError::Read)?;
        if meta.size() > MAX_HASHED_SIZE {
            return Err(HashError::TooLarge(meta.size()));
        }
        Ok(Opened::New(file, FileKey::of(&meta)))
    }

    fn count_computed(&self) {
        #[cfg(test)]
        self.computed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        lock(&self.state).done.len()
    }

    #[cfg(test)]
    pub(super) fn computed(&self) -> usize {
        self.computed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

enum Opened {
    Cached(String),
    New(File, FileKey),
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic elsewhere cannot leave the maps half-updated: recover them.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn insert(state: &Mutex<State>, key: FileKey, digest: String) {
    let mut state = lock(state);
    if state.done.len() >= MAX_ENTRIES {
        state.done.clear();
    }
    state.done.insert(key, digest);
}

fn hash_file(file: File) -> Result<String, HashError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    // Bounded even if the file grows while it is read.
    let mut reader = file.take(MAX_HASHED_SIZE.saturating_add(1));
    let mut total: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HashError::Read(e)),
        };
        total = total.saturating_add(n as u64);
        if total > MAX_HASHED_SIZE {
            return Err(HashError::TooLarge(total));
        }
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn hashes_and_caches_by_file_identity() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        // Larger than one chunk, to exercise the loop.
        let content = vec![7u8; CHUNK * 2 + 13];
        std::fs::write(&bin, &content).unwrap();
        let expected = hex::encode(Sha256::digest(&content));

        let cache = ExeHashCache::default();
        assert_eq!(cache.sha256(&bin).unwrap(), expected);
        assert_eq!(cache.sha256(&bin).unwrap(), expected);
        // A second name for the same inode hits the same entry.
        let link = dir.path().join("exe");
        std::os::unix::fs::symlink(&bin, &link).unwrap();
        assert_eq!(cache.sha256(&link).unwrap(), expected);
        assert_eq!((cache.len(), cache.computed()), (1, 1));

        // A different size is a different key.
        std::fs::write(&bin, b"other").unwrap();
        assert_eq!(
            cache.sha256(&bin).unwrap(),
            hex::encode(Sha256::digest(b"other"))
        );
        assert_eq!((cache.len(), cache.computed()), (2, 2));

        assert!(matches!(
            cache.sha256(&dir.path().join("missing")),
            Err(HashError::Open(_))
        ));
    }

    #[tokio::test]
    async fn large_files_are_hashed_once_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("big");
        let content = vec![3u8; INLINE_HASH_SIZE as usize + 1];
        std::fs::write(&bin, &content).unwrap();
        let expected = hex::encode(Sha256::digest(&content));

        let cache = ExeHashCache::default();
        // Several sessions of the same new binary share one computation.
        let first = cache.lookup(&bin);
        assert!(matches!(first, Lookup::Pending(_)), "{first:?}");
        let mut lookups = vec![first];
        lookups.extend((0..2).map(|_| cache.lookup(&bin)));
        for lookup in lookups {
            let digest = match lookup {
                Lookup::Pending(p) => p.wait().await.unwrap(),
                // The thread may already have finished.
                Lookup::Ready(d) => d,
                Lookup::Failed(e) => panic!("{e}"),
            };
            assert_eq!(digest, expected);
        }
        assert_eq!(cache.computed(), 1);
        // Then it is cached.
        assert!(matches!(cache.lookup(&bin), Lookup::Ready(d) if d == expected));

        // A small file is hashed at once.
        let small = dir.path().join("small");
        std::fs::write(&small, b"tiny").unwrap();
        assert!(matches!(cache.lookup(&small), Lookup::Ready(_)));
        assert!(matches!(
            cache.lookup(&dir.path().join("missing")),
            Lookup::Failed(HashError::Open(_))
        ));
    }
}
