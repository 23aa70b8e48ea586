//! Is the process the agent reads at accept the one that connected?
//!
//! The connect hook records the caller's executable (device, inode) and its
//! process start time. Between `connect()` and the agent's `accept()` the
//! process can `execve` another program, or exit and have its pid reused; a
//! `/proc` read at accept would then describe someone else. This module
//! compares the record with `/proc/<pid>` as it is now: the executable's
//! device and inode from `stat` of `/proc/<pid>/exe` (the target file), the
//! start time from field 22 of `/proc/<pid>/stat` (clock ticks since boot,
//! the kernel's `start_boottime` divided down).
//!
//! The hook records the device of the file's superblock (`i_sb->s_dev`);
//! `stat` reports another one on some filesystems (a btrfs subvolume's own
//! device; an overlay's lower layer on another filesystem). The device of
//! the superblock is also read from `/proc/<pid>/mountinfo`, for the mount
//! `statx` says the file is on, and either one matching counts.
//!
//! The comparison is made *after* the rest of the identity was read, so an
//! `execve` racing the reads is seen as a change rather than missed.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::process;
use super::IdentityResolver;

/// What the connect hook captured about the process instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ConnectInstance {
    /// The hook had no member offsets (no kernel BTF): nothing to compare.
    NotCaptured,
    /// The hook had offsets but could not read the task.
    Unreadable,
    /// Read from the task at connect time.
    Captured {
        /// Kernel device number of the executable's filesystem (`s_dev`:
        /// `major << 20 | minor`).
        dev: u32,
        /// Inode number of the executable.
        ino: u64,
        /// `group_leader->start_boottime`, nanoseconds since boot.
        start_boottime_ns: u64,
    },
}

/// The executable and start of a process as one side saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    /// `major:minor` of the executable's filesystem.
    pub exe_dev: String,
    /// Inode number of the executable.
    pub exe_ino: u64,
    /// Process start, clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
}

/// The outcome of comparing connect time with accept time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceVerdict {
    /// Same executable, same process.
    Same,
    /// Another executable or another process than the one that connected.
    Changed,
    /// Could not be compared (the capture failed, or `/proc` could not be
    /// read); executable rules treat it like a change.
    Unverified,
}

/// What the agent knows about the connecting instance, kept with the
/// identity (recordings, log, status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceCheck {
    /// The outcome.
    pub verdict: InstanceVerdict,
    /// What the kernel recorded at connect.
    pub at_connect: Option<InstanceView>,
    /// What `/proc` showed after the identity was read.
    pub at_accept: Option<InstanceView>,
    /// Why, in one line, unless `Same`.
    pub reason: Option<String>,
}

impl InstanceCheck {
    /// Whether executable-based matching (`exe`, `exe_sha256`) may use the
    /// identity: only when the instance was shown to be the same.
    pub fn exe_trusted(&self) -> bool {
        self.verdict == InstanceVerdict::Same
    }
}

/// The userspace `st_dev` encoding (glibc `makedev`) of a kernel `s_dev`.
pub(super) fn kernel_dev_to_user(dev: u32) -> u64 {
    let major = u64::from(dev >> 20);
    let minor = u64::from(dev & 0xf_ffff);
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12) | ((major & !0xfff) << 32)
}

/// `major:minor` of a userspace `st_dev`.
fn dev_name(dev: u64) -> String {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    format!("{major}:{minor}")
}

/// Field 22 (`starttime`) of a `/proc/<pid>/stat` line. The name field may
/// hold spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_start_ticks(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(stat.get(close.checked_add(1)?..)?).ok()?;
    // Field 3 (state) is the first after the name; 22 is the 20th.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Clock ticks per second as `/proc/<pid>/stat` counts them: the kernel's
/// `USER_HZ`, which is 100 on every architecture the agent builds for (it is
/// part of the user ABI, unlike the configurable `HZ`).
fn clock_ticks() -> u64 {
    100
}

/// What `/proc/<pid>` shows of a process now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Observed {
    /// `st_dev` of the executable (userspace encoding).
    pub(super) dev: u64,
    /// The device of the superblock of the mount the executable is on
    /// (`/proc/<pid>/mountinfo`), when it could be read.
    pub(super) superblock_dev: Option<u64>,
    /// `st_ino` of the executable.
    pub(super) ino: u64,
    /// Start, clock ticks since boot.
    pub(super) start: u64,
}

/// Compares a captured instance with what was observed now; `observed` is
/// `Err(reason)` when `/proc` could not be read.
pub(super) fn compare(
    captured: ConnectInstance,
    observed: Result<Observed, String>,
    ticks_per_second: u64,
) -> InstanceCheck {
    let at_accept = observed.as_ref().ok().map(|now| InstanceView {
        exe_dev: dev_name(now.dev),
        exe_ino: now.ino,
        start_ticks: now.start,
    });
    let (dev, ino, start_ns) = match captured {
        ConnectInstance::Captured {
            dev,
            ino,
            start_boottime_ns,
        } => (dev, ino, start_boottime_ns),
        ConnectInstance::NotCaptured | ConnectInstance::Unreadable => {
            let why = if captured == ConnectInstance::Unreadable {
                "the kernel could not read the connecting process's executable at connect"
            } else {
                "nothing was captured at connect (no kernel BTF offsets)"
            };
            return InstanceCheck {
                verdict: InstanceVerdict::Unverified,
                at_connect: None,
                at_accept,
                reason: Some(why.into()),
            };
        }
    };
    let nanos_per_tick = 1_000_000_000 / ticks_per_second.max(1);
    let connect = InstanceView {
        exe_dev: dev_name(kernel_dev_to_user(dev)),
        exe_ino: ino,
        start_ticks: start_ns / nanos_per_tick.max(1),
    };
    let Ok(now) = observed else {
        let why = observed.err().unwrap_or_default();
        return InstanceCheck {
            verdict: InstanceVerdict::Unverified,
            at_connect: Some(connect),
            at_accept: None,
            reason: Some(why),
        };
    };
    let captured_dev = kernel_dev_to_user(dev);
    let same_device = now.dev == captured_dev || now.superblock_dev == Some(captured_dev);
    let reason = if now.start != connect.start_ticks {
        Some(format!(
            "the process started at tick {}, not {} as at connect: its pid was reused",
            now.start, connect.start_ticks
        ))
    } else if !same_device || now.ino != ino {
        Some(format!(
            "the process runs executable {}/{}, not {}/{ino} as at connect: it executed another program after connecting",
            dev_name(now.superblock_dev.unwrap_or(now.dev)),
            now.ino,
            connect.exe_dev
        ))
    } else {
        None
    };
    InstanceCheck {
        verdict: if reason.is_some() {
            InstanceVerdict::Changed
        } else {
            InstanceVerdict::Same
        },
        at_connect: Some(connect),
        at_accept,
        reason,
    }
}

impl IdentityResolver {
    /// Compares process `pid` now with what the connect hook captured. Call
    /// it after the identity was read.
    pub fn check_instance(&self, pid: u32, captured: ConnectInstance) -> InstanceCheck {
        let dir = self.proc_root.join(pid.to_string());
        compare(captured, observe(&dir), clock_ticks())
    }
}

/// The executable and the start of the process in `dir`.
fn observe(dir: &Path) -> Result<Observed, String> {
    let exe = dir.join("exe");
    let meta = std::fs::metadata(&exe)
        .map_err(|e| format!("cannot stat the executable: {}", process::why(&e)))?;
    let stat = process::read_proc_file(&dir.join("stat"))
        .map_err(|e| format!("cannot read the stat: {}", process::why(&e)))?;
    let start = parse_start_ticks(&stat).ok_or("the stat has no start time")?;
    let superblock_dev = mount_id(&exe).and_then(|id| {
        let mountinfo = process::read_proc_file(&dir.join("mountinfo")).ok()?;
        mount_device(&mountinfo, id)
    });
    Ok(Observed {
        dev: meta.dev(),
        superblock_dev,
        ino: meta.ino(),
        start,
    })
}

/// The id of the mount `path` (followed) is on, from `statx`; `None` where
/// the kernel does not report it.
#[allow(unsafe_code)]
fn mount_id(path: &Path) -> Option<u64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `statx` is plain data that the call fills in; the path is a
    // NUL-terminated string that outlives the call.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            0,
            libc::STATX_MNT_ID,
            &mut buf,
        )
    };
    (rc == 0 && buf.stx_mask & libc::STATX_MNT_ID != 0).then_some(buf.stx_mnt_id)
}

/// The device (`major:minor`, the superblock's) of mount `id` in a
/// `mountinfo` text, in userspace encoding.
pub(super) fn mount_device(mountinfo: &[u8], id: u64) -> Option<u64> {
    let text = std::str::from_utf8(mountinfo).ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split_ascii_whitespace();
        let mount: u64 = fields.next()?.parse().ok()?;
        if mount != id {
            return None;
        }
        let (major, minor) = fields.nth(1)?.split_once(':')?;
        Some(libc::makedev(major.parse().ok()?, minor.parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn captured(dev: u32, ino: u64, start_ticks: u64) -> ConnectInstance {
        ConnectInstance::Captured {
            dev,
            ino,
            start_boottime_ns: start_ticks * 10_000_000 + 4_321,
        }
    }

    #[test]
    fn device_numbers_convert_like_the_kernel() {
        // 8:1 (sda1), 259:3 (nvme), 0:45 (tmpfs); and a minor over 255.
        for (major, minor) in [(8u32, 1u32), (259, 3), (0, 45), (253, 300)] {
            let kernel = (major << 20) | minor;
            assert_eq!(
                kernel_dev_to_user(kernel),
                libc::makedev(major, minor),
                "{major}:{minor}"
            );
            assert_eq!(
                dev_name(kernel_dev_to_user(kernel)),
                format!("{major}:{minor}")
            );
        }
    }

    #[test]
    fn start_ticks_come_from_field_22() {
        let line =
            b"4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 50";
        assert_eq!(parse_start_ticks(line), Some(987_654));
        assert_eq!(parse_start_ticks(b"4242 (x) S 1 2 3"), None);
        assert_eq!(parse_start_ticks(b"no parens"), None);
    }

    #[test]
    fn verdicts() {
        let dev = (8 << 20) | 1;
        let user_dev = libc::makedev(8, 1);
        let seen = |dev, superblock_dev, ino, start| {
            Ok(Observed {
                dev,
                superblock_dev,
                ino,
                start,
            })
        };
        let same = compare(captured(dev, 77, 500), seen(user_dev, None, 77, 500), 100);
        assert_eq!(same.verdict, InstanceVerdict::Same);
        assert!(same.exe_trusted());
        assert_eq!(same.reason, None);
        assert_eq!(same.at_connect, same.at_accept);

        let execed = compare(captured(dev, 77, 500), seen(user_dev, None, 78, 500), 100);
        assert_eq!(execed.verdict, InstanceVerdict::Changed);
        assert!(!execed.exe_trusted());
        assert!(execed.reason.unwrap().contains("executed another program"));

        let other_fs = compare(
            captured(dev, 77, 500),
            seen(libc::makedev(0, 45), Some(libc::makedev(0, 46)), 77, 500),
            100,
        );
        assert_eq!(other_fs.verdict, InstanceVerdict::Changed);
        // A btrfs subvolume, an overlay over another filesystem: `stat`
        // reports another device than the superblock's, which the mount
        // shows.
        let subvolume = compare(
            captured(dev, 77, 500),
            seen(libc::makedev(0, 45), Some(user_dev), 77, 500),
            100,
        );
        assert_eq!(subvolume.verdict, InstanceVerdict::Same);
        let subvolume_other_file = compare(
            captured(dev, 77, 500),
            seen(libc::makedev(0, 45), Some(user_dev), 78, 500),
            100,
        );
        assert_eq!(subvolume_other_file.verdict, InstanceVerdict::Changed);

        let reused = compare(captured(dev, 77, 500), seen(user_dev, None, 77, 501), 100);
        assert_eq!(reused.verdict, InstanceVerdict::Changed);
        assert!(reused.reason.unwrap().contains("pid was reused"));

        for not in [ConnectInstance::NotCaptured, ConnectInstance::Unreadable] {
            let c = compare(not, seen(user_dev, None, 77, 500), 100);
            assert_eq!(c.verdict, InstanceVerdict::Unverified);
            assert!(!c.exe_trusted());
        }
        let gone = compare(captured(dev, 77, 500), Err("cannot stat".into()), 100);
        assert_eq!(gone.verdict, InstanceVerdict::Unverified);
        assert_eq!(gone.at_accept, None);
    }

    #[test]
    fn the_device_of_a_mount_is_read_from_mountinfo() {
        let text = b"25 1 0:23 / /sys rw,nosuid - sysfs sysfs rw\n48 27 0:41 / /tmp/o rw,relatime - overlay overlay rw\n1 0 259:3 / / rw - ext4 /dev/vda rw\n";
        assert_eq!(mount_device(text, 48), Some(libc::makedev(0, 41)));
        assert_eq!(mount_device(text, 1), Some(libc::makedev(259, 3)));
        assert_eq!(mount_device(text, 49), None);
        assert_eq!(mount_device(b"garbage", 1), None);
        // This process's own executable: its mount is found.
        let me = Path::new("/proc/self/exe");
        let id = mount_id(me).expect("statx reports mount ids");
        let mountinfo = std::fs::read("/proc/self/mountinfo").unwrap();
        assert!(mount_device(&mountinfo, id).is_some());
    }

    #[test]
    fn this_process_compares_equal_with_itself() {
        let me = std::process::id();
        let dir = Path::new("/proc").join(me.to_string());
        let Observed {
            dev, ino, start, ..
        } = observe(&dir).unwrap();
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let kernel = u32::try_from((major << 20) | minor).unwrap();
        let ticks = clock_ticks();
        let resolver = IdentityResolver::new();
        let check = resolver.check_instance(
            me,
            ConnectInstance::Captured {
                dev: kernel,
                ino,
                start_boottime_ns: start * (1_000_000_000 / ticks),
            },
        );
        assert_eq!(check.verdict, InstanceVerdict::Same, "{check:?}");
    }
}
