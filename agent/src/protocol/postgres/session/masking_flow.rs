//! The masking flow: the client side plans a lookup in front of a masked
//! statement (or batch), and the upstream side reads the lookup's answer
//! and masks the rows of the client's results (see [`super::super::mask`]).
//!
//! - Client side: [`ClientSide::plan_mask`] turns the decisions of one
//!   message into a [`MaskPlan`] (or a refusal); a simple Query carries its
//!   lookup in front of its text ([`ClientSide::masked_query`]); an
//!   extended-protocol message opens or joins the masked batch
//!   ([`ClientSide::join_batch`]) and its lookup goes in front
//!   ([`ClientSide::prefixed`]): a lookup Query at the batch's start, or,
//!   in a batch followed from its start ([`ClientSide::follow_batch`]),
//!   the lookup as extended-protocol messages in front of the first masked
//!   statement.
//! - Upstream side: [`UpstreamSide::mask_step`] reads the answer to a
//!   masked Query, [`UpstreamSide::prepared_lookup_step`] the `PREPARE`
//!   and `EXECUTE` of the session's prepared lookup, and
//!   [`UpstreamSide::batch_step`] the answer to a masked batch, message by
//!   message as [`super::super::mask::ExtendedBatch`] expects it.

use super::*;

/// The type OID of `text[]`, the prepared lookup's parameters.
const TEXT_ARRAY_OID: i32 = 1009;

/// Why a `mask` statement in a pipelined extended-protocol batch is
/// refused (a whole client message, see [`ClientSide::join_batch`]).
const MASK_PIPELINED: &str = "tollgate: a statement that requires masking was sent through the extended query protocol in a batch (pipelining) that began before the proxy could follow it (behind a Query or FunctionCall inside the batch, or more messages than a batch can follow); send it after a Sync; refused";

impl ClientSide<'_> {
    /// A message with statements a `mask` rule applies to: in a fresh
    /// Query or Parse (`unmaskable` is `None`) whose masked statements are
    /// all queries that write nothing, the plan for its answer is kept in
    /// `mask_plan`; anything else is refused, saying why (`label` names an
    /// `EXECUTE`).
    pub(super) fn plan_mask(
        &self,
        decisions: &[Decision],
        analysis: &Analysis,
        label: Option<&str>,
        unmaskable: Option<&'static str>,
    ) -> Option<String> {
        let statements = match analysis {
            Analysis::Parsed { statements } => statements.as_slice(),
            Analysis::Unparsable { .. } => &[],
        };
        let mut plan = MaskPlan {
            rules: Vec::new(),
            statements: Vec::with_capacity(decisions.len()),
            relations: Vec::new(),
            only_first: decisions.iter().skip(1).all(|d| d.action != Action::Mask),
            direct: None,
        };
        for (i, decision) in decisions.iter().enumerate() {
            if decision.action != Action::Mask {
                plan.statements.push(None);
                continue;
            }
            let statement = statements.get(i);
            let command = label
                .or(statement.map(|s| &*s.command))
                .unwrap_or(UNPARSABLE_COMMAND);
            let why = decision
                .mask_obstacle(statement, crate::sql::Dialect::Postgres)
                .or(unmaskable.map(std::borrow::Cow::Borrowed));
            if let Some(why) = why {
                return Some(decision.mask_refused_message(command, &why));
            }
            for table in statement.iter().flat_map(|s| &s.tables_read) {
                if !plan.relations.contains(table) {
                    plan.relations.push(table.clone());
                }
            }
            for rule in decision
                .matched
                .iter()
                .filter(|r| r.action == Action::Mask)
                .filter_map(|r| r.mask.as_ref())
            {
                if !plan.rules.iter().any(|known| Arc::ptr_eq(known, rule)) {
                    plan.rules.push(Arc::clone(rule));
                }
            }
            // A computed field is masked, with the strictest method of the
            // rules whose columns the statement's expressions may read (all
            // of them when its text cannot be walked).
            let refs =
                statement.and_then(|s| self.ctx.analysis.column_refs(&s.text, self.text_reading()));
            let computed = decision
                .mask_rules()
                .filter(|rule| {
                    let names: Vec<&str> = rule.columns.iter().map(|c| &*c.column).collect();
                    refs.as_ref().is_none_or(|r| r.may_read(&names))
                })
                .map(|rule| rule.with)
                .max();
            plan.statements.push(computed);
            // A text of one plain query needs no lookup; an `EXECUTE`
            // (`label`) runs a statement of its own.
            if decisions.len() == 1 && label.is_none() {
                plan.direct = refs.as_ref().and_then(|r| r.direct_source.clone());
            }
        }
        *self.mask_plan.borrow_mut() = Some(plan);
        None
    }

    /// Replaces the Query `body` in `out` by the same text with the masking
    /// lookup of `mask_plan` in front.
    pub(super) fn masked_query(&mut self, body: &[u8]) {
        let Some(plan) = self.mask_plan.get_mut().take() else {
            return;
        };
        let text = body.strip_suffix(&[0]).unwrap_or(body);
        // This Query is counted in `in_flight` already.
        let alone = !self.extended_open.get() && self.shared.in_flight.load(Ordering::Relaxed) == 1;
        let lookup = self.shared.register_mask(plan, alone);
        self.out.clear();
        let mut w = MessageWriter::new(&mut self.out, frontend::tag::QUERY);
        w.put_bytes(lookup.as_bytes()).put_cstr_bytes(text);
        w.finish();
        tracing::debug!(session = %self.ctx.id, "a masked Query: the masking lookup goes in front of it");
    }

    /// A message of an extended-protocol statement a `mask` rule applies
    /// to (`plan`): it joins the open masked batch if that batch's lookup
    /// covers it; opens one when nothing is in flight (a lookup Query goes
    /// into `prefix`, in front of the message); or, in a batch followed
    /// from its start whose earlier messages needed no masking, sends the
    /// lookup inside the batch (its Parse, Bind, Execute and Closes go into
    /// `prefix`). `Some(message)` refuses it.
    pub(super) fn join_batch(
        &self,
        plan: &Arc<MaskPlan>,
        message: MaskedMessage,
    ) -> Option<String> {
        if plan.direct.is_some() {
            return self.join_batch_direct(message);
        }
        if self.batch_open.get() {
            let mut guard = self.shared.batch();
            let Some(batch) = guard.as_mut() else {
                return Some(MASK_PIPELINED.to_owned());
            };
            if batch.lookup_not_sent() {
                if batch.nothing_expected() && !self.extended_open.get() {
                    // The batch's first message: the lookup in front.
                    *guard = None;
                    drop(guard);
                    self.batch_open.set(false);
                    return self.open_batch(plan, message);
                }
                return self.lookup_inline(batch, plan);
            }
            match batch.narrow_covers(plan, message) {
                Some(true) => return None,
                Some(false) => return self.lookup_inline(batch, plan),
                None => {}
            }
            let known = batch.plan();
            let tables = known.table_names();
            let covered = plan
                .relations
                .iter()
                .all(|r| tables.contains(&r.name.as_str()))
                && plan
                    .rules
                    .iter()
                    .all(|r| known.rules.iter().any(|k| Arc::ptr_eq(k, r)));
            if covered {
                return None;
            }
            // Relations the batch's lookup did not look for: one more.
            return self.lookup_inline(batch, plan);
        }
        if self.extended_open.get() || self.shared.in_flight.load(Ordering::Relaxed) > 0 {
            return Some(MASK_PIPELINED.to_owned());
        }
        self.open_batch(plan, message)
    }

    /// A message of a statement that names its result fields from one
    /// relation ([`MaskPlan::direct`]): no lookup, but the batch is followed
    /// (opened now when nothing is in flight) so that the proxy's Describe
    /// in front of its Execute masks the rows by the fields' names, and it
    /// is not let go before its Sync.
    fn join_batch_direct(&self, message: MaskedMessage) -> Option<String> {
        if !self.batch_open.get() {
            if self.extended_open.get() || self.shared.in_flight.load(Ordering::Relaxed) > 0 {
                return Some(MASK_PIPELINED.to_owned());
            }
            *self.shared.batch() = Some(ExtendedBatch::followed());
            self.shared.batch_active.store(true, Ordering::Relaxed);
            self.batch_open.set(true);
        }
        if message == MaskedMessage::Execute {
            let mut guard = self.shared.batch();
            let Some(batch) = guard.as_mut() else {
                return Some(MASK_PIPELINED.to_owned());
            };
            batch.direct_sent();
        }
        None
    }

    /// Opens a masked batch with the lookup in front of its first message
    /// (nothing is in flight): for a Parse, the session's prepared lookup
    /// on the search path, inside the batch
    /// ([`ClientSide::open_batch_prepared`]); otherwise, or when that
    /// cannot serve, a lookup Query over every schema.
    fn open_batch(&self, plan: &Arc<MaskPlan>, message: MaskedMessage) -> Option<String> {
        if message == MaskedMessage::Parse && plan.only_first && self.open_batch_prepared(plan) {
            return None;
        }
        let n = self.shared.next_mask.fetch_add(1, Ordering::Relaxed);
        // Messages of the batch may run between the lookup and a masked
        // statement's parse (a `SET search_path`, another Bind): every schema.
        let sql = plan.lookup_sql(
            &format!("{}{n}", self.shared.mask_marker),
            LookupScope::EverySchema,
        );
        let mut prefix = self.prefix.borrow_mut();
        prefix.clear();
        let mut w = MessageWriter::new(&mut prefix, frontend::tag::QUERY);
        w.put_cstr(&sql);
        w.finish();
        *self.shared.batch() = Some(ExtendedBatch::new(Arc::clone(plan)));
        self.shared.batch_active.store(true, Ordering::Relaxed);
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        self.batch_open.set(true);
        tracing::debug!(session = %self.ctx.id, "a masked batch: the masking lookup goes in front of it");
        None
    }

    /// Opens a masked batch with the session's prepared lookup in front of
    /// the Parse of `plan`'s statement, as extended-protocol messages: its
    /// Parse when it is not on the server yet, a Bind of a portal under a
    /// name reserved for masking, an Execute and a Close of the portal.
    /// Nothing runs between it and the Parse, so it resolves the relations
    /// on the search path as the Parse will; the server runs it on a
    /// generic plan, and no Query (a transaction and a ReadyForQuery of
    /// its own) goes in front of the batch. `false` when the prepared form
    /// cannot serve.
    fn open_batch_prepared(&self, plan: &Arc<MaskPlan>) -> bool {
        let Some([relations, names]) = plan.lookup_parameters() else {
            return false;
        };
        // Taken and released before the batch's lock: the upstream pump
        // takes them the other way round.
        let Some((statement, parse)) = self.shared.lookup().for_batch(&self.shared.mask_marker)
        else {
            return false;
        };
        let mut batch = ExtendedBatch::followed();
        if !batch.lookup_prepared(plan, parse.is_some()) {
            return false;
        }
        let portal = format!("{}p", self.shared.mask_marker);
        let mut prefix = self.prefix.borrow_mut();
        prefix.clear();
        if let Some(sql) = &parse {
            let mut w = MessageWriter::new(&mut prefix, frontend::tag::PARSE);
            w.put_cstr(&statement)
                .put_cstr(sql)
                .put_i16(2)
                .put_i32(TEXT_ARRAY_OID)
                .put_i32(TEXT_ARRAY_OID);
            w.finish();
        }
        let mut w = MessageWriter::new(&mut prefix, frontend::tag::BIND);
        w.put_cstr(&portal)
            .put_cstr(&statement)
            .put_i16(0)
            .put_i16(2);
        for value in [&relations, &names] {
            w.put_value(Some(value.as_bytes()));
        }
        w.put_i16(0);
        w.finish();
        let mut w = MessageWriter::new(&mut prefix, frontend::tag::EXECUTE);
        w.put_cstr(&portal).put_i32(0);
        w.finish();
        let mut w = MessageWriter::new(&mut prefix, frontend::tag::CLOSE);
        w.put_u8(b'P').put_cstr(&portal);
        w.finish();
        *self.shared.batch() = Some(batch);
        self.shared.batch_active.store(true, Ordering::Relaxed);
        self.batch_open.set(true);
        tracing::debug!(session = %self.ctx.id, "a masked Parse opens a batch: the session's prepared lookup goes in front of it");
        true
    }

    /// Sends the lookup for `plan` inside the followed `batch` (its first,
    /// or one for relations its earlier lookups did not cover), in front
    /// of the message being stepped: a Parse of a statement and a Bind of
    /// a portal under names reserved for masking (the client's unnamed
    /// statement and portal stay as they are), an Execute, and a Close of
    /// each. A Query would end the batch's implicit transaction.
    fn lookup_inline(&self, batch: &mut ExtendedBatch, plan: &Arc<MaskPlan>) -> Option<String> {
        // After a lookup on the search path for one statement, this one
        // looks for all of the batch's relations over every schema, so
        // that what is covered can be told by relation name again.
        let widened = batch.is_narrow().then(|| batch.widen().merged(plan));
        if !batch.lookup_inline(plan) {
            return Some(format!(
                "tollgate: more than {} messages in one batch with a masked statement; refused",
                super::super::mask::MAX_EXPECTED
            ));
        }
        let n = self.shared.next_mask.fetch_add(1, Ordering::Relaxed);
        let marker = format!("{}{n}", self.shared.mask_marker);
        let sql = widened
            .as_ref()
            .unwrap_or(plan)
            .lookup_sql(&marker, LookupScope::EverySchema);
        let mut prefix = self.prefix.borrow_mut();
        prefix.clear();
        let mut w = MessageWriter::new(&mut prefix, frontend::tag::PARSE);
        w.put_cstr(&marker).put_cstr(&sql).put_i16(0);
        w.finish();
        let mut w = MessageWriter::new(&mut prefix, frontend::tag::BIND);
        w.put_cstr(&marker)
            .put_cstr(&marker)
            .put_i16(0)
            .put_i16(0)
            .put_i16(0);
        w.finish();
        let mut w = MessageWriter::new(&mut prefix, frontend::tag::EXECUTE);
        w.put_cstr(&marker).put_i32(0);
        w.finish();
        for kind in [b'P', b'S'] {
            let mut w = MessageWriter::new(&mut prefix, frontend::tag::CLOSE);
            w.put_u8(kind).put_cstr(&marker);
            w.finish();
        }
        tracing::debug!(session = %self.ctx.id, "a masked statement inside a batch: the masking lookup goes in front of it");
        None
    }

    /// Follows an extended-protocol batch from its first message when the
    /// policy masks on this target, so that a masked statement later in
    /// it can be masked (see [`ClientSide::join_batch`]). Nothing is in
    /// flight then (see `must_wait`).
    pub(super) fn follow_batch(&self) {
        if self.extended_open.get()
            || self.batch_open.get()
            || self.shared.in_flight.load(Ordering::Relaxed) > 0
            || !current_policy(&self.ctx.policy).masks_target(&self.ctx.target)
        {
            return;
        }
        *self.shared.batch() = Some(ExtendedBatch::followed());
        self.shared.batch_active.store(true, Ordering::Relaxed);
        self.batch_open.set(true);
    }

    /// Stops following a batch in which no lookup was sent (a Query or
    /// FunctionCall inside it, or more messages than a batch can follow):
    /// the upstream pump forwards its answers as they are. `false` when a
    /// lookup was sent (the batch cannot be let go).
    pub(super) fn unfollow_batch(&self) -> bool {
        if !self.batch_open.get() {
            return true;
        }
        let mut guard = self.shared.batch();
        if guard.as_ref().is_some_and(ExtendedBatch::holds_masked) {
            return false;
        }
        *guard = None;
        self.shared.batch_active.store(false, Ordering::Relaxed);
        self.batch_open.set(false);
        true
    }

    /// Replaces the message (`len` bytes of `data`) by `prefix` and itself.
    pub(super) fn prefixed(&mut self, data: &[u8], len: usize) {
        self.out.clear();
        self.out.append(self.prefix.get_mut());
        self.out
            .extend_from_slice(data.get(..len).unwrap_or_default());
    }
}

/// Whether `known` masks everything `needed` does: its relations, its
/// rules, and each statement's computed fields as strictly.
pub(super) fn covers(known: &MaskPlan, needed: &MaskPlan) -> bool {
    needed.relations.iter().all(|r| known.relations.contains(r))
        && needed
            .rules
            .iter()
            .all(|r| known.rules.iter().any(|k| Arc::ptr_eq(k, r)))
        && needed.statements.iter().enumerate().all(|(i, method)| {
            method.is_none() || known.statements.get(i).copied().flatten() >= *method
        })
}

/// Adds the masking of a statement run by an `EXECUTE` (`executed`, the
/// plan of its own text) to `plan`, the plan of a text of `n` statements,
/// at the `EXECUTE`'s place `at`.
pub(super) fn merge_executed_plan(
    plan: &mut Option<MaskPlan>,
    n: usize,
    at: usize,
    executed: MaskPlan,
) {
    let plan = plan.get_or_insert_with(|| MaskPlan {
        rules: Vec::new(),
        statements: vec![None; n],
        relations: Vec::new(),
        only_first: false,
        direct: None,
    });
    if let Some(slot) = plan.statements.get_mut(at) {
        let executed_method = executed.statements.iter().copied().max().flatten();
        *slot = (*slot).max(executed_method);
    }
    for relation in executed.relations {
        if !plan.relations.contains(&relation) {
            plan.relations.push(relation);
        }
    }
    for rule in executed.rules {
        if !plan.rules.iter().any(|known| Arc::ptr_eq(known, &rule)) {
            plan.rules.push(rule);
        }
    }
    // The statement was prepared earlier, its relations resolved on the
    // search path of then: the lookup searches every schema.
    plan.only_first = false;
}

impl UpstreamSide<'_> {
    /// A message while a masked Query may be answered (see [`super::super::mask`]):
    /// the lookup's messages are dropped, its rows resolve the masked
    /// columns, and the rows of the client's results are masked. `None`
    /// leaves the message to the usual handling.
    pub(super) fn mask_step(
        &mut self,
        header: FrameHeader,
        data: &[u8],
    ) -> Result<Option<Step>, Stop> {
        use backend::tag::*;
        let whole = match header.tag {
            ROW_DESCRIPTION | COMMAND_COMPLETE | ERROR_RESPONSE => true,
            DATA_ROW => self
                .masked
                .as_ref()
                .is_some_and(|m| m.in_lookup() || m.rows().is_some()),
            READY_FOR_QUERY | EMPTY_QUERY_RESPONSE => {
                if header.tag == READY_FOR_QUERY {
                    if let Some(done) = self.masked.take() {
                        tracing::debug!(session = %self.ctx.id, columns = done.resolved(), "answer to a masked Query ends");
                    }
                } else if let Some(masked) = &mut self.masked {
                    masked.statement_done();
                }
                return Ok(None);
            }
            _ => false,
        };
        if !whole {
            return Ok(None);
        }
        if header.len > MAX_INSPECTED_MESSAGE {
            // Rows whose fields the proxy cannot read must not pass.
            if self.masked.is_some() && matches!(header.tag, DATA_ROW | ROW_DESCRIPTION) {
                return Err(masked_too_large(header.len));
            }
            return Ok(None);
        }
        let Some(body) = header.body(data) else {
            return Ok(Some(Step::Need(header.len)));
        };
        let drop_it = Step::Replace(header.len);
        self.out.clear();
        match header.tag {
            ROW_DESCRIPTION => {
                if let Some(masked) = self.masked.as_mut().filter(|m| !m.in_lookup()) {
                    masked.row_description(body).map_err(upstream_fault)?;
                    return Ok(None);
                }
                let first = match backend::decode_backend(ROW_DESCRIPTION, body) {
                    Ok(BackendMessage::RowDescription(fields)) => fields.first().map(|f| f.name),
                    _ => None,
                };
                if let Some((plan, shift)) = first.and_then(|name| self.shared.mask_for(name)) {
                    self.masked = Some(MaskedAnswer::new(plan, shift));
                    return Ok(Some(drop_it));
                }
                Ok(None)
            }
            DATA_ROW => {
                let Some(masked) = self.masked.as_mut() else {
                    return Ok(None);
                };
                if masked.in_lookup() {
                    masked.lookup_row(body).map_err(upstream_fault)?;
                    return Ok(Some(drop_it));
                }
                let Some(masks) = masked.rows() else {
                    return Ok(None);
                };
                mask_row(&self.ctx, body, masks, &mut self.out)?;
                Ok(Some(Step::Replace(header.len)))
            }
            COMMAND_COMPLETE => {
                let Some(masked) = self.masked.as_mut() else {
                    return Ok(None);
                };
                let lookup = masked.in_lookup();
                masked.statement_done();
                Ok(lookup.then_some(drop_it))
            }
            _ => {
                let Some(masked) = self.masked.as_ref().filter(|m| !m.in_lookup()) else {
                    return Ok(None);
                };
                if self.shared.is_denial(body) {
                    // A refusal's substitute: left to the usual handling.
                    return Ok(None);
                }
                Ok(pg_mask::answer_error(body, masked.shift(), &mut self.out)
                    .then_some(Step::Replace(header.len)))
            }
        }
    }

    /// The first CommandComplete, ErrorResponse or RowDescription of the
    /// answer to a Query using the prepared lookup: the `PREPARE`'s
    /// CommandComplete is dropped, an error tells the lookup whether its
    /// statement may still exist, and the RowDescription (the lookup's) is
    /// left to [`UpstreamSide::mask_step`].
    pub(super) fn prepared_lookup_step(
        &mut self,
        header: FrameHeader,
        data: &[u8],
    ) -> Result<Option<Step>, Stop> {
        use backend::tag::*;
        if header.tag == ROW_DESCRIPTION || header.len > MAX_INSPECTED_MESSAGE {
            self.shared.lookup_pending.store(false, Ordering::Relaxed);
            return Ok(None);
        }
        let Some(body) = header.body(data) else {
            return Ok(Some(Step::Need(header.len)));
        };
        if header.tag == COMMAND_COMPLETE {
            let tag = command_tag(body).unwrap_or_default();
            if self.shared.lookup().command_complete(tag) {
                self.out.clear();
                return Ok(Some(Step::Replace(header.len)));
            }
        } else if let Ok(BackendMessage::ErrorResponse(fields)) =
            backend::decode_backend(ERROR_RESPONSE, body)
        {
            self.shared
                .lookup()
                .failed(fields.sqlstate().unwrap_or_default());
        }
        self.shared.lookup_pending.store(false, Ordering::Relaxed);
        Ok(None)
    }

    /// A message while a masked extended-protocol batch is answered (see
    /// [`super::super::mask::ExtendedBatch`]). `None` leaves it to the usual
    /// handling.
    pub(super) fn batch_step(
        &mut self,
        header: FrameHeader,
        data: &[u8],
    ) -> Result<Option<Step>, Stop> {
        use backend::tag::*;
        let mut guard = self.shared.batch();
        let Some(batch) = guard.as_mut() else {
            self.shared.batch_active.store(false, Ordering::Relaxed);
            return Ok(None);
        };
        let body = if batch.needs_body(header.tag)
            || matches!(header.tag, READY_FOR_QUERY | ERROR_RESPONSE)
        {
            if header.len > MAX_INSPECTED_MESSAGE {
                return Err(masked_too_large(header.len));
            }
            match header.body(data) {
                Some(body) => Some(body),
                None => return Ok(Some(Step::Need(header.len))),
            }
        } else {
            None
        };
        // Asked before the message is classified: an error's expectation
        // is still at the front then.
        let quotes_masked = batch.error_may_quote_masked();
        if header.tag == ERROR_RESPONSE && batch.prepared_lookup_ahead() {
            // The session's prepared lookup may be gone (or not made).
            if let Some(Ok(BackendMessage::ErrorResponse(fields))) =
                body.map(|body| backend::decode_backend(ERROR_RESPONSE, body))
            {
                self.shared
                    .lookup()
                    .failed(fields.sqlstate().unwrap_or_default());
            }
        }
        let disposition = batch.answer(header.tag, body).map_err(|e| {
            masking_fault(
                sqlstate::PROTOCOL_VIOLATION,
                format!("masking lost track of the server's answers ({e})"),
            )
        })?;
        self.out.clear();
        let step = match disposition {
            Disposition::Forward => {
                if header.tag == READY_FOR_QUERY && batch.is_done() {
                    *guard = None;
                    self.shared.batch_active.store(false, Ordering::Relaxed);
                }
                match body {
                    // An error in a masked batch may quote a masked value;
                    // a refusal's substitute is left to the usual handling.
                    Some(body)
                        if header.tag == ERROR_RESPONSE
                            && quotes_masked
                            && !self.shared.is_denial(body)
                            && pg_mask::answer_error(body, 0, &mut self.out) =>
                    {
                        Some(Step::Replace(header.len))
                    }
                    _ => None,
                }
            }
            Disposition::Drop => Some(Step::Replace(header.len)),
            Disposition::LookupParsed => {
                self.shared.lookup().parse_complete();
                Some(Step::Replace(header.len))
            }
            Disposition::LookupDone => {
                // The lookup's own ReadyForQuery: the client never asked for it.
                drop(guard);
                self.answered();
                Some(Step::Replace(header.len))
            }
            Disposition::Mask => {
                let masks = batch.row_masks().unwrap_or_default();
                mask_row(&self.ctx, body.unwrap_or_default(), masks, &mut self.out)?;
                Some(Step::Replace(header.len))
            }
        };
        Ok(step)
    }
}

/// Writes the DataRow `body` masked by `masks` into `out`, counting the
/// values masked.
fn mask_row(
    ctx: &PostgresContext<'_>,
    body: &[u8],
    masks: &[crate::masking::FieldMask],
    out: &mut Vec<u8>,
) -> Result<(), Stop> {
    let masked = pg_mask::mask_data_row(body, masks, out).map_err(upstream_fault)?;
    ctx.target_metrics
        .masked_values
        .fetch_add(masked, Ordering::Relaxed);
    Ok(())
}

/// Ends the session rather than let a row pass unmasked: `what` went wrong.
fn masking_fault(sqlstate: &'static str, what: String) -> Stop {
    let message = format!(
        "tollgate: {what}; the session is closed so that nothing unmasked reaches the client"
    );
    Stop::Fatal {
        sqlstate,
        reason: CloseReason::UpstreamError(message.clone()),
        message,
    }
}

/// A masked result's message too large to read whole.
fn masked_too_large(len: usize) -> Stop {
    masking_fault(
        PROGRAM_LIMIT_EXCEEDED,
        format!("a message of a masked result has {len} bytes, more than the {MAX_INSPECTED_MESSAGE} bytes the proxy masks"),
    )
}
