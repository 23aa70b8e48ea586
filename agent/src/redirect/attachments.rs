//! What the kernel says is attached to a cgroup.
//!
//! `tollgate status` must not infer enforcement from pin files: a pin can be
//! removed (detaching its program) while the file tree still looks fine, or
//! a file can outlive what it stood for. So the status asks the kernel, with
//! `BPF_PROG_QUERY` on the cgroup's directory, which programs are attached
//! directly to it at each attach point the redirect uses. aya 0.14 offers
//! this query only for device and lirc programs, hence the raw syscall.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use serde::Serialize;

/// `BPF_PROG_QUERY` from `enum bpf_cmd`.
const BPF_PROG_QUERY: libc::c_long = 16;

/// An attach point of the redirect, as `enum bpf_attach_type` numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum AttachPoint {
    /// `BPF_CGROUP_INET4_CONNECT`.
    Connect4,
    /// `BPF_CGROUP_INET6_CONNECT`.
    Connect6,
    /// `BPF_CGROUP_SOCK_OPS`.
    SockOps,
    /// `BPF_CGROUP_UDP4_SENDMSG`.
    Sendmsg4,
    /// `BPF_CGROUP_UDP6_SENDMSG`.
    Sendmsg6,
}

impl AttachPoint {
    /// All of them, in the order the programs are attached.
    pub(crate) const ALL: [AttachPoint; 5] = [
        AttachPoint::Connect4,
        AttachPoint::Connect6,
        AttachPoint::SockOps,
        AttachPoint::Sendmsg4,
        AttachPoint::Sendmsg6,
    ];

    fn kernel_number(self) -> u32 {
        match self {
            AttachPoint::SockOps => 3,
            AttachPoint::Connect4 => 10,
            AttachPoint::Connect6 => 11,
            AttachPoint::Sendmsg4 => 14,
            AttachPoint::Sendmsg6 => 15,
        }
    }

    /// The name used in the status report.
    pub(crate) fn name(self) -> &'static str {
        match self {
            AttachPoint::Connect4 => "connect4",
            AttachPoint::Connect6 => "connect6",
            AttachPoint::SockOps => "sock_ops",
            AttachPoint::Sendmsg4 => "sendmsg4",
            AttachPoint::Sendmsg6 => "sendmsg6",
        }
    }
}

/// The query part of `union bpf_attr`, laid out as the kernel reads and
/// writes it. The kernel writes `attach_flags`, `prog_cnt` and (since 6.16)
/// `revision` back through the pointer it was given, so the buffer must
/// cover every field up to `revision`; the padding leaves room beyond that.
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
    _reserved: [u64; 8],
}

/// The ids of the programs attached directly to `cgroup` at `point`.
pub(crate) fn attached_program_ids(cgroup: &Path, point: AttachPoint) -> io::Result<Vec<u32>> {
    let dir = File::open(cgroup)?;
    let fd = u32::try_from(dir.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))?;
    // A cgroup rarely has more than a few programs per attach point; on
    // ENOSPC the kernel says how many there are, and one retry suffices
    // unless programs are being attached at that very moment.
    let mut capacity = 16usize;
    for _ in 0..3 {
        let mut ids = vec![0u32; capacity];
        let mut attr = ProgQueryAttr {
            target_fd: fd,
            attach_type: point.kernel_number(),
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: u32::try_from(ids.len()).unwrap_or(u32::MAX),
            ..ProgQueryAttr::default()
        };
        let size = std::mem::size_of::<ProgQueryAttr>() as libc::c_uint;
        // SAFETY: `attr` is a zero-initialised, properly aligned buffer at
        // least as large as the query part of `union bpf_attr`, alive for the
        // call; `prog_ids` points at `ids`, which holds `prog_cnt` u32s and
        // outlives the call, and the kernel writes at most that many. The fd
        // is held open by `dir` for the duration.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &mut attr as *mut ProgQueryAttr,
                size,
            )
        };
        let count = attr.prog_cnt as usize;
        if rc == 0 {
            ids.truncate(count.min(ids.len()));
            return Ok(ids);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSPC) && count > capacity {
            capacity = count;
            continue;
        }
        return Err(e);
    }
    Err(io::Error::other(
        "the programs attached kept changing while being listed",
    ))
}

/// One program the kernel reports attached.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct KernelProgram {
    /// `connect4`, `connect6`, `sock_ops`, `sendmsg4` or `sendmsg6`.
    pub attach_point: String,
    /// The kernel's program id.
    pub id: u32,
    /// The program's name as the kernel keeps it (at most 15 bytes).
    pub name: String,
    /// Whether it is one of this agent's redirect programs (loaded by it,
    /// or behind a link it re-adopted).
    pub ours: bool,
}

/// The kernel's view of one governed cgroup.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct KernelAttachment {
    /// `attached` (ours at every point), `partial`, `detached` (ours at
    /// none), or `unknown` when the kernel could not be asked.
    pub state: String,
    /// Every program attached directly to the cgroup at the redirect's
    /// attach points.
    pub programs: Vec<KernelProgram>,
    /// Why the kernel could not be asked, when `state` is `unknown`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

/// Asks the kernel what is attached to `cgroup`; `ours` are the ids of this
/// agent's programs, `names` the kernel's names by id.
pub(crate) fn kernel_view(
    cgroup: &Path,
    ours: &HashSet<u32>,
    names: &HashMap<u32, String>,
) -> KernelAttachment {
    kernel_view_at(cgroup, &AttachPoint::ALL, ours, names)
}

/// Like [`kernel_view`], at the attach points `points` only: `attached`
/// means ours at each of them.
pub(crate) fn kernel_view_at(
    cgroup: &Path,
    points: &[AttachPoint],
    ours: &HashSet<u32>,
    names: &HashMap<u32, String>,
) -> KernelAttachment {
    let mut programs = Vec::new();
    let mut points_with_ours = 0;
    for &point in points {
        let ids = match attached_program_ids(cgroup, point) {
            Ok(ids) => ids,
            Err(e) => {
                return KernelAttachment {
                    state: "unknown".into(),
                    programs,
                    error: Some(format!(
                        "cannot query the {} programs of {}: {e}",
                        point.name(),
                        cgroup.display()
                    )),
                }
            }
        };
        if ids.iter().any(|id| ours.contains(id)) {
            points_with_ours += 1;
        }
        programs.extend(ids.into_iter().map(|id| KernelProgram {
            attach_point: point.name().into(),
            id,
            name: names.get(&id).cloned().unwrap_or_default(),
            ours: ours.contains(&id),
        }));
    }
    let state = match points_with_ours {
        0 => "detached",
        n if n == points.len() => "attached",
        _ => "partial",
    };
    KernelAttachment {
        state: state.into(),
        programs,
        error: None,
    }
}

/// The kernel's name of every loaded program, by id.
pub(crate) fn program_names() -> HashMap<u32, String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|info| (info.id(), String::from_utf8_lossy(info.name()).into_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_buffer_covers_the_kernels_query_fields() {
        // target_fd..revision is 64 bytes in the kernel's layout.
        assert_eq!(std::mem::offset_of!(ProgQueryAttr, prog_ids), 16);
        assert_eq!(std::mem::offset_of!(ProgQueryAttr, prog_cnt), 24);
        assert_eq!(std::mem::offset_of!(ProgQueryAttr, revision), 56);
        assert!(std::mem::size_of::<ProgQueryAttr>() >= 64);
    }

    #[test]
    fn a_path_that_is_no_cgroup_is_an_error_not_a_panic() {
        let dir = std::env::temp_dir().join("tollgate-no-such-cgroup-for-query");
        assert!(attached_program_ids(&dir, AttachPoint::Connect4).is_err());
    }
}
