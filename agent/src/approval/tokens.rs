//! Reviewer tokens: how a reviewer who is not on this host signs in to the
//! reviewer API over TLS.
//!
//! A token is 32 random bytes written as `tgr_` and 64 hex digits. The
//! agent never keeps a token: the token file (`[agent] approvals_tokens`,
//! `/etc/tollgate/reviewer-tokens`) holds the SHA-256 of each, in hex, with
//! the name shown in audit records, the Unix user the token acts as (its
//! uid and groups decide approver membership and segregation of duties) and
//! when it was made. One entry per line:
//!
//! ```text
//! # name:user:sha256:created (Unix seconds)
//! alice-laptop:alice:3f6c...e1:1780000000
//! ```
//!
//! The file is trusted only when it is a regular file owned by root, not
//! readable or writable by group or others, in a directory only root can
//! change. Otherwise every token login is refused (and the agent logs why)
//! until it is fixed: a file others could write would let them make
//! themselves reviewers. The agent looks at the file's metadata on every
//! token login and reads it again when it changed, so `tollgate approvals
//! tokens add` and `revoke` take effect at the next request.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use ring::rand::SecureRandom as _;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Where the token file is kept unless the configuration says otherwise.
pub const DEFAULT_TOKENS_PATH: &str = "/etc/tollgate/reviewer-tokens";

/// What every token starts with, so a leaked one is recognised by secret
/// scanners and by people.
const TOKEN_PREFIX: &str = "tgr_";
/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;
/// Largest token file read (a few thousand entries).
const MAX_FILE: u64 = 1024 * 1024;
/// Longest token name.
const MAX_NAME: usize = 64;

/// Why the token file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Others could read or change it.
    #[error("{path}: {problem}; token logins are refused until it is fixed (chown root:root and chmod 0600 it)")]
    Unsafe {
        /// The file or directory at fault.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// A line is not an entry.
    #[error("{path}:{line}: {problem}")]
    Malformed {
        /// The file.
        path: String,
        /// The line number, from 1.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// Reading or writing failed.
    #[error("{path}: {problem}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        problem: String,
    },
    /// A command's argument is wrong.
    #[error("{0}")]
    Invalid(String),
}

/// One token's entry: everything but the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenEntry {
    /// The name shown in audit records (`token:NAME`).
    pub name: String,
    /// The Unix user the token acts as.
    pub user: String,
    /// SHA-256 of the token text.
    #[serde(skip)]
    pub sha256: [u8; 32],
    /// When it was made, in Unix seconds.
    pub created: u64,
}

/// The entries of a token file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenFile {
    /// In file order.
    pub entries: Vec<TokenEntry>,
}

impl TokenFile {
    /// Parses the file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<TokenFile, TokenError> {
        let mut entries: Vec<TokenEntry> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let malformed = |problem: String| TokenError::Malformed {
                path: path.to_owned(),
                line: index + 1,
                problem,
            };
            let fields: Vec<&str> = line.split(':').collect();
            let [name, user, digest, created] = fields.as_slice() else {
                return Err(malformed(format!(
                    "{} fields; an entry is name:user:sha256:created",
                    fields.len()
                )));
            };
            check_name(name).map_err(&malformed)?;
            check_user(user).map_err(&malformed)?;
            let sha256 = parse_digest(digest)
                .ok_or_else(|| malformed("the hash is not 64 hex digits (a SHA-256)".to_owned()))?;
            let created = created
                .parse()
                .map_err(|_| malformed(format!("\"{created}\" is not a time in Unix seconds")))?;
            if entries.iter().any(|e| e.name == *name) {
                return Err(malformed(format!("a second token named \"{name}\"")));
            }
            entries.push(TokenEntry {
                name: (*name).to_owned(),
                user: (*user).to_owned(),
                sha256,
                created,
            });
        }
        Ok(TokenFile { entries })
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# Tollgate reviewer tokens: name:user:sha256:created (Unix seconds).\n\
             # Managed by `tollgate approvals tokens`; only hashes are kept.\n",
        );
        for e in &self.entries {
            let _ = writeln!(
                out,
                "{}:{}:{}:{}",
                e.name,
                e.user,
                hex::encode(e.sha256),
                e.created
            );
        }
        out
    }

    /// The entry of a presented token. Every entry is compared, in constant
    /// time, whatever matches: how long this takes says nothing about which
    /// entries exist or how close a guess came.
    pub fn find(&self, token: &str) -> Option<&TokenEntry> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for entry in &self.entries {
            if constant_time_eq(&presented, &entry.sha256) {
                found = Some(entry);
            }
        }
        found
    }
}

/// Whether `a` and `b` are equal, looking at every byte whatever differs.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut difference = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        difference |= x ^ y;
    }
    // Keeps the compiler from turning the loop into an early exit.
    std::hint::black_box(difference) == 0
}

/// A token name: letters, digits, `.`, `_`, `-`, up to 64.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "\"{name}\" is not a token name; use up to {MAX_NAME} letters, digits, '.', '_' or '-'"
        ))
    }
}

fn check_user(user: &str) -> Result<(), String> {
    let ok = !user.is_empty()
        && user.len() <= 64
        && !user.starts_with('-')
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '$'));
    if ok {
        Ok(())
    } else {
        Err(format!("\"{user}\" is not a Unix user name"))
    }
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(text).ok()?;
    bytes.try_into().ok()
}

/// A new token and the hash the file keeps.
pub fn new_token() -> Result<(String, [u8; 32]), TokenError> {
    let mut random = [0u8; TOKEN_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut random)
        .map_err(|_| TokenError::Invalid("the system's random source failed".into()))?;
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(random));
    let sha256 = Sha256::digest(token.as_bytes()).into();
    Ok((token, sha256))
}

/// Why the owner `uid` and `mode` of the token file (or of its directory,
/// when `directory`) make it unsafe, if they do.
pub fn permission_problem(uid: u32, mode: u32, owner: u32, directory: bool) -> Option<String> {
    if uid != owner {
        return Some(format!("owned by uid {uid}, not by root"));
    }
    if directory {
        // Others able to rename entries in it could swap the file.
        let sticky = mode & 0o1000 != 0;
        if mode & 0o022 != 0 && !sticky {
            return Some(format!(
                "the directory is writable by group or others (mode {:04o})",
                mode & 0o7777
            ));
        }
    } else if mode & 0o077 != 0 {
        return Some(format!(
            "readable or writable by group or others (mode {:04o})",
            mode & 0o7777
        ));
    }
    None
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> TokenError {
    TokenError::Io {
        path: path.display().to_string(),
        problem: e.to_string(),
    }
}

/// Checks the file at `path` and its directory are owned by `owner` and
/// closed to others. `Ok(None)`: there is no file.
fn check_file(path: &Path, owner: u32) -> Result<Option<fs::Metadata>, TokenError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path, e)),
    };
    let unsafe_because = |problem: String| TokenError::Unsafe {
        path: path.display().to_string(),
        problem,
    };
    if !meta.file_type().is_file() {
        return Err(unsafe_because(
            "not a regular file (a symbolic link or something else)".into(),
        ));
    }
    if let Some(problem) = permission_problem(meta.uid(), meta.mode(), owner, false) {
        return Err(unsafe_because(problem));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let dir_meta = fs::metadata(dir).map_err(|e| io_error(dir, e))?;
        if let Some(problem) = permission_problem(dir_meta.uid(), dir_meta.mode(), owner, true) {
            return Err(TokenError::Unsafe {
                path: dir.display().to_string(),
                problem,
            });
        }
    }
    Ok(Some(meta))
}

/// Reads the token file at `path`, refusing one `owner` does not own alone.
/// A missing file has no entries.
pub fn load(path: &Path, owner: u32) -> Result<TokenFile, TokenError> {
    let Some(meta) = check_file(path, owner)? else {
        return Ok(TokenFile::default());
    };
    if meta.len() > MAX_FILE {
        return Err(io_error(
            path,
            format!("larger than {MAX_FILE} bytes; not a token file"),
        ));
    }
    let text = fs::read_to_string(path).map_err(|e| io_error(path, e))?;
    TokenFile::parse(&text, &path.display().to_string())
}

/// Writes the token file whole, mode 0600: to a temporary file in the same
/// directory, then renamed over the old one, so the agent reads either the
/// old file or the new one.
pub fn save(path: &Path, file: &TokenFile) -> Result<(), TokenError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| io_error(dir, e))?;
    }
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let _ = fs::remove_file(&tmp);
    let written = (|| -> std::io::Result<()> {
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        out.write_all(file.render().as_bytes())?;
        out.sync_all()?;
        // The umask may have taken bits away, never added: set it exactly.
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_error(path, e));
    }
    Ok(())
}

/// What the file looked like when it was last read: a change to any of
/// these means reading it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
    mode: u32,
    uid: u32,
    dir_mode: u32,
    dir_uid: u32,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = fs::symlink_metadata(path).ok()?;
    let d = path.parent().and_then(|d| fs::metadata(d).ok());
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
        ctime: m.ctime(),
        ctime_nsec: m.ctime_nsec(),
        mode: m.mode(),
        uid: m.uid(),
        dir_mode: d.as_ref().map_or(0, MetadataExt::mode),
        dir_uid: d.as_ref().map_or(0, MetadataExt::uid),
    })
}

type Loaded = Result<Arc<TokenFile>, TokenError>;

/// The agent's view of the token file, read again whenever its metadata
/// changes.
pub struct TokenStore {
    path: PathBuf,
    owner: u32,
    cache: Mutex<Option<(Option<Stamp>, Loaded)>>,
}

impl TokenStore {
    /// The file at `path`, which root must own.
    pub fn new(path: PathBuf) -> TokenStore {
        TokenStore::owned_by(path, 0)
    }

    /// The file at `path`, which `owner` must own (tests run it as
    /// themselves).
    pub fn owned_by(path: PathBuf, owner: u32) -> TokenStore {
        TokenStore {
            path,
            owner,
            cache: Mutex::new(None),
        }
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The entries now (blocking: looks at the file). An unsafe or malformed
    /// file is logged once per change and refuses every token.
    pub fn current(&self) -> Loaded {
        let now = stamp(&self.path);
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((seen, loaded)) = cache.as_ref() {
            if *seen == now {
                return loaded.clone();
            }
        }
        let loaded = load(&self.path, self.owner).map(Arc::new);
        match &loaded {
            Ok(file) => tracing::info!(
                path = %self.path.display(),
                tokens = file.entries.len(),
                "reviewer tokens read"
            ),
            Err(e) => tracing::error!(error = %e, "reviewer tokens: the token file is not used"),
        }
        *cache = Some((now, loaded.clone()));
        loaded
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn owner_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().uid()
    }

    fn entry(name: &str, user: &str, token: &str) -> TokenEntry {
        TokenEntry {
            name: name.into(),
            user: user.into(),
            sha256: Sha256::digest(token.as_bytes()).into(),
            created: 1_780_000_000,
        }
    }

    #[test]
    fn a_file_round_trips_and_finds_a_token_by_its_hash() {
        let file = TokenFile {
            entries: vec![
                entry("alice-laptop", "alice", "tgr_a"),
                entry("bob", "bob", "tgr_b"),
            ],
        };
        let text = file.render();
        assert!(text.contains(&format!(
            "alice-laptop:alice:{}:1780000000\n",
            hex::encode(Sha256::digest(b"tgr_a"))
        )));
        // Only hashes: no token text in the file.
        assert!(!text.contains("tgr_a"));
        let parsed = TokenFile::parse(&text, "t").unwrap();
        assert_eq!(parsed, file);
        assert_eq!(parsed.find("tgr_b").unwrap().name, "bob");
        assert_eq!(parsed.find("tgr_a").unwrap().user, "alice");
        assert!(parsed.find("tgr_c").is_none());
        assert!(parsed.find("").is_none());
    }

    #[test]
    fn malformed_lines_are_refused_with_their_line_number() {
        let hash = hex::encode([7u8; 32]);
        #[rustfmt::skip]
        let cases = [
            (format!("a:alice:{hash}\n"), "t:1: 3 fields"),
            (format!("# c\n\na b:alice:{hash}:1\n"), "t:3: \"a b\" is not a token name"),
            (format!("a:al:ice:{hash}:1\n"), "t:1: 5 fields"),
            ("a:alice:abcd:1\n".to_owned(), "t:1: the hash is not 64 hex digits"),
            (format!("a:alice:{hash}:yesterday\n"), "t:1: \"yesterday\" is not a time"),
            (format!("a:-alice:{hash}:1\n"), "t:1: \"-alice\" is not a Unix user name"),
            (format!("a:alice:{hash}:1\na:bob:{hash}:2\n"), "t:2: a second token named \"a\""),
        ];
        for (text, want) in cases {
            let got = TokenFile::parse(&text, "t").unwrap_err().to_string();
            assert!(got.starts_with(want), "{text}: {got}");
        }
        assert_eq!(
            TokenFile::parse("# nothing yet\n\n", "t").unwrap(),
            TokenFile::default()
        );
    }

    #[test]
    fn new_tokens_are_random_prefixed_and_hashed() {
        let (a, hash) = new_token().unwrap();
        let (b, _) = new_token().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("tgr_") && a.len() == 4 + 64, "{a}");
        assert_eq!(hash, <[u8; 32]>::from(Sha256::digest(a.as_bytes())));
    }

    #[test]
    fn constant_time_comparison_is_used_and_correct() {
        let a = [3u8; 32];
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] ^= 1;
        assert!(!constant_time_eq(&a, &b));
        b = a;
        b[0] ^= 0x80;
        assert!(!constant_time_eq(&a, &b));
        // `find` compares through it, never with `==` on the hashes.
        let source = include_str!("tokens.rs");
        let find = source
            .split("pub fn find(")
            .nth(1)
            .and_then(|rest| rest.split("\n    }\n").next())
            .unwrap();
        assert!(find.contains("constant_time_eq(&presented, &entry.sha256)"));
        assert!(!find.contains("=="));
    }

    #[test]
    fn permissions_that_let_others_in_are_refused() {
        assert_eq!(permission_problem(0, 0o100600, 0, false), None);
        assert_eq!(permission_problem(0, 0o100400, 0, false), None);
        assert_eq!(
            permission_problem(1000, 0o100600, 0, false).unwrap(),
            "owned by uid 1000, not by root"
        );
        for mode in [0o100640, 0o100604, 0o100660, 0o100644, 0o100606] {
            assert!(
                permission_problem(0, mode, 0, false)
                    .unwrap()
                    .starts_with("readable or writable by group or others"),
                "{mode:o}"
            );
        }
        // Directories: others may read, not change, unless sticky.
        assert_eq!(permission_problem(0, 0o40755, 0, true), None);
        assert_eq!(permission_problem(0, 0o41777, 0, true), None);
        assert!(permission_problem(0, 0o40775, 0, true).is_some());
        assert!(permission_problem(0, 0o40757, 0, true).is_some());
    }

    #[test]
    fn a_file_others_can_read_is_not_used_and_a_fixed_one_is() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.path().join("reviewer-tokens");
        let me = owner_of(dir.path());
        let store = TokenStore::owned_by(path.clone(), me);
        // No file: no tokens, no error.
        assert!(store.current().unwrap().entries.is_empty());

        let file = TokenFile {
            entries: vec![entry("alice-laptop", "alice", "tgr_a")],
        };
        save(&path, &file).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            store.current().unwrap().find("tgr_a").unwrap().name,
            "alice-laptop"
        );

        // Group-readable: refused, and said why.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let refused = store.current().unwrap_err().to_string();
        assert!(
            refused.contains("readable or writable by group or others (mode 0640)"),
            "{refused}"
        );
        assert!(load(&path, me).is_err());
        // Fixed: used again at the next look.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(store.current().unwrap().find("tgr_a").is_some());

        // Owned by someone else than required: refused.
        let refused = load(&path, me.wrapping_add(1)).unwrap_err().to_string();
        assert!(refused.contains("not by root"), "{refused}");

        // A symbolic link is not followed.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(load(&link, me)
            .unwrap_err()
            .to_string()
            .contains("not a regular file"));

        // A directory others may write in: refused.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let refused = load(&path, me).unwrap_err().to_string();
        assert!(
            refused.contains("the directory is writable by group or others"),
            "{refused}"
        );
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn a_revoked_token_is_refused_at_the_next_look() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reviewer-tokens");
        let store = TokenStore::owned_by(path.clone(), owner_of(dir.path()));
        let mut file = TokenFile {
            entries: vec![entry("a", "alice", "tgr_a"), entry("b", "bob", "tgr_b")],
        };
        save(&path, &file).unwrap();
        assert!(store.current().unwrap().find("tgr_a").is_some());
        file.entries.retain(|e| e.name != "a");
        save(&path, &file).unwrap();
        let now = store.current().unwrap();
        assert!(now.find("tgr_a").is_none());
        assert!(now.find("tgr_b").is_some());
    }
}
