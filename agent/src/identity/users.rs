//! User and group names from `passwd(5)` and `group(5)` files. Only the local
//! files are read (no NSS): a uid known only to LDAP or sssd stays numeric and
//! the identity records a gap.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Finds the name whose third field (uid in `passwd`, gid in `group`) is `id`.
/// Comments, blank lines, NIS `+`/`-` entries and malformed lines are skipped.
pub(super) fn name_for_id(text: &str, id: u32) -> Option<String> {
    text.lines()
        .filter(|line| !line.starts_with(['#', '+', '-']))
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?.trim();
            let _password = fields.next()?;
            let found: u32 = fields.next()?.trim().parse().ok()?;
            (found == id && !name.is_empty()).then(|| name.to_owned())
        })
}

/// A `passwd` or `group` file, read again only when it changed (another
/// inode, size or modification time): every connection looks two names up,
/// and one `stat` costs far less than reading and scanning the file.
#[derive(Debug, Default)]
pub(super) struct NameFile {
    cached: Mutex<Option<(FileStamp, Arc<str>)>>,
}

/// What tells one version of a file from another.
type FileStamp = (u64, u64, u64, i64, i64);

impl NameFile {
    /// Looks `id` up in the file at `path`.
    pub(super) fn lookup(&self, path: &Path, id: u32) -> io::Result<Option<String>> {
        let meta = std::fs::metadata(path)?;
        let stamp = (
            meta.dev(),
            meta.ino(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
        );
        let cached = self.cached.lock().ok().and_then(|c| {
            c.as_ref()
                .filter(|(s, _)| *s == stamp)
                .map(|(_, t)| t.clone())
        });
        let text = match cached {
            Some(text) => text,
            None => {
                let text: Arc<str> = std::fs::read_to_string(path)?.into();
                if let Ok(mut c) = self.cached.lock() {
                    *c = Some((stamp, text.clone()));
                }
                text
            }
        };
        Ok(name_for_id(&text, id))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn tolerates_comments_and_garbage() {
        let passwd = "# comment\n\n+nis::0:0::/:/bin/sh\ngarbage\nbad:x:notanumber:0\n:x:5:5::/:\nroot:x:0:0:root:/root:/bin/bash\nci:x:1001:1001::/home/ci:/bin/sh\n";
        assert_eq!(name_for_id(passwd, 0).as_deref(), Some("root"));
        assert_eq!(name_for_id(passwd, 1001).as_deref(), Some("ci"));
        assert_eq!(name_for_id(passwd, 5), None);
        assert_eq!(name_for_id(passwd, 42), None);
        let group = "root:x:0:\nrunners:x:1001:ci,deploy\n";
        assert_eq!(name_for_id(group, 1001).as_deref(), Some("runners"));
    }

    #[test]
    fn a_changed_file_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        std::fs::write(&path, "ci:x:1001:1001::/home/ci:/bin/sh\n").unwrap();
        let file = NameFile::default();
        assert_eq!(file.lookup(&path, 1001).unwrap().as_deref(), Some("ci"));
        assert_eq!(file.lookup(&path, 1002).unwrap(), None);
        // Replaced the way tools replace it: a new file renamed over it.
        let next = dir.path().join("passwd+");
        std::fs::write(
            &next,
            "ci:x:1001:1001::/home/ci:/bin/sh\nbot:x:1002:1002::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert_eq!(file.lookup(&path, 1002).unwrap().as_deref(), Some("bot"));
        // Rewritten in place with the same length: the modification time
        // tells.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(
            &path,
            "ci:x:1001:1001::/home/ci:/bin/sh\nbat:x:1002:1002::/:/bin/sh\n",
        )
        .unwrap();
        assert_eq!(file.lookup(&path, 1002).unwrap().as_deref(), Some("bat"));
        std::fs::remove_file(&path).unwrap();
        assert!(file.lookup(&path, 1001).is_err());
    }
}
