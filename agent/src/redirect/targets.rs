//! Turning configured targets into `TARGETS` trie entries (pure, testable).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use tollgate_common::{
    v4_mapped, PortRule, TargetEntry, ACTION_REDIRECT, IPV4_MAPPED_PREFIX, MAX_PORT_RULES,
};

use super::local::LocalTarget;
use crate::config::{Target, TargetAddress};

/// A trie prefix: length in bits over 128, and the 16-byte address.
type Prefix = (u32, [u8; 16]);

/// One trie entry: prefix length over the 16-byte (v4-mapped) address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TrieEntry {
    /// Prefix length in bits, over 128.
    pub(super) prefix_len: u32,
    /// The address, v4-mapped for IPv4.
    pub(super) addr: [u8; 16],
    /// Rules, most specific prefix's first.
    pub(super) entry: TargetEntry,
}

/// A network as (prefix length over 128 bits, 16-byte address).
fn trie_prefix(net: &IpNet) -> (u32, [u8; 16]) {
    match net {
        IpNet::V4(n) => (
            IPV4_MAPPED_PREFIX + u32::from(n.prefix_len()),
            v4_mapped(n.network().octets()),
        ),
        IpNet::V6(n) => (u32::from(n.prefix_len()), n.network().octets()),
    }
}

fn contains(outer: &(u32, [u8; 16]), inner: &(u32, [u8; 16])) -> bool {
    if outer.0 > inner.0 {
        return false;
    }
    let (full_bytes, rest_bits) = ((outer.0 / 8) as usize, outer.0 % 8);
    if outer.1.get(..full_bytes) != inner.1.get(..full_bytes) {
        return false;
    }
    if rest_bits == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest_bits);
    match (outer.1.get(full_bytes), inner.1.get(full_bytes)) {
        (Some(a), Some(b)) => a & mask == b & mask,
        _ => true,
    }
}

/// A trie prefix as a network, IPv4 for v4-mapped addresses.
fn show_prefix(prefix: &Prefix) -> String {
    let (len, addr) = *prefix;
    match tollgate_common::as_v4_mapped(&addr) {
        Some(v4) if len >= IPV4_MAPPED_PREFIX => format!(
            "{}/{}",
            std::net::Ipv4Addr::from(v4),
            len - IPV4_MAPPED_PREFIX
        ),
        _ => format!("{}/{len}", std::net::Ipv6Addr::from(addr)),
    }
}

/// The rules of `map` that apply at `prefix`: its own, then those of every
/// broader prefix holding it, most specific first.
fn covering_rules(map: &BTreeMap<Prefix, Vec<PortRule>>, prefix: &Prefix) -> Vec<PortRule> {
    let mut all = map.get(prefix).cloned().unwrap_or_default();
    let mut broader: Vec<(&Prefix, &Vec<PortRule>)> = map
        .iter()
        .filter(|(p, _)| *p != prefix && contains(p, prefix))
        .collect();
    broader.sort_by_key(|(p, _)| std::cmp::Reverse(p.0));
    for (_, r) in broader {
        all.extend_from_slice(r);
    }
    all
}

/// The rules the kernel can reach at one prefix, configured ones first:
/// it takes the first rule whose range holds the port, so a rule whose
/// range an earlier one already holds never applies (several targets for
/// the same server on this host name the same port) and is left out.
/// Returns the rules and how many of them are configured ones.
fn reachable(configured: Vec<PortRule>, aliases: Vec<PortRule>) -> (Vec<PortRule>, usize) {
    let mut kept: Vec<PortRule> = Vec::new();
    let mut kept_configured = 0;
    let total = configured.len();
    for (i, rule) in configured.into_iter().chain(aliases).enumerate() {
        let shadowed = kept
            .iter()
            .any(|k| k.first <= rule.first && rule.last <= k.last);
        if !shadowed {
            kept.push(rule);
            if i < total {
                kept_configured += 1;
            }
        }
    }
    (kept, kept_configured)
}

/// Builds the trie. Target `i` of `targets` gets index `i + 1` in the rules
/// (0 means "none"). Host-name targets use the addresses in `resolved`.
/// Because the kernel consults only the longest matching prefix, each entry
/// also carries the rules of every broader prefix containing it, after its
/// own.
/// The other local addresses of targets on this host (`local`) get the
/// target's ports as redirects too, after every configured rule that
/// applies there (a broader configured network's included).
pub(super) fn build<'a>(
    targets: impl IntoIterator<Item = (usize, &'a Target)>,
    resolved: &dyn Fn(&str) -> Vec<IpAddr>,
    local: &[LocalTarget],
) -> Result<Vec<TrieEntry>, String> {
    let mut own: BTreeMap<(u32, [u8; 16]), Vec<PortRule>> = BTreeMap::new();
    for (i, target) in targets {
        let index = u32::try_from(i + 1).map_err(|_| "too many targets".to_string())?;
        let nets: Vec<IpNet> = match &target.address {
            TargetAddress::Net(n) => vec![*n],
            TargetAddress::Host(h) => resolved(h).into_iter().map(IpNet::from).collect(),
        };
        for net in nets {
            let rules = own.entry(trie_prefix(&net)).or_default();
            for range in &target.ports {
                rules.push(PortRule {
                    first: range.first,
                    last: range.last,
                    action: ACTION_REDIRECT,
                    _pad: 0,
                    target: index,
                });
            }
        }
    }
    // Kept apart so that a configured target, even one naming a broader
    // network, always comes before a local target's other addresses.
    let mut aliases: BTreeMap<Prefix, Vec<PortRule>> = BTreeMap::new();
    for t in local {
        let index = u32::try_from(t.index + 1).map_err(|_| "too many targets".to_string())?;
        for net in &t.aliases {
            let rules = aliases.entry(trie_prefix(net)).or_default();
            for range in &t.ports {
                rules.push(PortRule {
                    first: range.first,
                    last: range.last,
                    action: ACTION_REDIRECT,
                    _pad: 0,
                    target: index,
                });
            }
        }
    }
    let prefixes: std::collections::BTreeSet<Prefix> =
        own.keys().chain(aliases.keys()).copied().collect();
    let mut entries = Vec::new();
    for prefix in &prefixes {
        let (all, configured) = reachable(
            covering_rules(&own, prefix),
            covering_rules(&aliases, prefix),
        );
        if all.len() > MAX_PORT_RULES {
            let local = match all.len() - configured {
                0 => String::new(),
                n => format!(
                    " ({n} of them because targets on this host are governed on its other local addresses too)"
                ),
            };
            return Err(format!(
                "{} port ranges apply to the address prefix {}{local}; the kernel program holds at most {MAX_PORT_RULES}: merge ranges or targets",
                all.len(),
                show_prefix(prefix)
            ));
        }
        let mut entry = TargetEntry {
            rule_count: all.len() as u32,
            ..TargetEntry::default()
        };
        for (slot, rule) in entry.rules.iter_mut().zip(all) {
            *slot = rule;
        }
        entries.push(TrieEntry {
            prefix_len: prefix.0,
            addr: prefix.1,
            entry,
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{PortRange, Protocol};

    fn target(name: &str, addr: &str, ports: &[(u16, u16)]) -> Target {
        Target {
            name: name.into(),
            address: TargetAddress::parse(addr).unwrap(),
            ports: ports
                .iter()
                .map(|&(first, last)| PortRange { first, last })
                .collect(),
            protocol: Protocol::Postgres,
            tls: crate::config::UpstreamTls::Prefer,
            record_raw: false,
            credentials: Vec::new(),
            client_credentials: Default::default(),
            ssh_known_hosts: None,
        }
    }

    #[test]
    fn ipv4_prefixes_are_v4_mapped_and_nested_rules_are_copied() {
        let ts = [
            target("one", "10.0.0.5", &[(5432, 5432)]),
            target("net", "10.0.0.0/8", &[(5432, 5439)]),
        ];
        let entries = build(ts.iter().enumerate(), &|_| vec![], &[]).unwrap();
        assert_eq!(entries.len(), 2);
        let host = entries.iter().find(|e| e.prefix_len == 128).unwrap();
        assert_eq!(host.addr, v4_mapped([10, 0, 0, 5]));
        assert_eq!(host.entry.rule_count, 2, "own rule, then the /8's");
        assert_eq!(host.entry.rules[0].target, 1);
        assert_eq!(host.entry.rules[1].target, 2);
        let net = entries.iter().find(|e| e.prefix_len == 96 + 8).unwrap();
        assert_eq!(net.entry.rule_count, 1);
        assert_eq!(net.entry.find(5433).map(|r| r.target), Some(2));
    }

    #[test]
    fn host_names_use_resolved_addresses_and_ipv6_is_native() {
        let ts = [
            target("h", "db.internal", &[(5432, 5432)]),
            target("v6", "fd00::/64", &[(5432, 5432)]),
        ];
        let resolve = |h: &str| {
            if h == "db.internal" {
                vec!["192.0.2.7".parse().unwrap()]
            } else {
                vec![]
            }
        };
        let entries = build(ts.iter().enumerate(), &resolve, &[]).unwrap();
        assert!(entries
            .iter()
            .any(|e| e.prefix_len == 128 && e.addr == v4_mapped([192, 0, 2, 7])));
        let v6 = entries.iter().find(|e| e.prefix_len == 64).unwrap();
        assert_eq!(v6.addr[0], 0xfd);
    }

    #[test]
    fn local_aliases_follow_the_configured_rules_of_the_same_prefix() {
        let ts = [
            target("lo", "127.0.0.1", &[(5432, 5432)]),
            target("lan", "10.0.0.5", &[(5432, 5432)]),
        ];
        let local = [LocalTarget {
            index: 1,
            name: "lan".into(),
            ports: ts[1].ports.clone(),
            protocol: Protocol::Postgres,
            aliases: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
        }];
        let entries = build(ts.iter().enumerate(), &|_| vec![], &local).unwrap();
        let at = |len: u32, addr: [u8; 16]| {
            entries
                .iter()
                .find(|e| e.prefix_len == len && e.addr == addr)
                .unwrap()
                .entry
        };
        let exact = at(128, v4_mapped([127, 0, 0, 1]));
        assert_eq!(
            exact.rule_count, 1,
            "the configured rule; the alias of the same port could never apply there"
        );
        assert_eq!(exact.find(5432).map(|r| r.target), Some(1));
        let rest = at(96 + 8, v4_mapped([127, 0, 0, 0]));
        assert_eq!(rest.find(5432).map(|r| r.target), Some(2));
        assert_eq!(rest.find(5433), None, "other ports stay unlisted");
        let v6 = at(128, std::net::Ipv6Addr::LOCALHOST.octets());
        assert_eq!(v6.find(5432).map(|r| r.target), Some(2));
    }

    #[test]
    fn a_configured_network_comes_before_a_local_targets_exact_alias() {
        let ts = [
            target("v4", "10.0.0.5", &[(5432, 5432)]),
            target("v6net", "fd00::/120", &[(5432, 5432)]),
        ];
        // fd00::7 is one of the host's addresses, so v4's port is governed
        // there too, but v6net names it (by its network) and wins.
        let local = [LocalTarget {
            index: 0,
            name: "v4".into(),
            ports: ts[0].ports.clone(),
            protocol: Protocol::Postgres,
            aliases: vec!["fd00::7/128".parse().unwrap()],
        }];
        let entries = build(ts.iter().enumerate(), &|_| vec![], &local).unwrap();
        let addr: std::net::Ipv6Addr = "fd00::7".parse().unwrap();
        let exact = entries
            .iter()
            .find(|e| e.prefix_len == 128 && e.addr == addr.octets())
            .unwrap();
        assert_eq!(exact.entry.rule_count, 1);
        assert_eq!(exact.entry.find(5432).map(|r| r.target), Some(2));
    }

    #[test]
    fn rules_an_earlier_rule_holds_are_left_out_so_many_targets_of_one_local_server_fit() {
        // Five targets for one server on this host (two through listeners,
        // two on addresses of their own, all on its port), each governed on
        // the host's other addresses as well: one rule per prefix reaches.
        let ts = [
            target("relay", "127.0.0.1", &[(5432, 5432)]),
            target("full", "127.0.0.1", &[(5432, 5432)]),
            target("masked", "127.0.0.1", &[(5432, 5432)]),
            target("relay-ebpf", "198.18.252.1", &[(5432, 5432)]),
            target("full-ebpf", "198.18.251.1", &[(5432, 5432), (6000, 6010)]),
        ];
        let local: Vec<LocalTarget> = ts
            .iter()
            .enumerate()
            .map(|(index, t)| LocalTarget {
                index,
                name: t.name.clone(),
                ports: t.ports.clone(),
                protocol: Protocol::Postgres,
                aliases: vec!["127.0.0.1/32".parse().unwrap(), "::1/128".parse().unwrap()],
            })
            .collect();
        let entries = build(ts.iter().enumerate(), &|_| vec![], &local).unwrap();
        let at = |addr: [u8; 16]| {
            entries
                .iter()
                .find(|e| e.prefix_len == 128 && e.addr == addr)
                .unwrap()
                .entry
        };
        let lo = at(v4_mapped([127, 0, 0, 1]));
        assert_eq!(lo.rule_count, 2, "5432 for relay, 6000-6010 for full-ebpf");
        assert_eq!(lo.find(5432).map(|r| r.target), Some(1));
        assert_eq!(lo.find(6005).map(|r| r.target), Some(5));
        let own = at(v4_mapped([198, 18, 251, 1]));
        assert_eq!(own.find(5432).map(|r| r.target), Some(5));
        let v6 = at(std::net::Ipv6Addr::LOCALHOST.octets());
        assert_eq!(v6.rule_count, 2);
        assert_eq!(v6.find(5432).map(|r| r.target), Some(1));
        // A narrower range after a broader one is held by it; the reverse
        // is not.
        let ts = [
            target("wide", "10.0.0.1", &[(5000, 6000)]),
            target("narrow", "10.0.0.1", &[(5432, 5432), (4000, 7000)]),
        ];
        let entries = build(ts.iter().enumerate(), &|_| vec![], &[]).unwrap();
        assert_eq!(entries[0].entry.rule_count, 2, "wide, then 4000-7000");
    }

    #[test]
    fn too_many_rules_for_one_prefix_is_an_error() {
        let ports: Vec<(u16, u16)> = (1..=9).map(|p| (p, p)).collect();
        let ts = [target("many", "10.0.0.1", &ports)];
        assert!(build(ts.iter().enumerate(), &|_| vec![], &[])
            .unwrap_err()
            .contains(
                "apply to the address prefix 10.0.0.1/32; the kernel program holds at most 8"
            ));
    }

    #[test]
    fn prefix_containment() {
        let a = trie_prefix(&"10.0.0.0/8".parse().unwrap());
        let b = trie_prefix(&"10.1.0.0/16".parse().unwrap());
        let c = trie_prefix(&"11.0.0.0/8".parse().unwrap());
        assert!(contains(&a, &b));
        assert!(!contains(&b, &a));
        assert!(!contains(&a, &c));
        let odd = trie_prefix(&"10.128.0.0/9".parse().unwrap());
        assert!(contains(
            &odd,
            &trie_prefix(&"10.200.0.1/32".parse().unwrap())
        ));
        assert!(!contains(
            &odd,
            &trie_prefix(&"10.100.0.1/32".parse().unwrap())
        ));
    }
}
