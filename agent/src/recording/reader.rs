//! Reading recordings back: [`read_recording`] (tolerant of a cut at any
//! byte), [`verify`] (chain, sequence, trailer), [`list`] and [`locate`]
//! over the dated directory tree.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use uuid::Uuid;

use super::codec::{body, decode_body, frame_hash, DecodeError, FrameRead, FrameReader};
use super::format::{
    Event, EventRecord, Header, Record, Trailer, FILE_EXTENSION, FORMAT_NAME, FORMAT_VERSION,
    MAX_RECORD_LEN,
};
pub use super::signing::SignatureStatus;
use super::signing::{check_signature, PublicKey};
use super::writer::rfc3339_millis;

/// A recording read back: its complete records, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recording {
    /// Where it was read from (empty for in-memory reads).
    pub path: PathBuf,
    /// The complete records (record 0 is the header when present).
    pub records: Vec<Record>,
    /// The byte offset of each record.
    pub offsets: Vec<u64>,
    /// Where an incomplete last record starts, when the file was cut inside
    /// one (crash, full disk).
    pub truncated_at: Option<u64>,
    /// The length of the file as read.
    pub len: u64,
}

impl Recording {
    /// The header, unless the file was cut inside it.
    pub fn header(&self) -> Option<&Header> {
        match self.records.first() {
            Some(Record::Header(h)) => Some(h),
            _ => None,
        }
    }

    /// The event records.
    pub fn events(&self) -> impl Iterator<Item = &EventRecord> {
        self.records.iter().filter_map(|r| match r {
            Record::Event(e) => Some(e),
            _ => None,
        })
    }

    /// The trailer, when the recording is complete.
    pub fn trailer(&self) -> Option<&Trailer> {
        match self.records.last() {
            Some(Record::Trailer(t)) => Some(t),
            _ => None,
        }
    }

    /// Number of statement events.
    pub fn statements(&self) -> u64 {
        self.events()
            .filter(|e| matches!(e.event, Event::Statement(_)))
            .count() as u64
    }

    /// Number of refused statements.
    pub fn denied(&self) -> u64 {
        self.events()
            .filter(|e| matches!(&e.event, Event::Statement(s) if s.refused))
            .count() as u64
    }

    /// Events the recorder marked as lost.
    pub fn lost(&self) -> u64 {
        self.events()
            .map(|e| match e.event {
                Event::EventsLost { count } => count,
                _ => 0,
            })
            .sum()
    }

    /// The database user from the start-up event, when there was one.
    pub fn database_user(&self) -> Option<&str> {
        self.events().find_map(|e| match &e.event {
            Event::Startup { user, .. } => user.as_deref(),
            _ => None,
        })
    }
}

/// Why a recording could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be read.
    #[error("cannot read recording {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A length prefix over the limit: corruption.
    #[error("recording {path} is corrupt: record {index} at byte {offset} claims {len} bytes, over the {MAX_RECORD_LEN}-byte limit; run `tollgate recordings verify` for details")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Record index.
        index: u64,
        /// Its offset.
        offset: u64,
        /// The claimed length.
        len: u32,
    },
    /// A complete record that does not decode: corruption.
    #[error("recording {path} is corrupt: record {index} at byte {offset}: {source}; run `tollgate recordings verify` for details")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Record index.
        index: u64,
        /// Its offset.
        offset: u64,
        /// The decoding error.
        source: DecodeError,
    },
    /// A `statement_again` record that names no earlier statement record
    /// of the file: corruption.
    #[error("recording {path} is corrupt: record {index} at byte {offset} repeats statement record {of}, which is not an earlier statement of the file; run `tollgate recordings verify` for details")]
    BadRepeat {
        /// The file.
        path: PathBuf,
        /// Record index.
        index: u64,
        /// Its offset.
        offset: u64,
        /// The `seq` it names.
        of: u64,
    },
    /// Record 0 is not a Tollgate header.
    #[error("{path} is not a tollgate recording: {why}")]
    NotARecording {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// Reads a recording file. A file cut at any byte reads up to its last
/// complete record, with [`Recording::truncated_at`] set.
pub fn read_recording(path: impl AsRef<Path>) -> Result<Recording, ReadError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_from(BufReader::new(file), path)
}

/// Reads a recording from any byte stream; `path` names it in errors. A
/// `statement_again` record is given as the statement it repeats.
pub fn read_from(r: impl Read, path: &Path) -> Result<Recording, ReadError> {
    let mut frames = FrameReader::new(r);
    // The statement records read so far: their seq and index.
    let mut statements: HashMap<u64, usize> = HashMap::new();
    let mut rec = Recording {
        path: path.to_path_buf(),
        records: Vec::new(),
        offsets: Vec::new(),
        truncated_at: None,
        len: 0,
    };
    loop {
        let index = rec.records.len() as u64;
        let frame = frames.next_frame().map_err(|source| ReadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        match frame {
            FrameRead::End => break,
            FrameRead::Truncated { offset, present } => {
                rec.truncated_at = Some(offset);
                rec.len = offset + present;
                return Ok(rec);
            }
            FrameRead::TooLarge { offset, len } => {
                return Err(ReadError::TooLarge {
                    path: path.to_path_buf(),
                    index,
                    offset,
                    len,
                })
            }
            FrameRead::Frame { offset, bytes } => {
                let record = decode_body(body(&bytes)).map_err(|source| ReadError::Corrupt {
                    path: path.to_path_buf(),
                    index,
                    offset,
                    source,
                })?;
                if index == 0 {
                    if let Some(why) = header_problem(&record) {
                        return Err(ReadError::NotARecording {
                            path: path.to_path_buf(),
                            why,
                        });
                    }
                }
                let record = match record {
                    Record::Event(mut e) => {
                        if let Event::StatementAgain { of } = e.event {
                            let repeated =
                                statements.get(&of).and_then(|i| match rec.records.get(*i) {
                                    Some(Record::Event(first)) => Some(first.event.clone()),
                                    _ => None,
                                });
                            e.event = repeated.ok_or_else(|| ReadError::BadRepeat {
                                path: path.to_path_buf(),
                                index,
                                offset,
                                of,
                            })?;
                        } else if matches!(e.event, Event::Statement(_)) {
                            statements.insert(e.seq, rec.records.len());
                        }
                        Record::Event(e)
                    }
                    other => other,
                };
                rec.records.push(record);
                rec.offsets.push(offset);
            }
        }
    }
    rec.len = frames.offset();
    Ok(rec)
}

fn header_problem(record: &Record) -> Option<String> {
    match record {
        Record::Header(h) if h.format != FORMAT_NAME => {
            Some(format!("format is {:?}, not {FORMAT_NAME:?}", h.format))
        }
        Record::Header(h) if h.version != FORMAT_VERSION => Some(format!(
            "format version {} is not supported (this agent reads version {FORMAT_VERSION}); use a newer tollgate",
            h.version
        )),
        Record::Header(_) => None,
        _ => Some("the first record is not a header".to_string()),
    }
}

/// What [`verify`] found wrong first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// The file could not be read.
    Io {
        /// The error.
        error: String,
    },
    /// The file ends inside a record.
    Truncated {
        /// Bytes of the incomplete record present.
        present: u64,
    },
    /// The file ends on a record boundary without a trailer.
    NoTrailer,
    /// A length prefix over the limit.
    TooLarge {
        /// The claimed length.
        len: u32,
    },
    /// A record does not decode.
    Corrupt {
        /// The decoding error.
        error: String,
    },
    /// Record 0 is not a valid header.
    BadHeader {
        /// What is wrong.
        why: String,
    },
    /// The header's session id is not the file's name.
    WrongSession {
        /// The id in the header.
        header: Uuid,
        /// The id in the file name.
        file: Uuid,
    },
    /// A header after record 0.
    ExtraHeader,
    /// A record after the trailer.
    AfterTrailer,
    /// `prev` is not the hash of the previous record.
    ChainBroken {
        /// The hash of the previous frame.
        expected: String,
        /// The `prev` stored.
        found: String,
    },
    /// A gap or repeat in `seq`.
    SeqGap {
        /// The next sequence number due.
        expected: u64,
        /// The one stored.
        found: u64,
    },
    /// `t_us` went backwards.
    TimeBackwards {
        /// The previous event's time.
        previous: u64,
        /// This event's time.
        found: u64,
    },
    /// A `statement_again` record names no earlier statement record.
    BadRepeat {
        /// The `seq` it names.
        of: u64,
    },
    /// A trailer field does not match the records.
    TrailerMismatch {
        /// The field.
        field: String,
        /// What the records give.
        expected: String,
        /// What the trailer says.
        found: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Io { error } => write!(f, "cannot read: {error}"),
            Problem::Truncated { present } => write!(
                f,
                "cut inside a record ({present} bytes of it present): the agent stopped mid-write or the disk filled up"
            ),
            Problem::NoTrailer => f.write_str(
                "no trailer: the session is still open, or the agent was killed before it closed",
            ),
            Problem::TooLarge { len } => {
                write!(f, "length {len} exceeds the {MAX_RECORD_LEN}-byte limit (corrupt)")
            }
            Problem::Corrupt { error } => write!(f, "corrupt record: {error}"),
            Problem::BadHeader { why } => write!(f, "bad header: {why}"),
            Problem::WrongSession { header, file } => {
                write!(f, "header is for session {header} but the file is named {file}")
            }
            Problem::ExtraHeader => f.write_str("a second header"),
            Problem::AfterTrailer => f.write_str("a record after the trailer"),
            Problem::ChainBroken { expected, found } => write!(
                f,
                "chain broken: prev is {found} but the previous record hashes to {expected} (a record was changed, removed or inserted)"
            ),
            Problem::SeqGap { expected, found } => {
                write!(f, "sequence gap: expected seq {expected}, found {found}")
            }
            Problem::TimeBackwards { previous, found } => {
                write!(f, "time went backwards: t_us {found} after {previous}")
            }
            Problem::BadRepeat { of } => write!(
                f,
                "a statement_again record names seq {of}, which is not an earlier statement record"
            ),
            Problem::TrailerMismatch {
                field,
                expected,
                found,
            } => write!(
                f,
                "trailer {field} is {found} but the records give {expected}"
            ),
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The file.
    pub path: PathBuf,
    /// Records that checked out before the first problem.
    pub records_ok: u64,
    /// Event records among them.
    pub events_ok: u64,
    /// The trailer is present and matches.
    pub complete: bool,
    /// Where an incomplete last record starts.
    pub truncated_at: Option<u64>,
    /// The first problem: which record, at which byte, what.
    pub problem: Option<LocatedProblem>,
    /// The signature's state.
    pub signature: SignatureStatus,
    /// Whether trusted public keys were given (then a recording must be
    /// signed by one of them).
    pub keys_given: bool,
}

/// A problem and where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocatedProblem {
    /// Record index (0 is the header).
    pub record: u64,
    /// Byte offset of the record (or of the end, for a missing trailer).
    pub offset: u64,
    /// What.
    pub problem: Problem,
}

impl VerifyReport {
    /// True when the recording is whole and untouched, and signed by a
    /// given key when keys were given.
    pub fn ok(&self) -> bool {
        self.problem.is_none() && !self.signature.fails(self.keys_given)
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            None if self.signature.fails(self.keys_given) => write!(
                f,
                "{}: FAILED: chain intact and trailer matches ({} records), but {}",
                self.path.display(),
                self.records_ok,
                match self.signature {
                    SignatureStatus::Unsigned =>
                        "it is unsigned and a public key was given".to_string(),
                    ref other => other.to_string(),
                }
            ),
            None => write!(
                f,
                "{}: ok ({} records, {} events, chain intact, trailer matches, {})",
                self.path.display(),
                self.records_ok,
                self.events_ok,
                self.signature
            ),
            Some(p) => write!(
                f,
                "{}: FAILED at record {} (byte {}): {}; {} records before it are intact",
                self.path.display(),
                p.record,
                p.offset,
                p.problem,
                self.records_ok
            ),
        }
    }
}

/// Verifies a recording file: framing, header, chain, sequence, time,
/// trailer, and that the header's session id is the file's name. A
/// signature is reported as present, not checked: see [`verify_signed`].
pub fn verify(path: impl AsRef<Path>) -> VerifyReport {
    verify_signed(path, &[])
}

/// Like [`verify`], and checks the trailer's signature against `keys` (the
/// trusted public keys). With keys given, an unsigned recording, one
/// signed by another key, or a bad signature fails.
pub fn verify_signed(path: impl AsRef<Path>, keys: &[PublicKey]) -> VerifyReport {
    let path = path.as_ref();
    let named = path
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| Uuid::parse_str(s).ok());
    match File::open(path) {
        Ok(file) => verify_from(BufReader::new(file), path, named, keys),
        Err(e) => VerifyReport {
            path: path.to_path_buf(),
            records_ok: 0,
            events_ok: 0,
            complete: false,
            truncated_at: None,
            problem: Some(LocatedProblem {
                record: 0,
                offset: 0,
                problem: Problem::Io {
                    error: e.to_string(),
                },
            }),
            signature: SignatureStatus::Unsigned,
            keys_given: !keys.is_empty(),
        },
    }
}

/// Verifies a recording from a byte stream; `expected` is the session id
/// the file is named after, when known; `keys` as in [`verify_signed`].
pub fn verify_from(
    r: impl Read,
    path: &Path,
    expected: Option<Uuid>,
    keys: &[PublicKey],
) -> VerifyReport {
    let mut report = VerifyReport {
        path: path.to_path_buf(),
        records_ok: 0,
        events_ok: 0,
        complete: false,
        truncated_at: None,
        problem: None,
        signature: SignatureStatus::Unsigned,
        keys_given: !keys.is_empty(),
    };
    let mut session = None;
    let mut frames = FrameReader::new(r);
    let mut prev: Option<String> = None;
    let mut last_t = 0u64;
    let (mut statements, mut denied, mut lost) = (0u64, 0u64, 0u64);
    // Whether each statement record so far was refused, by seq.
    let mut refused_at: HashMap<u64, bool> = HashMap::new();
    let problem = loop {
        let index = report.records_ok;
        let frame = match frames.next_frame() {
            Ok(f) => f,
            Err(e) => {
                break Some((
                    index,
                    frames.offset(),
                    Problem::Io {
                        error: e.to_string(),
                    },
                ))
            }
        };
        let (offset, bytes) = match frame {
            FrameRead::End if report.complete => break None,
            FrameRead::End => break Some((index, frames.offset(), Problem::NoTrailer)),
            FrameRead::Truncated { offset, present } => {
                report.truncated_at = Some(offset);
                break Some((index, offset, Problem::Truncated { present }));
            }
            FrameRead::TooLarge { offset, len } => {
                break Some((index, offset, Problem::TooLarge { len }))
            }
            FrameRead::Frame { offset, bytes } => (offset, bytes),
        };
        if report.complete {
            report.complete = false;
            break Some((index, offset, Problem::AfterTrailer));
        }
        let record = match decode_body(body(&bytes)) {
            Ok(r) => r,
            Err(e) => {
                break Some((
                    index,
                    offset,
                    Problem::Corrupt {
                        error: e.to_string(),
                    },
                ))
            }
        };
        let found = match (&prev, record) {
            (None, record) => {
                if let Some(why) = header_problem(&record) {
                    break Some((index, offset, Problem::BadHeader { why }));
                }
                if let Record::Header(h) = &record {
                    session = Some(h.session);
                }
                match (record, expected) {
                    (Record::Header(h), Some(file)) if h.session != file => {
                        break Some((
                            index,
                            offset,
                            Problem::WrongSession {
                                header: h.session,
                                file,
                            },
                        ))
                    }
                    _ => None,
                }
            }
            (Some(_), Record::Header(_)) => Some(Problem::ExtraHeader),
            (Some(want), Record::Event(e)) => {
                if &e.prev != want {
                    Some(Problem::ChainBroken {
                        expected: want.clone(),
                        found: e.prev,
                    })
                } else if e.seq != report.events_ok {
                    Some(Problem::SeqGap {
                        expected: report.events_ok,
                        found: e.seq,
                    })
                } else if e.t_us < last_t {
                    Some(Problem::TimeBackwards {
                        previous: last_t,
                        found: e.t_us,
                    })
                } else {
                    let refused = match &e.event {
                        Event::Statement(s) => {
                            refused_at.insert(e.seq, s.refused);
                            Ok(Some(s.refused))
                        }
                        Event::StatementAgain { of } => refused_at
                            .get(of)
                            .map(|r| Some(*r))
                            .ok_or(Problem::BadRepeat { of: *of }),
                        _ => Ok(None),
                    };
                    match refused {
                        Err(problem) => Some(problem),
                        Ok(refused) => {
                            last_t = e.t_us;
                            if let Some(refused) = refused {
                                statements += 1;
                                denied += u64::from(refused);
                            }
                            if let Event::EventsLost { count } = &e.event {
                                lost = lost.saturating_add(*count);
                            }
                            report.events_ok += 1;
                            None
                        }
                    }
                }
            }
            (Some(want), Record::Trailer(t)) => {
                let checks = [
                    ("prev", want.clone(), t.prev.clone()),
                    ("chain_head", want.clone(), t.chain_head.clone()),
                    ("events", report.events_ok.to_string(), t.events.to_string()),
                    (
                        "statements",
                        statements.to_string(),
                        t.statements.to_string(),
                    ),
                    ("denied", denied.to_string(), t.denied.to_string()),
                    ("lost", lost.to_string(), t.lost.to_string()),
                ];
                let mismatch = checks.into_iter().find(|(_, a, b)| a != b);
                match mismatch {
                    Some((field, expected, found)) => Some(Problem::TrailerMismatch {
                        field: field.to_string(),
                        expected,
                        found,
                    }),
                    None => {
                        report.complete = true;
                        if let Some(id) = session {
                            report.signature = check_signature(id, &t, keys);
                        }
                        None
                    }
                }
            }
        };
        if let Some(p) = found {
            break Some((index, offset, p));
        }
        prev = Some(frame_hash(&bytes));
        report.records_ok += 1;
    };
    if let Some((record, offset, problem)) = problem {
        report.complete = false;
        report.problem = Some(LocatedProblem {
            record,
            offset,
            problem,
        });
    }
    report
}

/// What [`list`] selects. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct RecordingFilter {
    /// Sessions started at or after this time.
    pub since: Option<SystemTime>,
    /// Sessions started before this time.
    pub until: Option<SystemTime>,
    /// Target name, exactly.
    pub target: Option<String>,
    /// OS user name or database user, exactly.
    pub user: Option<String>,
    /// CI repository, exactly.
    pub ci_repo: Option<String>,
    /// Only sessions with at least one refused statement.
    pub denied_only: bool,
    /// Protocol, exactly (`job` for job recordings).
    pub protocol: Option<String>,
    /// Leave out job recordings.
    pub sessions_only: bool,
}

/// One line of `tollgate recordings list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordingSummary {
    /// The file.
    pub path: PathBuf,
    /// The session id (from the header, or the file name when unreadable).
    pub id: Option<Uuid>,
    /// Start, RFC 3339.
    pub started_at: Option<String>,
    /// Start, milliseconds since the epoch.
    pub started_at_unix_ms: Option<u64>,
    /// Target name.
    pub target: Option<String>,
    /// Protocol.
    pub protocol: Option<String>,
    /// OS user of the connecting process.
    pub user: Option<String>,
    /// Database user from the start-up.
    pub database_user: Option<String>,
    /// Process id.
    pub pid: Option<u32>,
    /// Executable.
    pub exe: Option<String>,
    /// CI repository.
    pub ci_repo: Option<String>,
    /// Statement events.
    pub statements: u64,
    /// Refused statements.
    pub denied: u64,
    /// Events marked lost.
    pub lost: u64,
    /// A trailer is present.
    pub complete: bool,
    /// The file ends inside a record.
    pub truncated: bool,
    /// Why the file could not be read, when it could not. Unreadable files
    /// are always listed, whatever the filter.
    pub error: Option<String>,
}

impl RecordingSummary {
    fn of(rec: &Recording) -> Self {
        let h = rec.header();
        Self {
            path: rec.path.clone(),
            id: h.map(|h| h.session),
            started_at: h.map(|h| h.started_at.clone()),
            started_at_unix_ms: h.map(|h| h.started_at_unix_ms),
            target: h.map(|h| h.target.clone()),
            protocol: h.map(|h| h.protocol.clone()),
            user: h.and_then(|h| h.identity.user.clone()),
            database_user: rec.database_user().map(str::to_string),
            pid: h.and_then(|h| h.identity.pid),
            exe: h.and_then(|h| h.identity.exe.clone()),
            ci_repo: h.and_then(|h| h.identity.ci.as_ref()?.repository.clone()),
            statements: rec.statements(),
            denied: rec.denied(),
            lost: rec.lost(),
            complete: rec.trailer().is_some(),
            truncated: rec.truncated_at.is_some(),
            error: None,
        }
    }

    fn failed(path: &Path, error: String) -> Self {
        Self {
            path: path.to_path_buf(),
            id: path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| Uuid::parse_str(s).ok()),
            started_at: None,
            started_at_unix_ms: None,
            target: None,
            protocol: None,
            user: None,
            database_user: None,
            pid: None,
            exe: None,
            ci_repo: None,
            statements: 0,
            denied: 0,
            lost: 0,
            complete: false,
            truncated: false,
            error: Some(error),
        }
    }

    fn matches(&self, f: &RecordingFilter) -> bool {
        let ms = self.started_at_unix_ms.unwrap_or(0);
        let eq = |want: &Option<String>, have: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_ref() == Some(w))
        };
        f.since.is_none_or(|t| ms >= super::writer::unix_ms(t))
            && f.until.is_none_or(|t| ms < super::writer::unix_ms(t))
            && eq(&f.target, &self.target)
            && eq(&f.ci_repo, &self.ci_repo)
            && f.user.as_ref().is_none_or(|u| {
                self.user.as_ref() == Some(u) || self.database_user.as_ref() == Some(u)
            })
            && (!f.denied_only || self.denied > 0)
            && eq(&f.protocol, &self.protocol)
            && !(f.sessions_only && self.protocol.as_deref() == Some("job"))
    }
}

/// Lists the recordings under `dir` (the dated tree), oldest first.
/// Unreadable files are listed with their error, whatever the filter.
pub fn list(dir: impl AsRef<Path>, filter: &RecordingFilter) -> Vec<RecordingSummary> {
    let since_day = filter.since.map(day_key);
    let mut out = Vec::new();
    for day in day_dirs(dir.as_ref()) {
        let key = day_key_of_path(&day);
        if let (Some(since), Some(key)) = (&since_day, &key) {
            if key < since {
                continue;
            }
        }
        for path in sorted_entries(&day) {
            if path.extension().and_then(|e| e.to_str()) != Some(FILE_EXTENSION) {
                continue;
            }
            match read_recording(&path) {
                Ok(rec) => {
                    let s = RecordingSummary::of(&rec);
                    if s.matches(filter) {
                        out.push(s);
                    }
                }
                Err(e) => out.push(RecordingSummary::failed(&path, e.to_string())),
            }
        }
    }
    out
}

/// The summary `list` gives of a recording read from `bytes` (named
/// `name`), when it passes `filter`; an unreadable one always is.
pub fn summarize(bytes: &[u8], name: &Path, filter: &RecordingFilter) -> Option<RecordingSummary> {
    match read_from(bytes, name) {
        Ok(rec) => Some(RecordingSummary::of(&rec)).filter(|s| s.matches(filter)),
        Err(e) => Some(RecordingSummary::failed(name, e.to_string())),
    }
}

/// Finds a session's file under `dir`: first in the day its UUIDv7 names
/// (and the days either side), then anywhere in the tree.
pub fn locate(dir: impl AsRef<Path>, id: Uuid) -> Option<PathBuf> {
    let dir = dir.as_ref();
    if let Some(ts) = id.get_timestamp() {
        let (secs, _) = ts.to_unix();
        let t = UNIX_EPOCH + Duration::from_secs(secs);
        for shift in [0i64, -1, 1] {
            let day = if shift < 0 {
                t.checked_sub(Duration::from_secs(86_400))
            } else {
                t.checked_add(Duration::from_secs(86_400 * shift as u64))
            };
            if let Some(day) = day {
                let p = super::writer::session_path(dir, id, day);
                if p.is_file() {
                    return Some(p);
                }
            }
        }
    }
    let name = format!("{}.{FILE_EXTENSION}", id.hyphenated());
    day_dirs(dir)
        .into_iter()
        .map(|d| d.join(&name))
        .find(|p| p.is_file())
}

/// `YYYY/MM/DD` of a time, in UTC.
pub(crate) fn day_key(t: SystemTime) -> String {
    let s = rfc3339_millis(t);
    s.get(0..10).unwrap_or_default().replace('-', "/")
}

/// `YYYY/MM/DD` of a day directory's path.
pub(crate) fn day_key_of_path(day: &Path) -> Option<String> {
    let mut parts: Vec<&str> = day
        .components()
        .rev()
        .take(3)
        .filter_map(|c| c.as_os_str().to_str())
        .collect();
    parts.reverse();
    (parts.len() == 3).then(|| parts.join("/"))
}

/// `<dir>/YYYY/MM/DD` directories, sorted.
pub(crate) fn day_dirs(dir: &Path) -> Vec<PathBuf> {
    let digits = |p: &Path, n: usize| {
        p.file_name()
            .and_then(|s| s.to_str())
            .is_some_and(|s| s.len() == n && s.bytes().all(|b| b.is_ascii_digit()))
    };
    let mut days = Vec::new();
    for y in sorted_entries(dir)
        .into_iter()
        .filter(|p| digits(p, 4) && p.is_dir())
    {
        for m in sorted_entries(&y)
            .into_iter()
            .filter(|p| digits(p, 2) && p.is_dir())
        {
            days.extend(
                sorted_entries(&m)
                    .into_iter()
                    .filter(|p| digits(p, 2) && p.is_dir()),
            );
        }
    }
    days
}

/// The entries of a directory, sorted by path (none when unreadable).
pub(crate) fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    v
}
