//! Framing: a 4-byte big-endian length, then one MessagePack map.
//!
//! Reading is bounded: a length over [`MAX_RECORD_LEN`] is an error before
//! anything is allocated, a frame cut short is [`FrameRead::Truncated`]
//! (not an error: that is what a crash leaves), and a body must decode to
//! exactly one record with no trailing bytes.

use std::io::{self, Cursor, Read};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::format::{Record, MAX_RECORD_LEN};

/// Bytes in the length prefix.
pub const PREFIX_LEN: usize = 4;

/// Deepest MessagePack nesting accepted in a record (the format needs 4).
const MAX_DEPTH: usize = 32;

/// Why a record could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The serialiser failed.
    #[error("cannot encode record: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The record is larger than the format allows.
    #[error("record of {len} bytes exceeds the {MAX_RECORD_LEN}-byte limit")]
    TooLarge {
        /// The body length.
        len: usize,
    },
}

/// Why a record body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not a valid record.
    #[error("invalid record: {0}")]
    Invalid(#[from] rmp_serde::decode::Error),
    /// Bytes left over after the record.
    #[error("{extra} trailing bytes after the record")]
    Trailing {
        /// How many.
        extra: u64,
    },
}

/// Encodes a record as a complete frame (prefix and body).
pub fn encode_frame<R: Serialize>(record: &R) -> Result<Vec<u8>, EncodeError> {
    // Most records fit, so the buffer rarely grows.
    let mut buf = Vec::with_capacity(512);
    encode_frame_into(record, &mut buf)?;
    Ok(buf)
}

/// [`encode_frame`] into `buf` (cleared first), so that a writer can reuse
/// one buffer for every record.
pub fn encode_frame_into<R: Serialize>(record: &R, buf: &mut Vec<u8>) -> Result<(), EncodeError> {
    buf.clear();
    buf.extend_from_slice(&[0; PREFIX_LEN]);
    {
        let mut ser = rmp_serde::Serializer::new(&mut *buf)
            .with_struct_map()
            .with_human_readable();
        record.serialize(&mut ser)?;
    }
    let len = buf.len() - PREFIX_LEN;
    let prefix = u32::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_RECORD_LEN)
        .ok_or(EncodeError::TooLarge { len })?;
    buf[..PREFIX_LEN].copy_from_slice(&prefix.to_be_bytes());
    Ok(())
}

/// Decodes one record body (without its prefix).
pub fn decode_body(body: &[u8]) -> Result<Record, DecodeError> {
    let mut de = rmp_serde::Deserializer::new(Cursor::new(body)).with_human_readable();
    de.set_max_depth(MAX_DEPTH);
    let record = Record::deserialize(&mut de)?;
    let used = de.into_inner().position();
    let extra = (body.len() as u64).saturating_sub(used);
    if extra != 0 {
        return Err(DecodeError::Trailing { extra });
    }
    Ok(record)
}

/// Lowercase hex SHA-256 of a frame (prefix and body), the chain link.
pub fn frame_hash(frame: &[u8]) -> String {
    let mut hash = String::with_capacity(64);
    frame_hash_into(frame, &mut hash);
    hash
}

/// [`frame_hash`] into `out` (replacing what it held), without allocating
/// when `out` already has room: the writer keeps one per file.
pub fn frame_hash_into(frame: &[u8], out: &mut String) {
    let mut hex = [0u8; 64];
    // Cannot fail: 32 bytes fill 64 hex digits exactly. (`hex::encode`
    // goes through a char iterator, a tenth of the writer's time.)
    let _ = hex::encode_to_slice(Sha256::digest(frame), &mut hex);
    out.clear();
    out.push_str(std::str::from_utf8(&hex).unwrap_or_default());
}

/// The outcome of reading one frame.
#[derive(Debug)]
pub enum FrameRead {
    /// A whole frame: `bytes` holds prefix and body.
    Frame {
        /// Byte offset of the frame in the file.
        offset: u64,
        /// Prefix and body.
        bytes: Vec<u8>,
    },
    /// Clean end of file on a frame boundary.
    End,
    /// The file ends inside a frame starting at `offset`.
    Truncated {
        /// Where the incomplete frame starts.
        offset: u64,
        /// How many bytes of it are present.
        present: u64,
    },
    /// The length prefix at `offset` exceeds [`MAX_RECORD_LEN`].
    TooLarge {
        /// Where the frame starts.
        offset: u64,
        /// The length it claims.
        len: u32,
    },
}

/// Reads frames one by one from a byte stream, allocating at most one
/// bounded frame at a time.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    offset: u64,
}

impl<R: Read> FrameReader<R> {
    /// Wraps a reader positioned at the start of a recording.
    pub fn new(inner: R) -> Self {
        Self { inner, offset: 0 }
    }

    /// The offset of the next frame.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Reads the next frame.
    pub fn next_frame(&mut self) -> io::Result<FrameRead> {
        let offset = self.offset;
        let mut prefix = [0u8; PREFIX_LEN];
        let got = read_full(&mut self.inner, &mut prefix)?;
        if got == 0 {
            return Ok(FrameRead::End);
        }
        if got < PREFIX_LEN {
            return Ok(FrameRead::Truncated {
                offset,
                present: got as u64,
            });
        }
        let len = u32::from_be_bytes(prefix);
        if len > MAX_RECORD_LEN {
            return Ok(FrameRead::TooLarge { offset, len });
        }
        // Bounded by MAX_RECORD_LEN, checked above.
        let total = PREFIX_LEN + len as usize;
        let mut bytes = Vec::with_capacity(total);
        bytes.extend_from_slice(&prefix);
        let body = (&mut self.inner)
            .take(u64::from(len))
            .read_to_end(&mut bytes)?;
        if body < len as usize {
            return Ok(FrameRead::Truncated {
                offset,
                present: bytes.len() as u64,
            });
        }
        self.offset += total as u64;
        Ok(FrameRead::Frame { offset, bytes })
    }
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The body of a frame produced by [`FrameReader`].
pub fn body(frame: &[u8]) -> &[u8] {
    frame.get(PREFIX_LEN..).unwrap_or_default()
}
