//! `tollgate_protect4` / `tollgate_protect6` (`cgroup/connect4`,
//! `cgroup/connect6`), attached to the cgroup v2 root: host-wide detection
//! of connections that skip the redirect.
//!
//! The kernel runs a cgroup's own connect programs before its ancestors',
//! so by the time these run at the root, a governed connection has already
//! been rewritten to the proxy's loopback address and no longer matches a
//! protected target. A connect that still names a protected target came
//! from an ungoverned cgroup, or on a socket created outside a governed
//! cgroup (the governed hooks follow the socket's cgroup, not the caller's).
//! It is reported in `PROTECT_EVENTS` and, in deny mode, refused with
//! `EPERM`. The agent's own upstream connections (its tgid and start time
//! are in `PROTECT_CONFIG`) are let through unreported.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::bpf_get_current_cgroup_id,
    },
    macros::{cgroup_sock_addr, map},
    maps::{lpm_trie::Key, Array, LpmTrie, PerCpuArray, RingBuf},
    programs::SockAddrContext,
};
use tollgate_common::{
    v4_mapped, ProtectConfig, ProtectEvent, TargetEntry, ACTION_REDIRECT, NANOS_PER_USER_TICK,
    PROTECT_EVENTS_BYTES,
    PROTECT_F_DENY, PROTECT_STAT_AUDITED, PROTECT_STAT_COUNT, PROTECT_STAT_DENIED,
    PROTECT_STAT_DROPPED, PROTECT_STAT_ERRORS, PROTECT_STAT_EXEMPT, PROTECT_VERDICT_AUDIT,
    PROTECT_VERDICT_DENY,
};

use crate::{words_to_addr, ALLOW, REJECT, SOCK_STREAM};

#[map]
static PROTECT_CONFIG: Array<ProtectConfig> = Array::with_max_entries(1, 0);

#[map]
static PROTECT_TARGETS: LpmTrie<[u8; 16], TargetEntry> = LpmTrie::with_max_entries(4096, 0);

#[map]
static PROTECT_EVENTS: RingBuf = RingBuf::with_byte_size(PROTECT_EVENTS_BYTES, 0);

#[map]
static PROTECT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROTECT_STAT_COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = PROTECT_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU touches it while we run.
        unsafe { *slot += 1 };
    }
}

/// Whether the current process (whose tgid is the agent's) started when the
/// agent did: after the agent died, another process may get its pid. Where
/// the start is not known (no kernel offsets, or a read that failed, which
/// a process cannot cause), the tgid alone decides.
#[inline(always)]
fn started_as_agent(config: &ProtectConfig) -> bool {
    if config.agent_start_ticks == 0 {
        return true;
    }
    match crate::current_start_boottime() {
        Some(start) => start / NANOS_PER_USER_TICK == config.agent_start_ticks,
        None => true,
    }
}

#[cgroup_sock_addr(connect4)]
pub fn tollgate_protect4(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the context the kernel handed us; one 32-bit read each.
    let (ip4, raw_port, sock_type) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
            read_volatile(addr_of!((*sa).type_)),
        )
    };
    guard(
        &v4_mapped(ip4.to_ne_bytes()),
        u16::from_be(raw_port as u16),
        sock_type,
    )
}

#[cgroup_sock_addr(connect6)]
pub fn tollgate_protect6(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the context the kernel handed us; one 32-bit read each.
    let (w0, w1, w2, w3, raw_port, sock_type) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
            read_volatile(addr_of!((*sa).user_port)),
            read_volatile(addr_of!((*sa).type_)),
        )
    };
    guard(
        &words_to_addr([w0, w1, w2, w3]),
        u16::from_be(raw_port as u16),
        sock_type,
    )
}

/// The verdict for a connect to `addr`:`port` (v4-mapped or native IPv6)
/// that reached the root.
#[inline(always)]
fn guard(addr: &[u8; 16], port: u16, sock_type: u32) -> i32 {
    if sock_type != SOCK_STREAM {
        return ALLOW;
    }
    let Some(entry) = PROTECT_TARGETS.get(&Key::new(128, *addr)) else {
        return ALLOW;
    };
    let target = match entry.find(port) {
        Some(rule) if rule.action == ACTION_REDIRECT => rule.target,
        _ => return ALLOW,
    };
    let Some(config) = PROTECT_CONFIG.get(0) else {
        // The agent fills the config before it attaches; without it the mode
        // is unknown, and refusing every connect to a target host-wide would
        // be worse than letting this one through.
        count(PROTECT_STAT_ERRORS);
        return ALLOW;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if config.agent_tgid != 0 && tgid == config.agent_tgid && started_as_agent(config) {
        count(PROTECT_STAT_EXEMPT);
        return ALLOW;
    }
    let deny = config.flags & PROTECT_F_DENY != 0;
    let uid_gid = bpf_get_current_uid_gid();
    let event = ProtectEvent {
        dst_addr: *addr,
        dst_port: port,
        verdict: if deny {
            PROTECT_VERDICT_DENY
        } else {
            PROTECT_VERDICT_AUDIT
        },
        tgid,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        // SAFETY: no arguments; allowed in cgroup/connect hooks.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        target,
        _reserved: 0,
    };
    if PROTECT_EVENTS.output::<ProtectEvent>(&event, 0).is_err() {
        count(PROTECT_STAT_DROPPED);
    }
    if deny {
        count(PROTECT_STAT_DENIED);
        REJECT
    } else {
        count(PROTECT_STAT_AUDITED);
        ALLOW
    }
}
