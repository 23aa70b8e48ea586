//! The server → client direction: denials answered with the policy's
//! message, the proxy's own cancel key, and what the server's answers
//! tell the client side.

use super::*;

/// The SASL mechanism with channel binding, never offered to clients.
const SCRAM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Longest CommandComplete body read for the prepared statements it
/// changes (`DEALLOCATE ALL` and its NUL fit); longer ones are other
/// commands' and are passed through.
const MAX_TRACKED_TAG: usize = 32;

/// The server → client direction.
pub(super) struct UpstreamSide<'a> {
    pub(super) ctx: PostgresContext<'a>,
    pub(super) shared: &'a BetweenSides,
    pub(super) streaming: usize,
    pub(super) out: Vec<u8>,
    warned_encoding: bool,
    /// Inside the answer to a masked Query.
    pub(super) masked: Option<MaskedAnswer>,
    /// The target records raw bytes: what goes to the client is recorded,
    /// as rewritten (masked rows, never the server's originals).
    pub(super) raw: bool,
    /// The start-up's ReadyForQuery came (later ones answer the client's
    /// Queries, Syncs and FunctionCalls, counted in `in_flight`).
    ready: bool,
    /// A server's request for the password in clear is refused rather
    /// than relayed (`tls::clear_password_exposed`).
    pub(super) withhold_clear_password: bool,
}

impl<'a> UpstreamSide<'a> {
    /// The upstream side of a session that has just started.
    pub(super) fn new(ctx: &PostgresContext<'a>, shared: &'a BetweenSides) -> UpstreamSide<'a> {
        UpstreamSide {
            ctx: *ctx,
            shared,
            streaming: 0,
            out: Vec::new(),
            warned_encoding: false,
            masked: None,
            raw: ctx.events.records_raw(&ctx.target),
            ready: false,
            withhold_clear_password: false,
        }
    }

    pub(super) fn step(&mut self, data: &[u8]) -> Result<Step, Stop> {
        if self.streaming > 0 {
            let n = self.streaming.min(data.len());
            self.streaming -= n;
            return Ok(Step::Forward(n));
        }
        let header = match frame(data, MAX_MESSAGE) {
            Err(e) => return Err(upstream_fault(e)),
            Ok(None) => return Ok(Step::Need(FrameHeader::SIZE)),
            Ok(Some(h)) => h,
        };
        use backend::tag::*;
        if header.tag == COPY_IN_RESPONSE {
            self.shared.copy_in.store(true, Ordering::Relaxed);
        } else if matches!(header.tag, COMMAND_COMPLETE | ERROR_RESPONSE)
            && self.shared.copy_in.swap(false, Ordering::Relaxed)
        {
            self.copy_ended();
        }
        if self.shared.batch_active.load(Ordering::Relaxed) {
            if let Some(step) = self.batch_step(header, data)? {
                return Ok(step);
            }
        }
        if matches!(
            header.tag,
            COMMAND_COMPLETE | ERROR_RESPONSE | ROW_DESCRIPTION
        ) && self.shared.lookup_pending.load(Ordering::Relaxed)
        {
            if let Some(step) = self.prepared_lookup_step(header, data)? {
                return Ok(step);
            }
        }
        if self.masked.is_none()
            && matches!(
                header.tag,
                ROW_DESCRIPTION
                    | COMMAND_COMPLETE
                    | ERROR_RESPONSE
                    | EMPTY_QUERY_RESPONSE
                    | READY_FOR_QUERY
            )
            && self.shared.direct_pending.load(Ordering::Relaxed)
        {
            if let Some(plan) = self.shared.take_direct() {
                self.masked = Some(MaskedAnswer::direct(plan));
            }
        }
        let mask_relevant = self.masked.is_some()
            || (header.tag == ROW_DESCRIPTION && self.shared.masks_pending.load(Ordering::Relaxed));
        if mask_relevant {
            if let Some(step) = self.mask_step(header, data)? {
                return Ok(step);
            }
        }
        match header.tag {
            READY_FOR_QUERY | PARAMETER_STATUS | BACKEND_KEY_DATA | AUTHENTICATION
            | ERROR_RESPONSE => {
                if header.len > MAX_INSPECTED_MESSAGE {
                    return Err(upstream_fault(format_args!(
                        "a message of type {} of {} bytes is larger than the proxy inspects",
                        printable(header.tag),
                        header.len
                    )));
                }
                let Some(body) = header.body(data) else {
                    return Ok(Step::Need(header.len));
                };
                if self.inspect(header.tag, body)? {
                    return Ok(Step::Replace(header.len));
                }
                if header.tag == ERROR_RESPONSE {
                    let (_, answered) = self.shared.prepared().batches();
                    self.out.clear();
                    if self
                        .shared
                        .unfinished_text_error(answered, body, &mut self.out)
                    {
                        return Ok(Step::Replace(header.len));
                    }
                    if let Some((code, message)) = self.shared.denial_for(body) {
                        self.out.clear();
                        super::super::error::write_error_response(
                            &mut self.out,
                            severity::ERROR,
                            code,
                            &message,
                            None,
                            None,
                        );
                        return Ok(Step::Replace(header.len));
                    }
                }
                Ok(Step::Forward(header.len))
            }
            COMMAND_COMPLETE if header.len <= FrameHeader::SIZE + MAX_TRACKED_TAG => {
                let Some(body) = header.body(data) else {
                    return Ok(Step::Need(header.len));
                };
                let tag = command_tag(body).unwrap_or_default();
                if prepared::changes_statements(tag) {
                    self.shared.prepared().command_complete(tag);
                    if matches!(tag, b"DEALLOCATE ALL" | b"DISCARD ALL") {
                        self.shared.lookup().deallocated();
                    }
                }
                Ok(Step::Forward(header.len))
            }
            PARSE_COMPLETE | BIND_COMPLETE | CLOSE_COMPLETE => {
                let mut prepared = self.shared.prepared();
                match header.tag {
                    PARSE_COMPLETE => prepared.parse_complete(),
                    BIND_COMPLETE => prepared.bind_complete(),
                    _ => prepared.close_complete(),
                }
                drop(prepared);
                let n = header.len.min(data.len());
                self.streaming = header.len - n;
                Ok(Step::Forward(n))
            }
            _ => {
                let n = header.len.min(data.len());
                self.streaming = header.len - n;
                Ok(Step::Forward(n))
            }
        }
    }

    /// The copy-in the server was in ended: the Syncs the client sent
    /// during it were ignored, and are taken off what is in flight.
    fn copy_ended(&mut self) {
        let ignored = self.shared.copy_syncs.swap(0, Ordering::Relaxed);
        if ignored == 0 {
            return;
        }
        self.shared.prepared().syncs_ignored(ignored);
        let before =
            self.shared
                .in_flight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(ignored))
                });
        if before.is_ok_and(|n| n > 0 && n <= ignored) {
            self.shared.idle.notify_one();
        }
    }

    /// A ReadyForQuery: one Query, Sync or FunctionCall fewer in flight
    /// (the start-up's own is not one of them).
    pub(super) fn answered(&mut self) {
        if !self.ready {
            self.ready = true;
            return;
        }
        let before =
            self.shared
                .in_flight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if before == Ok(1) {
            self.shared.idle.notify_one();
        }
    }

    /// Reads a message the session tracks; `true` when it is to be replaced
    /// by `out` (BackendKeyData, an AuthenticationSASL offering `-PLUS`).
    fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<bool, Stop> {
        if tag == backend::tag::ERROR_RESPONSE {
            return Ok(false);
        }
        let message = backend::decode_backend(tag, body).map_err(upstream_fault)?;
        match message {
            BackendMessage::ReadyForQuery(status) => {
                // The start-up's answers no message of the client's.
                let startup = !self.ready;
                self.answered();
                self.shared
                    .tx_status
                    .store(status.byte(), Ordering::Relaxed);
                if !startup {
                    self.shared.prepared().ready_for_query(status.byte());
                }
                if !self.shared.copy_in.load(Ordering::Relaxed) {
                    // A COPY that never entered copy-in (it failed first):
                    // its Syncs were answered like any other.
                    self.shared.copy_syncs.store(0, Ordering::Relaxed);
                }
                if matches!(status, TransactionStatus::Unknown(_)) {
                    tracing::debug!(session = %self.ctx.id, "ReadyForQuery with an unknown status byte");
                }
            }
            BackendMessage::Authentication(backend::Auth::Ok) => {
                self.shared.authenticated.store(true, Ordering::Relaxed);
            }
            BackendMessage::Authentication(backend::Auth::CleartextPassword)
                if self.withhold_clear_password =>
            {
                let message = tls::clear_password_refusal(
                    &self.ctx.target,
                    "AuthenticationCleartextPassword, pg_hba.conf method \"password\"",
                );
                return Err(Stop::Fatal {
                    sqlstate: sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                    reason: CloseReason::UpstreamError(message.clone()),
                    message,
                });
            }
            BackendMessage::BackendKeyData { pid, secret } => {
                tracing::debug!(session = %self.ctx.id, backend_pid = pid, "upstream backend");
                return Ok(self.replace_cancel_key(pid, secret));
            }
            BackendMessage::Authentication(backend::Auth::Sasl { mechanisms })
                if mechanisms.contains(&SCRAM_PLUS) =>
            {
                // Channel binding cannot cross the proxy (see the tls module).
                let mechanisms = mechanisms
                    .into_iter()
                    .filter(|m| *m != SCRAM_PLUS)
                    .collect();
                self.out.clear();
                BackendMessage::Authentication(backend::Auth::Sasl { mechanisms })
                    .encode(&mut self.out);
                tracing::debug!(session = %self.ctx.id, "removed SCRAM-SHA-256-PLUS from the server's SASL mechanisms");
                return Ok(true);
            }
            BackendMessage::ParameterStatus { name, value } => match name {
                "client_encoding" => {
                    let encoding = if value.eq_ignore_ascii_case("UTF8")
                        || value.eq_ignore_ascii_case("UNICODE")
                    {
                        ENCODING_UTF8
                    } else if value.eq_ignore_ascii_case("LATIN1") {
                        ENCODING_LATIN1
                    } else {
                        ENCODING_OTHER
                    };
                    self.shared
                        .client_encoding
                        .store(encoding, Ordering::Relaxed);
                    if encoding == ENCODING_OTHER && !self.warned_encoding {
                        self.warned_encoding = true;
                        tracing::warn!(session = %self.ctx.id, client_encoding = value,
                            "client_encoding is {value}: the statement analysis reads UTF-8 and LATIN1, so statements with non-ASCII text are refused as unparsable");
                    }
                }
                "standard_conforming_strings" => {
                    let off = value.eq_ignore_ascii_case("off");
                    self.shared.backslash_escapes.store(off, Ordering::Relaxed);
                }
                _ => {}
            },
            _ => {}
        }
        Ok(false)
    }

    /// Registers the backend's cancel key and puts the client-visible one
    /// in `out`; `false` (forward the server's own) only if the random
    /// source failed.
    fn replace_cancel_key(&mut self, pid: i32, secret: &[u8]) -> bool {
        let Some((client_pid, client_secret)) =
            self.ctx
                .cancel
                .register(pid, secret, self.ctx.upstream_addr)
        else {
            tracing::warn!(session = %self.ctx.id, "cannot make a cancel key (no randomness); the client gets the server's own");
            return false;
        };
        let previous = self
            .shared
            .cancel_pid
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(client_pid);
        if let Some(previous) = previous {
            self.ctx.cancel.forget(previous);
        }
        self.out.clear();
        BackendMessage::BackendKeyData {
            pid: client_pid,
            secret: &client_secret,
        }
        .encode(&mut self.out);
        true
    }
}

pub(super) fn upstream_fault(what: impl std::fmt::Display) -> Stop {
    let message = format!("tollgate: invalid message from the server: {what}");
    Stop::Fatal {
        sqlstate: sqlstate::PROTOCOL_VIOLATION,
        reason: CloseReason::UpstreamError(message.clone()),
        message,
    }
}

/// The command tag of a CommandComplete `body`, read by the codec; `None`
/// when it does not decode (nothing is learnt from it, and it is forwarded
/// as it came).
pub(super) fn command_tag(body: &[u8]) -> Option<&[u8]> {
    match backend::decode_backend(backend::tag::COMMAND_COMPLETE, body) {
        Ok(BackendMessage::CommandComplete(tag)) => Some(tag.as_bytes()),
        _ => None,
    }
}
