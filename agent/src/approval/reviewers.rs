//! Who a reviewer is: the Unix peer of the reviewer socket, named from the
//! local `passwd` and `group` files (no NSS, like `identity/`), with the
//! cgroup and verified CI actor of its process for segregation of duties.

use std::path::Path;

use serde::Serialize;

use crate::identity::IdentityResolver;

/// A person acting on the reviewer API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reviewer {
    /// The peer's uid.
    pub uid: u32,
    /// Its user name (the uid in digits when `passwd` does not name it).
    pub user: String,
    /// Names of its groups: the primary group and every group that lists it.
    pub groups: Vec<String>,
    /// The cgroup of the process that connected.
    pub cgroup: Option<String>,
    /// The verified CI actor of that process, when it runs in a CI job.
    pub ci_actor: Option<String>,
    /// How it authenticated, for the audit: `unix:UID` (the reviewer
    /// socket's peer credentials) or `token:NAME` (a reviewer token over
    /// TLS).
    pub via: String,
}

impl Reviewer {
    /// Describes the peer `uid`/`gid`/`pid` with the files under `etc`
    /// (normally `/etc`) and the process details from `identity`.
    pub fn of_peer(
        uid: u32,
        gid: u32,
        pid: Option<u32>,
        etc: &Path,
        identity: &IdentityResolver,
    ) -> Reviewer {
        let passwd = std::fs::read_to_string(etc.join("passwd")).unwrap_or_default();
        let group = std::fs::read_to_string(etc.join("group")).unwrap_or_default();
        let user = user_name(&passwd, uid).unwrap_or_else(|| uid.to_string());
        let groups = groups_of(&group, &user, gid);
        let process = pid.map(|pid| identity.describe_process(pid));
        Reviewer {
            uid,
            user,
            groups,
            cgroup: process.as_ref().and_then(|p| p.cgroup.clone()),
            ci_actor: process
                .as_ref()
                .and_then(|p| p.ci.as_ref())
                .filter(|ci| ci.verified)
                .and_then(|ci| ci.actor.clone()),
            via: format!("unix:{uid}"),
        }
    }

    /// Describes the Unix `user` a reviewer token named `token` acts as,
    /// with the files under `etc`; `None` when `passwd` has no such user.
    /// There is no process to name: a remote reviewer has no cgroup and no
    /// CI actor, and is kept apart from the requester by uid.
    pub fn of_token_user(user: &str, token: &str, etc: &Path) -> Option<Reviewer> {
        let passwd = std::fs::read_to_string(etc.join("passwd")).unwrap_or_default();
        let group = std::fs::read_to_string(etc.join("group")).unwrap_or_default();
        let (uid, gid) = user_ids(&passwd, user)?;
        Some(Reviewer {
            uid,
            user: user.to_owned(),
            groups: groups_of(&group, user, gid),
            cgroup: None,
            ci_actor: None,
            via: format!("token:{token}"),
        })
    }
}

/// The uid and primary gid of user `name` in a `passwd` file.
pub fn user_ids(passwd: &str, name: &str) -> Option<(u32, u32)> {
    let fields = entries(passwd).find(|fields| fields.first().map(|n| n.trim()) == Some(name))?;
    let number = |i: usize| fields.get(i).and_then(|f| f.trim().parse::<u32>().ok());
    Some((number(2)?, number(3)?))
}

/// The name of `uid` in a `passwd` file.
pub fn user_name(passwd: &str, uid: u32) -> Option<String> {
    entries(passwd)
        .find(|fields| fields.get(2).and_then(|f| f.trim().parse::<u32>().ok()) == Some(uid))
        .and_then(|fields| fields.first().map(|n| n.trim().to_owned()))
        .filter(|n| !n.is_empty())
}

/// The groups of `user` in a `group` file: the one whose gid is its primary
/// `gid`, and every group that lists it as a member.
pub fn groups_of(group: &str, user: &str, gid: u32) -> Vec<String> {
    let mut names = Vec::new();
    for fields in entries(group) {
        let Some(name) = fields.first().map(|n| n.trim()).filter(|n| !n.is_empty()) else {
            continue;
        };
        let primary = fields.get(2).and_then(|f| f.trim().parse::<u32>().ok()) == Some(gid);
        let member = fields
            .get(3)
            .is_some_and(|m| m.split(',').any(|m| m.trim() == user));
        if (primary || member) && !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    names
}

/// Lines split on `:`, without comments, blank lines and NIS `+`/`-` lines.
fn entries(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with(['#', '+', '-']))
        .map(|l| l.split(':').collect())
}

/// The gid of group `name` in a `group` file.
pub fn group_id(group: &str, name: &str) -> Option<u32> {
    entries(group)
        .find(|fields| fields.first().map(|n| n.trim()) == Some(name))
        .and_then(|fields| fields.get(2).and_then(|f| f.trim().parse().ok()))
}
