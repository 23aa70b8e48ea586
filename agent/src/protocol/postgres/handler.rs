//! The PostgreSQL [`Handler`]: serves PostgreSQL targets' sessions and owns
//! what they share, the client-visible cancel keys and the TLS material.

use std::collections::HashMap;
use std::time::Duration;

use tokio::net::TcpStream;

use super::cancel::CancelRegistry;
use super::error::sqlstate;
use super::session::{self, Fatal, PostgresContext};
use crate::config::{Config, Target};
use crate::events::CloseReason;
use crate::protocol::tls::TlsState;
use crate::protocol::{Handler, HandlerFuture, Refusal, SessionContext};

/// Serves PostgreSQL sessions.
pub struct PostgresHandler {
    cancel: CancelRegistry,
    tls: TlsState,
    /// Targets with brokered credentials, by name.
    brokered: HashMap<String, Target>,
}

impl PostgresHandler {
    /// A handler with the TLS material `config` names (loaded now, so a
    /// bad certificate stops the start).
    pub fn new(config: &Config) -> anyhow::Result<PostgresHandler> {
        use anyhow::Context as _;
        let tls = TlsState::load(config, Some(crate::protocol::tls::ALPN_POSTGRESQL))
            .context("cannot set up TLS")?;
        let mut handler = PostgresHandler::with_tls(tls);
        handler.brokered = config
            .targets
            .iter()
            .filter(|t| !t.credentials.is_empty())
            .map(|t| (t.name.clone(), t.clone()))
            .collect();
        Ok(handler)
    }

    /// A handler with the given TLS material.
    pub fn with_tls(tls: TlsState) -> PostgresHandler {
        PostgresHandler {
            cancel: CancelRegistry::new(),
            tls,
            brokered: HashMap::new(),
        }
    }

    /// The context a session of this handler runs with.
    pub fn context<'a>(&'a self, common: &'a SessionContext) -> PostgresContext<'a> {
        PostgresContext::new(
            common,
            &self.cancel,
            &self.tls,
            self.brokered.get(&common.target),
        )
    }
}

impl Handler for PostgresHandler {
    fn serve<'a>(
        &'a self,
        ctx: &'a SessionContext,
        client: TcpStream,
        upstream: TcpStream,
    ) -> HandlerFuture<'a, CloseReason> {
        Box::pin(async move { session::run(&self.context(ctx), client, upstream).await })
    }

    fn refuse<'a>(
        &'a self,
        client: TcpStream,
        refusal: Refusal<'a>,
        timeout: Duration,
    ) -> HandlerFuture<'a, ()> {
        Box::pin(async move {
            let tls = self.tls.client();
            match refusal {
                Refusal::UpstreamUnreachable { target, cause } => {
                    let message = format!(
                        "tollgate: cannot reach the upstream of target \"{target}\": {cause}"
                    );
                    let fatal = Fatal {
                        sqlstate: sqlstate::CONNECTION_FAILURE,
                        message: &message,
                        detail: None,
                        hint: None,
                    };
                    session::refuse_at_startup(client, tls, &fatal, timeout).await;
                }
                Refusal::RecordingFailed { failure } => {
                    // 57P03 cannot_connect_now: what PostgreSQL itself
                    // answers while it cannot take connections.
                    let fatal = Fatal {
                        sqlstate: sqlstate::CANNOT_CONNECT_NOW,
                        message: "tollgate: session refused: session recording has failed",
                        detail: Some(failure),
                        hint: Some(session::RECORDING_HINT),
                    };
                    session::refuse_at_startup(client, tls, &fatal, timeout).await;
                }
                Refusal::SpoolFull { why } => {
                    let fatal = Fatal {
                        sqlstate: sqlstate::CANNOT_CONNECT_NOW,
                        message: "tollgate: session refused: the recording upload spool is full",
                        detail: Some(why),
                        hint: Some("recordings are uploaded as soon as the bucket can be reached; `tollgate status` and the tollgate_upload_* metrics show the spool"),
                    };
                    session::refuse_at_startup(client, tls, &fatal, timeout).await;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::super::frontend::code;
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    fn startup() -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&code::PROTOCOL_3_0.to_be_bytes());
        body.extend_from_slice(b"user\0app\0\0");
        let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        p.extend_from_slice(&body);
        p
    }

    #[tokio::test]
    async fn a_client_asking_for_tls_then_starting_gets_a_fatal_error() {
        let (mut client, server) = pair().await;
        let task = tokio::spawn(async move {
            let handler = PostgresHandler::with_tls(TlsState::plaintext());
            let refusal = Refusal::RecordingFailed {
                failure: "disk full",
            };
            handler
                .refuse(server, refusal, Duration::from_secs(5))
                .await;
        });
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend_from_slice(&code::SSL_REQUEST.to_be_bytes());
        client.write_all(&ssl).await.unwrap();
        let mut answer = [0u8; 1];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
        client.write_all(&startup()).await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        task.await.unwrap();
        assert_eq!(reply.first(), Some(&b'E'));
        let text = String::from_utf8_lossy(&reply);
        assert!(text.contains("FATAL"), "{text}");
        assert!(text.contains("57P03"), "{text}");
        assert!(text.contains("recording has failed"), "{text}");
        assert!(text.contains("disk full"), "{text}");
    }

    /// Sends `packet` to a refusing agent and returns all it answers.
    async fn answer_to(packet: &[u8]) -> Vec<u8> {
        let (mut client, server) = pair().await;
        let task = tokio::spawn(async move {
            let handler = PostgresHandler::with_tls(TlsState::plaintext());
            let refusal = Refusal::UpstreamUnreachable {
                target: "db",
                cause: "connection refused",
            };
            handler
                .refuse(server, refusal, Duration::from_secs(5))
                .await;
        });
        client.write_all(packet).await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        task.await.unwrap();
        reply
    }

    #[tokio::test]
    async fn a_cancel_request_gets_no_answer_and_garbage_a_protocol_violation() {
        let mut cancel = 16u32.to_be_bytes().to_vec();
        cancel.extend_from_slice(&code::CANCEL_REQUEST.to_be_bytes());
        cancel.extend_from_slice(&[0; 8]);
        assert_eq!(answer_to(&cancel).await, b"");
        // A length over the start-up limit: the same FATAL a session gets.
        let reply = answer_to(&u32::MAX.to_be_bytes()).await;
        let text = String::from_utf8_lossy(&reply);
        assert_eq!(reply.first(), Some(&b'E'), "{text}");
        assert!(text.contains("08P01"), "{text}");
        assert!(text.contains("invalid start-up packet"), "{text}");
        // A start-up: the refusal, naming the target and the cause.
        let reply = answer_to(&startup()).await;
        let text = String::from_utf8_lossy(&reply);
        assert_eq!(reply.first(), Some(&b'E'), "{text}");
        assert!(text.contains("08006"), "{text}");
        assert!(
            text.contains("cannot reach the upstream of target \"db\": connection refused"),
            "{text}"
        );
    }
}
