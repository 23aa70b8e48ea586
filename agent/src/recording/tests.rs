//! Recorder, codec and reader tests on real files in temp dirs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Cursor;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use super::codec::{decode_body, encode_frame, frame_hash, DecodeError, PREFIX_LEN};
use super::format::*;
use super::reader::{read_from, verify_from, Problem, ReadError};
use super::*;
use crate::config::Protocol;
use crate::events::{Arrival, CloseReason, EventSink, SessionEvent, SessionInfo, StatementEvent};
use crate::identity::{
    Ancestor, CiContext, CiProvider, ConnectInstance, InstanceCheck, InstanceVerdict, InstanceView,
    ProcessIdentity,
};
use crate::policy::Action;
use crate::redirect::KernelOrigin;
use crate::sql::StatementKind;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A fixed start (2025-03-04) so dated paths are predictable.
fn start_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_741_086_000_123)
}

fn info(target: &str, user: &str, repo: Option<&str>) -> Arc<SessionInfo> {
    Arc::new(SessionInfo {
        id: Uuid::now_v7(),
        started_at: start_time(),
        arrival: Arrival::Redirect,
        local: addr("127.0.0.1:6432"),
        client: addr("127.0.0.1:50123"),
        target: target.to_string(),
        protocol: Protocol::Postgres,
        upstream: "db.internal:5432".to_string(),
        identity: ProcessIdentity {
            pid: Some(4242),
            uid: Some(1001),
            gid: Some(1001),
            user: Some(user.to_string()),
            group: Some("runner".to_string()),
            comm: Some("psql".to_string()),
            exe: Some("/usr/bin/psql".to_string()),
            exe_sha256: Some("ab".repeat(32)),
            cmdline: vec!["psql".into(), "-h".into(), "db".into()],
            cgroup: Some("/system.slice/runner.service".to_string()),
            ancestry: vec![Ancestor {
                pid: 4000,
                comm: "bash".to_string(),
                exe: Some("/usr/bin/bash".to_string()),
            }],
            ci: repo.map(|r| CiContext {
                provider: CiProvider::GithubActions,
                repository: Some(r.to_string()),
                branch: Some("main".to_string()),
                job: Some("migrate".to_string()),
                run_id: Some("77".to_string()),
                workflow: Some("deploy".to_string()),
                actor: Some("octocat".to_string()),
                url: None,
                commit: None,
                runner_pid: Some(3999),
                verified: true,
            }),
            gaps: vec!["ancestry stopped at pid 1: not ours".to_string()],
            instance: Some(InstanceCheck {
                verdict: InstanceVerdict::Changed,
                at_connect: Some(InstanceView {
                    exe_dev: "8:1".to_string(),
                    exe_ino: 77,
                    start_ticks: 500,
                }),
                at_accept: Some(InstanceView {
                    exe_dev: "8:1".to_string(),
                    exe_ino: 78,
                    start_ticks: 500,
                }),
                reason: Some("it executed another program after connecting".to_string()),
            }),
        },
        kernel: Some(KernelOrigin {
            destination: addr("10.0.0.5:5432"),
            tgid: 4242,
            uid: 1001,
            gid: 1001,
            cgroup_id: 9876,
            comm: "psql".to_string(),
            target_index: 0,
            instance: ConnectInstance::Captured {
                dev: (8 << 20) | 1,
                ino: 77,
                start_boottime_ns: 5_000_000_000,
            },
        }),
        job: None,
    })
}

fn statement(session: Uuid, text: &str, action: Action, rule: Option<&str>) -> SessionEvent {
    SessionEvent::Statement(Arc::new(StatementEvent {
        session,
        text: text.to_string(),
        command: text
            .split_whitespace()
            .next()
            .unwrap_or("statement")
            .to_uppercase()
            .into(),
        kind: Some(StatementKind::Select),
        fingerprint: Some("0123456789abcdef".into()),
        action,
        refused: action.is_refused(),
        rule: rule.map(Arc::from),
        rules: rule.map(|r| vec![Arc::from(r)]).unwrap_or_default(),
        reason: format!("{action} by test").into(),
    }))
}

fn unparsable_statement(session: Uuid) -> SessionEvent {
    SessionEvent::Statement(Arc::new(StatementEvent {
        session,
        text: "selec garbage(".to_string(),
        command: "statement".into(),
        kind: None,
        fingerprint: None,
        action: Action::Deny,
        refused: true,
        rule: Some("unparsable".into()),
        rules: vec!["unparsable".into(), "audit-all".into()],
        reason: "cannot parse".into(),
    }))
}

/// The events of a real-looking session, `Started` first.
fn session_events(info: &Arc<SessionInfo>) -> Vec<SessionEvent> {
    let id = info.id;
    vec![
        SessionEvent::Started(Arc::clone(info)),
        SessionEvent::UpstreamConnected {
            session: id,
            peer: addr("10.0.0.5:5432"),
            connect_time: Duration::from_micros(1234),
        },
        SessionEvent::Startup {
            session: id,
            user: Some("app".to_string()),
            database: Some("orders".to_string()),
            application_name: Some("psql".to_string()),
            brokered_user: None,
        },
        statement(id, "select * from orders where id = 1", Action::Allow, None),
        statement(
            id,
            "select 'é ü ✓'\nfrom t",
            Action::Audit,
            Some("audit-all"),
        ),
        statement(id, "drop table orders", Action::Deny, Some("no-drops")),
        unparsable_statement(id),
        SessionEvent::Closed {
            session: id,
            bytes_from_client: 812,
            bytes_from_upstream: 4096,
            duration: Duration::from_millis(1500),
            reason: CloseReason::ClientError("connection reset".to_string()),
        },
    ]
}

fn settings(dir: &Path, fsync: Fsync) -> RecorderSettings {
    RecorderSettings {
        fsync,
        host: "ci-runner-7".to_string(),
        agent_version: "0.1.0-test".to_string(),
        policy_digest: Some("sha256:feed".to_string()),
        ..RecorderSettings::new(dir)
    }
}

/// Records one whole session and returns its file.
pub(super) fn record_session(dir: &Path, fsync: Fsync) -> (Arc<SessionInfo>, PathBuf) {
    let (sink, handle) = Recorder::start(settings(dir, fsync)).unwrap();
    let info = info("orders-prod", "runner", Some("acme/shop"));
    for e in session_events(&info) {
        sink.emit(&e);
    }
    let report = handle.shutdown();
    assert_eq!(report.lost, 0);
    assert_eq!(report.failure, None);
    assert!(!sink.failed());
    let path = session_path(dir, info.id, info.started_at);
    assert!(path.is_file(), "{} missing", path.display());
    (info, path)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn round_trip_every_event_type_through_the_recorder() {
    let tmp = tempfile::tempdir().unwrap();
    let (info, path) = record_session(tmp.path(), Fsync::EveryEvent);
    assert!(path.ends_with(format!("2025/03/04/{}.tgrec", info.id)));

    let rec = read_recording(&path).unwrap();
    assert_eq!(rec.truncated_at, None);
    let h = rec.header().unwrap();
    assert_eq!(h.format, "tollgate-recording");
    assert_eq!(h.version, 1);
    assert_eq!(h.session, info.id);
    assert_eq!(h.host, "ci-runner-7");
    assert_eq!(h.agent_version, "0.1.0-test");
    assert_eq!(h.started_at, "2025-03-04T11:00:00.123Z");
    assert_eq!(h.started_at_unix_ms, 1_741_086_000_123);
    assert_eq!(h.policy_digest.as_deref(), Some("sha256:feed"));
    assert_eq!(h.arrival, "redirect");
    assert_eq!(h.protocol, "postgres");
    assert_eq!(h.local, info.local);
    assert_eq!(h.client, info.client);
    assert_eq!(h.upstream, "db.internal:5432");
    assert_eq!(h.identity, info.identity);
    let k = h.kernel.as_ref().unwrap();
    assert_eq!(k.destination, addr("10.0.0.5:5432"));
    assert_eq!((k.tgid, k.cgroup_id, k.comm.as_str()), (4242, 9876, "psql"));

    let events: Vec<&EventRecord> = rec.events().collect();
    assert_eq!(events.len(), 7);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64);
    }
    assert!(events.windows(2).all(|w| w[0].t_us <= w[1].t_us));
    assert_eq!(
        events[0].event,
        Event::UpstreamConnected {
            peer: addr("10.0.0.5:5432"),
            connect_us: 1234
        }
    );
    assert_eq!(
        events[1].event,
        Event::Startup {
            user: Some("app".into()),
            database: Some("orders".into()),
            application_name: Some("psql".into()),
            brokered_user: None,
        }
    );
    let Event::Statement(s) = &events[4].event else {
        panic!("not a statement: {:?}", events[4]);
    };
    assert_eq!(s.text, "drop table orders");
    assert_eq!(s.command, "DROP");
    assert_eq!(s.kind.as_deref(), Some("select"));
    assert_eq!(s.action, "deny");
    assert!(s.refused);
    assert_eq!(s.rule.as_deref(), Some("no-drops"));
    assert_eq!(s.rules, vec!["no-drops".to_string()]);
    let Event::Statement(s) = &events[3].event else {
        panic!("not a statement");
    };
    assert_eq!(s.text, "select 'é ü ✓'\nfrom t");
    assert!(!s.refused);
    let Event::Statement(s) = &events[5].event else {
        panic!("not a statement");
    };
    assert_eq!((s.kind.as_deref(), s.fingerprint.as_deref()), (None, None));
    assert_eq!(
        events[6].event,
        Event::Closed {
            bytes_from_client: 812,
            bytes_from_upstream: 4096,
            duration_us: 1_500_000,
            reason: CloseRecord {
                kind: "client_error".into(),
                detail: Some("connection reset".into())
            }
        }
    );
    let t = rec.trailer().unwrap();
    assert_eq!((t.events, t.statements, t.denied, t.lost), (7, 4, 2, 0));
    assert_eq!(t.prev, t.chain_head);
    assert_eq!(rec.database_user(), Some("app"));

    let report = verify(&path);
    assert!(report.ok(), "{report}");
    assert!(report.complete);
    assert_eq!(report.records_ok, 9);
}

#[test]
fn every_record_kind_round_trips_through_the_codec() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, path) = record_session(tmp.path(), Fsync::OnClose);
    let mut records = read_recording(&path).unwrap().records;
    let ev = |event| {
        Record::Event(EventRecord {
            seq: 9,
            t_us: 10,
            prev: "00".repeat(32),
            event,
        })
    };
    records.push(ev(Event::EventsLost { count: 3 }));
    records.push(ev(Event::RecordingStopped {
        reason: "agent shutdown".into(),
    }));
    records.push(Record::Trailer(Trailer {
        prev: "11".repeat(32),
        chain_head: "11".repeat(32),
        events: 1,
        statements: 2,
        denied: 3,
        lost: 4,
        signature: Some(SignatureRecord {
            algorithm: "ed25519".into(),
            key_id: "k1".into(),
            public_key: "22".repeat(32),
            value: "33".repeat(64),
        }),
    }));
    for r in &records {
        let frame = encode_frame(r).unwrap();
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - PREFIX_LEN);
        assert_eq!(&decode_body(&frame[PREFIX_LEN..]).unwrap(), r);
    }
    // An event type from a later version reads as `Unknown`.
    let future = rmp_serde::to_vec_named(&serde_json::json!({
        "record": "event", "seq": 0, "t_us": 0, "prev": "", "event": {"type": "masking", "columns": 2}
    }))
    .unwrap();
    match decode_body(&future).unwrap() {
        Record::Event(e) => assert_eq!(e.event, Event::Unknown),
        other => panic!("{other:?}"),
    }
}

#[test]
fn addresses_and_ids_are_strings_in_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (info, path) = record_session(tmp.path(), Fsync::OnClose);
    let rec = read_recording(&path).unwrap();
    let jsonl = export_jsonl(&rec);
    let lines: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), rec.records.len());
    assert_eq!(lines[0]["record"], "header");
    assert_eq!(lines[0]["session"], info.id.to_string());
    assert_eq!(lines[0]["client"], "127.0.0.1:50123");
    assert_eq!(lines[1]["event"]["type"], "upstream_connected");
    assert_eq!(lines.last().unwrap()["record"], "trailer");
    // And in the MessagePack itself: the key `prev` then a 64-char str8,
    // which the hand-verification script in the format doc relies on.
    let bytes = std::fs::read(&path).unwrap();
    let needle = b"\xa4prev\xd9\x40";
    assert!(bytes.windows(needle.len()).any(|w| w == needle));
    let id = info.id.to_string();
    assert!(bytes.windows(id.len()).any(|w| w == id.as_bytes()));
}

/// Frame boundaries of a file: the offset each complete record ends at.
fn boundaries(bytes: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        pos += 4 + len;
        ends.push(pos);
    }
    assert_eq!(pos, bytes.len());
    ends
}

#[test]
fn a_file_cut_at_every_byte_reads_up_to_its_last_complete_record() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, path) = record_session(tmp.path(), Fsync::OnClose);
    let bytes = std::fs::read(&path).unwrap();
    let full = read_recording(&path).unwrap();
    let ends = boundaries(&bytes);
    assert_eq!(ends.len(), full.records.len());
    let name = Path::new("cut.tgrec");
    for cut in 0..=bytes.len() {
        let part = &bytes[..cut];
        let complete = ends.iter().filter(|&&e| e <= cut).count();
        let last_end = if complete == 0 { 0 } else { ends[complete - 1] };
        let rec = read_from(Cursor::new(part), name).unwrap();
        assert_eq!(rec.records, full.records[..complete], "cut at {cut}");
        let on_boundary = cut == last_end;
        assert_eq!(
            rec.truncated_at,
            (!on_boundary).then_some(last_end as u64),
            "cut at {cut}"
        );

        let report = verify_from(Cursor::new(part), name, None, &[]);
        if cut == bytes.len() {
            assert!(report.ok(), "{report}");
            continue;
        }
        let p = report.problem.as_ref().unwrap();
        assert!(!report.complete);
        assert_eq!(report.records_ok, complete as u64, "cut at {cut}");
        assert_eq!(p.record, complete as u64);
        assert_eq!(p.offset, last_end as u64, "cut at {cut}");
        if on_boundary {
            assert_eq!(p.problem, Problem::NoTrailer, "cut at {cut}");
            assert_eq!(report.truncated_at, None);
        } else {
            assert_eq!(
                p.problem,
                Problem::Truncated {
                    present: (cut - last_end) as u64
                },
                "cut at {cut}"
            );
            assert_eq!(report.truncated_at, Some(last_end as u64));
        }
    }
}

#[test]
fn a_flipped_byte_anywhere_is_detected_by_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let (info, path) = record_session(tmp.path(), Fsync::OnClose);
    let bytes = std::fs::read(&path).unwrap();
    let name = Path::new("flip.tgrec");
    assert!(verify_from(Cursor::new(&bytes), name, Some(info.id), &[]).ok());
    for at in 0..bytes.len() {
        for mask in [0x01u8, 0x20, 0x80] {
            let mut damaged = bytes.clone();
            damaged[at] ^= mask;
            let report = verify_from(Cursor::new(&damaged), name, Some(info.id), &[]);
            assert!(
                !report.ok(),
                "flipping byte {at} with {mask:#04x} went unnoticed"
            );
        }
    }
}

#[test]
fn verify_names_the_first_bad_record() {
    let tmp = tempfile::tempdir().unwrap();
    let (info, path) = record_session(tmp.path(), Fsync::OnClose);
    let bytes = std::fs::read(&path).unwrap();
    let ends = boundaries(&bytes);
    let name = Path::new("x.tgrec");
    // Change a letter inside the statement text of record 6 ("drop table").
    let at = bytes.windows(10).position(|w| w == b"drop table").unwrap();
    let mut damaged = bytes.clone();
    damaged[at] = b'D';
    let report = verify_from(Cursor::new(&damaged), name, Some(info.id), &[]);
    let p = report.problem.unwrap();
    // Detected at the next record, whose prev no longer matches.
    let victim = ends.iter().filter(|&&e| e <= at).count();
    assert_eq!(p.record, victim as u64 + 1);
    assert_eq!(p.offset, ends[victim] as u64);
    assert!(matches!(p.problem, Problem::ChainBroken { .. }), "{p:?}");

    // Dropping a whole record breaks the chain too.
    let mut cut = bytes[..ends[3]].to_vec();
    cut.extend_from_slice(&bytes[ends[4]..]);
    let report = verify_from(Cursor::new(&cut), name, Some(info.id), &[]);
    assert_eq!(report.problem.unwrap().record, 4);

    // A file renamed to another session's id.
    let report = verify_from(Cursor::new(&bytes), name, Some(Uuid::now_v7()), &[]);
    assert!(matches!(
        report.problem.unwrap().problem,
        Problem::WrongSession { .. }
    ));

    // Anything after the trailer.
    let mut extra = bytes.clone();
    extra.extend_from_slice(&bytes[ends[0]..ends[1]]);
    let p = verify_from(Cursor::new(&extra), name, None, &[])
        .problem
        .unwrap();
    assert_eq!(p.problem, Problem::AfterTrailer);
    assert_eq!(p.offset, bytes.len() as u64);
}

#[test]
fn oversized_lengths_and_trailing_bytes_are_errors_not_allocations() {
    let name = Path::new("big.tgrec");
    let huge = [0xff, 0xff, 0xff, 0xff, 0x80];
    assert!(matches!(
        read_from(Cursor::new(&huge), name),
        Err(ReadError::TooLarge { offset: 0, .. })
    ));
    let p = verify_from(Cursor::new(&huge), name, None, &[])
        .problem
        .unwrap();
    assert_eq!(p.problem, Problem::TooLarge { len: u32::MAX });

    let just_over = (MAX_RECORD_LEN + 1).to_be_bytes();
    assert!(matches!(
        read_from(Cursor::new(&just_over), name),
        Err(ReadError::TooLarge { .. })
    ));

    let tmp = tempfile::tempdir().unwrap();
    let (_, path) = record_session(tmp.path(), Fsync::OnClose);
    let bytes = std::fs::read(&path).unwrap();
    let ends = boundaries(&bytes);
    let mut body = bytes[PREFIX_LEN..ends[0]].to_vec();
    body.push(0xc0);
    assert!(matches!(
        decode_body(&body),
        Err(DecodeError::Trailing { extra: 1 })
    ));
    // Not a recording at all.
    let frame = encode_frame(&Record::Trailer(Trailer {
        prev: String::new(),
        chain_head: String::new(),
        events: 0,
        statements: 0,
        denied: 0,
        lost: 0,
        signature: None,
    }))
    .unwrap();
    assert!(matches!(
        read_from(Cursor::new(&frame), name),
        Err(ReadError::NotARecording { .. })
    ));
}

#[test]
fn the_chain_links_each_record_to_the_previous_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, path) = record_session(tmp.path(), Fsync::OnClose);
    let bytes = std::fs::read(&path).unwrap();
    let ends = boundaries(&bytes);
    let rec = read_recording(&path).unwrap();
    let mut start = 0;
    for (i, end) in ends.iter().enumerate().take(ends.len() - 1) {
        let want = frame_hash(&bytes[start..*end]);
        let prev = match &rec.records[i + 1] {
            Record::Event(e) => e.prev.clone(),
            Record::Trailer(t) => t.prev.clone(),
            Record::Header(_) => panic!("second header"),
        };
        assert_eq!(prev, want, "record {}", i + 1);
        start = *end;
    }
}

#[test]
fn a_tiny_queue_counts_every_lost_event_and_marks_the_recording() {
    for mode in [OnOverflow::FailClosed, OnOverflow::CountLost] {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = settings(tmp.path(), Fsync::EveryEvent);
        s.queue_capacity = 1;
        s.on_overflow = mode;
        let (sink, handle) = Recorder::start(s).unwrap();
        let info = info("orders-prod", "runner", None);
        let path = session_path(tmp.path(), info.id, info.started_at);
        sink.emit(&SessionEvent::Started(Arc::clone(&info)));
        wait_for("the session file", || path.is_file());
        let mut emitted = 1u64;
        while sink.lost() == 0 || emitted < 200 {
            sink.emit(&statement(info.id, "select 1", Action::Allow, None));
            emitted += 1;
            assert!(emitted < 1_000_000, "never overflowed");
        }
        sink.emit(&SessionEvent::Closed {
            session: info.id,
            bytes_from_client: 1,
            bytes_from_upstream: 2,
            duration: Duration::from_secs(1),
            reason: CloseReason::Completed,
        });
        emitted += 1;
        let lost_before_shutdown = sink.lost();
        assert!(lost_before_shutdown > 0);
        assert_eq!(sink.failed(), mode == OnOverflow::FailClosed, "{mode:?}");
        assert_eq!(sink.refuse_new_sessions(), mode == OnOverflow::FailClosed);
        if mode == OnOverflow::FailClosed {
            assert!(sink.failure().unwrap().contains("queue full"));
        }
        let report = handle.shutdown();
        assert_eq!(report.lost, lost_before_shutdown);

        // Nothing is lost silently: every emitted event is either in the
        // file or counted, and the file says how many it is missing.
        let report = verify(&path);
        assert!(report.ok(), "{report}");
        let rec = read_recording(&path).unwrap();
        let recorded_from_emits = 1 + rec
            .events()
            .filter(|e| {
                !matches!(
                    e.event,
                    Event::EventsLost { .. } | Event::RecordingStopped { .. }
                )
            })
            .count() as u64;
        assert_eq!(recorded_from_emits + sink.lost(), emitted, "{mode:?}");
        assert_eq!(rec.lost(), sink.lost());
        assert_eq!(rec.trailer().unwrap().lost, sink.lost());
        assert!(render_transcript(&rec, false).contains("events lost here"));
    }
}

#[test]
fn a_file_where_the_dated_directory_should_be_fails_the_recorder() {
    let tmp = tempfile::tempdir().unwrap();
    // Sessions start in 2025: make `<dir>/2025` a file.
    std::fs::write(tmp.path().join("2025"), b"in the way").unwrap();
    let (sink, handle) = Recorder::start(settings(tmp.path(), Fsync::EveryEvent)).unwrap();
    assert!(!sink.failed());
    let info = info("orders-prod", "runner", None);
    for e in session_events(&info) {
        sink.emit(&e);
    }
    let report = handle.shutdown();
    assert!(sink.failed());
    assert!(sink.refuse_new_sessions());
    let why = sink.failure().unwrap();
    assert!(why.contains("cannot create recording"), "{why}");
    assert!(why.contains(&info.id.to_string()), "{why}");
    assert_eq!(report.failure.as_deref(), Some(why.as_str()));
    // The start and every later event of that session are counted.
    assert_eq!(sink.lost(), session_events(&info).len() as u64);
}

#[test]
fn start_fails_when_the_recording_directory_cannot_be_created() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = Recorder::start(settings(&file.join("rec"), Fsync::OnClose)).unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot create recording directory"),
        "{err}"
    );
}

#[test]
fn every_fsync_mode_writes_a_verifiable_recording() {
    for fsync in [
        Fsync::EveryEvent,
        Fsync::Interval(Duration::from_millis(5)),
        Fsync::OnClose,
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (sink, handle) = Recorder::start(settings(tmp.path(), fsync)).unwrap();
        let info = info("t", "u", None);
        let events = session_events(&info);
        let path = session_path(tmp.path(), info.id, info.started_at);
        for e in &events[..4] {
            sink.emit(e);
        }
        // Every batch reaches the kernel: the open file is readable now,
        // as a killed agent would leave it.
        wait_for("the first statement", || {
            read_recording(&path).is_ok_and(|r| r.statements() == 1)
        });
        let open = verify(&path);
        assert_eq!(open.problem.unwrap().problem, Problem::NoTrailer);
        std::thread::sleep(Duration::from_millis(12));
        for e in &events[4..] {
            sink.emit(e);
        }
        handle.shutdown();
        let report = verify(&path);
        assert!(report.ok(), "{fsync:?}: {report}");
        assert_eq!(report.events_ok, 7);
    }
}

#[test]
fn shutdown_closes_open_sessions_and_later_events_are_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, handle) = Recorder::start(settings(tmp.path(), Fsync::OnClose)).unwrap();
    let info = info("t", "u", None);
    let events = session_events(&info);
    for e in &events[..4] {
        sink.emit(e);
    }
    let report = handle.shutdown();
    assert_eq!(report.lost, 0);
    let path = session_path(tmp.path(), info.id, info.started_at);
    let v = verify(&path);
    assert!(v.ok(), "{v}");
    let rec = read_recording(&path).unwrap();
    let last = rec.events().last().unwrap();
    assert_eq!(
        last.event,
        Event::RecordingStopped {
            reason: "agent shutdown".into()
        }
    );
    assert!(render_transcript(&rec, false).contains("recording stopped: agent shutdown"));

    sink.emit(&events[4]);
    assert_eq!(sink.lost(), 1);
    assert!(sink.failed());
    assert!(sink.failure().unwrap().contains("stopped"));
}

#[test]
fn dropping_the_handle_also_closes_recordings() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, handle) = Recorder::start(settings(tmp.path(), Fsync::OnClose)).unwrap();
    let info = info("t", "u", None);
    sink.emit(&SessionEvent::Started(Arc::clone(&info)));
    drop(handle);
    let v = verify(session_path(tmp.path(), info.id, info.started_at));
    assert!(v.ok(), "{v}");
}

#[test]
fn list_walks_the_dated_tree_and_filters() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, handle) = Recorder::start(settings(tmp.path(), Fsync::OnClose)).unwrap();
    let a = info("orders-prod", "alice", Some("acme/shop"));
    let b = info("billing", "bob", None);
    for e in session_events(&a) {
        sink.emit(&e);
    }
    let b_events = session_events(&b);
    for e in b_events.iter().take(4) {
        sink.emit(e); // one allowed statement, no close
    }
    handle.shutdown();
    // A damaged file is listed with its error, whatever the filter.
    let day = tmp.path().join("2025/03/04");
    let broken = day.join(format!("{}.tgrec", Uuid::now_v7()));
    std::fs::write(&broken, [0xff, 0xff, 0xff, 0xff]).unwrap();
    std::fs::write(day.join("notes.txt"), b"ignored").unwrap();

    let all = list(tmp.path(), &RecordingFilter::default());
    assert_eq!(all.len(), 3);
    let sa = all.iter().find(|s| s.id == Some(a.id)).unwrap();
    assert_eq!(sa.target.as_deref(), Some("orders-prod"));
    assert_eq!(sa.user.as_deref(), Some("alice"));
    assert_eq!(sa.database_user.as_deref(), Some("app"));
    assert_eq!(sa.pid, Some(4242));
    assert_eq!(sa.exe.as_deref(), Some("/usr/bin/psql"));
    assert_eq!(sa.ci_repo.as_deref(), Some("acme/shop"));
    assert_eq!((sa.statements, sa.denied), (4, 2));
    assert!(sa.complete && !sa.truncated && sa.error.is_none());
    assert!(all.iter().any(|s| s.path == broken && s.error.is_some()));

    let only = |f: RecordingFilter| -> Vec<Option<Uuid>> {
        list(tmp.path(), &f)
            .into_iter()
            .filter(|s| s.error.is_none())
            .map(|s| s.id)
            .collect()
    };
    let f = RecordingFilter {
        target: Some("billing".into()),
        ..Default::default()
    };
    assert_eq!(only(f), vec![Some(b.id)]);
    let f = RecordingFilter {
        user: Some("alice".into()),
        ..Default::default()
    };
    assert_eq!(only(f), vec![Some(a.id)]);
    let f = RecordingFilter {
        user: Some("app".into()), // database user matches too
        ..Default::default()
    };
    assert_eq!(only(f).len(), 2);
    let f = RecordingFilter {
        ci_repo: Some("acme/shop".into()),
        ..Default::default()
    };
    assert_eq!(only(f), vec![Some(a.id)]);
    let f = RecordingFilter {
        denied_only: true,
        ..Default::default()
    };
    assert_eq!(only(f), vec![Some(a.id)]);
    let f = RecordingFilter {
        since: Some(start_time() + Duration::from_secs(86_400)),
        ..Default::default()
    };
    assert!(only(f).is_empty());
    let f = RecordingFilter {
        since: Some(start_time()),
        until: Some(start_time() + Duration::from_secs(1)),
        ..Default::default()
    };
    assert_eq!(only(f).len(), 2);

    // locate finds a file by id: here the id's own date is today, not the
    // session's start date, so this exercises the walk.
    assert_eq!(
        locate(tmp.path(), a.id),
        Some(session_path(tmp.path(), a.id, a.started_at))
    );
    assert_eq!(locate(tmp.path(), Uuid::now_v7()), None);
}

#[test]
fn the_transcript_lists_statements_with_verdicts_and_the_close() {
    let tmp = tempfile::tempdir().unwrap();
    let (info, path) = record_session(tmp.path(), Fsync::OnClose);
    let rec = read_recording(&path).unwrap();
    let plain = render_transcript(&rec, false);
    assert!(!plain.contains('\x1b'));
    for want in [
        format!("session {}", info.id),
        "2025-03-04T11:00:00.123Z on ci-runner-7".to_string(),
        "orders-prod (postgres) upstream db.internal:5432, via redirect".to_string(),
        "pid 4242 uid 1001 (runner)".to_string(),
        "github_actions repo acme/shop".to_string(),
        "original destination 10.0.0.5:5432".to_string(),
        "start-up: user app database orders application psql".to_string(),
        "ALLOW  SELECT  [default] allow by test".to_string(),
        "DENY   DROP  [rule no-drops] deny by test".to_string(),
        "drop table orders".to_string(),
        "from t".to_string(),
        "closed: client error: connection reset after 1.500s".to_string(),
        "4 statements, 2 denied".to_string(),
    ] {
        assert!(plain.contains(&want), "missing {want:?} in:\n{plain}");
    }
    assert!(!plain.contains("incomplete"));
    let coloured = render_transcript(&rec, true);
    assert!(coloured.contains("\x1b[1;31mDENY"));

    // A cut recording says so.
    let bytes = std::fs::read(&path).unwrap();
    let cut = read_from(Cursor::new(&bytes[..bytes.len() - 3]), &path).unwrap();
    assert!(render_transcript(&cut, false).contains("incomplete: the file is cut at byte"));
}

#[test]
fn long_statement_text_is_cut_on_a_character_boundary() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, handle) = Recorder::start(settings(tmp.path(), Fsync::OnClose)).unwrap();
    let info = info("t", "u", None);
    let text = format!("select '{}'", "é".repeat(MAX_TEXT_LEN));
    sink.emit(&SessionEvent::Started(Arc::clone(&info)));
    sink.emit(&statement(info.id, &text, Action::Allow, None));
    handle.shutdown();
    let rec = read_recording(session_path(tmp.path(), info.id, info.started_at)).unwrap();
    let Event::Statement(s) = &rec.events().next().unwrap().event else {
        panic!("not a statement");
    };
    assert!(s.text.len() <= MAX_TEXT_LEN && s.text.len() > MAX_TEXT_LEN - 2);
    assert!(text.starts_with(&s.text));
    assert_eq!(s.text_len, Some(text.len() as u64));
}

// ---- Signatures ----

/// Re-encodes `records` as a file with a valid chain and trailer counts,
/// keeping the trailer's signature as it is: what someone who edits a
/// recording and recomputes every hash produces.
fn rechain(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut prev = String::new();
    let (mut events, mut statements, mut denied) = (0u64, 0u64, 0u64);
    for r in records {
        let r = match r.clone() {
            Record::Header(h) => Record::Header(h),
            Record::Event(mut e) => {
                e.prev = prev.clone();
                events += 1;
                if let Event::Statement(s) = &e.event {
                    statements += 1;
                    denied += u64::from(s.refused);
                }
                Record::Event(e)
            }
            Record::Trailer(mut t) => {
                t.prev = prev.clone();
                t.chain_head = prev.clone();
                (t.events, t.statements, t.denied) = (events, statements, denied);
                Record::Trailer(t)
            }
        };
        let frame = encode_frame(&r).unwrap();
        prev = frame_hash(&frame);
        out.extend_from_slice(&frame);
    }
    out
}

fn signed_session(dir: &Path) -> (Arc<SessionInfo>, PathBuf, PublicKey) {
    let generated = generate_key(&dir.join("recording.key")).unwrap();
    let key = SigningKey::load(&generated.private).unwrap();
    assert_eq!(*key.public_key(), generated.public);
    let mut s = settings(&dir.join("rec"), Fsync::OnClose);
    s.signing_key = Some(Arc::new(key));
    let (sink, handle) = Recorder::start(s).unwrap();
    assert_eq!(
        sink.signing_key_id(),
        Some(generated.public.key_id().as_str())
    );
    let info = info("orders-prod", "runner", Some("acme/shop"));
    for e in session_events(&info) {
        sink.emit(&e);
    }
    handle.shutdown();
    let path = session_path(&dir.join("rec"), info.id, info.started_at);
    (info, path, generated.public)
}

#[test]
fn a_signed_recording_verifies_with_its_public_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (info, path, public) = signed_session(tmp.path());
    let rec = read_recording(&path).unwrap();
    let t = rec.trailer().unwrap();
    let sig = t.signature.as_ref().unwrap();
    assert_eq!(sig.algorithm, "ed25519");
    assert_eq!(sig.key_id, public.key_id());
    assert_eq!(sig.public_key, public.to_hex());
    assert_eq!(sig.value.len(), 128);

    let report = verify_signed(&path, &[public]);
    assert!(report.ok(), "{report}");
    assert_eq!(
        report.signature,
        SignatureStatus::Valid {
            key_id: public.key_id()
        }
    );
    assert!(report.to_string().contains("signature valid"), "{report}");

    // Without a key the chain is checked and the signature only reported.
    let report = verify(&path);
    assert!(report.ok(), "{report}");
    assert!(matches!(
        report.signature,
        SignatureStatus::PresentNotChecked { .. }
    ));
    assert!(report.to_string().contains("not checked"), "{report}");

    // Another key (a rotation list that lacks the signer) fails.
    let other = generate_key(&tmp.path().join("other.key")).unwrap().public;
    let report = verify_signed(&path, &[other]);
    assert!(!report.ok());
    assert!(matches!(
        report.signature,
        SignatureStatus::UnknownKey { .. }
    ));
    assert!(report.to_string().contains("FAILED"), "{report}");
    assert!(verify_signed(&path, &[other, public]).ok());

    // The signature is over exactly the documented bytes.
    let message = format!(
        "tollgate-recording/1\n{}\n{}\n7\n4\n2\n0",
        info.id, t.chain_head
    );
    assert_eq!(signing::signed_message(info.id, t), message.as_bytes());
    let sig = hex::decode(&sig.value).unwrap();
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ED25519,
        hex::decode(public.to_hex()).unwrap(),
    )
    .verify(message.as_bytes(), &sig)
    .unwrap();
}

#[test]
fn an_edited_and_rechained_recording_fails_the_signature() {
    let tmp = tempfile::tempdir().unwrap();
    let (info, path, public) = signed_session(tmp.path());
    let mut records = read_recording(&path).unwrap().records;
    // Hide the denied DROP: rewrite it as allowed, recompute every hash.
    for r in &mut records {
        if let Record::Event(EventRecord {
            event: Event::Statement(s),
            ..
        }) = r
        {
            if s.text == "drop table orders" {
                s.action = "allow".into();
                s.refused = false;
            }
        }
    }
    let forged = rechain(&records);
    let name = Path::new("forged.tgrec");
    // The chain alone cannot tell: it was recomputed.
    let unchecked = verify_from(Cursor::new(&forged), name, Some(info.id), &[]);
    assert!(unchecked.ok(), "{unchecked}");
    let report = verify_from(Cursor::new(&forged), name, Some(info.id), &[public]);
    assert!(!report.ok());
    assert!(
        matches!(report.signature, SignatureStatus::Invalid { .. }),
        "{report}"
    );
    assert!(report.to_string().contains("INVALID"), "{report}");

    // Dropping the signature instead: unsigned, which fails when a key is given.
    if let Some(Record::Trailer(t)) = records.last_mut() {
        t.signature = None;
    }
    let stripped = rechain(&records);
    let report = verify_from(Cursor::new(&stripped), name, Some(info.id), &[public]);
    assert!(!report.ok());
    assert_eq!(report.signature, SignatureStatus::Unsigned);
    assert!(report.to_string().contains("unsigned"), "{report}");
    assert!(verify_from(Cursor::new(&stripped), name, Some(info.id), &[]).ok());
}

#[test]
fn unsigned_recordings_fail_only_when_a_key_is_given() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, path) = record_session(tmp.path(), Fsync::OnClose);
    let bytes = std::fs::read(&path).unwrap();
    // Unsigned trailers carry no signature field at all, as before signing.
    assert!(!bytes.windows(9).any(|w| w == b"signature"));
    assert_eq!(verify(&path).signature, SignatureStatus::Unsigned);
    assert!(verify(&path).ok());
    let key = generate_key(&tmp.path().join("k")).unwrap().public;
    let report = verify_signed(&path, &[key]);
    assert!(!report.ok());
    assert!(
        report
            .to_string()
            .contains("unsigned and a public key was given"),
        "{report}"
    );
}

#[test]
fn keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("signing.key");
    let key = generate_key(&out).unwrap();
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let pem_text = std::fs::read_to_string(&out).unwrap();
    assert!(
        pem_text.starts_with("-----BEGIN PRIVATE KEY-----"),
        "{pem_text}"
    );
    assert_eq!(key.public_path, tmp.path().join("signing.key.pub"));
    let public_text = std::fs::read_to_string(&key.public_path).unwrap();
    assert_eq!(public_text, format!("{}\n", key.public.to_hex()));
    assert_eq!(PublicKey::load(&key.public_path).unwrap(), key.public);
    assert_eq!(key.public.key_id().len(), 16);

    let again = generate_key(&out).unwrap_err();
    assert!(again.to_string().contains("already exists"), "{again}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), pem_text);

    // PKCS#8 v1, as openssl writes it (OpenSSL 3.0 cannot read ring's v2).
    let der = pem::parse(&pem_text).unwrap().into_contents();
    assert_eq!(der.len(), 48);
    assert!(
        der.starts_with(&[0x30, 0x2e, 0x02, 0x01, 0x00]),
        "{der:02x?}"
    );
    // DER works as well as PEM (openssl's `-outform DER`).
    let der_path = tmp.path().join("signing.der");
    std::fs::write(&der_path, &der).unwrap();
    assert_eq!(
        *SigningKey::load(&der_path).unwrap().public_key(),
        key.public
    );
}

#[test]
fn keys_in_the_wrong_shape_are_refused_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let cert = write(
        "cert.pem",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let e = SigningKey::load(&cert).unwrap_err().to_string();
    assert!(e.contains("not a PKCS#8"), "{e}");
    let junk = write("junk.key", b"hello");
    let e = SigningKey::load(&junk).unwrap_err().to_string();
    assert!(e.contains("keygen"), "{e}");
    let e = SigningKey::load(&tmp.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing"), "{e}");

    assert!(PublicKey::parse(b"abcd").unwrap_err().contains("2 bytes"));
    assert!(PublicKey::parse(b"not hex at all").is_err());
    // An openssl `pkey -pubout` PEM: SubjectPublicKeyInfo for ed25519.
    let key = generate_key(&tmp.path().join("k")).unwrap().public;
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    spki.extend_from_slice(&hex::decode(key.to_hex()).unwrap());
    let pem_text = pem::encode(&pem::Pem::new("PUBLIC KEY", spki));
    assert_eq!(PublicKey::parse(pem_text.as_bytes()).unwrap(), key);
}

// ---- Retention ----

fn days_ago(n: u64) -> SystemTime {
    SystemTime::now() - Duration::from_secs(n * 86_400)
}

/// A recording file of `len` bytes for a session started `age_days` ago,
/// last written then.
fn aged_file(dir: &Path, age_days: u64, len: usize) -> (Uuid, PathBuf) {
    let id = Uuid::now_v7();
    let at = days_ago(age_days);
    let path = session_path(dir, id, at);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, vec![0u8; len]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(at)
        .unwrap();
    (id, path)
}

#[test]
fn retention_by_age_removes_old_closed_files_and_their_empty_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_, old) = aged_file(dir, 40, 100);
    let (open_id, old_but_open) = aged_file(dir, 35, 100);
    let (_, recent) = aged_file(dir, 2, 100);
    let (_, today) = aged_file(dir, 0, 100);
    let stray = old.parent().unwrap().join("notes.txt");
    std::fs::write(&stray, b"not a recording").unwrap();
    // An empty day directory from a year ago, and today's, empty.
    let empty_old = dir.join("2001/01/01");
    std::fs::create_dir_all(&empty_old).unwrap();
    let policy = Retention {
        max_age: Some(Duration::from_secs(30 * 86_400)),
        max_total_size: None,
    };
    let report = prune(dir, &policy, SystemTime::now(), &|id| *id == open_id);
    assert_eq!(report.removed.len(), 1, "{report:?}");
    assert_eq!(report.removed[0].path, old);
    assert_eq!(report.removed[0].reason, retention::RemoveReason::Age);
    assert_eq!(report.freed(), 100);
    assert!(!old.exists());
    assert!(
        old_but_open.exists(),
        "a file being written is never removed"
    );
    assert!(recent.exists() && today.exists());
    // The old day keeps the stray file, so it stays; the empty one from
    // 2001 goes with its month and year.
    assert!(stray.exists());
    assert!(!dir.join("2001").exists(), "{report:?}");
    assert!(report.dirs_removed.contains(&empty_old));
    assert_eq!((report.kept_files, report.kept_bytes), (3, 300));
    assert!(report.errors.is_empty(), "{report:?}");
}

#[test]
fn retention_by_size_removes_the_least_recently_written_first() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_, a) = aged_file(dir, 9, 400);
    let (open_id, b) = aged_file(dir, 8, 400);
    let (_, c) = aged_file(dir, 7, 400);
    let (_, d) = aged_file(dir, 1, 400);
    let policy = Retention {
        max_age: None,
        max_total_size: Some(1000),
    };
    let report = prune(dir, &policy, SystemTime::now(), &|id| *id == open_id);
    // 1600 bytes: a goes (1200), b is open and skipped, c goes (800).
    let removed: Vec<&PathBuf> = report.removed.iter().map(|r| &r.path).collect();
    assert_eq!(removed, vec![&a, &c], "{report:?}");
    assert!(report
        .removed
        .iter()
        .all(|r| r.reason == retention::RemoveReason::Size));
    assert!(b.exists() && d.exists());
    assert_eq!(report.kept_bytes, 800);
    // The emptied day directories are gone, the parents with files stay.
    assert!(!a.parent().unwrap().exists());
    assert!(!c.parent().unwrap().exists());
    assert!(b.parent().unwrap().exists());

    // Nothing over budget: nothing removed; no limits: a no-op.
    assert!(prune(dir, &policy, SystemTime::now(), &|_| false)
        .removed
        .is_empty());
    let off = prune(dir, &Retention::default(), SystemTime::now(), &|_| false);
    assert_eq!(off, PruneReport::default());
}

#[test]
fn retention_never_removes_a_live_recorders_open_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, handle) = Recorder::start(settings(tmp.path(), Fsync::EveryEvent)).unwrap();
    let info = info("t", "u", None);
    let path = session_path(tmp.path(), info.id, info.started_at);
    sink.emit(&SessionEvent::Started(Arc::clone(&info)));
    wait_for("the session file", || path.is_file());
    assert!(sink.is_writing(&info.id));
    // The session started in 2025: far older than a day, and over a 1-byte
    // budget; still open, so kept.
    let policy = Retention {
        max_age: Some(Duration::from_secs(86_400)),
        max_total_size: Some(1),
    };
    let later = SystemTime::now() + Duration::from_secs(10 * 86_400);
    let report = prune(tmp.path(), &policy, later, &|id| sink.is_writing(id));
    assert!(report.removed.is_empty(), "{report:?}");
    assert!(path.is_file());
    for e in &session_events(&info)[1..] {
        sink.emit(e);
    }
    wait_for("the session to close", || !sink.is_writing(&info.id));
    handle.shutdown();
    assert!(verify(&path).ok());
    let report = prune(tmp.path(), &policy, later, &|id| sink.is_writing(id));
    assert_eq!(report.removed.len(), 1, "{report:?}");
    assert!(!path.exists());
}

// ---- Replay ----

/// A recorded session whose events are `gaps_ms` apart.
fn paced_recording(dir: &Path, gaps_ms: &[u64]) -> Recording {
    let (_, path) = record_session(dir, Fsync::OnClose);
    let mut rec = read_recording(&path).unwrap();
    let mut t = 0;
    let mut gaps = gaps_ms.iter();
    for r in &mut rec.records {
        if let Record::Event(e) = r {
            t += gaps.next().copied().unwrap_or(0) * 1000;
            e.t_us = t;
        }
    }
    rec
}

#[test]
fn replay_waits_the_recorded_gaps_divided_by_the_speed() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = paced_recording(tmp.path(), &[0, 100, 200, 0, 1000, 50, 3000]);
    let mut waits = Vec::new();
    let mut out = Vec::new();
    let options = ReplayOptions {
        speed: 10.0,
        ..ReplayOptions::default()
    };
    let total = replay(&rec, &options, &mut out, &mut |d| waits.push(d)).unwrap();
    let ms: Vec<u128> = waits.iter().map(|d| d.as_millis()).collect();
    assert_eq!(ms, vec![10, 20, 100, 5, 300]);
    assert_eq!(total, Duration::from_millis(435));
    // The same lines as `show`.
    assert_eq!(
        String::from_utf8(out).unwrap(),
        render_transcript(&rec, false)
    );

    let capped = ReplayOptions {
        speed: 1.0,
        max_wait: Some(Duration::from_millis(500)),
        color: false,
    };
    waits.clear();
    replay(&rec, &capped, &mut Vec::new(), &mut |d| waits.push(d)).unwrap();
    let ms: Vec<u128> = waits.iter().map(|d| d.as_millis()).collect();
    assert_eq!(ms, vec![100, 200, 500, 50, 500]);

    for speed in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let opts = ReplayOptions {
            speed,
            ..ReplayOptions::default()
        };
        let mut slept = false;
        let total = replay(&rec, &opts, &mut Vec::new(), &mut |_| slept = true).unwrap();
        assert!(!slept && total.is_zero(), "speed {speed}");
    }
}

#[test]
fn replay_at_a_fast_speed_really_sleeps_and_keeps_order() {
    let tmp = tempfile::tempdir().unwrap();
    // 2.4 s of recorded time at 40x: about 60 ms of real waiting.
    let rec = paced_recording(tmp.path(), &[0, 400, 400, 400, 400, 400, 400]);
    let options = ReplayOptions {
        speed: 40.0,
        ..ReplayOptions::default()
    };
    let began = Instant::now();
    let mut out = Vec::new();
    replay(&rec, &options, &mut out, &mut std::thread::sleep).unwrap();
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(60), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let text = String::from_utf8(out).unwrap();
    let drop_at = text.find("drop table orders").unwrap();
    let select_at = text.find("select * from orders").unwrap();
    assert!(select_at < drop_at);
    assert!(text.contains("+     2.400s"), "{text}");
}

/// A small pcap reader: every packet's IP and TCP checksums checked, the
/// TCP flags in order, and each direction's payload reassembled by
/// sequence number (`true` for client → server).
struct Capture {
    flags: Vec<(bool, u8)>,
    client: Vec<u8>,
    server: Vec<u8>,
    first_ts_us: u64,
}

fn u16_be(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_be(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn parse_pcap(bytes: &[u8], client_port: u16) -> Capture {
    assert_eq!(u32_le(bytes, 0), 0xa1b2_c3d4, "magic");
    assert_eq!(u32_le(bytes, 20), 101, "LINKTYPE_RAW");
    let mut pos = 24;
    let mut cap = Capture {
        flags: Vec::new(),
        client: Vec::new(),
        server: Vec::new(),
        first_ts_us: 0,
    };
    // Next expected sequence number per direction, known from the SYNs.
    let (mut next_c, mut next_s) = (None::<u32>, None::<u32>);
    while pos < bytes.len() {
        let ts = u64::from(u32_le(bytes, pos)) * 1_000_000 + u64::from(u32_le(bytes, pos + 4));
        if cap.first_ts_us == 0 {
            cap.first_ts_us = ts;
        }
        let incl = u32_le(bytes, pos + 8) as usize;
        assert_eq!(incl, u32_le(bytes, pos + 12) as usize);
        let p = &bytes[pos + 16..pos + 16 + incl];
        pos += 16 + incl;
        let (tcp, pseudo) = match p[0] >> 4 {
            4 => {
                let ihl = usize::from(p[0] & 0x0f) * 4;
                assert_eq!(usize::from(u16_be(p, 2)), p.len(), "IPv4 total length");
                assert_eq!(super::pcap::checksum(&[&p[..ihl]]), 0, "IPv4 checksum");
                assert_eq!(p[9], 6);
                let tcp = &p[ihl..];
                let mut pseudo = p[12..20].to_vec();
                pseudo.extend_from_slice(&[0, 6]);
                pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
                (tcp, pseudo)
            }
            6 => {
                assert_eq!(
                    usize::from(u16_be(p, 4)),
                    p.len() - 40,
                    "IPv6 payload length"
                );
                assert_eq!(p[6], 6);
                let tcp = &p[40..];
                let mut pseudo = p[8..40].to_vec();
                pseudo.extend_from_slice(&(tcp.len() as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, 6]);
                (tcp, pseudo)
            }
            v => panic!("IP version {v}"),
        };
        assert_eq!(super::pcap::checksum(&[&pseudo, tcp]), 0, "TCP checksum");
        let from_client = u16_be(tcp, 0) == client_port;
        let seq = u32_be(tcp, 4);
        let flags = tcp[13];
        let payload = &tcp[usize::from(tcp[12] >> 4) * 4..];
        assert!(payload.len() <= 65000);
        cap.flags.push((from_client, flags));
        let (next, other) = if from_client {
            (&mut next_c, next_s)
        } else {
            (&mut next_s, next_c)
        };
        if flags & 0x02 != 0 {
            *next = Some(seq.wrapping_add(1));
            continue;
        }
        let expected = next.expect("data before the SYN");
        assert_eq!(seq, expected, "a gap or overlap in the stream");
        // The acknowledgement is the other side's next sequence number.
        if flags & 0x10 != 0 {
            assert_eq!(Some(u32_be(tcp, 8)), other, "ack number");
        }
        *next = Some(seq.wrapping_add(payload.len() as u32 + u32::from(flags & 0x01)));
        if from_client {
            cap.client.extend_from_slice(payload);
        } else {
            cap.server.extend_from_slice(payload);
        }
    }
    cap
}

/// Records a session with raw events from `client` and returns the file.
fn record_raw_session(
    dir: &Path,
    client: &str,
    client_bytes: &[Vec<u8>],
    server_bytes: &[Vec<u8>],
) -> PathBuf {
    let (sink, handle) = Recorder::start(settings(dir, Fsync::OnClose)).unwrap();
    let mut info = (*info("orders-prod", "runner", None)).clone();
    info.client = addr(client);
    let info = Arc::new(info);
    let events = crate::events::Events::new(sink.clone())
        .with_recorder(sink.clone(), ["orders-prod".to_string()]);
    assert!(events.records_raw("orders-prod"));
    assert!(!events.records_raw("other"));
    let all = session_events(&info);
    for e in &all[..2] {
        events.emit(e);
    }
    for (c, s) in client_bytes.iter().zip(server_bytes) {
        events.emit_raw(info.id, crate::events::RawDirection::Client, c);
        events.emit_raw(info.id, crate::events::RawDirection::Server, s);
    }
    for e in &all[2..] {
        events.emit(e);
    }
    let report = handle.shutdown();
    assert_eq!(report.lost, 0);
    session_path(dir, info.id, info.started_at)
}

#[test]
fn raw_bytes_export_as_a_pcap_that_parses_back() {
    let client_bytes = vec![
        b"\0\0\0\x08\x04\xd2\x16\x2f".to_vec(),
        b"Q\0\0\0\x0dselect 1\0".to_vec(),
        // Larger than a raw event (split) and than a segment (split again).
        (0..200_000u32).map(|i| (i % 251) as u8).collect(),
    ];
    let server_bytes = vec![
        b"N".to_vec(),
        b"T\0\0\0\x21\0\x01?column?\0".to_vec(),
        b"C\0\0\0\x0dSELECT 1\0Z\0\0\0\x05I".to_vec(),
    ];
    for client in ["127.0.0.1:50123", "[fd00::7]:50123"] {
        let tmp = tempfile::tempdir().unwrap();
        let path = record_raw_session(tmp.path(), client, &client_bytes, &server_bytes);
        let rec = read_recording(&path).unwrap();
        let raws: Vec<&Event> = rec
            .events()
            .map(|e| &e.event)
            .filter(|e| matches!(e, Event::Raw { .. }))
            .collect();
        // 200000 bytes are 4 events of at most 64 KiB.
        assert_eq!(raws.len(), 2 + 4 + 3, "{client}");
        for r in &raws {
            let Event::Raw { data, .. } = r else {
                unreachable!()
            };
            assert!(data.len() <= MAX_RAW_DATA);
        }
        assert!(verify(&path).ok(), "{}", verify(&path));

        let pcap = export_pcap(&rec).unwrap();
        let cap = parse_pcap(&pcap, 50123);
        assert_eq!(cap.client, client_bytes.concat(), "{client}");
        assert_eq!(cap.server, server_bytes.concat(), "{client}");
        let flags: Vec<u8> = cap.flags.iter().map(|f| f.1).collect();
        assert_eq!(&flags[..3], &[0x02, 0x12, 0x10], "handshake");
        assert_eq!(
            &flags[flags.len() - 3..],
            &[0x11, 0x11, 0x10],
            "FIN exchange"
        );
        assert!(cap.flags[0].0, "the client sends the SYN");
        // 200000 bytes in 64 KiB events: 65000, 536, 65000, 536, ... segments.
        assert!(flags.iter().filter(|f| **f == 0x18).count() >= 2 + 3 + 4);
        // Timed from the header's start plus the recorder's monotonic
        // offsets, which are real elapsed time (more than a millisecond on
        // a loaded machine).
        let start_ms = 1_741_086_000_123;
        assert!(
            (start_ms..start_ms + 10_000).contains(&(cap.first_ts_us / 1000)),
            "timed from the header: {}",
            cap.first_ts_us
        );

        // The other readings of the same events.
        let show = render_transcript(&rec, false);
        assert!(show.contains("14 bytes from client"), "{show}");
        assert!(show.contains("1 bytes from server"), "{show}");
        let jsonl = export_jsonl(&rec);
        let raw_line: serde_json::Value = jsonl
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["event"]["type"] == "raw")
            .unwrap();
        assert_eq!(raw_line["event"]["dir"], "client");
        assert_eq!(raw_line["event"]["data"], "AAAACATSFi8=");
    }
}

#[test]
fn a_recording_without_raw_bytes_has_no_pcap() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, path) = record_session(tmp.path(), Fsync::OnClose);
    let rec = read_recording(&path).unwrap();
    let err = export_pcap(&rec).unwrap_err();
    assert_eq!(err, PcapError::NoRawBytes);
    assert!(err.to_string().contains("set record_raw = true"));
}

#[test]
fn raw_events_beyond_the_queued_byte_budget_are_lost_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, handle) = Recorder::start(RecorderSettings {
        on_overflow: OnOverflow::CountLost,
        ..settings(tmp.path(), Fsync::OnClose)
    })
    .unwrap();
    let info = info("orders-prod", "runner", None);
    sink.emit(&SessionEvent::Started(Arc::clone(&info)));
    // 64 MiB of raw data at once: far more than the writer drains meanwhile.
    let chunk: Arc<[u8]> = Arc::from(vec![0u8; 64 * 1024]);
    for _ in 0..2048 {
        sink.emit(&SessionEvent::Raw {
            session: info.id,
            dir: crate::events::RawDirection::Server,
            data: Arc::clone(&chunk),
        });
    }
    let report = handle.shutdown();
    // Whatever did not fit is counted, never dropped silently.
    let rec = read_recording(session_path(tmp.path(), info.id, info.started_at)).unwrap();
    let raws = rec
        .events()
        .filter(|e| matches!(e.event, Event::Raw { .. }))
        .count() as u64;
    assert_eq!(raws + report.lost, 2048, "lost {}", report.lost);
    assert_eq!(rec.lost(), report.lost);
}

/// Statements are written from the session's event, borrowed; the bytes
/// must be those of the owned record the reader decodes, or chains written
/// and chains recomputed by tools would differ.
#[test]
fn a_statement_written_borrowed_encodes_as_the_owned_record() {
    let id = Uuid::now_v7();
    let long = format!("select '{}'", "é".repeat(MAX_TEXT_LEN));
    for event in [
        statement(id, "select 1", Action::Allow, None),
        statement(id, "drop table orders", Action::Deny, Some("no-drops")),
        statement(id, &long, Action::Audit, Some("audit-all")),
        unparsable_statement(id),
    ] {
        let SessionEvent::Statement(s) = &event else {
            unreachable!("statement() makes statements")
        };
        let borrowed = encode_frame(&RecordOut::Event(EventRecordOut {
            seq: 7,
            t_us: 99,
            prev: "ab12",
            event: &writer::statement_out(s),
        }))
        .unwrap();
        let cut = s.text.len() > MAX_TEXT_LEN;
        let mut end = MAX_TEXT_LEN.min(s.text.len());
        while !s.text.is_char_boundary(end) {
            end -= 1;
        }
        let owned = encode_frame(&Record::Event(EventRecord {
            seq: 7,
            t_us: 99,
            prev: "ab12".into(),
            event: Event::Statement(StatementRecord {
                text: s.text[..end].to_string(),
                text_len: cut.then_some(s.text.len() as u64),
                command: s.command.to_string(),
                kind: s.kind.map(|k| k.as_str().to_string()),
                fingerprint: s.fingerprint.as_deref().map(str::to_string),
                action: s.action.as_str().to_string(),
                refused: s.action.is_refused(),
                rule: s.rule.as_deref().map(str::to_string),
                rules: s.rules.iter().map(|r| r.to_string()).collect(),
                reason: s.reason.to_string(),
            }),
        }))
        .unwrap();
        assert_eq!(borrowed, owned, "{}", s.text);
        assert_eq!(cut, s.text == long);
    }
}

/// The records of a file, decoded as they are stored (no repeat resolved).
fn stored_records(bytes: &[u8]) -> Vec<Record> {
    let mut start = 0;
    boundaries(bytes)
        .into_iter()
        .map(|end| {
            let record = decode_body(&bytes[start + PREFIX_LEN..end]).unwrap();
            start = end;
            record
        })
        .collect()
}

#[test]
fn the_same_statement_event_again_is_stored_as_a_repeat_and_read_as_the_statement() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, handle) = Recorder::start(settings(tmp.path(), Fsync::OnClose)).unwrap();
    let info = info("orders-prod", "runner", None);
    let id = info.id;
    let point = statement(id, "SELECT c FROM sbtest1 WHERE id=?", Action::Allow, None);
    let denied = statement(
        id,
        "SELECT * FROM secrets",
        Action::Deny,
        Some("no-secrets"),
    );
    let closed = session_events(&info).pop().unwrap();
    for event in [
        SessionEvent::Started(Arc::clone(&info)),
        point.clone(),
        denied.clone(),
        point.clone(),
        denied,
        point,
        closed,
    ] {
        sink.emit(&event);
    }
    assert_eq!(handle.shutdown().lost, 0);
    let path = session_path(tmp.path(), id, info.started_at);
    let bytes = std::fs::read(&path).unwrap();

    let stored: Vec<Event> = stored_records(&bytes)
        .into_iter()
        .filter_map(|r| match r {
            Record::Event(e) => Some(e.event),
            _ => None,
        })
        .collect();
    assert!(matches!(&stored[0], Event::Statement(s) if s.text.contains("sbtest1")));
    assert!(matches!(&stored[1], Event::Statement(s) if s.refused));
    assert_eq!(
        stored[2..5],
        [
            Event::StatementAgain { of: 0 },
            Event::StatementAgain { of: 1 },
            Event::StatementAgain { of: 0 }
        ]
    );

    let rec = read_recording(&path).unwrap();
    let texts: Vec<(&str, bool)> = rec
        .events()
        .filter_map(|e| match &e.event {
            Event::Statement(s) => Some((s.text.as_str(), s.refused)),
            _ => None,
        })
        .collect();
    let (point, secrets) = (
        ("SELECT c FROM sbtest1 WHERE id=?", false),
        ("SELECT * FROM secrets", true),
    );
    assert_eq!(texts, [point, secrets, point, secrets, point]);
    assert_eq!((rec.statements(), rec.denied()), (5, 2));
    let report = verify_from(Cursor::new(&bytes), &path, Some(id), &[]);
    assert!(report.ok() && report.complete, "{report}");

    // A repeat of a record that is not an earlier statement is corrupt,
    // to the reader and to verify.
    let mut records = stored_records(&bytes);
    if let Record::Event(e) = &mut records[3] {
        e.event = Event::StatementAgain { of: 5 };
    }
    let forged = rechain(&records);
    let name = Path::new("forged.tgrec");
    match read_from(Cursor::new(&forged), name) {
        Err(ReadError::BadRepeat { of: 5, .. }) => {}
        other => panic!("{other:?}"),
    }
    let report = verify_from(Cursor::new(&forged), name, Some(id), &[]);
    assert!(!report.ok(), "{report}");
    assert!(
        report
            .to_string()
            .contains("names seq 5, which is not an earlier statement record"),
        "{report}"
    );
}
