//! Exact lookup of one TCP socket through `NETLINK_SOCK_DIAG`.
//!
//! Reading `/proc/net/tcp{,6}` makes the kernel print its whole TCP hash
//! table (milliseconds per file). An `inet_diag_req_v2` without `NLM_F_DUMP`
//! names one 4-tuple instead, and the kernel answers it with one hash lookup
//! (`inet_diag_find_one_icsk`): one `inet_diag_msg` with the socket's uid and
//! inode, or `ENOENT`.
//!
//! The socket id is the 4-tuple as the *client's* socket sees it: source =
//! the client address, destination = the proxy's address. The kernel looks
//! established (and `TIME_WAIT`) sockets up first and then listeners, so an
//! answer whose addresses differ from the request (a listener bound to the
//! client's address) means that no such connection exists.
//!
//! One netlink socket is kept open, behind a mutex; the kernel handles a
//! sock_diag request while it is sent, so the reply is already queued when
//! `send` returns and is read without blocking. Whenever netlink cannot
//! answer (it cannot be opened, e.g. in a restricted sandbox, the kernel
//! lacks `inet_diag`, or a reply is garbled), the caller falls back to
//! `/proc/net`.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

use netlink_packet_core::{
    DecodeError, ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, Parseable, NLMSG_DONE,
    NLMSG_ERROR, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags,
};
use netlink_packet_sock_diag::{SockDiagMessage, SOCK_DIAG_BY_FAMILY};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NetlinkAddr};

use super::socket::{canonical, FoundRow};
use super::IdentityError;

/// `INET_DIAG_NOCOOKIE`: match the socket by its 4-tuple alone.
const NO_COOKIE: [u8; 8] = [0xff; 8];

/// What a `SocketNotFound` error says was searched.
pub(super) const SEARCHED: &str = "the kernel's socket table (NETLINK_SOCK_DIAG)";

/// Large enough for one `inet_diag_msg` with every attribute the kernel adds
/// unasked (a few hundred bytes).
const RECV_BUF: usize = 8192;

/// Datagrams read while waiting for the reply to one request, skipping
/// leftovers of earlier requests.
const MAX_DATAGRAMS: usize = 16;

/// A lazily opened `NETLINK_SOCK_DIAG` socket shared by all lookups.
#[derive(Debug, Default)]
pub(super) struct SockDiag {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
enum State {
    /// Not opened yet, or closed after an I/O error: opened on next use.
    #[default]
    Closed,
    Open(Conn),
    /// The kernel has no `inet_diag`/`tcp_diag`: never tried again.
    Unsupported,
}

#[derive(Debug)]
struct Conn {
    socket: Socket,
    seq: u32,
}

/// The kernel's answer to one request.
#[derive(Debug)]
enum Reply {
    Socket(Box<InetResponseHeader>),
    Done,
    /// `errno` (positive); 0 for a plain acknowledgement.
    Error(i32),
}

/// Why netlink gave no answer; only logged.
#[derive(Debug)]
enum Failure {
    Io(io::Error),
    Decode(DecodeError),
    Unexpected(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Io(e) => write!(f, "{e}"),
            Failure::Decode(e) => write!(f, "cannot decode the reply: {e}"),
            Failure::Unexpected(what) => f.write_str(what),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

impl From<DecodeError> for Failure {
    fn from(e: DecodeError) -> Self {
        Failure::Decode(e)
    }
}

impl SockDiag {
    /// Looks up the socket of `client -> server` (the client's end).
    /// `None` when netlink could not answer and `/proc/net` must be read.
    pub(super) fn find(
        &self,
        client: SocketAddr,
        server: SocketAddr,
    ) -> Option<Result<FoundRow, IdentityError>> {
        let client = canonical(client);
        let server = canonical(server);
        let family = match (client, server) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) => AF_INET,
            (SocketAddr::V6(_), SocketAddr::V6(_)) => AF_INET6,
            _ => return Some(Err(IdentityError::FamilyMismatch { client, server })),
        };
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(*state, State::Closed) {
            match Conn::open() {
                Ok(Ok(conn)) => *state = State::Open(conn),
                Ok(Err(errno)) => {
                    tracing::debug!(
                        "NETLINK_SOCK_DIAG refused an inet request ({}); reading /proc/net/tcp instead",
                        io::Error::from_raw_os_error(errno)
                    );
                    // No handler for inet sockets: the kernel will not grow
                    // one. Anything else (e.g. out of memory) may pass.
                    if matches!(
                        errno,
                        libc::ENOENT | libc::EINVAL | libc::EOPNOTSUPP | libc::EPROTONOSUPPORT
                    ) {
                        *state = State::Unsupported;
                    }
                    return None;
                }
                Err(e) => {
                    tracing::debug!(
                        "cannot open a NETLINK_SOCK_DIAG socket ({e}); reading /proc/net/tcp instead"
                    );
                    return None;
                }
            }
        }
        let State::Open(conn) = &mut *state else {
            return None;
        };
        let request = InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: client.port(),
                destination_port: server.port(),
                source_address: client.ip(),
                destination_address: server.ip(),
                // A socket bound to a device (link-local peers) is found
                // only with that device; an unbound one with any.
                interface_id: match client {
                    SocketAddr::V6(v6) => v6.scope_id(),
                    SocketAddr::V4(_) => 0,
                },
                cookie: NO_COOKIE,
            },
        };
        let reply = match conn.request(NLM_F_REQUEST, request) {
            Ok(reply) => reply,
            Err(e) => {
                tracing::debug!(
                    "NETLINK_SOCK_DIAG lookup of {client} -> {server} failed ({e}); reading /proc/net/tcp instead"
                );
                *state = State::Closed;
                return None;
            }
        };
        drop(state);
        let not_found = || IdentityError::SocketNotFound {
            client,
            server,
            searched: SEARCHED.to_owned(),
        };
        match reply {
            Reply::Socket(msg) => {
                let id = &msg.socket_id;
                let source = canonical(SocketAddr::new(id.source_address, id.source_port));
                let destination =
                    canonical(SocketAddr::new(id.destination_address, id.destination_port));
                // Address and port only: `accept()` may add a scope id.
                let same = |a: SocketAddr, b: SocketAddr| a.ip() == b.ip() && a.port() == b.port();
                if !same(source, client) || !same(destination, server) {
                    // A listener on the client's address, not the connection.
                    Some(Err(not_found()))
                } else if msg.inode == 0 {
                    Some(Err(IdentityError::SocketClosed {
                        client,
                        server,
                        uid: msg.uid,
                    }))
                } else {
                    Some(Ok(FoundRow {
                        uid: msg.uid,
                        inode: u64::from(msg.inode),
                    }))
                }
            }
            Reply::Error(libc::ENOENT) => Some(Err(not_found())),
            other => {
                tracing::debug!(
                    "unexpected NETLINK_SOCK_DIAG reply for {client} -> {server} ({other:?}); reading /proc/net/tcp instead"
                );
                None
            }
        }
    }
}

impl Conn {
    /// Opens the socket and checks that the kernel answers inet requests:
    /// `ENOENT` means "no such socket" only when it does (without
    /// `inet_diag`/`tcp_diag` the kernel answers every request with it).
    /// The probe is a dump of no states, which walks nothing. `Ok(Err(errno))`
    /// when the kernel refused it.
    fn open() -> Result<Result<Conn, i32>, Failure> {
        let socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.connect(&NetlinkAddr::new(0, 0))?;
        let mut conn = Conn { socket, seq: 0 };
        let probe = InetRequest {
            family: AF_INET,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::empty(),
            socket_id: SocketId::new_v4(),
        };
        match conn.request(NLM_F_REQUEST | NLM_F_DUMP, probe)? {
            Reply::Done | Reply::Socket(_) => Ok(Ok(conn)),
            Reply::Error(errno) => Ok(Err(errno)),
        }
    }

    /// Sends one request and returns the first reply message carrying its
    /// sequence number. The kernel answers while handling `send`, so the
    /// reply is read without waiting; an empty queue is an error.
    fn request(&mut self, flags: u16, request: InetRequest) -> Result<Reply, Failure> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut message = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
        message.finalize();
        let mut out = vec![0u8; message.buffer_len()];
        message.serialize(&mut out);
        self.socket.send(&out, 0)?;

        let mut buf = [0u8; RECV_BUF];
        for _ in 0..MAX_DATAGRAMS {
            let len = self
                .socket
                .recv(&mut &mut buf[..], libc::MSG_DONTWAIT)?
                .min(RECV_BUF);
            let mut datagram = buf.get(..len).unwrap_or_default();
            while !datagram.is_empty() {
                let msg = NetlinkBuffer::new_checked(datagram)?;
                let msg_len = msg.length() as usize;
                if msg.sequence_number() == self.seq {
                    match msg.message_type() {
                        NLMSG_ERROR => {
                            let code = ErrorBuffer::new_checked(msg.payload())?.code();
                            return Ok(Reply::Error(code.map_or(0, |c| -c.get())));
                        }
                        NLMSG_DONE => return Ok(Reply::Done),
                        SOCK_DIAG_BY_FAMILY => {
                            let header = InetResponseHeader::parse(msg.payload())?;
                            return Ok(Reply::Socket(Box::new(header)));
                        }
                        _ => {}
                    }
                }
                // Messages are 4-byte aligned within a datagram.
                let next = msg_len.saturating_add(3) & !3;
                datagram = datagram.get(next..).unwrap_or_default();
            }
        }
        Err(Failure::Unexpected(format!(
            "no reply to request {} in {MAX_DATAGRAMS} datagrams",
            self.seq
        )))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::{TcpListener, TcpStream};
    use std::path::Path;

    use super::super::socket::find_row;
    use super::*;

    /// A connected pair on `bind`'s family; `None` when it cannot listen
    /// (no IPv6 loopback).
    fn connection(bind: &str) -> Option<(TcpListener, TcpStream, TcpStream)> {
        let listener = TcpListener::bind(bind).ok()?;
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        Some((listener, client, accepted))
    }

    /// Netlink and `/proc/net` agree on the client end of a live connection
    /// (the proxy side: `accept()`'s peer and its own local address).
    fn agrees_with_proc(bind: &str) -> bool {
        let Some((_listener, client, accepted)) = connection(bind) else {
            return false;
        };
        let peer = accepted.peer_addr().unwrap();
        let local = accepted.local_addr().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let diag = SockDiag::default();
        let via_netlink = diag.find(peer, local).expect("netlink answered").unwrap();
        let via_proc = find_row(Path::new("/proc"), peer, local).unwrap();
        assert_eq!(via_netlink, via_proc, "{peer} -> {local}");
        assert_ne!(via_netlink.inode, 0);
        // The socket is cached: a second lookup answers the same.
        assert_eq!(diag.find(peer, local).unwrap().unwrap(), via_proc);
        // The proxy's own end is another socket.
        let own = diag.find(local, peer).unwrap().unwrap();
        assert_ne!(own.inode, via_netlink.inode);
        true
    }

    #[test]
    fn exact_lookup_matches_proc_net_tcp_ipv4() {
        assert!(agrees_with_proc("127.0.0.1:0"));
    }

    #[test]
    fn exact_lookup_matches_proc_net_tcp6_ipv6() {
        if !agrees_with_proc("[::1]:0") {
            eprintln!("no IPv6 loopback here; skipped");
        }
    }

    /// A proxy on `[::]` sees an IPv4 client v4-mapped; the client's socket
    /// is `AF_INET` and is found all the same.
    #[test]
    fn exact_lookup_of_v4_mapped_addresses() {
        let Ok(listener) = TcpListener::bind("[::]:0") else {
            eprintln!("cannot listen on [::]; skipped");
            return;
        };
        let port = listener.local_addr().unwrap().port();
        let Ok(client) = TcpStream::connect(("127.0.0.1", port)) else {
            eprintln!("[::] does not accept IPv4 here; skipped");
            return;
        };
        let (accepted, peer) = listener.accept().unwrap();
        let local = accepted.local_addr().unwrap();
        assert!(peer.is_ipv6() && local.is_ipv6(), "{peer} {local}");
        assert_eq!(canonical(peer), client.local_addr().unwrap());
        let diag = SockDiag::default();
        let found = diag.find(peer, local).unwrap().unwrap();
        let via_proc = find_row(Path::new("/proc"), peer, local).unwrap();
        assert_eq!(found, via_proc);
    }

    #[test]
    fn missing_four_tuple_is_socket_not_found() {
        let (listener, _client, accepted) = connection("127.0.0.1:0").unwrap();
        let server = accepted.local_addr().unwrap();
        let diag = SockDiag::default();
        // Nothing listens on port 1 and no connection uses it.
        let nowhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let err = diag.find(nowhere, server).unwrap().unwrap_err();
        assert!(matches!(err, IdentityError::SocketNotFound { .. }), "{err}");
        assert!(err.to_string().contains(SEARCHED), "{err}");

        // The client address is a listener's: the kernel answers with the
        // listener, which is not the connection.
        let listening = listener.local_addr().unwrap();
        let err = diag.find(listening, nowhere).unwrap().unwrap_err();
        assert!(matches!(err, IdentityError::SocketNotFound { .. }), "{err}");

        let err = diag
            .find(nowhere, "[::1]:1".parse().unwrap())
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, IdentityError::FamilyMismatch { .. }), "{err}");
    }
}
