//! A PostgreSQL client written by hand on a raw socket, for what real
//! clients do not let a test control: the exact bytes sent, the cancel key
//! received, a CancelRequest with any key.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A StartupMessage (protocol 3.0) for user and database `postgres`.
pub fn startup_packet() -> Vec<u8> {
    let mut body = vec![0, 3, 0, 0];
    for (k, v) in [("user", "postgres"), ("database", "postgres")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// Sends `bytes` on a fresh connection to `addr` and reads until the peer
/// closes it, which must happen promptly.
pub fn send_and_read_to_close(
    addr: impl ToSocketAddrs,
    bytes: &[u8],
    close_write: bool,
) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connecting to send raw bytes");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    if close_write {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let began = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "the peer did not close the connection: {e} after {:?}, got {got:?}",
                began.elapsed()
            ),
        }
    }
    got
}

/// Sends a CancelRequest for (`pid`, `secret`) to `addr`, which must close
/// the connection without an answer, as the protocol says.
pub fn cancel_request(addr: impl ToSocketAddrs, pid: i32, secret: &[u8]) {
    let mut packet = ((12 + secret.len()) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&((1234u32 << 16) | 5678).to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(secret);
    let got = send_and_read_to_close(addr, &packet, false);
    assert!(got.is_empty(), "a CancelRequest gets no answer: {got:?}");
}

/// Reads one backend message: (tag, body).
fn read_message(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut header = [0u8; 5];
    s.read_exact(&mut header)
        .expect("reading a message header from the server");
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let body_len = len
        .checked_sub(4)
        .unwrap_or_else(|| panic!("message {:?} has length {len}, below 4", header[0] as char));
    let mut body = vec![0u8; body_len];
    s.read_exact(&mut body)
        .expect("reading a message body from the server");
    (header[0], body)
}

/// The big-endian i32 at `at` in a message body.
fn i32_at(body: &[u8], at: usize) -> i32 {
    let bytes = body
        .get(at..at + 4)
        .unwrap_or_else(|| panic!("message body too short for an i32 at {at}: {body:?}"));
    i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// The text of `len` bytes at `at` in a message body.
fn text_at(body: &[u8], at: usize, len: usize) -> String {
    text(
        body.get(at..at + len)
            .unwrap_or_else(|| panic!("message body too short for {len} bytes at {at}: {body:?}")),
    )
}

/// One field of an ErrorResponse body (`C` for the SQLSTATE, `M` for the
/// message), empty if absent.
fn error_field(body: &[u8], code: char) -> String {
    text(body)
        .split('\0')
        .find_map(|f| f.strip_prefix(code))
        .unwrap_or_default()
        .to_string()
}

/// A session started by hand over a raw socket (trust authentication).
pub struct RawSession {
    s: TcpStream,
    /// The BackendKeyData the client was given: (pid, secret).
    pub key: (i32, Vec<u8>),
}

impl RawSession {
    /// Connects, starts a session and reads up to the first ReadyForQuery.
    pub fn start(addr: impl ToSocketAddrs) -> RawSession {
        let mut s = TcpStream::connect(addr).expect("connecting to start a session");
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(&startup_packet()).unwrap();
        let mut key = None;
        loop {
            match read_message(&mut s) {
                (b'K', body) => key = Some((i32_at(&body, 0), body[4..].to_vec())),
                (b'Z', _) => break,
                (b'E', body) => panic!("start-up failed: {}", text(&body)),
                _ => {}
            }
        }
        RawSession {
            s,
            key: key.expect("no BackendKeyData"),
        }
    }

    /// Sends a simple Query and returns the first column of each row, or
    /// the error's SQLSTATE as `Err`.
    pub fn query(&mut self, sql: &str) -> Result<Vec<String>, String> {
        self.send_query(sql);
        self.results()
    }

    /// Sends a simple Query without waiting for its results.
    pub fn send_query(&mut self, sql: &str) {
        let mut q = vec![b'Q'];
        q.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        q.extend_from_slice(sql.as_bytes());
        q.push(0);
        self.s.write_all(&q).unwrap();
    }

    /// Reads up to ReadyForQuery: the first column of each row, or the
    /// error's SQLSTATE as `Err`.
    pub fn results(&mut self) -> Result<Vec<String>, String> {
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match read_message(&mut self.s) {
                (b'D', body) => {
                    let len = i32_at(&body, 2);
                    let len = usize::try_from(len).unwrap_or_else(|_| {
                        panic!("first column is NULL or has a negative length: {body:?}")
                    });
                    rows.push(text_at(&body, 6, len));
                }
                (b'E', body) => error = Some(error_field(&body, 'C')),
                (b'Z', _) => break,
                _ => {}
            }
        }
        match error {
            Some(code) => Err(code),
            None => Ok(rows),
        }
    }

    /// Sends a FunctionCall (the fast-path interface) with text arguments
    /// and returns its text result, or the error's (SQLSTATE, message).
    pub fn function_call(
        &mut self,
        oid: u32,
        args: &[&str],
    ) -> Result<Option<String>, (String, String)> {
        let mut body = oid.to_be_bytes().to_vec();
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&(args.len() as i16).to_be_bytes());
        for arg in args {
            body.extend_from_slice(&(arg.len() as i32).to_be_bytes());
            body.extend_from_slice(arg.as_bytes());
        }
        body.extend_from_slice(&0i16.to_be_bytes());
        let mut message = vec![b'F'];
        message.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        message.extend_from_slice(&body);
        self.s.write_all(&message).unwrap();
        let (mut result, mut error) = (None, None);
        loop {
            match read_message(&mut self.s) {
                (b'V', body) => {
                    let len = i32_at(&body, 0);
                    result = usize::try_from(len).ok().map(|len| text_at(&body, 4, len));
                }
                (b'E', body) => error = Some((error_field(&body, 'C'), error_field(&body, 'M'))),
                (b'Z', _) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(result),
        }
    }
}
