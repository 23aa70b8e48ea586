//! MySQL packets: a 3-byte little-endian payload length, a sequence id,
//! then the payload. A payload of 16 MiB - 1 bytes continues in the next
//! packet; [`read_packet`] joins the pieces into one logical packet and
//! [`write_packet`] splits them again, so a forwarded packet keeps its
//! framing and sequence ids.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest payload one wire packet carries.
pub const MAX_WIRE_PAYLOAD: usize = 0xFF_FFFF;

/// One logical packet (continuations joined).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// The sequence id of its first wire packet.
    pub seq: u8,
    /// The payload, continuations joined.
    pub payload: Vec<u8>,
}

impl Packet {
    /// The sequence id the next packet in this exchange carries.
    pub fn next_seq(&self) -> u8 {
        let pieces = self.payload.len() / MAX_WIRE_PAYLOAD + 1;
        self.seq.wrapping_add(pieces as u8)
    }

    /// The first payload byte (the command, or the answer's kind).
    pub fn first(&self) -> Option<u8> {
        self.payload.first().copied()
    }
}

/// Why a packet could not be read.
#[derive(Debug)]
pub enum PacketError {
    /// Reading failed, or the peer closed in the middle of a packet.
    Io(std::io::Error),
    /// A logical packet larger than the session allows.
    TooLarge {
        /// Bytes announced so far.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

impl std::fmt::Display for PacketError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PacketError::Io(e) => write!(f, "{e}"),
            PacketError::TooLarge { size, limit } => write!(
                f,
                "a packet of more than {size} bytes, above the limit of {limit}"
            ),
        }
    }
}

/// Reads one logical packet; `None` at a clean end of stream (before the
/// first byte of a packet).
pub async fn read_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Option<Packet>, PacketError> {
    let mut header = [0u8; 4];
    let mut payload = Vec::new();
    let mut first_seq = None;
    loop {
        let mut filled = 0;
        while filled < header.len() {
            let n = reader
                .read(header.get_mut(filled..).unwrap_or_default())
                .await
                .map_err(PacketError::Io)?;
            if n == 0 {
                // A clean end only between packets.
                if filled == 0 && first_seq.is_none() {
                    return Ok(None);
                }
                return Err(PacketError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            filled += n;
        }
        let length =
            usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
        first_seq.get_or_insert(header[3]);
        if payload.len() + length > limit {
            return Err(PacketError::TooLarge {
                size: payload.len() + length,
                limit,
            });
        }
        let start = payload.len();
        payload.resize(start + length, 0);
        if let Some(piece) = payload.get_mut(start..) {
            reader.read_exact(piece).await.map_err(PacketError::Io)?;
        }
        if length < MAX_WIRE_PAYLOAD {
            break;
        }
    }
    Ok(Some(Packet {
        seq: first_seq.unwrap_or_default(),
        payload,
    }))
}

/// Where [`read_packet_into`] put one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The sequence id of its first piece.
    pub seq: u8,
    /// Its payload's length, all pieces together.
    pub len: usize,
    /// Its first piece's payload in the buffer (the whole payload when it
    /// is shorter than 16 MiB - 1).
    pub first: std::ops::Range<usize>,
    /// The packet as framed on the wire, headers included.
    pub framed: std::ops::Range<usize>,
}

/// Reads one packet onto the end of `out`, framed as it came: rows are
/// relayed without a copy of their own. `None` at a clean end of stream.
pub async fn read_packet_into<R: AsyncRead + Unpin>(
    reader: &mut R,
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<Option<Appended>, PacketError> {
    let start = out.len();
    let mut total = 0usize;
    let mut first = None;
    let mut seq = 0u8;
    loop {
        let header_at = out.len();
        out.resize(header_at + 4, 0);
        let mut filled = 0;
        while filled < 4 {
            let n = match reader
                .read(
                    out.get_mut(header_at + filled..header_at + 4)
                        .unwrap_or_default(),
                )
                .await
            {
                Ok(n) => n,
                Err(e) => {
                    out.truncate(start);
                    return Err(PacketError::Io(e));
                }
            };
            if n == 0 {
                out.truncate(start);
                if filled == 0 && first.is_none() {
                    return Ok(None);
                }
                return Err(PacketError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            filled += n;
        }
        let header = [
            out[header_at],
            out[header_at + 1],
            out[header_at + 2],
            out[header_at + 3],
        ];
        let length =
            usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
        if first.is_none() {
            seq = header[3];
        }
        total += length;
        if total > limit {
            out.truncate(start);
            return Err(PacketError::TooLarge { size: total, limit });
        }
        let body = header_at + 4;
        out.resize(body + length, 0);
        if let Err(e) = reader
            .read_exact(out.get_mut(body..).unwrap_or_default())
            .await
        {
            out.truncate(start);
            return Err(PacketError::Io(e));
        }
        first.get_or_insert(body..body + length);
        if length < MAX_WIRE_PAYLOAD {
            break;
        }
    }
    Ok(Some(Appended {
        seq,
        len: total,
        first: first.unwrap_or_default(),
        framed: start..out.len(),
    }))
}

/// Appends `payload` framed as packets starting at sequence id `seq` (split
/// at 16 MiB - 1, with an empty last piece when it divides evenly).
pub fn frame(out: &mut Vec<u8>, seq: u8, payload: &[u8]) {
    let mut seq = seq;
    let mut rest = payload;
    loop {
        let take = rest.len().min(MAX_WIRE_PAYLOAD);
        let (piece, after) = rest.split_at(take);
        let length = piece.len() as u32;
        out.extend_from_slice(&length.to_le_bytes()[..3]);
        out.push(seq);
        out.extend_from_slice(piece);
        seq = seq.wrapping_add(1);
        rest = after;
        if take < MAX_WIRE_PAYLOAD {
            return;
        }
    }
}

/// Writes one logical packet.
pub async fn write_packet<W: AsyncWrite + Unpin>(
    writer: &mut W,
    packet: &Packet,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(packet.payload.len() + 4);
    frame(&mut out, packet.seq, &packet.payload);
    writer.write_all(&out).await
}

/// The message of an ERR packet (protocol 4.1), with its code and
/// SQLSTATE: `1045 (28000): Access denied for user ...`.
pub fn err_message(payload: &[u8]) -> Option<String> {
    let code = u16::from_le_bytes([*payload.get(1)?, *payload.get(2)?]);
    let (state, message) = match payload.get(3) {
        Some(b'#') => (payload.get(4..9)?, payload.get(9..)?),
        _ => (&b"HY000"[..], payload.get(3..).unwrap_or_default()),
    };
    Some(format!(
        "{code} ({}): {}",
        String::from_utf8_lossy(state),
        String::from_utf8_lossy(message)
    ))
}

/// An ERR packet's payload (protocol 4.1): code, SQLSTATE and message.
pub fn err_payload(code: u16, sql_state: &str, message: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(message.len() + 9);
    payload.push(0xFF);
    payload.extend_from_slice(&code.to_le_bytes());
    payload.push(b'#');
    let state = sql_state.as_bytes();
    for i in 0..5 {
        payload.push(state.get(i).copied().unwrap_or(b'0'));
    }
    payload.extend_from_slice(message.as_bytes());
    payload
}

/// An ERR packet's payload in place of the server's greeting: before the
/// handshake the client knows no capabilities, so it carries no SQLSTATE
/// (clients show HY000).
pub fn greeting_err_payload(code: u16, message: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(message.len() + 3);
    payload.push(0xFF);
    payload.extend_from_slice(&code.to_le_bytes());
    payload.extend_from_slice(message.as_bytes());
    payload
}

/// Reads a length-encoded integer at the start of `bytes`: its value and
/// how many bytes it took. `None` for a NULL marker (0xFB), the ERR and
/// EOF markers, or input cut short.
pub fn lenenc_int(bytes: &[u8]) -> Option<(u64, usize)> {
    let first = *bytes.first()?;
    let wide = |n: usize| -> Option<(u64, usize)> {
        let raw = bytes.get(1..1 + n)?;
        let mut value = 0u64;
        for (i, b) in raw.iter().enumerate() {
            value |= u64::from(*b) << (8 * i);
        }
        Some((value, 1 + n))
    };
    match first {
        0..=0xFA => Some((u64::from(first), 1)),
        0xFC => wide(2),
        0xFD => wide(3),
        0xFE => wide(8),
        _ => None,
    }
}

/// The server status flags of an OK or EOF packet, when it is one.
pub fn status_flags(payload: &[u8]) -> Option<u16> {
    match payload.first()? {
        0xFE if payload.len() < 9 => {
            let raw = payload.get(3..5)?;
            Some(u16::from_le_bytes([raw[0], raw[1]]))
        }
        0x00 => {
            let (_, a) = lenenc_int(payload.get(1..)?)?;
            let (_, b) = lenenc_int(payload.get(1 + a..)?)?;
            let raw = payload.get(1 + a + b..3 + a + b)?;
            Some(u16::from_le_bytes([raw[0], raw[1]]))
        }
        _ => None,
    }
}

/// Whether `payload` ends a run of rows or column definitions: an EOF
/// packet (0xFE and shorter than 9 bytes; a row beginning with 0xFE is a
/// length of 8 more bytes, so it is longer).
pub fn is_eof(payload: &[u8]) -> bool {
    payload.first() == Some(&0xFE) && payload.len() < 9
}

/// Whether `payload` is an ERR packet.
pub fn is_err(payload: &[u8]) -> bool {
    payload.first() == Some(&0xFF)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[tokio::test]
    async fn packets_round_trip_and_long_ones_are_split_and_joined() {
        for size in [
            0,
            1,
            300,
            MAX_WIRE_PAYLOAD - 1,
            MAX_WIRE_PAYLOAD,
            MAX_WIRE_PAYLOAD + 5,
        ] {
            let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut wire = Vec::new();
            frame(&mut wire, 7, &payload);
            let pieces = size / MAX_WIRE_PAYLOAD + 1;
            assert_eq!(wire.len(), size + 4 * pieces, "{size}");
            let mut reader = &wire[..];
            let packet = read_packet(&mut reader, 64 << 20).await.unwrap().unwrap();
            assert_eq!(packet.seq, 7);
            assert_eq!(packet.payload.len(), size);
            assert!(packet.payload == payload);
            assert_eq!(packet.next_seq(), 7 + pieces as u8);
            assert!(reader.is_empty());
            assert!(read_packet(&mut reader, 64 << 20).await.unwrap().is_none());

            // Read in place, after what the buffer holds: the framing kept.
            let mut reader = &wire[..];
            let mut out = b"before".to_vec();
            let at = read_packet_into(&mut reader, &mut out, 64 << 20)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(at.seq, 7);
            assert_eq!(at.len, size);
            assert_eq!(at.framed, 6..6 + wire.len());
            assert!(out[at.framed.clone()] == wire[..]);
            assert_eq!(at.first.len(), size.min(MAX_WIRE_PAYLOAD));
            assert!(out[at.first.clone()] == payload[..at.first.len()]);
            assert!(read_packet_into(&mut reader, &mut out, 64 << 20)
                .await
                .unwrap()
                .is_none());
            assert_eq!(out.len(), 6 + wire.len());
        }
        // Over the limit or cut short: an error, the buffer as it was.
        let mut wire = Vec::new();
        frame(&mut wire, 0, &[1u8; 100]);
        let mut out = b"kept".to_vec();
        assert!(read_packet_into(&mut &wire[..], &mut out, 99)
            .await
            .is_err());
        assert!(read_packet_into(&mut &wire[..50], &mut out, 1000)
            .await
            .is_err());
        assert_eq!(out, b"kept");
    }

    #[tokio::test]
    async fn a_packet_over_the_limit_or_cut_short_is_an_error() {
        let mut wire = Vec::new();
        frame(&mut wire, 0, &[1u8; 100]);
        assert!(matches!(
            read_packet(&mut &wire[..], 99).await,
            Err(PacketError::TooLarge {
                size: 100,
                limit: 99
            })
        ));
        assert!(matches!(
            read_packet(&mut &wire[..50], 1000).await,
            Err(PacketError::Io(_))
        ));
        assert!(matches!(
            read_packet(&mut &wire[..2], 1000).await,
            Err(PacketError::Io(_))
        ));
    }

    #[test]
    fn err_packets_carry_code_state_and_message() {
        let p = err_payload(1142, "42000", "tollgate: no");
        assert_eq!(&p[..4], &[0xFF, 0x76, 0x04, b'#']);
        assert_eq!(&p[4..9], b"42000");
        assert_eq!(&p[9..], b"tollgate: no");
    }

    #[test]
    fn lengths_status_flags_and_terminators_are_read() {
        assert_eq!(lenenc_int(&[0x05]), Some((5, 1)));
        assert_eq!(lenenc_int(&[0xFC, 0x01, 0x02]), Some((0x0201, 3)));
        assert_eq!(lenenc_int(&[0xFD, 1, 0, 1]), Some((0x010001, 4)));
        assert_eq!(lenenc_int(&[0xFE, 1, 0, 0, 0, 0, 0, 0, 0]), Some((1, 9)));
        assert_eq!(lenenc_int(&[0xFC, 0x01]), None);
        assert_eq!(lenenc_int(&[0xFB]), None);
        // EOF: 0xFE, warnings, status 0x0008 (more results).
        let eof = [0xFE, 0, 0, 0x08, 0x00];
        assert!(is_eof(&eof));
        assert_eq!(status_flags(&eof), Some(0x0008));
        // OK: affected rows 1, insert id 0xFC-encoded, status 0x0002.
        let ok = [0x00, 0x01, 0xFC, 0x10, 0x00, 0x02, 0x00, 0x00, 0x00];
        assert_eq!(status_flags(&ok), Some(0x0002));
        let row_starting_with_a_long_string = [0xFE, 0, 0, 0, 0, 0, 0, 0, 0, b'x'];
        assert!(!is_eof(&row_starting_with_a_long_string));
        assert!(is_err(&err_payload(1, "HY000", "x")));
    }
}
