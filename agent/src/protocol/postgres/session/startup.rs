//! Start-up: the packets before a session (SSLRequest, GSSENCRequest,
//! CancelRequest, StartupMessage), TLS on both legs, and the refusals
//! the proxy writes before any server is involved.

use super::*;

/// Start-up packets (SSLRequest, GSSENCRequest) accepted before the
/// StartupMessage: one of each, as libpq sends at most.
const MAX_NEGOTIATIONS: usize = 2;

/// A start-up packet, read whole.
pub(super) enum StartupPacket {
    /// A StartupMessage to forward: its bytes, and what it asks for.
    Startup {
        bytes: Vec<u8>,
        user: Option<String>,
        database: Option<String>,
        application_name: Option<String>,
        replication: Option<String>,
    },
    /// A CancelRequest with the key the client was given.
    Cancel { pid: i32, secret: Vec<u8> },
    /// An SSLRequest the proxy answers `S` to: the caller answers and does
    /// the handshake, then reads on.
    TlsRequested,
}

/// Reads start-up packets until a StartupMessage or a CancelRequest,
/// answering GSSENCRequest with `N`, and SSLRequest with `N` unless
/// `offer_tls` (then [`StartupPacket::TlsRequested`] is returned for the
/// caller to answer). Bytes after the packet stay in `buf`.
pub(super) async fn read_startup<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    buf: &mut ReadBuf,
    shared: &BetweenSides,
    start: Instant,
    negotiations: &mut usize,
    offer_tls: bool,
) -> Result<StartupPacket, Stop> {
    loop {
        let len = loop {
            match frame_startup(buf.filled()) {
                Err(e) => return Err(startup_fault(e)),
                Ok(Some(len)) if buf.filled().len() >= len => break len,
                Ok(Some(len)) => buf.make_room(len),
                Ok(None) => buf.make_room(8),
            }
            let n = buf
                .read_from(client)
                .await
                .map_err(|e| Stop::Closed(CloseReason::ClientError(e.to_string())))?;
            if n == 0 {
                let got = buf.filled().len();
                return Err(Stop::Closed(CloseReason::ClientError(format!(
                    "the client closed the connection during start-up after {got} bytes of a start-up packet"
                ))));
            }
            shared.touch(start);
        };
        let packet = buf.filled().get(..len).unwrap_or_default();
        let body = packet.get(4..).unwrap_or_default();
        let message = decode_startup(body).map_err(startup_fault)?;
        match message {
            FrontendMessage::SslRequest | FrontendMessage::GssEncRequest => {
                if buf.filled().len() > len {
                    return Err(Stop::client_fault(
                        sqlstate::PROTOCOL_VIOLATION,
                        "tollgate: received unencrypted data after an encryption request \
                         (possible injection, CVE-2021-23214)"
                            .to_owned(),
                    ));
                }
                *negotiations += 1;
                if *negotiations > MAX_NEGOTIATIONS {
                    return Err(Stop::client_fault(
                        sqlstate::PROTOCOL_VIOLATION,
                        "tollgate: too many encryption requests during start-up".to_owned(),
                    ));
                }
                let is_ssl = matches!(message, FrontendMessage::SslRequest);
                buf.consume(len);
                if offer_tls && is_ssl {
                    return Ok(StartupPacket::TlsRequested);
                }
                client
                    .write_all(&ssl_refused())
                    .await
                    .map_err(|e| Stop::Closed(CloseReason::ClientError(e.to_string())))?;
            }
            FrontendMessage::CancelRequest { pid, secret } => {
                let result = StartupPacket::Cancel {
                    pid,
                    secret: secret.to_vec(),
                };
                buf.consume(len);
                return Ok(result);
            }
            FrontendMessage::Startup { params, .. } => {
                let get = |name: &str| {
                    params
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, v)| (*v).to_owned())
                };
                let result = StartupPacket::Startup {
                    user: get("user"),
                    database: get("database"),
                    application_name: get("application_name"),
                    replication: get("replication"),
                    bytes: packet.to_vec(),
                };
                buf.consume(len);
                return Ok(result);
            }
            other => {
                return Err(Stop::protocol_violation(format_args!(
                    "unexpected {} during start-up",
                    other.name()
                )))
            }
        }
    }
}

fn startup_fault(e: CodecError) -> Stop {
    match e {
        CodecError::UnsupportedProtocol { major, minor } => Stop::client_fault(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!(
                "tollgate: unsupported frontend protocol {major}.{minor}: only 3.x is supported"
            ),
        ),
        other => Stop::client_fault(
            sqlstate::PROTOCOL_VIOLATION,
            format!("tollgate: invalid start-up packet: {other}"),
        ),
    }
}

/// The first byte of a TLS handshake record (a ClientHello), which no
/// start-up packet begins with (its length would exceed 256 MiB).
pub(super) const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How a client asked for TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Negotiation {
    /// SSLRequest, answered `S`.
    SslRequest,
    /// A ClientHello straight away (`sslnegotiation=direct`).
    Direct,
}

/// The first byte the client sent, left unread; `None` if it closed.
pub(super) async fn first_byte(client: &Stream) -> io::Result<Option<u8>> {
    let Stream::Plain(tcp) = client else {
        return Ok(None);
    };
    let mut byte = [0u8; 1];
    let n = tcp.peek(&mut byte).await?;
    Ok((n == 1).then_some(byte[0]))
}

/// How long a TLS handshake on either leg may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers `S` to the client's SSLRequest and does the TLS handshake with
/// the agent's certificate.
pub(super) async fn accept_client_tls(
    ctx: &PostgresContext<'_>,
    client: Stream,
    negotiation: Negotiation,
) -> Result<Stream, CloseReason> {
    let (Some(acceptor), Stream::Plain(mut tcp)) = (ctx.tls.client(), client) else {
        return Err(CloseReason::ClientError(
            "an SSLRequest arrived on a connection already encrypted".to_owned(),
        ));
    };
    if negotiation == Negotiation::SslRequest {
        if let Err(e) = tcp.write_all(b"S").await {
            return Err(CloseReason::ClientError(e.to_string()));
        }
    }
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            // As PostgreSQL does: direct TLS must name the protocol, so
            // that a TLS connection meant for another service is refused.
            let alpn = tls.get_ref().1.alpn_protocol();
            if negotiation == Negotiation::Direct && alpn != Some(tls::ALPN_POSTGRESQL) {
                let why = "direct TLS without the \"postgresql\" ALPN protocol".to_owned();
                tracing::warn!(session = %ctx.id, "closing the session: {why}");
                return Err(CloseReason::ClientError(why));
            }
            Ok(Stream::Tls(Box::new(tls.into())))
        }
        Ok(Err(e)) => {
            let why = format!("the client's TLS handshake failed: {e}");
            tracing::warn!(session = %ctx.id, "closing the session: {why}");
            Err(CloseReason::ClientError(why))
        }
        Err(_) => Err(CloseReason::ClientError(
            "the client's TLS handshake did not finish in time".to_owned(),
        )),
    }
}

/// Secures the upstream leg as the target says: SSLRequest, then the
/// handshake on `S`; `N` is plaintext for `prefer` and a refusal otherwise.
/// A session logging in with brokered credential number `credential`
/// presents its client certificate, when it has one.
pub(super) async fn connect_upstream_tls(
    ctx: &PostgresContext<'_>,
    mut upstream: TcpStream,
    credential: Option<usize>,
) -> Result<Stream, Stop> {
    let target = &ctx.target;
    let mode = ctx.tls.upstream_for(target, credential);
    let (connector, verify_full, name) = match mode {
        UpstreamMode::Disable => return Ok(Stream::Plain(upstream)),
        UpstreamMode::Prefer(c) | UpstreamMode::Require(c) => (c, false, None),
        UpstreamMode::VerifyFull {
            connector,
            server_name,
        } => (connector, true, server_name.as_deref()),
    };
    let fatal = |message: String| Stop::Fatal {
        sqlstate: sqlstate::CONNECTION_FAILURE,
        reason: CloseReason::UpstreamError(message.clone()),
        message,
    };
    let upstream_err = |e: io::Error| Stop::Closed(CloseReason::UpstreamError(e.to_string()));
    let ssl_request = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    write_flush(&mut upstream, &ssl_request)
        .await
        .map_err(upstream_err)?;
    let mut answer = [0u8; 1];
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, upstream.read_exact(&mut answer)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Err(fatal(format!(
            "tollgate: target \"{target}\": the server closed the connection after SSLRequest: {e}"
        )))
        }
        Err(_) => {
            return Err(fatal(format!(
                "tollgate: target \"{target}\": the server did not answer SSLRequest in time"
            )))
        }
    }
    match answer {
        [b'S'] => {}
        [b'N'] if matches!(mode, UpstreamMode::Prefer(_)) => {
            tracing::debug!(session = %ctx.id, "the server does not offer TLS; going on in plaintext (tls = \"prefer\")");
            return Ok(Stream::Plain(upstream));
        }
        [b'N'] => {
            return Err(fatal(format!(
                "tollgate: target \"{target}\" requires TLS but the server does not offer it"
            )))
        }
        [other] => {
            return Err(fatal(format!(
                "tollgate: target \"{target}\": the server answered SSLRequest with {} instead of S or N",
                printable(other)
            )))
        }
    }
    let name = name.unwrap_or(&ctx.upstream_name);
    let server_name = tls::server_name(name).map_err(|e| {
        fatal(format!(
            "tollgate: target \"{target}\": {e}; set tls_server_name"
        ))
    })?;
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, connector.connect(server_name, upstream)).await {
        Ok(Ok(tls)) => Ok(Stream::Tls(Box::new(tls.into()))),
        Ok(Err(e)) => Err(fatal(format!(
            "tollgate: target \"{target}\": TLS to the server failed ({} mode, server name \"{name}\"): {}",
            mode.name(),
            tls::describe_handshake_error(&e, verify_full)
        ))),
        Err(_) => Err(fatal(format!(
            "tollgate: target \"{target}\": the TLS handshake with the server did not finish in time"
        ))),
    }
}

/// Sends the real CancelRequest for a client-visible key to the upstream
/// of the session it belongs to; an unknown key is dropped. No answer
/// either way, as the protocol says.
pub(super) async fn forward_cancel(
    ctx: &PostgresContext<'_>,
    mut upstream: TcpStream,
    pid: i32,
    secret: &[u8],
) -> CloseReason {
    let Some(backend) = ctx.cancel.lookup(pid, secret) else {
        tracing::debug!(session = %ctx.id, pid, "CancelRequest with an unknown key: dropped");
        return CloseReason::Completed;
    };
    // A statement held for review is the proxy's to cancel.
    ctx.cancel.interrupt(pid);
    let mut wire = Vec::with_capacity(16);
    FrontendMessage::CancelRequest {
        pid: backend.pid,
        secret: &backend.secret,
    }
    .encode(&mut wire);
    if backend.upstream != ctx.upstream_addr {
        // The session's own connection goes elsewhere: reach the backend's.
        drop(upstream);
        upstream =
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, TcpStream::connect(backend.upstream))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return CloseReason::UpstreamError(format!(
                        "cannot forward a CancelRequest to {}: {e}",
                        backend.upstream
                    ))
                }
                Err(_) => {
                    return CloseReason::UpstreamError(format!(
                        "cannot forward a CancelRequest to {}: timed out",
                        backend.upstream
                    ))
                }
            };
    }
    tracing::info!(session = %ctx.id, backend_pid = backend.pid, upstream = %backend.upstream, "forwarding a CancelRequest upstream");
    if let Err(e) = upstream.write_all(&wire).await {
        return CloseReason::UpstreamError(e.to_string());
    }
    let _ = upstream.shutdown().await;
    CloseReason::Completed
}

/// What a refused client is told: a FATAL ErrorResponse's fields.
#[derive(Debug, Clone, Copy)]
pub struct Fatal<'a> {
    /// SQLSTATE.
    pub sqlstate: &'a str,
    /// The message.
    pub message: &'a str,
    /// DETAIL, if any.
    pub detail: Option<&'a str>,
    /// HINT, if any.
    pub hint: Option<&'a str>,
}

/// Answers a client the agent will not serve: reads its start-up packets
/// (over TLS when `tls` is given and the client asks for it, so a client
/// that insists on TLS still reads why), then sends `refusal` as a FATAL
/// error and closes. An invalid start-up gets the protocol violation
/// instead; a CancelRequest, or a client that leaves or stays silent for
/// `timeout`, gets nothing.
pub async fn refuse_at_startup(
    client: TcpStream,
    tls: Option<&TlsAcceptor>,
    refusal: &Fatal<'_>,
    timeout: Duration,
) {
    let shared = BetweenSides::new();
    let start = Instant::now();
    let exchange = async {
        let mut buf = ReadBuf::new();
        let mut negotiations = 0;
        let mut stream = Stream::Plain(client);
        loop {
            let offer_tls = tls.is_some() && !stream.is_tls();
            let packet = read_startup(
                &mut stream,
                &mut buf,
                &shared,
                start,
                &mut negotiations,
                offer_tls,
            )
            .await;
            let wire = match packet {
                Ok(StartupPacket::TlsRequested) => {
                    let (Some(acceptor), Stream::Plain(mut tcp)) = (tls, stream) else {
                        return None;
                    };
                    tcp.write_all(b"S").await.ok()?;
                    let secured = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                        .await
                        .ok()?
                        .ok()?;
                    stream = Stream::Tls(Box::new(secured.into()));
                    continue;
                }
                Ok(StartupPacket::Startup { .. }) => error_response(
                    severity::FATAL,
                    refusal.sqlstate,
                    refusal.message,
                    refusal.detail,
                    refusal.hint,
                ),
                Err(Stop::Fatal {
                    sqlstate, message, ..
                }) => error_response(severity::FATAL, sqlstate, &message, None, None),
                Ok(StartupPacket::Cancel { .. }) | Err(Stop::Closed(_)) => return None,
            };
            write_flush(&mut stream, &wire).await.ok()?;
            return Some(stream);
        }
    };
    if let Ok(Some(mut stream)) = tokio::time::timeout(timeout, exchange).await {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    }
}
