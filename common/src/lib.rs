//! Types shared by Tollgate's kernel programs (`agent-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]`, `Copy`, and free of pointers, so the same
//! bytes mean the same thing on both sides of an eBPF map. With the `user`
//! feature the types implement `aya::Pod` for userspace map access.
#![no_std]

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
    /// Verdict flags (reserved for the redirect).
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
}

#[cfg(feature = "user")]
#[allow(unsafe_code)]
// SAFETY: ConnectOrigin is repr(C), Copy, has no padding-sensitive invariants and
// every bit pattern is a valid value.
unsafe impl aya::Pod for ConnectOrigin {}
