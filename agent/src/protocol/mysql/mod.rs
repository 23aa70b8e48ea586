//! MySQL and MariaDB targets (client/server protocol 4.1): each COM_QUERY
//! and COM_STMT_PREPARE is analysed (`sql::mysql`) and decided by the same
//! policy as PostgreSQL's statements, each COM_STMT_EXECUTE decided again
//! under the policy in force, refusals answered with an ERR packet that
//! names the rule, and every statement recorded.
//!
//! Results of statements a `mask` rule applies to are masked (`mask.rs`).
//! TLS is negotiated on each leg apart, with the same settings as for
//! PostgreSQL (`client_tls`, the target's `tls`). `KILL` and
//! `COM_PROCESS_KILL` may name only a connection a process of the same user
//! opened through the agent. `COM_CHANGE_USER` is relayed with its
//! authentication. `LOAD DATA LOCAL` runs only when a rule allows it, and
//! the server's request for a client file is answered only with that
//! statement's file. A statement a `review` rule takes is held for its
//! reviewers (`session/review.rs`). `HANDLER ... READ` and SQL `EXECUTE`
//! are decided as what their name was opened or prepared on (`names.rs`).

pub mod broker;
pub mod handshake;
pub mod mask;
mod names;
pub mod packet;
pub mod session;

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::tls::TlsState;
use super::{Handler, HandlerFuture, Refusal, SessionContext};
use crate::config::Config;
use crate::events::CloseReason;

/// Serves `mysql` targets.
pub struct MysqlHandler {
    tls: TlsState,
    connections: session::Connections,
    /// Targets with brokered credentials, by name.
    brokered: std::collections::HashMap<String, crate::config::Target>,
}

impl MysqlHandler {
    /// The handler for `config`'s targets: the TLS material of both legs
    /// (a bad certificate stops the start).
    pub fn new(config: &Config) -> anyhow::Result<MysqlHandler> {
        use anyhow::Context as _;
        let tls = TlsState::load(config, None).context("cannot set up TLS for MySQL targets")?;
        Ok(MysqlHandler {
            tls,
            connections: session::Connections::default(),
            brokered: config
                .targets
                .iter()
                .filter(|t| !t.credentials.is_empty())
                .map(|t| (t.name.clone(), t.clone()))
                .collect(),
        })
    }
}

impl Handler for MysqlHandler {
    fn serve<'a>(
        &'a self,
        ctx: &'a SessionContext,
        client: TcpStream,
        upstream: TcpStream,
    ) -> HandlerFuture<'a, CloseReason> {
        Box::pin(session::run(
            ctx,
            &self.tls,
            &self.connections,
            self.brokered.get(&ctx.target),
            client,
            upstream,
        ))
    }

    /// The server speaks first in MySQL, so the refusal is the first
    /// packet the client reads: an ERR in place of the greeting.
    fn refuse<'a>(
        &'a self,
        mut client: TcpStream,
        refusal: Refusal<'a>,
        timeout: Duration,
    ) -> HandlerFuture<'a, ()> {
        Box::pin(async move {
            let payload = match refusal {
                Refusal::UpstreamUnreachable { target, cause } => packet::greeting_err_payload(
                    // ER_UNKNOWN_ERROR: clients take only server error codes
                    // here (a client code such as 2003 reads as malformed).
                    1105,
                    &format!("tollgate: cannot reach target \"{target}\": {cause}"),
                ),
                Refusal::RecordingFailed { failure } => packet::greeting_err_payload(
                    1227,
                    &format!("tollgate: session recording has failed ({failure}), and nothing may run unrecorded"),
                ),
                Refusal::SpoolFull { why } => packet::greeting_err_payload(
                    1040,
                    &format!("tollgate: session refused: {why}"),
                ),
            };
            let mut wire = Vec::new();
            packet::frame(&mut wire, 0, &payload);
            let _ = tokio::time::timeout(timeout, client.write_all(&wire)).await;
            let _ = client.shutdown().await;
        })
    }
}
