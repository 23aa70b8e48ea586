//! Framing, the checked [`Reader`], the [`MessageWriter`] and [`CodecError`].
//!
//! Everything here works on borrowed slices: a decoder never copies a
//! payload, and every read is checked against the bytes that are left, so a
//! hostile peer gets an error, never a panic or an allocation sized by a
//! number it chose.

use thiserror::Error;

/// Largest start-up packet accepted (length field included), the same limit
/// PostgreSQL applies (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// Largest typed message accepted before authentication has succeeded
/// (the length field's value, which counts itself; the tag byte is extra).
///
/// 65,535 bytes: PostgreSQL's `PG_MAX_AUTH_TOKEN_LENGTH`, the largest
/// password, SASL or GSS message the server takes. SCRAM messages are a few
/// hundred bytes, but a Kerberos ticket carrying a large PAC can pass 16 KiB,
/// so a smaller cap would break GSSAPI logins the server accepts. An
/// unauthenticated peer still cannot make the proxy buffer more than this.
pub const MAX_PRE_AUTH_MESSAGE: usize = 65_535;

/// Largest typed message of the types that never carry data (Sync, Flush,
/// Describe, Execute, Close, CopyDone, CopyFail, Terminate) after
/// authentication: PostgreSQL's `PQ_SMALL_MESSAGE_LIMIT`. See
/// [`frontend::max_len`](super::frontend::max_len).
pub const MAX_SMALL_MESSAGE: usize = 10_000;

/// Largest typed message accepted after authentication (the length field's
/// value, which counts itself): 1 GiB. PostgreSQL's own ceiling,
/// `PQ_LARGE_MESSAGE_LIMIT`, is one allocation short of 1 GiB.
///
/// This is a bound on what the peer may *send*, not on what the proxy
/// buffers: [`frame`] answers as soon as the five header bytes are in, so a
/// caller can forward a large `DataRow` or `CopyData` in chunks (see
/// [`FrameHeader::chunk`]) and buffer whole only the messages it inspects,
/// under a cap of its own.
pub const MAX_MESSAGE: usize = 1 << 30;

/// Longest cancel key: 4 bytes in protocol 3.0, up to 256 bytes in 3.2.
pub const MAX_CANCEL_KEY: usize = 256;

/// Shortest cancel key (and the only length protocol 3.0 knows).
pub const MIN_CANCEL_KEY: usize = 4;

/// Why bytes from the wire could not be framed or decoded.
///
/// Every variant means *invalid*: an incomplete message is `Ok(None)` from
/// the framing functions, never an error. Messages name the message type
/// and what is wrong with it, for logs and for the `protocol_violation`
/// error the proxy sends back.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// A length field below the smallest possible packet.
    #[error("{what} length {length} is below the minimum of {min}")]
    LengthTooShort {
        /// `"message"` or `"start-up packet"`.
        what: &'static str,
        /// The length field as sent.
        length: i32,
        /// The smallest valid length.
        min: usize,
    },
    /// A length field above the limit in force.
    #[error("{what} length {length} exceeds the {limit}-byte limit{phase}")]
    LengthTooLong {
        /// `"message"` or `"start-up packet"`.
        what: &'static str,
        /// The length field as sent.
        length: i32,
        /// The limit that applied.
        limit: usize,
        /// Which limit that was, with a leading space (`" before
        /// authentication"`), or empty when the caller chose its own.
        phase: &'static str,
    },
    /// A field runs past the end of its message.
    #[error("{message}: {field} needs {needed} bytes but only {left} are left")]
    Truncated {
        /// The message being decoded.
        message: &'static str,
        /// The field being read.
        field: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes that were left.
        left: usize,
    },
    /// A string field is not terminated by a NUL byte.
    #[error("{message}: {field} has no NUL terminator")]
    MissingNul {
        /// The message being decoded.
        message: &'static str,
        /// The field being read.
        field: &'static str,
    },
    /// A string field is not valid UTF-8.
    #[error("{message}: {field} is not valid UTF-8")]
    InvalidUtf8 {
        /// The message being decoded.
        message: &'static str,
        /// The field being read.
        field: &'static str,
    },
    /// A count from the wire promises more items than the bytes left can hold.
    #[error(
        "{message}: {field} count {count} exceeds the {left} bytes left \
         (at least {each} bytes each)"
    )]
    CountTooLarge {
        /// The message being decoded.
        message: &'static str,
        /// What is being counted.
        field: &'static str,
        /// The count as sent.
        count: i64,
        /// Bytes that were left.
        left: usize,
        /// The smallest encoding of one item.
        each: usize,
    },
    /// A field holds a value the protocol does not allow.
    #[error("{message}: invalid {field} {value}")]
    InvalidValue {
        /// The message being decoded.
        message: &'static str,
        /// The field being read.
        field: &'static str,
        /// The value as sent.
        value: i64,
    },
    /// Bytes follow the last field of a message.
    #[error("{message}: {count} unexpected bytes after the end of the message")]
    TrailingBytes {
        /// The message being decoded.
        message: &'static str,
        /// How many bytes were left over.
        count: usize,
    },
    /// A start-up packet asks for a protocol this codec does not speak.
    #[error("start-up packet: unsupported protocol version {major}.{minor}")]
    UnsupportedProtocol {
        /// Requested major version (3 is the only one supported).
        major: u16,
        /// Requested minor version.
        minor: u16,
    },
}

/// Names the limit `max_len` stands for, for error messages.
fn phase_of(max_len: usize) -> &'static str {
    match max_len {
        MAX_PRE_AUTH_MESSAGE => " before authentication",
        MAX_MESSAGE => " after authentication",
        _ => "",
    }
}

/// The five header bytes of a typed message, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The message type byte.
    pub tag: u8,
    /// Bytes the whole message takes on the wire: tag, length field and body.
    pub len: usize,
}

impl FrameHeader {
    /// Bytes of the tag and length field.
    pub const SIZE: usize = 5;

    /// Bytes of the body (after the length field).
    pub fn body_len(&self) -> usize {
        self.len.saturating_sub(Self::SIZE)
    }

    /// The body, if `buf` (starting at this message) holds all of it.
    pub fn body<'a>(&self, buf: &'a [u8]) -> Option<&'a [u8]> {
        buf.get(Self::SIZE..self.len)
    }

    /// The whole message (header included), if `buf` holds all of it.
    pub fn message<'a>(&self, buf: &'a [u8]) -> Option<&'a [u8]> {
        buf.get(..self.len)
    }

    /// For pass-through in chunks: given that `sent` bytes of this message
    /// (header included) were already forwarded, the part of `buf` (the
    /// bytes received after those) that still belongs to this message.
    pub fn chunk<'a>(&self, buf: &'a [u8], sent: usize) -> &'a [u8] {
        let left = self.len.saturating_sub(sent);
        buf.get(..left).unwrap_or(buf)
    }
}

/// Checks the header of the typed message at the start of `buf`.
///
/// `Ok(None)`: fewer than five bytes, read more. `Err`: the length field is
/// under 4 (it counts itself) or over `max_len`. `Ok(Some(h))`: the header
/// is valid and `h.len` bytes make up the message; `buf` may hold only part
/// of it. The header alone decides validity, so a caller can reject a
/// message, or start streaming it, before reading its body. Use
/// [`split_frame`] to wait for whole messages.
pub fn frame(buf: &[u8], max_len: usize) -> Result<Option<FrameHeader>, CodecError> {
    let [tag, a, b, c, d, ..] = *buf else {
        return Ok(None);
    };
    let length = i32::from_be_bytes([a, b, c, d]);
    let len = check_length("message", length, 4, max_len, phase_of(max_len))?;
    Ok(Some(FrameHeader {
        tag,
        len: len.saturating_add(1),
    }))
}

/// One whole typed message borrowed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The message type byte.
    pub tag: u8,
    /// The bytes after the length field.
    pub body: &'a [u8],
}

impl Frame<'_> {
    /// Bytes the message takes on the wire (tag and length included): how
    /// far to advance the read buffer.
    pub fn wire_len(&self) -> usize {
        self.body.len().saturating_add(FrameHeader::SIZE)
    }
}

/// Like [`frame`], but waits (`Ok(None)`) until the whole message is in
/// `buf`, and returns it.
pub fn split_frame(buf: &[u8], max_len: usize) -> Result<Option<Frame<'_>>, CodecError> {
    let Some(header) = frame(buf, max_len)? else {
        return Ok(None);
    };
    Ok(header.body(buf).map(|body| Frame {
        tag: header.tag,
        body,
    }))
}

/// Checks the length of the untyped start-up packet at the start of `buf`
/// (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest).
///
/// `Ok(None)`: fewer than four bytes. `Err`: the length is under 8 (length
/// and request code) or over [`MAX_STARTUP_PACKET`]. `Ok(Some(len))`: the
/// packet takes `len` bytes, length field included; `buf` may hold only
/// part of it. Use [`split_startup`] to wait for the whole packet.
pub fn frame_startup(buf: &[u8]) -> Result<Option<usize>, CodecError> {
    let [a, b, c, d, ..] = *buf else {
        return Ok(None);
    };
    let length = i32::from_be_bytes([a, b, c, d]);
    check_length("start-up packet", length, 8, MAX_STARTUP_PACKET, "").map(Some)
}

/// Like [`frame_startup`], but waits until the whole packet is in `buf` and
/// returns its body (the bytes after the length field, request code first),
/// for [`decode_startup`](super::frontend::decode_startup).
pub fn split_startup(buf: &[u8]) -> Result<Option<&[u8]>, CodecError> {
    let Some(len) = frame_startup(buf)? else {
        return Ok(None);
    };
    Ok(buf.get(4..len))
}

fn check_length(
    what: &'static str,
    length: i32,
    min: usize,
    max: usize,
    phase: &'static str,
) -> Result<usize, CodecError> {
    let len = usize::try_from(length).unwrap_or(0);
    if len < min {
        return Err(CodecError::LengthTooShort { what, length, min });
    }
    if len > max {
        return Err(CodecError::LengthTooLong {
            what,
            length,
            limit: max,
            phase,
        });
    }
    Ok(len)
}

/// Checks a cancel key's length (CancelRequest, BackendKeyData).
pub fn check_cancel_key(message: &'static str, key: &[u8]) -> Result<(), CodecError> {
    if (MIN_CANCEL_KEY..=MAX_CANCEL_KEY).contains(&key.len()) {
        Ok(())
    } else {
        Err(CodecError::InvalidValue {
            message,
            field: "cancel key length",
            value: i64::try_from(key.len()).unwrap_or(i64::MAX),
        })
    }
}

/// Returns `msg` if `body` is empty, as it must be for `message`.
pub(super) fn expect_empty<T>(message: &'static str, body: &[u8], msg: T) -> Result<T, CodecError> {
    Reader::new(message, body).finish().map(|()| msg)
}

/// A checked cursor over one message body.
///
/// Every read names the field it reads, so a failure says which message and
/// which field were wrong. Reads never go past the slice the reader was
/// made from; [`Reader::sub`] hands out a reader over a prefix, which
/// therefore cannot run past its parent either.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    message: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`, the body of a message called `message`.
    pub fn new(message: &'static str, buf: &'a [u8]) -> Self {
        Self { buf, message }
    }

    /// The message name used in errors.
    pub fn message(&self) -> &'static str {
        self.message
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Takes everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Takes the next `n` bytes.
    pub fn get_bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], CodecError> {
        match self.buf.split_at_checked(n) {
            Some((head, tail)) => {
                self.buf = tail;
                Ok(head)
            }
            None => Err(CodecError::Truncated {
                message: self.message,
                field,
                needed: n,
                left: self.buf.len(),
            }),
        }
    }

    /// Takes the next `N` bytes as an array.
    pub fn get_array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], CodecError> {
        match self.buf.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.buf = tail;
                Ok(*head)
            }
            None => Err(CodecError::Truncated {
                message: self.message,
                field,
                needed: N,
                left: self.buf.len(),
            }),
        }
    }

    /// Reads one byte.
    pub fn get_u8(&mut self, field: &'static str) -> Result<u8, CodecError> {
        let [b] = self.get_array::<1>(field)?;
        Ok(b)
    }

    /// Reads a big-endian `i16`.
    pub fn get_i16(&mut self, field: &'static str) -> Result<i16, CodecError> {
        Ok(i16::from_be_bytes(self.get_array(field)?))
    }

    /// Reads a big-endian `u16`.
    pub fn get_u16(&mut self, field: &'static str) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.get_array(field)?))
    }

    /// Reads a big-endian `i32`.
    pub fn get_i32(&mut self, field: &'static str) -> Result<i32, CodecError> {
        Ok(i32::from_be_bytes(self.get_array(field)?))
    }

    /// Reads a big-endian `u32`.
    pub fn get_u32(&mut self, field: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.get_array(field)?))
    }

    /// Reads a NUL-terminated string as raw bytes (terminator consumed, not
    /// returned).
    pub fn get_cstr_bytes(&mut self, field: &'static str) -> Result<&'a [u8], CodecError> {
        let Some(nul) = self.buf.iter().position(|&b| b == 0) else {
            return Err(CodecError::MissingNul {
                message: self.message,
                field,
            });
        };
        let (text, tail) = self.buf.split_at(nul);
        self.buf = tail.get(1..).unwrap_or_default();
        Ok(text)
    }

    /// Reads a NUL-terminated string that must be valid UTF-8.
    pub fn get_cstr(&mut self, field: &'static str) -> Result<&'a str, CodecError> {
        let bytes = self.get_cstr_bytes(field)?;
        std::str::from_utf8(bytes).map_err(|_| CodecError::InvalidUtf8 {
            message: self.message,
            field,
        })
    }

    /// Reads an `Int32` length then that many bytes, `-1` meaning NULL (the
    /// encoding of parameter values, column values and function results).
    pub fn get_value(&mut self, field: &'static str) -> Result<Option<&'a [u8]>, CodecError> {
        let n = self.get_i32(field)?;
        if n == -1 {
            return Ok(None);
        }
        let n = usize::try_from(n).map_err(|_| CodecError::InvalidValue {
            message: self.message,
            field,
            value: n.into(),
        })?;
        self.get_bytes(n, field).map(Some)
    }

    /// Reads an `Int16` item count (read unsigned, as PostgreSQL does, so
    /// 0 to 65,535) and checks that `each` bytes per item can fit in what is
    /// left, so the caller may allocate `count` slots.
    pub fn get_count(&mut self, field: &'static str, each: usize) -> Result<usize, CodecError> {
        let count = usize::from(self.get_u16(field)?);
        self.check_count(field, count, each)
    }

    /// Reads an `Int32` item count, bounded like [`Reader::get_count`];
    /// negative counts are invalid.
    pub fn get_count_i32(&mut self, field: &'static str, each: usize) -> Result<usize, CodecError> {
        let raw = self.get_i32(field)?;
        let count = usize::try_from(raw).map_err(|_| CodecError::InvalidValue {
            message: self.message,
            field: "count",
            value: raw.into(),
        })?;
        self.check_count(field, count, each)
    }

    fn check_count(
        &self,
        field: &'static str,
        count: usize,
        each: usize,
    ) -> Result<usize, CodecError> {
        match count.checked_mul(each) {
            Some(need) if need <= self.buf.len() => Ok(count),
            _ => Err(CodecError::CountTooLarge {
                message: self.message,
                field,
                count: i64::try_from(count).unwrap_or(i64::MAX),
                left: self.buf.len(),
                each,
            }),
        }
    }

    /// Reads an `Int16` count then that many `Int16` format codes.
    pub fn get_formats(&mut self, field: &'static str) -> Result<Vec<i16>, CodecError> {
        let n = self.get_count(field, 2)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.get_i16(field)?);
        }
        Ok(v)
    }

    /// Reads an `Int16` count then that many length-prefixed values
    /// ([`Reader::get_value`]).
    pub fn get_values(&mut self, field: &'static str) -> Result<Vec<Option<&'a [u8]>>, CodecError> {
        let n = self.get_count(field, 4)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.get_value(field)?);
        }
        Ok(v)
    }

    /// A reader over the next `n` bytes, which this reader skips. The
    /// sub-reader cannot read past them, and fails if they are not all here.
    pub fn sub(&mut self, n: usize, field: &'static str) -> Result<Reader<'a>, CodecError> {
        let bytes = self.get_bytes(n, field)?;
        Ok(Reader {
            buf: bytes,
            message: self.message,
        })
    }

    /// Reads an `Int32` length (not counting itself; negative is invalid)
    /// and returns a reader over that many bytes.
    pub fn sub_i32(&mut self, field: &'static str) -> Result<Reader<'a>, CodecError> {
        let n = self.get_i32(field)?;
        let n = usize::try_from(n).map_err(|_| CodecError::InvalidValue {
            message: self.message,
            field,
            value: n.into(),
        })?;
        self.sub(n, field)
    }

    /// Succeeds only if everything was read.
    pub fn finish(self) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CodecError::TrailingBytes {
                message: self.message,
                count: self.buf.len(),
            })
        }
    }
}

/// Builds one message at the end of an output buffer; the length field is
/// written when [`MessageWriter::finish`] is called.
///
/// Strings are written as C strings: a NUL inside one would end it early and
/// corrupt the message, so interior NULs are dropped. Counts are written as
/// `Int16`; callers with more than 65,535 items should write
/// [`MessageWriter::count`] and only that many items.
#[derive(Debug)]
pub struct MessageWriter<'o> {
    out: &'o mut Vec<u8>,
    /// Where the length field starts.
    start: usize,
}

impl<'o> MessageWriter<'o> {
    /// Starts a typed message with `tag`.
    pub fn new(out: &'o mut Vec<u8>, tag: u8) -> Self {
        out.push(tag);
        Self::untyped(out)
    }

    /// Starts an untyped (start-up phase) packet.
    pub fn untyped(out: &'o mut Vec<u8>) -> Self {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        Self { out, start }
    }

    /// Appends one byte.
    pub fn put_u8(&mut self, v: u8) -> &mut Self {
        self.out.push(v);
        self
    }

    /// Appends a big-endian `i16`.
    pub fn put_i16(&mut self, v: i16) -> &mut Self {
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian `u16`.
    pub fn put_u16(&mut self, v: u16) -> &mut Self {
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian `i32`.
    pub fn put_i32(&mut self, v: i32) -> &mut Self {
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian `u32`.
    pub fn put_u32(&mut self, v: u32) -> &mut Self {
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends raw bytes.
    pub fn put_bytes(&mut self, v: &[u8]) -> &mut Self {
        self.out.extend_from_slice(v);
        self
    }

    /// Appends `v` and a NUL terminator (interior NULs dropped).
    pub fn put_cstr_bytes(&mut self, v: &[u8]) -> &mut Self {
        if v.contains(&0) {
            self.out.extend(v.iter().copied().filter(|&b| b != 0));
        } else {
            self.out.extend_from_slice(v);
        }
        self.out.push(0);
        self
    }

    /// Appends a string and a NUL terminator (interior NULs dropped).
    pub fn put_cstr(&mut self, v: &str) -> &mut Self {
        self.put_cstr_bytes(v.as_bytes())
    }

    /// Appends a length-prefixed value, `None` as length -1. A value longer
    /// than `i32::MAX` cannot be represented; it is cut to that length.
    pub fn put_value(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            None => self.put_i32(-1),
            Some(bytes) => {
                let n = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
                let keep = usize::try_from(n).unwrap_or(0);
                self.put_i32(n)
                    .put_bytes(bytes.get(..keep).unwrap_or(bytes))
            }
        }
    }

    /// Appends an `Int16` count of `len` items and returns how many items to
    /// write: `len`, or 65,535 if there are more (the wire cannot say more).
    pub fn count(&mut self, len: usize) -> usize {
        let n = u16::try_from(len).unwrap_or(u16::MAX);
        self.put_u16(n);
        usize::from(n)
    }

    /// Appends an `Int16` count then the format codes (at most 65,535).
    pub fn put_formats(&mut self, formats: &[i16]) -> &mut Self {
        let n = self.count(formats.len());
        for &f in formats.iter().take(n) {
            self.put_i16(f);
        }
        self
    }

    /// Appends an `Int16` count then the values (at most 65,535), as
    /// [`MessageWriter::put_value`] does.
    pub fn put_values(&mut self, values: &[Option<&[u8]>]) -> &mut Self {
        let n = self.count(values.len());
        for &v in values.iter().take(n) {
            self.put_value(v);
        }
        self
    }

    /// Writes the length field. A message over `i32::MAX` bytes cannot be
    /// framed; its length is written as `i32::MAX` (no decoder accepts it).
    pub fn finish(self) {
        let len = self.out.len().saturating_sub(self.start);
        let len = i32::try_from(len).unwrap_or(i32::MAX).to_be_bytes();
        if let Some(field) = self.out.get_mut(self.start..self.start.saturating_add(4)) {
            field.copy_from_slice(&len);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn frame_needs_five_bytes() {
        for n in 0..5 {
            assert_eq!(frame(&b"Q\0\0\0\x05"[..n], MAX_MESSAGE), Ok(None));
        }
        let h = frame(b"Q\0\0\0\x05", MAX_MESSAGE).unwrap().unwrap();
        assert_eq!(h, FrameHeader { tag: b'Q', len: 6 });
        assert_eq!(h.body_len(), 1);
        assert_eq!(h.body(b"Q\0\0\0\x05"), None);
        assert_eq!(h.body(b"Q\0\0\0\x05x"), Some(&b"x"[..]));
        assert_eq!(h.message(b"Q\0\0\0\x05xyz"), Some(&b"Q\0\0\0\x05x"[..]));
    }

    #[test]
    fn frame_lengths_0_3_negative_and_huge() {
        for length in [0i32, 3, -1, i32::MIN] {
            let mut buf = vec![b'Q'];
            buf.extend_from_slice(&length.to_be_bytes());
            let err = frame(&buf, MAX_MESSAGE).unwrap_err();
            assert!(matches!(err, CodecError::LengthTooShort { .. }), "{err}");
        }
        let mut buf = vec![b'p'];
        buf.extend_from_slice(&i32::MAX.to_be_bytes());
        let err = frame(&buf, MAX_PRE_AUTH_MESSAGE).unwrap_err();
        assert_eq!(
            err.to_string(),
            "message length 2147483647 exceeds the 65535-byte limit before authentication"
        );
        let err = frame(&buf, MAX_MESSAGE).unwrap_err();
        assert_eq!(
            err.to_string(),
            "message length 2147483647 exceeds the 1073741824-byte limit after authentication"
        );
        let err = frame(&buf, 100).unwrap_err();
        assert_eq!(
            err.to_string(),
            "message length 2147483647 exceeds the 100-byte limit"
        );
        // Exactly at the limit is fine.
        let mut buf = vec![b'd'];
        buf.extend_from_slice(&(MAX_MESSAGE as i32).to_be_bytes());
        let h = frame(&buf, MAX_MESSAGE).unwrap().unwrap();
        assert_eq!(h.len, MAX_MESSAGE + 1);
    }

    #[test]
    fn streaming_a_large_message_in_chunks() {
        // A CopyData of 10 body bytes arriving in pieces of 3 after the header.
        let mut wire = vec![b'd', 0, 0, 0, 14];
        wire.extend_from_slice(b"0123456789");
        wire.extend_from_slice(b"c\0\0\0\x04");
        let h = frame(&wire[..5], MAX_MESSAGE).unwrap().unwrap();
        let mut sent = 5;
        let mut forwarded = wire[..5].to_vec();
        let mut pos = 5;
        while sent < h.len {
            let read = &wire[pos..(pos + 3).min(wire.len())];
            let chunk = h.chunk(read, sent);
            forwarded.extend_from_slice(chunk);
            sent += chunk.len();
            pos += chunk.len();
        }
        assert_eq!(forwarded, wire[..15]);
        assert_eq!(&wire[pos..], b"c\0\0\0\x04");
    }

    #[test]
    fn split_frame_waits_for_the_body() {
        let wire = b"X\0\0\0\x04Q\0\0\0\x05\0";
        for n in 0..5 {
            assert_eq!(split_frame(&wire[..n], MAX_MESSAGE), Ok(None));
        }
        let f = split_frame(wire, MAX_MESSAGE).unwrap().unwrap();
        assert_eq!((f.tag, f.body, f.wire_len()), (b'X', &b""[..], 5));
        let f = split_frame(&wire[5..], MAX_MESSAGE).unwrap().unwrap();
        assert_eq!((f.tag, f.body, f.wire_len()), (b'Q', &b"\0"[..], 6));
        assert_eq!(split_frame(&wire[5..10], MAX_MESSAGE), Ok(None));
    }

    #[test]
    fn startup_lengths() {
        assert_eq!(frame_startup(b"\0\0\0"), Ok(None));
        assert_eq!(frame_startup(b"\0\0\0\x08"), Ok(Some(8)));
        assert_eq!(split_startup(b"\0\0\0\x08\x04\xd2\x16"), Ok(None));
        assert_eq!(
            split_startup(b"\0\0\0\x08\x04\xd2\x16\x2fXX"),
            Ok(Some(&b"\x04\xd2\x16\x2f"[..]))
        );
        for length in [0i32, 3, 4, 7, -8] {
            let err = frame_startup(&length.to_be_bytes()).unwrap_err();
            assert!(matches!(err, CodecError::LengthTooShort { min: 8, .. }));
        }
        assert_eq!(frame_startup(&10_000i32.to_be_bytes()), Ok(Some(10_000)));
        let err = frame_startup(&10_001i32.to_be_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "start-up packet length 10001 exceeds the 10000-byte limit"
        );
    }

    #[test]
    fn reader_reads_and_checks() {
        let mut r = Reader::new("Test", b"\x01\xff\xfe\0\0\0\x07abc\0\xc3\x28\0rest");
        assert_eq!(r.get_u8("a").unwrap(), 1);
        assert_eq!(r.get_i16("b").unwrap(), -2);
        assert_eq!(r.get_i32("c").unwrap(), 7);
        assert_eq!(r.get_cstr("d").unwrap(), "abc");
        let mut bad = r.clone();
        assert_eq!(
            bad.get_cstr("e").unwrap_err().to_string(),
            "Test: e is not valid UTF-8"
        );
        assert_eq!(r.get_cstr_bytes("e").unwrap(), b"\xc3\x28");
        assert_eq!(
            r.clone().finish().unwrap_err().to_string(),
            "Test: 4 unexpected bytes after the end of the message"
        );
        assert_eq!(
            r.clone().get_cstr("f").unwrap_err().to_string(),
            "Test: f has no NUL terminator"
        );
        assert_eq!(
            r.clone().get_bytes(5, "g").unwrap_err().to_string(),
            "Test: g needs 5 bytes but only 4 are left"
        );
        assert_eq!(r.rest(), b"rest");
        r.finish().unwrap();
    }

    #[test]
    fn sub_reader_cannot_pass_its_parent() {
        let mut r = Reader::new("Test", b"\0\0\0\x02abcd");
        let mut sub = r.sub_i32("inner").unwrap();
        assert_eq!(sub.remaining(), 2);
        assert!(sub.get_i32("x").is_err());
        assert_eq!(sub.get_bytes(2, "x").unwrap(), b"ab");
        sub.finish().unwrap();
        assert_eq!(r.remaining(), 2);
        let mut r = Reader::new("Test", b"\0\0\0\x09abcd");
        assert!(r.sub_i32("inner").is_err());
        let mut r = Reader::new("Test", b"\xff\xff\xff\xfeab");
        assert!(matches!(
            r.sub_i32("inner"),
            Err(CodecError::InvalidValue { value: -2, .. })
        ));
    }

    #[test]
    fn counts_are_bounded_by_what_is_left() {
        let mut r = Reader::new("Bind", b"\xff\xff0123456789ab");
        assert_eq!(
            r.get_count("parameter", 4).unwrap_err().to_string(),
            "Bind: parameter count 65535 exceeds the 12 bytes left (at least 4 bytes each)"
        );
        let mut r = Reader::new("Bind", b"\0\x030123456789ab");
        assert_eq!(r.get_count("parameter", 4).unwrap(), 3);
        let mut r = Reader::new("X", b"\xff\xff\xff\xff");
        assert!(matches!(
            r.get_count_i32("option", 1),
            Err(CodecError::InvalidValue { value: -1, .. })
        ));
    }

    #[test]
    fn writer_patches_the_length_and_drops_interior_nuls() {
        let mut out = b"prefix".to_vec();
        let mut w = MessageWriter::new(&mut out, b'Q');
        w.put_cstr("a\0b");
        w.finish();
        assert_eq!(out, b"prefixQ\0\0\0\x07ab\0");
        let mut out = Vec::new();
        let mut w = MessageWriter::untyped(&mut out);
        w.put_i32(80877103);
        w.finish();
        assert_eq!(out, b"\0\0\0\x08\x04\xd2\x16\x2f");
        let mut out = Vec::new();
        let mut w = MessageWriter::new(&mut out, b'x');
        assert_eq!(w.count(70_000), 65_535);
        w.put_value(None).put_value(Some(b"hi"));
        w.finish();
        assert_eq!(out, b"x\0\0\0\x10\xff\xff\xff\xff\xff\xff\0\0\0\x02hi");
    }
}
