//! Following an sftp subsystem's file operations, for the recording.
//!
//! Sans I/O: the channel's bytes each way go in ([`SftpFollower::from_client`],
//! [`SftpFollower::from_server`]), the file operations come out. Only what a
//! recording names is read (SFTP v3, draft-ietf-secsh-filexfer-02: the
//! packet framing, the request ids, paths, handles and data lengths); the
//! bytes themselves are relayed untouched by the caller whatever this makes
//! of them. A packet longer than [`MAX_PACKET`] or a malformed one stops the
//! following (said once), never the relay.

use std::collections::HashMap;

/// The longest packet followed: OpenSSH's sftp-server takes at most
/// 256 KiB, plus the framing.
pub const MAX_PACKET: usize = 256 * 1024 + 1024;

/// Requests and handles remembered at once; past that the oldest are not
/// followed (a client with that many open files is not a shell user's).
const MAX_TRACKED: usize = 1024;

const FXP_OPEN: u8 = 3;
const FXP_CLOSE: u8 = 4;
const FXP_READ: u8 = 5;
const FXP_WRITE: u8 = 6;
const FXP_SETSTAT: u8 = 9;
const FXP_OPENDIR: u8 = 11;
const FXP_REMOVE: u8 = 13;
const FXP_MKDIR: u8 = 14;
const FXP_RMDIR: u8 = 15;
const FXP_RENAME: u8 = 18;
const FXP_SYMLINK: u8 = 20;
const FXP_EXTENDED: u8 = 200;
const FXP_HANDLE: u8 = 102;
const FXP_DATA: u8 = 103;

/// One file operation, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftpOp {
    /// `file` (an opened file, closed: its bytes read and written), `list`
    /// (a directory opened), `remove`, `mkdir`, `rmdir`, `rename`,
    /// `hardlink`, `setstat`, `symlink`, or `unfollowed` (the stream could not be
    /// followed from here on; `path` says why).
    pub op: &'static str,
    /// The path (the old one for `rename`, the link for `symlink`).
    pub path: String,
    /// The new path (`rename`) or the link's target (`symlink`).
    pub to: Option<String>,
    /// Bytes the client read from a `file`.
    pub bytes_read: u64,
    /// Bytes the client wrote to a `file`.
    pub bytes_written: u64,
}

impl SftpOp {
    fn named(op: &'static str, path: String, to: Option<String>) -> SftpOp {
        SftpOp {
            op,
            path,
            to,
            bytes_read: 0,
            bytes_written: 0,
        }
    }
}

/// An open file's counts.
struct OpenFile {
    path: String,
    read: u64,
    written: u64,
}

/// What a request waits for from the server.
enum Pending {
    /// The handle of the file (or directory) at this path.
    Open { path: String, dir: bool },
    /// Data read through this handle.
    Read { handle: Vec<u8> },
}

/// The state of one sftp channel.
#[derive(Default)]
pub struct SftpFollower {
    client: Vec<u8>,
    server: Vec<u8>,
    pending: HashMap<u32, Pending>,
    files: HashMap<Vec<u8>, OpenFile>,
    stopped: bool,
}

/// A reader over a packet's fields.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*head))
    }

    fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_be_bytes(*head))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        if len > self.0.len() {
            return None;
        }
        let (value, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(value)
    }

    fn text(&mut self) -> Option<String> {
        self.bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

impl SftpFollower {
    /// Follows bytes the client sent; returns the operations they complete.
    pub fn from_client(&mut self, data: &[u8]) -> Vec<SftpOp> {
        self.feed(data, true)
    }

    /// Follows bytes the server sent.
    pub fn from_server(&mut self, data: &[u8]) -> Vec<SftpOp> {
        self.feed(data, false)
    }

    /// Files still open when the channel ends, as if closed.
    pub fn finish(&mut self) -> Vec<SftpOp> {
        self.files
            .drain()
            .map(|(_, f)| SftpOp {
                op: "file",
                path: f.path,
                to: None,
                bytes_read: f.read,
                bytes_written: f.written,
            })
            .collect()
    }

    fn feed(&mut self, data: &[u8], from_client: bool) -> Vec<SftpOp> {
        let mut ops = Vec::new();
        if self.stopped {
            return ops;
        }
        let buffer = if from_client {
            &mut self.client
        } else {
            &mut self.server
        };
        buffer.extend_from_slice(data);
        let mut packets = Vec::new();
        let mut at = 0;
        let mut fault = None;
        while let Some(head) = buffer.get(at..at + 4) {
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            if len == 0 || len > MAX_PACKET {
                fault = Some(format!("a packet of {len} bytes"));
                break;
            }
            let Some(packet) = buffer.get(at + 4..at + 4 + len) else {
                break;
            };
            packets.push(packet.to_vec());
            at += 4 + len;
        }
        buffer.drain(..at);
        for packet in packets {
            let handled = if from_client {
                self.client_packet(&packet, &mut ops)
            } else {
                self.server_packet(&packet, &mut ops)
            };
            if handled.is_none() {
                fault = Some(format!(
                    "a malformed packet of type {}",
                    packet.first().copied().unwrap_or_default()
                ));
                break;
            }
        }
        if let Some(why) = fault {
            self.stop(&why, &mut ops);
        }
        ops
    }

    fn stop(&mut self, why: &str, ops: &mut Vec<SftpOp>) {
        self.stopped = true;
        self.client = Vec::new();
        self.server = Vec::new();
        ops.extend(self.finish());
        ops.push(SftpOp::named(
            "unfollowed",
            format!("the sftp stream could not be followed past {why}"),
            None,
        ));
    }

    fn client_packet(&mut self, packet: &[u8], ops: &mut Vec<SftpOp>) -> Option<()> {
        let (&kind, body) = packet.split_first()?;
        let mut f = Fields(body);
        match kind {
            FXP_OPEN | FXP_OPENDIR => {
                let id = f.u32()?;
                let path = f.text()?;
                self.expect(
                    id,
                    Pending::Open {
                        path,
                        dir: kind == FXP_OPENDIR,
                    },
                );
            }
            FXP_READ => {
                let id = f.u32()?;
                let handle = f.bytes()?.to_vec();
                self.expect(id, Pending::Read { handle });
            }
            FXP_WRITE => {
                let _id = f.u32()?;
                let handle = f.bytes()?;
                let _offset = f.u64()?;
                let data = f.bytes()?;
                if let Some(file) = self.files.get_mut(handle) {
                    file.written += data.len() as u64;
                }
            }
            FXP_CLOSE => {
                let _id = f.u32()?;
                let handle = f.bytes()?;
                if let Some(file) = self.files.remove(handle) {
                    ops.push(SftpOp {
                        op: "file",
                        path: file.path,
                        to: None,
                        bytes_read: file.read,
                        bytes_written: file.written,
                    });
                }
            }
            FXP_REMOVE | FXP_MKDIR | FXP_RMDIR | FXP_SETSTAT => {
                let _id = f.u32()?;
                let path = f.text()?;
                let op = match kind {
                    FXP_REMOVE => "remove",
                    FXP_MKDIR => "mkdir",
                    FXP_RMDIR => "rmdir",
                    _ => "setstat",
                };
                ops.push(SftpOp::named(op, path, None));
            }
            FXP_RENAME | FXP_SYMLINK => {
                let _id = f.u32()?;
                let first = f.text()?;
                let second = f.text()?;
                let op = if kind == FXP_RENAME {
                    "rename"
                } else {
                    "symlink"
                };
                ops.push(SftpOp::named(op, first, Some(second)));
            }
            FXP_EXTENDED => {
                let _id = f.u32()?;
                let name = f.text()?;
                // OpenSSH's sftp renames with posix-rename, which replaces
                // the target; hardlink makes a second name.
                let op = match name.as_str() {
                    "posix-rename@openssh.com" => "rename",
                    "hardlink@openssh.com" => "hardlink",
                    _ => return Some(()),
                };
                let first = f.text()?;
                let second = f.text()?;
                ops.push(SftpOp::named(op, first, Some(second)));
            }
            // INIT, STAT, READDIR, REALPATH, ...: nothing to record.
            _ => {}
        }
        Some(())
    }

    fn server_packet(&mut self, packet: &[u8], ops: &mut Vec<SftpOp>) -> Option<()> {
        let (&kind, body) = packet.split_first()?;
        let mut f = Fields(body);
        match kind {
            FXP_HANDLE => {
                let id = f.u32()?;
                let handle = f.bytes()?.to_vec();
                if let Some(Pending::Open { path, dir }) = self.pending.remove(&id) {
                    if dir {
                        ops.push(SftpOp::named("list", path, None));
                    } else if self.files.len() < MAX_TRACKED {
                        self.files.insert(
                            handle,
                            OpenFile {
                                path,
                                read: 0,
                                written: 0,
                            },
                        );
                    }
                }
            }
            FXP_DATA => {
                let id = f.u32()?;
                let data = f.bytes()?;
                if let Some(Pending::Read { handle }) = self.pending.remove(&id) {
                    if let Some(file) = self.files.get_mut(&handle) {
                        file.read += data.len() as u64;
                    }
                }
            }
            // VERSION, STATUS, NAME, ATTRS: a status ends a request.
            _ => {
                if kind != 2 {
                    if let Some(id) = f.u32() {
                        self.pending.remove(&id);
                    }
                }
            }
        }
        Some(())
    }

    fn expect(&mut self, id: u32, what: Pending) {
        if self.pending.len() < MAX_TRACKED {
            self.pending.insert(id, what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(kind: u8, fields: &[&[u8]]) -> Vec<u8> {
        let mut body = vec![kind];
        for f in fields {
            body.extend_from_slice(f);
        }
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend(body);
        out
    }

    fn string(s: &[u8]) -> Vec<u8> {
        let mut out = (s.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(s);
        out
    }

    fn id(n: u32) -> Vec<u8> {
        n.to_be_bytes().to_vec()
    }

    #[test]
    fn a_file_written_and_one_read_are_recorded_at_close_with_their_sizes() {
        let mut f = SftpFollower::default();
        // Upload: OPEN, HANDLE, two WRITEs split across reads, CLOSE.
        let open = packet(
            FXP_OPEN,
            &[&id(1), &string(b"/srv/up.txt"), &id(0x1a), &id(0)],
        );
        assert!(f.from_client(&open).is_empty());
        assert!(f
            .from_server(&packet(FXP_HANDLE, &[&id(1), &string(b"h1")]))
            .is_empty());
        let mut writes = packet(
            FXP_WRITE,
            &[
                &id(2),
                &string(b"h1"),
                &0u64.to_be_bytes(),
                &string(&[7; 1000]),
            ],
        );
        writes.extend(packet(
            FXP_WRITE,
            &[
                &id(3),
                &string(b"h1"),
                &1000u64.to_be_bytes(),
                &string(&[7; 24]),
            ],
        ));
        let (a, b) = writes.split_at(700);
        assert!(f.from_client(a).is_empty());
        assert!(f.from_client(b).is_empty());
        let closed = f.from_client(&packet(FXP_CLOSE, &[&id(4), &string(b"h1")]));
        assert_eq!(
            closed,
            [SftpOp {
                op: "file",
                path: "/srv/up.txt".into(),
                to: None,
                bytes_read: 0,
                bytes_written: 1024,
            }]
        );
        // Download: READ answered by DATA.
        f.from_client(&packet(
            FXP_OPEN,
            &[&id(5), &string(b"/etc/hosts"), &id(1), &id(0)],
        ));
        f.from_server(&packet(FXP_HANDLE, &[&id(5), &string(b"h2")]));
        f.from_client(&packet(
            FXP_READ,
            &[&id(6), &string(b"h2"), &0u64.to_be_bytes(), &id(32768)],
        ));
        f.from_server(&packet(FXP_DATA, &[&id(6), &string(&[1; 300])]));
        let still_open = f.finish();
        assert_eq!(still_open.len(), 1);
        assert_eq!(still_open[0].bytes_read, 300);
        assert_eq!(still_open[0].path, "/etc/hosts");
    }

    #[test]
    fn names_changed_are_recorded_and_garbage_stops_the_following_once() {
        let mut f = SftpFollower::default();
        let ops = f.from_client(&packet(
            FXP_RENAME,
            &[&id(1), &string(b"/a"), &string(b"/b")],
        ));
        assert_eq!(
            ops,
            [SftpOp::named("rename", "/a".into(), Some("/b".into()))]
        );
        let ops = f.from_client(&packet(
            FXP_EXTENDED,
            &[
                &id(5),
                &string(b"posix-rename@openssh.com"),
                &string(b"/a"),
                &string(b"/b"),
            ],
        ));
        assert_eq!(
            ops,
            [SftpOp::named("rename", "/a".into(), Some("/b".into()))]
        );
        let ops = f.from_client(&packet(FXP_REMOVE, &[&id(2), &string(b"/b")]));
        assert_eq!(ops[0].op, "remove");
        // A packet whose string runs past its end.
        let ops = f.from_client(&packet(FXP_MKDIR, &[&id(3), &[0, 0, 0, 99]]));
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].op, "unfollowed");
        assert!(f
            .from_client(&packet(FXP_REMOVE, &[&id(4), &string(b"/c")]))
            .is_empty());
        // An oversized length stops another follower.
        let mut g = SftpFollower::default();
        let ops = g.from_server(&u32::MAX.to_be_bytes());
        assert_eq!(ops[0].op, "unfollowed");
        assert!(ops[0].path.contains("4294967295"), "{ops:?}");
    }
}
