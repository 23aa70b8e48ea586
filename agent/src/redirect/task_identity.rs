//! Where the connect hooks find the caller's executable and start time: the
//! kernel struct member offsets, read from BTF at load and written to the
//! `TASK_OFFSETS` map.
//!
//! Without BTF (or with a member missing) the map stays zero, the hooks
//! capture nothing, and the agent identifies the process from `/proc` alone
//! as before; this is logged once per load.

use std::path::Path;

use aya::maps::{Array, MapInfo};
use aya::Ebpf;
use tollgate_common::{ConnectOrigin, TaskOffsets};

use super::btf::Btf;
use super::{classify, RedirectError};

/// The members read, in the order of [`TaskOffsets`]' fields after `valid`.
pub(super) const FIELDS: [(&str, &str); 8] = [
    ("task_struct", "mm"),
    ("task_struct", "group_leader"),
    ("task_struct", "start_boottime"),
    ("mm_struct", "exe_file"),
    ("file", "f_inode"),
    ("inode", "i_ino"),
    ("inode", "i_sb"),
    ("super_block", "s_dev"),
];

/// The offsets of [`FIELDS`] in `btf`, marked valid.
pub(super) fn offsets(btf: &Btf) -> Result<TaskOffsets, String> {
    let [task_mm, task_group_leader, task_start_boottime, mm_exe_file, file_inode, inode_ino, inode_sb, sb_dev] =
        btf.member_offsets(&FIELDS)?;
    Ok(TaskOffsets {
        valid: 1,
        task_mm,
        task_group_leader,
        task_start_boottime,
        mm_exe_file,
        file_inode,
        inode_ino,
        inode_sb,
        sb_dev,
        _pad: 0,
    })
}

/// Writes the running kernel's offsets to `TASK_OFFSETS`, or leaves it zero
/// (capture off) with a warning when BTF cannot give them (`what_is_lost`
/// says what that costs). `true` when written.
pub(super) fn fill(ebpf: &mut Ebpf, what_is_lost: &str) -> Result<bool, RedirectError> {
    let value = match Btf::from_kernel().and_then(|btf| offsets(&btf)) {
        Ok(value) => value,
        Err(why) => {
            tracing::warn!("the kernel's task offsets are not known ({why}): {what_is_lost}");
            return Ok(false);
        }
    };
    let map = ebpf.map_mut("TASK_OFFSETS").ok_or_else(|| {
        RedirectError::Kernel("the embedded object lacks map TASK_OFFSETS".into())
    })?;
    let mut array: Array<_, TaskOffsets> =
        Array::try_from(map).map_err(|e| classify("open map TASK_OFFSETS", e))?;
    array
        .set(0, value, 0)
        .map_err(|e| classify("write map TASK_OFFSETS", e))?;
    Ok(true)
}

/// Refuses origin maps pinned by an agent whose record had another size.
///
/// Pinned maps are re-opened as they are, and the programs pinned with them
/// stay attached; a record of another layout would be cut short or read
/// past its end. Such pins come from an earlier version (the record grew
/// when the executable capture was added): the operator lifts them with
/// `tollgate detach` and starts again.
pub(super) fn check_pinned_origin_layout(maps_dir: &Path) -> Result<(), RedirectError> {
    let expected = u32::try_from(std::mem::size_of::<ConnectOrigin>()).unwrap_or(u32::MAX);
    check_pinned_layout(
        maps_dir,
        &["PENDING", "ORIGINS"],
        expected,
        "origin records",
    )
}

/// Refuses a protect configuration pinned by an agent whose configuration
/// had another size (it grew when the agent's start time was added).
pub(super) fn check_pinned_protect_layout(maps_dir: &Path) -> Result<(), RedirectError> {
    let expected =
        u32::try_from(std::mem::size_of::<tollgate_common::ProtectConfig>()).unwrap_or(u32::MAX);
    check_pinned_layout(
        maps_dir,
        &["PROTECT_CONFIG"],
        expected,
        "protect configurations",
    )
}

fn check_pinned_layout(
    maps_dir: &Path,
    names: &[&str],
    expected: u32,
    what: &str,
) -> Result<(), RedirectError> {
    for name in names {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        // A pin that cannot be read is reported by the load itself.
        let Ok(info) = MapInfo::from_pin(&path) else {
            continue;
        };
        if info.value_size() != expected {
            return Err(RedirectError::Kernel(format!(
                "the pinned map {} holds {}-byte {what}, this agent writes {expected}: it was pinned by another version of the agent; run `tollgate detach` with this configuration (connections of governed processes are refused until the agent runs again) and start the agent again",
                path.display(),
                info.value_size()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_running_kernel_gives_every_offset() {
        let Some(btf) = super::super::btf::kernel_btf_or_skip() else {
            return;
        };
        let o = offsets(&btf).unwrap();
        assert_eq!(o.valid, 1);
        // Distinct members of one struct cannot share an offset.
        assert_ne!(o.task_mm, o.task_group_leader);
        assert_ne!(o.task_mm, o.task_start_boottime);
        assert_ne!(o.inode_ino, o.inode_sb);
        // Pointers and 64-bit counters are 8-byte aligned.
        for off in [
            o.task_mm,
            o.task_group_leader,
            o.task_start_boottime,
            o.mm_exe_file,
            o.file_inode,
            o.inode_ino,
            o.inode_sb,
        ] {
            assert_eq!(off % 8, 0, "{o:?}");
        }
    }
}
