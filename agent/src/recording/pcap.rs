//! `recordings export --format pcap`: the raw bytes of a `record_raw`
//! session as a classic pcap file, so Wireshark's dissectors can read it.
//!
//! The agent relays a session over two TCP connections and records the
//! bytes it read, not packets; the export synthesizes one TCP connection
//! between the recorded client address and the server: a handshake at the
//! upstream connection, one PSH|ACK segment per recorded chunk (split at
//! [`MAX_SEGMENT`] bytes) with consistent sequence and acknowledgement
//! numbers, and a FIN exchange when the session closed. Packets are
//! LINKTYPE_RAW (IPv4, or IPv6 when either address is IPv6, IPv4 ones then
//! v4-mapped) with valid IP and TCP checksums; each is timed at the
//! header's start plus its event's `t_us`.

use std::net::{IpAddr, SocketAddr};

use super::format::{Event, Header};
use super::reader::Recording;

/// Largest TCP payload of one synthesized segment.
pub const MAX_SEGMENT: usize = 65000;
/// The pcap link type: raw IP, the version read from the packet.
pub const LINKTYPE_RAW: u32 = 101;
/// The classic pcap magic number (microsecond timestamps).
pub const PCAP_MAGIC: u32 = 0xa1b2_c3d4;

const SYN: u8 = 0x02;
const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// Why a recording cannot be exported as pcap.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PcapError {
    /// The session was recorded without `record_raw`.
    #[error("this recording has no raw bytes; set record_raw = true on the target to record them for later sessions")]
    NoRawBytes,
    /// The file was cut inside its header.
    #[error("this recording has no complete header, so its addresses and start time are unknown")]
    NoHeader,
    /// Neither an `upstream_connected` event, the kernel's record nor the
    /// header's upstream gives a server address.
    #[error("the server's address is not in the recording (upstream \"{0}\")")]
    NoServerAddress(String),
}

/// The session's raw bytes as a pcap file (see the module documentation).
pub fn export_pcap(rec: &Recording) -> Result<Vec<u8>, PcapError> {
    let header = rec.header().ok_or(PcapError::NoHeader)?;
    if !rec.events().any(|e| matches!(e.event, Event::Raw { .. })) {
        return Err(PcapError::NoRawBytes);
    }
    let mut connected_at = None;
    let mut server = None;
    for e in rec.events() {
        if let Event::UpstreamConnected { peer, .. } = e.event {
            connected_at = Some(e.t_us);
            server = Some(peer);
            break;
        }
    }
    let server = server
        .or_else(|| header.kernel.as_ref().map(|k| k.destination))
        .or_else(|| header.upstream.parse().ok())
        .ok_or_else(|| PcapError::NoServerAddress(header.upstream.clone()))?;
    let mut w = Writer::new(header, server);
    let first_raw = rec
        .events()
        .find(|e| matches!(e.event, Event::Raw { .. }))
        .map_or(0, |e| e.t_us);
    w.handshake(connected_at.unwrap_or(first_raw).min(first_raw));
    let mut last_t = 0;
    let mut closed = false;
    for e in rec.events() {
        last_t = last_t.max(e.t_us);
        match &e.event {
            Event::Raw { dir, data } => match dir.as_str() {
                "client" => w.data(e.t_us, true, data),
                "server" => w.data(e.t_us, false, data),
                // A direction a later agent may write: not this connection's.
                _ => {}
            },
            Event::Closed { .. } => closed = true,
            _ => {}
        }
    }
    if closed || rec.trailer().is_some() {
        w.close(last_t);
    }
    Ok(w.out)
}

/// Builds the file packet by packet.
struct Writer {
    out: Vec<u8>,
    start_us: u64,
    client: SocketAddr,
    server: SocketAddr,
    v6: bool,
    /// Next sequence number of each side.
    client_seq: u32,
    server_seq: u32,
    ip_id: u16,
}

impl Writer {
    fn new(header: &Header, server: SocketAddr) -> Writer {
        let client = header.client;
        let v6 = client.is_ipv6() || server.is_ipv6();
        // Initial sequence numbers from the session id: stable across
        // exports, different across sessions.
        let id = header.session.as_bytes();
        let isn = |at: usize| {
            let b = |i: usize| id.get(at + i).copied().unwrap_or(0);
            u32::from_be_bytes([b(0), b(1), b(2), b(3)])
        };
        let mut out = Vec::with_capacity(4096);
        // Little-endian, as most writers do; readers detect the order
        // from the magic.
        out.extend_from_slice(&PCAP_MAGIC.to_le_bytes());
        out.extend_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&4u16.to_le_bytes());
        out.extend_from_slice(&0i32.to_le_bytes()); // UTC
        out.extend_from_slice(&0u32.to_le_bytes()); // sigfigs
        out.extend_from_slice(&262_144u32.to_le_bytes()); // snaplen
        out.extend_from_slice(&LINKTYPE_RAW.to_le_bytes());
        Writer {
            out,
            start_us: header.started_at_unix_ms.saturating_mul(1000),
            client,
            server,
            v6,
            client_seq: isn(8),
            server_seq: isn(12),
            ip_id: 1,
        }
    }

    fn handshake(&mut self, t_us: u64) {
        let (c, s) = (self.client_seq, self.server_seq);
        self.packet(t_us, true, c, 0, SYN, &[]);
        self.packet(t_us, false, s, c.wrapping_add(1), SYN | ACK, &[]);
        self.client_seq = c.wrapping_add(1);
        self.server_seq = s.wrapping_add(1);
        self.packet(t_us, true, self.client_seq, self.server_seq, ACK, &[]);
    }

    fn data(&mut self, t_us: u64, from_client: bool, data: &[u8]) {
        for segment in data.chunks(MAX_SEGMENT) {
            let (seq, ack) = self.numbers(from_client);
            self.packet(t_us, from_client, seq, ack, PSH | ACK, segment);
            // TCP sequence numbers wrap by design.
            let n = segment.len() as u32;
            if from_client {
                self.client_seq = seq.wrapping_add(n);
            } else {
                self.server_seq = seq.wrapping_add(n);
            }
        }
    }

    /// The client closes first, the server answers, the client acknowledges.
    fn close(&mut self, t_us: u64) {
        let (c, s) = (self.client_seq, self.server_seq);
        self.packet(t_us, true, c, s, FIN | ACK, &[]);
        self.packet(t_us, false, s, c.wrapping_add(1), FIN | ACK, &[]);
        self.client_seq = c.wrapping_add(1);
        self.server_seq = s.wrapping_add(1);
        self.packet(t_us, true, self.client_seq, self.server_seq, ACK, &[]);
    }

    fn numbers(&self, from_client: bool) -> (u32, u32) {
        if from_client {
            (self.client_seq, self.server_seq)
        } else {
            (self.server_seq, self.client_seq)
        }
    }

    fn packet(
        &mut self,
        t_us: u64,
        from_client: bool,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: &[u8],
    ) {
        let (src, dst) = if from_client {
            (self.client, self.server)
        } else {
            (self.server, self.client)
        };
        let tcp = tcp_segment(src, dst, self.v6, seq, ack, flags, payload);
        let packet = if self.v6 {
            ipv6_packet(&v6(src.ip()), &v6(dst.ip()), &tcp)
        } else {
            let id = self.ip_id;
            self.ip_id = self.ip_id.wrapping_add(1);
            ipv4_packet(&v4_octets(src.ip()), &v4_octets(dst.ip()), id, &tcp)
        };
        let at = self.start_us.saturating_add(t_us);
        let secs = u32::try_from(at / 1_000_000).unwrap_or(u32::MAX);
        let micros = (at % 1_000_000) as u32;
        let len = packet.len() as u32;
        self.out.extend_from_slice(&secs.to_le_bytes());
        self.out.extend_from_slice(&micros.to_le_bytes());
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out.extend_from_slice(&packet);
    }
}

fn v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn v4_octets(ip: IpAddr) -> [u8; 4] {
    match ip {
        IpAddr::V4(a) => a.octets(),
        // Not reached: IPv6 anywhere makes the whole file IPv6.
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or([0; 4], |a| a.octets()),
    }
}

/// The TCP header (20 bytes, no options) and payload, checksummed over
/// the pseudo-header of the IP version in use.
fn tcp_segment(
    src: SocketAddr,
    dst: SocketAddr,
    v6_packet: bool,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&src.port().to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push(5 << 4); // data offset: 5 words
    tcp.push(flags);
    tcp.extend_from_slice(&65535u16.to_be_bytes()); // window
    tcp.extend_from_slice(&[0, 0]); // checksum, below
    tcp.extend_from_slice(&[0, 0]); // urgent pointer
    tcp.extend_from_slice(payload);
    let len = tcp.len() as u32;
    let mut pseudo = Vec::with_capacity(40);
    if v6_packet {
        pseudo.extend_from_slice(&v6(src.ip()));
        pseudo.extend_from_slice(&v6(dst.ip()));
        pseudo.extend_from_slice(&len.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
    } else {
        pseudo.extend_from_slice(&v4_octets(src.ip()));
        pseudo.extend_from_slice(&v4_octets(dst.ip()));
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(len as u16).to_be_bytes());
    }
    let sum = checksum(&[&pseudo, &tcp]);
    if let Some(slot) = tcp.get_mut(16..18) {
        slot.copy_from_slice(&sum.to_be_bytes());
    }
    tcp
}

fn ipv4_packet(src: &[u8; 4], dst: &[u8; 4], id: u16, tcp: &[u8]) -> Vec<u8> {
    let total = (20 + tcp.len()) as u16;
    let mut ip = Vec::with_capacity(total as usize);
    ip.push(0x45); // version 4, 5-word header
    ip.push(0);
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&id.to_be_bytes());
    ip.extend_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    ip.push(64); // TTL
    ip.push(6); // TCP
    ip.extend_from_slice(&[0, 0]); // checksum, below
    ip.extend_from_slice(src);
    ip.extend_from_slice(dst);
    let sum = checksum(&[&ip]);
    if let Some(slot) = ip.get_mut(10..12) {
        slot.copy_from_slice(&sum.to_be_bytes());
    }
    ip.extend_from_slice(tcp);
    ip
}

fn ipv6_packet(src: &[u8; 16], dst: &[u8; 16], tcp: &[u8]) -> Vec<u8> {
    let mut ip = Vec::with_capacity(40 + tcp.len());
    ip.extend_from_slice(&0x6000_0000u32.to_be_bytes());
    ip.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    ip.push(6); // next header: TCP
    ip.push(64); // hop limit
    ip.extend_from_slice(src);
    ip.extend_from_slice(dst);
    ip.extend_from_slice(tcp);
    ip
}

/// The Internet checksum (RFC 1071) of the concatenation of `parts`, each
/// of even length but the last.
pub(crate) fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut words = part.chunks_exact(2);
        for w in &mut words {
            if let [a, b] = w {
                sum += u32::from(u16::from_be_bytes([*a, *b]));
            }
        }
        if let [last] = words.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
