//! Types shared by Tollgate's kernel programs (`agent-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]`, `Copy`, and free of pointers, so the same
//! bytes mean the same thing on both sides of an eBPF map. With the `user`
//! feature the types implement `aya::Pod` for userspace map access.
//!
//! # Maps (names as they appear in the ELF object)
//!
//! | name        | kind                | key                         | value              | written by |
//! |-------------|---------------------|-----------------------------|--------------------|------------|
//! | `CONFIG`    | Array, 1 entry      | `u32` index 0               | [`RedirectConfig`] | agent      |
//! | `TARGETS`   | LpmTrie             | `Key<[u8; 16]>` (v4-mapped) | [`TargetEntry`]    | agent      |
//! | `RESOLVERS` | HashMap             | `[u8; 16]` (v4-mapped)      | `u32` (unused, 1)  | agent      |
//! | `PENDING`   | LruHashMap          | `u64` socket cookie         | [`ConnectOrigin`]  | connect4/6 |
//! | `ORIGINS`   | LruHashMap          | [`OriginKey`]               | [`ConnectOrigin`]  | sockops    |
//! | `STATS`     | PerCpuArray         | `u32` index `STAT_*`        | `u64`              | all        |
//! | `PROTECT_CONFIG`  | Array, 1 entry | `u32` index 0            | [`ProtectConfig`]  | agent      |
//! | `PROTECT_TARGETS` | LpmTrie        | `Key<[u8; 16]>` (v4-mapped) | [`TargetEntry`] | agent      |
//! | `PROTECT_EVENTS`  | RingBuf        | -                        | [`ProtectEvent`]   | protect4/6 |
//! | `PROTECT_STATS`   | PerCpuArray    | `u32` index `PROTECT_STAT_*` | `u64`          | protect4/6 |
//! | `TASK_OFFSETS` | Array, 1 entry   | `u32` index 0               | [`TaskOffsets`]    | agent      |
//! | `JOB_OFFSETS`  | Array, 1 entry   | `u32` index 0               | [`JobOffsets`]     | agent      |
//! | `JOB_CGROUPS`  | HashMap          | `u64` cgroup id             | `u32` (unused, 1)  | agent      |
//! | `JOB_EVENTS`   | RingBuf          | -                           | [`JobEvent`], [`JobExecEvent`] | process tracepoints, connect4/6 |
//! | `JOB_STATS`    | PerCpuArray      | `u32` index `JOB_STAT_*`    | `u64`              | same       |
//!
//! Addresses are always 16 bytes in network byte order; IPv4 is stored
//! v4-mapped (`::ffff:a.b.c.d`), so a `TARGETS` prefix for `a.b.c.d/n` has
//! prefix length `96 + n`. Ports are always host byte order.
//!
//! # Verdict order in `connect4`/`connect6`
//!
//! 1. A destination that already is the proxy (`127.0.0.1:proxy_port4`,
//!    `::ffff:127.0.0.1:proxy_port4`, `[::1]:proxy_port6`) passes untouched,
//!    so the redirect can never loop.
//! 2. `TARGETS` longest-prefix match on the address, then the first
//!    [`PortRule`] of that entry whose range holds the port decides: redirect,
//!    deny or pass. Only the longest matching prefix is consulted: when a more
//!    specific prefix is inserted under a broader one, userspace copies the
//!    broader entry's rules into it. Non-TCP sockets are never redirected (a
//!    redirect rule is ignored for them and they fall through to step 3).
//! 3. Unlisted destinations: loopback (`127.0.0.0/8`, `::1`) and port 53 to an
//!    address in `RESOLVERS` pass; anything else is denied (`connect` fails with
//!    `EPERM`) when [`CONFIG_F_DENY_UNLISTED`] is set, and passes otherwise.
//!    Loopback is unlisted only where step 2 found no rule: userspace lists
//!    the ports of targets on this host on loopback too, so those redirect.
//!
//! A redirect to a family whose proxy port is 0 is denied (fail closed), as is
//! a redirect whose origin record cannot be stored.
//!
//! # Protect (`tollgate_protect4`/`tollgate_protect6`, on the cgroup v2 root)
//!
//! A TCP connect whose destination (address, port) matches an
//! `ACTION_REDIRECT` rule in `PROTECT_TARGETS` reached the root without being
//! rewritten to the proxy by a governed cgroup's program (those run first), so
//! it skipped the redirect. Unless the caller is the running agent (its tgid
//! is `ProtectConfig::agent_tgid` and its thread group leader started at
//! `ProtectConfig::agent_start_ticks`: the agent's own upstream connections),
//! it is
//! reported in `PROTECT_EVENTS` and, with [`PROTECT_F_DENY`], refused with
//! `EPERM`. Every other connect passes untouched.
//!
//! # Verdict order in `sendmsg4`/`sendmsg6`
//!
//! The same three steps decide a UDP send with a destination address
//! (`sendto`, `sendmsg` on an unconnected socket). A datagram is never
//! redirected, so a redirect rule falls through to step 3 as for any non-TCP
//! socket: in deny mode a UDP send to a target's address is refused unless
//! it is loopback or DNS to a resolver. Only refusals are counted in
//! `STATS`. A v4-mapped destination is decided as its IPv4 address, whichever
//! of the two hooks sees it (the kernel hands an IPv6 socket's send to a
//! v4-mapped address to its IPv4 path).
#![no_std]

/// How many port rules one `TARGETS` entry holds.
pub const MAX_PORT_RULES: usize = 8;

/// Prefix length of an IPv4 prefix `/n` in the v4-mapped `TARGETS` trie is
/// `IPV4_MAPPED_PREFIX + n`.
pub const IPV4_MAPPED_PREFIX: u32 = 96;

/// `RedirectConfig::flags`: deny (`EPERM`) destinations that no rule lists.
pub const CONFIG_F_DENY_UNLISTED: u32 = 1;

/// `PortRule::action`: rewrite the destination to the proxy.
pub const ACTION_REDIRECT: u16 = 1;
/// `PortRule::action`: refuse the connect with `EPERM`.
pub const ACTION_DENY: u16 = 2;
/// `PortRule::action`: let the connect through unchanged (an allow-list entry
/// in deny-unlisted mode).
pub const ACTION_PASS: u16 = 3;

/// `ConnectOrigin::flags`: the socket is `AF_INET6` (the connect6 hook saw
/// it; its destination may still be v4-mapped).
pub const ORIGIN_F_INET6: u16 = 1;

/// `STATS` index: connects rewritten to the proxy.
pub const STAT_REDIRECTED: u32 = 0;
/// `STATS` index: connects, and UDP sends (`sendmsg4`/`sendmsg6`), refused
/// with `EPERM`.
pub const STAT_DENIED: u32 = 1;
/// `STATS` index: connects let through unchanged.
pub const STAT_PASSED: u32 = 2;
/// `STATS` index: origins published to `ORIGINS` by sockops.
pub const STAT_PUBLISHED: u32 = 3;
/// `STATS` index: `ORIGINS` entries removed because the client socket closed.
pub const STAT_CLOSED: u32 = 4;
/// `STATS` index: internal failures (map update failed, missing config, ...).
pub const STAT_ERRORS: u32 = 5;
/// Number of `STATS` entries.
pub const STAT_COUNT: u32 = 6;

/// The destination a governed process asked for and who asked, captured by the
/// connect hook before the address is rewritten to the proxy.
///
/// Addresses are IPv6 (IPv4 is stored v4-mapped) in network byte order; the
/// port is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectOrigin {
    /// Original destination address, IPv4 stored as `::ffff:a.b.c.d`.
    pub dst_addr: [u8; 16],
    /// Original destination port, host byte order.
    pub dst_port: u16,
    /// `ORIGIN_F_*` flags.
    pub flags: u16,
    /// Thread group id (the process id) of the caller.
    pub tgid: u32,
    /// Real user id of the caller.
    pub uid: u32,
    /// Real group id of the caller.
    pub gid: u32,
    /// cgroup v2 id of the caller at connect time.
    pub cgroup_id: u64,
    /// Thread name of the caller (`comm`), NUL padded.
    pub comm: [u8; 16],
    /// `PortRule::target` of the rule that redirected the connection.
    pub target: u32,
    /// Always zero; makes the size a multiple of 8 with no implicit padding.
    pub _reserved: u32,
    /// Inode number of the caller's executable (`mm->exe_file`) at connect
    /// time; 0 unless [`ORIGIN_ID_CAPTURED`] is set in `identity_flags`.
    pub exe_ino: u64,
    /// The caller's process start time (`group_leader->start_boottime`, ns
    /// since boot); 0 unless captured.
    pub start_boottime: u64,
    /// Kernel device number (`s_dev`, `major << 20 | minor`) of the
    /// executable's filesystem; 0 unless captured.
    pub exe_dev: u32,
    /// `ORIGIN_ID_*` flags.
    pub identity_flags: u32,
}

/// `ConnectOrigin::identity_flags`: `exe_ino`, `exe_dev` and
/// `start_boottime` were read from the calling task.
pub const ORIGIN_ID_CAPTURED: u32 = 1;
/// `ConnectOrigin::identity_flags`: offsets were configured but reading the
/// task failed (the other fields are then zero).
pub const ORIGIN_ID_READ_FAILED: u32 = 2;

/// Value of `TASK_OFFSETS[0]`: byte offsets of the kernel struct members the
/// connect hooks read to capture the caller's executable and start time,
/// found by the agent in the kernel's BTF at load. With `valid` zero the
/// hooks capture nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskOffsets {
    /// 1 when every offset below is set.
    pub valid: u32,
    /// `task_struct.mm`.
    pub task_mm: u32,
    /// `task_struct.group_leader`.
    pub task_group_leader: u32,
    /// `task_struct.start_boottime`.
    pub task_start_boottime: u32,
    /// `mm_struct.exe_file`.
    pub mm_exe_file: u32,
    /// `file.f_inode`.
    pub file_inode: u32,
    /// `inode.i_ino`.
    pub inode_ino: u32,
    /// `inode.i_sb`.
    pub inode_sb: u32,
    /// `super_block.s_dev`.
    pub sb_dev: u32,
    /// Always zero.
    pub _pad: u32,
}

/// Key of `ORIGINS`: the client's end of a redirected connection as the proxy
/// sees it in `accept()`'s peer address.
///
/// `addr` is the peer address (IPv4 v4-mapped) in network byte order, `port`
/// the peer port in host byte order, `_pad` zero. Build it with
/// [`OriginKey::new`] so the padding is always zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OriginKey {
    /// Client (local) address, IPv4 stored as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Client (local) port, host byte order.
    pub port: u16,
    /// Always zero.
    pub _pad: u16,
}

impl OriginKey {
    /// The key for a client at `addr` (16 bytes, v4-mapped for IPv4), `port`.
    pub const fn new(addr: [u8; 16], port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: 0,
        }
    }
}

/// One port range of a `TARGETS` entry and what to do with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRule {
    /// First port of the range, host byte order.
    pub first: u16,
    /// Last port of the range (inclusive), host byte order.
    pub last: u16,
    /// `ACTION_*`.
    pub action: u16,
    /// Always zero.
    pub _pad: u16,
    /// Index of the agent's target this rule belongs to, copied into
    /// `ConnectOrigin::target` on redirect.
    pub target: u32,
}

impl PortRule {
    /// Whether `port` (host order) lies in `first..=last`.
    #[inline(always)]
    pub const fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// Value of `TARGETS`: up to [`MAX_PORT_RULES`] rules for one prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetEntry {
    /// How many leading entries of `rules` are in use.
    pub rule_count: u32,
    /// Always zero.
    pub _pad: u32,
    /// The rules, first match wins.
    pub rules: [PortRule; MAX_PORT_RULES],
}

impl TargetEntry {
    /// The first rule in use whose range holds `port`.
    #[inline(always)]
    pub fn find(&self, port: u16) -> Option<&PortRule> {
        let count = self.rule_count as usize;
        // Fixed bound so the kernel verifier sees a bounded loop (it unrolls).
        let mut i = 0;
        while i < MAX_PORT_RULES {
            if i >= count {
                return None;
            }
            let rule = &self.rules[i];
            if rule.contains(port) {
                return Some(rule);
            }
            i += 1;
        }
        None
    }
}

/// Value of `CONFIG[0]`: how this loaded instance of the programs behaves.
///
/// One loaded object holds one `CONFIG`, so one instance governs all the
/// cgroups it is attached to in the same mode; a second mode means loading the
/// object a second time (with its own maps).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectConfig {
    /// Port of the proxy's `127.0.0.1` listener, host order; 0 = none (IPv4
    /// and v4-mapped redirects are then denied).
    pub proxy_port4: u16,
    /// Port of the proxy's `[::1]` listener, host order; 0 = none (native IPv6
    /// redirects are then denied).
    pub proxy_port6: u16,
    /// `CONFIG_F_*` flags.
    pub flags: u32,
}

/// `ProtectConfig::flags`: refuse (`EPERM`) a connect to a protected target
/// that did not come through the redirect; without it the connect is only
/// reported.
pub const PROTECT_F_DENY: u32 = 1;

/// `ProtectEvent::verdict`: the connect was let through and reported.
pub const PROTECT_VERDICT_AUDIT: u16 = 1;
/// `ProtectEvent::verdict`: the connect was refused with `EPERM`.
pub const PROTECT_VERDICT_DENY: u16 = 2;

/// `PROTECT_STATS` index: connects to a protected target let through and
/// reported (audit mode).
pub const PROTECT_STAT_AUDITED: u32 = 0;
/// `PROTECT_STATS` index: connects to a protected target refused (deny mode).
pub const PROTECT_STAT_DENIED: u32 = 1;
/// `PROTECT_STATS` index: connects to a protected target by the agent itself
/// (its upstream connections), let through unreported.
pub const PROTECT_STAT_EXEMPT: u32 = 2;
/// `PROTECT_STATS` index: events lost because `PROTECT_EVENTS` was full (the
/// verdict was still applied and counted).
pub const PROTECT_STAT_DROPPED: u32 = 3;
/// `PROTECT_STATS` index: connects to a protected target seen while
/// `PROTECT_CONFIG` was missing (let through).
pub const PROTECT_STAT_ERRORS: u32 = 4;
/// Number of `PROTECT_STATS` entries.
pub const PROTECT_STAT_COUNT: u32 = 5;

/// Bytes of the `PROTECT_EVENTS` ring buffer (a power of two, a multiple of
/// the page size): 4096 events of 64 bytes (plus the kernel's 8-byte
/// header each) before the reader must catch up.
pub const PROTECT_EVENTS_BYTES: u32 = 512 * 1024;

/// Value of `PROTECT_CONFIG[0]`: how the root cgroup's protect programs
/// behave.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtectConfig {
    /// `PROTECT_F_*` flags.
    pub flags: u32,
    /// Thread group id (in the initial pid namespace) of the running agent,
    /// whose upstream connections are exempt; 0 = none.
    pub agent_tgid: u32,
    /// The running agent's start, in `USER_HZ` ticks since boot (field 22
    /// of `/proc/<pid>/stat`): a process is the agent only if its thread
    /// group leader started then too, so a process that reuses the pid of
    /// an agent that died is not exempt. 0 = not known (no kernel BTF
    /// offsets): the tgid alone decides.
    pub agent_start_ticks: u64,
}

/// Nanoseconds per `USER_HZ` tick (100 per second on every architecture:
/// part of the user ABI), for comparing a task's `start_boottime` with
/// [`ProtectConfig::agent_start_ticks`].
pub const NANOS_PER_USER_TICK: u64 = 10_000_000;

/// One connect to a protected target that did not come through the
/// redirect, sent to userspace through `PROTECT_EVENTS`.
///
/// Same layout rules as [`ConnectOrigin`]: addresses 16 bytes v4-mapped in
/// network order, port in host order, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtectEvent {
    /// Destination address, IPv4 stored as `::ffff:a.b.c.d`.
    pub dst_addr: [u8; 16],
    /// Destination port, host byte order.
    pub dst_port: u16,
    /// `PROTECT_VERDICT_*`.
    pub verdict: u16,
    /// Thread group id (the process id) of the caller.
    pub tgid: u32,
    /// Real user id of the caller.
    pub uid: u32,
    /// Real group id of the caller.
    pub gid: u32,
    /// cgroup v2 id of the caller at connect time.
    pub cgroup_id: u64,
    /// Thread name of the caller (`comm`), NUL padded.
    pub comm: [u8; 16],
    /// `PortRule::target` of the protected target's rule (index + 1).
    pub target: u32,
    /// Always zero.
    pub _reserved: u32,
}

/// `RedirectConfig::flags`: the connect hooks also report each decided
/// connect (other than to loopback or the proxy) in `JOB_EVENTS`, for the
/// job timeline.
pub const CONFIG_F_JOB_EVENTS: u32 = 2;

/// `JobEvent::kind`: a governed process replaced its image (`execve`); the
/// record is a [`JobExecEvent`].
pub const JOB_EVENT_EXEC: u32 = 1;
/// `JobEvent::kind`: a governed process created a process (not a thread).
pub const JOB_EVENT_FORK: u32 = 2;
/// `JobEvent::kind`: a governed process ended (its thread group leader
/// exited).
pub const JOB_EVENT_EXIT: u32 = 3;
/// `JobEvent::kind`: a governed process's `connect()` was decided.
pub const JOB_EVENT_CONNECT: u32 = 4;

/// `JOB_STATS` index: events written to `JOB_EVENTS`.
pub const JOB_STAT_SENT: u32 = 0;
/// `JOB_STATS` index: events lost because `JOB_EVENTS` was full.
pub const JOB_STAT_DROPPED: u32 = 1;
/// `JOB_STATS` index: kernel reads that failed (fields left zero).
pub const JOB_STAT_READ_ERRORS: u32 = 2;
/// Number of `JOB_STATS` entries.
pub const JOB_STAT_COUNT: u32 = 3;

/// Bytes of the `JOB_EVENTS` ring buffer (a power of two, a multiple of the
/// page size): about 4800 exec records or 50000 others.
pub const JOB_EVENTS_BYTES: u32 = 4 * 1024 * 1024;

/// How far up the cgroup tree the process tracepoints look for a governed
/// ancestor (`bpf_get_current_ancestor_cgroup_id` levels 1 to this).
pub const JOB_MAX_CGROUP_LEVEL: i32 = 16;

/// Bytes of an executable path kept in [`JobExecEvent::filename`].
pub const JOB_FILENAME_BYTES: usize = 256;
/// Bytes of the argument vector kept in [`JobExecEvent::args`] (a power of
/// two: the kernel side masks the length with it minus one).
pub const JOB_ARGS_BYTES: usize = 512;

/// Value of `JOB_OFFSETS[0]`: the kernel struct members the process
/// tracepoints read, found by the agent in BTF. With `valid` zero the
/// tracepoints report nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobOffsets {
    /// 1 when every offset below is set.
    pub valid: u32,
    /// `task_struct.pid` (the thread id).
    pub task_pid: u32,
    /// `task_struct.tgid` (the process id).
    pub task_tgid: u32,
    /// `task_struct.real_parent`.
    pub task_real_parent: u32,
    /// `task_struct.exit_code` (a wait status).
    pub task_exit_code: u32,
    /// `task_struct.mm`.
    pub task_mm: u32,
    /// `mm_struct.arg_start`.
    pub mm_arg_start: u32,
    /// `mm_struct.arg_end`.
    pub mm_arg_end: u32,
    /// `linux_binprm.filename`.
    pub bprm_filename: u32,
    /// Always zero.
    pub _pad: u32,
}

/// One process or connect event of a governed process, sent to userspace
/// through `JOB_EVENTS`. An exec is sent as a [`JobExecEvent`], which
/// starts with this.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobEvent {
    /// `JOB_EVENT_*`.
    pub kind: u32,
    /// Process id (thread group id): the new process for a fork.
    pub pid: u32,
    /// Parent's process id: the forking process for a fork, the real
    /// parent for an exec; 0 otherwise.
    pub ppid: u32,
    /// Real user id of the current task.
    pub uid: u32,
    /// cgroup v2 id of the current task (its own, not the governed
    /// ancestor's).
    pub cgroup_id: u64,
    /// `bpf_ktime_get_boot_ns` at the event.
    pub boot_ns: u64,
    /// Exit: the wait status (`exit_code`); 0 otherwise.
    pub exit_status: u32,
    /// Connect: the verdict (`ACTION_*`); 0 otherwise.
    pub verdict: u16,
    /// Connect: destination port, host byte order.
    pub dst_port: u16,
    /// Connect: `PortRule::target` of a redirect (index + 1), else 0.
    pub target: u32,
    /// Always zero.
    pub _pad: u32,
    /// Connect: destination, IPv4 stored as `::ffff:a.b.c.d`.
    pub dst_addr: [u8; 16],
    /// Thread name of the current task, NUL padded.
    pub comm: [u8; 16],
}

/// An exec event: [`JobEvent`] plus what was executed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobExecEvent {
    /// `kind` is [`JOB_EVENT_EXEC`].
    pub head: JobEvent,
    /// Bytes of `args` that are set.
    pub args_len: u32,
    /// 1 when the argument vector was longer than `args`.
    pub args_truncated: u32,
    /// The path given to `execve`, NUL terminated.
    pub filename: [u8; JOB_FILENAME_BYTES],
    /// The argument vector, each argument NUL terminated.
    pub args: [u8; JOB_ARGS_BYTES],
}

/// `a.b.c.d` (network order bytes) as `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn v4_mapped(ip4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ip4[0], ip4[1], ip4[2], ip4[3],
    ]
}

/// The IPv4 address inside `::ffff:a.b.c.d`, if `addr` is v4-mapped.
#[inline(always)]
pub const fn as_v4_mapped(addr: &[u8; 16]) -> Option<[u8; 4]> {
    if addr[0] == 0
        && addr[1] == 0
        && addr[2] == 0
        && addr[3] == 0
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0xff
        && addr[11] == 0xff
    {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

/// `::1`.
pub const IPV6_LOOPBACK: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// `::ffff:127.0.0.1`, where IPv4 redirects go.
pub const IPV4_MAPPED_LOOPBACK: [u8; 16] = v4_mapped([127, 0, 0, 1]);

#[cfg(feature = "user")]
mod pod {
    #![allow(unsafe_code)]
    // SAFETY (all of them): repr(C), Copy, no pointers, no implicit padding (every
    // gap is an explicit zero field), and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::ConnectOrigin {}
    unsafe impl aya::Pod for super::OriginKey {}
    unsafe impl aya::Pod for super::TargetEntry {}
    unsafe impl aya::Pod for super::RedirectConfig {}
    unsafe impl aya::Pod for super::ProtectConfig {}
    unsafe impl aya::Pod for super::ProtectEvent {}
    unsafe impl aya::Pod for super::TaskOffsets {}
    unsafe impl aya::Pod for super::JobOffsets {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ConnectOrigin>(), 88);
        assert_eq!(size_of::<TaskOffsets>(), 40);
        assert_eq!(align_of::<ConnectOrigin>(), 8);
        assert_eq!(size_of::<OriginKey>(), 20);
        assert_eq!(size_of::<PortRule>(), 12);
        assert_eq!(size_of::<TargetEntry>(), 8 + 12 * MAX_PORT_RULES);
        assert_eq!(size_of::<RedirectConfig>(), 8);
        assert_eq!(size_of::<ProtectConfig>(), 16);
        assert_eq!(size_of::<ProtectEvent>(), 64);
        assert_eq!(align_of::<ProtectEvent>(), 8);
        assert_eq!(size_of::<JobOffsets>(), 40);
        assert_eq!(size_of::<JobEvent>(), 80);
        assert_eq!(
            size_of::<JobExecEvent>(),
            80 + 8 + JOB_FILENAME_BYTES + JOB_ARGS_BYTES
        );
        assert!(JOB_ARGS_BYTES.is_power_of_two());
    }

    #[test]
    fn v4_mapping_round_trips() {
        let mapped = v4_mapped([10, 1, 2, 3]);
        assert_eq!(as_v4_mapped(&mapped), Some([10, 1, 2, 3]));
        assert_eq!(as_v4_mapped(&IPV6_LOOPBACK), None);
        assert_eq!(as_v4_mapped(&IPV4_MAPPED_LOOPBACK), Some([127, 0, 0, 1]));
    }

    #[test]
    fn find_respects_rule_count_and_first_match() {
        let mut entry = TargetEntry::default();
        entry.rules[0] = PortRule {
            first: 5432,
            last: 5432,
            action: ACTION_REDIRECT,
            _pad: 0,
            target: 7,
        };
        entry.rules[1] = PortRule {
            first: 1,
            last: 65535,
            action: ACTION_DENY,
            _pad: 0,
            target: 0,
        };
        assert_eq!(entry.find(5432), None, "rule_count 0 means no rules");
        entry.rule_count = 2;
        assert_eq!(entry.find(5432).map(|r| r.target), Some(7));
        assert_eq!(entry.find(22).map(|r| r.action), Some(ACTION_DENY));
        entry.rule_count = 1;
        assert_eq!(entry.find(22), None);
        entry.rule_count = 100;
        assert_eq!(entry.find(22).map(|r| r.action), Some(ACTION_DENY));
    }
}
