//! Protected targets (`[protect]`): host-wide detection of connections that
//! skip the redirect.
//!
//! `tollgate_protect4`/`tollgate_protect6` are attached once, to the cgroup
//! v2 root. The kernel runs a cgroup's own connect programs before its
//! ancestors', so a governed connection reaches the root already rewritten
//! to the proxy and passes; a connect that still names a protected target
//! skipped the redirect (an ungoverned process, or a socket created outside
//! a governed cgroup and connected inside it). It is reported through the
//! `PROTECT_EVENTS` ring buffer and, in deny mode, refused with `EPERM`. The
//! agent's own upstream connections are exempt by its tgid and its start
//! time (so a process that gets the pid of a dead agent is not), which the
//! agent writes into `PROTECT_CONFIG` at every start.
//!
//! The protect instance is a load of the same object as the redirect, with
//! its own pinned maps, under `<pin_dir>/protect/maps/<MAP>`, and its links
//! under `<pin_dir>/protect/links/<program>`. The pinned links keep the
//! protection after the agent exits or crashes (in deny mode: fail closed);
//! the next start re-adopts them and refills the maps. `tollgate detach`
//! removes them with the rest of the pin directory.

use std::collections::HashSet;
use std::fs;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::CgroupAttachMode;
use aya::{Ebpf, EbpfLoader};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tollgate_common::{
    as_v4_mapped, ProtectConfig, ProtectEvent, PROTECT_F_DENY, PROTECT_STAT_AUDITED,
    PROTECT_STAT_DENIED, PROTECT_STAT_DROPPED, PROTECT_STAT_ERRORS, PROTECT_STAT_EXEMPT,
    PROTECT_VERDICT_DENY,
};

use super::attachments::{self, AttachPoint, KernelAttachment};
use super::local::LocalTarget;
use super::targets::TrieEntry;
use super::{classify, io_error, pins, RedirectError, PROGRAMS};
use crate::config::{Config, ProtectMode, ProtectSettings};
use crate::metrics::Metrics;

/// The directory under `redirect.pin_dir` that holds protect's pins.
pub(super) const DIR_NAME: &str = "protect";

const PROGRAM_NAMES: [&str; 2] = ["tollgate_protect4", "tollgate_protect6"];
const PINNED_MAPS: [&str; 5] = [
    "PROTECT_CONFIG",
    "PROTECT_TARGETS",
    "PROTECT_EVENTS",
    "PROTECT_STATS",
    // Pinned too, so that programs re-adopted after a restart read the
    // offsets this load writes.
    "TASK_OFFSETS",
];
/// The redirect's large maps, unused by this load: kept to a minimum so the
/// second load of the object costs little kernel memory.
const UNUSED_LRU_MAPS: [&str; 2] = ["PENDING", "ORIGINS"];
const UNUSED_LRU_ENTRIES: u32 = 64;

/// Counters kept by the protect programs, summed over CPUs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProtectStats {
    /// Connects to a protected target let through and reported (audit).
    pub audited: u64,
    /// Connects to a protected target refused (deny).
    pub denied: u64,
    /// The agent's own upstream connects, let through unreported.
    pub exempt: u64,
    /// Reports lost because the ring buffer was full.
    pub dropped: u64,
    /// Connects seen without a configuration (let through).
    pub errors: u64,
}

/// Protection in the status report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProtectView {
    /// `audit` or `deny`.
    pub mode: String,
    /// The cgroup the programs are attached to (the cgroup v2 root).
    pub cgroup: String,
    /// The protected targets.
    pub targets: Vec<String>,
    /// Whether pinned links of an earlier run were kept.
    pub readopted: bool,
    /// What the kernel reports attached to the root at connect4 and
    /// connect6, asked for this report.
    pub kernel: KernelAttachment,
    /// Kernel counters.
    pub stats: ProtectStats,
}

/// The loaded, attached protect programs.
pub struct Protect {
    mode: ProtectMode,
    root: PathBuf,
    targets: Vec<String>,
    readopted: bool,
    own_programs: HashSet<u32>,
    stats: PerCpuArray<MapData, u64>,
    events: Mutex<Option<RingBuf<MapData>>>,
    /// Whether the kernel was last seen without these programs on the root,
    /// so that a detachment is logged once, not at every look.
    seen_detached: Mutex<bool>,
    /// Holds the loaded programs for the agent's lifetime (the links are
    /// pinned, so they stay attached without it too).
    ebpf: Mutex<Ebpf>,
}

impl Protect {
    /// Loads the programs with their pinned maps, fills the maps and
    /// attaches to `cgroup_root`, or keeps the links an earlier run pinned.
    /// `entries` are the protected targets' trie entries; `names` the
    /// protected targets' names, for reports.
    pub(super) fn start(
        settings: &ProtectSettings,
        pin_root: &Path,
        cgroup_root: &Path,
        entries: &[TrieEntry],
        names: Vec<String>,
    ) -> Result<Protect, RedirectError> {
        let dir = pin_root.join(DIR_NAME);
        let maps_dir = dir.join("maps");
        let links_dir = dir.join("links");
        pins::ensure_secure_dirs(pin_root, &maps_dir, pins::Owner::agent())?;
        pins::ensure_secure_dirs(pin_root, &links_dir, pins::Owner::agent())?;
        super::task_identity::check_pinned_protect_layout(&maps_dir)?;
        let map_paths: Vec<(&str, PathBuf)> =
            PINNED_MAPS.iter().map(|m| (*m, maps_dir.join(m))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        for name in UNUSED_LRU_MAPS {
            loader.map_max_entries(name, UNUSED_LRU_ENTRIES);
        }
        // The job timeline's ring buffer is unused by this load.
        loader.map_max_entries("JOB_EVENTS", super::page_size());
        let mut ebpf = loader
            .load(PROGRAMS)
            .map_err(|e| classify("load the eBPF programs for [protect]", e))?;
        let offsets = super::task_identity::fill(
            &mut ebpf,
            "the agent's upstream connections are exempted from [protect] by its pid alone, which a process may reuse after the agent died",
        )?;
        let config = ProtectConfig {
            flags: match settings.mode {
                ProtectMode::Audit => 0,
                ProtectMode::Deny => PROTECT_F_DENY,
            },
            agent_tgid: agent_tgid(),
            agent_start_ticks: if offsets { own_start_ticks() } else { 0 },
        };
        fill_maps(&mut ebpf, config, entries)?;

        let mut own_programs = HashSet::new();
        let mut fresh = Vec::new();
        for name in PROGRAM_NAMES {
            let pin = links_dir.join(name);
            if let Ok(link) = PinnedLink::from_pin(&pin) {
                match FdLink::from(link).info() {
                    Ok(info) => {
                        own_programs.insert(info.program_id());
                    }
                    Err(e) => tracing::warn!("cannot read a re-adopted link's program: {e}"),
                }
                continue;
            }
            let _ = fs::remove_file(&pin);
            let action = format!("attach {name} to the cgroup root {}", cgroup_root.display());
            let Some(aya::programs::Program::CgroupSockAddr(program)) = ebpf.program_mut(name)
            else {
                return Err(RedirectError::Kernel(format!(
                    "the embedded object lacks program {name}"
                )));
            };
            program
                .load()
                .map_err(|e| classify(&format!("load program {name}"), e))?;
            if let Ok(info) = program.info() {
                own_programs.insert(info.id());
            }
            let root_dir = fs::File::open(cgroup_root).map_err(|e| {
                io_error(
                    format!("cannot open the cgroup root {}", cgroup_root.display()),
                    e,
                )
            })?;
            let link_id = program
                .attach(root_dir, CgroupAttachMode::Single)
                .map_err(|e| classify(&action, e))?;
            let link: FdLink = program
                .take_link(link_id)
                .map_err(|e| classify(&action, e))?
                .try_into()
                .map_err(|e| classify(&action, e))?;
            link.pin(&pin)
                .map_err(|e| classify(&format!("pin {}", pin.display()), e))?;
            fresh.push(name);
        }
        let readopted = fresh.is_empty();
        let covered = names.join(", ");
        if readopted {
            tracing::info!(mode = settings.mode.as_str(), targets = %covered, "re-adopted the pinned protect programs on the cgroup root");
        } else {
            tracing::info!(mode = settings.mode.as_str(), targets = %covered, attached = %fresh.join(","), "protect programs attached to the cgroup root");
        }

        let events_map = ebpf.take_map("PROTECT_EVENTS").ok_or_else(|| {
            RedirectError::Kernel("the embedded object lacks map PROTECT_EVENTS".into())
        })?;
        let events =
            RingBuf::try_from(events_map).map_err(|e| classify("open map PROTECT_EVENTS", e))?;
        let stats_map = ebpf.take_map("PROTECT_STATS").ok_or_else(|| {
            RedirectError::Kernel("the embedded object lacks map PROTECT_STATS".into())
        })?;
        let stats =
            PerCpuArray::try_from(stats_map).map_err(|e| classify("open map PROTECT_STATS", e))?;
        Ok(Protect {
            mode: settings.mode,
            root: cgroup_root.to_path_buf(),
            targets: names,
            readopted,
            own_programs,
            stats,
            events: Mutex::new(Some(events)),
            seen_detached: Mutex::new(false),
            ebpf: Mutex::new(ebpf),
        })
    }

    /// The kernel counters, summed over CPUs.
    pub fn stats(&self) -> ProtectStats {
        let get = |index: u32| -> u64 {
            self.stats
                .get(&index, 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        ProtectStats {
            audited: get(PROTECT_STAT_AUDITED),
            denied: get(PROTECT_STAT_DENIED),
            exempt: get(PROTECT_STAT_EXEMPT),
            dropped: get(PROTECT_STAT_DROPPED),
            errors: get(PROTECT_STAT_ERRORS),
        }
    }

    /// The status report's view, with the kernel asked now.
    pub fn view(&self) -> ProtectView {
        let names = attachments::program_names();
        ProtectView {
            mode: self.mode.as_str().into(),
            cgroup: self.root.display().to_string(),
            targets: self.targets.clone(),
            readopted: self.readopted,
            kernel: attachments::kernel_view_at(
                &self.root,
                &[AttachPoint::Connect4, AttachPoint::Connect6],
                &self.own_programs,
                &names,
            ),
            stats: self.stats(),
        }
    }

    /// Logs, once per change, that the kernel no longer has the programs on
    /// the root (their pins were removed, or root detached them), and that
    /// they are back.
    pub(super) fn report_kernel_detachment(&self) {
        let view = attachments::kernel_view_at(
            &self.root,
            &[AttachPoint::Connect4, AttachPoint::Connect6],
            &self.own_programs,
            &std::collections::HashMap::new(),
        );
        let Ok(mut seen) = self.seen_detached.lock() else {
            return;
        };
        let attached = view.state == "attached";
        if attached && *seen {
            tracing::info!(cgroup = %self.root.display(), "the kernel has the protect programs on the cgroup root again");
        } else if !attached && !*seen {
            tracing::warn!(
                cgroup = %self.root.display(),
                kernel_state = %view.state,
                error = view.error.as_deref().unwrap_or(""),
                "the kernel no longer has the protect programs on the cgroup root: their pins were removed or the programs detached; restart the agent to attach them again"
            );
        }
        *seen = !attached;
    }

    /// Makes `PROTECT_TARGETS` hold `entries` (this host's addresses
    /// changed).
    pub(super) fn replace_targets(&self, entries: &[TrieEntry]) -> Result<(), RedirectError> {
        let mut ebpf = self
            .ebpf
            .lock()
            .map_err(|_| RedirectError::Kernel("the protect programs' lock is poisoned".into()))?;
        super::replace_targets(&mut ebpf, "PROTECT_TARGETS", entries)
    }

    /// The ring buffer of reports, once (for [`watch`]).
    pub fn take_events(&self) -> Option<RingBuf<MapData>> {
        self.events.lock().ok().and_then(|mut e| e.take())
    }
}

/// The `PROTECT_TARGETS` entries for the targets `settings` protects, built
/// as the redirect builds its own (so a protected target on this host is
/// covered on its other local addresses too; rule target indices are the
/// configuration's), and those targets' names.
pub(super) fn protected_entries(
    config: &Config,
    settings: &ProtectSettings,
    resolve: &dyn Fn(&str) -> Vec<IpAddr>,
    local: &[LocalTarget],
) -> Result<(Vec<TrieEntry>, Vec<String>), String> {
    let protected_local: Vec<LocalTarget> = local
        .iter()
        .filter(|t| settings.covers(&t.name))
        .cloned()
        .collect();
    let protected = config
        .targets
        .iter()
        .enumerate()
        .filter(|(_, t)| settings.covers(&t.name));
    let names = config
        .targets
        .iter()
        .filter(|t| settings.covers(&t.name))
        .map(|t| t.name.clone())
        .collect();
    let entries = super::targets::build(protected, resolve, &protected_local)?;
    Ok((entries, names))
}

/// This process's start in clock ticks since boot (`/proc/self/stat`
/// field 22); 0 when it cannot be read (the pid alone is then exempt).
fn own_start_ticks() -> u64 {
    let stat = fs::read("/proc/self/stat").unwrap_or_default();
    match crate::identity::parse_start_ticks(&stat) {
        Some(ticks) => ticks,
        None => {
            tracing::warn!("cannot read this process's start time from /proc/self/stat; [protect] exempts the agent by its pid alone");
            0
        }
    }
}

/// The agent's pid as the kernel's programs see it (the initial pid
/// namespace's), which is the first `NSpid` of `/proc/self/status` when the
/// agent sees that namespace's `/proc`.
fn agent_tgid() -> u32 {
    let own = std::process::id();
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let nspids: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    match nspids.first() {
        Some(first) if nspids.len() > 1 => {
            tracing::warn!(pid = own, outer_pid = first, "the agent runs in a child pid namespace; its upstream connections are exempted under the outermost pid /proc shows, which must be the initial namespace's");
            *first
        }
        _ => own,
    }
}

fn fill_maps(
    ebpf: &mut Ebpf,
    config: ProtectConfig,
    entries: &[TrieEntry],
) -> Result<(), RedirectError> {
    let missing = |m: &str| RedirectError::Kernel(format!("the embedded object lacks map {m}"));
    super::replace_targets(ebpf, "PROTECT_TARGETS", entries)?;
    // The config last: a program re-adopted from the previous run sees the
    // new agent's tgid only once the targets are current.
    let mut config_map: Array<_, ProtectConfig> = Array::try_from(
        ebpf.map_mut("PROTECT_CONFIG")
            .ok_or_else(|| missing("PROTECT_CONFIG"))?,
    )
    .map_err(|e| classify("open map PROTECT_CONFIG", e))?;
    config_map
        .set(0, config, 0)
        .map_err(|e| classify("write map PROTECT_CONFIG", e))?;
    Ok(())
}

/// One connect that skipped the redirect, as reported to the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BypassAttempt {
    /// The protected target's name.
    pub target: String,
    /// `audit` (let through) or `deny` (refused).
    pub verdict: &'static str,
    /// Where the process connected.
    pub destination: SocketAddr,
    /// Its process id.
    pub pid: u32,
    /// Its real uid.
    pub uid: u32,
    /// Its real gid.
    pub gid: u32,
    /// Its cgroup v2 id at connect time.
    pub cgroup_id: u64,
    /// The connecting thread's name.
    pub comm: String,
}

/// Decodes one ring buffer record; `None` for a record of another size.
/// `names[i]` is the name of target `i` (0-based) in the configuration.
pub(crate) fn decode(bytes: &[u8], names: &[String]) -> Option<BypassAttempt> {
    if bytes.len() != std::mem::size_of::<ProtectEvent>() {
        return None;
    }
    // SAFETY: the length is that of `ProtectEvent`, a `repr(C)` type of
    // integers and byte arrays for which every bit pattern is valid;
    // `read_unaligned` makes no alignment assumption about the record.
    #[allow(unsafe_code)]
    let event: ProtectEvent =
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ProtectEvent>()) };
    let ip = match as_v4_mapped(&event.dst_addr) {
        Some(v4) => SocketAddr::new(IpAddr::from(v4), event.dst_port),
        None => SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(event.dst_addr),
            event.dst_port,
            0,
            0,
        )),
    };
    let comm_len = event
        .comm
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(event.comm.len());
    let target = (event.target as usize)
        .checked_sub(1)
        .and_then(|i| names.get(i))
        .cloned()
        .unwrap_or_else(|| format!("#{}", event.target));
    Some(BypassAttempt {
        target,
        verdict: if event.verdict == PROTECT_VERDICT_DENY {
            "deny"
        } else {
            "audit"
        },
        destination: ip,
        pid: event.tgid,
        uid: event.uid,
        gid: event.gid,
        cgroup_id: event.cgroup_id,
        comm: String::from_utf8_lossy(event.comm.get(..comm_len).unwrap_or_default()).into_owned(),
    })
}

/// What `/proc` says about a process right now: its executable and cgroup.
/// Either is `None` when the process is gone (or the read fails).
fn process_details(pid: u32) -> (Option<String>, Option<String>) {
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.display().to_string());
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|c| c.trim().to_string())
        });
    (exe, cgroup)
}

/// Reads reports as they arrive until `stop`: logs each as a warning with
/// the process's executable and cgroup, and counts it in `metrics`.
pub async fn watch(
    ring: RingBuf<MapData>,
    names: Vec<String>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut ring = match super::async_ring(ring) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the protect reports; bypass attempts are counted in the kernel only");
            return;
        }
    };
    loop {
        let mut guard = tokio::select! {
            _ = stop.cancelled() => return,
            ready = ring.readable_mut() => match ready {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(error = %e, "watching the protect reports failed; bypass attempts are counted in the kernel only");
                    return;
                }
            },
        };
        let inner = guard.get_inner_mut();
        while let Some(item) = inner.next() {
            let Some(attempt) = decode(&item, &names) else {
                tracing::warn!(
                    len = item.len(),
                    "a protect report of unexpected size was skipped"
                );
                continue;
            };
            report(&attempt, &metrics);
        }
        guard.clear_ready();
    }
}

fn report(attempt: &BypassAttempt, metrics: &Metrics) {
    metrics.protect_bypass(&attempt.target, attempt.verdict);
    let (exe, cgroup) = process_details(attempt.pid);
    let message = if attempt.verdict == "deny" {
        "refused a connection to a protected target that did not come through the redirect"
    } else {
        "a connection to a protected target did not come through the redirect"
    };
    tracing::warn!(
        event = "protect_bypass",
        target_name = %attempt.target,
        verdict = attempt.verdict,
        destination = %attempt.destination,
        pid = attempt.pid,
        uid = attempt.uid,
        gid = attempt.gid,
        cgroup_id = attempt.cgroup_id,
        cgroup = cgroup.as_deref().unwrap_or("(process gone)"),
        exe = exe.as_deref().unwrap_or("(process gone)"),
        comm = %attempt.comm,
        "{message}"
    );
}

/// What `tollgate config check` says `[protect]` covers: one line for the
/// mode, one per protected target.
pub fn describe(config: &Config, settings: &ProtectSettings, local: &[LocalTarget]) -> Vec<String> {
    let outcome = match settings.mode {
        ProtectMode::Audit => "let through, logged and counted",
        ProtectMode::Deny => "refused (EPERM), logged and counted",
    };
    let mut lines = vec![format!(
        "protect ({}): on the cgroup v2 root, connections to these targets that do not come through the redirect are {outcome}; the agent's own upstream connections are exempt:",
        settings.mode.as_str()
    )];
    for target in config.targets.iter().filter(|t| settings.covers(&t.name)) {
        let ports: Vec<String> = target.ports.iter().map(ToString::to_string).collect();
        let mut line = format!(
            "  {} ({} ports {})",
            target.name,
            target.address,
            ports.join(", ")
        );
        if local.iter().any(|l| l.name == target.name) {
            line.push_str(", and the same ports on this host's local addresses");
        }
        lines.push(line);
    }
    lines
}

/// Removes the pins of a protection the configuration no longer asks for
/// (which detaches its programs).
pub(super) fn remove_unwanted(pin_root: &Path) {
    let dir = pin_root.join(DIR_NAME);
    if dir.exists() {
        tracing::info!(dir = %dir.display(), "no [protect] any more: removing its pins");
        let _ = fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tollgate_common::{v4_mapped, PROTECT_VERDICT_AUDIT};

    fn bytes_of(event: &ProtectEvent) -> Vec<u8> {
        // SAFETY: a repr(C) value without implicit padding, read as bytes.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(
                (event as *const ProtectEvent).cast::<u8>(),
                std::mem::size_of::<ProtectEvent>(),
            )
        }
        .to_vec()
    }

    fn event(target: u32, verdict: u16) -> ProtectEvent {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"psql");
        ProtectEvent {
            dst_addr: v4_mapped([198, 18, 0, 1]),
            dst_port: 5432,
            verdict,
            tgid: 4242,
            uid: 65534,
            gid: 65534,
            cgroup_id: 77,
            comm,
            target,
            _reserved: 0,
        }
    }

    #[test]
    fn a_report_decodes_with_its_target_name_and_verdict() {
        let names = vec!["a".to_string(), "b".to_string()];
        let got = decode(&bytes_of(&event(2, PROTECT_VERDICT_DENY)), &names).unwrap();
        assert_eq!(got.target, "b");
        assert_eq!(got.verdict, "deny");
        assert_eq!(got.destination, "198.18.0.1:5432".parse().unwrap());
        assert_eq!((got.pid, got.uid, got.cgroup_id), (4242, 65534, 77));
        assert_eq!(got.comm, "psql");
        let audit = decode(&bytes_of(&event(1, PROTECT_VERDICT_AUDIT)), &names).unwrap();
        assert_eq!((audit.target.as_str(), audit.verdict), ("a", "audit"));
    }

    #[test]
    fn only_the_listed_targets_are_protected_with_a_local_ones_other_addresses() {
        let text = "[redirect]\n[protect]\nmode = \"deny\"\ntargets = [\"here\"]\n\
            [[target]]\nname = \"remote\"\naddress = \"10.0.0.1\"\nports = [5432]\nprotocol = \"postgres\"\n\
            [[target]]\nname = \"here\"\naddress = \"192.168.1.7\"\nports = [6432]\nprotocol = \"postgres\"\n";
        let config = Config::from_toml(Path::new("t.toml"), text).unwrap();
        let settings = config.protect.clone().unwrap();
        let resolve = |_: &str| Vec::new();
        let host: Vec<IpAddr> = vec!["192.168.1.7".parse().unwrap()];
        let local =
            super::super::local::local_targets(config.targets.iter().enumerate(), &resolve, &host);
        let (entries, names) = protected_entries(&config, &settings, &resolve, &local).unwrap();
        assert_eq!(names, vec!["here".to_string()]);
        let find = |ip: [u8; 4]| {
            entries
                .iter()
                .find(|e| e.addr == v4_mapped(ip))
                .map(|e| e.entry.find(6432).map(|r| (r.target, r.action)))
        };
        assert_eq!(
            find([10, 0, 0, 1]),
            None,
            "an unlisted target is not protected"
        );
        let here = Some(Some((2, tollgate_common::ACTION_REDIRECT)));
        assert_eq!(find([192, 168, 1, 7]), here, "its own address");
        assert_eq!(
            find([127, 0, 0, 0]),
            here,
            "loopback, as the redirect governs it"
        );
        assert_eq!(find([0, 0, 0, 0]), here, "0.0.0.0 connects to the host");
        assert!(entries
            .iter()
            .any(|e| e.addr == tollgate_common::IPV6_LOOPBACK));
    }

    #[test]
    fn an_unknown_target_index_or_size_does_not_panic() {
        let names = vec!["a".to_string()];
        let got = decode(&bytes_of(&event(9, PROTECT_VERDICT_DENY)), &names).unwrap();
        assert_eq!(got.target, "#9");
        let got = decode(&bytes_of(&event(0, PROTECT_VERDICT_DENY)), &names).unwrap();
        assert_eq!(got.target, "#0");
        assert!(decode(&[0u8; 10], &names).is_none());
        assert!(decode(&[0u8; 65], &names).is_none());
    }
}
