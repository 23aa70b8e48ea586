//! Targets on this host, and the other addresses that reach them.
//!
//! A server on this host that a target names by one address (the host's
//! LAN address, say) usually listens on others too: `127.0.0.1`, `::1`,
//! the host's other interface addresses, and whatever `0.0.0.0` or `::`
//! reach when connected to. Unlisted loopback always passes, so without
//! more a governed `psql -h 127.0.0.1` would skip the gate. So a target
//! whose address is local (loopback, one of the host's addresses, or a
//! network holding one) also governs its ports on every local address:
//! those are added to the `TARGETS` trie as redirects to that target,
//! after the configured rules. The agent's own upstream connections are
//! not affected: the agent runs outside every governed cgroup, so the hooks
//! never see them.
//!
//! What the host's addresses are is read once, when the trie is filled: an
//! address added later is covered from the agent's next start.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::config::{Config, PortRange, Protocol, Target, TargetAddress};

/// A target on this host and the addresses its ports are also governed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTarget {
    /// 0-based index of the target in the configuration.
    pub index: usize,
    /// The target's name.
    pub name: String,
    /// Its ports.
    pub ports: Vec<PortRange>,
    /// Its protocol (a Unix socket is looked for only for PostgreSQL).
    pub protocol: Protocol,
    /// The local addresses, other than those the target names itself, on
    /// which its ports are governed as the target.
    pub aliases: Vec<IpNet>,
}

impl LocalTarget {
    /// `target X is local: ports P on 127.0.0.1, ::1, ... are governed as X`.
    pub fn describe(&self) -> String {
        let ports: Vec<String> = self.ports.iter().map(ToString::to_string).collect();
        let addrs: Vec<String> = self.aliases.iter().map(show_net).collect();
        format!(
            "target {name} is local: ports {ports} on {addrs} are governed as {name}",
            name = self.name,
            ports = ports.join(", "),
            addrs = addrs.join(", "),
        )
    }
}

/// A single address without its `/32` or `/128`.
fn show_net(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// The addresses every host has that reach itself: loopback, and the
/// unspecified addresses (Linux connects `0.0.0.0` and `::` to the host).
fn always_local() -> [IpNet; 4] {
    [
        IpNet::new_assert(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
        IpNet::new_assert(IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
        IpNet::new_assert(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 32),
        IpNet::new_assert(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 128),
    ]
}

/// The targets of `targets` that live on this host, given the addresses
/// host-name targets resolved to and the host's interface addresses.
/// Pure: `resolved` and `host` are passed in.
pub(crate) fn local_targets<'a>(
    targets: impl IntoIterator<Item = (usize, &'a Target)>,
    resolved: &dyn Fn(&str) -> Vec<IpAddr>,
    host: &[IpAddr],
) -> Vec<LocalTarget> {
    let mut local: Vec<IpNet> = always_local().to_vec();
    for ip in host {
        let net = IpNet::from(*ip);
        if !local.iter().any(|l| l.contains(&net)) {
            local.push(net);
        }
    }
    let mut out = Vec::new();
    for (index, target) in targets {
        let own: Vec<IpNet> = match &target.address {
            TargetAddress::Net(n) => vec![*n],
            TargetAddress::Host(h) => resolved(h).into_iter().map(IpNet::from).collect(),
        };
        // Local when one of its addresses is one of the host's, or one of
        // its networks holds one of the host's addresses.
        let is_local = own
            .iter()
            .any(|o| local.iter().any(|l| l.contains(o) || o.contains(l)));
        if !is_local {
            continue;
        }
        let aliases: Vec<IpNet> = local
            .iter()
            .filter(|l| !own.iter().any(|o| o.contains(*l)))
            .copied()
            .collect();
        if aliases.is_empty() {
            continue;
        }
        out.push(LocalTarget {
            index,
            name: target.name.clone(),
            ports: target.ports.clone(),
            protocol: target.protocol,
            aliases,
        });
    }
    out
}

/// The local targets of `config`, resolving host names and reading the
/// host's addresses now.
pub fn local_targets_of(config: &Config) -> Vec<LocalTarget> {
    let resolved = super::resolve_host_targets(config);
    let host = match host_addresses() {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("cannot list this host's addresses ({e}); only loopback counts as local for targets");
            Vec::new()
        }
    };
    local_targets(
        config.targets.iter().enumerate(),
        &|h| {
            resolved
                .iter()
                .filter(|(name, _)| name == h)
                .map(|(_, ip)| *ip)
                .collect()
        },
        &host,
    )
}

/// Every address configured on this host's interfaces (`getifaddrs`).
pub fn host_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head` and allocates the
    // list, which is freed below with freeifaddrs exactly once.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::getifaddrs(&mut head) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a non-null node of the list getifaddrs made,
        // alive until freeifaddrs; `ifa_addr` is null or points at a
        // sockaddr whose `sa_family` says which sockaddr it is, so reading it
        // as sockaddr_in / sockaddr_in6 for AF_INET / AF_INET6 is sound.
        #[allow(unsafe_code)]
        unsafe {
            let node = &*cursor;
            if !node.ifa_addr.is_null() {
                match i32::from((*node.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(node.ifa_addr as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(node.ifa_addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cursor = node.ifa_next;
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    #[allow(unsafe_code)]
    unsafe {
        libc::freeifaddrs(head)
    };
    out.sort();
    out.dedup();
    Ok(out)
}

/// Where PostgreSQL servers usually put their Unix sockets (Debian's
/// default, and upstream's).
pub fn postgres_socket_dirs() -> [&'static Path; 3] {
    [
        Path::new("/var/run/postgresql"),
        Path::new("/run/postgresql"),
        Path::new("/tmp"),
    ]
}

/// The warning for a local target's socket that governed processes can use.
pub fn unix_socket_warning(target: &str, socket: &Path) -> String {
    format!(
        "target {target} is also reachable on the Unix socket {}, which any local user can connect to: connections through it are not governed; remove the socket directory from unix_socket_directories, or make it unreadable by the users governed processes run as (chmod o-rwx)",
        socket.display()
    )
}

/// For each local PostgreSQL target, the Unix sockets in `dirs` for its
/// ports that any local user can connect to (the socket is writable by
/// others and every directory above it searchable by others): connections
/// through them are no `connect4/6` event and are not governed.
pub fn open_unix_sockets(local: &[LocalTarget], dirs: &[&Path]) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for t in local.iter().filter(|t| t.protocol == Protocol::Postgres) {
        for range in &t.ports {
            // A socket per port: a wide range would mean many lookups, and
            // a server has few; the first 64 ports of a range are enough.
            for port in (range.first..=range.last).take(64) {
                for dir in dirs {
                    let path = dir.join(format!(".s.PGSQL.{port}"));
                    if world_connectable(&path) {
                        out.push((t.name.clone(), path));
                    }
                }
            }
        }
    }
    out
}

/// Whether a user who is neither owner nor group could connect to the
/// socket at `path`: write permission on it and search permission on every
/// directory above it.
fn world_connectable(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if meta.permissions().mode() & 0o002 == 0 {
        return false;
    }
    path.ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
        .all(|a| std::fs::metadata(a).is_ok_and(|m| m.mode() & 0o001 != 0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::UpstreamTls;

    fn target(name: &str, addr: &str, port: u16) -> Target {
        Target {
            name: name.into(),
            address: TargetAddress::parse(addr).unwrap(),
            ports: vec![PortRange {
                first: port,
                last: port,
            }],
            protocol: Protocol::Postgres,
            tls: UpstreamTls::Prefer,
            record_raw: false,
            credentials: Vec::new(),
            client_credentials: Default::default(),
            ssh_known_hosts: None,
        }
    }

    fn shown(t: &LocalTarget) -> Vec<String> {
        t.aliases.iter().map(show_net).collect()
    }

    #[test]
    fn a_target_on_a_host_address_is_local_and_covers_loopback_and_the_others() {
        let host: Vec<IpAddr> = vec![
            "127.0.0.1".parse().unwrap(),
            "10.0.0.5".parse().unwrap(),
            "192.168.1.7".parse().unwrap(),
            "::1".parse().unwrap(),
            "fe80::1".parse().unwrap(),
        ];
        let ts = [
            target("lan", "10.0.0.5", 5432),
            target("remote", "10.0.0.6", 5433),
        ];
        let local = local_targets(ts.iter().enumerate(), &|_| vec![], &host);
        assert_eq!(local.len(), 1, "{local:?}");
        assert_eq!(local[0].index, 0);
        assert_eq!(
            shown(&local[0]),
            [
                "127.0.0.0/8",
                "::1",
                "0.0.0.0",
                "::",
                "192.168.1.7",
                "fe80::1"
            ]
        );
        assert_eq!(
            local[0].describe(),
            "target lan is local: ports 5432 on 127.0.0.0/8, ::1, 0.0.0.0, ::, 192.168.1.7, fe80::1 are governed as lan"
        );
    }

    #[test]
    fn loopback_host_names_and_networks_holding_a_host_address_are_local() {
        let host: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap()];
        let ts = [
            target("lo", "127.0.0.1", 5432),
            target("named", "db.internal", 5433),
            target("net", "10.0.0.0/24", 5434),
            target("v6lo", "::1", 5435),
        ];
        let resolve = |h: &str| {
            if h == "db.internal" {
                vec!["10.0.0.5".parse().unwrap()]
            } else {
                vec![]
            }
        };
        let local = local_targets(ts.iter().enumerate(), &resolve, &host);
        let names: Vec<&str> = local.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["lo", "named", "net", "v6lo"]);
        // 127.0.0.1 lies in 127.0.0.0/8, which is still added: the rest of
        // loopback reaches the same server.
        assert!(shown(&local[0]).contains(&"127.0.0.0/8".to_string()));
        assert!(shown(&local[0]).contains(&"10.0.0.5".to_string()));
        // The network's own address is not repeated.
        assert!(!shown(&local[2]).contains(&"10.0.0.5".to_string()));
        assert!(!shown(&local[3]).contains(&"::1".to_string()));
    }

    #[test]
    fn a_remote_target_is_not_local() {
        let host: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap()];
        let ts = [target("far", "203.0.113.9", 5432)];
        assert!(local_targets(ts.iter().enumerate(), &|_| vec![], &host).is_empty());
    }

    #[test]
    fn this_hosts_addresses_include_loopback() {
        let addrs = host_addresses().unwrap();
        assert!(
            addrs.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{addrs:?}"
        );
    }

    #[test]
    fn only_sockets_others_can_reach_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join(".s.PGSQL.5999");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let local = [LocalTarget {
            index: 0,
            name: "db".into(),
            ports: vec![PortRange {
                first: 5999,
                last: 5999,
            }],
            protocol: Protocol::Postgres,
            aliases: vec![],
        }];
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let found = open_unix_sockets(&local, &[dir.path()]);
        // Only when every directory above is searchable by others.
        let reachable = path
            .ancestors()
            .skip(1)
            .all(|a| a.as_os_str().is_empty() || std::fs::metadata(a).unwrap().mode() & 1 != 0);
        assert_eq!(found.len(), usize::from(reachable), "{found:?}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o770)).unwrap();
        assert!(open_unix_sockets(&local, &[dir.path()]).is_empty());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
        assert!(open_unix_sockets(&local, &[dir.path()]).is_empty());
    }
}
