//! The policy from one place: a bucket prefix (a real S3 server) or a git
//! repository, polled; real psql sessions show which policy is in force.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tollgate_tests::s3::S3Server;
use tollgate_tests::*;

use crate::listener::{http_get, scraped};

const NO_DROP: &str = "[[rule]]\nname = \"no-drop\"\naction = \"deny\"\nmessage = \"not here\"\n[rule.match]\nkinds = [\"drop\"]\n";
const NO_SELECT: &str = "[[rule]]\nname = \"no-select\"\naction = \"deny\"\nmessage = \"reads are off\"\n[rule.match]\nkinds = [\"select\"]\n";

/// Whether `sql` is refused by the rule named `rule`.
fn refused_by(port: u16, sql: &str, rule: &str) -> bool {
    let out = psql_command(port, sql).output().unwrap();
    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(rule)
}

fn policy_status(agent: &Agent) -> Value {
    agent.status().unwrap()["policy"].clone()
}

#[test]
fn a_policy_in_a_bucket_is_fetched_updated_kept_when_invalid_and_cached_when_the_bucket_is_down() {
    let s3 = S3Server::start();
    s3.boto("s3.create_bucket(Bucket='policies')\nprint('true')");
    s3.put("policies", "tollgate/ci.toml", NO_DROP);
    // Not a policy of this prefix: deeper, and not .toml.
    s3.put("policies", "tollgate/old/ci.toml", NO_SELECT);
    s3.put("policies", "tollgate/README.md", "policies for the runners");
    let pg = Postgres::start();
    let work = tempfile::Builder::new()
        .prefix("tollgate-policy-source-")
        .tempdir()
        .unwrap();
    let secret = work.path().join("s3-secret");
    std::fs::write(&secret, "test\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (port, metrics_port) = (free_port(), free_port());
    let cache = work.path().join("cache");
    let config = listener_config(port, pg.port, &format!("metrics_listen = \"127.0.0.1:{metrics_port}\""))
        + &format!(
            "\n[policy_source]\ns3 = \"s3://policies/tollgate/\"\nendpoint = \"{}\"\naccess_key_id = \"test\"\nsecret_access_key_file = \"{}\"\ninterval = \"1s\"\ndir = \"{}\"\n",
            s3.endpoint(),
            secret.display(),
            cache.display()
        );
    let mut agent = Agent::start(&config);
    assert!(refused_by(port, "drop table if exists t", "no-drop"));
    let out = psql_command(port, "select 1").output().unwrap();
    assert!(out.status.success(), "only the prefix's own files count");
    let first = policy_status(&agent);
    assert_eq!(
        first["source"]["origin"], "s3://policies/tollgate",
        "{first}"
    );
    let first_digest = first["digest"].as_str().unwrap().to_string();

    // A new version in the bucket is in force within seconds, and the
    // recordings of new sessions carry its digest.
    s3.put("policies", "tollgate/ci.toml", NO_SELECT);
    agent.wait_until(
        "the new policy",
        Duration::from_secs(30),
        &["polic"],
        || refused_by(port, "select 1", "no-select"),
    );
    let second = policy_status(&agent);
    let digest = second["digest"].as_str().unwrap().to_string();
    assert_ne!(digest, first_digest);
    assert!(http_get(metrics_port, "/metrics")
        .contains(&format!("tollgate_policy_info{{digest=\"{digest}\"}} 1")));
    assert!(
        scraped(
            metrics_port,
            "tollgate_policy_source_polls_total{outcome=\"updated\"}"
        ) >= 1
    );
    let list = agent.cli(&["recordings", "list", "--json"]);
    let list: Vec<Value> = serde_json::from_slice(&list.stdout).unwrap();
    let newest = list.last().unwrap()["id"].as_str().unwrap().to_string();
    let show = agent.cli(&["recordings", "show", &newest, "--no-color"]);
    assert!(String::from_utf8_lossy(&show.stdout).contains(&digest));

    // An invalid version is refused; the one in force stays.
    s3.put("policies", "tollgate/ci.toml", "[[rule]]\nname = 7\n");
    agent.wait_until(
        "the invalid version to be seen",
        Duration::from_secs(30),
        &["polic"],
        || {
            scraped(
                metrics_port,
                "tollgate_policy_source_polls_total{outcome=\"invalid\"}",
            ) >= 1
        },
    );
    assert!(refused_by(port, "select 1", "no-select"));
    let kept = policy_status(&agent);
    assert_eq!(kept["digest"], digest.as_str());
    assert!(
        kept["source"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("ci.toml")),
        "{kept}"
    );

    // The bucket goes away: polls fail, the policy stays, and a restart
    // starts from the cached copy.
    drop(s3);
    agent.wait_until("a failed poll", Duration::from_secs(30), &["polic"], || {
        scraped(
            metrics_port,
            "tollgate_policy_source_polls_total{outcome=\"failed\"}",
        ) >= 1
    });
    agent.terminate();
    let _ = agent.child.wait();
    agent = Agent::start(&config);
    assert!(refused_by(port, "select 1", "no-select"));
    let cached = policy_status(&agent);
    assert_eq!(cached["digest"], digest.as_str());
    assert!(
        cached["source"]["revision"].is_null(),
        "not fetched: {cached}"
    );
    assert!(cached["source"]["last_error"].is_string(), "{cached}");
    drop(agent);

    // With no cached copy and no bucket, the agent does not start.
    let fresh = config.replace(
        &cache.display().to_string(),
        &work.path().join("empty").display().to_string(),
    );
    let mut refused = Agent::spawn(&fresh);
    let status = refused.child.wait().unwrap();
    assert!(!status.success());
    assert!(
        refused.log_text().contains("no copy is cached"),
        "{}",
        refused.log_text()
    );
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=ops",
            "-c",
            "user.email=ops@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn commit_policy(work: &Path, name: &str, text: &str, message: &str) -> String {
    std::fs::create_dir_all(work.join("tollgate")).unwrap();
    std::fs::write(work.join("tollgate").join(name), text).unwrap();
    git(work, &["add", "-A"]);
    git(work, &["commit", "--quiet", "-m", message]);
    git(work, &["push", "--quiet", "origin", "main"]);
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(work)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_policy_in_a_git_repository_follows_its_branch_and_a_link_in_it_is_refused() {
    let tmp = tempfile::Builder::new()
        .prefix("tollgate-policy-git-")
        .tempdir()
        .unwrap();
    let bare = tmp.path().join("policies.git");
    std::fs::create_dir_all(&bare).unwrap();
    git(&bare, &["init", "--quiet", "--bare"]);
    let work = tmp.path().join("work");
    git(
        tmp.path(),
        &["clone", "--quiet", bare.to_str().unwrap(), "work"],
    );
    git(&work, &["checkout", "--quiet", "-b", "main"]);
    commit_policy(&work, "ci.toml", NO_DROP, "deny drops");

    let pg = Postgres::start();
    let port = free_port();
    let config = listener_config(port, pg.port, "")
        + &format!(
            "\n[policy_source]\ngit = \"file://{}\"\nbranch = \"main\"\npath = \"tollgate\"\ninterval = \"1s\"\ndir = \"{}\"\n",
            bare.display(),
            tmp.path().join("cache").display()
        );
    let agent = Agent::start(&config);
    assert!(refused_by(port, "drop table if exists t", "no-drop"));

    let commit = commit_policy(&work, "ci.toml", NO_SELECT, "deny reads");
    agent.wait_until(
        "the pushed policy",
        Duration::from_secs(30),
        &["polic"],
        || refused_by(port, "select 1", "no-select"),
    );
    let status = policy_status(&agent);
    assert!(
        status["source"]["revision"]
            .as_str()
            .is_some_and(|r| r.contains(&commit)),
        "{status}"
    );

    // A link in the repository could make the agent read any file here.
    std::os::unix::fs::symlink("/etc/shadow", work.join("tollgate/evil.toml")).unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "--quiet", "-m", "a link"]);
    git(&work, &["push", "--quiet", "origin", "main"]);
    agent.wait_until(
        "the link to be refused",
        Duration::from_secs(30),
        &["polic"],
        || {
            policy_status(&agent)["source"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("links are refused"))
        },
    );
    assert!(refused_by(port, "select 1", "no-select"));
    assert_eq!(policy_status(&agent)["digest"], status["digest"]);
}
