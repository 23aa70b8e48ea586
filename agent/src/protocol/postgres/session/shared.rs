//! What both directions of a session share: [`BetweenSides`], why the
//! session stops ([`Stop`]), the read buffer and the [`Step`] a side
//! answers a message with.

use super::*;

/// Initial (and resting) size of each direction's read buffer.
const BUFFER: usize = 16 * 1024;

/// `client_encoding` UTF8 (or its alias UNICODE): text is read as it is.
pub(super) const ENCODING_UTF8: u8 = 0;

/// `client_encoding` LATIN1 (ISO 8859-1): every byte is the code point of
/// the same value, so the text converts exactly, as the server converts it.
pub(super) const ENCODING_LATIN1: u8 = 1;

/// Any other encoding: only ASCII text is read; in multi-byte encodings
/// such as SJIS or BIG5 a quote or backslash byte can sit inside a
/// character, so guessing would misread where literals end.
pub(super) const ENCODING_OTHER: u8 = 2;

/// State the two directions share. Both run in the session's task; atomics
/// keep the futures `Send`.
pub(super) struct BetweenSides {
    /// The server sent AuthenticationOk.
    pub(super) authenticated: AtomicBool,
    /// The status byte of the server's last ReadyForQuery.
    pub(super) tx_status: AtomicU8,
    /// The session's `client_encoding`, as one of the `ENCODING_*` values:
    /// statement text is read as UTF-8, converted from LATIN1, or (another
    /// encoding) refused as unparsable when it is not ASCII.
    pub(super) client_encoding: AtomicU8,
    /// `standard_conforming_strings` is off: backslashes in plain literals
    /// are escapes, and the analysis reads them so.
    pub(super) backslash_escapes: AtomicBool,
    /// `tollgate_deny_<nonce>_`: the marker of substituted statements.
    pub(super) marker: String,
    /// Next substitute number.
    next_denial: AtomicU64,
    /// Messages for the client, by substitute number, until the server's
    /// error for that substitute arrives.
    denials: Mutex<BTreeMap<u64, (&'static str, String)>>,
    /// The SQLSTATE of the next denial registered, when not 42501.
    pub(super) next_denial_sqlstate: Mutex<Option<&'static str>>,
    /// Unparsable text sent with [`unparsable_guard`] behind it, oldest
    /// first: (the batch it was sent in, its length in characters).
    guarded: Mutex<std::collections::VecDeque<(u64, usize)>>,
    /// The upstream pump is inside a message it passes through in chunks:
    /// the proxy must not write a message of its own to the client now.
    pub(super) upstream_mid_message: AtomicBool,
    /// The client pump is inside a message: nothing of ours to the server.
    pub(super) client_mid_message: AtomicBool,
    /// Milliseconds since the session's start of the last byte read.
    pub(super) last_activity: AtomicU64,
    /// The client-visible cancel key's pid, once registered.
    pub(super) cancel_pid: Mutex<Option<i32>>,
    /// Prepared statements and portals, decided again when the policy
    /// changes.
    prepared: Mutex<Prepared>,
    /// `tollgate_mask_<nonce>_`: the column name of masking lookups.
    pub(super) mask_marker: String,
    /// Next masking lookup number.
    pub(super) next_mask: AtomicU64,
    /// Masked Queries sent, by lookup number, until the lookup's
    /// RowDescription comes back: the plan and the lookup's length.
    masks: Mutex<BTreeMap<u64, (Arc<MaskPlan>, usize)>>,
    /// `masks` is not empty: RowDescriptions are read for the marker.
    pub(super) masks_pending: AtomicBool,
    /// The session's prepared masking lookup.
    lookup: Mutex<PreparedLookup>,
    /// A Query using `lookup` was sent and the first CommandComplete,
    /// ErrorResponse or RowDescription of its answer has not come (the
    /// upstream pump reads them for the `PREPARE` and `EXECUTE`).
    pub(super) lookup_pending: AtomicBool,
    /// The plan of a masked Query sent without a lookup
    /// ([`MaskPlan::direct`]) while nothing else was in flight, until the
    /// first message of its answer comes.
    direct: Mutex<Option<Arc<MaskPlan>>>,
    /// `direct` is set (read without the lock on every message).
    pub(super) direct_pending: AtomicBool,
    /// Queries, Syncs and FunctionCalls sent (the proxy's lookups
    /// included) whose ReadyForQuery has not come: 0 means the server is
    /// idle, waiting for the client. It can only over-count (a Sync the
    /// server ignores during COPY), which refuses masking, never confuses it.
    pub(super) in_flight: AtomicU64,
    /// The masked extended-protocol batch being answered, if any.
    batch: Mutex<Option<ExtendedBatch>>,
    /// `batch` is set (read without the lock on every message).
    pub(super) batch_active: AtomicBool,
    /// Notified when `in_flight` falls to 0.
    pub(super) idle: tokio::sync::Notify,
    /// Syncs the client sent after starting a COPY FROM STDIN and before
    /// its CopyDone or CopyFail: the server ignores them if it entered
    /// copy-in, and then they are taken off the counts of what it answers.
    pub(super) copy_syncs: AtomicU64,
    /// The server answered CopyInResponse and the copy has not ended.
    pub(super) copy_in: AtomicBool,
    /// Messages of the proxy's own for the client (the notice that a
    /// statement is held), written by the upstream pump between whole
    /// server messages.
    to_client: Mutex<Vec<u8>>,
    /// Notified when `to_client` has something.
    pub(super) to_client_ready: tokio::sync::Notify,
}

/// Denials remembered at most (older ones are forgotten: the server
/// answered them with 25P02 in a failed block, so no marker comes back).
const MAX_PENDING_DENIALS: usize = 1024;

impl BetweenSides {
    pub(super) fn new() -> BetweenSides {
        // Unpredictable to the client: SipHash under the process's random
        // keys (fresh per `RandomState`) of a time-ordered id.
        let mut hasher = std::hash::BuildHasher::build_hasher(&std::hash::RandomState::new());
        std::hash::Hasher::write_u128(&mut hasher, uuid::Uuid::now_v7().as_u128());
        let nonce = std::hash::Hasher::finish(&hasher);
        BetweenSides {
            authenticated: AtomicBool::new(false),
            tx_status: AtomicU8::new(b'I'),
            client_encoding: AtomicU8::new(ENCODING_UTF8),
            backslash_escapes: AtomicBool::new(false),
            marker: format!("tollgate_deny_{nonce:016x}_"),
            mask_marker: format!("tollgate_mask_{nonce:016x}_"),
            next_mask: AtomicU64::new(1),
            masks: Mutex::new(BTreeMap::new()),
            masks_pending: AtomicBool::new(false),
            lookup: Mutex::new(PreparedLookup::default()),
            lookup_pending: AtomicBool::new(false),
            direct: Mutex::new(None),
            direct_pending: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            batch: Mutex::new(None),
            batch_active: AtomicBool::new(false),
            idle: tokio::sync::Notify::new(),
            copy_syncs: AtomicU64::new(0),
            copy_in: AtomicBool::new(false),
            to_client: Mutex::new(Vec::new()),
            to_client_ready: tokio::sync::Notify::new(),
            next_denial: AtomicU64::new(1),
            denials: Mutex::new(BTreeMap::new()),
            next_denial_sqlstate: Mutex::new(None),
            guarded: Mutex::new(std::collections::VecDeque::new()),
            upstream_mid_message: AtomicBool::new(false),
            client_mid_message: AtomicBool::new(false),
            last_activity: AtomicU64::new(0),
            cancel_pid: Mutex::new(None),
            prepared: Mutex::new(Prepared::default()),
        }
    }

    /// Registers a denial and returns its marker name, which the server's
    /// error for the substitute will quote.
    pub(super) fn register_denial(&self, client_message: String) -> String {
        let n = self.next_denial.fetch_add(1, Ordering::Relaxed);
        let code = self
            .next_denial_sqlstate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or(sqlstate::INSUFFICIENT_PRIVILEGE);
        let mut denials = self.denials.lock().unwrap_or_else(PoisonError::into_inner);
        if denials.len() >= MAX_PENDING_DENIALS {
            denials.pop_first();
        }
        denials.insert(n, (code, client_message));
        format!("{}{n}", self.marker)
    }

    /// Registers a denial and returns the SQL of its substitute.
    pub(super) fn substitute_sql(&self, client_message: String) -> String {
        format!(
            "SELECT 1::pg_catalog.\"{}\"",
            self.register_denial(client_message)
        )
    }

    /// Registers a masked Query's plan; returns the SQL of its lookup, to
    /// be sent in front of the client's text. `alone`: nothing else is in
    /// flight, so the answer's first messages are the lookup's.
    pub(super) fn register_mask(&self, plan: MaskPlan, alone: bool) -> String {
        // Alone, the answer's first message is this Query's: the upstream
        // pump takes the plan there, and the server's RowDescription names
        // the fields.
        if alone && plan.direct.is_some() {
            *self.direct.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(plan));
            self.direct_pending.store(true, Ordering::Relaxed);
            return String::new();
        }
        // In front of the Query's text, the lookup runs right before its
        // first statement: when that is the only masked one, the search
        // path finds what it reads, and the prepared form can serve.
        let prepared = if alone && plan.only_first {
            self.lookup().sql(&self.mask_marker, &plan)
        } else {
            None
        };
        let mut masks = self.masks.lock().unwrap_or_else(PoisonError::into_inner);
        let (n, sql) = match prepared {
            Some(sql) => {
                // Nothing in flight: every lookup registered before was
                // answered or failed.
                masks.clear();
                self.lookup_pending.store(true, Ordering::Relaxed);
                (0, sql)
            }
            None => {
                let n = self.next_mask.fetch_add(1, Ordering::Relaxed);
                let scope = if plan.only_first {
                    LookupScope::SearchPath
                } else {
                    LookupScope::EverySchema
                };
                (
                    n,
                    plan.lookup_sql(&format!("{}{n}", self.mask_marker), scope),
                )
            }
        };
        if masks.len() >= MAX_PENDING_DENIALS {
            masks.pop_first();
        }
        masks.insert(n, (Arc::new(plan), sql.len()));
        self.masks_pending.store(true, Ordering::Relaxed);
        sql
    }

    /// The plan of the masked Query sent without a lookup, at the first
    /// message of its answer.
    pub(super) fn take_direct(&self) -> Option<Arc<MaskPlan>> {
        self.direct_pending.store(false, Ordering::Relaxed);
        self.direct
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    pub(super) fn lookup(&self) -> std::sync::MutexGuard<'_, PreparedLookup> {
        self.lookup.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The plan of the masked Query whose lookup has `column` as its first
    /// column's name, if it is one. Lookups registered before it were not
    /// answered (their Query failed first) and are forgotten.
    pub(super) fn mask_for(&self, column: &str) -> Option<(Arc<MaskPlan>, usize)> {
        let n: u64 = column
            .strip_prefix(self.mask_marker.as_str())?
            .parse()
            .ok()?;
        let mut masks = self.masks.lock().unwrap_or_else(PoisonError::into_inner);
        let found = masks.remove(&n);
        while masks.first_key_value().is_some_and(|(&k, _)| k < n) {
            masks.pop_first();
        }
        self.masks_pending
            .store(!masks.is_empty(), Ordering::Relaxed);
        found
    }

    pub(super) fn batch(&self) -> std::sync::MutexGuard<'_, Option<ExtendedBatch>> {
        self.batch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn prepared(&self) -> std::sync::MutexGuard<'_, Prepared> {
        self.prepared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers unparsable text sent with the guard behind it, in `batch`.
    pub(super) fn guard_sent(&self, batch: u64, text: &[u8]) {
        let chars = std::str::from_utf8(text).map_or(text.len(), |t| t.chars().count());
        let mut guarded = self.guarded.lock().unwrap_or_else(PoisonError::into_inner);
        if guarded.len() >= MAX_PENDING_DENIALS {
            guarded.pop_front();
        }
        guarded.push_back((batch, chars));
    }

    /// An ErrorResponse of the batch being answered (`answered` batches
    /// were before it) that is the guard's `;` refused behind text which
    /// ended unfinished: rewritten into `out` as what the server says of
    /// that text alone, `syntax error at end of input` at its end. `false`:
    /// it is not (forward it as it is).
    pub(super) fn unfinished_text_error(
        &self,
        answered: u64,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> bool {
        let mut guarded = self.guarded.lock().unwrap_or_else(PoisonError::into_inner);
        while guarded.front().is_some_and(|(batch, _)| *batch < answered) {
            guarded.pop_front();
        }
        let Some(&(batch, chars)) = guarded.front() else {
            return false;
        };
        if batch != answered {
            return false;
        }
        // Whatever this error is, it ends the batch's guarded text.
        guarded.pop_front();
        drop(guarded);
        let Ok(BackendMessage::ErrorResponse(fields)) =
            backend::decode_backend(backend::tag::ERROR_RESPONSE, body)
        else {
            return false;
        };
        // The guard's `;` follows the text's last character and a newline.
        let at_guard = fields.get(backend::field::POSITION) == Some(&(chars + 2).to_string());
        if fields.get(backend::field::MESSAGE) != Some("syntax error at or near \";\"") || !at_guard
        {
            return false;
        }
        let end = (chars + 1).to_string();
        let mut w = MessageWriter::new(out, backend::tag::ERROR_RESPONSE);
        for &(code, value) in &fields.0 {
            let value = match code {
                backend::field::MESSAGE => "syntax error at end of input",
                backend::field::POSITION => end.as_str(),
                _ => value,
            };
            w.put_u8(code).put_cstr(value);
        }
        w.put_u8(0);
        w.finish();
        true
    }

    /// Whether an ErrorResponse body answers a refusal's substitute (see
    /// [`BetweenSides::denial_for`], which also takes its message).
    pub(super) fn is_denial(&self, error_body: &[u8]) -> bool {
        self.marker_at(error_body).is_some()
    }

    /// Where the denial marker starts in an ErrorResponse body.
    fn marker_at(&self, error_body: &[u8]) -> Option<usize> {
        let marker = self.marker.as_bytes();
        error_body.windows(marker.len()).position(|w| w == marker)
    }

    /// The SQLSTATE and client message of the substitute an ErrorResponse
    /// body answers, if it answers one.
    pub(super) fn denial_for(&self, error_body: &[u8]) -> Option<(&'static str, String)> {
        let at = self.marker_at(error_body)?;
        let digits = error_body.get(at.saturating_add(self.marker.len())..)?;
        let end = digits
            .iter()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(digits.len());
        let n: u64 = std::str::from_utf8(digits.get(..end)?).ok()?.parse().ok()?;
        let mut denials = self.denials.lock().unwrap_or_else(PoisonError::into_inner);
        let message = denials.remove(&n);
        // Earlier substitutes were answered without a marker (25P02).
        while denials.first_key_value().is_some_and(|(&k, _)| k < n) {
            denials.pop_first();
        }
        message
    }

    /// Queues a NoticeResponse for the client (see `to_client`).
    pub(super) fn notify_client(&self, message: &str) {
        let mut queued = self
            .to_client
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        super::super::error::write_notice(&mut queued, message);
        drop(queued);
        self.to_client_ready.notify_one();
    }

    /// Takes what is queued for the client.
    pub(super) fn take_for_client(&self) -> Vec<u8> {
        std::mem::take(
            &mut *self
                .to_client
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    pub(super) fn touch(&self, start: Instant) {
        let now = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity.fetch_max(now, Ordering::Relaxed);
    }
}

/// Why a session is being ended by the proxy, with what to tell the client.
#[derive(Debug)]
pub(super) enum Stop {
    /// An I/O error or end on one side: nothing more to say.
    Closed(CloseReason),
    /// A fault the client should hear about before the connection closes.
    Fatal {
        sqlstate: &'static str,
        message: String,
        reason: CloseReason,
    },
}

impl Stop {
    pub(super) fn client_fault(sqlstate: &'static str, message: String) -> Stop {
        Stop::Fatal {
            sqlstate,
            reason: CloseReason::ClientError(message.clone()),
            message,
        }
    }

    pub(super) fn protocol_violation(what: impl std::fmt::Display) -> Stop {
        Stop::client_fault(
            sqlstate::PROTOCOL_VIOLATION,
            format!("tollgate: invalid message from the client: {what}"),
        )
    }
}

/// A read buffer: bytes `start..end` of `data` are received and not yet
/// handled.
pub(super) struct ReadBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    pub(super) fn new() -> ReadBuf {
        ReadBuf {
            data: vec![0; BUFFER],
            start: 0,
            end: 0,
        }
    }

    pub(super) fn filled(&self) -> &[u8] {
        self.data.get(self.start..self.end).unwrap_or_default()
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start = self.start.saturating_add(n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.data.len() > BUFFER {
                // One large message does not keep its buffer for the session.
                self.data.truncate(BUFFER);
                self.data.shrink_to_fit();
            }
        }
    }

    /// Makes room to read, so that a message of `need` bytes (at least one
    /// more than what is here) fits whole. `need` is bounded by the caller.
    pub(super) fn make_room(&mut self, need: usize) {
        let have = self.end.saturating_sub(self.start);
        let need = need.max(have.saturating_add(1));
        if self.data.len().saturating_sub(self.start) < need
            || self.data.len().saturating_sub(self.end) < BUFFER / 4
        {
            self.data.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = have;
        }
        if self.data.len() < need {
            self.data.resize(need.max(BUFFER), 0);
        } else if self.end == self.data.len() {
            self.data.resize(self.data.len().saturating_add(BUFFER), 0);
        }
    }

    /// Reads once; 0 means end of stream.
    pub(super) async fn read_from<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> io::Result<usize> {
        let Some(space) = self.data.get_mut(self.end..) else {
            return Ok(0);
        };
        let n = r.read(space).await?;
        self.end = self.end.saturating_add(n).min(self.data.len());
        Ok(n)
    }
}

/// What to do with the message at the start of the unhandled bytes.
pub(super) enum Step {
    /// Wait until this many bytes (the whole message) are here.
    Need(usize),
    /// Forward the next `n` bytes as they are (a whole message, or the part
    /// of one passed through in chunks that is here).
    Forward(usize),
    /// Replace the next `n` bytes (one whole message) with `out`.
    Replace(usize),
    /// Forward the next `n` bytes, then stop reading (Terminate).
    Last(usize),
    /// Step this message again once the server has answered everything
    /// sent before it (see [`ClientSide::must_wait`]).
    Wait,
    /// Hold this message for human review (see [`super::review`]), then
    /// step it again with the outcome.
    Hold,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn a_denial_is_found_by_its_marker_once() {
        let shared = BetweenSides::new();
        let sql = shared.substitute_sql("tollgate: DROP TABLE denied".to_owned());
        assert!(
            sql.starts_with("SELECT 1::pg_catalog.\"tollgate_deny_"),
            "{sql}"
        );
        let n = sql.trim_end_matches('"').rsplit('_').next().unwrap();
        // The server's message quotes the type name.
        let body = format!(
            "SERROR\0C42704\0Mtype \"pg_catalog.{}{n}\" does not exist\0\0",
            shared.marker
        );
        assert_eq!(
            shared.denial_for(body.as_bytes()),
            Some(("42501", "tollgate: DROP TABLE denied".to_owned()))
        );
        assert_eq!(shared.denial_for(body.as_bytes()), None, "answered once");
        // Another session's marker, or none, is not ours.
        let other = BetweenSides::new();
        assert_ne!(other.marker, shared.marker);
        let sql = other.substitute_sql("x".to_owned());
        assert_eq!(shared.denial_for(sql.as_bytes()), None);
        assert_eq!(shared.denial_for(b"SERROR\0Mtype does not exist\0\0"), None);
    }

    #[test]
    fn denials_answered_without_a_marker_are_forgotten() {
        let shared = BetweenSides::new();
        let first = shared.substitute_sql("first".to_owned());
        let second = shared.substitute_sql("second".to_owned());
        assert!(first != second);
        // The first was answered with 25P02 (no marker); the second's error
        // arrives and clears it too.
        assert_eq!(
            shared.denial_for(second.as_bytes()),
            Some(("42501", "second".to_owned()))
        );
        assert!(shared.denials.lock().unwrap().is_empty());
        for i in 0..(MAX_PENDING_DENIALS + 10) {
            shared.substitute_sql(format!("m{i}"));
        }
        assert_eq!(shared.denials.lock().unwrap().len(), MAX_PENDING_DENIALS);
    }

    #[test]
    fn the_read_buffer_grows_for_a_whole_message_and_shrinks_back() {
        let mut buf = ReadBuf::new();
        buf.make_room(BUFFER * 4);
        assert!(buf.data.len() >= BUFFER * 4);
        buf.end = 10;
        buf.consume(4);
        assert_eq!(buf.filled().len(), 6);
        buf.make_room(BUFFER * 5);
        assert_eq!((buf.start, buf.end), (0, 6), "compacted");
        buf.consume(6);
        assert_eq!(buf.data.len(), BUFFER, "back to its resting size");
        assert!(buf.filled().is_empty());
        buf.consume(100);
        assert_eq!((buf.start, buf.end), (0, 0));
    }
}
