//! Pin directories that only root can change.
//!
//! bpffs is usually mounted mode 1777, so any user may create the pin
//! directory before the agent does. Links pinned into a directory a user
//! owns can be unpinned by that user, which detaches the programs while the
//! agent believes them attached. So every directory the agent pins into, from
//! the pin root down, is made by the agent (mode 0700) or, when it already
//! exists, checked with `lstat` (a symlink is never followed): a directory,
//! owned by root, writable by nobody else. Anything else stops the start.
//!
//! The walk goes top-down and each directory is checked before anything is
//! created inside it, so once a directory passed, no other user can swap
//! what lies below it. Above the pin root, each ancestor must be owned by
//! root and either writable by root alone or sticky (as /sys/fs/bpf and /tmp
//! are), so the pin root itself cannot be renamed away by another user.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// The mode of every directory the agent creates for pins.
pub(crate) const PIN_DIR_MODE: u32 = 0o700;

const GROUP_OR_OTHER_WRITABLE: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// Why a pin directory is refused.
#[derive(Debug, thiserror::Error)]
pub enum PinDirError {
    /// The path exists but is not safe to pin into.
    #[error("refusing pin directory {path}: {problem}; {remedy}")]
    Unsafe {
        /// The offending path.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
        /// What the operator should do.
        remedy: String,
    },
    /// The directory could not be created or inspected.
    #[error("cannot prepare pin directory {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

impl PinDirError {
    fn io(path: &Path, source: io::Error) -> PinDirError {
        PinDirError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The owner a pin directory must have: the user the agent runs as, which
/// is root in every supported set-up. (An agent run as another user fails
/// to load its programs anyway, and must not fail earlier with a misleading
/// complaint about the directories it made itself.)
#[derive(Debug, Clone, Copy)]
pub(crate) struct Owner(pub(crate) u32);

impl Owner {
    /// The agent's effective uid.
    pub(crate) fn agent() -> Owner {
        // SAFETY: geteuid(2) takes no arguments, touches no memory of ours
        // and cannot fail.
        #[allow(unsafe_code)]
        let euid = unsafe { libc::geteuid() };
        Owner(euid)
    }
}

/// Checks the ancestors of the pin root (from `/` down to its parent):
/// owned by root or `owner`, and writable by others only when sticky.
/// Ancestors that do not exist yet are left to [`ensure_secure_dirs`].
pub(crate) fn check_ancestors(pin_root: &Path, owner: Owner) -> Result<(), PinDirError> {
    let Some(parent) = pin_root.parent() else {
        return Ok(());
    };
    let mut path = PathBuf::new();
    for component in parent.components() {
        path.push(component);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(PinDirError::io(&path, e)),
        };
        if meta.file_type().is_symlink() {
            // A symlinked ancestor (such as /var/run) is only as safe as its
            // target; it is trusted when root owns it, as a system link is.
            if meta.uid() != 0 && meta.uid() != owner.0 {
                return Err(unsafe_dir(
                    &path,
                    format!("a symlink owned by uid {}, not root", meta.uid()),
                ));
            }
            continue;
        }
        if meta.uid() != 0 && meta.uid() != owner.0 {
            return Err(unsafe_dir(
                &path,
                format!("owned by uid {}, not root", meta.uid()),
            ));
        }
        let mode = meta.mode();
        if mode & GROUP_OR_OTHER_WRITABLE != 0 && mode & STICKY == 0 {
            return Err(PinDirError::Unsafe {
                path: path.clone(),
                problem: format!(
                    "mode {:04o} lets other users rename what is inside, and it is not sticky",
                    mode & 0o7777
                ),
                remedy: format!(
                    "make it writable by root only (chmod go-w {}) or move redirect.pin_dir",
                    path.display()
                ),
            });
        }
    }
    Ok(())
}

/// Creates `dir` and every missing directory between `pin_root` and it with
/// mode 0700, and checks every one of them, existing or new: a real
/// directory (not a symlink), owned by `owner`, writable by no one else.
/// Existing directories readable by others are tightened to 0700.
/// `dir` must be `pin_root` or lie under it.
pub(crate) fn ensure_secure_dirs(
    pin_root: &Path,
    dir: &Path,
    owner: Owner,
) -> Result<(), PinDirError> {
    let below = dir
        .strip_prefix(pin_root)
        .map_err(|_| PinDirError::Unsafe {
            path: dir.to_path_buf(),
            problem: format!("it is not under the pin root {}", pin_root.display()),
            remedy: "this is a bug in tollgate; please report it".into(),
        })?;
    if let Some(parent) = pin_root.parent() {
        // The mount point and what leads to it are system directories; the
        // agent only creates them when missing, it never loosens them.
        if !parent.as_os_str().is_empty() {
            fs::create_dir_all(parent).map_err(|e| PinDirError::io(parent, e))?;
        }
    }
    secure_one(pin_root, pin_root, owner)?;
    let mut path = pin_root.to_path_buf();
    for component in below.components() {
        match component {
            Component::Normal(name) => path.push(name),
            _ => {
                return Err(PinDirError::Unsafe {
                    path: dir.to_path_buf(),
                    problem: "it contains \"..\" or \".\"".into(),
                    remedy: "set redirect.pin_dir to a plain absolute path".into(),
                })
            }
        }
        secure_one(&path, pin_root, owner)?;
    }
    Ok(())
}

/// Creates one directory (never following a symlink at its name) or checks
/// the one that is there.
fn secure_one(path: &Path, pin_root: &Path, owner: Owner) -> Result<(), PinDirError> {
    // mkdir does not follow a symlink at the last component: if anything is
    // there already, it fails with EEXIST and the lstat below judges it.
    match fs::DirBuilder::new().mode(PIN_DIR_MODE).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(PinDirError::io(path, e)),
    }
    let meta = fs::symlink_metadata(path).map_err(|e| PinDirError::io(path, e))?;
    let remedy = || {
        format!(
            "remove it (rm -r {}) and start again; if another user made it, find out why",
            if path == pin_root {
                path.display().to_string()
            } else {
                pin_root.display().to_string()
            }
        )
    };
    let file_type = meta.file_type();
    if file_type.is_symlink() {
        let target = fs::read_link(path)
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "?".into());
        return Err(PinDirError::Unsafe {
            path: path.to_path_buf(),
            problem: format!("it is a symlink (to {target}), owned by uid {}", meta.uid()),
            remedy: remedy(),
        });
    }
    if !file_type.is_dir() {
        return Err(PinDirError::Unsafe {
            path: path.to_path_buf(),
            problem: format!("it is not a directory (owned by uid {})", meta.uid()),
            remedy: remedy(),
        });
    }
    if meta.uid() != owner.0 {
        return Err(PinDirError::Unsafe {
            path: path.to_path_buf(),
            problem: if owner.0 == 0 {
                format!("owned by uid {}, not root", meta.uid())
            } else {
                format!(
                    "owned by uid {}, not uid {} (the agent's)",
                    meta.uid(),
                    owner.0
                )
            },
            remedy: remedy(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & GROUP_OR_OTHER_WRITABLE != 0 {
        return Err(PinDirError::Unsafe {
            path: path.to_path_buf(),
            problem: format!("mode {mode:04o} lets other users create and remove pins in it"),
            remedy: remedy(),
        });
    }
    if mode != PIN_DIR_MODE {
        // Ours and not writable by others (an older agent made it 0755):
        // tighten it, since it is checked to be a real directory we own.
        fs::set_permissions(path, fs::Permissions::from_mode(PIN_DIR_MODE))
            .map_err(|e| PinDirError::io(path, e))?;
        tracing::info!(dir = %path.display(), from = format!("{mode:04o}"), "tightened a pin directory to mode 0700");
    }
    Ok(())
}

fn unsafe_dir(path: &Path, problem: String) -> PinDirError {
    PinDirError::Unsafe {
        path: path.to_path_buf(),
        problem,
        remedy: "pin under a directory only root controls (set redirect.pin_dir)".into(),
    }
}

/// Whether `dir` is a real directory (not a symlink) owned by `owner` and
/// writable by no one else: one `tollgate detach` may keep.
pub(crate) fn is_private_to(dir: &Path, owner: Owner) -> bool {
    fs::symlink_metadata(dir).is_ok_and(|m| {
        m.file_type().is_dir() && m.uid() == owner.0 && m.mode() & GROUP_OR_OTHER_WRITABLE == 0
    })
}

/// Whether `dir` is writable by users other than its owner, for the start-up
/// warning about a bpffs mounted without `mode=`.
pub(crate) fn world_writable(dir: &Path) -> bool {
    fs::symlink_metadata(dir).is_ok_and(|m| m.mode() & 0o002 != 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn me() -> Owner {
        // The uid running the tests: the owner of a directory it just made.
        let probe = tempfile::tempdir().unwrap();
        Owner(fs::metadata(probe.path()).unwrap().uid())
    }

    fn mode_of(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn creates_every_level_with_mode_0700() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("tollgate");
        let links = root.join("pass/links/1234");
        ensure_secure_dirs(&root, &links, me()).unwrap();
        for p in [&root, &root.join("pass"), &root.join("pass/links"), &links] {
            assert_eq!(mode_of(p), 0o700, "{}", p.display());
        }
        // Again, over what is there: accepted and unchanged.
        ensure_secure_dirs(&root, &links, me()).unwrap();
        assert_eq!(mode_of(&links), 0o700);
    }

    #[test]
    fn tightens_an_own_directory_readable_by_others() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("tollgate");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_secure_dirs(&root, &root, me()).unwrap();
        assert_eq!(mode_of(&root), 0o700);
    }

    #[test]
    fn refuses_a_directory_writable_by_others() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("tollgate");
        let pass = root.join("pass");
        fs::create_dir_all(&pass).unwrap();
        fs::set_permissions(&pass, fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure_secure_dirs(&root, &pass.join("maps"), me()).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "refusing pin directory {}: mode 0777",
                pass.display()
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("rm -r {}", root.display())),
            "{text}"
        );
        assert!(!pass.join("maps").exists(), "nothing made below it");
        // Group-writable is refused too.
        fs::set_permissions(&pass, fs::Permissions::from_mode(0o770)).unwrap();
        assert!(ensure_secure_dirs(&root, &pass, me()).is_err());
    }

    #[test]
    fn refuses_a_directory_of_another_owner() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("tollgate");
        fs::create_dir(&root).unwrap();
        let someone_else = Owner(me().0.wrapping_add(1));
        let e = ensure_secure_dirs(&root, &root.join("pass"), someone_else).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(&format!("owned by uid {}, not uid", me().0)),
            "{text}"
        );
        assert!(!root.join("pass").exists());
        let e = ensure_secure_dirs(&root, &root, Owner(12345)).unwrap_err();
        assert!(matches!(e, PinDirError::Unsafe { ref path, .. } if path == &root));
    }

    #[test]
    fn refuses_a_symlink_at_any_level_without_following_it() {
        let base = tempfile::tempdir().unwrap();
        let elsewhere = base.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o700)).unwrap();

        // The pin root itself.
        let root = base.path().join("tollgate");
        std::os::unix::fs::symlink(&elsewhere, &root).unwrap();
        let e = ensure_secure_dirs(&root, &root.join("pass"), me()).unwrap_err();
        assert!(e.to_string().contains("it is a symlink (to "), "{e}");
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0, "not followed");

        // A level below.
        fs::remove_file(&root).unwrap();
        fs::create_dir_all(root.join("deny")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("deny/links")).unwrap();
        let e = ensure_secure_dirs(&root, &root.join("deny/links/42"), me()).unwrap_err();
        assert!(
            matches!(e, PinDirError::Unsafe { ref path, .. } if path == &root.join("deny/links")),
            "{e}"
        );
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0, "not followed");

        // A dangling symlink is no better.
        fs::remove_file(root.join("deny/links")).unwrap();
        std::os::unix::fs::symlink(base.path().join("nowhere"), root.join("deny/links")).unwrap();
        assert!(ensure_secure_dirs(&root, &root.join("deny/links"), me()).is_err());
        assert!(!base.path().join("nowhere").exists());
    }

    #[test]
    fn refuses_a_file_where_a_directory_belongs() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("tollgate");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("pass"), "").unwrap();
        let e = ensure_secure_dirs(&root, &root.join("pass/maps"), me()).unwrap_err();
        assert!(e.to_string().contains("it is not a directory"), "{e}");
    }

    #[test]
    fn ancestors_must_be_sticky_when_others_may_write() {
        let base = tempfile::tempdir().unwrap();
        let open = base.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let root = open.join("tollgate");
        let e = check_ancestors(&root, me()).unwrap_err();
        assert!(e.to_string().contains("not sticky"), "{e}");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        check_ancestors(&root, me()).unwrap();
        assert!(world_writable(&open));
        assert!(!world_writable(base.path()));
    }

    #[test]
    fn only_an_own_directory_writable_by_no_one_else_is_private() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("d");
        ensure_secure_dirs(&dir, &dir, me()).unwrap();
        assert!(is_private_to(&dir, me()));
        assert!(!is_private_to(&dir, Owner(me().0.wrapping_add(1))));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(!is_private_to(&dir, me()));
        let link = base.path().join("l");
        std::os::unix::fs::symlink(base.path(), &link).unwrap();
        assert!(!is_private_to(&link, me()));
        assert!(!is_private_to(&base.path().join("missing"), me()));
    }

    #[test]
    fn refuses_a_dir_outside_the_root() {
        let base = tempfile::tempdir().unwrap();
        let e = ensure_secure_dirs(&base.path().join("a"), &base.path().join("b"), me());
        assert!(e.is_err());
    }
}
