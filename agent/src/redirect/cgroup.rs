//! cgroup v2 helpers: finding the mount, naming and creating cgroups, and
//! moving processes into them.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The cgroup v2 mount point (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
/// hybrid hosts), read from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_of_type(&mountinfo, "cgroup2")
}

/// The mount point of the first filesystem of `fstype` in a mountinfo text.
pub(crate) fn mount_of_type(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mountpoint options [optional...] - fstype source superopts
        let (left, right) = line.split_once(" - ")?;
        let found_type = right.split_whitespace().next()?;
        (found_type == fstype).then(|| left.split_whitespace().nth(4).map(unescape_mount))?
    })
}

/// mountinfo escapes spaces and a few other bytes as `\ooo`.
fn unescape_mount(s: &str) -> PathBuf {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(char::from(b)),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    PathBuf::from(out)
}

/// Whether a bpf filesystem is mounted exactly at `dir`.
pub fn is_bpffs(dir: &Path) -> bool {
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines().any(|line| {
            line.split_once(" - ").is_some_and(|(left, right)| {
                right.split_whitespace().next() == Some("bpf")
                    && left
                        .split_whitespace()
                        .nth(4)
                        .map(unescape_mount)
                        .as_deref()
                        == Some(dir)
            })
        })
    })
}

/// A cgroup path from the configuration made absolute under the mount.
pub fn resolve(mount: &Path, configured: &Path) -> PathBuf {
    if configured.starts_with(mount) {
        configured.to_path_buf()
    } else {
        let relative = configured.strip_prefix("/").unwrap_or(configured);
        mount.join(relative)
    }
}

/// The cgroup id of a cgroup directory: its inode number, which is what
/// `bpf_get_current_cgroup_id` reports for processes inside it.
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    Ok(fs::metadata(dir)?.ino())
}

/// Moves a process into a cgroup.
pub fn move_pid(dir: &Path, pid: u32) -> io::Result<()> {
    fs::write(dir.join("cgroup.procs"), pid.to_string())
}

/// Whether any process is left in the cgroup or its descendants.
pub fn populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .map(|e| e.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        let hybrid = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
40 22 0:35 / /sys/fs/bpf rw - bpf bpf rw
";
        assert_eq!(
            mount_of_type(hybrid, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            mount_of_type(hybrid, "bpf"),
            Some(PathBuf::from("/sys/fs/bpf"))
        );
        let unified = "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            mount_of_type(unified, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(mount_of_type("garbage\n", "cgroup2"), None);
        let spaced = "31 1 0:27 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            mount_of_type(spaced, "cgroup2"),
            Some(PathBuf::from("/mnt/my cg"))
        );
    }

    #[test]
    fn resolves_relative_and_absolute_paths() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(
            resolve(m, Path::new("ci/jobs")),
            PathBuf::from("/sys/fs/cgroup/ci/jobs")
        );
        assert_eq!(
            resolve(m, Path::new("/ci/jobs")),
            PathBuf::from("/sys/fs/cgroup/ci/jobs")
        );
        assert_eq!(
            resolve(m, Path::new("/sys/fs/cgroup/x")),
            PathBuf::from("/sys/fs/cgroup/x")
        );
    }
}
