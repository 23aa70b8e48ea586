//! Tollgate's kernel programs.
//!
//! # Layout
//!
//! - `tollgate_connect4` / `tollgate_connect6` (`cgroup/connect4`,
//!   `cgroup/connect6`): decide per `connect()` of a governed process whether
//!   to redirect it to the proxy, deny it (`EPERM`) or let it pass. On redirect
//!   they store the original destination and the caller's identity in
//!   `PENDING` under the socket cookie, then rewrite the destination to the
//!   proxy's loopback listener. With member offsets in `TASK_OFFSETS` they
//!   also record the caller's executable (device, inode) and process start
//!   time, so the agent can tell an `execve` or a reused pid after connect.
//! - `tollgate_sockops` (`sockops`): at `TCP_CONNECT_CB` (source port chosen,
//!   SYN not yet sent) it moves the `PENDING` record to `ORIGINS` under the
//!   client's (address, port), which the proxy reads from `accept()`'s peer
//!   address. It asks for state callbacks and removes the `ORIGINS` entry when
//!   the client socket reaches `TCP_CLOSE`.
//! - `tollgate_sendmsg4` / `tollgate_sendmsg6` (`cgroup/sendmsg4`,
//!   `cgroup/sendmsg6`): decide per `sendmsg()`/`sendto()` with a destination
//!   on an unconnected UDP socket, with the same verdicts as the connect hooks
//!   except that nothing is redirected (the proxy speaks TCP only): a send to
//!   an unlisted destination fails with `EPERM` in deny mode. A UDP socket's
//!   `connect()` is already decided by the connect hooks, and sends on a
//!   connected socket go only where `connect()` allowed.
//! - `tollgate_protect4` / `tollgate_protect6` (`cgroup/connect4`,
//!   `cgroup/connect6`, in `protect`): attached to the cgroup v2 root when
//!   `[protect]` is set; report (and in deny mode refuse) connects to a
//!   protected target that did not come through the redirect.
//! - `tollgate_job_exec` / `tollgate_job_fork` / `tollgate_job_exit` (raw
//!   tracepoints, in `jobs`): the process events of governed cgroups for
//!   the job timeline; the connect hooks add their decided connects.
//!
//! The map layouts, the verdict order and the meaning of every field live in
//! `tollgate-common`; this crate only applies them.
//!
//! Design choices:
//! - One loaded instance has one `CONFIG`: all cgroups it is attached to are
//!   governed in the same mode. A second mode is a second load (own maps).
//! - The programs are idempotent: a destination that already is the proxy
//!   passes untouched, so an old and a new instance attached in sequence (or a
//!   repeated hook) never loop or double-record.
//! - Context fields are read and written one 32-bit word at a time with
//!   volatile accesses, which is what the verifier accepts for these contexts.
//! - Logging (aya-log) happens only on failures, never on the per-connect path.
#![no_std]
#![no_main]

mod jobs;
mod protect;

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, bpf_sock_ops, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task, bpf_get_socket_cookie},
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::error;
use tollgate_common::{
    as_v4_mapped, v4_mapped, ConnectOrigin, OriginKey, RedirectConfig, TargetEntry, TaskOffsets,
    ACTION_DENY, ACTION_PASS, ACTION_REDIRECT, CONFIG_F_DENY_UNLISTED, IPV4_MAPPED_LOOPBACK,
    IPV6_LOOPBACK, ORIGIN_F_INET6, ORIGIN_ID_CAPTURED, ORIGIN_ID_READ_FAILED, STAT_CLOSED,
    STAT_COUNT, STAT_DENIED, STAT_ERRORS, STAT_PASSED, STAT_PUBLISHED, STAT_REDIRECTED,
};

/// Return value of a cgroup/connect or sendmsg hook that lets the call
/// proceed.
const ALLOW: i32 = 1;
/// Return value of a cgroup/connect or sendmsg hook that fails the call with
/// `EPERM`.
const REJECT: i32 = 0;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const DNS_PORT: u16 = 53;

#[map]
static CONFIG: Array<RedirectConfig> = Array::with_max_entries(1, 0);

#[map]
static TARGETS: LpmTrie<[u8; 16], TargetEntry> = LpmTrie::with_max_entries(4096, 0);

#[map]
static RESOLVERS: HashMap<[u8; 16], u32> = HashMap::with_max_entries(64, 0);

#[map]
static PENDING: LruHashMap<u64, ConnectOrigin> = LruHashMap::with_max_entries(16384, 0);

#[map]
static ORIGINS: LruHashMap<OriginKey, ConnectOrigin> = LruHashMap::with_max_entries(65536, 0);

#[map]
static TASK_OFFSETS: Array<TaskOffsets> = Array::with_max_entries(1, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// What a connect hook decided.
enum Verdict {
    Pass,
    Deny,
    /// Redirect to the proxy; carries the rule's target index.
    Redirect(u32),
}

/// What a send hook decided: a datagram is never redirected.
enum SendVerdict {
    Pass,
    Deny,
}

/// Why a hook could not do its job (each is counted in `STAT_ERRORS`).
enum HookError {
    NoConfig,
    NoProxyPort,
    StorePending(i64),
    Comm(i64),
}

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU touches it while we run.
        unsafe { *slot += 1 };
    }
}

/// The verdict for `addr`:`port` (v4-mapped or native IPv6) of a socket of
/// type `sock_type`, with the proxy ports in `config`.
#[inline(always)]
fn decide(config: &RedirectConfig, addr: &[u8; 16], port: u16, sock_type: u32) -> Verdict {
    let v4 = as_v4_mapped(addr);
    // 1. The proxy itself: never redirect again.
    let is_proxy = match v4 {
        Some(ip) => ip == [127, 0, 0, 1] && port == config.proxy_port4,
        None => *addr == IPV6_LOOPBACK && port == config.proxy_port6,
    };
    if is_proxy {
        return Verdict::Pass;
    }
    // 2. Listed destinations.
    let key = Key::new(128, *addr);
    if let Some(entry) = TARGETS.get(&key) {
        if let Some(rule) = entry.find(port) {
            match rule.action {
                ACTION_REDIRECT if sock_type == SOCK_STREAM => {
                    return Verdict::Redirect(rule.target)
                }
                ACTION_DENY => return Verdict::Deny,
                ACTION_PASS => return Verdict::Pass,
                // A redirect rule for a non-TCP socket, or an unknown action:
                // treat as unlisted.
                _ => {}
            }
        }
    }
    // 3. Unlisted.
    let loopback = match v4 {
        Some(ip) => ip[0] == 127,
        None => *addr == IPV6_LOOPBACK,
    };
    if loopback {
        return Verdict::Pass;
    }
    if port == DNS_PORT && RESOLVERS.get_ptr(addr).is_some() {
        return Verdict::Pass;
    }
    if config.flags & CONFIG_F_DENY_UNLISTED != 0 {
        Verdict::Deny
    } else {
        Verdict::Pass
    }
}

/// Stores the origin of a connection about to be redirected under its socket
/// cookie.
#[inline(always)]
fn record_pending(
    ctx: &SockAddrContext,
    dst_addr: [u8; 16],
    dst_port: u16,
    flags: u16,
    target: u32,
) -> Result<(), HookError> {
    // SAFETY: the helper only reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let uid_gid = bpf_get_current_uid_gid();
    let comm = bpf_get_current_comm().map_err(|e| HookError::Comm(e as i64))?;
    let (exe_ino, start_boottime, exe_dev, identity_flags) = task_identity();
    let origin = ConnectOrigin {
        dst_addr,
        dst_port,
        flags,
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        // SAFETY: no arguments; allowed in cgroup/connect hooks.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm,
        target,
        _reserved: 0,
        exe_ino,
        start_boottime,
        exe_dev,
        identity_flags,
    };
    PENDING
        .insert(cookie, origin, 0)
        .map_err(|e| HookError::StorePending(e as i64))
}

/// The caller's executable (inode, start time, device) and `ORIGIN_ID_*`
/// flags, read through the offsets in `TASK_OFFSETS`. Never fails the
/// connect: without offsets nothing is captured, and a failed read is
/// flagged so the agent treats the identity as unverifiable.
#[inline(always)]
fn task_identity() -> (u64, u64, u32, u32) {
    let Some(offsets) = TASK_OFFSETS.get(0) else {
        return (0, 0, 0, 0);
    };
    if offsets.valid != 1 {
        return (0, 0, 0, 0);
    }
    match read_task_identity(offsets) {
        Ok((ino, start, dev)) => (ino, start, dev, ORIGIN_ID_CAPTURED),
        Err(_) => (0, 0, 0, ORIGIN_ID_READ_FAILED),
    }
}

/// `group_leader->start_boottime` of the current task (nanoseconds since
/// boot), when `TASK_OFFSETS` holds the kernel's offsets and the read works.
#[inline(always)]
pub(crate) fn current_start_boottime() -> Option<u64> {
    let offsets = TASK_OFFSETS.get(0)?;
    if offsets.valid != 1 {
        return None;
    }
    // SAFETY: no arguments; returns the current task's address.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let leader: *const u8 = read_at(task, offsets.task_group_leader).ok()?;
    read_at(leader, offsets.task_start_boottime).ok()
}

/// Reads `*(base + offset)` from kernel memory.
#[inline(always)]
fn read_at<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of
    // faulting; the value is plain data (an integer or a pointer).
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize) as *const T) }
}

/// (`mm->exe_file->f_inode->i_ino`, `group_leader->start_boottime`,
/// `f_inode->i_sb->s_dev`) of the current task.
#[inline(always)]
fn read_task_identity(off: &TaskOffsets) -> Result<(u64, u64, u32), i32> {
    // SAFETY: no arguments; returns the current task's address.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let leader: *const u8 = read_at(task, off.task_group_leader)?;
    let start: u64 = read_at(leader, off.task_start_boottime)?;
    let mm: *const u8 = read_at(task, off.task_mm)?;
    if mm.is_null() {
        return Err(-1);
    }
    let exe_file: *const u8 = read_at(mm, off.mm_exe_file)?;
    if exe_file.is_null() {
        return Err(-1);
    }
    let inode: *const u8 = read_at(exe_file, off.file_inode)?;
    if inode.is_null() {
        return Err(-1);
    }
    let ino: u64 = read_at(inode, off.inode_ino)?;
    let sb: *const u8 = read_at(inode, off.inode_sb)?;
    if sb.is_null() {
        return Err(-1);
    }
    let dev: u32 = read_at(sb, off.sb_dev)?;
    Ok((ino, start, dev))
}

/// A connect's verdict into the job timeline (see `jobs`).
#[inline(always)]
fn report_connect(config: &RedirectConfig, addr: &[u8; 16], port: u16, verdict: &Verdict) {
    let (action, target) = match verdict {
        Verdict::Pass => (ACTION_PASS, 0),
        Verdict::Deny => (ACTION_DENY, 0),
        Verdict::Redirect(target) => (ACTION_REDIRECT, *target),
    };
    jobs::report_connect(config, addr, port, action, target);
}

#[inline(always)]
fn config() -> Result<&'static RedirectConfig, HookError> {
    CONFIG.get(0).ok_or(HookError::NoConfig)
}

#[cgroup_sock_addr(connect4)]
pub fn tollgate_connect4(ctx: SockAddrContext) -> i32 {
    finish(&ctx, try_tollgate_connect4(&ctx))
}

fn try_tollgate_connect4(ctx: &SockAddrContext) -> Result<Verdict, HookError> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the context the kernel handed us; one 32-bit read each.
    let (ip4, raw_port, sock_type) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
            read_volatile(addr_of!((*sa).type_)),
        )
    };
    let port = u16::from_be(raw_port as u16);
    let addr = v4_mapped(ip4.to_ne_bytes());
    let config = config()?;
    let verdict = decide(config, &addr, port, sock_type);
    report_connect(config, &addr, port, &verdict);
    if let Verdict::Redirect(target) = verdict {
        if config.proxy_port4 == 0 {
            return Err(HookError::NoProxyPort);
        }
        record_pending(ctx, addr, port, 0, target)?;
        let proxy_ip = u32::from_ne_bytes([127, 0, 0, 1]);
        let proxy_port = u32::from(config.proxy_port4.to_be());
        // SAFETY: writable context fields of connect4; one 32-bit write each.
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip4), proxy_ip);
            write_volatile(addr_of_mut!((*sa).user_port), proxy_port);
        }
    }
    Ok(verdict)
}

#[cgroup_sock_addr(connect6)]
pub fn tollgate_connect6(ctx: SockAddrContext) -> i32 {
    finish(&ctx, try_tollgate_connect6(&ctx))
}

fn try_tollgate_connect6(ctx: &SockAddrContext) -> Result<Verdict, HookError> {
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
    let port = u16::from_be(raw_port as u16);
    let addr = words_to_addr([w0, w1, w2, w3]);
    let config = config()?;
    let verdict = decide(config, &addr, port, sock_type);
    report_connect(config, &addr, port, &verdict);
    if let Verdict::Redirect(target) = verdict {
        let (proxy_addr, proxy_port) = if as_v4_mapped(&addr).is_some() {
            (IPV4_MAPPED_LOOPBACK, config.proxy_port4)
        } else {
            (IPV6_LOOPBACK, config.proxy_port6)
        };
        if proxy_port == 0 {
            return Err(HookError::NoProxyPort);
        }
        record_pending(ctx, addr, port, ORIGIN_F_INET6, target)?;
        let [p0, p1, p2, p3] = addr_to_words(&proxy_addr);
        let proxy_port = u32::from(proxy_port.to_be());
        // SAFETY: writable context fields of connect6; one 32-bit write each.
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), p0);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), p1);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), p2);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), p3);
            write_volatile(addr_of_mut!((*sa).user_port), proxy_port);
        }
    }
    Ok(verdict)
}

/// Maps a connect hook's result to its return value and counts it. Errors
/// deny (fail closed) and are logged.
#[inline(always)]
fn finish(ctx: &SockAddrContext, result: Result<Verdict, HookError>) -> i32 {
    match result {
        Ok(Verdict::Redirect(_)) => {
            count(STAT_REDIRECTED);
            ALLOW
        }
        Ok(Verdict::Pass) => {
            count(STAT_PASSED);
            ALLOW
        }
        Ok(Verdict::Deny) => {
            count(STAT_DENIED);
            REJECT
        }
        Err(e) => {
            count(STAT_ERRORS);
            count(STAT_DENIED);
            match e {
                HookError::NoConfig => error!(ctx, "tollgate: CONFIG[0] missing; denying connect"),
                HookError::NoProxyPort => {
                    error!(
                        ctx,
                        "tollgate: no proxy port for this family; denying connect"
                    )
                }
                HookError::StorePending(code) => {
                    error!(
                        ctx,
                        "tollgate: storing PENDING failed ({}); denying connect", code
                    )
                }
                HookError::Comm(code) => {
                    error!(
                        ctx,
                        "tollgate: bpf_get_current_comm failed ({}); denying connect", code
                    )
                }
            }
            REJECT
        }
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn tollgate_sendmsg4(ctx: SockAddrContext) -> i32 {
    finish_send(&ctx, try_tollgate_sendmsg4(&ctx))
}

fn try_tollgate_sendmsg4(ctx: &SockAddrContext) -> Result<SendVerdict, HookError> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the context the kernel handed us; one 32-bit read each.
    let (ip4, raw_port, sock_type) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
            read_volatile(addr_of!((*sa).type_)),
        )
    };
    let port = u16::from_be(raw_port as u16);
    let addr = v4_mapped(ip4.to_ne_bytes());
    Ok(send_verdict(decide(config()?, &addr, port, sock_type)))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tollgate_sendmsg6(ctx: SockAddrContext) -> i32 {
    finish_send(&ctx, try_tollgate_sendmsg6(&ctx))
}

fn try_tollgate_sendmsg6(ctx: &SockAddrContext) -> Result<SendVerdict, HookError> {
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
    let port = u16::from_be(raw_port as u16);
    let addr = words_to_addr([w0, w1, w2, w3]);
    Ok(send_verdict(decide(config()?, &addr, port, sock_type)))
}

/// A connect verdict applied to a datagram. `decide` redirects only stream
/// sockets, so a redirect here cannot happen; were it to, the send is
/// refused rather than let through unrewritten (fail closed).
#[inline(always)]
fn send_verdict(verdict: Verdict) -> SendVerdict {
    match verdict {
        Verdict::Pass => SendVerdict::Pass,
        Verdict::Deny | Verdict::Redirect(_) => SendVerdict::Deny,
    }
}

/// Maps a send hook's result to its return value. Only refusals and errors
/// are counted: counting every datagram let through would cost each DNS
/// query a map update and drown the connect counters.
#[inline(always)]
fn finish_send(ctx: &SockAddrContext, result: Result<SendVerdict, HookError>) -> i32 {
    match result {
        Ok(SendVerdict::Pass) => ALLOW,
        Ok(SendVerdict::Deny) => {
            count(STAT_DENIED);
            REJECT
        }
        Err(e) => {
            count(STAT_ERRORS);
            count(STAT_DENIED);
            match e {
                HookError::NoConfig => error!(ctx, "tollgate: CONFIG[0] missing; denying send"),
                _ => error!(ctx, "tollgate: the send hook failed; denying send"),
            }
            REJECT
        }
    }
}

#[sock_ops]
pub fn tollgate_sockops(ctx: SockOpsContext) -> u32 {
    match try_tollgate_sockops(&ctx) {
        Ok(()) => 1,
        Err(code) => {
            count(STAT_ERRORS);
            error!(&ctx, "tollgate: sockops failed ({})", code);
            1
        }
    }
}

fn try_tollgate_sockops(ctx: &SockOpsContext) -> Result<(), i64> {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: `ops` is the context the kernel handed us; one 32-bit read.
    let op = unsafe { read_volatile(addr_of!((*ops).op)) };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        publish_origin(ctx, ops)
    } else if op == BPF_SOCK_OPS_STATE_CB {
        // SAFETY: args[1] is the new TCP state at STATE_CB; one 32-bit read.
        let new_state = unsafe { read_volatile(addr_of!((*ops).__bindgen_anon_1.args[1])) };
        if new_state == BPF_TCP_CLOSE {
            let key = origin_key(ops)?;
            if ORIGINS.remove(key).is_ok() {
                count(STAT_CLOSED);
            }
        }
        Ok(())
    } else {
        Ok(())
    }
}

/// At `TCP_CONNECT_CB`: move the connect hook's record to `ORIGINS`.
#[inline(always)]
fn publish_origin(ctx: &SockOpsContext, ops: *mut bpf_sock_ops) -> Result<(), i64> {
    // SAFETY: the helper only reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(pending) = PENDING.get_ptr(cookie) else {
        // Not a connection we redirected.
        return Ok(());
    };
    // SAFETY: map value pointer from a successful lookup; copied out at once.
    let origin = unsafe { *pending };
    let key = origin_key(ops)?;
    ORIGINS.insert(key, origin, 0).map_err(|e| e as i64)?;
    // Best effort: a failed remove leaves an entry the LRU evicts.
    let _ = PENDING.remove(cookie);
    count(STAT_PUBLISHED);
    // Ask for STATE_CB so the entry goes away when the client closes; without
    // it the LRU and the proxy's own removal still bound the map.
    // SAFETY: `ops` is a full TCP socket at TCP_CONNECT_CB.
    let flags = unsafe { read_volatile(addr_of!((*ops).bpf_sock_ops_cb_flags)) };
    ctx.set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .map_err(i64::from)
}

/// The client's (local address, local port) of the socket in `ops`.
#[inline(always)]
fn origin_key(ops: *mut bpf_sock_ops) -> Result<OriginKey, i64> {
    // Every field is read unconditionally, at a constant offset, before
    // branching: otherwise LLVM may select a pointer into the context and the
    // verifier rejects the load ("dereference of modified ctx ptr").
    // SAFETY: `ops` is the context the kernel handed us; one 32-bit read each.
    let (family, local_port, ip4, w0, w1, w2, w3) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_port)),
            read_volatile(addr_of!((*ops).local_ip4)),
            read_volatile(addr_of!((*ops).local_ip6[0])),
            read_volatile(addr_of!((*ops).local_ip6[1])),
            read_volatile(addr_of!((*ops).local_ip6[2])),
            read_volatile(addr_of!((*ops).local_ip6[3])),
        )
    };
    let addr = if family == AF_INET {
        v4_mapped(ip4.to_ne_bytes())
    } else if family == AF_INET6 {
        words_to_addr([w0, w1, w2, w3])
    } else {
        return Err(-(family as i64));
    };
    // local_port is host order (unlike remote_port).
    Ok(OriginKey::new(addr, local_port as u16))
}

/// Four network-order 32-bit words (as the context holds them) as 16 bytes.
#[inline(always)]
fn words_to_addr(w: [u32; 4]) -> [u8; 16] {
    let [a, b, c, d] = [
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    ];
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// 16 bytes as four network-order 32-bit words for the context.
#[inline(always)]
fn addr_to_words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
