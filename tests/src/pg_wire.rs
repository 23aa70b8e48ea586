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
        RawSession::over(TcpStream::connect(addr).expect("connecting to start a session"))
    }

    /// Starts a session on a connection made some other way (io_uring, a
    /// descriptor passed from another process, ...).
    pub fn over(mut s: TcpStream) -> RawSession {
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

    /// Sends raw bytes (messages built with [`message`] and the helpers
    /// below), in one write.
    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// Reads messages until the `syncs`-th ReadyForQuery: every message as
    /// (tag, body), the ReadyForQuerys included.
    pub fn read_until_ready(&mut self, syncs: usize) -> Vec<(u8, Vec<u8>)> {
        let mut got = Vec::new();
        let mut seen = 0;
        while seen < syncs {
            let (tag, body) = read_message(&mut self.s);
            if tag == b'Z' {
                seen += 1;
            }
            got.push((tag, body));
        }
        got
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

/// One frontend message: `tag`, its length, `body`.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// A simple Query.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, sql);
    message(b'Q', &body)
}

/// A Parse of statement `name` without parameter types.
pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, name);
    cstr(&mut body, sql);
    body.extend_from_slice(&0i16.to_be_bytes());
    message(b'P', &body)
}

/// A Bind of `statement` to `portal` with text parameters and results.
pub fn bind(portal: &str, statement: &str, params: &[&str]) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, portal);
    cstr(&mut body, statement);
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        body.extend_from_slice(&(p.len() as i32).to_be_bytes());
        body.extend_from_slice(p.as_bytes());
    }
    body.extend_from_slice(&0i16.to_be_bytes());
    message(b'B', &body)
}

/// A Describe of portal `portal`.
pub fn describe_portal(portal: &str) -> Vec<u8> {
    let mut body = vec![b'P'];
    cstr(&mut body, portal);
    message(b'D', &body)
}

/// An Execute of `portal`, all rows.
pub fn execute(portal: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, portal);
    body.extend_from_slice(&0i32.to_be_bytes());
    message(b'E', &body)
}

/// Sync.
pub fn sync() -> Vec<u8> {
    message(b'S', &[])
}

/// Flush.
pub fn flush() -> Vec<u8> {
    message(b'H', &[])
}

/// The first column of every DataRow in `messages`, as text (`None` for
/// NULL).
pub fn first_column(messages: &[(u8, Vec<u8>)]) -> Vec<Option<String>> {
    messages
        .iter()
        .filter(|(tag, _)| *tag == b'D')
        .map(|(_, body)| {
            let len = i32_at(body, 2);
            usize::try_from(len).ok().map(|len| text_at(body, 6, len))
        })
        .collect()
}

/// Every field of every DataRow in `messages`, `|`-joined per row (NULL
/// as the empty string), as psql's unaligned output shows them.
pub fn rows(messages: &[(u8, Vec<u8>)]) -> Vec<String> {
    messages
        .iter()
        .filter(|(tag, _)| *tag == b'D')
        .map(|(_, body)| {
            let n = i16::from_be_bytes([body[0], body[1]]) as usize;
            let mut at = 2;
            let mut fields = Vec::with_capacity(n);
            for _ in 0..n {
                let len = i32_at(body, at);
                at += 4;
                match usize::try_from(len) {
                    Ok(len) => {
                        fields.push(text_at(body, at, len));
                        at += len;
                    }
                    Err(_) => fields.push(String::new()),
                }
            }
            fields.join("|")
        })
        .collect()
}

/// The (SQLSTATE, message) of every ErrorResponse in `messages`.
pub fn errors(messages: &[(u8, Vec<u8>)]) -> Vec<(String, String)> {
    messages
        .iter()
        .filter(|(tag, _)| *tag == b'E')
        .map(|(_, body)| (error_field(body, 'C'), error_field(body, 'M')))
        .collect()
}

/// The status bytes of every ReadyForQuery in `messages`, as a string.
pub fn statuses(messages: &[(u8, Vec<u8>)]) -> String {
    messages
        .iter()
        .filter(|(tag, _)| *tag == b'Z')
        .filter_map(|(_, body)| body.first().map(|b| char::from(*b)))
        .collect()
}
