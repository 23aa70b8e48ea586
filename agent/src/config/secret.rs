//! Secrets the agent holds for a target (brokered credentials), kept in
//! files only the agent's user may read, never inline in the configuration.

use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The most a secret file may hold: a password or a key, not a data file.
const MAX_SECRET_LEN: u64 = 64 * 1024;

/// Bits that let anyone but the owner read or change a file.
const GROUP_OR_OTHER: u32 = 0o077;

/// A secret's bytes. Shown as `<redacted>` in every `Debug` and `Display`,
/// so it cannot reach a log or an error message through formatting;
/// overwritten when dropped.
pub struct Secret(Vec<u8>);

impl Secret {
    /// The bytes, for the one place that sends them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.fill(0);
    }
}

/// Checks that `path` is a regular file owned by root or by the agent's
/// user, that nobody else may read or write, as ssh and libpq insist for
/// keys and `.pgpass`. The error says what to change.
pub fn check_secret_file(path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!(
            "{} is not an absolute path; secret files are named by their full path",
            path.display()
        ));
    }
    let meta =
        fs::symlink_metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.file_type().is_file() {
        return Err(format!(
            "{} is not a regular file (a symbolic link or a directory is refused)",
            path.display()
        ));
    }
    let own = effective_uid();
    if meta.uid() != 0 && Some(meta.uid()) != own {
        return Err(format!(
            "{} is owned by uid {}; a secret file must belong to root (chown root: {})",
            path.display(),
            meta.uid(),
            path.display()
        ));
    }
    if meta.mode() & GROUP_OR_OTHER != 0 {
        return Err(format!(
            "{} is readable or writable by others (mode {:o}); chmod 600 {}",
            path.display(),
            meta.mode() & 0o7777,
            path.display()
        ));
    }
    if meta.len() > MAX_SECRET_LEN {
        return Err(format!(
            "{} holds {} bytes; a secret file holds one password or key (at most {MAX_SECRET_LEN} bytes)",
            path.display(),
            meta.len()
        ));
    }
    Ok(())
}

/// Reads a secret file after [`check_secret_file`]; one trailing newline
/// (`\n` or `\r\n`) is not part of the secret. An empty secret is refused.
pub fn read_secret_file(path: &Path) -> Result<Secret, String> {
    check_secret_file(path)?;
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_LEN + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut secret = Secret(bytes);
    if secret.0.ends_with(b"\n") {
        secret.0.pop();
        if secret.0.ends_with(b"\r") {
            secret.0.pop();
        }
    }
    if secret.0.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(secret)
}

/// The agent's effective uid: the owner of its own `/proc` entry.
fn effective_uid() -> Option<u32> {
    fs::metadata("/proc/self").ok().map(|m| m.uid())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn file(dir: &Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_private_file_is_read_without_its_last_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(dir.path(), "pw", "s3cret\r\n", 0o600);
        assert_eq!(read_secret_file(&path).unwrap().expose(), b"s3cret");
        let path = file(dir.path(), "two", "a\n\n", 0o400);
        assert_eq!(read_secret_file(&path).unwrap().expose(), b"a\n");
    }

    #[test]
    fn a_file_others_may_read_an_empty_file_and_a_link_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = file(dir.path(), "open", "s3cret", 0o644);
        let err = read_secret_file(&open).unwrap_err();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
        let empty = file(dir.path(), "empty", "\n", 0o600);
        assert!(read_secret_file(&empty).unwrap_err().contains("is empty"));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("empty"), &link).unwrap();
        assert!(read_secret_file(&link)
            .unwrap_err()
            .contains("not a regular file"));
        assert!(check_secret_file(Path::new("relative/pw"))
            .unwrap_err()
            .contains("absolute"));
    }

    #[test]
    fn a_secret_never_formats_its_bytes() {
        let secret = Secret(b"s3cret".to_vec());
        assert!(!format!("{secret:?} {secret}").contains("s3cret"));
    }
}
