//! Recordings to object storage: real psql sessions through the agent,
//! uploaded to a real S3 server (moto) and read back from the bucket, with
//! the bucket down, the spool full, and an agent killed mid-upload.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tollgate_tests::s3::{S3Server, Upload, BUCKET};
use tollgate_tests::*;

use crate::listener::{http_get, scraped};

const POLICY: &str = "[[rule]]\nname = \"no-drop\"\naction = \"deny\"\nmessage = \"not here\"\n[rule.match]\nkinds = [\"drop\"]\n";

fn tollgate(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(agent_binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

/// Recording files under `dir`.
fn local_recordings(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "tgrec") {
                found.push(path);
            }
        }
    }
    found
}

/// A PostgreSQL, the bucket's settings, and a recording directory of the
/// test's own that outlives the agents it starts.
struct SpoolSetup {
    pg: Postgres,
    upload: Upload,
    policy: PolicyFile,
    spool: tempfile::TempDir,
    port: u16,
    metrics_port: u16,
}

impl SpoolSetup {
    fn new() -> SpoolSetup {
        SpoolSetup {
            pg: Postgres::start(),
            upload: Upload::with_key_file(),
            policy: policy_file(POLICY),
            spool: tempfile::Builder::new()
                .prefix("tollgate-spool-")
                .tempdir()
                .unwrap(),
            port: free_port(),
            metrics_port: free_port(),
        }
    }

    /// The `[agent]` lines: the policy, metrics, and the spool.
    fn agent_extra(&self) -> String {
        format!(
            "{}\nmetrics_listen = \"127.0.0.1:{}\"\nrecording_dir = \"{}\"",
            self.policy.line,
            self.metrics_port,
            self.spool.path().display()
        )
    }
}

fn psql_ok(port: u16, sql: &str) {
    let out = psql_command(port, sql).output().unwrap();
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn closed_recordings_go_to_the_bucket_once_verified_and_a_responder_reads_them_from_there() {
    let s3 = S3Server::start();
    // No default retention: the lock comes from the agent's upload.
    s3.create_locked_bucket(BUCKET, false);
    let pg = Postgres::start();
    let upload = Upload::with_key_file();
    let key = upload.dir.path().join("signing.key");
    let out = Command::new(agent_binary())
        .args(["recordings", "keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let policy = policy_file(POLICY);
    let (port, metrics_port) = (free_port(), free_port());
    let extra = format!(
        "{}\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\nrecording_signing_key = \"{}\"",
        policy.line,
        key.display()
    );
    let agent = Agent::start(
        &(listener_config(port, pg.port, &extra)
            + &upload.section(
                s3.port,
                "runner-a",
                "object_lock_mode = \"compliance\"\nobject_lock_days = 30",
            )),
    );

    psql_ok(port, "create table t (id int); select count(*) from t");
    let denied = psql_command(port, "drop table t").output().unwrap();
    assert!(!denied.status.success());

    agent.wait_until(
        "both recordings uploaded",
        Duration::from_secs(30),
        &["upload", "ERROR", "WARN"],
        || s3.objects(BUCKET).len() == 2 && local_recordings(&agent.recordings()).is_empty(),
    );
    for object in s3.objects(BUCKET) {
        let key = object["key"].as_str().unwrap();
        let parts: Vec<&str> = key.split('/').collect();
        assert_eq!(parts[..2], ["fleet", "runner-a"], "{key}");
        assert_eq!(parts[2].len(), 10, "a YYYY-MM-DD day: {key}");
        assert_eq!(parts[3], "pg", "{key}");
        assert!(parts[4].ends_with(".tgrec"), "{key}");
    }
    assert_eq!(
        scraped(metrics_port, "tollgate_uploads_total{outcome=\"uploaded\"}"),
        2
    );
    assert_eq!(scraped(metrics_port, "tollgate_upload_spool_bytes"), 0);
    assert_eq!(scraped(metrics_port, "tollgate_upload_spool_recordings"), 0);
    // The upload families parse as Prometheus parses them.
    assert_valid_exposition(&http_get(metrics_port, "/metrics"));

    // A responder elsewhere, with only the bucket's settings.
    let responder = upload.responder_config(s3.port);
    let list = tollgate(&responder, &["recordings", "list", "--remote", "--json"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let list: Vec<Value> = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(list
        .iter()
        .all(|r| r["host"] == "runner-a" && r["target"] == "pg"));
    // Read from the bucket and filtered as local recordings are.
    let denied_only = tollgate(
        &responder,
        &["recordings", "list", "--remote", "--denied", "--json"],
    );
    let denied_only: Vec<Value> = serde_json::from_slice(&denied_only.stdout).unwrap();
    assert_eq!(denied_only.len(), 1, "{denied_only:?}");
    assert_eq!(denied_only[0]["denied"], 1);
    assert!(denied_only[0]["path"]
        .as_str()
        .unwrap()
        .starts_with("s3://recordings/fleet/runner-a/"));
    let only_b = tollgate(
        &responder,
        &[
            "recordings",
            "list",
            "--remote",
            "--host",
            "runner-b",
            "--json",
        ],
    );
    assert_eq!(
        serde_json::from_slice::<Vec<Value>>(&only_b.stdout)
            .unwrap()
            .len(),
        0
    );
    let ids: Vec<String> = list
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let transcripts: Vec<String> = ids
        .iter()
        .map(|id| {
            let show = tollgate(
                &responder,
                &["recordings", "show", "--remote", id, "--no-color"],
            );
            assert!(
                show.status.success(),
                "{}",
                String::from_utf8_lossy(&show.stderr)
            );
            String::from_utf8_lossy(&show.stdout).into_owned()
        })
        .collect();
    let denied_at = transcripts
        .iter()
        .position(|t| t.contains("drop table t") && t.contains("no-drop"))
        .unwrap_or_else(|| panic!("no transcript shows the denial: {transcripts:?}"));

    // The uploaded copies verify, signatures with the public key alone.
    let public = format!("{}.pub", key.display());
    let verify = tollgate(
        &responder,
        &[
            "recordings",
            "verify",
            "--remote",
            "--all",
            "--public-key",
            &public,
        ],
    );
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{text}");
    assert!(text.contains("2 verified, 0 failed"), "{text}");
    let export = tollgate(
        &responder,
        &[
            "recordings",
            "export",
            "--remote",
            &ids[denied_at],
            "--format",
            "jsonl",
        ],
    );
    assert!(String::from_utf8_lossy(&export.stdout).contains("drop table t"));

    // Object Lock: the retention the agent set keeps the object's version
    // from being deleted, even by a holder of the bucket's keys.
    let object_key = format!(
        "fleet/runner-a/{}/pg/{}.tgrec",
        list[denied_at]["day"].as_str().unwrap(),
        ids[denied_at]
    );
    let lock = s3.object_lock(BUCKET, &object_key);
    assert_eq!(lock[0], "COMPLIANCE", "{lock}");
    assert_eq!(
        lock[1], 29,
        "30 days from the upload, less the seconds since: {lock}"
    );
    let deleted = s3.boto(&format!(
        "v = s3.list_object_versions(Bucket='{BUCKET}', Prefix={object_key:?})['Versions'][0]['VersionId']\n\
         try:\n    s3.delete_object(Bucket='{BUCKET}', Key={object_key:?}, VersionId=v)\n    print(json.dumps('deleted'))\n\
         except botocore.exceptions.ClientError as e:\n    print(json.dumps(e.response['Error']['Code']))"
    ));
    assert_eq!(deleted, "AccessDenied");

    // A copy rewritten in the bucket (a new version under the same key)
    // fails verification from the bucket.
    let tampered = s3.boto(&format!(
        "b = bytearray(s3.get_object(Bucket='{BUCKET}', Key={object_key:?})['Body'].read())\n\
         b[len(b) // 2] ^= 1\n\
         s3.put_object(Bucket='{BUCKET}', Key={object_key:?}, Body=bytes(b))\n\
         print('true')"
    ));
    assert_eq!(tampered, true);
    let verify = tollgate(
        &responder,
        &[
            "recordings",
            "verify",
            "--remote",
            &ids[denied_at],
            "--public-key",
            &public,
        ],
    );
    assert_eq!(
        verify.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

#[test]
fn with_the_bucket_down_recordings_wait_through_a_restart_a_full_spool_refuses_sessions_and_all_go_up_later(
) {
    let s3_port = free_port();
    let setup = SpoolSetup::new();
    let (pg, upload, spool) = (&setup.pg, &setup.upload, &setup.spool);
    let (port, metrics_port) = (setup.port, setup.metrics_port);
    let extra = setup.agent_extra();
    // One recording fills this spool.
    let config = listener_config(port, pg.port, &extra)
        + &upload.section(
            s3_port,
            "runner-a",
            "max_spool_size = 100\nmax_retry_interval = \"2s\"",
        );
    let mut agent = Agent::start(&config);

    psql_ok(port, "select 1");
    agent.wait_until(
        "a failed upload",
        Duration::from_secs(20),
        &["upload", "ERROR", "WARN"],
        || scraped(metrics_port, "tollgate_uploads_total{outcome=\"failed\"}") >= 1,
    );
    assert_eq!(local_recordings(spool.path()).len(), 1);
    assert!(scraped(metrics_port, "tollgate_upload_spool_bytes") > 100);
    assert_eq!(scraped(metrics_port, "tollgate_upload_spool_recordings"), 1);

    // Full: the next session is refused in PostgreSQL's terms, nothing is dropped.
    let refused = psql_command(port, "select 2").output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("upload spool is full"), "{stderr}");
    assert!(stderr.contains("max_spool_size"), "{stderr}");
    assert_eq!(
        scraped(
            metrics_port,
            "tollgate_sessions_refused_total{reason=\"spool_full\"}"
        ),
        1
    );
    let status = agent.status().unwrap();
    let upload = &status["recording"]["upload"];
    assert_eq!(upload["bucket"], BUCKET, "{status}");
    assert!(
        upload["spool_full"]
            .as_str()
            .is_some_and(|s| s.contains("max_spool_size")),
        "{upload}"
    );
    assert!(upload["failed"].as_u64() >= Some(1), "{upload}");
    let text = agent.cli(&["status"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("SPOOL FULL"));

    // The spool survives a restart, and is full from the first session on.
    agent.terminate();
    let _ = agent.child.wait();
    assert_eq!(local_recordings(spool.path()).len(), 1);
    agent = Agent::start(&config);
    let refused = psql_command(port, "select 3").output().unwrap();
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("upload spool is full"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(scraped(metrics_port, "tollgate_upload_oldest_unshipped_seconds") >= 1);

    // The bucket comes up: the recording goes, once, and sessions run again.
    let s3 = S3Server::start_on(s3_port);
    // In one call (the agent is retrying meanwhile); versioning comes with
    // Object Lock, so a second write of the key would show.
    s3.create_locked_bucket(BUCKET, false);
    agent.wait_until(
        "the spool to drain",
        Duration::from_secs(30),
        &["upload", "ERROR", "WARN"],
        || local_recordings(spool.path()).is_empty(),
    );
    let versions = s3.versions(BUCKET);
    assert_eq!(versions.len(), 1, "{versions:?}");
    agent.wait_until(
        "sessions to be accepted again",
        Duration::from_secs(10),
        &["upload", "ERROR", "WARN"],
        || {
            psql_command(port, "select 4")
                .output()
                .unwrap()
                .status
                .success()
        },
    );
    assert_eq!(
        scraped(metrics_port, "tollgate_upload_oldest_unshipped_seconds"),
        0
    );
    drop(agent);
}

/// Forwards connections to `upstream` and drops every answer: what the
/// agent sends arrives, the agent never hears back.
fn swallow_answers(upstream: u16) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let (mut from_client, mut to_server) = (client, server);
            let mut from_server = to_server.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_client, &mut to_server);
            });
            std::thread::spawn(move || {
                let mut sink = [0u8; 4096];
                while matches!(from_server.read(&mut sink), Ok(n) if n > 0) {}
                let _ = std::io::sink().flush();
            });
        }
    });
    port
}

#[test]
fn an_agent_killed_mid_upload_leaves_one_object_and_the_next_start_finishes_without_writing_it_twice(
) {
    let s3 = S3Server::start();
    // The bucket's default retention locks what the agent uploads, with no
    // setting in the agent.
    s3.create_locked_bucket(BUCKET, true);
    let setup = SpoolSetup::new();
    let (pg, upload, spool) = (&setup.pg, &setup.upload, &setup.spool);
    let (port, metrics_port) = (setup.port, setup.metrics_port);
    let extra = setup.agent_extra();
    let base = listener_config(port, pg.port, &extra);
    let mut agent =
        Agent::start(&(base.clone() + &upload.section(swallow_answers(s3.port), "runner-a", "")));
    psql_ok(port, "select 1");
    // The PUT reached the bucket; its answer never reached the agent.
    agent.wait_until(
        "the object to arrive",
        Duration::from_secs(30),
        &["upload", "ERROR", "WARN"],
        || s3.objects(BUCKET).len() == 1,
    );
    agent.child.kill().unwrap();
    let _ = agent.child.wait();
    assert_eq!(
        local_recordings(spool.path()).len(),
        1,
        "not yet verified, so kept"
    );

    let agent = Agent::start(&(base + &upload.section(s3.port, "runner-a", "")));
    agent.wait_until(
        "the local copy to go",
        Duration::from_secs(30),
        &["upload", "ERROR", "WARN"],
        || local_recordings(spool.path()).is_empty(),
    );
    assert_eq!(
        scraped(
            metrics_port,
            "tollgate_uploads_total{outcome=\"already_present\"}"
        ),
        1
    );
    assert_eq!(
        scraped(metrics_port, "tollgate_uploads_total{outcome=\"uploaded\"}"),
        0
    );
    let versions = s3.versions(BUCKET);
    assert_eq!(versions.len(), 1, "one object, one version: {versions:?}");
    let key = versions[0]["key"].as_str().unwrap();
    assert_eq!(s3.object_lock(BUCKET, key)[0], "COMPLIANCE");
    drop(agent);
}

#[test]
fn two_agents_share_one_bucket_and_a_responder_lists_and_verifies_both_hosts_recordings() {
    let s3 = S3Server::start();
    s3.create_locked_bucket(BUCKET, false);
    let pg = Postgres::start();
    let upload = Upload::with_key_file();
    let policy = policy_file(POLICY);
    let mut agents = Vec::new();
    for host in ["runner-a", "runner-b"] {
        let port = free_port();
        let agent = Agent::start(
            &(listener_config(port, pg.port, &policy.line) + &upload.section(s3.port, host, "")),
        );
        psql_ok(port, &format!("select '{host}'"));
        agents.push(agent);
    }
    for agent in &agents {
        agent.wait_until(
            "the host's recording to go up",
            Duration::from_secs(30),
            &["upload", "ERROR", "WARN"],
            || local_recordings(&agent.recordings()).is_empty(),
        );
    }
    let responder = upload.responder_config(s3.port);
    let list = tollgate(&responder, &["recordings", "list", "--remote", "--json"]);
    let list: Vec<Value> = serde_json::from_slice(&list.stdout).unwrap();
    let mut hosts: Vec<&str> = list.iter().map(|r| r["host"].as_str().unwrap()).collect();
    hosts.sort();
    assert_eq!(hosts, ["runner-a", "runner-b"], "{list:?}");
    for r in &list {
        let id = r["id"].as_str().unwrap();
        let show = tollgate(
            &responder,
            &["recordings", "show", "--remote", id, "--no-color"],
        );
        let host = r["host"].as_str().unwrap();
        assert!(
            String::from_utf8_lossy(&show.stdout).contains(&format!("select '{host}'")),
            "the recording under {host} is that host's session"
        );
    }
    let verify = tollgate(&responder, &["recordings", "verify", "--remote", "--all"]);
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{text}");
    assert!(text.contains("2 verified, 0 failed"), "{text}");
}

#[test]
fn a_recording_over_64_mib_goes_up_in_parts_once_and_verifies_from_the_bucket() {
    let s3 = S3Server::start();
    s3.create_locked_bucket(BUCKET, false);
    let pg = Postgres::start();
    let upload = Upload::with_key_file();
    let port = free_port();
    // record_raw keeps every byte relayed: 80 MB of results make the
    // recording larger than one PUT takes.
    let config = listener_config(port, pg.port, "").replace(
        "protocol = \"postgres\"",
        "protocol = \"postgres\"\nrecord_raw = true",
    ) + &upload.section(
        s3.port,
        "runner-a",
        "object_lock_mode = \"governance\"\nobject_lock_days = 2",
    );
    let agent = Agent::start(&config);
    let out = psql_command(
        port,
        "select repeat('x', 8000000) from generate_series(1, 10)",
    )
    .stdout(std::process::Stdio::null())
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.wait_until(
        "the large recording to go up",
        Duration::from_secs(120),
        &["upload", "ERROR", "WARN"],
        || local_recordings(&agent.recordings()).is_empty(),
    );
    let versions = s3.versions(BUCKET);
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert!(
        versions[0]["size"].as_u64().unwrap() > 64 << 20,
        "{versions:?}"
    );
    // The lock headers go with CreateMultipartUpload, where S3 takes them;
    // the test server ignores them there, so no retention is asserted.
    let key = versions[0]["key"].as_str().unwrap();
    let id = key.rsplit('/').next().unwrap().trim_end_matches(".tgrec");
    let verify = tollgate(
        &upload.responder_config(s3.port),
        &["recordings", "verify", "--remote", id],
    );
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}
