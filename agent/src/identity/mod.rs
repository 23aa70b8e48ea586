//! Who is on the other end of a loopback TCP connection.
//!
//! The proxy accepts a connection and knows two addresses: the client's
//! (`accept()`'s peer) and its own. From those this module finds the process
//! that opened the connection and describes it, reading only `/proc` and
//! `/etc` (both roots are configurable, so tests run on fixture trees) and
//! asking the kernel about one socket over netlink:
//!
//! 1. **Socket** ([`IdentityResolver::find_socket_owner`]): the socket whose
//!    local address is the client and remote address the proxy gives its uid
//!    and inode. On the real `/proc` the kernel is asked for that one socket
//!    over `NETLINK_SOCK_DIAG` (tens of microseconds); where netlink cannot
//!    answer, and on fixture trees, the row is found in `/proc/net/tcp` (or
//!    `tcp6`; an IPv4 connection may appear there v4-mapped), which costs
//!    milliseconds on a busy host. The process holding
//!    `socket:[inode]` is found by reading `/proc/<pid>/fd/*` links, looking
//!    first at processes owned by the socket's uid, stopping at the first hit.
//! 2. **Process** ([`IdentityResolver::describe_process`]): `stat`, `status`,
//!    `exe` (and the SHA-256 of the running image, cached by device, inode,
//!    mtime and size), `cmdline`, `cgroup`, user and group names, and the
//!    ancestry up to pid 1 or a CI runner.
//! 3. **CI job**: when an ancestor is a CI runner (GitHub Actions'
//!    `Runner.Worker`, `gitlab-runner`, `buildkite-agent`, a Jenkins agent),
//!    the job's variables are read from the environment the runner gave its
//!    direct child, which the job cannot forge (`verified: true`). Without a
//!    runner ancestor, a CI context found in the process's own environment is
//!    kept but marked as claimed (`verified: false`).
//!
//! Nothing here fails on missing or odd data: a process may exit halfway,
//! belong to another user, or live in another network namespace. Each thing
//! that could not be determined becomes a human-readable entry in
//! [`ProcessIdentity::gaps`], and the rest is still filled in.
//!
//! All of it is blocking file I/O: run it on a blocking thread, once per
//! connection, never per message.

mod ci;
mod exe_hash;
mod instance;
mod process;
mod sock_diag;
mod socket;
mod users;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use exe_hash::PendingHash;
use exe_hash::{ExeHashCache, HashError, Lookup};
pub use instance::{
    parse_start_ticks, ConnectInstance, InstanceCheck, InstanceVerdict, InstanceView,
};
use process::why;

/// Ancestry walks stop after this many parents (guards against loops).
const MAX_ANCESTRY: usize = 64;

/// Resolves connections and pids to [`ProcessIdentity`]s. Cheap to share:
/// the only state is the executable-hash cache and, when reading the real
/// `/proc`, one `NETLINK_SOCK_DIAG` socket, each behind a mutex.
#[derive(Debug)]
pub struct IdentityResolver {
    proc_root: PathBuf,
    etc_root: PathBuf,
    exe_hashes: ExeHashCache,
    passwd: users::NameFile,
    group: users::NameFile,
    /// Set when `proc_root` is the real `/proc` (netlink answers for the
    /// agent's own network namespace, which `/proc/net` shows).
    sock_diag: Option<sock_diag::SockDiag>,
}

/// Whether a new executable's hash is waited for or left to the background.
#[derive(Debug, Clone, Copy)]
enum HashMode {
    Wait,
    Defer,
}

/// The socket of a connection as `/proc/net/tcp` shows it, and the process
/// holding it when one was found (`None`: it exited, or it lives in another
/// pid namespace or network namespace than the one this agent sees).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SocketOwner {
    pub inode: u64,
    pub uid: u32,
    pub pid: Option<u32>,
}

/// Everything known about the process behind a connection.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub comm: Option<String>,
    /// As the kernel reports it; ends with ` (deleted)` when the binary was
    /// removed or replaced after the process started.
    pub exe: Option<String>,
    /// Hex SHA-256 of the running image.
    pub exe_sha256: Option<String>,
    pub cmdline: Vec<String>,
    pub cgroup: Option<String>,
    /// Parent first, up to pid 1 (excluded) or up to and including a CI
    /// runner process.
    pub ancestry: Vec<Ancestor>,
    pub ci: Option<CiContext>,
    /// What could not be determined, and why.
    pub gaps: Vec<String>,
    /// For redirected connections whose executable and start time the
    /// kernel captured at connect: whether the process read at accept is
    /// the one that connected. `None` where nothing was captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceCheck>,
}

impl ProcessIdentity {
    /// Whether rules may match on the executable (`exe`, `exe_sha256`):
    /// not when the process is known to have changed since it connected,
    /// or could not be compared.
    pub fn exe_trusted(&self) -> bool {
        self.instance
            .as_ref()
            .is_none_or(InstanceCheck::exe_trusted)
    }
}

/// One process of the ancestry chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ancestor {
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
}

/// The CI job a process belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CiContext {
    pub provider: CiProvider,
    pub repository: Option<String>,
    pub branch: Option<String>,
    pub job: Option<String>,
    pub run_id: Option<String>,
    pub workflow: Option<String>,
    pub actor: Option<String>,
    pub url: Option<String>,
    /// The commit the job runs (`GITHUB_SHA`, `CI_COMMIT_SHA`,
    /// `BUILDKITE_COMMIT`, `GIT_COMMIT`); absent in recordings made
    /// before it was read.
    #[serde(default)]
    pub commit: Option<String>,
    /// The runner ancestor whose child's environment was read.
    pub runner_pid: Option<u32>,
    /// `true`: read from the environment the runner gave its direct child
    /// (the job cannot forge it). `false`: only the process's own
    /// environment claimed it, or the runner's child could not be read.
    pub verified: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum CiProvider {
    GithubActions,
    GitlabCi,
    Buildkite,
    Jenkins,
}

/// Which CI runner the program at `exe`, run with `args`, is (the job
/// timeline asks at every exec; as for identities, by its name).
pub fn runner_of(exe: &str, args: &[String]) -> Option<CiProvider> {
    let name = exe.rsplit('/').next().unwrap_or(exe);
    ci::runner_provider(name, Some(exe), || args.to_vec())
}

impl CiProvider {
    /// The serialized (snake_case) name.
    pub fn as_str(self) -> &'static str {
        match self {
            CiProvider::GithubActions => "github_actions",
            CiProvider::GitlabCi => "gitlab_ci",
            CiProvider::Buildkite => "buildkite",
            CiProvider::Jenkins => "jenkins",
        }
    }
}

impl fmt::Display for CiProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(thiserror::Error, Debug)]
pub enum IdentityError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("no tcp socket {client} -> {server} in {searched}")]
    SocketNotFound {
        client: SocketAddr,
        server: SocketAddr,
        searched: String,
    },
    #[error(
        "tcp socket {client} -> {server} (uid {uid}) has no inode: its owner closed it before it could be identified"
    )]
    SocketClosed {
        client: SocketAddr,
        server: SocketAddr,
        uid: u32,
    },
    #[error("addresses {client} and {server} are of different families; a tcp connection cannot join them")]
    FamilyMismatch {
        client: SocketAddr,
        server: SocketAddr,
    },
}

impl Default for IdentityResolver {
    fn default() -> Self {
        Self::new()
    }
}

impl IdentityResolver {
    /// Reads the real `/proc` and `/etc`.
    pub fn new() -> Self {
        Self::with_roots("/proc", "/etc")
    }

    /// Reads a `/proc`-like and an `/etc`-like tree (fixtures, or a host
    /// filesystem mounted elsewhere). Sockets are looked up over netlink
    /// only when `proc_root` is `/proc` itself.
    pub fn with_roots(proc_root: impl Into<PathBuf>, etc_root: impl Into<PathBuf>) -> Self {
        let proc_root = proc_root.into();
        let sock_diag = (proc_root == Path::new("/proc")).then(sock_diag::SockDiag::default);
        Self {
            proc_root,
            etc_root: etc_root.into(),
            exe_hashes: ExeHashCache::default(),
            passwd: users::NameFile::default(),
            group: users::NameFile::default(),
            sock_diag,
        }
    }

    /// The identity of the process that opened `client -> server`. Blocking
    /// (reads `/proc`); callers run it on a blocking thread.
    ///
    /// `client` is the connecting process's local address (the proxy's
    /// `accept()` peer address), `server` the address it connected to (the
    /// proxy's local address). Never fails: what is unknown is in `gaps`.
    pub fn identify_peer(&self, client: SocketAddr, server: SocketAddr) -> ProcessIdentity {
        self.identify(client, server, HashMode::Wait).0
    }

    /// [`IdentityResolver::identify_peer`], leaving the hash of a large
    /// executable to the background: `exe_sha256` is then `None` and the
    /// digest comes through the [`PendingHash`].
    pub fn identify_peer_deferred(
        &self,
        client: SocketAddr,
        server: SocketAddr,
    ) -> (ProcessIdentity, Option<PendingHash>) {
        self.identify(client, server, HashMode::Defer)
    }

    fn identify(
        &self,
        client: SocketAddr,
        server: SocketAddr,
        mode: HashMode,
    ) -> (ProcessIdentity, Option<PendingHash>) {
        let owner = match self.find_socket_owner(client, server) {
            Ok(owner) => owner,
            Err(err) => {
                let mut id = ProcessIdentity::default();
                if let IdentityError::SocketClosed { uid, .. } = err {
                    id.uid = Some(uid);
                    id.user = self.user_name(uid, &mut id.gaps);
                }
                id.gaps.push(format!("connection not identified: {err}"));
                return (id, None);
            }
        };
        let Some(pid) = owner.pid else {
            let mut id = ProcessIdentity {
                uid: Some(owner.uid),
                ..ProcessIdentity::default()
            };
            id.user = self.user_name(owner.uid, &mut id.gaps);
            id.gaps.push(format!(
                "no process holds socket inode {} ({client} -> {server}): it exited, or it is in another pid namespace; only the socket owner uid is known",
                owner.inode
            ));
            return (id, None);
        };
        let (mut id, pending) = self.describe(pid, mode);
        if id.uid.is_none() {
            id.uid = Some(owner.uid);
            id.user = self.user_name(owner.uid, &mut id.gaps);
            id.gaps.push(format!(
                "only the socket owner uid ({}) is known for process {pid}",
                owner.uid
            ));
        }
        // The pid might have been reused between the fd scan and the reads
        // above; if the process still holds the socket now, it held it
        // throughout, and every field describes the right process.
        // (An exited process already has its gap.)
        let still_there = self.proc_root.join(pid.to_string()).exists();
        if still_there && !socket::holds_socket(&self.proc_root, pid, owner.inode) {
            id.gaps.push(format!(
                "process {pid} no longer holds socket inode {}; fields read from /proc/{pid} may describe a later process with the same pid",
                owner.inode
            ));
        }
        (id, pending)
    }

    /// Finds the socket of `client -> server` and the process holding it.
    ///
    /// If the socket is shared by several processes (inherited across
    /// `fork`, or passed over a unix socket) only the first one found is
    /// returned, preferring processes owned by the socket's uid and newer
    /// ones (pids counted down from the last one handed out).
    pub fn find_socket_owner(
        &self,
        client: SocketAddr,
        server: SocketAddr,
    ) -> Result<SocketOwner, IdentityError> {
        let netlink = self
            .sock_diag
            .as_ref()
            .and_then(|diag| diag.find(client, server));
        let row = match netlink {
            Some(found) => found?,
            None => socket::find_row(&self.proc_root, client, server)?,
        };
        let pid = socket::find_pid_for_inode(&self.proc_root, row.inode, row.uid)?;
        Ok(SocketOwner {
            inode: row.inode,
            uid: row.uid,
            pid,
        })
    }

    /// Describes process `pid`. Never fails: fills in what it can and records
    /// each gap.
    pub fn describe_process(&self, pid: u32) -> ProcessIdentity {
        self.describe(pid, HashMode::Wait).0
    }

    /// The CI job of `pid`, a process the `provider` runner `runner_pid`
    /// started itself (its parent in the kernel's view), from `pid`'s
    /// environment: verified, as [`IdentityResolver::describe_process`]
    /// finds it for the runner's child. With the environment unreadable
    /// (the process already exited) only the provider and runner are set.
    pub fn runner_child_ci(&self, pid: u32, provider: CiProvider, runner_pid: u32) -> CiContext {
        let mut gaps = Vec::new();
        let env = self.read_environ(pid, &mut gaps).unwrap_or_default();
        let mut ctx = ci::context_from_env(provider, &env);
        ctx.runner_pid = Some(runner_pid);
        ctx.verified = true;
        ctx
    }

    /// [`IdentityResolver::describe_process`], leaving the hash of a large
    /// executable to the background (see
    /// [`IdentityResolver::identify_peer_deferred`]).
    pub fn describe_process_deferred(&self, pid: u32) -> (ProcessIdentity, Option<PendingHash>) {
        self.describe(pid, HashMode::Defer)
    }

    fn describe(&self, pid: u32, mode: HashMode) -> (ProcessIdentity, Option<PendingHash>) {
        let mut pending = None;
        let mut id = ProcessIdentity {
            pid: Some(pid),
            ..ProcessIdentity::default()
        };
        let dir = self.proc_root.join(pid.to_string());
        match std::fs::metadata(&dir) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                id.gaps
                    .push(format!("process {pid} exited before its identity was read"));
                return (id, None);
            }
            Err(e) => {
                id.gaps
                    .push(format!("cannot read {}: {}", dir.display(), why(&e)));
                return (id, None);
            }
        }
        let gap = |gaps: &mut Vec<String>, what: &str, err: &io::Error| {
            gaps.push(if err.kind() == io::ErrorKind::NotFound && !dir.exists() {
                format!("process {pid} exited before its {what} was read")
            } else {
                format!("cannot read the {what} of process {pid}: {}", why(err))
            });
        };

        let ppid = match process::read_stat(&dir) {
            Ok(stat) => {
                id.comm = Some(stat.comm);
                Some(stat.ppid)
            }
            Err(e) => {
                gap(&mut id.gaps, "stat (name, parent)", &e);
                None
            }
        };

        match process::read_proc_text(&dir.join("status")) {
            Ok(text) => {
                let (uid, gid) = process::parse_status_ids(&text);
                if uid.is_none() || gid.is_none() {
                    id.gaps.push(format!(
                        "the status of process {pid} has no readable Uid/Gid line"
                    ));
                }
                id.uid = uid;
                id.gid = gid;
            }
            Err(e) => gap(&mut id.gaps, "status (uid, gid)", &e),
        }
        if let Some(uid) = id.uid {
            id.user = self.user_name(uid, &mut id.gaps);
        }
        if let Some(gid) = id.gid {
            id.group = self.group_name(gid, &mut id.gaps);
        }

        match process::read_link_string(&dir.join("exe")) {
            Ok(exe) => {
                if exe.ends_with(" (deleted)") {
                    id.gaps.push(format!(
                        "the executable of process {pid} was deleted or replaced after it started; the hash is of the running image"
                    ));
                }
                id.exe = Some(exe);
                let exe_path = dir.join("exe");
                let found = match mode {
                    HashMode::Wait => match self.exe_hashes.sha256(&exe_path) {
                        Ok(digest) => Lookup::Ready(digest),
                        Err(e) => Lookup::Failed(e),
                    },
                    HashMode::Defer => self.exe_hashes.lookup(&exe_path),
                };
                match found {
                    Lookup::Ready(digest) => id.exe_sha256 = Some(digest),
                    Lookup::Pending(hash) => pending = Some(hash),
                    Lookup::Failed(HashError::Open(e) | HashError::Read(e)) => {
                        gap(&mut id.gaps, "executable (for its hash)", &e)
                    }
                    Lookup::Failed(e @ (HashError::TooLarge(_) | HashError::Busy)) => id
                        .gaps
                        .push(format!("the executable of process {pid}: {e}")),
                }
            }
            // Opening it for the hash needs the same permission: one note.
            Err(e) => gap(&mut id.gaps, "executable (path and hash)", &e),
        }

        match process::read_capped(&dir.join("cmdline"), process::CMDLINE_CAP) {
            Ok((bytes, truncated)) => {
                if truncated {
                    id.gaps.push(format!(
                        "the command line of process {pid} is longer than {} bytes and was truncated",
                        process::CMDLINE_CAP
                    ));
                }
                id.cmdline = process::parse_cmdline(&bytes);
            }
            Err(e) => gap(&mut id.gaps, "command line", &e),
        }

        match process::read_proc_text(&dir.join("cgroup")) {
            Ok(text) => {
                id.cgroup = process::parse_cgroup(&text);
                if id.cgroup.is_none() {
                    id.gaps.push(format!(
                        "the cgroup file of process {pid} has no readable line"
                    ));
                }
            }
            Err(e) => gap(&mut id.gaps, "cgroup", &e),
        }

        let runner = match ppid {
            Some(ppid) => self.walk_ancestry(pid, ppid, &mut id),
            None => None,
        };
        self.fill_ci(pid, runner, &mut id);
        (id, pending)
    }

    /// Fills `id.ancestry` from `ppid` upwards; returns the index (in
    /// `id.ancestry`) and kind of the CI runner the walk stopped at.
    fn walk_ancestry(
        &self,
        pid: u32,
        ppid: u32,
        id: &mut ProcessIdentity,
    ) -> Option<(usize, CiProvider)> {
        // At most MAX_ANCESTRY entries: a list is cheaper than hashing.
        let mut seen = vec![pid];
        let mut cur = ppid;
        while cur > 1 {
            if id.ancestry.len() >= MAX_ANCESTRY {
                id.gaps.push(format!(
                    "ancestry of process {pid} cut at {MAX_ANCESTRY} levels (at pid {cur})"
                ));
                return None;
            }
            if seen.contains(&cur) {
                id.gaps.push(format!(
                    "ancestry of process {pid} loops back to pid {cur}; walk stopped"
                ));
                return None;
            }
            seen.push(cur);
            let dir = self.proc_root.join(cur.to_string());
            let stat = match process::read_stat(&dir) {
                Ok(stat) => stat,
                Err(e) => {
                    id.gaps.push(format!(
                        "ancestry of process {pid} stops at pid {cur}: cannot read its stat: {}",
                        why(&e)
                    ));
                    return None;
                }
            };
            let exe = process::read_link_string(&dir.join("exe")).ok();
            let provider = ci::runner_provider(&stat.comm, exe.as_deref(), || {
                process::read_capped(&dir.join("cmdline"), process::CMDLINE_CAP)
                    .map(|(bytes, _)| process::parse_cmdline(&bytes))
                    .unwrap_or_default()
            });
            id.ancestry.push(Ancestor {
                pid: cur,
                comm: stat.comm,
                exe,
            });
            if let Some(provider) = provider {
                return Some((id.ancestry.len().saturating_sub(1), provider));
            }
            cur = stat.ppid;
        }
        None
    }

    /// Sets `id.ci` from the runner's child (verified) or, without a runner,
    /// from the process's own environment (claimed).
    fn fill_ci(&self, pid: u32, runner: Option<(usize, CiProvider)>, id: &mut ProcessIdentity) {
        if let Some((index, provider)) = runner {
            let runner_pid = id.ancestry.get(index).map(|a| a.pid);
            // The runner's direct child in the chain: the previous ancestor,
            // or the process itself when the runner is its parent.
            let child = match index.checked_sub(1) {
                Some(i) => id.ancestry.get(i).map_or(pid, |a| a.pid),
                None => pid,
            };
            match self.read_environ(child, &mut id.gaps) {
                Ok(env) => {
                    let mut ctx = ci::context_from_env(provider, &env);
                    ctx.runner_pid = runner_pid;
                    ctx.verified = true;
                    id.ci = Some(ctx);
                }
                Err(e) => {
                    id.gaps.push(format!(
                        "cannot read the environment of pid {child}, started by the {provider} runner (pid {}): {}; ci job details unknown",
                        runner_pid.unwrap_or_default(),
                        why(&e)
                    ));
                    let mut ctx = ci::context_from_env(provider, &Default::default());
                    ctx.runner_pid = runner_pid;
                    id.ci = Some(ctx);
                }
            }
            return;
        }
        match self.read_environ(pid, &mut id.gaps) {
            Ok(env) => {
                if let Some(provider) = ci::claimed_provider(&env) {
                    id.ci = Some(ci::context_from_env(provider, &env));
                    id.gaps.push(
                        "ci context claimed by the process environment only; no runner ancestor found"
                            .to_owned(),
                    );
                }
            }
            Err(e) => id.gaps.push(format!(
                "cannot read the environment of process {pid}: {}; ci context unknown",
                why(&e)
            )),
        }
    }

    fn read_environ(
        &self,
        pid: u32,
        gaps: &mut Vec<String>,
    ) -> io::Result<std::collections::HashMap<String, String>> {
        let path = self.proc_root.join(pid.to_string()).join("environ");
        let (bytes, truncated) = process::read_capped(&path, ci::ENVIRON_CAP)?;
        if truncated {
            gaps.push(format!(
                "the environment of pid {pid} is longer than {} bytes; only the start was read",
                ci::ENVIRON_CAP
            ));
        }
        Ok(ci::parse_environ(&bytes))
    }

    /// Looks an id up in a passwd/group file, recording a gap when it cannot.
    fn user_name(&self, uid: u32, gaps: &mut Vec<String>) -> Option<String> {
        self.name_for(&self.passwd, "passwd", uid, "uid", gaps)
    }

    fn group_name(&self, gid: u32, gaps: &mut Vec<String>) -> Option<String> {
        self.name_for(&self.group, "group", gid, "gid", gaps)
    }

    fn name_for(
        &self,
        names: &users::NameFile,
        file: &str,
        id: u32,
        kind: &str,
        gaps: &mut Vec<String>,
    ) -> Option<String> {
        let file = self.etc_root.join(file);
        match names.lookup(&file, id) {
            Ok(Some(name)) => Some(name),
            Ok(None) => {
                gaps.push(format!("{kind} {id} has no entry in {}", file.display()));
                None
            }
            Err(e) => {
                gaps.push(format!("cannot read {}: {}", file.display(), why(&e)));
                None
            }
        }
    }

    #[cfg(test)]
    fn cache_len(&self) -> usize {
        self.exe_hashes.len()
    }
}

impl ProcessIdentity {
    /// One line for logs: `pid=1234 exe=/usr/bin/psql uid=0(root)`, plus
    /// ` ci=github_actions:org/repo` when a CI context is known.
    pub fn summary(&self) -> String {
        let mut s = match self.pid {
            Some(pid) => format!("pid={pid}"),
            None => "pid=?".to_owned(),
        };
        match (&self.exe, &self.comm) {
            (Some(exe), _) => s.push_str(&format!(" exe={exe}")),
            (None, Some(comm)) => s.push_str(&format!(" comm={comm}")),
            (None, None) => s.push_str(" exe=?"),
        }
        match (self.uid, &self.user) {
            (Some(uid), Some(user)) => s.push_str(&format!(" uid={uid}({user})")),
            (Some(uid), None) => s.push_str(&format!(" uid={uid}")),
            (None, _) => s.push_str(" uid=?"),
        }
        match self.instance.as_ref().map(|c| c.verdict) {
            Some(InstanceVerdict::Changed) => s.push_str(" identity=changed"),
            Some(InstanceVerdict::Unverified) => s.push_str(" identity=unverified"),
            Some(InstanceVerdict::Same) | None => {}
        }
        if let Some(ci) = &self.ci {
            s.push_str(&format!(" ci={}", ci.provider));
            if let Some(repo) = &ci.repository {
                s.push_str(&format!(":{repo}"));
            }
            if !ci.verified {
                s.push_str("(unverified)");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests;
