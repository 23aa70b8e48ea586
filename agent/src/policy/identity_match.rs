//! Identity conditions outside a rule: the same `users`, `uids`, `exe`,
//! `cgroup` and `ci_*` matching as `[rule.match]`, for configuration that
//! picks something per process (a target's brokered credentials).

use globset::{GlobSet, GlobSetBuilder};

use super::compile::{glob, GlobStyle};
use super::matcher::Conditions;
use crate::identity::ProcessIdentity;

/// The identity conditions as written; an empty list is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentitySpec {
    /// Unix user names.
    pub users: Vec<String>,
    /// Unix uids.
    pub uids: Vec<u32>,
    /// Executable path globs (`*` stops at `/`).
    pub exe: Vec<String>,
    /// cgroup path globs.
    pub cgroup: Vec<String>,
    /// CI repository globs.
    pub ci_repository: Vec<String>,
    /// CI branch globs.
    pub ci_branch: Vec<String>,
    /// CI job globs.
    pub ci_job: Vec<String>,
    /// CI workflow globs.
    pub ci_workflow: Vec<String>,
    /// Whether the CI context must be verified (or must not be).
    pub ci_verified: Option<bool>,
}

/// Compiled identity conditions: every present one must hold (a list is
/// any-of), as in a rule's `match`; none present matches every process.
#[derive(Debug)]
pub struct IdentityMatch {
    conditions: Conditions,
    spec: IdentitySpec,
}

impl IdentityMatch {
    /// Compiles the globs; the error names the field and the pattern.
    pub fn compile(spec: &IdentitySpec) -> Result<IdentityMatch, String> {
        let globs = |field: &str, patterns: &[String], style| -> Result<Option<GlobSet>, String> {
            if patterns.is_empty() {
                return Ok(None);
            }
            let mut set = GlobSetBuilder::new();
            for pattern in patterns {
                set.add(
                    glob(pattern, style)
                        .map_err(|e| format!("bad glob \"{pattern}\" in `{field}`: {e}"))?,
                );
            }
            set.build()
                .map(Some)
                .map_err(|e| format!("cannot compile the globs of `{field}`: {e}"))
        };
        let conditions = Conditions {
            users: (!spec.users.is_empty()).then(|| spec.users.clone()),
            uids: (!spec.uids.is_empty()).then(|| spec.uids.clone()),
            exe: globs("exe", &spec.exe, GlobStyle::Path)?,
            cgroup: globs("cgroup", &spec.cgroup, GlobStyle::Path)?,
            ci_repository: globs("ci_repository", &spec.ci_repository, GlobStyle::Name)?,
            ci_branch: globs("ci_branch", &spec.ci_branch, GlobStyle::Name)?,
            ci_job: globs("ci_job", &spec.ci_job, GlobStyle::Name)?,
            ci_workflow: globs("ci_workflow", &spec.ci_workflow, GlobStyle::Name)?,
            ci_verified: spec.ci_verified,
            ..Conditions::default()
        };
        Ok(IdentityMatch {
            conditions,
            spec: spec.clone(),
        })
    }

    /// Whether every condition holds for `identity`.
    pub fn matches(&self, identity: &ProcessIdentity) -> bool {
        self.conditions.identity_holds(identity)
    }

    /// The conditions as written.
    pub fn spec(&self) -> &IdentitySpec {
        &self.spec
    }
}

impl PartialEq for IdentityMatch {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
    }
}

impl Eq for IdentityMatch {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::identity::{CiContext, CiProvider};

    fn process(user: &str, repository: Option<&str>) -> ProcessIdentity {
        ProcessIdentity {
            user: Some(user.to_owned()),
            uid: Some(if user == "root" { 0 } else { 1000 }),
            exe: Some("/usr/bin/psql".to_owned()),
            ci: repository.map(|r| CiContext {
                provider: CiProvider::GithubActions,
                repository: Some(r.to_owned()),
                branch: None,
                job: None,
                run_id: None,
                workflow: None,
                actor: None,
                url: None,
                commit: None,
                runner_pid: None,
                verified: true,
            }),
            ..ProcessIdentity::default()
        }
    }

    #[test]
    fn every_condition_must_hold_and_none_matches_everyone() {
        let any = IdentityMatch::compile(&IdentitySpec::default()).unwrap();
        assert!(any.matches(&process("ci", None)));
        let deploy = IdentityMatch::compile(&IdentitySpec {
            users: vec!["ci".to_owned()],
            ci_repository: vec!["acme/*".to_owned()],
            exe: vec!["/usr/bin/*".to_owned()],
            ..IdentitySpec::default()
        })
        .unwrap();
        assert!(deploy.matches(&process("ci", Some("acme/app"))));
        assert!(!deploy.matches(&process("ci", Some("other/app"))));
        assert!(!deploy.matches(&process("ci", None)));
        assert!(!deploy.matches(&process("root", Some("acme/app"))));
    }

    #[test]
    fn an_executable_that_changed_since_connect_matches_no_exe_condition() {
        use crate::identity::{InstanceCheck, InstanceVerdict};
        let psql = IdentityMatch::compile(&IdentitySpec {
            exe: vec!["/usr/bin/psql".to_owned()],
            ..IdentitySpec::default()
        })
        .unwrap();
        let mut execd = process("ci", None);
        assert!(psql.matches(&execd));
        execd.instance = Some(InstanceCheck {
            verdict: InstanceVerdict::Changed,
            at_connect: None,
            at_accept: None,
            reason: Some("another executable connected".to_owned()),
        });
        assert!(!psql.matches(&execd));
    }

    #[test]
    fn a_bad_glob_names_its_field() {
        let err = IdentityMatch::compile(&IdentitySpec {
            exe: vec!["/usr/[bin".to_owned()],
            ..IdentitySpec::default()
        })
        .unwrap_err();
        assert!(err.contains("`exe`"), "{err}");
    }
}
