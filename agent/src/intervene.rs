//! A hand on the offending process: when a statement matches a rule with
//! `on_match`, the process that sent it is stopped (SIGSTOP) or killed
//! (SIGKILL), or with `on_match_scope = "job"` every process of its
//! governed cgroup is frozen (`cgroup.freeze`) or killed (`cgroup.kill`).
//!
//! What was done is reported as a session event (logged, recorded), and
//! stopped processes and frozen cgroups are kept in a list that `tollgate
//! status` shows until they run again (`tollgate thaw`).
//!
//! Guards: never pid 1 or the agent itself; never a cgroup that holds the
//! agent (the root cgroup, the agent's own slice), so a rule cannot freeze
//! the agent or the host.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::identity::ProcessIdentity;
use crate::policy::{ProcessAction, ProcessActionKind, ProcessActionScope};

/// What was done to a process or a job, and whether it worked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intervention {
    /// The rule whose `on_match` asked for it.
    pub rule: String,
    /// `stop` or `kill`.
    pub action: String,
    /// `process` or `job`.
    pub scope: String,
    /// The process signalled (process scope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The cgroup frozen or killed (job scope), as in `/proc/PID/cgroup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Why it could not be done; `None` when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Intervention {
    /// One line for logs and recordings: `stopped pid 1234 (rule x)`.
    pub fn describe(&self) -> String {
        let done = match (self.action.as_str(), self.scope.as_str()) {
            ("stop", "job") => "froze the job cgroup",
            ("kill", "job") => "killed the job cgroup",
            ("stop", _) => "stopped the process",
            _ => "killed the process",
        };
        let what = match (&self.pid, &self.cgroup) {
            (_, Some(cgroup)) => cgroup.clone(),
            (Some(pid), None) => format!("pid {pid}"),
            (None, None) => "?".to_owned(),
        };
        match &self.error {
            None => format!("{done} {what} (rule \"{}\")", self.rule),
            Some(e) => format!(
                "could not act as rule \"{}\" asks ({} {}): {e}",
                self.rule, self.action, self.scope
            ),
        }
    }
}

/// A stopped process or a frozen cgroup, for `tollgate status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The process (process scope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The cgroup (job scope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The rule that stopped it.
    pub rule: String,
    /// The session whose statement matched.
    pub session: String,
    /// When, in Unix seconds.
    pub since: u64,
}

/// What this agent stopped or froze. Process-wide: sessions of every
/// protocol add to it, the control socket reads it.
static HELD: Mutex<Vec<Held>> = Mutex::new(Vec::new());

/// Acts on the strongest `on_match` among a statement's `decisions` (if
/// any) and reports what was done as the session's event.
pub fn act_on(
    decisions: &[crate::policy::Decision],
    identity: &ProcessIdentity,
    session: uuid::Uuid,
    events: &crate::events::Events,
) {
    let Some((action, rule)) = decisions
        .iter()
        .filter_map(crate::policy::Decision::process_action)
        .max_by_key(|(a, _)| *a)
    else {
        return;
    };
    let done = intervene(action, rule, identity, &session.to_string());
    events.emit(&crate::events::SessionEvent::Intervention {
        session,
        intervention: Box::new(done),
    });
}

/// Acts as `action` says on the process behind `identity`.
pub fn intervene(
    action: ProcessAction,
    rule: &str,
    identity: &ProcessIdentity,
    session: &str,
) -> Intervention {
    let mut done = Intervention {
        rule: rule.to_owned(),
        action: action.kind.as_str().to_owned(),
        scope: action.scope.as_str().to_owned(),
        pid: None,
        cgroup: None,
        error: None,
    };
    let outcome = match action.scope {
        ProcessActionScope::Process => {
            done.pid = identity.pid;
            signal(identity.pid, action.kind)
        }
        ProcessActionScope::Job => {
            done.cgroup = identity.cgroup.clone();
            freeze_or_kill(identity.cgroup.as_deref(), action.kind)
        }
    };
    if let Err(e) = outcome {
        done.error = Some(e);
    } else if action.kind == ProcessActionKind::Stop {
        let since = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        let known = held
            .iter()
            .any(|h| h.pid == done.pid && h.cgroup == done.cgroup);
        if !known {
            held.push(Held {
                pid: done.pid,
                cgroup: done.cgroup.clone(),
                rule: rule.to_owned(),
                session: session.to_owned(),
                since,
            });
        }
    }
    done
}

/// The processes and cgroups this agent stopped that are still stopped
/// (others are forgotten).
pub fn held() -> Vec<Held> {
    let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
    held.retain(|h| match (&h.cgroup, h.pid) {
        (Some(cgroup), _) => is_frozen(cgroup),
        (None, Some(pid)) => is_stopped(pid),
        (None, None) => false,
    });
    held.clone()
}

fn signal(pid: Option<u32>, kind: ProcessActionKind) -> Result<(), String> {
    let pid = pid.ok_or("the process is not known")?;
    if pid <= 1 || pid == std::process::id() {
        return Err(format!("pid {pid} is not one a rule may act on"));
    }
    let target = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| format!("pid {pid} is not a process id"))?;
    let signal = match kind {
        ProcessActionKind::Stop => rustix::process::Signal::STOP,
        ProcessActionKind::Kill => rustix::process::Signal::KILL,
    };
    rustix::process::kill_process(target, signal).map_err(|e| format!("pid {pid}: {e}"))
}

fn freeze_or_kill(cgroup: Option<&str>, kind: ProcessActionKind) -> Result<(), String> {
    let cgroup = cgroup.ok_or("the process's cgroup is not known")?;
    let dir = cgroup_dir(cgroup)?;
    let control = match kind {
        ProcessActionKind::Stop => "cgroup.freeze",
        ProcessActionKind::Kill => "cgroup.kill",
    };
    fs::write(dir.join(control), "1").map_err(|e| format!("{}: {e}", dir.join(control).display()))
}

/// The directory of a cgroup named as in `/proc/PID/cgroup`, refused when
/// it is the root or holds the agent.
fn cgroup_dir(cgroup: &str) -> Result<PathBuf, String> {
    let relative = cgroup.trim_start_matches('/');
    if relative.is_empty() || relative.split('/').any(|c| c == ".." || c.is_empty()) {
        return Err(format!("cgroup \"{cgroup}\" is not one a rule may act on"));
    }
    if let Some(own) = own_cgroup() {
        let own = own.trim_start_matches('/');
        if own == relative || own.starts_with(&format!("{relative}/")) {
            return Err(format!(
                "cgroup \"{cgroup}\" holds the agent itself; freeze or kill only job cgroups"
            ));
        }
    }
    let mount =
        crate::redirect::cgroup::cgroup2_mount().ok_or("no cgroup v2 hierarchy is mounted")?;
    Ok(mount.join(relative))
}

/// The agent's own cgroup (v2), from `/proc/self/cgroup`.
fn own_cgroup() -> Option<String> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Whether the cgroup (as in `/proc/PID/cgroup`) is frozen.
pub fn is_frozen(cgroup: &str) -> bool {
    let Some(mount) = crate::redirect::cgroup::cgroup2_mount() else {
        return false;
    };
    let events = mount
        .join(cgroup.trim_start_matches('/'))
        .join("cgroup.events");
    fs::read_to_string(events).is_ok_and(|t| t.lines().any(|l| l == "frozen 1"))
}

/// Whether the process is stopped (state `T` in `/proc/PID/stat`).
fn is_stopped(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state == 'T')
    })
}

/// Lets a stopped process or a frozen cgroup run again (`tollgate thaw`):
/// `what` is a pid, or a cgroup as `tollgate status` shows it (or its
/// full path under the cgroup mount).
pub fn thaw(what: &str) -> Result<String, String> {
    if let Ok(pid) = what.parse::<u32>() {
        let target = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .filter(|_| pid > 1)
            .ok_or_else(|| format!("{pid} is not a process one may continue"))?;
        rustix::process::kill_process(target, rustix::process::Signal::CONT)
            .map_err(|e| format!("pid {pid}: {e}"))?;
        return Ok(format!("continued pid {pid}"));
    }
    let mount =
        crate::redirect::cgroup::cgroup2_mount().ok_or("no cgroup v2 hierarchy is mounted")?;
    let path = Path::new(what);
    let dir = if path.starts_with(&mount) {
        path.to_path_buf()
    } else {
        mount.join(what.trim_start_matches('/'))
    };
    let freeze = dir.join("cgroup.freeze");
    if !freeze.exists() {
        return Err(format!(
            "{} is not a cgroup (no cgroup.freeze)",
            dir.display()
        ));
    }
    fs::write(&freeze, "0").map_err(|e| format!("{}: {e}", freeze.display()))?;
    Ok(format!("thawed {}", dir.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_root_cgroup_and_the_agents_own_are_refused() {
        assert!(cgroup_dir("/").is_err());
        assert!(cgroup_dir("").is_err());
        assert!(cgroup_dir("/a/../b").is_err());
        if let Some(own) = own_cgroup().filter(|o| o != "/") {
            let err = cgroup_dir(&own).unwrap_err();
            assert!(err.contains("holds the agent"), "{err}");
            let parent = own
                .rsplit_once('/')
                .map(|(p, _)| p.to_owned())
                .unwrap_or_default();
            if !parent.is_empty() {
                assert!(cgroup_dir(&parent).is_err());
            }
        }
    }

    #[test]
    fn pid_1_and_the_agent_are_never_signalled() {
        assert!(signal(Some(1), ProcessActionKind::Stop).is_err());
        assert!(signal(Some(std::process::id()), ProcessActionKind::Kill).is_err());
        assert!(signal(None, ProcessActionKind::Stop).is_err());
    }

    #[test]
    fn a_described_intervention_names_what_and_the_rule() {
        let done = Intervention {
            rule: "no-drop".to_owned(),
            action: "stop".to_owned(),
            scope: "job".to_owned(),
            pid: None,
            cgroup: Some("/ci/job-1".to_owned()),
            error: None,
        };
        assert_eq!(
            done.describe(),
            "froze the job cgroup /ci/job-1 (rule \"no-drop\")"
        );
    }
}
