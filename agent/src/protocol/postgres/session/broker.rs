//! Brokered credentials: on a target with `[[target.credential]]`, the
//! agent logs in to the server itself, as the role of the first credential
//! whose `match` accepts the process behind the session, and the client
//! is let in without a secret. The process is identified by the kernel
//! (the redirect or the listener's socket), so the credential never
//! reaches the job that uses it.
//!
//! The StartupMessage the client sent is forwarded with its `user`
//! replaced; the server's authentication requests (SCRAM-SHA-256, `md5`,
//! cleartext over TLS only) are answered here, and the client sees the
//! server's AuthenticationOk and everything after it as usual. A refusal
//! by the server reaches the client as a FATAL error naming the target
//! and the role, never the secret.

use super::*;
use crate::config::secret::read_secret_file;
use crate::config::{BrokeredCredential, Target};
use crate::protocol::postgres::scram::{self, ScramClient};

/// How long the server may take over authentication.
const AUTH_TIMEOUT: Duration = Duration::from_secs(30);

/// The credential a session logs in with, and its place among the
/// target's: `Ok(None)` when the client
/// authenticates itself (no credential is for this process and the target
/// passes such sessions through); a FATAL refusal when the target refuses
/// them.
pub(super) fn choose<'t>(
    target: &'t Target,
    identity: &ProcessIdentity,
) -> Result<Option<(usize, &'t BrokeredCredential)>, Stop> {
    target.login_for(identity).map_err(|message| Stop::Fatal {
        sqlstate: sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
        reason: CloseReason::ClientError(message.clone()),
        message,
    })
}

/// The StartupMessage `bytes` with its `user` set to `user` (added when
/// the client sent none).
pub(super) fn startup_as(bytes: &[u8], user: &str) -> Result<Vec<u8>, Stop> {
    let body = bytes.get(4..).unwrap_or_default();
    let FrontendMessage::Startup {
        major,
        minor,
        mut params,
    } = decode_startup(body).map_err(Stop::protocol_violation)?
    else {
        return Err(Stop::protocol_violation(
            "a start-up packet that is not a StartupMessage",
        ));
    };
    match params.iter_mut().find(|(name, _)| *name == "user") {
        Some(entry) => entry.1 = user,
        None => params.insert(0, ("user", user)),
    }
    let mut out = Vec::with_capacity(bytes.len() + user.len());
    FrontendMessage::Startup {
        major,
        minor,
        params,
    }
    .encode(&mut out);
    Ok(out)
}

/// Answers the server's authentication requests with `credential` until
/// the server sends AuthenticationOk, which is left at the start of `buf`
/// for the upstream pump to forward (with whatever followed it).
pub(super) async fn authenticate(
    ctx: &PostgresContext<'_>,
    upstream: &mut Stream,
    buf: &mut ReadBuf,
    credential: &BrokeredCredential,
) -> Result<(), Stop> {
    let role = &credential.user;
    let target = &ctx.target;
    let refused = |message: String| Stop::Fatal {
        sqlstate: sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
        reason: CloseReason::UpstreamError(message.clone()),
        message,
    };
    let password = match &credential.password_file {
        None => None,
        Some(file) => Some(read_secret_file(file).map_err(|e| {
            refused(format!(
                "tollgate: target \"{target}\": the brokered credential for role \"{role}\" cannot be used: {e}"
            ))
        })?),
    };
    // Asked for a password the credential does not have (it logs in with
    // its client certificate alone).
    let password = || {
        password.as_ref().ok_or_else(|| {
            refused(format!(
                "tollgate: target \"{target}\": the server asks for a password for role \"{role}\", and its brokered credential has a client certificate only (give it a password_file, or use cert in pg_hba.conf)"
            ))
        })
    };
    let exchange = async {
        let mut scram: Option<ScramClient> = None;
        let mut scram_verified = false;
        loop {
            let header = read_message(ctx, upstream, buf).await?;
            let body = header.body(buf.filled()).unwrap_or_default();
            let message = backend::decode_backend(header.tag, body).map_err(|e| {
                Stop::Closed(CloseReason::UpstreamError(format!(
                    "malformed message from the server during authentication: {e}"
                )))
            })?;
            let mut reply = Vec::new();
            match message {
                BackendMessage::Authentication(backend::Auth::Ok) => {
                    if scram.is_some() && !scram_verified {
                        return Err(refused(format!(
                            "tollgate: target \"{target}\": the server ended SCRAM authentication for role \"{role}\" without proving it knows the password"
                        )));
                    }
                    tracing::info!(session = %ctx.id, role = %role, "logged in to the server with a brokered credential");
                    return Ok(());
                }
                BackendMessage::Authentication(backend::Auth::CleartextPassword) => {
                    if !upstream.is_tls() {
                        return Err(refused(format!(
                            "tollgate: target \"{target}\": the server asks for the password of role \"{role}\" in cleartext over an unencrypted connection; the agent sends a brokered password in cleartext only over TLS (set the target's tls to \"require\" or \"verify-full\", or use scram-sha-256 in pg_hba.conf)"
                        )));
                    }
                    let mut text = password()?.expose().to_vec();
                    text.push(0);
                    FrontendMessage::Password(&text).encode(&mut reply);
                    text.fill(0);
                }
                BackendMessage::Authentication(backend::Auth::Md5Password { salt }) => {
                    let mut text =
                        scram::md5_password(role, password()?.expose(), salt).into_bytes();
                    text.push(0);
                    FrontendMessage::Password(&text).encode(&mut reply);
                }
                BackendMessage::Authentication(backend::Auth::Sasl { mechanisms }) => {
                    if !mechanisms.contains(&scram::SCRAM_SHA_256) {
                        return Err(refused(format!(
                            "tollgate: target \"{target}\": the server offers SASL mechanisms {mechanisms:?} for role \"{role}\"; brokered credentials use SCRAM-SHA-256"
                        )));
                    }
                    let (client, first) = ScramClient::start(password()?.expose())
                        .map_err(|e| refused(format!("tollgate: {e}")))?;
                    scram = Some(client);
                    frontend::SaslInitialResponse {
                        mechanism: scram::SCRAM_SHA_256,
                        data: Some(&first),
                    }
                    .encode(&mut reply);
                }
                BackendMessage::Authentication(backend::Auth::SaslContinue(challenge)) => {
                    let Some(client) = scram.as_mut() else {
                        return Err(refused(format!("tollgate: target \"{target}\": the server sent a SCRAM challenge out of turn")));
                    };
                    let last = client.client_final(challenge).map_err(|e| {
                        refused(format!("tollgate: target \"{target}\": SCRAM authentication for role \"{role}\" failed: {e}"))
                    })?;
                    FrontendMessage::Password(&last).encode(&mut reply);
                }
                BackendMessage::Authentication(backend::Auth::SaslFinal(answer)) => {
                    let Some(client) = scram.as_ref() else {
                        return Err(refused(format!(
                            "tollgate: target \"{target}\": the server ended SCRAM out of turn"
                        )));
                    };
                    client.verify_server_final(answer).map_err(|e| {
                        refused(format!("tollgate: target \"{target}\": SCRAM authentication for role \"{role}\" failed: {e}"))
                    })?;
                    scram_verified = true;
                }
                BackendMessage::Authentication(other) => {
                    let method = match other {
                        backend::Auth::Gss | backend::Auth::GssContinue(_) => "GSSAPI".to_owned(),
                        backend::Auth::Sspi => "SSPI".to_owned(),
                        _ => "an unsupported method".to_owned(),
                    };
                    return Err(refused(format!(
                        "tollgate: target \"{target}\": the server asks for {method} authentication for role \"{role}\"; brokered credentials answer scram-sha-256, md5 and password"
                    )));
                }
                BackendMessage::ErrorResponse(fields) => {
                    let said = fields.get(b'M').unwrap_or("no message");
                    let code = fields.get(b'C').unwrap_or("?");
                    return Err(refused(format!(
                        "tollgate: target \"{target}\": the server refused the brokered credential for role \"{role}\": {said} (SQLSTATE {code})"
                    )));
                }
                BackendMessage::NoticeResponse(_) => {}
                other => {
                    return Err(Stop::Closed(CloseReason::UpstreamError(format!(
                        "the server sent {} during authentication",
                        other.name()
                    ))))
                }
            }
            buf.consume(header.len);
            if !reply.is_empty() {
                write_flush(upstream, &reply)
                    .await
                    .map_err(|e| Stop::Closed(CloseReason::UpstreamError(e.to_string())))?;
            }
        }
    };
    match tokio::time::timeout(AUTH_TIMEOUT, exchange).await {
        Ok(result) => result,
        Err(_) => Err(refused(format!(
            "tollgate: target \"{target}\": the server did not finish authenticating role \"{role}\" in {} s",
            AUTH_TIMEOUT.as_secs()
        ))),
    }
}

/// Reads until one whole server message is at the start of `buf`.
async fn read_message(
    ctx: &PostgresContext<'_>,
    upstream: &mut Stream,
    buf: &mut ReadBuf,
) -> Result<FrameHeader, Stop> {
    loop {
        match frame(buf.filled(), MAX_PRE_AUTH_MESSAGE) {
            Err(e) => {
                return Err(Stop::Closed(CloseReason::UpstreamError(format!(
                    "malformed message from the server during authentication: {e}"
                ))))
            }
            Ok(Some(header)) if buf.filled().len() >= header.len => return Ok(header),
            Ok(Some(header)) => buf.make_room(header.len),
            Ok(None) => buf.make_room(FrameHeader::SIZE),
        }
        let n = buf
            .read_from(upstream)
            .await
            .map_err(|e| Stop::Closed(CloseReason::UpstreamError(e.to_string())))?;
        if n == 0 {
            return Err(Stop::Closed(CloseReason::UpstreamError(
                "the server closed the connection during authentication".to_owned(),
            )));
        }
        count(ctx, false, n);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        FrontendMessage::Startup {
            major: 3,
            minor: 0,
            params: params.to_vec(),
        }
        .encode(&mut out);
        out
    }

    #[test]
    fn the_startup_user_is_replaced_or_added_and_the_rest_kept() {
        let rewritten = startup_as(
            &startup(&[
                ("user", "me"),
                ("database", "shop"),
                ("application_name", "psql"),
            ]),
            "app_ro",
        )
        .unwrap();
        assert_eq!(
            rewritten,
            startup(&[
                ("user", "app_ro"),
                ("database", "shop"),
                ("application_name", "psql")
            ])
        );
        let added = startup_as(&startup(&[("database", "shop")]), "app_ro").unwrap();
        assert_eq!(added, startup(&[("user", "app_ro"), ("database", "shop")]));
    }
}
