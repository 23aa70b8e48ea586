//! The job timeline's kernel side: process events of governed cgroups.
//!
//! - `tollgate_job_exec`, `tollgate_job_fork`, `tollgate_job_exit` (raw
//!   tracepoints `sched_process_exec`, `sched_process_fork`,
//!   `sched_process_exit`): for a task whose cgroup, or an ancestor of it,
//!   is in `JOB_CGROUPS`, send a [`JobEvent`] (an exec as a
//!   [`JobExecEvent`] with the path and the bounded argument vector) to
//!   `JOB_EVENTS`. Threads are left out: a fork counts only when the child
//!   is a new thread group, an exit only when the group leader exits.
//! - [`report_connect`]: the connect hooks' decided connects, into the same
//!   ring buffer when `CONFIG_F_JOB_EVENTS` is set.
//!
//! A full ring buffer never blocks or fails anything: the event is counted
//! in `JOB_STAT_DROPPED`, which the agent records. Forks and exits stop at
//! three quarters full, leaving room for execs and connects. Kernel struct members
//! come from `JOB_OFFSETS` (filled from BTF by the agent); without them the
//! tracepoints send nothing.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id,
            bpf_get_current_task, bpf_ktime_get_boot_ns, bpf_probe_read_user,
        },
    },
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::RawTracePointContext,
};
use tollgate_common::{
    as_v4_mapped, JobEvent, JobExecEvent, JobOffsets, RedirectConfig, CONFIG_F_JOB_EVENTS,
    IPV6_LOOPBACK, JOB_ARGS_BYTES, JOB_EVENTS_BYTES, JOB_EVENT_CONNECT, JOB_EVENT_EXEC,
    JOB_EVENT_EXIT, JOB_EVENT_FORK, JOB_MAX_CGROUP_LEVEL, JOB_STAT_COUNT, JOB_STAT_DROPPED,
    JOB_STAT_READ_ERRORS, JOB_STAT_SENT,
};

#[map]
static JOB_OFFSETS: Array<JobOffsets> = Array::with_max_entries(1, 0);

#[map]
static JOB_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(1024, 0);

#[map]
static JOB_EVENTS: RingBuf = RingBuf::with_byte_size(JOB_EVENTS_BYTES, 0);

#[map]
static JOB_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(JOB_STAT_COUNT, 0);

/// Pending bytes past which a record wakes the agent; below, it finds them
/// on its next poll (`jobs::POLL_EVERY`). A wake-up per record cost a
/// context switch per event, the most of the timeline's cost on a
/// process-heavy job.
const WAKE_AT_BYTES: u64 = JOB_EVENTS_BYTES as u64 / 16;

/// Submission flags: wake the reader only when enough is pending.
#[inline(always)]
fn wakeup_flags() -> u64 {
    if JOB_EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKE_AT_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = JOB_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU touches it while we run.
        unsafe { *slot += 1 };
    }
}

/// The current task's cgroup id when it or an ancestor is governed.
#[inline(always)]
fn governed_cgroup() -> Option<u64> {
    // SAFETY: no arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    if JOB_CGROUPS.get_ptr(&own).is_some() {
        return Some(own);
    }
    let mut level = 1;
    while level <= JOB_MAX_CGROUP_LEVEL {
        // SAFETY: plain integer argument; 0 past the task's own level.
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor == 0 || ancestor == own {
            return None;
        }
        if JOB_CGROUPS.get_ptr(&ancestor).is_some() {
            return Some(own);
        }
        level += 1;
    }
    None
}

#[inline(always)]
fn offsets() -> Option<&'static JobOffsets> {
    let offsets = JOB_OFFSETS.get(0)?;
    (offsets.valid == 1).then_some(offsets)
}

/// Reads `*(base + offset)` from kernel memory.
#[inline(always)]
fn read_at<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of
    // faulting; the value is plain data (an integer or a pointer).
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize) as *const T) }
        .map_err(|e| e as i32)
}

/// The common head of every event, for the current task.
#[inline(always)]
fn head(kind: u32, pid: u32, ppid: u32, cgroup_id: u64) -> JobEvent {
    JobEvent {
        kind,
        pid,
        ppid,
        uid: bpf_get_current_uid_gid() as u32,
        cgroup_id,
        // SAFETY: no arguments.
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        ..JobEvent::default()
    }
}

/// Sends `event`. Forks and exits only while the ring buffer is less than
/// three quarters full: a process storm (a fork bomb) then fills it with
/// those alone up to that mark, and the rest stays for the execs and
/// connects that say what the job did.
#[inline(always)]
fn send(event: JobEvent) {
    if event.kind == JOB_EVENT_FORK || event.kind == JOB_EVENT_EXIT {
        let pending = JOB_EVENTS.query(BPF_RB_AVAIL_DATA as u64);
        if pending > (JOB_EVENTS_BYTES as u64 / 4) * 3 {
            count(JOB_STAT_DROPPED);
            return;
        }
    }
    match JOB_EVENTS.output::<JobEvent>(&event, wakeup_flags()) {
        Ok(()) => count(JOB_STAT_SENT),
        Err(_) => count(JOB_STAT_DROPPED),
    }
}

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct
/// linux_binprm *bprm)`; the current task is `p`.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn tollgate_job_exec(ctx: RawTracePointContext) -> i32 {
    let Some(cgroup_id) = governed_cgroup() else {
        return 0;
    };
    let Some(off) = offsets() else {
        return 0;
    };
    // SAFETY: argument 2 of this tracepoint is the `linux_binprm` pointer.
    let bprm: *const u8 = unsafe { ctx.arg(2) };
    let Some(mut entry) = JOB_EVENTS.reserve::<JobExecEvent>(0) else {
        count(JOB_STAT_DROPPED);
        return 0;
    };
    let event = entry.as_mut_ptr();
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: no arguments; returns the current task's address.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let ppid = read_at::<*const u8>(task, off.task_real_parent)
        .and_then(|parent| read_at::<u32>(parent, off.task_tgid))
        .unwrap_or(0);
    // SAFETY: `event` points at the reserved record, which is ours until
    // submitted; every field is written before submission.
    unsafe {
        (*event).head = head(JOB_EVENT_EXEC, pid, ppid, cgroup_id);
        (*event).args_len = 0;
        (*event).args_truncated = 0;
        (*event).filename[0] = 0;
        (*event).args[0] = 0;
        if let Ok(name) = read_at::<*const u8>(bprm, off.bprm_filename) {
            if bpf_probe_read_kernel_str_bytes(name, &mut (*event).filename).is_err() {
                count(JOB_STAT_READ_ERRORS);
            }
        }
        read_args(task, off, &mut *event);
    }
    entry.submit(wakeup_flags());
    0
}

/// The argument vector of the current task's new image: `mm->arg_start` to
/// `mm->arg_end`, at most `JOB_ARGS_BYTES - 1` bytes. Never past `arg_end`:
/// the environment follows, and it is not recorded.
#[inline(always)]
fn read_args(task: *const u8, off: &JobOffsets, event: &mut JobExecEvent) {
    let Ok(mm) = read_at::<*const u8>(task, off.task_mm) else {
        count(JOB_STAT_READ_ERRORS);
        return;
    };
    if mm.is_null() {
        return;
    }
    let (Ok(start), Ok(end)) = (
        read_at::<u64>(mm, off.mm_arg_start),
        read_at::<u64>(mm, off.mm_arg_end),
    ) else {
        count(JOB_STAT_READ_ERRORS);
        return;
    };
    if end <= start {
        return;
    }
    let mut len = end - start;
    let limit = (JOB_ARGS_BYTES - 1) as u64;
    if len > limit {
        len = limit;
        event.args_truncated = 1;
    }
    // The verifier needs the bound in the instruction itself.
    let len = (len as u32) & (JOB_ARGS_BYTES as u32 - 1);
    if len == 0 {
        return;
    }
    // SAFETY: the destination holds JOB_ARGS_BYTES bytes and `len` is below
    // that; the helper checks the user address and fails instead of faulting.
    let read = unsafe {
        bpf_probe_read_user(
            event.args.as_mut_ptr() as *mut _,
            len,
            start as *const _,
        )
    };
    if read == 0 {
        event.args_len = len;
    } else {
        count(JOB_STAT_READ_ERRORS);
    }
}

/// `sched_process_fork(struct task_struct *parent, struct task_struct
/// *child)`; the current task is the parent.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn tollgate_job_fork(ctx: RawTracePointContext) -> i32 {
    let Some(cgroup_id) = governed_cgroup() else {
        return 0;
    };
    let Some(off) = offsets() else {
        return 0;
    };
    // SAFETY: argument 1 of this tracepoint is the child task.
    let child: *const u8 = unsafe { ctx.arg(1) };
    let (Ok(child_pid), Ok(child_tgid)) = (
        read_at::<u32>(child, off.task_pid),
        read_at::<u32>(child, off.task_tgid),
    ) else {
        count(JOB_STAT_READ_ERRORS);
        return 0;
    };
    if child_pid != child_tgid {
        // A new thread, not a new process.
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    send(head(JOB_EVENT_FORK, child_tgid, parent, cgroup_id));
    0
}

/// `sched_process_exit(struct task_struct *p, ...)`; the current task is
/// `p`.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn tollgate_job_exit(_ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, pid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if tgid != pid {
        return 0;
    }
    let Some(cgroup_id) = governed_cgroup() else {
        return 0;
    };
    let Some(off) = offsets() else {
        return 0;
    };
    // SAFETY: no arguments; returns the current task's address.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let mut event = head(JOB_EVENT_EXIT, tgid, 0, cgroup_id);
    match read_at::<u32>(task, off.task_exit_code) {
        Ok(status) => event.exit_status = status,
        Err(_) => count(JOB_STAT_READ_ERRORS),
    }
    send(event);
    0
}

/// Reports a decided connect of a governed process (the connect hooks run
/// only for those). Loopback destinations that pass are left out: they are
/// local plumbing, not a connection made.
#[inline(always)]
pub(crate) fn report_connect(
    config: &RedirectConfig,
    addr: &[u8; 16],
    port: u16,
    verdict: u16,
    target: u32,
) {
    if config.flags & CONFIG_F_JOB_EVENTS == 0 {
        return;
    }
    let loopback = match as_v4_mapped(addr) {
        Some(ip) => ip[0] == 127,
        None => *addr == IPV6_LOOPBACK,
    };
    if loopback && verdict == tollgate_common::ACTION_PASS {
        return;
    }
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let mut event = head(JOB_EVENT_CONNECT, pid, 0, cgroup_id);
    event.verdict = verdict;
    event.dst_port = port;
    event.target = target;
    event.dst_addr = *addr;
    send(event);
}
