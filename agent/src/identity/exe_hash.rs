//! SHA-256 of a process's executable, cached by file identity.
//!
//! The file is opened through `/proc/<pid>/exe`, which reaches the running
//! image even after the path was deleted or replaced. The cache key comes from
//! the opened file's own metadata (device, inode, mtime, size), so a binary
//! rewritten in place gets a new key and is hashed again.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// Files larger than this are not hashed.
pub(super) const MAX_HASHED_SIZE: u64 = 1 << 30;
const CHUNK: usize = 64 * 1024;
/// The cache is cleared when it reaches this many distinct binaries.
const MAX_ENTRIES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    size: u64,
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> FileKey {
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
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
}

#[derive(Debug, Default)]
pub(super) struct ExeHashCache {
    entries: Mutex<HashMap<FileKey, String>>,
    #[cfg(test)]
    computed: std::sync::atomic::AtomicUsize,
}

impl ExeHashCache {
    /// Hex SHA-256 of the file at `path` (normally `/proc/<pid>/exe`).
    pub(super) fn sha256(&self, path: &Path) -> Result<String, HashError> {
        // A known binary costs one `stat` (through the link, like `open`);
        // only a new one is opened, and its key is taken again from the
        // opened file, so that the digest stored is of the key's file.
        let meta = std::fs::metadata(path).map_err(HashError::Open)?;
        if let Some(hit) = self.lock().get(&FileKey::of(&meta)) {
            return Ok(hit.clone());
        }
        let file = File::open(path).map_err(HashError::Open)?;
        let meta = file.metadata().map_err(HashError::Read)?;
        if meta.size() > MAX_HASHED_SIZE {
            return Err(HashError::TooLarge(meta.size()));
        }
        let key = FileKey::of(&meta);
        // Hash without holding the lock; two threads racing on the same new
        // binary both hash it once, which is harmless.
        let digest = hash_file(file)?;
        #[cfg(test)]
        self.computed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut entries = self.lock();
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(key, digest.clone());
        Ok(digest)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FileKey, String>> {
        // A panic elsewhere cannot leave the map half-updated: recover it.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    #[cfg(test)]
    pub(super) fn computed(&self) -> usize {
        self.computed.load(std::sync::atomic::Ordering::Relaxed)
    }
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
    #![allow(clippy::unwrap_used, clippy::expect_used)]

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
}
