//! The transparent redirect: the only code that touches aya.
//!
//! One object file (`agent-ebpf`, embedded at build time) holds
//! `tollgate_connect4`, `tollgate_connect6`, `tollgate_sockops`,
//! `tollgate_sendmsg4` and `tollgate_sendmsg6`. It is loaded once per *mode*
//! (destinations no target names either pass or are denied), because the
//! mode lives in the object's `CONFIG` map; every governed cgroup of that
//! mode gets the five programs attached. Each pinned link is re-adopted on
//! its own, so after an upgrade that added programs the old links stay and
//! only the missing programs are attached.
//!
//! Everything is pinned under `redirect.pin_dir` (on bpffs):
//! `<pin_dir>/<mode>/maps/<MAP>` and `<pin_dir>/<mode>/links/<cgroup id>/<program>`.
//! Pinned links keep the programs attached when the agent exits or crashes:
//! governed connections are then redirected to a port nobody listens on and
//! fail (fail closed). On start the agent re-opens the pinned maps (so
//! origin records of connections in flight survive), refills them from the
//! configuration, and keeps already pinned links instead of attaching again
//! (re-adoption). `tollgate detach` removes the pins and so the programs.
//!
//! Every pin directory is root's, mode 0700, checked at every start (see
//! `pins`): a pin in a directory another user controls could be removed by
//! that user, detaching the programs behind the agent's back. What is
//! attached is reported from the kernel (see `attachments`), not inferred
//! from the pins.

mod attachments;
mod btf;
pub mod cgroup;
pub mod exec;
pub mod jobs;
pub mod local;
mod pins;
pub mod protect;
mod targets;
mod task_identity;

pub use attachments::{KernelAttachment, KernelProgram};
pub use pins::PinDirError;

use std::collections::HashSet;
use std::fs;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SockOps};
use aya::{Ebpf, EbpfLoader};

use crate::identity::ConnectInstance;
use serde::Serialize;
use tollgate_common::{
    as_v4_mapped, v4_mapped, ConnectOrigin, OriginKey, RedirectConfig, TargetEntry,
    CONFIG_F_DENY_UNLISTED, CONFIG_F_JOB_EVENTS, ORIGIN_ID_CAPTURED, ORIGIN_ID_READ_FAILED,
    STAT_CLOSED, STAT_COUNT, STAT_DENIED, STAT_ERRORS, STAT_PASSED, STAT_PUBLISHED,
    STAT_REDIRECTED,
};

use crate::config::{Config, RedirectSettings, UnlistedPolicy};

/// The kernel programs, built by `build.rs`.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tollgate-ebpf"));

const PROGRAM_NAMES: [&str; 5] = [
    "tollgate_connect4",
    "tollgate_connect6",
    "tollgate_sockops",
    "tollgate_sendmsg4",
    "tollgate_sendmsg6",
];
const PINNED_MAPS: [&str; 7] = [
    "CONFIG",
    "TARGETS",
    "RESOLVERS",
    "PENDING",
    "ORIGINS",
    "STATS",
    // Pinned so that connect hooks kept attached from an earlier run report
    // into the ring buffer this run reads.
    "JOB_EVENTS",
];

/// What the kernel recorded about a redirected connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelOrigin {
    /// Where the process tried to connect.
    pub destination: SocketAddr,
    /// Its process id (thread group id).
    pub tgid: u32,
    /// Its real uid at connect time.
    pub uid: u32,
    /// Its real gid at connect time.
    pub gid: u32,
    /// Its cgroup v2 id at connect time.
    pub cgroup_id: u64,
    /// The connecting thread's name.
    pub comm: String,
    /// Index of the configured target (0-based) the redirect matched.
    pub target_index: usize,
    /// The caller's executable and start time at connect.
    pub instance: ConnectInstance,
}

/// Errors setting up the redirect, each with what to do.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// Not allowed to load or attach programs.
    #[error("cannot {action}: permission denied; run as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN, or remove [redirect] and use explicit listeners ([[listener]])")]
    Permission {
        /// What was attempted.
        action: String,
    },
    /// A missing kernel feature.
    #[error("{0}")]
    Kernel(String),
    /// A pin directory another user could tamper with.
    #[error(transparent)]
    PinDir(PinDirError),
    /// Anything else, with context.
    #[error("{context}: {source}")]
    Other {
        /// What was attempted.
        context: String,
        /// Why it failed.
        source: anyhow::Error,
    },
}

/// A pin directory that cannot be made for want of permission is the
/// missing privilege, said as such; the rest are the directory's own
/// problems.
impl From<PinDirError> for RedirectError {
    fn from(e: PinDirError) -> RedirectError {
        match e {
            PinDirError::Io { path, source }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                RedirectError::Permission {
                    action: format!("prepare pin directory {}", path.display()),
                }
            }
            other => RedirectError::PinDir(other),
        }
    }
}

/// Maps an I/O error, recognising permission problems.
fn io_error(context: String, e: std::io::Error) -> RedirectError {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        RedirectError::Permission { action: context }
    } else {
        RedirectError::Other {
            context,
            source: e.into(),
        }
    }
}

/// Maps a loader or attach error, recognising permission problems.
fn classify(action: &str, e: impl std::error::Error + Send + Sync + 'static) -> RedirectError {
    let text = format!("{e:#}").to_lowercase();
    let chain = {
        let mut s = text.clone();
        let mut source = e.source();
        while let Some(inner) = source {
            s.push_str(&inner.to_string().to_lowercase());
            source = inner.source();
        }
        s
    };
    if chain.contains("permission denied") || chain.contains("operation not permitted") {
        RedirectError::Permission {
            action: action.to_string(),
        }
    } else {
        RedirectError::Other {
            context: action.to_string(),
            source: anyhow::Error::new(e),
        }
    }
}

/// One loaded copy of the programs, for one mode.
struct Instance {
    mode: UnlistedPolicy,
    /// `redirect.pin_dir`, the top of the checked pin directories.
    pin_root: PathBuf,
    /// `<pin_root>/<mode>`.
    dir: PathBuf,
    /// The loaded programs, used to attach to cgroups that appear later.
    ebpf: Mutex<Ebpf>,
    /// The configured cgroups of this mode.
    wanted: Vec<PathBuf>,
    origins: Mutex<HashMap<MapData, OriginKey, ConnectOrigin>>,
    stats: PerCpuArray<MapData, u64>,
    attached: Mutex<Vec<AttachedCgroup>>,
    /// Kernel ids of this mode's programs: those loaded by this agent and
    /// those behind links it re-adopted, to recognise them in the kernel's
    /// answer to "what is attached to this cgroup".
    own_programs: Mutex<HashSet<u32>>,
    /// Ids of attached cgroups on which the kernel was last seen without the
    /// agent's programs, so that a detachment is logged once, not every look.
    seen_detached: Mutex<HashSet<u64>>,
    /// The job timeline's events, until the agent takes them to read.
    job_events: Mutex<Option<RingBuf<MapData>>>,
    /// The kernel's counters of job events (`None`: timeline off).
    job_stats: Option<PerCpuArray<MapData, u64>>,
}

/// A cgroup with the programs attached.
#[derive(Debug, Clone, Serialize)]
pub struct AttachedCgroup {
    /// Its directory.
    pub path: PathBuf,
    /// Its cgroup id.
    pub id: u64,
    /// pass or deny for unlisted destinations.
    pub unlisted: &'static str,
    /// Whether pinned links from an earlier run were kept.
    pub readopted: bool,
}

/// A governed cgroup in the status report: what the agent attached, and
/// what the kernel says is attached now.
#[derive(Debug, Clone, Serialize)]
pub struct CgroupStatus {
    /// What the agent attached (or re-adopted).
    #[serde(flatten)]
    pub attached: AttachedCgroup,
    /// The kernel's view, queried for this report.
    pub kernel: KernelAttachment,
}

/// Where a process runs, as far as the redirect is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerCgroup {
    /// The process's cgroup, from `/proc/<pid>/cgroup`.
    pub path: PathBuf,
    /// The strictest governed cgroup it is in (itself or an ancestor), with
    /// that cgroup's mode; `None` when it is governed by none.
    pub governed_by: Option<(PathBuf, UnlistedPolicy)>,
}

/// Counters kept by the kernel programs, summed over CPUs.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct KernelStats {
    /// Connects rewritten to the proxy.
    pub redirected: u64,
    /// Connects, and UDP sends, refused with EPERM.
    pub denied: u64,
    /// Connects let through.
    pub passed: u64,
    /// Origins published by sockops.
    pub published: u64,
    /// Origins removed because the client closed first.
    pub closed: u64,
    /// Internal failures in the programs.
    pub errors: u64,
}

/// The loaded, attached redirect.
pub struct Redirect {
    instances: Vec<Instance>,
    /// What the target tries were built from, to build them again when
    /// this host's addresses change.
    sources: Mutex<TargetSources>,
    /// The cgroup v2 mount.
    pub cgroup_root: PathBuf,
    /// Where `tollgate exec` sessions' cgroups are created.
    pub exec_root: PathBuf,
    /// The mode of `exec_root`.
    pub exec_unlisted: UnlistedPolicy,
    /// The pin directory.
    pub pin_dir: PathBuf,
    /// The root cgroup's protect programs, when `[protect]` is set.
    pub protect: Option<protect::Protect>,
    /// `tollgate exec` cgroups made lately, by id, newest last: a job whose
    /// first event is read after its cgroup was removed still gets its
    /// path.
    exec_cgroups: Mutex<std::collections::VecDeque<(u64, PathBuf)>>,
}

/// How many `tollgate exec` cgroups [`Redirect`] remembers.
const REMEMBERED_EXEC_CGROUPS: usize = 4096;

/// What the target tries are built from.
struct TargetSources {
    config: Config,
    /// Host names of targets, as they resolved at start.
    resolved: Vec<(String, IpAddr)>,
    /// This host's addresses when the tries were last built.
    host: Vec<IpAddr>,
}

impl TargetSources {
    /// The redirect's trie entries and the targets on this host.
    fn entries(&self) -> Result<(Vec<targets::TrieEntry>, Vec<local::LocalTarget>), RedirectError> {
        let resolve = |h: &str| self.resolve(h);
        let local_targets =
            local::local_targets(self.config.targets.iter().enumerate(), &resolve, &self.host);
        let entries = targets::build(
            self.config.targets.iter().enumerate(),
            &resolve,
            &local_targets,
        )
        .map_err(RedirectError::Kernel)?;
        Ok((entries, local_targets))
    }

    fn resolve(&self, host: &str) -> Vec<IpAddr> {
        self.resolved
            .iter()
            .filter(|(name, _)| name == host)
            .map(|(_, ip)| *ip)
            .collect()
    }
}

impl Redirect {
    /// Loads, fills and attaches everything the configuration asks for.
    /// `proxy_port6` is 0 when the agent could not listen on [::1].
    /// A start that fails leaves no directory of its own behind: a pin
    /// directory it made is removed again, down to what is not empty.
    pub fn start(config: &Config, proxy_port6: u16) -> Result<Redirect, RedirectError> {
        let settings = config.redirect.clone().unwrap_or_default();
        let pin_dir = settings.pin_dir.clone();
        let made_pin_dir = !pin_dir.exists();
        let started = Redirect::start_pinned(config, settings, proxy_port6);
        if started.is_err() && made_pin_dir {
            remove_empty_dirs(&pin_dir);
        }
        started
    }

    fn start_pinned(
        config: &Config,
        settings: RedirectSettings,
        proxy_port6: u16,
    ) -> Result<Redirect, RedirectError> {
        let cgroup_root = cgroup::cgroup2_mount().ok_or_else(|| {
            RedirectError::Kernel("no cgroup v2 hierarchy is mounted (see /proc/self/mountinfo); mount one (mount -t cgroup2 none /sys/fs/cgroup/unified) or use explicit listeners".into())
        })?;
        if !Path::new("/sys/kernel/btf/vmlinux").exists() {
            tracing::warn!("the kernel exposes no BTF (/sys/kernel/btf/vmlinux); loading may fail on kernels that need it");
        }
        ensure_bpffs(&settings.pin_dir)?;

        let host = local::host_addresses().unwrap_or_else(|e| {
            tracing::warn!("cannot list this host's addresses ({e}); only loopback counts as local for targets");
            Vec::new()
        });
        let sources = TargetSources {
            config: config.clone(),
            resolved: resolve_host_targets(config),
            host,
        };
        let resolve = |h: &str| sources.resolve(h);
        let (entries, local_targets) = sources.entries()?;
        for t in &local_targets {
            tracing::info!(target_name = %t.name, "{}", t.describe());
        }
        for (name, path) in local::open_unix_sockets(&local_targets, &local::postgres_socket_dirs())
        {
            tracing::warn!(target_name = %name, socket = %path.display(), "{}", local::unix_socket_warning(&name, &path));
        }

        // Every governed cgroup, and the parent of `tollgate exec` sessions.
        let exec_root = cgroup::resolve(&cgroup_root, &settings.exec_cgroup);
        fs::create_dir_all(&exec_root).map_err(|e| {
            io_error(
                format!("cannot create the exec cgroup {}", exec_root.display()),
                e,
            )
        })?;
        let mut wanted: Vec<(PathBuf, UnlistedPolicy)> = config
            .cgroups
            .iter()
            .map(|g| (cgroup::resolve(&cgroup_root, &g.path), g.unlisted))
            .collect();
        wanted.push((exec_root.clone(), settings.exec_unlisted));

        let mut instances = Vec::new();
        for mode in [UnlistedPolicy::Pass, UnlistedPolicy::Deny] {
            let cgroups: Vec<&PathBuf> = wanted
                .iter()
                .filter(|(_, m)| *m == mode)
                .map(|(p, _)| p)
                .collect();
            let dir = settings.pin_dir.join(mode_name(mode));
            if cgroups.is_empty() {
                // A mode no cgroup uses any more: drop its pins so stale
                // programs do not linger.
                if dir.exists() {
                    tracing::info!(dir = %dir.display(), "removing pins of a mode no cgroup uses any more");
                    let _ = fs::remove_dir_all(&dir);
                }
                continue;
            }
            let mut flags = if mode == UnlistedPolicy::Deny {
                CONFIG_F_DENY_UNLISTED
            } else {
                0
            };
            if settings.job_timeline {
                flags |= CONFIG_F_JOB_EVENTS;
            }
            let config_value = RedirectConfig {
                proxy_port4: settings.port,
                proxy_port6,
                flags,
            };
            instances.push(Instance::start(
                mode,
                &settings.pin_dir,
                &dir,
                config_value,
                &entries,
                &settings.resolvers,
                &cgroups,
            )?);
        }
        // After the governed cgroups have their programs: in deny mode a
        // governed connection is only let through once it is redirected.
        let protect = match &config.protect {
            Some(p) => {
                let (protect_entries, names) =
                    protect::protected_entries(config, p, &resolve, &local_targets)
                        .map_err(RedirectError::Kernel)?;
                Some(protect::Protect::start(
                    p,
                    &settings.pin_dir,
                    &cgroup_root,
                    &protect_entries,
                    names,
                )?)
            }
            None => {
                protect::remove_unwanted(&settings.pin_dir);
                None
            }
        };
        Ok(Redirect {
            instances,
            sources: Mutex::new(sources),
            cgroup_root,
            exec_root,
            exec_unlisted: settings.exec_unlisted,
            pin_dir: settings.pin_dir,
            protect,
            exec_cgroups: Mutex::new(std::collections::VecDeque::new()),
        })
    }

    /// Remembers a `tollgate exec` cgroup just made (see [`Redirect::cgroup_path`]).
    pub fn remember_exec_cgroup(&self, dir: &Path) {
        let Ok(id) = cgroup::cgroup_id(dir) else {
            return;
        };
        if let Ok(mut known) = self.exec_cgroups.lock() {
            if known.len() >= REMEMBERED_EXEC_CGROUPS {
                known.pop_front();
            }
            known.push_back((id, dir.to_path_buf()));
        }
    }

    /// The directory of governed cgroup `id` (a `tollgate exec` cgroup made
    /// lately, even once removed, or one below a governed cgroup, looked
    /// for at most `depth` levels down).
    pub fn cgroup_path(&self, id: u64, depth: usize) -> Option<PathBuf> {
        let remembered = self.exec_cgroups.lock().ok().and_then(|known| {
            known
                .iter()
                .rev()
                .find(|(known_id, _)| *known_id == id)
                .map(|(_, path)| path.clone())
        });
        remembered.or_else(|| {
            self.attached()
                .iter()
                .find_map(|a| find_cgroup_by_id(&a.path, id, depth))
        })
    }

    /// Attaches to configured cgroups that appeared (or were re-created, as
    /// systemd does when a service restarts) since the last look, and drops
    /// the pins of cgroups that are gone. Returns the cgroups newly attached.
    pub fn reconcile(&self) -> Vec<PathBuf> {
        let mut newly = Vec::new();
        for instance in &self.instances {
            for path in &instance.wanted {
                match instance.ensure_attached(path) {
                    Ok(true) => newly.push(path.clone()),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(cgroup = %path.display(), "cannot attach: {e}"),
                }
            }
            instance.forget_vanished();
            instance.report_kernel_detachments();
        }
        if let Some(p) = &self.protect {
            p.report_kernel_detachment();
        }
        if let Err(e) = self.refresh_host_addresses() {
            tracing::error!("this host's addresses changed, and the targets on it could not be governed on the new ones: {e}");
        }
        newly
    }

    /// Builds the target tries again when this host's addresses changed
    /// since they were built (an interface came up, DHCP gave a new
    /// address), so that a target on this host is governed on its new
    /// local addresses and no longer on the ones it lost. `true` when they
    /// changed.
    pub fn refresh_host_addresses(&self) -> Result<bool, RedirectError> {
        let Ok(host) = local::host_addresses() else {
            return Ok(false);
        };
        let mut sources = self
            .sources
            .lock()
            .map_err(|_| RedirectError::Kernel("the target sources' lock is poisoned".into()))?;
        if sources.host == host {
            return Ok(false);
        }
        let added: Vec<String> = host
            .iter()
            .filter(|a| !sources.host.contains(a))
            .map(ToString::to_string)
            .collect();
        let removed: Vec<String> = sources
            .host
            .iter()
            .filter(|a| !host.contains(a))
            .map(ToString::to_string)
            .collect();
        let previous = std::mem::replace(&mut sources.host, host);
        let built = sources.entries();
        let (entries, local_targets) = match built {
            Ok(built) => built,
            Err(e) => {
                // Tried again at the next look.
                sources.host = previous;
                return Err(e);
            }
        };
        for instance in &self.instances {
            let mut ebpf = instance
                .ebpf
                .lock()
                .map_err(|_| RedirectError::Kernel("an eBPF instance's lock is poisoned".into()))?;
            replace_targets(&mut ebpf, "TARGETS", &entries)?;
        }
        if let (Some(p), Some(settings)) = (&self.protect, &sources.config.protect) {
            let resolve = |h: &str| sources.resolve(h);
            let (protect_entries, _) =
                protect::protected_entries(&sources.config, settings, &resolve, &local_targets)
                    .map_err(RedirectError::Kernel)?;
            p.replace_targets(&protect_entries)?;
        }
        tracing::info!(
            added = %added.join(","),
            removed = %removed.join(","),
            "this host's addresses changed; the targets on it are governed on its addresses as they are now"
        );
        for t in &local_targets {
            tracing::info!(target_name = %t.name, "{}", t.describe());
        }
        Ok(true)
    }

    /// Makes sure the cgroup process `pid` runs in is attached, if it is a
    /// configured governed cgroup; returns that cgroup.
    pub fn attach_for_pid(&self, pid: u32) -> Result<PathBuf, String> {
        let path = self.cgroup_of_pid(pid)?;
        self.ensure_governed_attached(&path)?;
        Ok(path)
    }

    /// Makes sure a configured governed cgroup (or the exec cgroup) has the
    /// programs attached, attaching them now if the periodic look has not yet.
    pub fn ensure_governed_attached(&self, path: &Path) -> Result<(), String> {
        let instance = self
            .instances
            .iter()
            .find(|i| i.wanted.iter().any(|w| w == path))
            .ok_or_else(|| {
                format!(
                    "{} is not a governed [[cgroup]] of this agent",
                    path.display()
                )
            })?;
        instance.ensure_attached(path).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The cgroup process `pid` runs in, as the kernel reports it in
    /// `/proc/<pid>/cgroup`, and the strictest governed cgroup holding it
    /// (itself or an ancestor: programs attached to an ancestor apply to
    /// every cgroup below it).
    pub fn caller_cgroup(&self, pid: u32) -> Result<CallerCgroup, String> {
        let path = self.cgroup_of_pid(pid)?;
        let governed = self
            .instances
            .iter()
            .flat_map(|i| i.wanted.iter().map(move |w| (w.as_path(), i.mode)));
        let governed_by = strictest_holding(&path, governed);
        Ok(CallerCgroup { path, governed_by })
    }

    /// Whether moving `caller` into a `tollgate exec` session would let it
    /// reach more than it can where it is: its governed cgroup denies
    /// unlisted destinations and exec sessions pass them.
    pub fn exec_would_loosen(&self, caller: &CallerCgroup) -> bool {
        caller
            .governed_by
            .as_ref()
            .is_some_and(|(_, mode)| strictness(*mode) > strictness(self.exec_unlisted))
    }

    fn cgroup_of_pid(&self, pid: u32) -> Result<PathBuf, String> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map_err(|e| format!("cannot read the cgroup of process {pid}: {e}"))?;
        let relative = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| format!("process {pid} is in no cgroup v2 cgroup"))?;
        Ok(cgroup::resolve(
            &self.cgroup_root,
            Path::new(relative.trim()),
        ))
    }

    /// Takes (reads and removes) the kernel's record of the connection whose
    /// client end is `peer`. `None` means it did not come through the hook.
    pub fn take_origin(&self, peer: SocketAddr) -> Option<KernelOrigin> {
        let addr = match peer.ip() {
            IpAddr::V4(v4) => v4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        };
        let key = OriginKey::new(addr, peer.port());
        for instance in &self.instances {
            let Ok(mut origins) = instance.origins.lock() else {
                continue;
            };
            if let Ok(origin) = origins.get(&key, 0) {
                let _ = origins.remove(&key);
                return Some(to_kernel_origin(&origin));
            }
        }
        None
    }

    /// Sum of the kernel counters over every instance.
    pub fn stats(&self) -> KernelStats {
        let mut s = KernelStats::default();
        for i in &self.instances {
            let get = |index: u32| -> u64 {
                i.stats
                    .get(&index, 0)
                    .map(|values| values.iter().sum())
                    .unwrap_or(0)
            };
            s.redirected += get(STAT_REDIRECTED);
            s.denied += get(STAT_DENIED);
            s.passed += get(STAT_PASSED);
            s.published += get(STAT_PUBLISHED);
            s.closed += get(STAT_CLOSED);
            s.errors += get(STAT_ERRORS);
        }
        let _ = STAT_COUNT;
        s
    }

    /// The job timeline's ring buffers, one per loaded mode, for the agent to
    /// read (each is handed out once; empty with the timeline off).
    pub fn take_job_events(&self) -> Vec<RingBuf<MapData>> {
        self.instances
            .iter()
            .filter_map(|i| i.job_events.lock().ok().and_then(|mut e| e.take()))
            .collect()
    }

    /// The kernel's counters of job events, summed over the modes (`None`:
    /// timeline off).
    pub fn job_event_stats(&self) -> Option<jobs::JobEventStats> {
        let mut total: Option<jobs::JobEventStats> = None;
        for stats in self.instances.iter().filter_map(|i| i.job_stats.as_ref()) {
            let s = jobs::read_stats(stats);
            let t = total.get_or_insert_with(Default::default);
            t.sent += s.sent;
            t.dropped += s.dropped;
            t.read_errors += s.read_errors;
        }
        total
    }

    /// Entries in the origin maps (connections redirected, not yet accepted).
    pub fn pending_origins(&self) -> usize {
        self.instances
            .iter()
            .filter_map(|i| i.origins.lock().ok().map(|m| m.keys().count()))
            .sum()
    }

    /// The cgroups with programs attached.
    pub fn attached(&self) -> Vec<AttachedCgroup> {
        self.instances
            .iter()
            .flat_map(|i| i.attached.lock().map(|a| a.clone()).unwrap_or_default())
            .collect()
    }

    /// The cgroups the agent attached, each with what the kernel says is
    /// attached to it right now (one `BPF_PROG_QUERY` per attach point).
    pub fn attachments(&self) -> Vec<CgroupStatus> {
        let names = attachments::program_names();
        let mut out = Vec::new();
        for instance in &self.instances {
            let ours = instance
                .own_programs
                .lock()
                .map(|o| o.clone())
                .unwrap_or_default();
            let attached = instance
                .attached
                .lock()
                .map(|a| a.clone())
                .unwrap_or_default();
            for a in attached {
                let kernel = attachments::kernel_view(&a.path, &ours, &names);
                out.push(CgroupStatus {
                    attached: a,
                    kernel,
                });
            }
        }
        out
    }

    /// Every pinned file under the pin directory.
    pub fn pinned(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for i in &self.instances {
            walk(&i.dir, &mut out);
        }
        if self.protect.is_some() {
            walk(&self.pin_dir.join(protect::DIR_NAME), &mut out);
        }
        out.sort();
        out
    }

    /// Modes loaded, for logs.
    pub fn modes(&self) -> Vec<&'static str> {
        self.instances.iter().map(|i| mode_name(i.mode)).collect()
    }
}

/// The directory below `dir` (or `dir` itself) whose cgroup id is `id`.
fn find_cgroup_by_id(dir: &Path, id: u64, depth: usize) -> Option<PathBuf> {
    if cgroup::cgroup_id(dir).ok()? == id {
        return Some(dir.to_path_buf());
    }
    if depth == 0 {
        return None;
    }
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .find_map(|e| find_cgroup_by_id(&e.path(), id, depth - 1))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        // The entry's own type: a symlink is listed, never followed.
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// How much a mode restricts: a `tollgate exec` session must never end up
/// in a mode that restricts less than the one its caller was in.
fn strictness(mode: UnlistedPolicy) -> u8 {
    match mode {
        UnlistedPolicy::Pass => 0,
        UnlistedPolicy::Deny => 1,
    }
}

/// Of the `governed` cgroups that hold `cgroup` (it or an ancestor), the one
/// with the strictest mode; the first of equals.
fn strictest_holding<'a>(
    cgroup: &Path,
    governed: impl Iterator<Item = (&'a Path, UnlistedPolicy)>,
) -> Option<(PathBuf, UnlistedPolicy)> {
    let mut found: Option<(PathBuf, UnlistedPolicy)> = None;
    for (path, mode) in governed {
        let stricter = found
            .as_ref()
            .is_none_or(|(_, m)| strictness(mode) > strictness(*m));
        // Component-wise: /ci/jobs holds /ci/jobs/step, not /ci/jobs2.
        if cgroup.starts_with(path) && stricter {
            found = Some((path.to_path_buf(), mode));
        }
    }
    found
}

fn mode_name(mode: UnlistedPolicy) -> &'static str {
    match mode {
        UnlistedPolicy::Pass => "pass",
        UnlistedPolicy::Deny => "deny",
    }
}

fn to_kernel_origin(o: &ConnectOrigin) -> KernelOrigin {
    let ip = match as_v4_mapped(&o.dst_addr) {
        Some(v4) => IpAddr::from(v4),
        None => IpAddr::V6(Ipv6Addr::from(o.dst_addr)),
    };
    let destination = match ip {
        IpAddr::V4(_) => SocketAddr::new(ip, o.dst_port),
        IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, o.dst_port, 0, 0)),
    };
    let comm_len = o.comm.iter().position(|b| *b == 0).unwrap_or(o.comm.len());
    KernelOrigin {
        destination,
        tgid: o.tgid,
        uid: o.uid,
        gid: o.gid,
        cgroup_id: o.cgroup_id,
        comm: String::from_utf8_lossy(o.comm.get(..comm_len).unwrap_or_default()).into_owned(),
        target_index: (o.target as usize).saturating_sub(1),
        instance: if o.identity_flags & ORIGIN_ID_CAPTURED != 0 {
            ConnectInstance::Captured {
                dev: o.exe_dev,
                ino: o.exe_ino,
                start_boottime_ns: o.start_boottime,
            }
        } else if o.identity_flags & ORIGIN_ID_READ_FAILED != 0 {
            ConnectInstance::Unreadable
        } else {
            ConnectInstance::NotCaptured
        },
    }
}

/// Whether the targets, with the local addresses of those on this host,
/// fit the kernel's trie as the agent would fill it; the reason when not.
pub fn check_targets(config: &Config, local: &[local::LocalTarget]) -> Result<(), String> {
    let resolved = resolve_host_targets(config);
    let resolve = |h: &str| -> Vec<IpAddr> {
        resolved
            .iter()
            .filter(|(name, _)| name == h)
            .map(|(_, ip)| *ip)
            .collect()
    };
    targets::build(config.targets.iter().enumerate(), &resolve, local).map(|_| ())
}

/// Host-name targets resolved once at start (the trie holds addresses).
fn resolve_host_targets(config: &Config) -> Vec<(String, IpAddr)> {
    use std::net::ToSocketAddrs;
    let mut out = Vec::new();
    for t in config.targets.iter() {
        if let crate::config::TargetAddress::Host(h) = &t.address {
            match (h.as_str(), 0).to_socket_addrs() {
                Ok(addrs) => out.extend(addrs.map(|a| (h.clone(), a.ip()))),
                Err(e) => tracing::warn!(target_name = %t.name, host = %h,
                    "cannot resolve {h} for the redirect ({e}); connections to it are not redirected until the agent restarts"),
            }
        }
    }
    out
}

/// Removes `dir` and the directories under it that hold nothing else;
/// pinned objects, and the directories that hold them, stay.
fn remove_empty_dirs(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&entry.path());
            }
        }
    }
    // Fails, as it should, when something is left inside.
    let _ = fs::remove_dir(dir);
}

/// Makes sure `pin_dir` lives on a mounted bpffs, mounting one at
/// /sys/fs/bpf when none is there, and that it is a directory only root
/// controls.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), RedirectError> {
    if let Some(mount_point) = pin_dir.ancestors().find(|a| cgroup::is_bpffs(a)) {
        if pins::world_writable(mount_point) {
            tracing::warn!(
                mount = %mount_point.display(),
                "bpffs is writable by every user (mounted without mode=); other users can pin objects there and squat pin directories; mount it with -o mode=0700 at boot (fstab or a mount unit) at {}",
                mount_point.display()
            );
        }
        return secure_pin_root(pin_dir);
    }
    let mount_point = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(mount_point) {
        let _ = fs::create_dir_all(mount_point);
        // mode=0700: without it the kernel makes the mount 1777, and any
        // user could squat pin directories in it.
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "-o", "mode=0700", "bpf"])
            .arg(mount_point)
            .status();
        if matches!(status, Ok(s) if s.success()) {
            tracing::info!("mounted bpffs at /sys/fs/bpf (mode 0700)");
            return secure_pin_root(pin_dir);
        }
    }
    Err(RedirectError::Kernel(format!(
        "{} is not on a bpf filesystem and mounting one failed; run `mount -t bpf bpf /sys/fs/bpf` as root, or set redirect.pin_dir to a directory on bpffs",
        pin_dir.display()
    )))
}

/// Makes or checks the pin root, then checks what leads to it (after, so
/// that directories made on the way are judged as they ended up).
fn secure_pin_root(pin_dir: &Path) -> Result<(), RedirectError> {
    pins::ensure_secure_dirs(pin_dir, pin_dir, pins::Owner::agent())?;
    pins::check_ancestors(pin_dir, pins::Owner::agent())?;
    Ok(())
}

impl Instance {
    fn start(
        mode: UnlistedPolicy,
        pin_root: &Path,
        dir: &Path,
        config_value: RedirectConfig,
        entries: &[targets::TrieEntry],
        resolvers: &[IpAddr],
        cgroups: &[&PathBuf],
    ) -> Result<Instance, RedirectError> {
        let job_timeline = config_value.flags & CONFIG_F_JOB_EVENTS != 0;
        let maps_dir = dir.join("maps");
        pins::ensure_secure_dirs(pin_root, &maps_dir, pins::Owner::agent())?;
        task_identity::check_pinned_origin_layout(&maps_dir)?;
        let map_paths: Vec<(&str, PathBuf)> =
            PINNED_MAPS.iter().map(|m| (*m, maps_dir.join(m))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        // The protect ring buffer is unused by this load: its smallest size.
        loader.map_max_entries("PROTECT_EVENTS", page_size());
        let mut ebpf = loader
            .load(PROGRAMS)
            .map_err(|e| classify("load the eBPF programs", e))?;

        fill_maps(&mut ebpf, config_value, entries, resolvers)?;
        task_identity::fill(
            &mut ebpf,
            "the executable and start time of connecting processes are not captured at connect; exe rules match on what /proc shows at accept, as without a redirect",
        )?;
        start_kernel_log_reader(&mut ebpf, mode);
        if job_timeline {
            if let Err(why) = jobs::start(&mut ebpf) {
                tracing::warn!("the job timeline has no process events ({why}); connects and sessions are still recorded");
            }
        }

        for name in PROGRAM_NAMES {
            let program = ebpf.program_mut(name).ok_or_else(|| {
                RedirectError::Kernel(format!("the embedded object lacks program {name}"))
            })?;
            let result = match program {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                _ => {
                    return Err(RedirectError::Kernel(format!(
                        "program {name} has an unexpected type"
                    )))
                }
            };
            result.map_err(|e| classify(&format!("load program {name}"), e))?;
        }
        let mut own_programs = HashSet::new();
        for name in PROGRAM_NAMES {
            let info = match ebpf.program(name) {
                Some(aya::programs::Program::CgroupSockAddr(p)) => p.info(),
                Some(aya::programs::Program::SockOps(p)) => p.info(),
                _ => continue,
            };
            match info {
                Ok(info) => {
                    own_programs.insert(info.id());
                }
                Err(e) => tracing::warn!("cannot read the kernel id of program {name}: {e}"),
            }
        }

        let mut attached = Vec::new();
        for path in cgroups {
            if !path.exists() {
                // A service's cgroup exists only while the service runs; it
                // is attached when it appears (see `Redirect::reconcile`).
                tracing::warn!(cgroup = %path.display(), "governed cgroup does not exist yet; it is attached as soon as it appears");
                continue;
            }
            let (entry, program_ids) = attach_cgroup(&mut ebpf, mode, pin_root, dir, path)?;
            own_programs.extend(program_ids);
            attached.push(entry);
        }

        let origins_map = ebpf
            .take_map("ORIGINS")
            .ok_or_else(|| RedirectError::Kernel("the embedded object lacks map ORIGINS".into()))?;
        let origins =
            HashMap::try_from(origins_map).map_err(|e| classify("open map ORIGINS", e))?;
        let stats_map = ebpf
            .take_map("STATS")
            .ok_or_else(|| RedirectError::Kernel("the embedded object lacks map STATS".into()))?;
        let stats = PerCpuArray::try_from(stats_map).map_err(|e| classify("open map STATS", e))?;
        let (job_events, job_stats) = if job_timeline {
            (
                Some(jobs::take_events(&mut ebpf).map_err(RedirectError::Kernel)?),
                Some(jobs::take_stats(&mut ebpf).map_err(RedirectError::Kernel)?),
            )
        } else {
            (None, None)
        };
        Ok(Instance {
            mode,
            pin_root: pin_root.to_path_buf(),
            dir: dir.to_path_buf(),
            ebpf: Mutex::new(ebpf),
            wanted: cgroups.iter().map(|p| p.to_path_buf()).collect(),
            origins: Mutex::new(origins),
            stats,
            attached: Mutex::new(attached),
            own_programs: Mutex::new(own_programs),
            seen_detached: Mutex::new(HashSet::new()),
            job_events: Mutex::new(job_events),
            job_stats,
        })
    }
}

/// Forwards the kernel programs' aya-log records (written only on error
/// paths) to the agent's log, from a thread of its own: never on a hot path.
fn start_kernel_log_reader(ebpf: &mut Ebpf, mode: UnlistedPolicy) {
    let mut logger = match aya_log::EbpfLogger::init_with_logger(
        ebpf,
        KernelLog {
            mode: mode_name(mode),
        },
    ) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("kernel program diagnostics are not available: {e}");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("kernel-log".into())
        .spawn(move || loop {
            // A malformed record makes aya-log panic; it must not take the agent
            // with it, and later records are still worth reading.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush())).is_err() {
                tracing::warn!("a kernel diagnostic record could not be decoded");
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the kernel diagnostics reader: {e}");
    }
}

/// Writes aya-log records to tracing.
struct KernelLog {
    mode: &'static str,
}

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        match record.level() {
            log::Level::Error | log::Level::Warn => {
                tracing::warn!(mode = self.mode, "kernel: {message}")
            }
            log::Level::Info => tracing::info!(mode = self.mode, "kernel: {message}"),
            _ => tracing::debug!(mode = self.mode, "kernel: {message}"),
        }
    }

    fn flush(&self) {}
}

impl Instance {
    /// Attaches to `path` unless its current incarnation already is.
    fn ensure_attached(&self, path: &Path) -> Result<bool, RedirectError> {
        let Ok(id) = cgroup::cgroup_id(path) else {
            return Ok(false);
        };
        let mut attached = self
            .attached
            .lock()
            .map_err(|_| RedirectError::Kernel("attach state poisoned".into()))?;
        if attached.iter().any(|a| a.path == path && a.id == id) {
            return Ok(false);
        }
        let mut ebpf = self
            .ebpf
            .lock()
            .map_err(|_| RedirectError::Kernel("program state poisoned".into()))?;
        let (entry, program_ids) =
            attach_cgroup(&mut ebpf, self.mode, &self.pin_root, &self.dir, path)?;
        if let Ok(mut own) = self.own_programs.lock() {
            own.extend(program_ids);
        }
        attached.retain(|a| a.path != path);
        attached.push(entry);
        Ok(true)
    }

    /// Logs, once per change, a governed cgroup on which the kernel no longer
    /// has this agent's programs (its pins were removed, or root detached
    /// them), and one on which they are back.
    fn report_kernel_detachments(&self) {
        let ours = self
            .own_programs
            .lock()
            .map(|o| o.clone())
            .unwrap_or_default();
        let attached = self.attached.lock().map(|a| a.clone()).unwrap_or_default();
        let Ok(mut seen) = self.seen_detached.lock() else {
            return;
        };
        let no_names = std::collections::HashMap::new();
        for a in attached {
            let view = attachments::kernel_view(&a.path, &ours, &no_names);
            if view.state == "attached" {
                if seen.remove(&a.id) {
                    tracing::info!(cgroup = %a.path.display(), "the kernel has the redirect programs on the governed cgroup again");
                }
            } else if seen.insert(a.id) {
                tracing::warn!(
                    cgroup = %a.path.display(),
                    kernel_state = %view.state,
                    error = view.error.as_deref().unwrap_or(""),
                    "the kernel no longer has the redirect programs on a governed cgroup: its pins were removed or its programs detached; restart the agent to attach them again"
                );
            }
        }
    }

    /// Drops pinned links of cgroups that no longer exist (a restarted
    /// service gets a new cgroup; the old one lingers while links hold it).
    fn forget_vanished(&self) {
        let Ok(mut attached) = self.attached.lock() else {
            return;
        };
        let mut gone = Vec::new();
        attached.retain(|a| {
            let alive = cgroup::cgroup_id(&a.path).is_ok_and(|id| id == a.id);
            if !alive {
                let _ = fs::remove_dir_all(self.dir.join("links").join(a.id.to_string()));
                tracing::info!(cgroup = %a.path.display(), "governed cgroup went away; its links were dropped");
                gone.push(a.id);
            }
            alive
        });
        drop(attached);
        if gone.is_empty() {
            return;
        }
        // A service's cgroup is a new one after every restart: the old ids
        // leave the tracepoints' filter, which would otherwise fill up.
        if let Ok(mut ebpf) = self.ebpf.lock() {
            for id in gone {
                jobs::ungovern(&mut ebpf, id);
            }
        }
    }
}

/// Makes the target trie `map` hold exactly `entries`: a re-opened pinned
/// map may still hold entries of an earlier configuration.
fn replace_targets(
    ebpf: &mut Ebpf,
    map: &str,
    entries: &[targets::TrieEntry],
) -> Result<(), RedirectError> {
    let mut trie: LpmTrie<_, [u8; 16], TargetEntry> =
        LpmTrie::try_from(ebpf.map_mut(map).ok_or_else(|| {
            RedirectError::Kernel(format!("the embedded object lacks map {map}"))
        })?)
        .map_err(|e| classify(&format!("open map {map}"), e))?;
    let wanted: HashSet<(u32, [u8; 16])> = entries.iter().map(|e| (e.prefix_len, e.addr)).collect();
    let stale: Vec<Key<[u8; 16]>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
        .collect();
    for key in stale {
        let _ = trie.remove(&key);
    }
    for e in entries {
        trie.insert(&Key::new(e.prefix_len, e.addr), e.entry, 0)
            .map_err(|err| classify(&format!("write map {map}"), err))?;
    }
    Ok(())
}

fn fill_maps(
    ebpf: &mut Ebpf,
    config_value: RedirectConfig,
    entries: &[targets::TrieEntry],
    resolvers: &[IpAddr],
) -> Result<(), RedirectError> {
    let missing = |m: &str| RedirectError::Kernel(format!("the embedded object lacks map {m}"));
    let mut config_map: Array<_, RedirectConfig> =
        Array::try_from(ebpf.map_mut("CONFIG").ok_or_else(|| missing("CONFIG"))?)
            .map_err(|e| classify("open map CONFIG", e))?;
    config_map
        .set(0, config_value, 0)
        .map_err(|e| classify("write map CONFIG", e))?;

    replace_targets(ebpf, "TARGETS", entries)?;

    let mut resolver_map: HashMap<_, [u8; 16], u32> = HashMap::try_from(
        ebpf.map_mut("RESOLVERS")
            .ok_or_else(|| missing("RESOLVERS"))?,
    )
    .map_err(|e| classify("open map RESOLVERS", e))?;
    let keep: HashSet<[u8; 16]> = resolvers
        .iter()
        .map(|ip| match ip {
            IpAddr::V4(v4) => v4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        })
        .collect();
    let old: Vec<[u8; 16]> = resolver_map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !keep.contains(k))
        .collect();
    for k in old {
        let _ = resolver_map.remove(&k);
    }
    for k in keep {
        resolver_map
            .insert(k, 1, 0)
            .map_err(|e| classify("write map RESOLVERS", e))?;
    }
    Ok(())
}

/// Attaches the programs to one cgroup and pins the links, or keeps
/// the links pinned by an earlier run. Also returns the kernel ids of the
/// programs behind the links.
fn attach_cgroup(
    ebpf: &mut Ebpf,
    mode: UnlistedPolicy,
    pin_root: &Path,
    dir: &Path,
    cgroup_dir: &Path,
) -> Result<(AttachedCgroup, Vec<u32>), RedirectError> {
    let id = cgroup::cgroup_id(cgroup_dir).map_err(|e| {
        RedirectError::Kernel(format!(
            "cannot use cgroup {}: {e}; create it first or fix the [[cgroup]] path",
            cgroup_dir.display()
        ))
    })?;
    if let Err(why) = jobs::govern(ebpf, id) {
        tracing::warn!(cgroup = %cgroup_dir.display(), "the job timeline does not follow this cgroup: {why}");
    }
    let links_dir = dir.join("links").join(id.to_string());
    let pins: Vec<PathBuf> = PROGRAM_NAMES.iter().map(|n| links_dir.join(n)).collect();
    // Links of the other mode on the same cgroup would block ours.
    let other_mode = match mode {
        UnlistedPolicy::Pass => UnlistedPolicy::Deny,
        UnlistedPolicy::Deny => UnlistedPolicy::Pass,
    };
    let other_links = dir
        .with_file_name(mode_name(other_mode))
        .join("links")
        .join(id.to_string());
    if other_links.exists() {
        tracing::warn!(cgroup = %cgroup_dir.display(), "the cgroup changes mode; replacing its programs");
        let _ = fs::remove_dir_all(&other_links);
    }
    // Checked before its pins are trusted for re-adoption, and before new
    // pins go in: a directory another user controls is refused.
    pins::ensure_secure_dirs(pin_root, &links_dir, pins::Owner::agent())?;
    // Each pinned link is kept on its own, the others attached: after an
    // upgrade that added programs, the old ones stay attached while the new
    // ones join, so the cgroup is never without its connect hooks.
    let mut program_ids = Vec::new();
    let mut adopted = Vec::new();
    let mut fresh = Vec::new();
    for (name, pin) in PROGRAM_NAMES.iter().zip(&pins) {
        if let Ok(link) = PinnedLink::from_pin(pin) {
            match FdLink::from(link).info() {
                Ok(info) => program_ids.push(info.program_id()),
                Err(e) => tracing::warn!("cannot read a re-adopted link's program: {e}"),
            }
            adopted.push(*name);
            continue;
        }
        // Whatever is there is no link (or none any more).
        let _ = fs::remove_file(pin);
        let cgroup_file = fs::File::open(cgroup_dir)
            .map_err(|e| io_error(format!("cannot open cgroup {}", cgroup_dir.display()), e))?;
        let action = format!("attach {name} to cgroup {}", cgroup_dir.display());
        let program = ebpf.program_mut(name).ok_or_else(|| {
            RedirectError::Kernel(format!("the embedded object lacks program {name}"))
        })?;
        let link: FdLink = match program {
            aya::programs::Program::CgroupSockAddr(p) => {
                let link_id = attach_sock_addr(p, cgroup_file, &action)?;
                p.take_link(link_id)
                    .map_err(|e| classify(&action, e))?
                    .try_into()
                    .map_err(|e| classify(&action, e))?
            }
            aya::programs::Program::SockOps(p) => {
                let link_id = p
                    .attach(cgroup_file, CgroupAttachMode::Single)
                    .map_err(|e| classify(&action, e))?;
                p.take_link(link_id)
                    .map_err(|e| classify(&action, e))?
                    .try_into()
                    .map_err(|e| classify(&action, e))?
            }
            _ => {
                return Err(RedirectError::Kernel(format!(
                    "program {name} has an unexpected type"
                )))
            }
        };
        if let Ok(info) = link.info() {
            program_ids.push(info.program_id());
        }
        link.pin(pin)
            .map_err(|e| classify(&format!("pin {}", pin.display()), e))?;
        fresh.push(*name);
    }
    let readopted = fresh.is_empty();
    if readopted {
        tracing::info!(cgroup = %cgroup_dir.display(), mode = mode_name(mode), "re-adopted pinned redirect programs");
    } else if adopted.is_empty() {
        tracing::info!(cgroup = %cgroup_dir.display(), mode = mode_name(mode), "attached the redirect programs");
    } else {
        tracing::info!(
            cgroup = %cgroup_dir.display(),
            mode = mode_name(mode),
            readopted = %adopted.join(","),
            attached = %fresh.join(","),
            "re-adopted some pinned redirect programs and attached the others"
        );
    }
    Ok((
        AttachedCgroup {
            path: cgroup_dir.to_path_buf(),
            id,
            unlisted: mode_name(mode),
            readopted,
        },
        program_ids,
    ))
}

fn attach_sock_addr(
    p: &mut CgroupSockAddr,
    cgroup_file: fs::File,
    action: &str,
) -> Result<aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId, RedirectError> {
    p.attach(cgroup_file, CgroupAttachMode::Single)
        .map_err(|e| classify(action, e))
}

/// Removes every pin under `pin_dir`, which detaches the programs (unless an
/// agent still holds them). Returns what was removed.
///
/// `pin_dir` itself stays, emptied, when it is the agent's own (a directory
/// only the agent's user can change): on a bpffs every user may write to,
/// removing it would let another user take the name before the next start.
/// Anything else at that path (another user's directory, a symlink, a
/// file) is removed entirely, without following a symlink.
pub fn detach(pin_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let meta = match fs::symlink_metadata(pin_dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        fs::remove_file(pin_dir)?;
        return Ok(vec![pin_dir.to_path_buf()]);
    }
    let mut removed = Vec::new();
    walk(pin_dir, &mut removed);
    if pins::is_private_to(pin_dir, pins::Owner::agent()) {
        for entry in fs::read_dir(pin_dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                fs::remove_dir_all(entry.path())?;
            } else {
                fs::remove_file(entry.path())?;
            }
        }
    } else {
        fs::remove_dir_all(pin_dir)?;
    }
    Ok(removed)
}

/// `ring` registered with the runtime, to wait until it is readable.
pub(crate) fn async_ring(
    ring: RingBuf<MapData>,
) -> std::io::Result<tokio::io::unix::AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the ring buffer owns its map's fd, which stays open, and is the
    // one `as_raw_fd` returns, for as long as the `AsyncFd` holds it.
    #[allow(unsafe_code)]
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    };
    registered.map_err(std::io::Error::from)
}

/// The kernel's page size (a ring buffer's smallest size).
pub(super) fn page_size() -> u32 {
    // SAFETY: sysconf reads a constant of the running system.
    #[allow(unsafe_code)]
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

/// The unused-import guard for `SockOps` (kept for type clarity in docs).
#[allow(dead_code)]
fn _sockops_type(_: &SockOps) {}

/// How often governed cgroups are checked for (re)appearance.
const RECONCILE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Attaches to governed cgroups that appear after start (a service's cgroup
/// exists only while it runs, and is new after each restart).
pub async fn keep_reconciling(
    redirect: std::sync::Arc<Redirect>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
        }
        let r = redirect.clone();
        match tokio::task::spawn_blocking(move || r.reconcile()).await {
            Ok(newly) => {
                for path in newly {
                    tracing::info!(cgroup = %path.display(), "governed cgroup appeared; programs attached");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cgroup reconciliation failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_capture_flags_decide_what_was_captured() {
        let mut record = ConnectOrigin {
            dst_addr: v4_mapped([10, 0, 0, 5]),
            dst_port: 5432,
            flags: 0,
            tgid: 42,
            uid: 1000,
            gid: 1000,
            cgroup_id: 7,
            comm: *b"psql\0\0\0\0\0\0\0\0\0\0\0\0",
            target: 1,
            _reserved: 0,
            exe_ino: 77,
            start_boottime: 5_000_000_000,
            exe_dev: (8 << 20) | 1,
            identity_flags: ORIGIN_ID_CAPTURED,
        };
        assert_eq!(
            to_kernel_origin(&record).instance,
            ConnectInstance::Captured {
                dev: (8 << 20) | 1,
                ino: 77,
                start_boottime_ns: 5_000_000_000
            }
        );
        record.identity_flags = ORIGIN_ID_READ_FAILED;
        assert_eq!(
            to_kernel_origin(&record).instance,
            ConnectInstance::Unreadable
        );
        // Offsets never configured (no BTF): fields are ignored.
        record.identity_flags = 0;
        let origin = to_kernel_origin(&record);
        assert_eq!(origin.instance, ConnectInstance::NotCaptured);
        assert_eq!((origin.tgid, origin.comm.as_str()), (42, "psql"));
    }

    #[test]
    fn the_strictest_governed_cgroup_holding_a_process_is_found_by_ancestry() {
        let governed = [
            (Path::new("/cg/tollgate.exec"), UnlistedPolicy::Pass),
            (Path::new("/cg/ci"), UnlistedPolicy::Pass),
            (Path::new("/cg/ci/jobs"), UnlistedPolicy::Deny),
            (Path::new("/cg/svc"), UnlistedPolicy::Pass),
        ];
        let find = |p: &str| strictest_holding(Path::new(p), governed.iter().copied());
        let deny = Some((PathBuf::from("/cg/ci/jobs"), UnlistedPolicy::Deny));
        assert_eq!(find("/cg/ci/jobs"), deny);
        assert_eq!(find("/cg/ci/jobs/step/1"), deny, "below a deny cgroup");
        assert_eq!(
            find("/cg/ci/other"),
            Some((PathBuf::from("/cg/ci"), UnlistedPolicy::Pass))
        );
        assert_eq!(
            find("/cg/ci/jobs2"),
            find("/cg/ci/other"),
            "not a prefix match"
        );
        assert_eq!(find("/cg/elsewhere"), None);
        assert_eq!(find("/cg"), None, "a parent is not held by its child");
    }
}
