//! The recorder's cost per event:
//!
//! - `recorder/emit_statement`: what a session pays to hand one statement
//!   event to a running recorder (copy, timestamp, queue send). This is the
//!   only recorder cost on the session's path.
//! - `recorder/encode_and_hash_statement`: what the writer thread pays to
//!   encode one statement record as a frame and hash it for the chain.
//! - `recorder/write_statement_end_to_end`: emit until the writer has taken
//!   every event: encode, hash, buffered write, flushed per batch.
//!
//! Run: `cargo bench -p tollgate-agent --bench recorder`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use uuid::Uuid;

use tollgate_agent::config::Protocol;
use tollgate_agent::events::{
    Arrival, CloseReason, EventSink, SessionEvent, SessionInfo, StatementEvent,
};
use tollgate_agent::identity::ProcessIdentity;
use tollgate_agent::policy::Action;
use tollgate_agent::recording::codec::{encode_frame, frame_hash};
use tollgate_agent::recording::format::{EventRecord, Record, StatementRecord};
use tollgate_agent::recording::{
    session_path, Event, Fsync, Recorder, RecorderSettings, RecordingSink,
};
use tollgate_agent::sql::StatementKind;

/// Events per timed run; under the queue's capacity, so nothing is lost
/// and the sink is measured on its normal path, not the overflow path.
const CHUNK: u64 = 4096;
const QUEUE: usize = 1 << 16;

const TEXT: &str = "select o.id, o.total, c.email from orders o join customers c on c.id = o.customer_id where o.id = 4242";

fn info() -> Arc<SessionInfo> {
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
    Arc::new(SessionInfo {
        id: Uuid::now_v7(),
        started_at: SystemTime::now(),
        arrival: Arrival::Listener,
        local: addr("127.0.0.1:15432"),
        client: addr("127.0.0.1:50000"),
        target: "orders-db".to_string(),
        protocol: Protocol::Postgres,
        upstream: "10.0.0.5:5432".to_string(),
        identity: ProcessIdentity {
            pid: Some(4242),
            uid: Some(1001),
            user: Some("runner".to_string()),
            comm: Some("psql".to_string()),
            exe: Some("/usr/bin/psql".to_string()),
            ..ProcessIdentity::default()
        },
        kernel: None,
        job: None,
    })
}

fn statement(session: Uuid) -> SessionEvent {
    SessionEvent::Statement(Arc::new(StatementEvent {
        session,
        text: TEXT.to_string(),
        command: "SELECT".into(),
        kind: Some(StatementKind::Select),
        fingerprint: Some("a1b2c3d4e5f60718".into()),
        action: Action::Allow,
        refused: false,
        rule: Some("allow-reads".into()),
        rules: vec!["allow-reads".into()],
        reason: "rule \"allow-reads\" (allow)".into(),
    }))
}

fn wait_drained(sink: &RecordingSink) {
    while sink.queued() > 0 {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Runs `iters` statement events through `sink` in chunks, each chunk in a
/// fresh session whose file is removed afterwards (so the disk holds one
/// chunk at most). Times the emits alone, or with `until_drained` until
/// the writer has taken every event.
fn run(sink: &RecordingSink, dir: &Path, iters: u64, until_drained: bool) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CHUNK);
        let session = info();
        sink.emit(&SessionEvent::Started(session.clone()));
        wait_drained(sink);
        let events: Vec<SessionEvent> = (0..n).map(|_| statement(session.id)).collect();
        let began = Instant::now();
        for e in &events {
            sink.emit(black_box(e));
        }
        if until_drained {
            wait_drained(sink);
        }
        total += began.elapsed();
        sink.emit(&SessionEvent::Closed {
            session: session.id,
            bytes_from_client: 0,
            bytes_from_upstream: 0,
            duration: Duration::from_secs(1),
            reason: CloseReason::Completed,
        });
        wait_drained(sink);
        // The trailer is written right after the close is taken.
        let path = session_path(dir, session.id, session.started_at);
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_file(&path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
        left -= n;
    }
    total
}

fn recorder(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let settings = RecorderSettings {
        fsync: Fsync::OnClose,
        queue_capacity: QUEUE,
        ..RecorderSettings::new(tmp.path())
    };
    let (sink, handle) = Recorder::start(settings).unwrap();

    let mut group = c.benchmark_group("recorder");
    group.throughput(Throughput::Elements(1));
    group.bench_function("emit_statement", |b| {
        b.iter_custom(|iters| run(&sink, tmp.path(), iters, false))
    });
    group.bench_function("write_statement_end_to_end", |b| {
        b.iter_custom(|iters| run(&sink, tmp.path(), iters, true))
    });

    let record = Record::Event(EventRecord {
        seq: 1234,
        t_us: 5_678_901,
        prev: "ab".repeat(32),
        event: Event::Statement(StatementRecord {
            text: TEXT.to_string(),
            text_len: None,
            command: "SELECT".to_string(),
            kind: Some("select".to_string()),
            fingerprint: Some("a1b2c3d4e5f60718".to_string()),
            action: "allow".to_string(),
            refused: false,
            rule: Some("allow-reads".to_string()),
            rules: vec!["allow-reads".to_string()],
            reason: "rule \"allow-reads\" (allow)".to_string(),
        }),
    });
    group.bench_function("encode_and_hash_statement", |b| {
        b.iter(|| {
            let frame = encode_frame(black_box(&record)).unwrap();
            black_box(frame_hash(&frame))
        })
    });
    group.finish();

    let report = handle.shutdown();
    assert_eq!(
        report.lost, 0,
        "events were lost: the numbers above include the overflow path"
    );
    assert_eq!(report.failure, None);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .measurement_time(Duration::from_secs(4));
    targets = recorder
}
criterion_main!(benches);
