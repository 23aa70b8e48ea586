//! The kernel side of the job timeline, as the agent drives it: the struct
//! member offsets the process tracepoints read (from BTF), attaching the
//! tracepoints, telling them which cgroups are governed, and decoding what
//! they send through `JOB_EVENTS`.
//!
//! The tracepoints are not pinned: without an agent reading the ring buffer
//! their events would only be dropped, so they live and die with the agent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::RawTracePoint;
use aya::Ebpf;
use tollgate_common::{
    as_v4_mapped, JobEvent, JobExecEvent, JobOffsets, ACTION_DENY, ACTION_PASS, ACTION_REDIRECT,
    JOB_EVENT_CONNECT, JOB_EVENT_EXEC, JOB_EVENT_EXIT, JOB_EVENT_FORK, JOB_STAT_COUNT,
    JOB_STAT_DROPPED, JOB_STAT_READ_ERRORS, JOB_STAT_SENT,
};

use super::btf::Btf;

/// The members read, in the order of [`JobOffsets`]' fields after `valid`.
const FIELDS: [(&str, &str); 8] = [
    ("task_struct", "pid"),
    ("task_struct", "tgid"),
    ("task_struct", "real_parent"),
    ("task_struct", "exit_code"),
    ("task_struct", "mm"),
    ("mm_struct", "arg_start"),
    ("mm_struct", "arg_end"),
    ("linux_binprm", "filename"),
];

/// The tracepoint programs and the tracepoint each attaches to.
const TRACEPOINTS: [(&str, &str); 3] = [
    ("tollgate_job_exec", "sched_process_exec"),
    ("tollgate_job_fork", "sched_process_fork"),
    ("tollgate_job_exit", "sched_process_exit"),
];

/// The offsets of [`FIELDS`] in `btf`, marked valid.
pub(super) fn offsets(btf: &Btf) -> Result<JobOffsets, String> {
    let [task_pid, task_tgid, task_real_parent, task_exit_code, task_mm, mm_arg_start, mm_arg_end, bprm_filename] =
        btf.member_offsets(&FIELDS)?;
    Ok(JobOffsets {
        valid: 1,
        task_pid,
        task_tgid,
        task_real_parent,
        task_exit_code,
        task_mm,
        mm_arg_start,
        mm_arg_end,
        bprm_filename,
        _pad: 0,
    })
}

/// Fills `JOB_OFFSETS` and attaches the process tracepoints of a freshly
/// loaded object. An error says why the timeline has no process events
/// (no BTF, a kernel without a member); the redirect works on without.
pub(super) fn start(ebpf: &mut Ebpf) -> Result<(), String> {
    let value = Btf::from_kernel().and_then(|btf| offsets(&btf))?;
    let map = ebpf
        .map_mut("JOB_OFFSETS")
        .ok_or("the embedded object lacks map JOB_OFFSETS")?;
    let mut array: Array<_, JobOffsets> =
        Array::try_from(map).map_err(|e| format!("open map JOB_OFFSETS: {e}"))?;
    array
        .set(0, value, 0)
        .map_err(|e| format!("write map JOB_OFFSETS: {e}"))?;
    for (name, tracepoint) in TRACEPOINTS {
        let program: &mut RawTracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| format!("the embedded object lacks program {name}"))?
            .try_into()
            .map_err(|e| format!("program {name}: {e}"))?;
        program
            .load()
            .map_err(|e| format!("load program {name}: {e}"))?;
        program
            .attach(tracepoint)
            .map_err(|e| format!("attach {name} to {tracepoint}: {e}"))?;
    }
    Ok(())
}

/// Tells the process tracepoints that processes in cgroup `id` (and below
/// it) are governed.
pub(super) fn govern(ebpf: &mut Ebpf, id: u64) -> Result<(), String> {
    let map = ebpf
        .map_mut("JOB_CGROUPS")
        .ok_or("the embedded object lacks map JOB_CGROUPS")?;
    let mut cgroups: HashMap<_, u64, u32> =
        HashMap::try_from(map).map_err(|e| format!("open map JOB_CGROUPS: {e}"))?;
    cgroups
        .insert(id, 1, 0)
        .map_err(|e| format!("write map JOB_CGROUPS: {e}"))
}

/// Takes cgroup `id` out of the tracepoints' filter (it went away).
pub(super) fn ungovern(ebpf: &mut Ebpf, id: u64) {
    let Some(map) = ebpf.map_mut("JOB_CGROUPS") else {
        return;
    };
    if let Ok(mut cgroups) = HashMap::<_, u64, u32>::try_from(map) {
        let _ = cgroups.remove(&id);
    }
}

/// The ring buffer the job events arrive in.
pub(super) fn take_events(ebpf: &mut Ebpf) -> Result<RingBuf<MapData>, String> {
    let map = ebpf
        .take_map("JOB_EVENTS")
        .ok_or("the embedded object lacks map JOB_EVENTS")?;
    RingBuf::try_from(map).map_err(|e| format!("open map JOB_EVENTS: {e}"))
}

/// The kernel's counters of job events.
pub(super) fn take_stats(ebpf: &mut Ebpf) -> Result<PerCpuArray<MapData, u64>, String> {
    let map = ebpf
        .take_map("JOB_STATS")
        .ok_or("the embedded object lacks map JOB_STATS")?;
    PerCpuArray::try_from(map).map_err(|e| format!("open map JOB_STATS: {e}"))
}

/// What the kernel counted about job events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct JobEventStats {
    /// Events written to the ring buffer.
    pub sent: u64,
    /// Events lost because the ring buffer was full.
    pub dropped: u64,
    /// Kernel reads that failed (the event went out with fields unset).
    pub read_errors: u64,
}

/// Sums the per-CPU counters.
pub(super) fn read_stats(stats: &PerCpuArray<MapData, u64>) -> JobEventStats {
    let sum = |index: u32| -> u64 {
        stats
            .get(&index, 0)
            .map(|values| values.iter().copied().fold(0u64, u64::wrapping_add))
            .unwrap_or(0)
    };
    debug_assert_eq!(JOB_STAT_COUNT, 3);
    JobEventStats {
        sent: sum(JOB_STAT_SENT),
        dropped: sum(JOB_STAT_DROPPED),
        read_errors: sum(JOB_STAT_READ_ERRORS),
    }
}

/// One event of a governed process, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelJobEvent {
    /// The process (for a fork, the new one).
    pub pid: u32,
    /// Its real user id.
    pub uid: u32,
    /// The cgroup v2 id it ran in.
    pub cgroup_id: u64,
    /// Kernel boot-clock time of the event, in nanoseconds.
    pub boot_ns: u64,
    /// The thread name at the event.
    pub comm: String,
    /// What happened.
    pub what: JobActivity,
}

/// What a governed process did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobActivity {
    /// Replaced its image.
    Exec {
        /// The real parent's process id.
        ppid: u32,
        /// The path given to `execve`.
        filename: String,
        /// The argument vector (lossy UTF-8).
        args: Vec<String>,
        /// The vector was longer than the kernel side keeps.
        args_truncated: bool,
    },
    /// Created process `pid`.
    Fork {
        /// The forking process.
        ppid: u32,
    },
    /// Ended.
    Exit {
        /// The wait status (`exit_code << 8`, or the signal number).
        status: u32,
    },
    /// Its `connect()` was decided.
    Connect {
        /// Where it tried to connect.
        destination: SocketAddr,
        /// `redirect`, `deny` or `pass`.
        verdict: &'static str,
        /// The configured target's index, for a redirect.
        target_index: Option<u32>,
    },
}

/// Decodes one ring buffer record; `None` for a size or kind this agent
/// does not know.
pub fn decode(bytes: &[u8]) -> Option<KernelJobEvent> {
    let head = read_pod::<JobEvent>(bytes)?;
    let what = match head.kind {
        JOB_EVENT_EXEC => {
            if bytes.len() < std::mem::size_of::<JobExecEvent>() {
                return None;
            }
            // Read in place: a copy of the whole record (filename and
            // argument buffers, over a kilobyte) per exec was a visible
            // part of the timeline's cost.
            let field = |offset: usize, len: usize| &bytes[offset..offset + len];
            let u32_at = |offset: usize| {
                let mut word = [0; 4];
                word.copy_from_slice(field(offset, 4));
                u32::from_ne_bytes(word)
            };
            let args = field(
                std::mem::offset_of!(JobExecEvent, args),
                tollgate_common::JOB_ARGS_BYTES,
            );
            let len = usize::try_from(u32_at(std::mem::offset_of!(JobExecEvent, args_len)))
                .unwrap_or(0)
                .min(args.len());
            JobActivity::Exec {
                ppid: head.ppid,
                filename: c_string(field(
                    std::mem::offset_of!(JobExecEvent, filename),
                    tollgate_common::JOB_FILENAME_BYTES,
                )),
                args: split_args(&args[..len]),
                args_truncated: u32_at(std::mem::offset_of!(JobExecEvent, args_truncated)) != 0,
            }
        }
        JOB_EVENT_FORK => JobActivity::Fork { ppid: head.ppid },
        JOB_EVENT_EXIT => JobActivity::Exit {
            status: head.exit_status,
        },
        JOB_EVENT_CONNECT => {
            let ip = match as_v4_mapped(&head.dst_addr) {
                Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
                None => IpAddr::V6(Ipv6Addr::from(head.dst_addr)),
            };
            let (verdict, target_index) = match head.verdict {
                ACTION_REDIRECT => ("redirect", head.target.checked_sub(1)),
                ACTION_DENY => ("deny", None),
                ACTION_PASS => ("pass", None),
                _ => return None,
            };
            JobActivity::Connect {
                destination: SocketAddr::new(ip, head.dst_port),
                verdict,
                target_index,
            }
        }
        _ => return None,
    };
    Some(KernelJobEvent {
        pid: head.pid,
        uid: head.uid,
        cgroup_id: head.cgroup_id,
        boot_ns: head.boot_ns,
        comm: c_string(&head.comm),
        what,
    })
}

/// A `T` from the start of `bytes`, when there are enough of them.
fn read_pod<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the length was checked; `T` is one of the `repr(C)` event
    // types, plain integers and byte arrays for which every bit pattern is
    // valid; the read is unaligned-safe.
    #[allow(unsafe_code)]
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// The text before the first NUL (lossy UTF-8).
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// NUL-separated arguments; a last one cut short is kept as read.
fn split_args(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use tollgate_common::{JOB_ARGS_BYTES, JOB_FILENAME_BYTES};

    fn bytes_of<T>(value: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a repr(C) value without padding.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    fn head(kind: u32) -> JobEvent {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"psql");
        JobEvent {
            kind,
            pid: 42,
            ppid: 7,
            uid: 1000,
            cgroup_id: 99,
            boot_ns: 5,
            comm,
            ..JobEvent::default()
        }
    }

    #[test]
    fn an_exec_decodes_with_its_path_and_arguments() {
        let mut exec = JobExecEvent {
            head: head(JOB_EVENT_EXEC),
            args_len: 0,
            args_truncated: 0,
            filename: [0; JOB_FILENAME_BYTES],
            args: [0; JOB_ARGS_BYTES],
        };
        exec.filename[..13].copy_from_slice(b"/usr/bin/psql");
        let argv = b"psql\0-c\0select 1\0";
        exec.args[..argv.len()].copy_from_slice(argv);
        exec.args_len = argv.len() as u32;
        let event = decode(&bytes_of(&exec)).unwrap();
        assert_eq!(event.pid, 42);
        assert_eq!(event.comm, "psql");
        assert_eq!(
            event.what,
            JobActivity::Exec {
                ppid: 7,
                filename: "/usr/bin/psql".into(),
                args: vec!["psql".into(), "-c".into(), "select 1".into()],
                args_truncated: false,
            }
        );
    }

    #[test]
    fn a_connect_decodes_with_its_destination_and_verdict() {
        let mut event = head(JOB_EVENT_CONNECT);
        event.dst_addr = tollgate_common::v4_mapped([10, 0, 0, 9]);
        event.dst_port = 443;
        event.verdict = ACTION_DENY;
        let decoded = decode(&bytes_of(&event)).unwrap();
        assert_eq!(
            decoded.what,
            JobActivity::Connect {
                destination: "10.0.0.9:443".parse().unwrap(),
                verdict: "deny",
                target_index: None,
            }
        );
        event.verdict = ACTION_REDIRECT;
        event.target = 3;
        let decoded = decode(&bytes_of(&event)).unwrap();
        assert!(matches!(
            decoded.what,
            JobActivity::Connect {
                verdict: "redirect",
                target_index: Some(2),
                ..
            }
        ));
    }

    #[test]
    fn short_records_unknown_kinds_and_oversized_lengths_do_not_panic() {
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&bytes_of(&head(77))), None);
        // An exec head without the exec body is too short.
        assert_eq!(decode(&bytes_of(&head(JOB_EVENT_EXEC))), None);
        let mut exec = JobExecEvent {
            head: head(JOB_EVENT_EXEC),
            args_len: u32::MAX,
            args_truncated: 1,
            filename: [b'x'; JOB_FILENAME_BYTES],
            args: [b'a'; JOB_ARGS_BYTES],
        };
        exec.args[3] = 0;
        let decoded = decode(&bytes_of(&exec)).unwrap();
        let JobActivity::Exec { args, filename, .. } = decoded.what else {
            panic!("not an exec");
        };
        assert_eq!(filename.len(), JOB_FILENAME_BYTES);
        assert_eq!(args.len(), 2);
        assert_eq!(args[0], "aaa");
    }

    #[test]
    fn the_running_kernel_gives_every_offset() {
        let Some(btf) = super::super::btf::kernel_btf_or_skip() else {
            return;
        };
        let o = offsets(&btf).unwrap();
        assert_eq!(o.valid, 1);
        assert_ne!(o.task_pid, o.task_tgid);
        assert_ne!(o.mm_arg_start, o.mm_arg_end);
        for off in [o.task_real_parent, o.task_mm, o.mm_arg_start, o.mm_arg_end] {
            assert_eq!(off % 8, 0, "{o:?}");
        }
    }
}
