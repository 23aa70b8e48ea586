//! Finding the socket of a loopback connection in `/proc/net/tcp{,6}` and the
//! process that holds it.
//!
//! The kernel prints each address as hex of the in-memory (network order)
//! bytes read as native 32-bit words (`%08X`), and the port as a host-order
//! 16-bit number (`%04X`). On x86 and arm64 `127.0.0.1:5432` is therefore
//! `0100007F:1538`. IPv6 addresses are four such words.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::IdentityError;

/// One row of `/proc/net/tcp` or `/proc/net/tcp6`, reduced to what we need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TcpRow {
    pub(super) local: SocketAddr,
    pub(super) remote: SocketAddr,
    pub(super) uid: u32,
    pub(super) inode: u64,
}

/// Where a matching row was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FoundRow {
    pub(super) uid: u32,
    pub(super) inode: u64,
}

/// Turns an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) into IPv4, so that a
/// connection is matched whichever family the proxy or the kernel reports.
pub(super) fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Parses one 32-bit word as the kernel prints it (`%08X` of a native u32
/// holding network-order bytes).
fn parse_word(hex: &str) -> Option<[u8; 4]> {
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes)
}

/// Parses `ADDR:PORT` in the kernel's hex format, IPv4 (8 digits) or IPv6 (32).
pub(super) fn parse_hex_addr(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    if port.len() != 4 || !port.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(parse_word(addr)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                let word = addr.get(i * 8..i * 8 + 8)?;
                chunk.copy_from_slice(&parse_word(word)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Parses one data line of `/proc/net/tcp{,6}`; `None` for the header and for
/// anything malformed.
pub(super) fn parse_row(line: &str) -> Option<TcpRow> {
    let mut fields = line.split_whitespace();
    let slot = fields.next()?;
    if !slot.ends_with(':') {
        return None;
    }
    let local = parse_hex_addr(fields.next()?)?;
    let remote = parse_hex_addr(fields.next()?)?;
    // st, tx_queue:rx_queue, tr:tm->when, retrnsmt
    let mut fields = fields.skip(4);
    let uid = fields.next()?.parse().ok()?;
    let _timeout = fields.next()?;
    let inode = fields.next()?.parse().ok()?;
    Some(TcpRow {
        local,
        remote,
        uid,
        inode,
    })
}

/// Looks the connection up in the table files that may hold it. Rows with a
/// live inode win over rows without one (e.g. a `TIME_WAIT` leftover of an
/// earlier connection with the same 4-tuple).
pub(super) fn find_row(
    proc_root: &Path,
    client: SocketAddr,
    server: SocketAddr,
) -> Result<FoundRow, IdentityError> {
    let client = canonical(client);
    let server = canonical(server);
    let files: &[&str] = match (client, server) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => &["tcp", "tcp6"],
        (SocketAddr::V6(_), SocketAddr::V6(_)) => &["tcp6"],
        _ => return Err(IdentityError::FamilyMismatch { client, server }),
    };
    let mut searched = Vec::new();
    let mut ownerless: Option<u32> = None;
    let mut read_errors = Vec::new();
    for name in files {
        let path = proc_root.join("net").join(name);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            // tcp6 is absent when IPv6 is disabled; that is no error for IPv4.
            Err(e) if e.kind() == io::ErrorKind::NotFound && files.len() > 1 && *name == "tcp6" => {
                continue
            }
            Err(source) => {
                read_errors.push(IdentityError::Read { path, source });
                continue;
            }
        };
        searched.push(path.display().to_string());
        for row in text.lines().filter_map(parse_row) {
            if canonical(row.local) != client || canonical(row.remote) != server {
                continue;
            }
            if row.inode != 0 {
                return Ok(FoundRow {
                    uid: row.uid,
                    inode: row.inode,
                });
            }
            ownerless = Some(row.uid);
        }
    }
    if let Some(uid) = ownerless {
        return Err(IdentityError::SocketClosed {
            client,
            server,
            uid,
        });
    }
    if searched.is_empty() {
        if let Some(err) = read_errors.into_iter().next() {
            return Err(err);
        }
    }
    Err(IdentityError::SocketNotFound {
        client,
        server,
        searched: searched.join(" and "),
    })
}

/// The pid handed out last (the last field of `loadavg`), if known.
fn last_pid(proc_root: &Path) -> Option<u32> {
    let text = fs::read_to_string(proc_root.join("loadavg")).ok()?;
    text.split_whitespace().nth(4)?.parse().ok()
}

/// Numeric entries of `proc_root` (thread-group leaders only: `/proc` does
/// not list thread ids), newest first: pids count down from the last one
/// handed out, then wrap around to the highest (pids are reused from the
/// bottom once `pid_max` is reached). Without `loadavg`, highest first.
/// The entries are kept so that each directory's owner is read only when
/// needed.
fn list_pids(proc_root: &Path) -> Result<Vec<(u32, fs::DirEntry)>, IdentityError> {
    let entries = fs::read_dir(proc_root).map_err(|source| IdentityError::Read {
        path: proc_root.to_path_buf(),
        source,
    })?;
    let mut pids: Vec<_> = entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((pid, entry))
        })
        .collect();
    let last = last_pid(proc_root).unwrap_or(u32::MAX);
    pids.sort_unstable_by_key(|&(pid, _)| (pid > last, std::cmp::Reverse(pid)));
    Ok(pids)
}

/// True when one of `pid`'s descriptors is `socket:[inode]`. Unreadable or
/// vanished processes are simply `false`.
pub(super) fn holds_socket(proc_root: &Path, pid: u32, inode: u64) -> bool {
    holds_target(proc_root, pid, format!("socket:[{inode}]").as_bytes())
}

/// Reads the `fd` links of `pid`. A process whose `fd` directory cannot be
/// opened (another user's, or exited) costs one failed `open`; a kernel
/// thread's is empty.
fn holds_target(proc_root: &Path, pid: u32, target: &[u8]) -> bool {
    let Ok(fds) = fs::read_dir(proc_root.join(pid.to_string()).join("fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path())
            .map(|link| OsStr::as_bytes(link.as_os_str()) == target)
            .unwrap_or(false)
    })
}

/// Finds a process holding `socket:[inode]`. Processes whose `/proc/<pid>`
/// directory belongs to `uid` are scanned first (the socket's creator is
/// almost always among them), newest first (see [`list_pids`]); then every
/// other process, newest first. Each directory's owner is read on the way
/// down and the others' pids are put aside, so a holder among the newest
/// processes of `uid` is found without a `stat` of every pid.
/// The first holder found is returned: a socket passed to several processes
/// (inherited across `fork`, or sent over a unix socket) yields only one.
pub(super) fn find_pid_for_inode(
    proc_root: &Path,
    inode: u64,
    uid: u32,
) -> Result<Option<u32>, IdentityError> {
    let target = format!("socket:[{inode}]");
    let mut others = Vec::new();
    for (pid, entry) in list_pids(proc_root)? {
        // `DirEntry::metadata` does not follow symlinks (`/proc/self`); a
        // vanished pid has no owner and is put aside with the others.
        if entry.metadata().is_ok_and(|m| m.uid() == uid) {
            if holds_target(proc_root, pid, target.as_bytes()) {
                return Ok(Some(pid));
            }
        } else {
            others.push(pid);
        }
    }
    Ok(others
        .into_iter()
        .find(|&pid| holds_target(proc_root, pid, target.as_bytes())))
}

#[cfg(test)]
pub(super) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::os::unix::fs::symlink;

    fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Encodes an address the way the kernel prints it, for fixtures.
    pub(crate) fn hex_addr(addr: SocketAddr) -> String {
        let ip = match addr.ip() {
            IpAddr::V4(ip) => format!("{:08X}", u32::from_ne_bytes(ip.octets())),
            IpAddr::V6(ip) => ip
                .octets()
                .chunks_exact(4)
                .map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        };
        format!("{ip}:{:04X}", addr.port())
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn parses_ipv4_as_printed_on_x86() {
        assert_eq!(parse_hex_addr("0100007F:1538"), Some(v4("127.0.0.1:5432")));
        assert_eq!(parse_hex_addr("0500000A:9C40"), Some(v4("10.0.0.5:40000")));
        assert_eq!(parse_hex_addr("00000000:0000"), Some(v4("0.0.0.0:0")));
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn parses_ipv6_and_v4_mapped_as_printed_on_x86() {
        assert_eq!(
            parse_hex_addr("00000000000000000000000001000000:1922"),
            Some("[::1]:6434".parse().unwrap())
        );
        let mapped = parse_hex_addr("0000000000000000FFFF00000100007F:9C40").unwrap();
        assert_eq!(mapped, "[::ffff:127.0.0.1]:40000".parse().unwrap());
        assert_eq!(canonical(mapped), v4("127.0.0.1:40000"));
        assert_eq!(
            parse_hex_addr("B80D0120000000000000000001000000:0050"),
            Some("[2001:db8::1]:80".parse().unwrap())
        );
    }

    #[test]
    fn rejects_malformed_addresses() {
        for bad in [
            "",
            "0100007F",
            "0100007F:",
            "0100007F:15385",
            "0100007:1538",
            "0100007G:1538",
            "+100007F:1538",
            "0000000000000000FFFF00000100007:1538",
            "0100007F:+538",
        ] {
            assert_eq!(parse_hex_addr(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn round_trips_fixture_encoding() {
        for a in [
            "127.0.0.1:40000",
            "[::1]:6432",
            "[fe80::1:2:3:4]:1",
            "192.168.1.20:65535",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(parse_hex_addr(&hex_addr(a)), Some(a));
        }
    }

    #[test]
    fn parses_real_looking_rows_and_skips_header() {
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";
        assert_eq!(parse_row(header), None);
        let line = format!(
            "   1: {} {} 01 00000000:00000000 00:00000000 00000000  1000        0 12345 1 0000000000000000 20 4 30 10 -1",
            hex_addr(v4("127.0.0.1:40000")),
            hex_addr(v4("127.0.0.1:6432"))
        );
        assert_eq!(
            parse_row(&line),
            Some(TcpRow {
                local: v4("127.0.0.1:40000"),
                remote: v4("127.0.0.1:6432"),
                uid: 1000,
                inode: 12345
            })
        );
        assert_eq!(parse_row("   1: 0100007F:1538 garbage"), None);
    }

    pub(crate) fn table(rows: &[(SocketAddr, SocketAddr, u32, u64)]) -> String {
        let mut s = String::from("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n");
        for (i, (l, r, uid, inode)) in rows.iter().enumerate() {
            s.push_str(&format!(
                "{i:4}: {} {} 01 00000000:00000000 00:00000000 00000000 {uid:5}        0 {inode} 1 0000000000000000 20 4 30 10 -1\n",
                hex_addr(*l),
                hex_addr(*r)
            ));
        }
        s
    }

    fn write_tables(root: &Path, tcp: &str, tcp6: &str) {
        fs::create_dir_all(root.join("net")).unwrap();
        fs::write(root.join("net/tcp"), tcp).unwrap();
        fs::write(root.join("net/tcp6"), tcp6).unwrap();
    }

    #[test]
    fn finds_ipv4_row_in_tcp_and_v4_mapped_row_in_tcp6() {
        let dir = tempfile::tempdir().unwrap();
        let c = v4("127.0.0.1:40000");
        let s = v4("127.0.0.1:6432");
        let mapped = |a: SocketAddr| match a {
            SocketAddr::V4(v) => SocketAddr::new(IpAddr::V6(v.ip().to_ipv6_mapped()), v.port()),
            other => other,
        };
        // The proxy's own end (local = server) must not match.
        write_tables(
            dir.path(),
            &table(&[(s, c, 0, 999), (c, s, 1000, 12345)]),
            &table(&[]),
        );
        assert_eq!(
            find_row(dir.path(), c, s).unwrap(),
            FoundRow {
                uid: 1000,
                inode: 12345
            }
        );

        write_tables(
            dir.path(),
            &table(&[]),
            &table(&[(mapped(c), mapped(s), 1001, 777)]),
        );
        assert_eq!(
            find_row(dir.path(), c, s).unwrap(),
            FoundRow {
                uid: 1001,
                inode: 777
            }
        );
        // The proxy may see the client as v4-mapped when it listens on [::].
        assert_eq!(
            find_row(dir.path(), mapped(c), mapped(s)).unwrap(),
            FoundRow {
                uid: 1001,
                inode: 777
            }
        );
    }

    #[test]
    fn ipv6_row_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let c: SocketAddr = "[::1]:40001".parse().unwrap();
        let s: SocketAddr = "[::1]:6432".parse().unwrap();
        write_tables(dir.path(), &table(&[]), &table(&[(c, s, 0, 4242)]));
        assert_eq!(
            find_row(dir.path(), c, s).unwrap(),
            FoundRow {
                uid: 0,
                inode: 4242
            }
        );

        let other = v4("127.0.0.1:1");
        let err = find_row(dir.path(), other, v4("127.0.0.1:6432")).unwrap_err();
        assert!(matches!(err, IdentityError::SocketNotFound { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("no tcp socket 127.0.0.1:1 -> 127.0.0.1:6432 in "),
            "{err}"
        );

        let err = find_row(dir.path(), other, s).unwrap_err();
        assert!(matches!(err, IdentityError::FamilyMismatch { .. }), "{err}");

        // A row without inode: the owner closed its socket (TIME_WAIT).
        let c4 = v4("127.0.0.1:40002");
        let s4 = v4("127.0.0.1:6432");
        write_tables(dir.path(), &table(&[(c4, s4, 1000, 0)]), &table(&[]));
        let err = find_row(dir.path(), c4, s4).unwrap_err();
        assert!(
            matches!(err, IdentityError::SocketClosed { uid: 1000, .. }),
            "{err}"
        );

        // A live row wins over a TIME_WAIT leftover with the same 4-tuple.
        write_tables(
            dir.path(),
            &table(&[(c4, s4, 1000, 0), (c4, s4, 1000, 55)]),
            &table(&[]),
        );
        assert_eq!(
            find_row(dir.path(), c4, s4).unwrap(),
            FoundRow {
                uid: 1000,
                inode: 55
            }
        );

        // IPv4 works without tcp6 (IPv6 disabled), but an absent tcp is reported.
        fs::remove_file(dir.path().join("net/tcp6")).unwrap();
        assert!(find_row(dir.path(), c4, s4).is_ok());
        fs::remove_file(dir.path().join("net/tcp")).unwrap();
        let err = find_row(dir.path(), c4, s4).unwrap_err();
        assert!(matches!(err, IdentityError::Read { .. }), "{err}");
    }

    #[test]
    fn finds_holder_by_fd_symlinks_and_skips_non_pids() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (pid, links) in [
            ("100", vec![("0", "/dev/null"), ("3", "socket:[111]")]),
            ("200", vec![("0", "pipe:[5]"), ("7", "socket:[12345]")]),
            ("300", vec![]),
        ] {
            fs::create_dir_all(root.join(pid).join("fd")).unwrap();
            for (fd, target) in links {
                symlink(target, root.join(pid).join("fd").join(fd)).unwrap();
            }
        }
        fs::create_dir_all(root.join("net")).unwrap();
        fs::create_dir_all(root.join("400")).unwrap(); // no fd dir: skipped
        symlink("200", root.join("self")).unwrap();
        assert_eq!(find_pid_for_inode(root, 12345, 1000).unwrap(), Some(200));
        assert_eq!(find_pid_for_inode(root, 111, 0).unwrap(), Some(100));
        assert_eq!(find_pid_for_inode(root, 1234, 0).unwrap(), None);
        assert!(find_pid_for_inode(&root.join("missing"), 1, 0).is_err());
    }

    #[test]
    fn newest_holder_wins_across_pid_wraparound() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for pid in ["100", "300"] {
            fs::create_dir_all(root.join(pid).join("fd")).unwrap();
            symlink("socket:[12345]", root.join(pid).join("fd").join("3")).unwrap();
        }
        let uid = fs::metadata(root).unwrap().uid();
        // Without `loadavg`, the highest pid is taken for the newest.
        assert_eq!(find_pid_for_inode(root, 12345, uid).unwrap(), Some(300));
        // Pids wrapped: 150 was handed out last, so 100 is newer than 300.
        fs::write(root.join("loadavg"), "0.10 0.20 0.30 2/93 150\n").unwrap();
        assert_eq!(find_pid_for_inode(root, 12345, uid).unwrap(), Some(100));
        fs::write(root.join("loadavg"), "0.10 0.20 0.30 2/93 400\n").unwrap();
        assert_eq!(find_pid_for_inode(root, 12345, uid).unwrap(), Some(300));
        // No process of the socket's uid: the others, in the same order.
        assert_eq!(find_pid_for_inode(root, 12345, uid + 1).unwrap(), Some(300));
    }
}
