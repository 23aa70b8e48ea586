//! CI job context: recognising a CI runner among a process's ancestors and
//! reading the job's variables from the environment the runner gave its child.
//!
//! The runner's direct child (the step's shell) received its environment from
//! the runner at `exec`; the job's own code runs below it and cannot change
//! what `/proc/<child>/environ` shows for that process. A process's own
//! environment, by contrast, is whatever its parent chose, so a context found
//! only there is recorded as claimed (`verified: false`).

use std::collections::HashMap;

use super::{CiContext, CiProvider};

/// Upper bound for `environ` reads.
pub(super) const ENVIRON_CAP: u64 = 1024 * 1024;

/// Strips the kernel's ` (deleted)` suffix and returns the last path element.
fn exe_basename(exe: &str) -> &str {
    let exe = exe.strip_suffix(" (deleted)").unwrap_or(exe);
    exe.rsplit('/').next().unwrap_or(exe)
}

/// Which CI runner, if any, a process is. `cmdline` is only consulted for
/// `java` processes (Jenkins agents), so callers can read it lazily.
pub(super) fn runner_provider(
    comm: &str,
    exe: Option<&str>,
    cmdline: impl FnOnce() -> Vec<String>,
) -> Option<CiProvider> {
    let base = exe.map(exe_basename);
    let is = |name: &str| comm == name || base == Some(name);
    if is("Runner.Worker") {
        return Some(CiProvider::GithubActions);
    }
    if is("gitlab-runner") {
        return Some(CiProvider::GitlabCi);
    }
    if is("buildkite-agent") {
        return Some(CiProvider::Buildkite);
    }
    if is("jenkins") {
        return Some(CiProvider::Jenkins);
    }
    if is("java") {
        let jenkins_agent = cmdline().iter().any(|arg| {
            let base = arg.rsplit('/').next().unwrap_or(arg);
            base == "agent.jar" || base == "remoting.jar" || base == "slave.jar"
        });
        if jenkins_agent {
            return Some(CiProvider::Jenkins);
        }
    }
    None
}

/// Every variable [`claimed_provider`] and [`context_from_env`] read. The
/// rest of an environment, often hundreds of entries in CI, is skipped
/// without being copied (a test reads every provider's variables through
/// [`parse_environ`]).
const CI_VARIABLES: &[&str] = &[
    "GITHUB_ACTIONS",
    "GITHUB_REPOSITORY",
    "GITHUB_REF_NAME",
    "GITHUB_REF",
    "GITHUB_JOB",
    "GITHUB_RUN_ID",
    "GITHUB_WORKFLOW",
    "GITHUB_ACTOR",
    "GITHUB_SERVER_URL",
    "GITHUB_SHA",
    "GITLAB_CI",
    "CI_PROJECT_PATH",
    "CI_COMMIT_REF_NAME",
    "CI_JOB_NAME",
    "CI_PIPELINE_ID",
    "GITLAB_USER_LOGIN",
    "CI_JOB_URL",
    "CI_COMMIT_SHA",
    "BUILDKITE",
    "BUILDKITE_PIPELINE_SLUG",
    "BUILDKITE_REPO",
    "BUILDKITE_BRANCH",
    "BUILDKITE_LABEL",
    "BUILDKITE_BUILD_NUMBER",
    "BUILDKITE_BUILD_CREATOR",
    "BUILDKITE_BUILD_URL",
    "BUILDKITE_COMMIT",
    "JENKINS_URL",
    "JOB_NAME",
    "GIT_BRANCH",
    "BRANCH_NAME",
    "BUILD_NUMBER",
    "BUILD_URL",
    "GIT_COMMIT",
];

/// Parses NUL-separated `KEY=VALUE` pairs, keeping the [`CI_VARIABLES`];
/// entries without `=` are skipped, and the first occurrence of a key wins
/// (as `getenv` does).
pub(super) fn parse_environ(bytes: &[u8]) -> HashMap<String, String> {
    let mut env = HashMap::new();
    for entry in bytes.split(|&b| b == 0) {
        let Some(eq) = entry.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (Some(key), Some(value)) = (entry.get(..eq), entry.get(eq.saturating_add(1)..)) else {
            continue;
        };
        let Some(&key) = CI_VARIABLES.iter().find(|known| known.as_bytes() == key) else {
            continue;
        };
        env.entry(key.to_owned())
            .or_insert_with(|| String::from_utf8_lossy(value).into_owned());
    }
    env
}

/// The provider a process's own environment claims, if any.
pub(super) fn claimed_provider(env: &HashMap<String, String>) -> Option<CiProvider> {
    let is_true = |key: &str| env.get(key).is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if is_true("GITHUB_ACTIONS") {
        Some(CiProvider::GithubActions)
    } else if is_true("GITLAB_CI") {
        Some(CiProvider::GitlabCi)
    } else if is_true("BUILDKITE") {
        Some(CiProvider::Buildkite)
    } else if env.get("JENKINS_URL").is_some_and(|v| !v.is_empty()) {
        Some(CiProvider::Jenkins)
    } else {
        None
    }
}

/// Fills a context from `env` for `provider`; `runner_pid` and `verified`
/// are left for the caller.
pub(super) fn context_from_env(provider: CiProvider, env: &HashMap<String, String>) -> CiContext {
    let get = |key: &str| env.get(key).filter(|v| !v.is_empty()).cloned();
    let mut ctx = CiContext {
        provider,
        repository: None,
        branch: None,
        job: None,
        run_id: None,
        workflow: None,
        actor: None,
        url: None,
        commit: None,
        runner_pid: None,
        verified: false,
    };
    match provider {
        CiProvider::GithubActions => {
            ctx.repository = get("GITHUB_REPOSITORY");
            ctx.branch = get("GITHUB_REF_NAME").or_else(|| get("GITHUB_REF"));
            ctx.job = get("GITHUB_JOB");
            ctx.run_id = get("GITHUB_RUN_ID");
            ctx.workflow = get("GITHUB_WORKFLOW");
            ctx.actor = get("GITHUB_ACTOR");
            ctx.commit = get("GITHUB_SHA");
            if let (Some(server), Some(repo), Some(run)) =
                (get("GITHUB_SERVER_URL"), &ctx.repository, &ctx.run_id)
            {
                let server = server.trim_end_matches('/');
                ctx.url = Some(format!("{server}/{repo}/actions/runs/{run}"));
            }
        }
        CiProvider::GitlabCi => {
            ctx.repository = get("CI_PROJECT_PATH");
            ctx.branch = get("CI_COMMIT_REF_NAME");
            ctx.job = get("CI_JOB_NAME");
            ctx.run_id = get("CI_PIPELINE_ID");
            ctx.actor = get("GITLAB_USER_LOGIN");
            ctx.url = get("CI_JOB_URL");
            ctx.commit = get("CI_COMMIT_SHA");
        }
        CiProvider::Buildkite => {
            ctx.repository = get("BUILDKITE_PIPELINE_SLUG").or_else(|| get("BUILDKITE_REPO"));
            ctx.branch = get("BUILDKITE_BRANCH");
            ctx.job = get("BUILDKITE_LABEL");
            ctx.run_id = get("BUILDKITE_BUILD_NUMBER");
            ctx.actor = get("BUILDKITE_BUILD_CREATOR");
            ctx.url = get("BUILDKITE_BUILD_URL");
            ctx.commit = get("BUILDKITE_COMMIT");
        }
        CiProvider::Jenkins => {
            ctx.repository = get("JOB_NAME");
            ctx.job = get("JOB_NAME");
            ctx.branch = get("GIT_BRANCH").or_else(|| get("BRANCH_NAME"));
            ctx.run_id = get("BUILD_NUMBER");
            ctx.url = get("BUILD_URL");
            ctx.commit = get("GIT_COMMIT");
        }
    }
    ctx
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// An environment as a process's `environ` holds it, with variables no
    /// provider reads, parsed: the providers' tests below then also check
    /// that [`CI_VARIABLES`] holds every variable they read.
    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        let mut bytes = b"PATH=/usr/bin\0HOME=/home/runner\0".to_vec();
        for (k, v) in pairs {
            bytes.extend_from_slice(format!("{k}={v}\0").as_bytes());
        }
        let parsed = parse_environ(&bytes);
        assert_eq!(parsed.len(), pairs.len(), "{pairs:?} -> {parsed:?}");
        parsed
    }

    #[test]
    fn recognises_runners() {
        let none = Vec::new;
        assert_eq!(
            runner_provider("Runner.Worker", None, none),
            Some(CiProvider::GithubActions)
        );
        assert_eq!(
            runner_provider(
                "dotnet",
                Some("/home/runner/actions-runner/bin/Runner.Worker (deleted)"),
                none
            ),
            Some(CiProvider::GithubActions)
        );
        assert_eq!(
            runner_provider("gitlab-runner", Some("/usr/bin/gitlab-runner"), none),
            Some(CiProvider::GitlabCi)
        );
        assert_eq!(
            runner_provider("buildkite-agent", None, none),
            Some(CiProvider::Buildkite)
        );
        assert_eq!(
            runner_provider("jenkins", None, none),
            Some(CiProvider::Jenkins)
        );
        let jar = || {
            vec![
                "java".to_owned(),
                "-jar".to_owned(),
                "/opt/agent.jar".to_owned(),
            ]
        };
        assert_eq!(
            runner_provider("java", Some("/usr/lib/jvm/bin/java"), jar),
            Some(CiProvider::Jenkins)
        );
        let app = || vec!["java".to_owned(), "-jar".to_owned(), "app.jar".to_owned()];
        assert_eq!(runner_provider("java", None, app), None);
        assert_eq!(runner_provider("bash", Some("/usr/bin/bash"), none), None);
    }

    #[test]
    fn environ_parsing() {
        let e = parse_environ(
            b"GITHUB_JOB=1\0GITHUB_REF=x=y\0NOEQ\0=bad\0GITHUB_JOB=2\0BUILD_URL=\0PATH=/bin\0",
        );
        assert_eq!(e.get("GITHUB_JOB").map(String::as_str), Some("1"));
        assert_eq!(e.get("GITHUB_REF").map(String::as_str), Some("x=y"));
        assert_eq!(e.get("BUILD_URL").map(String::as_str), Some(""));
        assert_eq!(e.len(), 3, "variables no provider reads are skipped");
        assert!(parse_environ(b"").is_empty());
    }

    #[test]
    fn github_actions_fields() {
        let e = env(&[
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_REPOSITORY", "org/repo"),
            ("GITHUB_REF_NAME", "main"),
            ("GITHUB_REF", "refs/heads/main"),
            ("GITHUB_JOB", "migrate"),
            ("GITHUB_RUN_ID", "987"),
            ("GITHUB_WORKFLOW", "deploy"),
            ("GITHUB_ACTOR", "octocat"),
            ("GITHUB_SERVER_URL", "https://github.com"),
            ("GITHUB_SHA", "ffac537e6cbbf934b08745a378932722df287a53"),
        ]);
        assert_eq!(claimed_provider(&e), Some(CiProvider::GithubActions));
        let c = context_from_env(CiProvider::GithubActions, &e);
        assert_eq!(c.repository.as_deref(), Some("org/repo"));
        assert_eq!(c.branch.as_deref(), Some("main"));
        assert_eq!(c.job.as_deref(), Some("migrate"));
        assert_eq!(c.run_id.as_deref(), Some("987"));
        assert_eq!(c.workflow.as_deref(), Some("deploy"));
        assert_eq!(c.actor.as_deref(), Some("octocat"));
        assert_eq!(
            c.commit.as_deref(),
            Some("ffac537e6cbbf934b08745a378932722df287a53")
        );
        assert_eq!(
            c.url.as_deref(),
            Some("https://github.com/org/repo/actions/runs/987")
        );
        // Branch falls back to GITHUB_REF; no url without the server.
        let e = env(&[("GITHUB_REF", "refs/pull/1/merge"), ("GITHUB_RUN_ID", "1")]);
        let c = context_from_env(CiProvider::GithubActions, &e);
        assert_eq!(c.branch.as_deref(), Some("refs/pull/1/merge"));
        assert_eq!(c.url, None);
    }

    #[test]
    fn gitlab_fields() {
        let e = env(&[
            ("GITLAB_CI", "true"),
            ("CI_PROJECT_PATH", "group/project"),
            ("CI_COMMIT_REF_NAME", "feature"),
            ("CI_JOB_NAME", "test"),
            ("CI_PIPELINE_ID", "55"),
            ("GITLAB_USER_LOGIN", "alice"),
            (
                "CI_JOB_URL",
                "https://gitlab.example/group/project/-/jobs/9",
            ),
        ]);
        assert_eq!(claimed_provider(&e), Some(CiProvider::GitlabCi));
        let c = context_from_env(CiProvider::GitlabCi, &e);
        assert_eq!(
            (
                c.repository.as_deref(),
                c.branch.as_deref(),
                c.job.as_deref(),
                c.run_id.as_deref(),
                c.workflow.as_deref(),
                c.actor.as_deref(),
                c.url.as_deref()
            ),
            (
                Some("group/project"),
                Some("feature"),
                Some("test"),
                Some("55"),
                None,
                Some("alice"),
                Some("https://gitlab.example/group/project/-/jobs/9")
            )
        );
    }

    #[test]
    fn buildkite_fields() {
        let e = env(&[
            ("BUILDKITE", "true"),
            ("BUILDKITE_REPO", "git@github.com:org/repo.git"),
            ("BUILDKITE_BRANCH", "main"),
            ("BUILDKITE_LABEL", ":rocket: deploy"),
            ("BUILDKITE_BUILD_NUMBER", "12"),
            ("BUILDKITE_BUILD_CREATOR", "Bob"),
            (
                "BUILDKITE_BUILD_URL",
                "https://buildkite.com/org/p/builds/12",
            ),
        ]);
        assert_eq!(claimed_provider(&e), Some(CiProvider::Buildkite));
        let c = context_from_env(CiProvider::Buildkite, &e);
        assert_eq!(c.repository.as_deref(), Some("git@github.com:org/repo.git"));
        assert_eq!(c.job.as_deref(), Some(":rocket: deploy"));
        assert_eq!(c.run_id.as_deref(), Some("12"));
        assert_eq!(c.actor.as_deref(), Some("Bob"));
        assert_eq!(
            c.url.as_deref(),
            Some("https://buildkite.com/org/p/builds/12")
        );
        assert_eq!(c.workflow, None);
        let mut e = e;
        e.insert("BUILDKITE_PIPELINE_SLUG".into(), "deploy-pipeline".into());
        let c = context_from_env(CiProvider::Buildkite, &e);
        assert_eq!(c.repository.as_deref(), Some("deploy-pipeline"));
    }

    #[test]
    fn jenkins_fields() {
        let e = env(&[
            ("JENKINS_URL", "https://jenkins.example/"),
            ("JOB_NAME", "folder/deploy"),
            ("BRANCH_NAME", "release"),
            ("BUILD_NUMBER", "301"),
            (
                "BUILD_URL",
                "https://jenkins.example/job/folder/job/deploy/301/",
            ),
        ]);
        assert_eq!(claimed_provider(&e), Some(CiProvider::Jenkins));
        let c = context_from_env(CiProvider::Jenkins, &e);
        assert_eq!(c.repository.as_deref(), Some("folder/deploy"));
        assert_eq!(c.job.as_deref(), Some("folder/deploy"));
        assert_eq!(c.branch.as_deref(), Some("release"));
        assert_eq!(c.run_id.as_deref(), Some("301"));
        assert_eq!(
            c.url.as_deref(),
            Some("https://jenkins.example/job/folder/job/deploy/301/")
        );
        let mut e = e;
        e.insert("GIT_BRANCH".into(), "origin/main".into());
        assert_eq!(
            context_from_env(CiProvider::Jenkins, &e).branch.as_deref(),
            Some("origin/main")
        );
    }

    #[test]
    fn no_claim_without_markers() {
        assert_eq!(
            claimed_provider(&parse_environ(b"GITHUB_ACTIONS=false\0CI=true\0")),
            None
        );
        assert_eq!(claimed_provider(&env(&[])), None);
    }
}
