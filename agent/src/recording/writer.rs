//! The recorder: a non-blocking [`EventSink`] in front of a bounded queue,
//! and one writer thread that owns every open recording file.
//!
//! Sessions never wait for the disk: [`RecordingSink::emit`] copies the
//! event into the queue with `try_send` and returns. When the queue is full
//! or the writer cannot write, the event is counted in
//! [`RecordingSink::lost`], marked in the affected recording by an
//! `events_lost` record where the file is still writable, and the failure is
//! latched in [`RecordingSink::failure`] for the proxy to act on.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use uuid::Uuid;

use super::codec::{encode_frame, encode_frame_into, frame_hash, frame_hash_into};
use super::format::{
    CloseRecord, Event, EventRecordOut, Header, KernelRecord, Record, RecordOut, StatementOut,
    StatementRecordOut, Trailer, FILE_EXTENSION, FORMAT_NAME, FORMAT_VERSION, MAX_TEXT_LEN,
};
use super::signing::SigningKey;
use crate::events::{EventSink, ReviewUpdate, SessionEvent, SessionInfo, StatementEvent};
use crate::sql::StatementKind;

/// Raw bytes (`record_raw` sessions) the queue may hold: past this, raw
/// events overflow like a full queue, so memory stays bounded (the queue
/// alone could hold 16384 events of 64 KiB, 1 GiB).
const MAX_QUEUED_RAW_BYTES: u64 = 64 << 20;

/// Most messages handled before the writer flushes.
const BATCH: usize = 512;

/// How long the writer waits after a batch before it looks at the queue
/// again (unless every event is synced). While the writer is not blocked on
/// the queue, a session's send wakes no thread: under load, waking the
/// writer for every statement cost a futex wake, a context switch and a
/// write per statement, the largest part of the recorder's cost on the
/// session's path. Records reach the kernel at most this much later.
const LINGER: Duration = Duration::from_millis(5);

/// When recorded data is forced to stable storage. Every batch is flushed
/// to the kernel whatever the policy, so a killed agent loses at most the
/// batch in flight; `fsync` protects against power loss. Interval and
/// on-close syncs run on a thread of their own, so a slow disk delays them,
/// not the recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// After every record.
    EveryEvent,
    /// At most this long after a record is written, and at close.
    Interval(Duration),
    /// When the session's recording is closed.
    OnClose,
}

/// What happens when an event cannot be recorded (queue full).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnOverflow {
    /// Latch the failure: [`RecordingSink::refuse_new_sessions`] becomes
    /// true and the proxy refuses new sessions.
    #[default]
    FailClosed,
    /// Keep serving; count the lost events (and mark them in the recording).
    CountLost,
}

/// How the recorder runs.
#[derive(Debug, Clone)]
pub struct RecorderSettings {
    /// The recording directory; files go to `<dir>/YYYY/MM/DD/<id>.tgrec`.
    pub dir: PathBuf,
    /// The durability policy.
    pub fsync: Fsync,
    /// Events the queue holds before it overflows (at least 1).
    pub queue_capacity: usize,
    /// What an overflow does.
    pub on_overflow: OnOverflow,
    /// Host name written in headers.
    pub host: String,
    /// Agent version written in headers.
    pub agent_version: String,
    /// Digest of the policy in force, written in headers (see also
    /// [`RecordingSink::set_policy_digest`]).
    pub policy_digest: Option<String>,
    /// The key every trailer is signed with, when configured.
    pub signing_key: Option<Arc<SigningKey>>,
}

impl RecorderSettings {
    /// Defaults: fsync every second, 16384 queued events, fail closed, the
    /// host name from `/proc/sys/kernel/hostname` and this crate's version.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".to_string());
        Self {
            dir: dir.into(),
            fsync: Fsync::Interval(Duration::from_secs(1)),
            // About a second of statements from a busy host, so that a
            // scheduling hiccup under load is not a recording failure.
            queue_capacity: 16384,
            on_overflow: OnOverflow::FailClosed,
            host,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            policy_digest: None,
            signing_key: None,
        }
    }
}

/// Starts the recorder.
#[derive(Debug)]
pub struct Recorder;

impl Recorder {
    /// Creates the recording directory, starts the writer thread and returns
    /// the sink to add to the event fan-out and the handle that stops it.
    pub fn start(settings: RecorderSettings) -> io::Result<(Arc<RecordingSink>, RecorderHandle)> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&settings.dir)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create recording directory {}: {e}",
                        settings.dir.display()
                    ),
                )
            })?;
        let capacity = settings.queue_capacity.max(1);
        let (tx, rx) = mpsc::sync_channel(capacity);
        let shared = Arc::new(RecorderState {
            lost: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            policy_digest: Mutex::new(settings.policy_digest.as_deref().map(Arc::from)),
            on_overflow: settings.on_overflow,
            capacity,
            queued: AtomicU64::new(0),
            raw_queued: AtomicU64::new(0),
            writing: Mutex::new(HashSet::new()),
            signing_key_id: settings
                .signing_key
                .as_ref()
                .map(|k| k.public_key().key_id()),
            spool_full: Mutex::new(None),
        });
        let writer = Writer {
            rx,
            shared: Arc::clone(&shared),
            dir: settings.dir,
            fsync: settings.fsync,
            host: settings.host,
            agent_version: settings.agent_version,
            signing_key: settings.signing_key,
            open: HashMap::new(),
            last_sync: Instant::now(),
            dirs_unsynced: BTreeSet::new(),
            day_made: None,
            syncer: Syncer::start(Arc::clone(&shared))?,
            frame: Vec::with_capacity(1024),
        };
        let thread = std::thread::Builder::new()
            .name("tollgate-recorder".to_string())
            .spawn(move || writer.run())?;
        let sink = Arc::new(RecordingSink {
            tx: tx.clone(),
            shared: Arc::clone(&shared),
        });
        let handle = RecorderHandle {
            tx,
            thread: Some(thread),
            shared,
        };
        Ok((sink, handle))
    }
}

enum Msg {
    Event {
        at: Instant,
        event: SessionEvent,
        policy_digest: Option<Arc<str>>,
    },
    /// Events emitted together ([`RecordingSink::emit_all`]): one queue
    /// slot and at most one wake-up of the writer for all of them.
    Events {
        at: Instant,
        events: Vec<SessionEvent>,
    },
    Shutdown,
}

#[derive(Debug, Default)]
struct PendingLoss {
    count: u64,
    closed: bool,
}

/// What the recorder's handle, its writer thread and its sync thread share:
/// losses, the failure, and the queue's limits.
struct RecorderState {
    lost: AtomicU64,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    /// Events lost in the queue, per session, until the writer marks them.
    pending: Mutex<HashMap<Uuid, PendingLoss>>,
    policy_digest: Mutex<Option<Arc<str>>>,
    on_overflow: OnOverflow,
    capacity: usize,
    /// Messages in the queue (sent, not yet taken by the writer).
    queued: AtomicU64,
    /// Bytes of raw events in the queue.
    raw_queued: AtomicU64,
    /// Sessions whose files the writer has open (or is creating): retention
    /// never removes these.
    writing: Mutex<HashSet<Uuid>>,
    /// The signing key's id, when trailers are signed.
    signing_key_id: Option<String>,
    /// Why new sessions are refused while the upload spool is full.
    spool_full: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RecorderState {
    /// Latches the first failure and logs every new one once.
    fn fail(&self, reason: String) {
        let mut slot = lock(&self.failure);
        if slot.is_none() {
            tracing::error!(reason = %reason, "session recording failed: {reason}");
            *slot = Some(reason);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    fn count_lost(&self, n: u64) {
        self.lost.fetch_add(n, Ordering::SeqCst);
    }

    /// An event that never reached the writer.
    fn lose_queued(&self, event: &SessionEvent, why: Overflow) {
        let first = self.lost.fetch_add(1, Ordering::SeqCst) == 0;
        {
            let mut pending = lock(&self.pending);
            let entry = pending.entry(session_of(event)).or_default();
            entry.count += 1;
            entry.closed |= matches!(event, SessionEvent::Closed { .. });
        }
        let full = match why {
            Overflow::Stopped => {
                self.fail("the recorder is stopped; events are no longer recorded".to_string());
                return;
            }
            Overflow::Events => format!("recording queue full ({} events)", self.capacity),
            Overflow::RawBytes => {
                format!("recording queue full ({MAX_QUEUED_RAW_BYTES} bytes of raw data)")
            }
        };
        if self.on_overflow == OnOverflow::FailClosed {
            self.fail(format!("{full}: the recorder cannot keep up with the disk"));
        } else if first {
            tracing::warn!(
                capacity = self.capacity,
                "{full}: events are being lost (counted in recording_events_lost)"
            );
        }
    }

    fn take_pending(&self, id: &Uuid) -> Option<PendingLoss> {
        lock(&self.pending).remove(id)
    }
}

/// Why an event did not reach the writer.
#[derive(Debug, Clone, Copy)]
enum Overflow {
    /// The queue holds `queue_capacity` events.
    Events,
    /// The queue holds [`MAX_QUEUED_RAW_BYTES`] of raw data.
    RawBytes,
    /// The writer is gone.
    Stopped,
}

/// Bytes of raw data an event carries (0 for all but raw events).
fn raw_len(event: &SessionEvent) -> u64 {
    match event {
        SessionEvent::Raw { data, .. } => data.len() as u64,
        _ => 0,
    }
}

fn session_of(event: &SessionEvent) -> Uuid {
    match event {
        SessionEvent::Started(info) => info.id,
        SessionEvent::UpstreamConnected { session, .. }
        | SessionEvent::Startup { session, .. }
        | SessionEvent::Raw { session, .. }
        | SessionEvent::ExeHashed { session, .. }
        | SessionEvent::Review { session, .. }
        | SessionEvent::Intervention { session, .. }
        | SessionEvent::Job { session, .. }
        | SessionEvent::ChannelExit { session, .. }
        | SessionEvent::Sftp { session, .. }
        | SessionEvent::Closed { session, .. } => *session,
        SessionEvent::Statement(statement) => statement.session,
    }
}

/// Why the recorder makes the proxy refuse new sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionRefusal {
    /// Recording failed (fail closed), in words.
    RecordingFailed(String),
    /// The upload spool is full, in words.
    SpoolFull(String),
}

/// The event sink that records sessions. `emit` never blocks.
pub struct RecordingSink {
    tx: SyncSender<Msg>,
    shared: Arc<RecorderState>,
}

impl std::fmt::Debug for RecordingSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingSink")
            .field("lost", &self.lost())
            .field("failure", &self.failure())
            .finish()
    }
}

impl RecordingSink {
    /// Events not recorded since start (queue full, write errors, recorder
    /// stopped). Never decreases.
    pub fn lost(&self) -> u64 {
        self.shared.lost.load(Ordering::SeqCst)
    }

    /// Whether recording has failed (latched until restart).
    pub fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::SeqCst)
    }

    /// The first failure, in words, once [`failed`](Self::failed).
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.failure).clone()
    }

    /// Whether the proxy must refuse new sessions: recording failed and the
    /// policy is [`OnOverflow::FailClosed`], or the upload spool is full
    /// (whatever the policy: the spool's bound is kept by refusing, never
    /// by dropping recordings).
    pub fn refuse_new_sessions(&self) -> bool {
        (self.failed() && self.shared.on_overflow == OnOverflow::FailClosed)
            || lock(&self.shared.spool_full).is_some()
    }

    /// Why new sessions are refused, when they are.
    pub fn refusal(&self) -> Option<SessionRefusal> {
        if self.failed() && self.shared.on_overflow == OnOverflow::FailClosed {
            return Some(SessionRefusal::RecordingFailed(
                self.failure().unwrap_or_default(),
            ));
        }
        lock(&self.shared.spool_full)
            .clone()
            .map(SessionRefusal::SpoolFull)
    }

    /// Why new sessions are refused for a full upload spool, while it is.
    pub fn spool_full(&self) -> Option<String> {
        lock(&self.shared.spool_full).clone()
    }

    /// Marks the upload spool full (`Some(why)`: new sessions are refused)
    /// or no longer full (`None`).
    pub fn set_spool_full(&self, why: Option<String>) {
        *lock(&self.shared.spool_full) = why;
    }

    /// Whether open sessions must end (as [`refuse_new_sessions`](Self::refuse_new_sessions)),
    /// with a relaxed load: sessions ask before every statement.
    pub fn sessions_must_end(&self) -> bool {
        self.shared.on_overflow == OnOverflow::FailClosed
            && self.shared.failed.load(Ordering::Relaxed)
    }

    /// Sets the policy digest written in the headers of sessions started
    /// from now on (after a policy reload).
    pub fn set_policy_digest(&self, digest: Option<String>) {
        *lock(&self.shared.policy_digest) = digest.map(Arc::from);
    }

    /// Events waiting in the queue for the writer.
    pub fn queued(&self) -> u64 {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// Whether the writer has session `id`'s file open (or is creating
    /// it): such a file must not be removed.
    pub fn is_writing(&self, id: &Uuid) -> bool {
        lock(&self.shared.writing).contains(id)
    }

    /// Every session whose file the writer has open now.
    pub fn writing_now(&self) -> HashSet<Uuid> {
        lock(&self.shared.writing).clone()
    }

    /// The id of the key trailers are signed with, when one is configured.
    pub fn signing_key_id(&self) -> Option<&str> {
        self.shared.signing_key_id.as_deref()
    }

    /// Emits `events` in order as one message: for many events from one
    /// place at once (a drain of the kernel's job events), so that they
    /// cost the writer one wake-up instead of one each. Session starts
    /// among them go through [`EventSink::emit`] on their own, in order.
    pub fn emit_all(&self, events: Vec<SessionEvent>) {
        if events.is_empty() {
            return;
        }
        if events.iter().any(|e| matches!(e, SessionEvent::Started(_))) {
            for event in &events {
                self.emit(event);
            }
            return;
        }
        let raw: u64 = events.iter().map(raw_len).sum();
        if raw > 0 {
            let before = self.shared.raw_queued.fetch_add(raw, Ordering::Relaxed);
            if before.saturating_add(raw) > MAX_QUEUED_RAW_BYTES {
                self.shared.raw_queued.fetch_sub(raw, Ordering::Relaxed);
                for event in &events {
                    self.shared.lose_queued(event, Overflow::RawBytes);
                }
                return;
            }
        }
        let count = events.len() as u64;
        self.shared.queued.fetch_add(count, Ordering::Relaxed);
        let sent = self.tx.try_send(Msg::Events {
            at: Instant::now(),
            events,
        });
        let (events, why) = match sent {
            Ok(()) => return,
            Err(TrySendError::Full(msg)) => (msg, Overflow::Events),
            Err(TrySendError::Disconnected(msg)) => (msg, Overflow::Stopped),
        };
        self.shared.queued.fetch_sub(count, Ordering::Relaxed);
        self.shared.raw_queued.fetch_sub(raw, Ordering::Relaxed);
        if let Msg::Events { events, .. } = events {
            for event in &events {
                self.shared.lose_queued(event, why);
            }
        }
    }
}

impl EventSink for RecordingSink {
    fn emit(&self, event: &SessionEvent) {
        let policy_digest = match event {
            SessionEvent::Started(_) => lock(&self.shared.policy_digest).clone(),
            _ => None,
        };
        let raw = raw_len(event);
        if raw > 0 {
            let before = self.shared.raw_queued.fetch_add(raw, Ordering::Relaxed);
            if before.saturating_add(raw) > MAX_QUEUED_RAW_BYTES {
                self.shared.raw_queued.fetch_sub(raw, Ordering::Relaxed);
                self.shared.lose_queued(event, Overflow::RawBytes);
                return;
            }
        }
        // A session's recording counts as open from the moment its start
        // is queued, not when the writer gets to it: an event emitted for
        // it from elsewhere meanwhile (a review notification's result) is
        // recorded, not dropped (see `Events::records_session`).
        let started = match event {
            SessionEvent::Started(info) => {
                lock(&self.shared.writing).insert(info.id);
                Some(info.id)
            }
            _ => None,
        };
        let msg = Msg::Event {
            at: Instant::now(),
            event: event.clone(),
            policy_digest,
        };
        // Counted before the send so the writer's decrement never comes
        // first; undone when the send fails.
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        let sent = self.tx.try_send(msg);
        if sent.is_err() {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            self.shared.raw_queued.fetch_sub(raw, Ordering::Relaxed);
            if let Some(id) = started {
                lock(&self.shared.writing).remove(&id);
            }
        }
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.shared.lose_queued(event, Overflow::Events),
            Err(TrySendError::Disconnected(_)) => self.shared.lose_queued(event, Overflow::Stopped),
        }
    }
}

/// What [`RecorderHandle::shutdown`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Events lost over the recorder's life.
    pub lost: u64,
    /// The first failure, if recording failed.
    pub failure: Option<String>,
}

/// Stops the writer. Dropping the handle also stops it.
pub struct RecorderHandle {
    tx: SyncSender<Msg>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<RecorderState>,
}

impl std::fmt::Debug for RecorderHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecorderHandle")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl RecorderHandle {
    /// Writes what is queued, ends open recordings with a
    /// `recording_stopped` ("agent shutdown") record and a trailer, syncs
    /// and closes every file, and waits for the writer thread. Events
    /// emitted afterwards are counted as lost.
    pub fn shutdown(mut self) -> ShutdownReport {
        self.stop();
        ShutdownReport {
            lost: self.shared.lost.load(Ordering::SeqCst),
            failure: lock(&self.shared.failure).clone(),
        }
    }

    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            // A blocking send: waits for queue space, never for long since
            // the writer is draining it.
            let _ = self.tx.send(Msg::Shutdown);
            if thread.join().is_err() {
                self.shared
                    .fail("the recorder's writer thread panicked".to_string());
            }
        }
    }
}

impl Drop for RecorderHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One open recording.
struct SessionFile {
    path: PathBuf,
    out: BufWriter<File>,
    start: Instant,
    next_seq: u64,
    last_t_us: u64,
    prev: String,
    statements: u64,
    denied: u64,
    lost: u64,
    dirty: bool,
    unsynced: bool,
    /// Records (the header counts as one: it stands for the start event)
    /// handed to the buffer since the last successful flush: lost if the
    /// file fails now.
    unconfirmed: u64,
    /// Statement events written whole, by address, with their seq: the
    /// same event again (a session reports the events of a prepared
    /// statement's first execution for each later one under the same
    /// decisions) is written as a `statement_again` record naming it. The
    /// event is kept, so its address is not reused while it is here.
    written: HashMap<usize, (Arc<StatementEvent>, u64)>,
    /// The bytes of text the events in `written` hold.
    written_text: usize,
}

/// Statement events a file remembers for `statement_again` records, and
/// their text: past either, it forgets them all and starts again, so a
/// session of many large statements keeps none of them alive here.
const REPEATS_KEPT: usize = 128;
const REPEATS_TEXT: usize = 32 * 1024;

struct Writer {
    rx: Receiver<Msg>,
    shared: Arc<RecorderState>,
    dir: PathBuf,
    fsync: Fsync,
    host: String,
    agent_version: String,
    signing_key: Option<Arc<SigningKey>>,
    open: HashMap<Uuid, SessionFile>,
    last_sync: Instant,
    /// Date directories with new entries not yet synced (interval policy):
    /// each is synced once at the next interval, not once per new file.
    dirs_unsynced: BTreeSet<PathBuf>,
    /// The date directory made last (new files go there for a whole day).
    day_made: Option<PathBuf>,
    /// Forces data to disk off the writer's path (see [`Syncer`]).
    syncer: Syncer,
    /// The frame being written, one buffer for every record.
    frame: Vec<u8>,
}

impl Writer {
    fn run(mut self) {
        loop {
            let first = match self.fsync {
                Fsync::Interval(every) => {
                    let wait = every.saturating_sub(self.last_sync.elapsed());
                    match self.rx.recv_timeout(wait) {
                        Ok(m) => Some(m),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => Some(Msg::Shutdown),
                    }
                }
                _ => Some(self.rx.recv().unwrap_or(Msg::Shutdown)),
            };
            let mut stop = false;
            let mut handled = 0;
            let mut next = first;
            while let Some(msg) = next {
                handled += 1;
                if self.handle(msg) {
                    stop = true;
                    break;
                }
                next = if handled < BATCH {
                    self.rx.try_recv().ok()
                } else {
                    None
                };
            }
            self.mark_losses();
            self.flush_all();
            if let Fsync::Interval(every) = self.fsync {
                if self.last_sync.elapsed() >= every {
                    self.sync_all();
                }
            }
            // A full batch means more is queued: go on at once, or the
            // linger would cap the writer at BATCH events per LINGER.
            if handled > 0 && handled < BATCH && !stop && self.fsync != Fsync::EveryEvent {
                std::thread::sleep(LINGER);
            }
            if stop {
                self.close_all("agent shutdown");
                self.sync_all();
                // Whatever was queued behind the shutdown is lost: count it.
                while let Ok(msg) = self.rx.try_recv() {
                    let events = match msg {
                        Msg::Event { event, .. } => vec![event],
                        Msg::Events { events, .. } => events,
                        Msg::Shutdown => Vec::new(),
                    };
                    for event in &events {
                        self.shared
                            .raw_queued
                            .fetch_sub(raw_len(event), Ordering::Relaxed);
                        self.shared.lose_queued(event, Overflow::Stopped);
                    }
                }
                return;
            }
        }
    }

    /// Handles one message; true to stop.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Shutdown => return true,
            Msg::Event {
                at,
                event,
                policy_digest,
            } => self.handle_event(at, event, policy_digest),
            Msg::Events { at, events } => {
                for event in events {
                    self.handle_event(at, event, None);
                }
            }
        }
        false
    }

    /// Records one event taken off the queue.
    fn handle_event(&mut self, at: Instant, event: SessionEvent, digest: Option<Arc<str>>) {
        self.shared.queued.fetch_sub(1, Ordering::Relaxed);
        self.shared
            .raw_queued
            .fetch_sub(raw_len(&event), Ordering::Relaxed);
        let id = session_of(&event);
        if let SessionEvent::Started(info) = &event {
            if self.open.contains_key(&id) {
                self.shared.count_lost(1);
                tracing::warn!(session = %id, "recording: duplicate session start ignored");
            } else {
                self.open_session(info, at, digest.as_deref());
            }
            return;
        }
        if !self.open.contains_key(&id) {
            // Its start was lost or its file failed: already reported.
            self.shared.count_lost(1);
            return;
        }
        let closed = matches!(event, SessionEvent::Closed { .. });
        if closed {
            // Losses go in before the close so the trailer counts them.
            self.mark_session_losses(&id);
        }
        let result = match self.open.get_mut(&id) {
            Some(file) => {
                let t_us = micros(at.saturating_duration_since(file.start)).max(file.last_t_us);
                match &event {
                    SessionEvent::Statement(statement) => {
                        let address = Arc::as_ptr(statement) as usize;
                        let counts = Counts::Statement {
                            refused: statement.refused,
                        };
                        match file.written.get(&address) {
                            Some((_, of)) => {
                                let again = StatementOut::StatementAgain { of: *of };
                                write_event(file, &mut self.frame, t_us, &again, counts, self.fsync)
                            }
                            None => {
                                let text = statement.text.len();
                                if text <= REPEATS_TEXT {
                                    if file.written.len() >= REPEATS_KEPT
                                        || file.written_text + text > REPEATS_TEXT
                                    {
                                        file.written.clear();
                                        file.written_text = 0;
                                    }
                                    let seq = file.next_seq;
                                    file.written.insert(address, (Arc::clone(statement), seq));
                                    file.written_text += text;
                                }
                                write_event(
                                    file,
                                    &mut self.frame,
                                    t_us,
                                    &statement_out(statement),
                                    counts,
                                    self.fsync,
                                )
                            }
                        }
                    }
                    // Written borrowed: a job's storm of events is not
                    // copied again here.
                    SessionEvent::Job { record, .. } => write_event(
                        file,
                        &mut self.frame,
                        t_us,
                        &**record,
                        Counts::Emitted,
                        self.fsync,
                    ),
                    other => match event_body(other) {
                        Some(body) => write_event(
                            file,
                            &mut self.frame,
                            t_us,
                            &body,
                            Counts::Emitted,
                            self.fsync,
                        ),
                        None => Ok(()),
                    },
                }
            }
            None => {
                self.shared.count_lost(1);
                return;
            }
        };
        if let Err(e) = result {
            // The event is among the file's unconfirmed records: counted.
            self.session_failed(&id, &e);
            return;
        }
        if closed {
            self.finish(&id);
        }
    }

    fn open_session(&mut self, info: &SessionInfo, at: Instant, digest: Option<&str>) {
        let path = session_path(&self.dir, info.id, info.started_at);
        // Marked before the file exists, so retention, which lists files
        // first and then asks, never sees a new file unmarked.
        lock(&self.shared.writing).insert(info.id);
        match self.create(info, &path, at, digest) {
            Ok(file) => {
                self.open.insert(info.id, file);
            }
            Err(e) => {
                lock(&self.shared.writing).remove(&info.id);
                self.shared.count_lost(1);
                self.shared.fail(format!(
                    "cannot create recording {}: {e}; check that the recording directory is writable and the disk has space",
                    path.display()
                ));
            }
        }
    }

    fn create(
        &mut self,
        info: &SessionInfo,
        path: &Path,
        at: Instant,
        digest: Option<&str>,
    ) -> io::Result<SessionFile> {
        let day = path.parent().unwrap_or(&self.dir);
        let open = |make_dir: bool| {
            if make_dir {
                DirBuilder::new().recursive(true).mode(0o750).create(day)?;
            }
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o640)
                .open(path)
        };
        // The date directory is made once a day, not for every file. If it
        // is gone (retention removes an empty one, at a day's turn), make
        // it and try once more.
        let made = self.day_made.as_deref() == Some(day);
        let file = match open(!made) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => open(true)?,
            other => other?,
        };
        if !made {
            self.day_made = Some(day.to_path_buf());
        }
        match self.fsync {
            Fsync::EveryEvent => sync_dir(day)?,
            Fsync::Interval(_) => {
                if !self.dirs_unsynced.contains(day) {
                    self.dirs_unsynced.insert(day.to_path_buf());
                }
            }
            Fsync::OnClose => {}
        }
        let header = Record::Header(Box::new(header_of(
            info,
            &self.host,
            &self.agent_version,
            digest,
        )));
        let frame = encode_frame(&header).map_err(io::Error::other)?;
        let mut out = BufWriter::with_capacity(64 * 1024, file);
        out.write_all(&frame)?;
        let mut sf = SessionFile {
            path: path.to_path_buf(),
            out,
            start: at,
            next_seq: 0,
            last_t_us: 0,
            prev: frame_hash(&frame),
            statements: 0,
            denied: 0,
            lost: 0,
            dirty: true,
            unsynced: true,
            unconfirmed: 1,
            written: HashMap::new(),
            written_text: 0,
        };
        if self.fsync == Fsync::EveryEvent {
            sync_file(&mut sf)?;
        }
        Ok(sf)
    }

    /// Writes `events_lost` for losses the sink recorded, per open session.
    fn mark_losses(&mut self) {
        let pending = std::mem::take(&mut *lock(&self.shared.pending));
        for (id, loss) in pending {
            // Sessions without an open file: counted already, nothing to mark.
            if self.open.contains_key(&id) {
                self.write_loss(&id, loss);
            }
        }
    }

    fn mark_session_losses(&mut self, id: &Uuid) {
        if let Some(loss) = self.shared.take_pending(id) {
            // The session is closing now: no `recording_stopped` needed.
            self.write_loss(
                id,
                PendingLoss {
                    closed: false,
                    ..loss
                },
            );
        }
    }

    fn write_loss(&mut self, id: &Uuid, loss: PendingLoss) {
        let Some(file) = self.open.get_mut(id) else {
            return;
        };
        let t_us = micros(file.start.elapsed()).max(file.last_t_us);
        let mut result = write_event(
            file,
            &mut self.frame,
            t_us,
            &Event::EventsLost { count: loss.count },
            Counts::Marker,
            self.fsync,
        );
        if result.is_ok() {
            file.lost += loss.count;
            if loss.closed {
                result = write_event(
                    file,
                    &mut self.frame,
                    t_us,
                    &Event::RecordingStopped {
                        reason: "close event lost (recorder queue full)".to_string(),
                    },
                    Counts::Marker,
                    self.fsync,
                );
            }
        }
        match result {
            Err(e) => self.session_failed(id, &e),
            Ok(()) if loss.closed => self.finish(id),
            Ok(()) => {}
        }
    }

    /// Writes the trailer, syncs and closes a session's file.
    fn finish(&mut self, id: &Uuid) {
        let Some(mut file) = self.open.remove(id) else {
            return;
        };
        let mut trailer = Trailer {
            prev: file.prev.clone(),
            chain_head: file.prev.clone(),
            events: file.next_seq,
            statements: file.statements,
            denied: file.denied,
            lost: file.lost,
            signature: None,
        };
        if let Some(key) = &self.signing_key {
            trailer.signature = Some(key.sign(*id, &trailer));
        }
        let trailer = Record::Trailer(trailer);
        let result = encode_frame(&trailer)
            .map_err(io::Error::other)
            .and_then(|frame| file.out.write_all(&frame))
            .and_then(|()| {
                if self.fsync == Fsync::EveryEvent {
                    sync_file(&mut file)
                } else {
                    flush_file(&mut file)?;
                    self.syncer.sync_file(&file)?;
                    if self.fsync == Fsync::OnClose {
                        if let Some(day) = file.path.parent() {
                            self.syncer.sync_dir(day);
                        }
                    }
                    Ok(())
                }
            });
        if let Err(e) = result {
            self.shared.count_lost(file.unconfirmed);
            self.shared.fail(format!(
                "cannot write recording {}: {e}; check the disk has space",
                file.path.display()
            ));
        }
        drop(file);
        lock(&self.shared.writing).remove(id);
    }

    fn close_all(&mut self, reason: &str) {
        let ids: Vec<Uuid> = self.open.keys().copied().collect();
        for id in ids {
            if let Some(loss) = self.shared.take_pending(&id) {
                self.write_loss(
                    &id,
                    PendingLoss {
                        closed: false,
                        ..loss
                    },
                );
            }
            let Some(file) = self.open.get_mut(&id) else {
                continue;
            };
            let t_us = micros(file.start.elapsed()).max(file.last_t_us);
            let stopped = Event::RecordingStopped {
                reason: reason.to_string(),
            };
            match write_event(
                file,
                &mut self.frame,
                t_us,
                &stopped,
                Counts::Marker,
                self.fsync,
            ) {
                Ok(()) => self.finish(&id),
                Err(e) => self.session_failed(&id, &e),
            }
        }
    }

    fn flush_all(&mut self) {
        let mut failed = Vec::new();
        for (id, file) in &mut self.open {
            if file.dirty {
                match file.out.flush() {
                    Ok(()) => {
                        file.dirty = false;
                        file.unconfirmed = 0;
                    }
                    Err(e) => failed.push((*id, e)),
                }
            }
        }
        for (id, e) in failed {
            self.session_failed(&id, &e);
        }
    }

    fn sync_all(&mut self) {
        let mut failed = Vec::new();
        for (id, file) in &mut self.open {
            if file.unsynced {
                let handed = flush_file(file).and_then(|()| self.syncer.sync_file(file));
                match handed {
                    Ok(()) => file.unsynced = false,
                    Err(e) => failed.push((*id, e)),
                }
            }
        }
        for (id, e) in failed {
            self.session_failed(&id, &e);
        }
        for dir in std::mem::take(&mut self.dirs_unsynced) {
            self.syncer.sync_dir(&dir);
        }
        self.last_sync = Instant::now();
    }

    /// A session's file cannot be written: drop it (what reached the disk
    /// stays readable) and latch the failure.
    fn session_failed(&mut self, id: &Uuid, e: &io::Error) {
        if let Some(file) = self.open.remove(id) {
            // What sat in the buffer never reached the file whole: count it.
            self.shared.count_lost(file.unconfirmed);
            self.shared.fail(format!(
                "cannot write recording {}: {e}; check the disk has space",
                file.path.display()
            ));
            drop(file);
            lock(&self.shared.writing).remove(id);
        }
    }
}

/// The most the writer keeps allocated for encoding between records.
const FRAME_KEEP: usize = 64 * 1024;

/// What a written record counts towards.
#[derive(Debug, Clone, Copy)]
enum Counts {
    /// An emitted event other than a statement.
    Emitted,
    /// A decided statement.
    Statement { refused: bool },
    /// The writer's own marker (lost events, recording stopped): it stands
    /// for no emitted event.
    Marker,
}

/// Writes one event record; `event` serialises as an [`Event`].
fn write_event<E: Serialize>(
    file: &mut SessionFile,
    frame: &mut Vec<u8>,
    t_us: u64,
    event: &E,
    counts: Counts,
    fsync: Fsync,
) -> io::Result<()> {
    // Counted before writing, so a failure from here on counts this event
    // among the lost.
    if !matches!(counts, Counts::Marker) {
        file.unconfirmed += 1;
    }
    let record = RecordOut::Event(EventRecordOut {
        seq: file.next_seq,
        t_us,
        prev: &file.prev,
        event,
    });
    encode_frame_into(&record, frame).map_err(io::Error::other)?;
    file.out.write_all(frame)?;
    frame_hash_into(frame, &mut file.prev);
    // A large record (raw bytes) is rare: do not keep its buffer.
    if frame.capacity() > FRAME_KEEP {
        *frame = Vec::with_capacity(FRAME_KEEP);
    }
    file.next_seq += 1;
    file.last_t_us = t_us;
    file.dirty = true;
    file.unsynced = true;
    if let Counts::Statement { refused } = counts {
        file.statements += 1;
        if refused {
            file.denied += 1;
        }
    }
    if fsync == Fsync::EveryEvent {
        sync_file(file)?;
    }
    Ok(())
}

fn sync_file(file: &mut SessionFile) -> io::Result<()> {
    flush_file(file)?;
    file.out.get_ref().sync_data()?;
    file.unsynced = false;
    Ok(())
}

/// Hands the buffer to the kernel (not to the disk).
fn flush_file(file: &mut SessionFile) -> io::Result<()> {
    file.out.flush()?;
    file.dirty = false;
    file.unconfirmed = 0;
    Ok(())
}

/// Syncs queued at most; past this the writer syncs itself (backpressure).
const SYNC_QUEUE: usize = 1024;

enum SyncJob {
    File(File, PathBuf),
    Dir(PathBuf),
}

/// A thread that forces recordings to disk, so that a slow `fsync` (on
/// ext4 one can wait for a journal commit of every file's dirty data, for
/// seconds under load) does not stall the writer while sessions fill its
/// queue. Used for the interval and on-close policies; `EveryEvent` syncs in
/// the writer, before the next record. A sync that fails latches the
/// recorder's failure like a failed write.
struct Syncer {
    tx: Option<SyncSender<SyncJob>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    fn start(shared: Arc<RecorderState>) -> io::Result<Syncer> {
        let (tx, rx) = mpsc::sync_channel::<SyncJob>(SYNC_QUEUE);
        let thread = std::thread::Builder::new()
            .name("tollgate-recorder-sync".to_string())
            .spawn(move || {
                for job in rx {
                    let (result, path) = match job {
                        SyncJob::File(file, path) => (file.sync_data(), path),
                        SyncJob::Dir(dir) => (File::open(&dir).and_then(|d| d.sync_all()), dir),
                    };
                    if let Err(e) = result {
                        shared.fail(format!(
                            "cannot sync recording {} to disk: {e}; check the disk",
                            path.display()
                        ));
                    }
                }
            })?;
        Ok(Syncer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues an fsync of `file`'s data (flushed to the kernel already);
    /// syncs at once when the queue is full.
    fn sync_file(&self, file: &SessionFile) -> io::Result<()> {
        let clone = file.out.get_ref().try_clone()?;
        self.submit(SyncJob::File(clone, file.path.clone()))
    }

    /// Queues an fsync of a directory (a new or finished file's entry).
    fn sync_dir(&self, dir: &Path) {
        if let Err(e) = self.submit(SyncJob::Dir(dir.to_path_buf())) {
            tracing::warn!(dir = %dir.display(), "cannot sync the recording directory: {e}");
        }
    }

    fn submit(&self, job: SyncJob) -> io::Result<()> {
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => match job {
                SyncJob::File(file, _) => file.sync_data(),
                SyncJob::Dir(dir) => sync_dir(&dir),
            },
        }
    }
}

impl Drop for Syncer {
    /// Waits for every queued sync, so a shutdown ends with the data on disk.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The record payload of an event; `None` for the events not written
/// through here: a start opens the file (its header), a statement is
/// written borrowed (see `statement_out`).
fn event_body(event: &SessionEvent) -> Option<Event> {
    let body = match event {
        SessionEvent::Started(_) | SessionEvent::Statement(_) => return None,
        SessionEvent::Job { record, .. } => (**record).clone(),
        SessionEvent::UpstreamConnected {
            peer, connect_time, ..
        } => Event::UpstreamConnected {
            peer: *peer,
            connect_us: micros(*connect_time),
        },
        SessionEvent::Startup {
            user,
            database,
            application_name,
            brokered_user,
            ..
        } => Event::Startup {
            user: user.clone(),
            database: database.clone(),
            application_name: application_name.clone(),
            brokered_user: brokered_user.clone(),
        },
        SessionEvent::Raw { dir, data, .. } => Event::Raw {
            dir: dir.as_str().to_string(),
            data: data.to_vec(),
        },
        SessionEvent::ExeHashed {
            exe_sha256, error, ..
        } => Event::ExeHashed {
            exe_sha256: exe_sha256.clone(),
            error: error.clone(),
        },
        SessionEvent::Intervention { intervention, .. } => {
            Event::Intervention((**intervention).clone())
        }
        SessionEvent::Sftp { record, .. } => Event::Sftp(record.clone()),
        SessionEvent::ChannelExit {
            channel,
            exit_status,
            exit_signal,
            ..
        } => Event::ChannelExit {
            channel: *channel,
            exit_status: *exit_status,
            exit_signal: exit_signal.clone(),
        },
        SessionEvent::Review { review, .. } => match &**review {
            ReviewUpdate::Requested(r) => Event::ReviewRequested(r.clone()),
            ReviewUpdate::Ended(r) => Event::ReviewEnded(r.clone()),
            ReviewUpdate::GrantUsed(r) => Event::GrantUsed(r.clone()),
            ReviewUpdate::GrantGiven(r) => Event::GrantGiven(r.clone()),
            ReviewUpdate::GrantRevoked(r) => Event::GrantRevoked(r.clone()),
            ReviewUpdate::Notified(r) => Event::ReviewNotified(r.clone()),
        },
        SessionEvent::Closed {
            bytes_from_client,
            bytes_from_upstream,
            duration,
            reason,
            ..
        } => {
            use crate::events::CloseReason as R;
            let detail = match reason {
                R::ClientError(d)
                | R::UpstreamError(d)
                | R::UpstreamUnreachable(d)
                | R::RecordingFailed(d) => Some(d.clone()),
                R::Completed | R::IdleTimeout | R::Shutdown => None,
            };
            Event::Closed {
                bytes_from_client: *bytes_from_client,
                bytes_from_upstream: *bytes_from_upstream,
                duration_us: micros(*duration),
                reason: CloseRecord {
                    kind: reason.label().to_string(),
                    detail,
                },
            }
        }
    };
    Some(body)
}

/// A statement's record payload, borrowed from the session's event.
pub(super) fn statement_out(s: &StatementEvent) -> StatementOut<'_> {
    let (text, text_len) = cut_text(&s.text, MAX_TEXT_LEN);
    StatementOut::Statement(StatementRecordOut {
        text,
        text_len,
        command: &s.command,
        kind: s.kind.map(StatementKind::as_str),
        fingerprint: s.fingerprint.as_deref(),
        action: s.action.as_str(),
        refused: s.refused,
        rule: s.rule.as_deref(),
        rules: &s.rules,
        reason: &s.reason,
    })
}

/// Cuts `text` to at most `max` bytes on a character boundary; returns the
/// original length when it was cut.
fn cut_text(text: &str, max: usize) -> (&str, Option<u64>) {
    if text.len() <= max {
        return (text, None);
    }
    let mut end = max;
    while end > 0 && !text.is_char_boundary(end) {
        end -= 1;
    }
    (text.get(..end).unwrap_or_default(), Some(text.len() as u64))
}

fn header_of(info: &SessionInfo, host: &str, agent_version: &str, digest: Option<&str>) -> Header {
    Header {
        format: FORMAT_NAME.to_string(),
        version: FORMAT_VERSION,
        session: info.id,
        host: host.to_string(),
        agent_version: agent_version.to_string(),
        started_at: rfc3339_millis(info.started_at),
        started_at_unix_ms: unix_ms(info.started_at),
        policy_digest: digest.map(str::to_string),
        arrival: info.arrival.as_str().to_string(),
        local: info.local,
        client: info.client,
        target: info.target.clone(),
        protocol: if info.arrival == crate::events::Arrival::Job {
            "job".to_string()
        } else {
            info.protocol.to_string()
        },
        upstream: info.upstream.clone(),
        identity: info.identity.clone(),
        kernel: info.kernel.as_ref().map(|k| KernelRecord {
            destination: k.destination,
            tgid: k.tgid,
            uid: k.uid,
            gid: k.gid,
            cgroup_id: k.cgroup_id,
            comm: k.comm.clone(),
            target_index: k.target_index as u64,
            instance: Some(k.instance),
        }),
        job: info.job.clone(),
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds, clamped to years 1970..=9999.
pub(crate) fn rfc3339_millis(t: SystemTime) -> String {
    // humantime panics outside this range.
    const MAX_SECS: u64 = 253_402_300_799;
    let t = match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d.as_secs() <= MAX_SECS => t,
        Ok(_) => UNIX_EPOCH + Duration::from_secs(MAX_SECS),
        Err(_) => UNIX_EPOCH,
    };
    humantime::format_rfc3339_millis(t).to_string()
}

/// `<dir>/YYYY/MM/DD/<id>.tgrec`, dated by the UTC start.
pub fn session_path(dir: &Path, id: Uuid, started_at: SystemTime) -> PathBuf {
    let stamp = rfc3339_millis(started_at);
    let part = |r: std::ops::Range<usize>| stamp.get(r).unwrap_or("0000").to_string();
    dir.join(part(0..4))
        .join(part(5..7))
        .join(part(8..10))
        .join(format!("{}.{FILE_EXTENSION}", id.hyphenated()))
}
