//! The client → server direction: each client message is decided before
//! the server sees it (forwarded, replaced by a refusal, or made to wait).

use super::*;
use crate::protocol::postgres::frontend::Head;

/// Longest portal and statement names of a Bind read before its parameters.
const MAX_BIND_NAMES: usize = 64 * 1024;

/// Why a `mask` statement decided again (an `EXECUTE`, a stale prepared
/// statement) is refused.
const MASK_EXTENDED: &str = "a statement prepared before the policy masked it is not masked when it runs again; prepare it again";

/// Why the statement run by an `EXECUTE` under `EXPLAIN` or `CREATE TABLE
/// ... AS` is refused when a `mask` rule applies to it.
const MASK_EXECUTE_WRAPPED: &str = "it runs a prepared statement whose rows would go where masking cannot see them (EXPLAIN, CREATE TABLE AS); run EXECUTE alone";

/// Why an `EXECUTE` prepared by Parse is refused when the statement it
/// runs needs masking that its Parse did not plan for.
const MASK_EXECUTE_CHANGED: &str = "the prepared statement it runs needs masking that was not planned when the EXECUTE was prepared (it was prepared again since); prepare the EXECUTE again";

/// Why text sent behind an unanswered statement that may change how the
/// server reads text is refused (see [`super::super::reading`]).
const READING_CHANGED: &str = "tollgate: this statement was sent behind one that may change how the server reads statement text (SET or RESET of standard_conforming_strings, client_encoding or backslash_quote, RESET ALL, DISCARD ALL, set_config, a DO block, a function whose effect is unknown) in the same extended-protocol batch, or the server did not answer that one in time, so the proxy cannot read it as the server will; refused (send it after the Sync that ends that batch)";

/// Statements reached through `EXECUTE`s of `EXECUTE`s at most.
const MAX_EXECUTE_DEPTH: usize = 8;

/// Prepared statement names the proxy keeps for itself (the masking
/// lookup's, `tollgate_mask_<nonce>_s<k>`), as the server folds them.
const RESERVED_STATEMENT_PREFIX: &[u8] = b"tollgate_mask_";

/// The refusal of a `PREPARE` or Parse under a reserved name.
const RESERVED_STATEMENT_NAME: &str = "tollgate: prepared statement names starting with tollgate_mask_ are reserved for the proxy's masking; refused";

/// Command label for text that does not parse.
pub(super) const UNPARSABLE_COMMAND: &str = "statement";

/// Fail closed: a session whose events can no longer be recorded ends
/// before it forwards another statement (a relaxed atomic load when all
/// is well).
fn check_recording(ctx: &PostgresContext<'_>) -> Result<(), Stop> {
    match ctx.events.recording_failure() {
        None => Ok(()),
        Some(cause) => Err(Stop::Fatal {
            sqlstate: sqlstate::CANNOT_CONNECT_NOW,
            message: "tollgate: session ended: session recording has failed".to_owned(),
            reason: CloseReason::RecordingFailed(cause),
        }),
    }
}

/// The fields the session decides on in the client message `tag`, read
/// by the codec's [`frontend::decode_head`].
fn head(tag: u8, body: &[u8]) -> Result<Head<'_>, Stop> {
    frontend::decode_head(tag, body).map_err(Stop::protocol_violation)
}

/// A message whose [`Head`] is not the one its tag gives: cannot happen,
/// and ends the session rather than guess.
fn not_read(tag: u8) -> Stop {
    Stop::protocol_violation(format_args!("{} could not be read", message_name(tag)))
}

/// Whether `tag` is a message type clients send.
fn is_frontend_tag(tag: u8) -> bool {
    use frontend::tag::*;
    matches!(
        tag,
        BIND | CLOSE
            | COPY_DATA
            | COPY_DONE
            | COPY_FAIL
            | DESCRIBE
            | EXECUTE
            | FLUSH
            | FUNCTION_CALL
            | PARSE
            | PASSWORD
            | QUERY
            | SYNC
            | TERMINATE
    )
}

/// The client → server direction.
pub(super) struct ClientSide<'a> {
    pub(super) ctx: PostgresContext<'a>,
    /// The process behind the session, as policy rules see it.
    pub(super) identity: &'a ProcessIdentity,
    pub(super) shared: &'a BetweenSides,
    /// Bytes of a passed-through message still to come.
    pub(super) streaming: usize,
    /// Replacement bytes for [`Step::Replace`].
    pub(super) out: Vec<u8>,
    /// Decisions for statements of one shape, made once per policy.
    memo: RefCell<DecisionMemo>,
    /// What to mask in the answer to the Query or Parse just decided.
    pub(super) mask_plan: RefCell<Option<MaskPlan>>,
    /// Extended-protocol messages were sent since the last Sync.
    pub(super) extended_open: Cell<bool>,
    /// A masked batch is open: what the client sends up to its Sync is
    /// told to the upstream pump, in order.
    pub(super) batch_open: Cell<bool>,
    /// Bytes to send in front of the message just stepped (the masking
    /// lookup that opens a batch).
    pub(super) prefix: RefCell<Vec<u8>>,
    /// The wait for the server to be idle before this batch timed out
    /// (reset at Sync): its masked messages are refused.
    pub(super) waited: Cell<bool>,
    /// A statement that may change how the server reads statement text
    /// (see [`super::super::reading`]) was sent to run in this batch (the count of
    /// Syncs, Queries and FunctionCalls sent before it): until the server
    /// answered that batch, later text cannot be read as the server will.
    reading_changed: Cell<Option<u64>>,
    /// A wait for that answer timed out: text is refused until it comes.
    pub(super) reading_waited: Cell<bool>,
    /// A COPY FROM STDIN was sent to run and the client has not ended its
    /// data (CopyDone, CopyFail): its Syncs may be ignored.
    copy_open: Cell<bool>,
    /// Such a statement ran in the open transaction block, so ending the
    /// block (or rolling back to a savepoint) may change the reading back.
    reading_changed_in_block: Cell<bool>,
    /// The message just refused is text the analysis could not parse,
    /// refused by the default: the server reads it for its own syntax
    /// error (see [`ClientSide::substitute`]).
    server_reads_refused: Cell<bool>,
    /// The database user the session logged in as (reviewers see it).
    pub(super) database_user: Option<String>,
    /// A statement just decided `review`, for the pump to hold.
    pub(super) pending_review: RefCell<Option<PendingReview>>,
    /// The last statements decided, for reviewers of a later one (texts
    /// as sent, shortened; hidden from reviewers when the hold is made).
    recent: RefCell<crate::protocol::review::RecentStatements>,
    /// The outcome of the hold of the message about to be stepped again.
    pub(super) review_outcome: Option<ReviewOutcome>,
    /// That outcome while its message is decided.
    current_review: RefCell<Option<ReviewOutcome>>,
    /// The text being decided is a Query's or Parse's own, or a reviewed
    /// prepared statement's at its Bind, which can be held (a statement an
    /// `EXECUTE` runs cannot).
    holdable: Cell<bool>,
    /// The message just decided ran because a reviewer (or a grant)
    /// approved it.
    review_approved: Cell<bool>,
    /// The prepared statement whose Parse was just approved: its next Bind
    /// is the one execution the approval covers.
    approved_parse: RefCell<Option<Vec<u8>>>,
}

/// What a `review` decision comes to (see [`ClientSide::review`]).
enum ReviewStep {
    /// Hold the message.
    Hold,
    /// Run it as its other rules decide.
    Approved,
    /// Refuse it with this message.
    Refuse(String),
    /// Refuse it as the decision says.
    Refused,
}

/// The body of a held Query or Parse with a reviewer's `text` in place of
/// its own (a Parse keeps its name and parameter types).
fn edited_body(tag: u8, body: &[u8], text: &str) -> Result<Vec<u8>, Stop> {
    let mut out = Vec::with_capacity(body.len() + text.len());
    match head(tag, body)? {
        Head::Query(_) => {}
        Head::Parse { name, query } => {
            out.extend_from_slice(name);
            out.push(0);
            let types_at = name.len() + 1 + query.len() + 1;
            let types = body.get(types_at..).unwrap_or_default();
            out.extend_from_slice(text.as_bytes());
            out.push(0);
            out.extend_from_slice(types);
            return Ok(out);
        }
        _ => return Err(not_read(tag)),
    }
    out.extend_from_slice(text.as_bytes());
    out.push(0);
    Ok(out)
}

/// What a Query, Parse or FunctionCall may do while a statement that may
/// change how text is read is unanswered.
enum Reading {
    /// Nothing pending: analyse it under the settings the server reported.
    Settled,
    /// Sent in a later batch: wait for the server's answer.
    Wait,
    /// Sent in the same batch (or the wait timed out): refuse it.
    Refuse,
}

impl<'a> ClientSide<'a> {
    /// The client side of a session that has just started.
    pub(super) fn new(
        ctx: &PostgresContext<'a>,
        identity: &'a ProcessIdentity,
        shared: &'a BetweenSides,
        database_user: Option<String>,
    ) -> ClientSide<'a> {
        ClientSide {
            database_user,
            pending_review: RefCell::new(None),
            recent: RefCell::default(),
            review_outcome: None,
            current_review: RefCell::new(None),
            holdable: Cell::new(false),
            review_approved: Cell::new(false),
            approved_parse: RefCell::new(None),
            ctx: *ctx,
            identity,
            shared,
            streaming: 0,
            out: Vec::new(),
            memo: RefCell::default(),
            mask_plan: RefCell::new(None),
            server_reads_refused: Cell::new(false),
            extended_open: Cell::new(false),
            batch_open: Cell::new(false),
            prefix: RefCell::new(Vec::new()),
            waited: Cell::new(false),
            reading_changed: Cell::new(None),
            reading_waited: Cell::new(false),
            reading_changed_in_block: Cell::new(false),
            copy_open: Cell::new(false),
        }
    }

    pub(super) fn step(&mut self, data: &[u8]) -> Result<Step, Stop> {
        if self.streaming > 0 {
            let n = self.streaming.min(data.len());
            self.streaming -= n;
            return Ok(Step::Forward(n));
        }
        let Some(&tag) = data.first() else {
            return Ok(Step::Need(FrameHeader::SIZE));
        };
        if !is_frontend_tag(tag) {
            return Err(Stop::client_fault(
                sqlstate::PROTOCOL_VIOLATION,
                format!(
                    "tollgate: invalid message from the client: unknown message type {} (0x{tag:02x})",
                    printable(tag)
                ),
            ));
        }
        let limit = if self.shared.authenticated.load(Ordering::Relaxed) {
            frontend::max_len(tag)
        } else {
            MAX_PRE_AUTH_MESSAGE
        };
        let header = match frame(data, limit) {
            Err(e) => return Err(Stop::protocol_violation(e)),
            Ok(None) => return Ok(Step::Need(FrameHeader::SIZE)),
            Ok(Some(h)) => h,
        };
        use frontend::tag::*;
        if matches!(tag, PARSE | BIND | EXECUTE) && self.must_wait() {
            return Ok(Step::Wait);
        }
        match tag {
            QUERY | PARSE | FUNCTION_CALL => {
                check_recording(&self.ctx)?;
                if header.len > MAX_INSPECTED_MESSAGE {
                    return Err(Stop::client_fault(
                        PROGRAM_LIMIT_EXCEEDED,
                        format!(
                            "tollgate: a {} message of {} bytes exceeds the {MAX_INSPECTED_MESSAGE}-byte limit of statements the proxy analyses",
                            message_name(tag),
                            header.len
                        ),
                    ));
                }
                let Some(body) = header.body(data) else {
                    return Ok(Step::Need(header.len));
                };
                let reading = self.reading();
                if matches!(reading, Reading::Wait) {
                    return Ok(Step::Wait);
                }
                if tag != PARSE && !self.unfollow_batch() {
                    return Err(Stop::client_fault(
                        sqlstate::PROTOCOL_VIOLATION,
                        format!(
                            "tollgate: a {} inside an extended-protocol batch with a masked statement, before its Sync, cannot be told apart from the batch's answers; the session is closed",
                            message_name(tag)
                        ),
                    ));
                }
                // A held message stepped again: a reviewer's edit takes
                // its text's place and is decided like any other.
                let outcome = self.review_outcome.take();
                let edited = match &outcome {
                    Some(ReviewOutcome::Edited { text, .. }) => Some(edited_body(tag, body, text)?),
                    _ => None,
                };
                let body = edited.as_deref().unwrap_or(body);
                *self.current_review.get_mut() = outcome;
                self.holdable.set(tag != FUNCTION_CALL);
                let decided = match reading {
                    Reading::Refuse => {
                        tracing::warn!(session = %self.ctx.id, "refused: text sent behind an unanswered statement that may change how the server reads it");
                        Ok(Some(READING_CHANGED.to_owned()))
                    }
                    _ => self.decide(tag, body),
                };
                self.holdable.set(false);
                *self.current_review.get_mut() = None;
                let decided = decided?;
                if self.pending_review.get_mut().is_some() {
                    return Ok(Step::Hold);
                }
                if tag == PARSE {
                    self.follow_batch();
                    self.extended_open.set(true);
                    self.expect(Expect::Complete)?;
                } else {
                    self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
                    self.shared.prepared().batch_sent();
                }
                match decided {
                    None if self.mask_plan.get_mut().is_some() => {
                        self.masked_query(body);
                        Ok(Step::Replace(header.len))
                    }
                    None if !self.prefix.get_mut().is_empty() || edited.is_some() => {
                        match &edited {
                            Some(body) => {
                                let mut message = Vec::with_capacity(body.len() + 5);
                                let mut w = MessageWriter::new(&mut message, tag);
                                w.put_bytes(body);
                                w.finish();
                                self.prefixed(&message, message.len());
                            }
                            None => self.prefixed(data, header.len),
                        }
                        Ok(Step::Replace(header.len))
                    }
                    None => Ok(Step::Forward(header.len)),
                    Some(refusal) => {
                        self.substitute(tag, body, refusal)?;
                        // A lookup that opened a batch still goes first:
                        // the upstream pump expects its answer.
                        let prefix = std::mem::take(self.prefix.get_mut());
                        self.out.splice(0..0, prefix);
                        Ok(Step::Replace(header.len))
                    }
                }
            }
            SYNC => {
                if header.message(data).is_none() {
                    return Ok(Step::Need(header.len));
                }
                self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
                self.shared.prepared().batch_sent();
                if self.copy_open.get() {
                    self.shared.copy_syncs.fetch_add(1, Ordering::Relaxed);
                }
                self.extended_open.set(false);
                self.expect(Expect::Sync)?;
                self.batch_open.set(false);
                self.waited.set(false);
                Ok(Step::Forward(header.len))
            }
            DESCRIBE => {
                let Some(body) = header.body(data) else {
                    return Ok(Step::Need(header.len));
                };
                self.follow_batch();
                self.extended_open.set(true);
                let Head::Describe { kind } = head(tag, body)? else {
                    return Err(not_read(tag));
                };
                self.expect(if kind == b'S' {
                    Expect::DescribeStatement
                } else {
                    Expect::DescribePortal(None)
                })?;
                Ok(Step::Forward(header.len))
            }
            FLUSH => {
                if header.message(data).is_none() {
                    return Ok(Step::Need(header.len));
                }
                // A Flush asks the server to send what it has; it creates
                // nothing to answer, so it neither opens a batch nor makes
                // one pipelined (psycopg ends every pipeline and
                // `executemany` with Sync then Flush).
                Ok(Step::Forward(header.len))
            }
            BIND => {
                check_recording(&self.ctx)?;
                self.follow_batch();
                let step = self.bind(data, header)?;
                // After the Bind: a masked one may open a batch, which
                // only a batch's first message can.
                if !matches!(step, Step::Need(_)) {
                    self.extended_open.set(true);
                }
                Ok(step)
            }
            EXECUTE | CLOSE => {
                if tag == EXECUTE {
                    check_recording(&self.ctx)?;
                }
                let Some(body) = header.body(data) else {
                    return Ok(Step::Need(header.len));
                };
                self.follow_batch();
                if tag == CLOSE {
                    self.extended_open.set(true);
                    let Head::Close { kind, name } = head(tag, body)? else {
                        return Err(not_read(tag));
                    };
                    self.shared.prepared().close_sent(kind, name);
                    self.expect(Expect::Complete)?;
                    return Ok(Step::Forward(header.len));
                }
                let Head::Execute { portal } = head(tag, body)? else {
                    return Err(not_read(tag));
                };
                let step = self.execute(data, portal, header.len)?;
                self.extended_open.set(true);
                Ok(step)
            }
            COPY_DONE | COPY_FAIL => {
                self.copy_open.set(false);
                let n = header.len.min(data.len());
                self.streaming = header.len - n;
                Ok(Step::Forward(n))
            }
            TERMINATE => match header.message(data) {
                Some(_) => Ok(Step::Last(header.len)),
                None => Ok(Step::Need(header.len)),
            },
            _ => {
                let n = header.len.min(data.len());
                self.streaming = header.len - n;
                Ok(Step::Forward(n))
            }
        }
    }

    /// Decides a Query, Parse or FunctionCall; `Some(message)` when refused.
    fn decide(&self, tag: u8, body: &[u8]) -> Result<Option<String>, Stop> {
        use frontend::tag::*;
        self.server_reads_refused.set(false);
        self.review_approved.set(false);
        let text: &[u8];
        let owned;
        let mut statement_name: &[u8] = b"";
        let mut fast_path = None;
        match head(tag, body)? {
            Head::Query(query) => text = query,
            Head::Parse { name, query } => {
                statement_name = name;
                text = query;
            }
            Head::FunctionCall { oid } => {
                fast_path = fastpath::builtin_function(oid).map(|name| (name, oid));
                owned = match fast_path {
                    Some((name, oid)) => fastpath::text(name, oid),
                    None => format!("FunctionCall oid {oid}"),
                };
                text = owned.as_bytes();
            }
            _ => return Err(not_read(tag)),
        }
        let (text, analysis) = match fast_path {
            // A built-in the catalog numbers the same in every version:
            // decided as a call of the function it names.
            Some((name, oid)) => {
                let text = fastpath::text(name, oid);
                let analysis = Arc::new(crate::sql::function_call(name, &text));
                (std::borrow::Cow::Owned(text), analysis)
            }
            None => self.analyse(text),
        };
        let policy = current_policy(&self.ctx.policy);
        let ops = prepared::sql_ops(&analysis);
        let prepares_reserved = ops.iter().any(|(op, _)| match op {
            SqlOp::Prepare(name) => name.starts_with(RESERVED_STATEMENT_PREFIX),
            _ => false,
        });
        if prepares_reserved || statement_name.starts_with(RESERVED_STATEMENT_PREFIX) {
            // Another statement under the prepared lookup's name would
            // answer for it (see `mask::PreparedLookup`).
            tracing::warn!(session = %self.ctx.id, "refused: a statement prepared under a name reserved for masking");
            return Ok(Some(RESERVED_STATEMENT_NAME.to_owned()));
        }
        // A FunctionCall's result is not masked.
        let unmaskable = (tag == FUNCTION_CALL).then_some(MASK_EXTENDED);
        let mut refusal =
            self.decide_with_executed(&policy, &text, &analysis, &ops, None, unmaskable);
        if refusal.is_some() {
            self.mask_plan.take();
        }
        // A masked Parse opens (or joins) a masked batch.
        let mut mask = None;
        if tag == PARSE && refusal.is_none() {
            if let Some(plan) = self.mask_plan.take() {
                let plan = Arc::new(plan);
                refusal = self.join_batch(&plan, MaskedMessage::Parse);
                mask = Some(plan);
            }
        }
        if tag != PARSE && refusal.is_none() {
            // A Query runs now, and a FunctionCall (unknown effect) too.
            self.note_reading_change(&analysis);
            self.note_copy_in(&analysis);
        }
        if tag == QUERY && refusal.is_none() && !ops.is_empty() {
            let refusal = self.sql_sent(&policy, &ops);
            if refusal.is_some() {
                self.mask_plan.take();
            }
            return Ok(refusal);
        }
        if tag == PARSE && refusal.is_none() {
            let mut prepared = self.shared.prepared();
            if !prepared.has_room() {
                return Ok(Some(too_many_prepared()));
            }
            let reviewed = self.review_approved.get();
            if reviewed {
                *self.approved_parse.borrow_mut() = Some(statement_name.to_vec());
            }
            prepared.parse_sent(
                statement_name,
                Decided {
                    text: Arc::from(&*text),
                    analysis,
                    policy: Arc::downgrade(&policy),
                    mask,
                    reviewed,
                },
            );
        }
        Ok(refusal)
    }

    /// Decides a prepared statement again (a reload since it was decided):
    /// refused where it now needs masking, which a Bind cannot add.
    fn decide_prepared_again(
        &self,
        policy: &Arc<crate::policy::PolicySet>,
        decided: &Decided,
        ops: &[(SqlOp, &crate::sql::StatementSummary)],
    ) -> Option<String> {
        self.decide_with_executed(
            policy,
            &decided.text,
            &decided.analysis,
            ops,
            None,
            Some(MASK_EXTENDED),
        )
    }

    /// Decides analysed text under `policy` and reports the decisions;
    /// `Some(message for the client)` when refused, naming `label` (when
    /// given) rather than the refused statement's command. `unmaskable`:
    /// why the result cannot be masked, `None` for a fresh Query or Parse,
    /// whose result can.
    fn decide_labelled(
        &self,
        policy: &crate::policy::PolicySet,
        text: &str,
        analysis: &Analysis,
        label: Option<&str>,
        unmaskable: Option<&'static str>,
    ) -> Option<String> {
        let decisions =
            self.memo
                .borrow_mut()
                .decide(policy, &self.ctx.target, self.identity, text, analysis);
        let mut approved = false;
        if most_restrictive(&decisions).is_some_and(|d| d.action == Action::Review) {
            match self.review(text, analysis, label, &decisions) {
                ReviewStep::Hold => return Some(String::new()),
                ReviewStep::Refuse(message) => {
                    self.report(text, analysis, &decisions, &decisions, false);
                    return Some(message);
                }
                ReviewStep::Approved => {
                    approved = true;
                    self.review_approved.set(true);
                }
                ReviewStep::Refused => {}
            }
        }
        // Approved: what the statement's other rules decide.
        let effective: std::borrow::Cow<'_, [Decision]> = if approved {
            decisions.iter().map(Decision::reviewed).collect()
        } else {
            std::borrow::Cow::Borrowed(&decisions[..])
        };
        let top = most_restrictive(&effective);
        if top.is_some_and(|d| d.action == Action::Mask) {
            let refusal = self.plan_mask(&effective, analysis, label, unmaskable);
            self.report(text, analysis, &decisions, &effective, refusal.is_some());
            return refusal;
        }
        self.report(text, analysis, &decisions, &effective, false);
        let top = top.filter(|d| d.action.is_refused())?;
        let command = match (label, analysis) {
            (Some(label), _) => label,
            (None, Analysis::Parsed { statements }) => decisions
                .iter()
                .position(|d| std::ptr::eq(d, top))
                .and_then(|i| statements.get(i))
                .map_or(UNPARSABLE_COMMAND, |s| &*s.command),
            (None, Analysis::Unparsable { .. }) => UNPARSABLE_COMMAND,
        };
        // No rule refused it, only the default for text the analysis could
        // not read: the client gets the server's own syntax error where the
        // server has one.
        self.server_reads_refused.set(
            label.is_none()
                && matches!(analysis, Analysis::Unparsable { .. })
                && top.deciding_rule().is_none(),
        );
        tracing::debug!(
            session = %self.ctx.id,
            transaction_status = %char::from(self.shared.tx_status.load(Ordering::Relaxed)),
            "substituting a failing message for a refused statement"
        );
        Some(top.client_message(command))
    }

    /// What a `review` decision on `text` comes to: held (the pump holds
    /// the message, nothing is reported yet), approved (by the outcome of
    /// its hold, or a grant), refused with the outcome's message, or
    /// refused as any refused statement is (it cannot be held here).
    fn review(
        &self,
        text: &str,
        analysis: &Analysis,
        label: Option<&str>,
        decisions: &[Decision],
    ) -> ReviewStep {
        if label.is_some() || !self.holdable.get() {
            return ReviewStep::Refused;
        }
        let current = self.current_review.borrow();
        match current.as_ref() {
            Some(ReviewOutcome::Approved { held_text }) if held_text == text => {
                return ReviewStep::Approved
            }
            Some(ReviewOutcome::Refused {
                held_text,
                message,
                sqlstate,
            }) if held_text == text => {
                *self
                    .shared
                    .next_denial_sqlstate
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(sqlstate);
                return ReviewStep::Refuse(message.clone());
            }
            // The reviewer's edit needs review itself: the approvals
            // counted for the edit cover it under the rule that held it,
            // not under another rule, whose approvers were not asked.
            Some(ReviewOutcome::Edited { rule, .. }) => {
                let by = most_restrictive(decisions)
                    .and_then(|d| d.deciding_rule())
                    .map(|r| r.name.to_string())
                    .unwrap_or_default();
                if by == *rule {
                    return ReviewStep::Approved;
                }
                return ReviewStep::Refuse(format!(
                    "tollgate: the statement as a reviewer edited it requires review by rule \"{by}\", whose approvers were not asked (the held statement's rule was \"{rule}\"); refused"
                ));
            }
            _ => {}
        }
        drop(current);
        let Some(desk) = self.ctx.approvals.as_ref() else {
            return ReviewStep::Refused;
        };
        let Some(top) = most_restrictive(decisions) else {
            return ReviewStep::Refused;
        };
        let Some(settings) = top.deciding_rule().and_then(|r| r.review.as_ref()) else {
            return ReviewStep::Refused;
        };
        let fingerprint = review::fingerprint(analysis);
        if let Some(shape) = &fingerprint {
            let grant = desk.grant_for(
                &self.ctx.target,
                shape,
                self.identity,
                settings.grant_hours,
                std::time::SystemTime::now(),
            );
            if let Some(grant) = grant {
                review::grant_used(&self.ctx, &grant);
                return ReviewStep::Approved;
            }
        }
        if text.len() > crate::approval::registry::MAX_TEXT {
            return ReviewStep::Refuse(format!(
                "tollgate: this statement requires review, and at {} bytes it is longer than the {} bytes a review request holds; refused",
                text.len(),
                crate::approval::registry::MAX_TEXT
            ));
        }
        *self.pending_review.borrow_mut() = Some(PendingReview {
            decision: top.clone(),
            text: text.to_owned(),
            fingerprint,
            session_so_far: self.recent.borrow().to_vec(),
        });
        ReviewStep::Hold
    }

    /// Whether text arriving now can be analysed under the settings the
    /// server reported, must wait for its answer to a statement that may
    /// change them, or is refused (sent in the same batch as that
    /// statement, which the server answers only at Sync, or the wait
    /// timed out).
    fn reading(&self) -> Reading {
        let Some(batch) = self.reading_changed.get() else {
            return Reading::Settled;
        };
        let (sent, answered) = self.shared.prepared().batches();
        if answered > batch {
            self.reading_changed.set(None);
            self.reading_waited.set(false);
            if self.shared.tx_status.load(Ordering::Relaxed) == b'I' {
                self.reading_changed_in_block.set(false);
            }
            return Reading::Settled;
        }
        if sent == batch || self.reading_waited.get() {
            return Reading::Refuse;
        }
        Reading::Wait
    }

    /// Records that `analysis` is about to run, if it may change how the
    /// server reads later text.
    fn note_reading_change(&self, analysis: &Analysis) {
        let in_block = self.reading_changed_in_block.get();
        if super::super::reading::may_change_reading(analysis, in_block) {
            let (sent, _) = self.shared.prepared().batches();
            self.reading_changed.set(Some(sent));
            self.reading_changed_in_block.set(true);
        }
    }

    /// Records that `analysis` is about to run, if it holds a COPY into a
    /// table (FROM STDIN, whose Syncs the server may ignore).
    fn note_copy_in(&self, analysis: &Analysis) {
        let Analysis::Parsed { statements } = analysis else {
            return;
        };
        if statements
            .iter()
            .any(|s| s.kind == crate::sql::StatementKind::Copy && !s.tables_written.is_empty())
        {
            self.copy_open.set(true);
        }
    }

    /// Whether the message about to be stepped starts an extended-protocol
    /// batch while answers are still in flight, under a policy that masks:
    /// it waits for them, since a masked statement can open a batch only
    /// when the server's next answer is known to be its lookup's. (Waiting
    /// for every batch start, not only masked ones, keeps the decision from
    /// being made, and reported, twice.)
    fn must_wait(&self) -> bool {
        !self.extended_open.get()
            && !self.batch_open.get()
            && !self.waited.get()
            && self.shared.in_flight.load(Ordering::Relaxed) > 0
            && current_policy(&self.ctx.policy).masks_target(&self.ctx.target)
    }

    /// Tells the upstream pump what the message being forwarded will be
    /// answered with, when a masked batch is open.
    fn expect(&self, answer: Expect) -> Result<(), Stop> {
        if !self.batch_open.get() {
            return Ok(());
        }
        let room = self
            .shared
            .batch()
            .as_mut()
            .is_none_or(|batch| batch.expect(answer));
        // A batch only followed, with nothing masked in it, is let go.
        if room || self.unfollow_batch() {
            return Ok(());
        }
        Err(Stop::client_fault(
            PROGRAM_LIMIT_EXCEEDED,
            format!(
                "tollgate: more than {} messages in one batch with a masked statement",
                super::super::mask::MAX_EXPECTED
            ),
        ))
    }

    /// Decides analysed text (its prepared-statement operations `ops`)
    /// under `policy`, then, every time, each named statement it
    /// `EXECUTE`s by that statement's own analysis (a refusal names
    /// `EXECUTE`); `Some(message)` when refused. A lone `EXECUTE` of a
    /// masked statement adds that statement's masking to `mask_plan` at the
    /// `EXECUTE`'s place (its rows are the statement's rows); under
    /// `EXPLAIN` or `CREATE TABLE ... AS` it is refused. An `EXECUTE` of a
    /// name the session never saw prepared fails closed when any rule
    /// could apply. `via` is the `EXECUTE` that runs the text, if one does
    /// (its refusals name that `EXECUTE`).
    fn decide_with_executed(
        &self,
        policy: &Arc<crate::policy::PolicySet>,
        text: &str,
        analysis: &Analysis,
        ops: &[(SqlOp, &crate::sql::StatementSummary)],
        via: Option<Executed<'_>>,
        unmaskable: Option<&'static str>,
    ) -> Option<String> {
        let (label, depth) = via.map_or((None, 0), |v| (Some(v.label), v.depth));
        if let Some(refusal) = self.decide_labelled(policy, text, analysis, label, unmaskable) {
            return Some(refusal);
        }
        let statements = match analysis {
            Analysis::Parsed { statements } => statements.as_slice(),
            Analysis::Unparsable { .. } => &[],
        };
        // The text's own masking; the executed statements' is added to it.
        let mut plan = self.mask_plan.borrow_mut().take();
        for (i, (op, statement)) in ops.iter().enumerate() {
            let SqlOp::Execute(name) = op else {
                continue;
            };
            // Prepared earlier in the same text (and decided with it), or
            // deallocated there (the server fails the EXECUTE): the server
            // stops a Query at its first error, so nothing older runs.
            let replaced = ops.iter().take(i).any(|(earlier, _)| match earlier {
                SqlOp::Prepare(n) | SqlOp::Deallocate(n) => n == name,
                SqlOp::DeallocateAll => true,
                SqlOp::Execute(_) => false,
            });
            if replaced {
                continue;
            }
            let shown = String::from_utf8_lossy(name);
            let candidates = self.shared.prepared().candidates(name);
            if candidates.is_empty() {
                // With no rule, the default decides every statement alike,
                // and it decided this one above.
                if policy.rule_count() == 0 {
                    continue;
                }
                tracing::warn!(session = %self.ctx.id, statement = %shown, "refused: EXECUTE of a prepared statement the session did not see prepared");
                return Some(format!("tollgate: EXECUTE of prepared statement \"{shown}\" refused: it was not prepared through the proxy in this session (it does not exist, or a function or DO block prepared it), so what it runs cannot be decided"));
            }
            if depth >= MAX_EXECUTE_DEPTH {
                return Some(format!("tollgate: EXECUTE of prepared statement \"{shown}\" refused: it runs EXECUTEs nested deeper than {MAX_EXECUTE_DEPTH}"));
            }
            // A lone EXECUTE returns the statement's rows, which can be
            // masked; under EXPLAIN or CREATE TABLE AS they go elsewhere.
            let lone = statement.kind == crate::sql::StatementKind::Prepared;
            let (label, why) = if lone {
                ("EXECUTE".to_owned(), unmaskable)
            } else {
                (
                    format!("{} EXECUTE", statement.command),
                    Some(MASK_EXECUTE_WRAPPED),
                )
            };
            let at = statements.iter().position(|s| std::ptr::eq(s, *statement));
            for decided in candidates {
                let inner_ops = prepared::sql_ops(&decided.analysis);
                let refusal = self.decide_with_executed(
                    policy,
                    &decided.text,
                    &decided.analysis,
                    &inner_ops,
                    Some(Executed {
                        label: &label,
                        depth: depth.saturating_add(1),
                    }),
                    why,
                );
                let executed_plan = self.mask_plan.borrow_mut().take();
                if let Some(refusal) = refusal {
                    return Some(refusal);
                }
                if let (Some(executed_plan), Some(at)) = (executed_plan, at) {
                    merge_executed_plan(&mut plan, statements.len(), at, executed_plan);
                }
            }
        }
        *self.mask_plan.borrow_mut() = plan;
        None
    }

    /// The statement a SQL `PREPARE` prepares, as an `EXECUTE` of it will
    /// be decided: the analysis of the statement after its `AS` (a query
    /// that an `EXECUTE` alone returns rows of, and masking can mask), or,
    /// when that cannot be had, the `PREPARE` itself (kind `prepared`, with
    /// the tables and flags of what it prepares, which masking refuses).
    fn sql_prepared(&self, statement: &crate::sql::StatementSummary) -> Decided {
        let whole = || Decided {
            text: Arc::from(statement.text.as_str()),
            analysis: Arc::new(Analysis::Parsed {
                statements: vec![statement.clone()],
            }),
            policy: std::sync::Weak::new(),
            mask: None,
            reviewed: false,
        };
        let Some(query) = prepared::prepared_query_text(&statement.text) else {
            return whole();
        };
        let analysis = self.ctx.analysis.analyze_read(query, self.text_reading());
        match &*analysis {
            Analysis::Parsed { statements } if statements.len() == 1 => Decided {
                text: Arc::from(query),
                analysis,
                policy: std::sync::Weak::new(),
                mask: None,
                reviewed: false,
            },
            _ => whole(),
        }
    }

    /// Tracks the SQL `PREPARE`s and `DEALLOCATE`s of allowed text about to
    /// be forwarded to run; `Some(message)` when its `PREPARE`s would go
    /// past [`MAX_TRACKED`] (a `DEALLOCATE` is never refused for room: it
    /// is how a client makes some).
    fn sql_sent(
        &self,
        policy: &Arc<crate::policy::PolicySet>,
        ops: &[(SqlOp, &crate::sql::StatementSummary)],
    ) -> Option<String> {
        let mut prepared = self.shared.prepared();
        let prepares = ops
            .iter()
            .filter(|(op, _)| matches!(op, SqlOp::Prepare(_)))
            .count();
        if prepares > 0 && !prepared.has_room_for(prepares) {
            return Some(too_many_prepared());
        }
        for (op, statement) in ops {
            match op {
                SqlOp::Prepare(name) => prepared.prepare_sent(
                    name,
                    Decided {
                        policy: Arc::downgrade(policy),
                        mask: None,
                        reviewed: false,
                        ..self.sql_prepared(statement)
                    },
                ),
                SqlOp::Deallocate(name) => prepared.deallocate_sent(name),
                SqlOp::Execute(_) | SqlOp::DeallocateAll => {}
            }
        }
        None
    }

    /// A Bind: forwarded as it is, unless the statement it binds was allowed
    /// under an earlier policy and the current one refuses it; then it is
    /// replaced by a Bind of a statement that does not exist, which the
    /// server fails like the refused one, discarding up to Sync.
    fn bind(&mut self, data: &[u8], header: FrameHeader) -> Result<Step, Stop> {
        // The portal and statement names come first; the parameters, which
        // can be large, are passed through unless the Bind is replaced.
        let here = data
            .get(FrameHeader::SIZE..header.len.min(data.len()))
            .unwrap_or_default();
        let Some((portal, statement)) = frontend::bind_names(here) else {
            if here.len() + FrameHeader::SIZE >= header.len {
                return Err(Stop::protocol_violation(
                    "Bind: the portal and statement names are not terminated",
                ));
            }
            if here.len() >= MAX_BIND_NAMES {
                return Err(Stop::client_fault(
                    PROGRAM_LIMIT_EXCEEDED,
                    format!("tollgate: Bind names longer than {MAX_BIND_NAMES} bytes"),
                ));
            }
            return Ok(Step::Need(
                header.len.min(FrameHeader::SIZE + MAX_BIND_NAMES),
            ));
        };
        let policy = current_policy(&self.ctx.policy);
        if self.shared.prepared().redefined_earlier(statement) {
            // Which statement this binds is known once that is answered.
            if !self.waited.get() {
                return Ok(Step::Wait);
            }
            let shown = String::from_utf8_lossy(statement);
            let refusal = format!("tollgate: Bind of prepared statement \"{shown}\" refused: a Parse or PREPARE of that name is still unanswered by the server, so which statement it binds is not known; send the Bind after that answer");
            return self.replace_bind(data, header, portal, refusal);
        }
        let known = self.shared.prepared().statement(statement).cloned();
        let forward = |side: &mut Self| {
            let n = header.len.min(data.len());
            side.streaming = header.len - n;
            Ok(Step::Forward(n))
        };
        let Some(mut decided) = known else {
            // Not prepared in a way this session saw (a Parse, or a SQL
            // PREPARE of its own): absent (the server's error), or prepared
            // by a function or DO block, which nothing decided. With no
            // rule, the default decides every statement alike.
            if policy.rule_count() == 0 {
                self.expect(Expect::Complete)?;
                return forward(self);
            }
            let shown = String::from_utf8_lossy(statement);
            tracing::warn!(session = %self.ctx.id, statement = %shown, "refused: Bind of a prepared statement the session did not see prepared");
            let refusal = format!("tollgate: Bind of prepared statement \"{shown}\" refused: it was not prepared through the proxy in this session (it does not exist, or a function or DO block prepared it), so what it runs cannot be decided");
            return self.replace_bind(data, header, portal, refusal);
        };
        if !self.shared.prepared().has_room() {
            return self.replace_bind(data, header, portal, too_many_prepared());
        }
        // An approval covers one execution: the Bind right after the
        // approved Parse. Any other Bind of a reviewed statement is decided
        // again, and held for a review of its own (or runs under a grant).
        let covered = decided.reviewed
            && self
                .approved_parse
                .get_mut()
                .take_if(|name| name.as_slice() == statement)
                .is_some();
        let review_again = decided.reviewed && !covered;
        if decided.is_stale(&policy) || review_again {
            // Decide once the whole message is here, so that a refused one
            // can be replaced (the decision is reported once).
            let why = if review_again {
                "a prepared statement that requires review"
            } else {
                "a statement the new policy must decide again"
            };
            if let Some(step) = hold_whole_bind(header, data, why) {
                return step;
            }
            let outcome = self.review_outcome.take();
            if let Some(ReviewOutcome::Edited { .. }) = outcome {
                let refusal = "tollgate: a reviewer's edit cannot replace one execution of a prepared statement (the edit would need a Parse of its own); refused".to_owned();
                return self.replace_bind(data, header, portal, refusal);
            }
            *self.current_review.get_mut() = outcome;
            self.holdable.set(review_again);
            let ops = prepared::sql_ops(&decided.analysis);
            let refusal = self.decide_prepared_again(&policy, &decided, &ops);
            self.holdable.set(false);
            *self.current_review.get_mut() = None;
            if self.pending_review.get_mut().is_some() {
                return Ok(Step::Hold);
            }
            if let Some(refusal) = refusal {
                return self.replace_bind(data, header, portal, refusal);
            }
            if decided.is_stale(&policy) {
                self.shared
                    .prepared()
                    .reallowed_statement(statement, &policy);
                decided.policy = Arc::downgrade(&policy);
            }
        }
        if let Some(plan) = decided.mask.clone() {
            // A lookup may go in front of the whole Bind (a batch opens
            // here, or one followed from its start has its first masked
            // statement here).
            if let Some(step) = hold_whole_bind(header, data, "a statement that requires masking") {
                return step;
            }
            if let Some(refusal) = self.join_batch(&plan, MaskedMessage::Bind) {
                return self.replace_bind(data, header, portal, refusal);
            }
            self.expect(Expect::Complete)?;
            self.shared.prepared().bind_sent(portal, decided);
            if self.prefix.get_mut().is_empty() {
                return Ok(Step::Forward(header.len));
            }
            self.prefixed(data, header.len);
            return Ok(Step::Replace(header.len));
        }
        self.expect(Expect::Complete)?;
        self.shared.prepared().bind_sent(portal, decided);
        forward(self)
    }

    fn replace_bind(
        &mut self,
        data: &[u8],
        header: FrameHeader,
        portal: &[u8],
        refusal: String,
    ) -> Result<Step, Stop> {
        if header.len > data.len() {
            return Ok(Step::Need(header.len));
        }
        self.expect(Expect::Complete)?;
        let missing = self.shared.register_denial(refusal);
        self.out.clear();
        let mut w = MessageWriter::new(&mut self.out, frontend::tag::BIND);
        w.put_cstr_bytes(portal)
            .put_cstr(&missing)
            .put_i16(0)
            .put_i16(0)
            .put_i16(0);
        w.finish();
        Ok(Step::Replace(header.len))
    }

    /// An Execute (whole): forwarded, unless its portal's statement was
    /// allowed under an earlier policy and the current one refuses it; then
    /// it is replaced by an Execute of a portal that does not exist. A SQL
    /// `PREPARE` or `DEALLOCATE` in the portal is tracked from here, where
    /// it runs.
    fn execute(&mut self, data: &[u8], portal: &[u8], len: usize) -> Result<Step, Stop> {
        let policy = current_policy(&self.ctx.policy);
        let Some(decided) = self.shared.prepared().portal(portal).cloned() else {
            self.expect(Expect::Execute(None))?;
            return Ok(Step::Forward(len));
        };
        let ops = prepared::sql_ops(&decided.analysis);
        // A SQL EXECUTE runs whatever the name holds now: decided every
        // time, as the statement it runs.
        let executes = ops.iter().any(|(op, _)| matches!(op, SqlOp::Execute(_)));
        let refusal = if executes {
            self.decide_portal_execute(&policy, &decided, &ops)
        } else if decided.is_stale(&policy) {
            self.decide_prepared_again(&policy, &decided, &ops)
        } else {
            None
        };
        if refusal.is_none() && decided.is_stale(&policy) {
            self.shared.prepared().reallowed_portal(portal, &policy);
        }
        // A PREPARE or DEALLOCATE sent by Parse runs here.
        let refusal = match refusal {
            None if !ops.is_empty() => self.sql_sent(&policy, &ops),
            refusal => refusal,
        };
        // A masked portal: the proxy's Describe of it goes in front, so
        // that the rows' fields are known (behind the lookup when a batch
        // opens here).
        let refusal = match (refusal, &decided.mask) {
            (None, Some(plan)) => self.join_batch(plan, MaskedMessage::Execute),
            (refusal, _) => refusal,
        };
        if refusal.is_none() {
            self.note_reading_change(&decided.analysis);
            self.note_copy_in(&decided.analysis);
        }
        match (refusal, &decided.mask) {
            (None, None) => {
                self.expect(Expect::Execute(None))?;
                Ok(Step::Forward(len))
            }
            (None, Some(plan)) => {
                let computed = plan.statements.first().copied().flatten();
                match DirectFields::of(plan) {
                    Some(direct) => self.expect(Expect::DescribeDirect(computed, direct))?,
                    None => self.expect(Expect::DescribePortal(Some(computed)))?,
                }
                self.expect(Expect::Execute(None))?;
                let mut describe = std::mem::take(self.prefix.get_mut());
                let mut w = MessageWriter::new(&mut describe, frontend::tag::DESCRIBE);
                w.put_u8(b'P').put_cstr_bytes(portal);
                w.finish();
                *self.prefix.get_mut() = describe;
                self.prefixed(data, len);
                Ok(Step::Replace(len))
            }
            (Some(refusal), _) => {
                self.expect(Expect::Execute(None))?;
                let missing = self.shared.register_denial(refusal);
                self.out.clear();
                let mut w = MessageWriter::new(&mut self.out, frontend::tag::EXECUTE);
                w.put_cstr(&missing).put_i32(0);
                w.finish();
                Ok(Step::Replace(len))
            }
        }
    }

    /// Decides a portal whose statement is a SQL `EXECUTE` (`ops`), as it
    /// runs now: a result to mask is masked only when the plan made at
    /// its Parse (which its Describe and the batch's lookup follow) covers
    /// what it needs now; `Some(message)` when refused.
    fn decide_portal_execute(
        &self,
        policy: &Arc<crate::policy::PolicySet>,
        decided: &Decided,
        ops: &[(SqlOp, &crate::sql::StatementSummary)],
    ) -> Option<String> {
        let unmaskable = decided.mask.is_none().then_some(MASK_EXECUTE_CHANGED);
        let refusal = self.decide_with_executed(
            policy,
            &decided.text,
            &decided.analysis,
            ops,
            None,
            unmaskable,
        );
        let needed = self.mask_plan.borrow_mut().take();
        refusal.or_else(|| match (needed, &decided.mask) {
            (Some(needed), Some(known)) if !covers(known, &needed) => {
                Some(format!("tollgate: EXECUTE refused: {MASK_EXECUTE_CHANGED}"))
            }
            _ => None,
        })
    }

    /// The analysis of statement bytes, failing closed on what cannot be
    /// read as the analyser reads it.
    fn analyse<'t>(&self, text: &'t [u8]) -> (std::borrow::Cow<'t, str>, Arc<Analysis>) {
        let unparsable = |text: std::borrow::Cow<'t, str>, error: &str| {
            let analysis = Arc::new(Analysis::Unparsable {
                error: error.to_owned(),
            });
            (text, analysis)
        };
        let encoding = self.shared.client_encoding.load(Ordering::Relaxed);
        let text: std::borrow::Cow<'t, str> = if encoding == ENCODING_LATIN1 && !text.is_ascii() {
            text.iter()
                .map(|&b| char::from(b))
                .collect::<String>()
                .into()
        } else {
            match std::str::from_utf8(text) {
                Ok(text) => text.into(),
                Err(_) if encoding == ENCODING_UTF8 => {
                    return unparsable(
                        String::from_utf8_lossy(text),
                        "the statement text is not valid UTF-8",
                    )
                }
                Err(_) => String::from_utf8_lossy(text),
            }
        };
        if encoding == ENCODING_OTHER && !text.is_ascii() {
            return unparsable(
                text,
                "client_encoding is neither UTF8 nor LATIN1 and the text is not ASCII; the analysis reads UTF-8 and LATIN1 only",
            );
        }
        let analysis = self.ctx.analysis.analyze_read(&text, self.text_reading());
        (text, analysis)
    }

    /// How the server reads backslashes in plain literals now, as it last
    /// reported (a change in flight makes later text wait: `reading.rs`).
    pub(super) fn text_reading(&self) -> LiteralReading {
        if self.shared.backslash_escapes.load(Ordering::Relaxed) {
            LiteralReading::BackslashEscapes
        } else {
            LiteralReading::Standard
        }
    }

    /// One Statement event per decided statement.
    /// Reports each statement's decision (`mask_refused`: the message's
    /// `mask` statements cannot be masked, so they do not run) and counts
    /// it.
    /// `effective`: what each statement came to (its decision once a
    /// reviewer approved it; else the decision itself), for `refused`.
    fn report(
        &self,
        text: &str,
        analysis: &Analysis,
        decisions: &[Decision],
        effective: &[Decision],
        mask_refused: bool,
    ) {
        let session = self.ctx.id;
        crate::intervene::act_on(decisions, self.identity, session, &self.ctx.events);
        let now = crate::approval::unix_seconds(std::time::SystemTime::now());
        let event = |text: &str,
                     command: Arc<str>,
                     kind,
                     fingerprint: Option<Arc<str>>,
                     (d, came_to): (&Decision, &Decision)| {
            self.ctx.target_metrics.statement(d.action);
            let refused =
                came_to.action.is_refused() || (mask_refused && came_to.action == Action::Mask);
            let statement = Arc::new(StatementEvent::decided(
                session,
                text,
                command,
                kind,
                fingerprint,
                d,
                refused,
            ));
            self.recent.borrow_mut().remember(now, &statement);
            SessionEvent::Statement(statement)
        };
        match analysis {
            Analysis::Parsed { statements } => {
                for (s, d) in statements.iter().zip(decisions.iter().zip(effective)) {
                    self.ctx.events.emit(&event(
                        &s.text,
                        Arc::clone(&s.command),
                        Some(s.kind),
                        Some(Arc::clone(&s.fingerprint)),
                        d,
                    ));
                }
            }
            Analysis::Unparsable { .. } => {
                for d in decisions.iter().zip(effective) {
                    self.ctx.events.emit(&event(
                        text,
                        Arc::from(UNPARSABLE_COMMAND),
                        None,
                        None,
                        d,
                    ));
                }
            }
        }
    }

    /// Writes the substitute of a refused message into `out`.
    ///
    /// The substitute fails on the server with an error that quotes a
    /// marker, which the upstream pump replaces by `refusal`. For text the
    /// analysis could not parse and no rule refused, the substitute is the
    /// client's own text followed by [`unparsable_guard`]: the server parses
    /// a whole message before it runs any of it, so either the client's
    /// text has a syntax error of its own, which the server reports as it
    /// would have (message, SQLSTATE and position, so psql prints the same
    /// `LINE 1: ... ^`), or the server reaches the guard, which cannot
    /// parse, and its error quotes the marker. Nothing of the text runs
    /// either way.
    fn substitute(&mut self, tag: u8, body: &[u8], refusal: String) -> Result<(), Stop> {
        let server_reads = self.server_reads_refused.take();
        self.out.clear();
        let (name, client_text) = match head(tag, body)? {
            Head::Parse { name, query } => (Some(name), server_reads.then_some(query)),
            Head::Query(query) => (None, server_reads.then_some(query)),
            _ => (None, None),
        };
        let mut sql = Vec::new();
        match client_text {
            Some(text) => {
                let marker = self.shared.register_denial(refusal);
                sql.extend_from_slice(text);
                sql.extend_from_slice(unparsable_guard(&marker).as_bytes());
                // A Query was counted as a batch of its own already; a
                // Parse belongs to the batch its Sync will end.
                let (sent, _) = self.shared.prepared().batches();
                let batch = if name.is_some() {
                    sent
                } else {
                    sent.saturating_sub(1)
                };
                self.shared.guard_sent(batch, text);
            }
            None => sql.extend_from_slice(self.shared.substitute_sql(refusal).as_bytes()),
        }
        match name {
            Some(name) => {
                let mut w = MessageWriter::new(&mut self.out, frontend::tag::PARSE);
                w.put_cstr_bytes(name).put_cstr_bytes(&sql).put_i16(0);
                w.finish();
            }
            None => {
                let mut w = MessageWriter::new(&mut self.out, frontend::tag::QUERY);
                w.put_cstr_bytes(&sql);
                w.finish();
            }
        }
        Ok(())
    }
}

/// What follows refused unparsable text in its substitute: text that can
/// never parse, whatever state the client's text leaves the lexer in. It
/// holds no quote, `$`, `*/` or backslash, so it cannot close a string,
/// identifier, dollar quote or comment the client's text left open (the
/// lexer then fails on that, quoting the marker); its newline ends a `--`
/// comment; where a statement can end, the `;` is taken and two
/// identifiers are no statement (an error quoting `marker`); where it
/// cannot, the error is at the `;`, which the upstream pump turns into the
/// server's `syntax error at end of input` for the text alone.
pub(super) fn unparsable_guard(marker: &str) -> String {
    format!("\n;\n{marker} {marker}")
}

/// The `EXECUTE` through which a statement is decided: the label its
/// refusals name, and how many `EXECUTE`s deep it is (a Parse can prepare
/// an `EXECUTE` of another statement).
#[derive(Clone, Copy)]
struct Executed<'a> {
    label: &'a str,
    depth: usize,
}

/// The refusal of a Parse or Bind past [`MAX_TRACKED`].
/// `Some` until the whole Bind is in `data`: wait for it, or refuse one
/// too large to hold; `to` says what it binds that needs it whole.
fn hold_whole_bind(header: FrameHeader, data: &[u8], to: &str) -> Option<Result<Step, Stop>> {
    if header.len <= data.len() {
        return None;
    }
    if header.len > MAX_INSPECTED_MESSAGE {
        return Some(Err(Stop::client_fault(
            PROGRAM_LIMIT_EXCEEDED,
            format!(
                "tollgate: a Bind of {} bytes to {to} exceeds the {MAX_INSPECTED_MESSAGE}-byte limit",
                header.len
            ),
        )));
    }
    Some(Ok(Step::Need(header.len)))
}

fn too_many_prepared() -> String {
    format!(
        "tollgate: this session has {MAX_TRACKED} prepared statements and portals open, the most the proxy tracks; close some (Close, DEALLOCATE) first"
    )
}

fn message_name(tag: u8) -> &'static str {
    match tag {
        frontend::tag::QUERY => "Query",
        frontend::tag::PARSE => "Parse",
        frontend::tag::FUNCTION_CALL => "FunctionCall",
        _ => "message",
    }
}

pub(super) fn printable(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("'{}'", tag as char)
    } else {
        "(not printable)".to_owned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn only_client_message_types_are_accepted() {
        for tag in b"BCdcfDEHFPpQSX" {
            assert!(is_frontend_tag(*tag), "{}", *tag as char);
        }
        for tag in [0u8, b'y', b'Z', b'K', 0xff] {
            assert!(!is_frontend_tag(tag));
        }
    }
}
