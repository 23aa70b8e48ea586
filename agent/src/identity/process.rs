//! Reading one process's files under `/proc/<pid>/`. Every parser here takes
//! untrusted text (a process chooses its own `comm` and `cmdline`) and returns
//! `None` rather than panicking on anything unexpected.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// Upper bound for `cmdline` reads (the kernel allows far longer ones).
pub(super) const CMDLINE_CAP: u64 = 256 * 1024;

/// The two fields of `/proc/<pid>/stat` that identity needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Stat {
    pub(super) comm: String,
    pub(super) ppid: u32,
}

/// Parses `/proc/<pid>/stat`: `pid (comm) state ppid ...`. `comm` may contain
/// spaces and parentheses, so it ends at the LAST `)`.
pub(super) fn parse_stat(bytes: &[u8]) -> Option<Stat> {
    let open = bytes.iter().position(|&b| b == b'(')?;
    let close = bytes.iter().rposition(|&b| b == b')')?;
    let comm = bytes.get(open.checked_add(1)?..close)?;
    let rest = std::str::from_utf8(bytes.get(close.checked_add(1)?..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let _state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(Stat {
        comm: String::from_utf8_lossy(comm).into_owned(),
        ppid,
    })
}

/// The most [`read_proc_file`] reads: far more than the `stat`, `status`
/// and `cgroup` files it is used for ever hold.
const MAX_PROC_FILE: u64 = 1 << 20;

/// Reads a small `/proc` file whole. `std::fs::read` and `File`'s own
/// `read_to_end` ask for the size and position first (`statx`, `lseek`;
/// useless for `/proc` files, which report size 0); a lookup reads a dozen
/// such files per connection, so this reads through `take`, which does not
/// ask, straight into a page-sized buffer: open, read, the read that finds
/// the end, close.
pub(super) fn read_proc_file(path: &Path) -> io::Result<Vec<u8>> {
    let (buf, truncated) = read_capped(path, MAX_PROC_FILE)?;
    if truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("longer than {MAX_PROC_FILE} bytes"),
        ));
    }
    Ok(buf)
}

/// [`read_proc_file`] as text; invalid UTF-8 is `InvalidData`.
pub(super) fn read_proc_text(path: &Path) -> io::Result<String> {
    String::from_utf8(read_proc_file(path)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Reads and parses `{dir}/stat`; malformed content is `InvalidData`.
pub(super) fn read_stat(dir: &Path) -> io::Result<Stat> {
    let bytes = read_proc_file(&dir.join("stat"))?;
    parse_stat(&bytes)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed stat line"))
}

/// Real uid and gid (first column of the `Uid:` and `Gid:` lines).
pub(super) fn parse_status_ids(text: &str) -> (Option<u32>, Option<u32>) {
    let mut uid = None;
    let mut gid = None;
    for line in text.lines() {
        let first = |rest: &str| {
            rest.split_ascii_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
        };
        if let Some(rest) = line.strip_prefix("Uid:") {
            uid = first(rest);
        } else if let Some(rest) = line.strip_prefix("Gid:") {
            gid = first(rest);
        }
    }
    (uid, gid)
}

/// Splits NUL-separated arguments; the trailing NUL does not make an empty one.
pub(super) fn parse_cmdline(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|&b| b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

/// The cgroup path: the v2 line (`0::/path`), else the `name=systemd` line,
/// else the first line. Lines are `hierarchy-id:controllers:path`.
pub(super) fn parse_cgroup(text: &str) -> Option<String> {
    let path_of = |line: &str| line.splitn(3, ':').nth(2).map(str::to_owned);
    if let Some(line) = text.lines().find(|l| l.starts_with("0::")) {
        return path_of(line);
    }
    if let Some(line) = text.lines().find(|l| {
        l.split(':')
            .nth(1)
            .is_some_and(|c| c.split(',').any(|c| c == "name=systemd"))
    }) {
        return path_of(line);
    }
    text.lines()
        .find(|l| !l.trim().is_empty())
        .and_then(path_of)
}

/// Reads at most `cap` bytes; the flag says whether the file was longer.
pub(super) fn read_capped(path: &Path, cap: u64) -> io::Result<(Vec<u8>, bool)> {
    let mut buf = Vec::with_capacity(4096);
    File::open(path)?
        .take(cap.saturating_add(1))
        .read_to_end(&mut buf)?;
    let truncated = u64::try_from(buf.len()).map_or(true, |len| len > cap);
    if truncated {
        buf.truncate(usize::try_from(cap).unwrap_or(usize::MAX));
    }
    Ok((buf, truncated))
}

/// `readlink` as a (lossy) string.
pub(super) fn read_link_string(path: &Path) -> io::Result<String> {
    Ok(std::fs::read_link(path)?.to_string_lossy().into_owned())
}

/// Short lowercase reason for a gap note.
pub(super) fn why(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::NotFound => "not found".to_owned(),
        io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => match err.raw_os_error() {
            Some(libc::ESRCH) => "no such process".to_owned(),
            Some(libc::EACCES | libc::EPERM) => "permission denied".to_owned(),
            _ => err.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn stat_comm_with_spaces_and_parens() {
        let line = b"4242 (my (weird) comm) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                comm: "my (weird) comm".to_owned(),
                ppid: 17
            })
        );
        assert_eq!(
            parse_stat(b"1 (a) b) c) R 0 1 1"),
            Some(Stat {
                comm: "a) b) c".to_owned(),
                ppid: 0
            })
        );
        assert_eq!(
            parse_stat(b"7 () S 1 7"),
            Some(Stat {
                comm: String::new(),
                ppid: 1
            })
        );
    }

    #[test]
    fn stat_malformed() {
        for bad in [
            &b""[..],
            b"4242 comm S 1",
            b"4242 (comm S 1",
            b"4242 comm) S 1",
            b"4242 )( S 1",
            b"4242 (comm) S",
            b"4242 (comm) S -1",
            b"4242 (comm) S x",
            b"4242 (comm)",
        ] {
            assert_eq!(parse_stat(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn status_ids_take_real_id() {
        let text = "Name:\tpsql\nUid:\t1000\t0\t0\t0\nGid:\t100\t100\t100\t100\n";
        assert_eq!(parse_status_ids(text), (Some(1000), Some(100)));
        assert_eq!(parse_status_ids("Uid:\tx\nGid:\n"), (None, None));
        assert_eq!(parse_status_ids(""), (None, None));
    }

    #[test]
    fn cmdline_splitting() {
        assert_eq!(parse_cmdline(b"psql\0-h\0db\0"), ["psql", "-h", "db"]);
        assert_eq!(parse_cmdline(b"a\0\0b\0"), ["a", "", "b"]);
        assert_eq!(parse_cmdline(b"no-trailing-nul"), ["no-trailing-nul"]);
        assert!(parse_cmdline(b"").is_empty());
    }

    #[test]
    fn cgroup_v2_then_systemd_then_first() {
        let hybrid = "9:name=systemd:/user.slice/x.scope\n4:memory:/m\n0::/ci/job-1\n";
        assert_eq!(parse_cgroup(hybrid).as_deref(), Some("/ci/job-1"));
        let v1 = "4:memory:/m\n1:name=systemd:/system.slice/runner.service\n";
        assert_eq!(
            parse_cgroup(v1).as_deref(),
            Some("/system.slice/runner.service")
        );
        assert_eq!(
            parse_cgroup("\n4:cpu,cpuacct:/a:b\n").as_deref(),
            Some("/a:b")
        );
        assert_eq!(parse_cgroup("garbage"), None);
        assert_eq!(parse_cgroup(""), None);
    }

    #[test]
    fn capped_reads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(read_capped(&p, 4).unwrap(), (b"0123".to_vec(), true));
        assert_eq!(
            read_capped(&p, 10).unwrap(),
            (b"0123456789".to_vec(), false)
        );
        assert_eq!(
            why(&read_capped(&dir.path().join("x"), 1).unwrap_err()),
            "not found"
        );
    }
}
