//! `uring-connect MODE SOCKET HOST PORT SQL`: connects to HOST:PORT with an
//! io_uring `IORING_OP_CONNECT` instead of `connect(2)`, then starts a
//! PostgreSQL session on that socket and runs SQL, for tests that check the
//! redirect's connect hooks see connections made this way too.
//!
//! MODE is how the connect is submitted: `plain` (inline, by the
//! submitting thread when it can), `async` (`IOSQE_ASYNC`: always by an
//! io-wq worker thread) or `sqpoll` (`IORING_SETUP_SQPOLL`: the kernel's
//! polling thread submits it, with no `io_uring_enter` from us at all).
//! SOCKET is how the socket is made: `syscall` (`socket(2)`) or `ring`
//! (`IORING_OP_SOCKET`, in the same MODE).
//!
//! It prints one line `connect: ok` or `connect: <errno name>`, then, after
//! a connect, `query: ok <rows>` or `query: error <SQLSTATE>`. The exit
//! status is 0 whenever it could say so; 2 for a setup failure (the line
//! `setup: ...` says which), e.g. a kernel that refuses the ring.
#![allow(clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use tollgate_tests::pg_wire::RawSession;

/// How the connect is handed to the kernel.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Plain,
    Async,
    SqPoll,
}

/// A socket address in the C layout `connect` takes, kept alive until the
/// kernel has read it.
enum RawAddress {
    V4(libc::sockaddr_in),
    V6(libc::sockaddr_in6),
}

impl RawAddress {
    fn new(addr: SocketAddr) -> RawAddress {
        match addr {
            SocketAddr::V4(a) => RawAddress::V4(libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            }),
            SocketAddr::V6(a) => RawAddress::V6(libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            }),
        }
    }

    fn family(&self) -> libc::c_int {
        match self {
            RawAddress::V4(_) => libc::AF_INET,
            RawAddress::V6(_) => libc::AF_INET6,
        }
    }

    fn as_ptr(&self) -> (*const libc::sockaddr, libc::socklen_t) {
        match self {
            RawAddress::V4(a) => (
                (a as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ),
            RawAddress::V6(a) => (
                (a as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            ),
        }
    }
}

/// The symbolic name of an errno, as the tests compare it.
fn errno_name(errno: i32) -> String {
    match errno {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::ECONNREFUSED => "ECONNREFUSED".into(),
        libc::ENETUNREACH => "ENETUNREACH".into(),
        libc::ETIMEDOUT => "ETIMEDOUT".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::ENOSYS => "ENOSYS".into(),
        other => format!("errno {other}"),
    }
}

/// Submits one entry (with `IOSQE_ASYNC` in that mode) and waits for its
/// completion: the operation's result (a negative errno on failure).
#[allow(unsafe_code)]
fn run_one(ring: &mut IoUring, mode: Mode, entry: squeue::Entry) -> Result<i32, String> {
    let entry = if mode == Mode::Async {
        entry.flags(squeue::Flags::ASYNC)
    } else {
        entry
    };
    // SAFETY: whatever the entry points at (an address, a descriptor) is
    // kept alive by the caller until this returns, after the completion.
    unsafe {
        ring.submission()
            .push(&entry)
            .map_err(|e| format!("queueing an entry: {e}"))?;
    }
    ring.submit_and_wait(1)
        .map_err(|e| format!("io_uring_enter: {e}"))?;
    ring.completion()
        .next()
        .map(|c| c.result())
        .ok_or_else(|| "no completion".to_string())
}

/// Creates a TCP socket (by `socket(2)`, or by `IORING_OP_SOCKET` when
/// `socket_by_ring`) and connects it through io_uring; the socket, or the
/// connect's errno.
#[allow(unsafe_code)]
fn connect_via_uring(
    mode: Mode,
    socket_by_ring: bool,
    addr: SocketAddr,
) -> Result<Result<OwnedFd, i32>, String> {
    let mut builder = IoUring::<squeue::Entry, cqueue::Entry>::builder();
    if mode == Mode::SqPoll {
        builder.setup_sqpoll(1000);
    }
    let mut ring = builder
        .build(8)
        .map_err(|e| format!("io_uring_setup ({}): {e}", mode_name(mode)))?;

    let raw = RawAddress::new(addr);
    let socket_type = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    let fd = if socket_by_ring {
        let made = opcode::Socket::new(raw.family(), socket_type, 0).build();
        let fd = run_one(&mut ring, mode, made)?;
        if fd < 0 {
            return Err(format!("IORING_OP_SOCKET: {}", errno_name(-fd)));
        }
        fd
    } else {
        // SAFETY: socket(2) takes no pointers.
        let fd = unsafe { libc::socket(raw.family(), socket_type, 0) };
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        fd
    };
    // SAFETY: `fd` was just created above and is owned only here.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };

    let (ptr, len) = raw.as_ptr();
    let connect = opcode::Connect::new(types::Fd(fd), ptr, len).build();
    // `raw` and `socket` outlive the ring's use of them: run_one returns
    // after the completion.
    let result = run_one(&mut ring, mode, connect)?;
    drop(ring);
    Ok(if result < 0 { Err(-result) } else { Ok(socket) })
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Plain => "plain",
        Mode::Async => "async",
        Mode::SqPoll => "sqpoll",
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, socket_by, host, port, sql] = args.as_slice() else {
        eprintln!("usage: uring-connect plain|async|sqpoll syscall|ring HOST PORT SQL");
        return ExitCode::from(2);
    };
    let socket_by_ring = match socket_by.as_str() {
        "syscall" => false,
        "ring" => true,
        other => {
            eprintln!("unknown way to make the socket {other}");
            return ExitCode::from(2);
        }
    };
    let mode = match mode.as_str() {
        "plain" => Mode::Plain,
        "async" => Mode::Async,
        "sqpoll" => Mode::SqPoll,
        other => {
            eprintln!("unknown mode {other}");
            return ExitCode::from(2);
        }
    };
    let (Ok(ip), Ok(port)) = (host.parse::<IpAddr>(), port.parse::<u16>()) else {
        eprintln!("HOST must be an IP address and PORT a port");
        return ExitCode::from(2);
    };
    let socket = match connect_via_uring(mode, socket_by_ring, SocketAddr::new(ip, port)) {
        Err(setup) => {
            println!("setup: {setup}");
            return ExitCode::from(2);
        }
        Ok(Err(errno)) => {
            println!("connect: {}", errno_name(errno));
            return ExitCode::SUCCESS;
        }
        Ok(Ok(socket)) => socket,
    };
    println!("connect: ok");
    let stream = TcpStream::from(socket);
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("setting a read timeout");
    let mut session = RawSession::over(stream);
    match session.query(sql) {
        Ok(rows) => println!("query: ok {}", rows.join(",")),
        Err(code) => println!("query: error {code}"),
    }
    ExitCode::SUCCESS
}
