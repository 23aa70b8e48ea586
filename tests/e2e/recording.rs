//! Session recordings from real psql sessions, read back with the CLI.

use std::process::Command;
use std::time::{Duration, Instant};

use tollgate_tests::*;

const POLICY: &str = "[[rule]]\nname = \"no-drop\"\naction = \"deny\"\nmessage = \"not here\"\n[rule.match]\nkinds = [\"drop\"]\n";

fn tollgate(agent: &Agent, args: &[&str]) -> std::process::Output {
    Command::new(agent_binary())
        .args(args)
        .arg("--config")
        .arg(&agent.config)
        .output()
        .unwrap()
}

fn recordings(agent: &Agent, expected: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = tollgate(agent, &["recordings", "list", "--json"]);
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let complete = list.iter().filter(|r| r["complete"] == true).count();
        if complete >= expected || Instant::now() > deadline {
            return list;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_psql_session_is_recorded_shown_verified_and_tampering_is_detected() {
    let pg = Postgres::start();
    let port = free_port();
    let policy = policy_file(POLICY);
    let agent = Agent::start(&listener_config(port, pg.port, &policy.line));
    let out = psql_command(
        port,
        "create table t (id int); insert into t values (1); select count(*) from t",
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let denied = psql_command(port, "drop table t").output().unwrap();
    assert!(!denied.status.success());

    let list = recordings(&agent, 2);
    assert_eq!(list.len(), 2, "{list:?}");
    let denied_session = list
        .iter()
        .find(|r| r["denied"] == 1)
        .expect("the session with the denial");
    assert_eq!(denied_session["target"], "pg");
    let id = denied_session["id"].as_str().unwrap().to_string();

    let filtered = tollgate(&agent, &["recordings", "list", "--denied", "--json"]);
    let filtered: Vec<serde_json::Value> = serde_json::from_slice(&filtered.stdout).unwrap();
    assert_eq!(filtered.len(), 1);

    // The transcript lists exactly the statements sent and their verdicts.
    let first = list.iter().find(|r| r["denied"] == 0).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let show = tollgate(&agent, &["recordings", "show", &first, "--no-color"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    for statement in [
        "create table t (id int)",
        "insert into t values (1)",
        "select count(*) from t",
    ] {
        assert!(
            text.contains(statement),
            "{statement} missing from:\n{text}"
        );
    }
    let show = tollgate(&agent, &["recordings", "show", &id, "--no-color"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("drop table t") && text.contains("no-drop"),
        "{text}"
    );

    let verify = tollgate(&agent, &["recordings", "verify", "--all"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains("2 verified, 0 failed"));

    let export = tollgate(&agent, &["recordings", "export", &id, "--format", "jsonl"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 4, "header, events, trailer: {lines:?}");

    // One flipped byte in the middle of the file is detected.
    let path = std::path::PathBuf::from(denied_session["path"].as_str().unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let verify = tollgate(&agent, &["recordings", "verify", &id]);
    assert_eq!(
        verify.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

#[test]
fn a_killed_agent_leaves_readable_recordings() {
    let pg = Postgres::start();
    let port = free_port();
    let agent = Agent::start(&listener_config(port, pg.port, ""));
    let child = psql_command(port, "select 1; select pg_sleep(30)")
        .spawn()
        .unwrap();
    agent
        .wait_for_log(
            |l| l["statement_action"] == "allow",
            Duration::from_secs(10),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut agent = agent;
    send_signal(agent.child.id(), libc::SIGKILL);
    let _ = agent.child.wait();
    let _ = child.wait_with_output();
    let files: Vec<_> = walk(&agent.recordings());
    assert_eq!(files.len(), 1, "{files:?}");
    let verify = Command::new(agent_binary())
        .args(["recordings", "verify"])
        .arg(&files[0])
        .arg("--config")
        .arg(&agent.config)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&verify.stdout);
    // No trailer (the agent died), but every written record is intact.
    assert_eq!(verify.status.code(), Some(1), "{report}");
    assert!(
        report.contains("trailer") || report.contains("incomplete") || report.contains("cut"),
        "{report}"
    );
    let show = Command::new(agent_binary())
        .args(["recordings", "show", "--no-color"])
        .arg(&files[0])
        .arg("--config")
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&show.stdout).contains("select 1"),
        "{}",
        String::from_utf8_lossy(&show.stdout)
    );
}

/// Every file under `dir`, at any depth.
pub(crate) fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn log_has(agent: &Agent, prefix: &str) -> bool {
    agent
        .wait_for_log(
            |l| l["message"].as_str().is_some_and(|m| m.starts_with(prefix)),
            Duration::from_secs(10),
        )
        .is_ok()
}

/// Starts an agent recording onto a full small disk and makes its first
/// session fail to record.
fn agent_on_a_full_disk(disk: &SmallDisk, pg: &Postgres, on_failure: &str) -> (Agent, u16) {
    let port = free_port();
    let agent = Agent::start(&listener_config(
        port,
        pg.port,
        &format!(
            "recording_dir = \"{}\"\nrecording_on_failure = \"{on_failure}\"\nrecording_fsync = \"every-event\"",
            disk.path().join("recordings").display()
        ),
    ));
    assert!(disk.fill() > 0);
    // The first session is accepted (nothing has failed yet); its file
    // cannot be written.
    let _ = psql_command(port, "select 1").output().unwrap();
    assert!(
        log_has(&agent, "session recording failed"),
        "{}",
        agent.log_text()
    );
    (agent, port)
}

#[test]
fn a_full_disk_refuses_new_sessions_with_a_postgres_error_by_default() {
    let Some(disk) = SmallDisk::mount("256k") else {
        return;
    };
    let pg = Postgres::start();
    let (agent, port) = agent_on_a_full_disk(&disk, &pg, "refuse");

    let out = psql_command(port, "select 2").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a session ran unrecorded");
    assert!(
        stderr.contains("session refused: session recording has failed"),
        "{stderr}"
    );
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(log_has(&agent, "session refused: recording has failed"));

    let status = agent.status().unwrap();
    let r = &status["recording"];
    assert_eq!(r["failed"], true, "{r}");
    assert_eq!(r["on_failure"], "refuse");
    assert!(r["sessions_refused"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["events_lost"].as_u64().unwrap() >= 1, "{r}");
    assert!(
        r["failure"].as_str().unwrap().contains("No space left"),
        "{r}"
    );
    let text = tollgate(&agent, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("Recording: FAILED"), "{text}");
}

/// Runs psql reading statements from its stdin, so a test can keep one
/// session open and send statements over time.
fn interactive_psql(port: u16) -> std::process::Child {
    Command::new(pg_tool("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-p",
        ])
        .arg(port.to_string())
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn an_open_session_ends_with_a_fatal_error_when_the_disk_fills() {
    use std::io::Write;
    let Some(disk) = SmallDisk::mount("256k") else {
        return;
    };
    let pg = Postgres::start();
    let port = free_port();
    let agent = Agent::start(&listener_config(
        port,
        pg.port,
        &format!(
            "recording_dir = \"{}\"\nrecording_on_failure = \"refuse\"\nrecording_fsync = \"every-event\"",
            disk.path().join("recordings").display()
        ),
    ));
    let mut psql = interactive_psql(port);
    let mut stdin = psql.stdin.take().unwrap();
    // Verbose errors: psql prints the SQLSTATE.
    writeln!(stdin, "\\set VERBOSITY verbose\nselect 1;").unwrap();
    agent
        .wait_for_log(
            |l| l["statement_action"] == "allow",
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(disk.fill() > 0);
    // The session's file still has room in its last page: statements go
    // on until a write fails, then the next one ends the session.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut i = 2;
    while Instant::now() < deadline {
        if writeln!(stdin, "select {i};")
            .and_then(|()| stdin.flush())
            .is_err()
        {
            break;
        }
        if psql.try_wait().unwrap().is_some() {
            break;
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stdin);
    let out = psql.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the session went on unrecorded: {stderr}"
    );
    assert!(
        stderr.contains("FATAL:  57P03: tollgate: session ended: session recording has failed"),
        "{stderr}"
    );
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let closed = agent
        .wait_for_log(
            |l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("session closed: session recording failed"))
            },
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(
        closed["reason"].as_str().unwrap().contains("No space left"),
        "{closed}"
    );
    // New sessions are refused as before.
    let out = psql_command(port, "select 1").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("session refused"));
}

#[test]
fn a_full_disk_with_continue_keeps_serving_and_counts_lost_events() {
    let Some(disk) = SmallDisk::mount("256k") else {
        return;
    };
    let pg = Postgres::start();
    let (agent, port) = agent_on_a_full_disk(&disk, &pg, "continue");
    let lost_before = agent.status().unwrap()["recording"]["events_lost"]
        .as_u64()
        .unwrap();
    assert!(lost_before >= 1);

    for i in 0..3 {
        assert_eq!(psql(port, &format!("select {i}")).unwrap(), i.to_string());
    }
    // Every event of those sessions is counted: start, upstream, start-up,
    // statement and close, five per session at least.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = agent.status().unwrap();
        let lost = status["recording"]["events_lost"].as_u64().unwrap();
        if lost >= lost_before + 15 || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let r = &status["recording"];
    assert_eq!(r["failed"], true, "{r}");
    assert_eq!(r["on_failure"], "continue");
    assert_eq!(r["sessions_refused"], 0, "{r}");
    assert!(
        r["events_lost"].as_u64().unwrap() >= lost_before + 15,
        "{r}"
    );
    assert!(!agent.log_text().contains("session refused"));
}

#[test]
fn signed_recordings_verify_off_the_host_and_replay() {
    let pg = Postgres::start();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("recording.key");
    let keygen = Command::new(agent_binary())
        .args(["recordings", "keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&keygen.stdout);
    assert!(keygen.status.success(), "{said}");
    assert!(said.contains("key id"), "{said}");
    let public = keys.path().join("recording.key.pub");
    let port = free_port();
    let agent = Agent::start(&listener_config(
        port,
        pg.port,
        &format!("recording_signing_key = \"{}\"", key.display()),
    ));
    psql(port, "select 1").unwrap();
    psql(port, "select pg_sleep(0.3); select 2").unwrap();
    let list = recordings(&agent, 2);
    let slow = list
        .iter()
        .find(|r| r["statements"] == 2)
        .expect("the two-statement session");
    let id = slow["id"].as_str().unwrap();
    let file = slow["path"].as_str().unwrap();

    // With the public key, and no configuration: as an auditor would.
    let verify = |args: &[&str]| {
        Command::new(agent_binary())
            .args(["recordings", "verify"])
            .args(args)
            .args(["--config", "/nonexistent/tollgate.toml"])
            .output()
            .unwrap()
    };
    let ok = verify(&[file, "--public-key", public.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(text.contains("signature valid"), "{text}");

    let other = keys.path().join("other.key");
    assert!(Command::new(agent_binary())
        .args(["recordings", "keygen", "--out"])
        .arg(&other)
        .output()
        .unwrap()
        .status
        .success());
    let other_pub = keys.path().join("other.key.pub");
    let bad = tollgate(
        &agent,
        &[
            "recordings",
            "verify",
            "--all",
            "--public-key",
            other_pub.to_str().unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{text}");
    assert!(text.contains("not a key given"), "{text}");
    assert!(text.contains("0 verified, 2 failed"), "{text}");

    // Replay, sped up: the same events, in order, faster than recorded.
    let began = Instant::now();
    let replay = tollgate(&agent, &["recordings", "replay", id, "--speed", "100"]);
    let text = String::from_utf8_lossy(&replay.stdout);
    assert!(replay.status.success(), "{text}");
    assert!(began.elapsed() < Duration::from_secs(5));
    let sleep_at = text.find("select pg_sleep(0.3)").expect(&text);
    let second_at = text.find("select 2").expect(&text);
    assert!(sleep_at < second_at, "{text}");
    assert!(text.contains("closed: completed"), "{text}");
    let instant = tollgate(&agent, &["recordings", "replay", id, "--no-wait"]);
    assert_eq!(instant.stdout, replay.stdout);
    let bad_speed = tollgate(&agent, &["recordings", "replay", id, "--speed", "fast"]);
    assert_eq!(bad_speed.status.code(), Some(2));
}

#[test]
fn retention_removes_old_recordings_when_the_agent_starts() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("recordings");
    let old_day = rec.join("2001/02/03");
    std::fs::create_dir_all(&old_day).unwrap();
    let old = old_day.join("00e6b5f0-0000-7000-8000-000000000001.tgrec");
    std::fs::write(&old, b"an old session").unwrap();
    let long_ago = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(981_158_400);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(long_ago)
        .unwrap();
    let port = free_port();
    let agent = Agent::start(&listener_config(
        port,
        pg.port,
        &format!(
            "recording_dir = \"{}\"\nrecording_retention_days = 30\nrecording_max_total_size = \"1GiB\"",
            rec.display()
        ),
    ));
    let line = agent
        .wait_for_log(
            |l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("recording removed by retention"))
            },
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(line["reason"], "age", "{line}");
    assert!(!old.exists());
    assert!(!rec.join("2001").exists(), "empty date directories stay");
    psql(port, "select 1").unwrap();
    assert_eq!(recordings(&agent, 1).len(), 1);
    assert_eq!(
        agent.status().unwrap()["recording"]["pruned"],
        1,
        "{}",
        agent.log_text()
    );
}

/// Each direction's TCP payload in a classic pcap of raw IP packets, in
/// file order (the export writes each direction in sequence order), and
/// the TCP flags of every packet. Checks the IPv4 header checksum.
fn pcap_streams(bytes: &[u8], client_port: u16) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let le = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!(le(0), 0xa1b2_c3d4, "pcap magic");
    assert_eq!(le(20), 101, "LINKTYPE_RAW");
    let (mut to_server, mut to_client, mut flags) = (Vec::new(), Vec::new(), Vec::new());
    let mut pos = 24;
    while pos + 16 <= bytes.len() {
        let len = le(pos + 8) as usize;
        let p = &bytes[pos + 16..pos + 16 + len];
        pos += 16 + len;
        assert_eq!(p[0] >> 4, 4, "an IPv4 packet for a 127.0.0.1 session");
        let ihl = usize::from(p[0] & 0x0f) * 4;
        let mut sum: u32 = p[..ihl]
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff, "IPv4 header checksum");
        let tcp = &p[ihl..];
        let payload = &tcp[usize::from(tcp[12] >> 4) * 4..];
        flags.push(tcp[13]);
        if u16::from_be_bytes([tcp[0], tcp[1]]) == client_port {
            to_server.extend_from_slice(payload);
        } else {
            to_client.extend_from_slice(payload);
        }
    }
    (to_server, to_client, flags)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// One psql session through a `record_raw` listener of `protocol`, its
/// recording exported as a pcap (the handshake and FIN exchange checked).
struct RawSession {
    agent: Agent,
    id: String,
    pcap: std::path::PathBuf,
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    _dir: tempfile::TempDir,
}

fn raw_session(pg: &Postgres, protocol: &str) -> RawSession {
    let port = free_port();
    let config = listener_config(port, pg.port, "").replace(
        "protocol = \"postgres\"\n",
        &format!("protocol = \"{protocol}\"\nrecord_raw = true\n"),
    );
    let agent = Agent::start(&config);
    assert_eq!(
        psql(port, "select 'tollgate-pcap-' || 'marker' as m").unwrap(),
        "tollgate-pcap-marker"
    );
    let id = recordings(&agent, 1)[0]["id"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("session.pcap");
    let out = pcap.to_str().unwrap();
    let export = tollgate(
        &agent,
        &[
            "recordings",
            "export",
            &id,
            "--format",
            "pcap",
            "--out",
            out,
        ],
    );
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let header: serde_json::Value = serde_json::from_slice(
        tollgate(&agent, &["recordings", "export", &id])
            .stdout
            .split(|b| *b == b'\n')
            .next()
            .unwrap(),
    )
    .unwrap();
    let client: std::net::SocketAddr = header["client"].as_str().unwrap().parse().unwrap();
    let (to_server, to_client, flags) = pcap_streams(&std::fs::read(&pcap).unwrap(), client.port());
    assert_eq!(&flags[..3], &[0x02, 0x12, 0x10], "handshake");
    assert_eq!(
        &flags[flags.len() - 3..],
        &[0x11, 0x11, 0x10],
        "FIN exchange"
    );
    RawSession {
        agent,
        id,
        pcap,
        to_server,
        to_client,
        _dir: dir,
    }
}

#[test]
fn a_record_raw_session_exports_as_a_pcap_wireshark_can_read() {
    let pg = Postgres::start();
    let raw = raw_session(&pg, "postgres");
    let show = tollgate(&raw.agent, &["recordings", "show", &raw.id, "--no-color"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("bytes from client"), "{text}");
    assert!(text.contains("bytes from server"), "{text}");
    let (to_server, to_client) = (&raw.to_server, &raw.to_client);
    // The StartupMessage: protocol 3.0, then user postgres.
    assert!(
        contains(to_server, b"\0\x03\0\0user\0postgres\0"),
        "{to_server:?}"
    );
    assert!(
        contains(to_server, b"select 'tollgate-pcap-' || 'marker' as m\0"),
        "{to_server:?}"
    );
    assert!(
        contains(to_client, b"tollgate-pcap-marker"),
        "{to_client:?}"
    );
    assert!(contains(to_client, b"SELECT 1\0"), "{to_client:?}");

    // Wireshark's own dissector, when installed (not required).
    if let Ok(out) = Command::new("tshark")
        .arg("-r")
        .arg(&raw.pcap)
        .args(["-d", &format!("tcp.port=={},pgsql", pg.port), "-Y", "pgsql"])
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("PGSQL"), "{text}");
    }

    // A session recorded without raw bytes says how to get them.
    let port2 = free_port();
    let plain = Agent::start(&listener_config(port2, pg.port, ""));
    psql(port2, "select 1").unwrap();
    let id2 = recordings(&plain, 1)[0]["id"].as_str().unwrap().to_string();
    let nowhere = raw.pcap.with_file_name("x");
    let out = tollgate(
        &plain,
        &[
            "recordings",
            "export",
            &id2,
            "--format",
            "pcap",
            "--out",
            nowhere.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("set record_raw = true on the target"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The raw relay (protocol `tcp`, for protocols the agent does not parse)
/// records and exports its bytes the same way.
#[test]
fn a_record_raw_tcp_relay_session_exports_as_a_pcap() {
    let pg = Postgres::start();
    let raw = raw_session(&pg, "tcp");
    // psql's SSLRequest reaches the server itself through the relay.
    assert!(
        raw.to_server.starts_with(&[0, 0, 0, 8, 4, 210, 22, 47]),
        "{:?}",
        raw.to_server
    );
    assert!(contains(
        &raw.to_server,
        b"select 'tollgate-pcap-' || 'marker' as m\0"
    ));
    assert!(
        contains(&raw.to_client, b"tollgate-pcap-marker"),
        "{:?}",
        raw.to_client
    );
}
