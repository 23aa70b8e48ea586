//! The reviewer API from the command line: one HTTP/1.1 request over the
//! Unix socket, the JSON answer back.

use std::path::Path;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

/// Sends `method path` with an optional JSON body; the status and the JSON
/// answer.
pub async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach the reviewer socket {} (is the agent running? pass --socket or --config)",
            socket.display()
        )
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("reviewer socket: handshake failed")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "reviewer socket: connection ended");
        }
    });
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "tollgate")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(payload)))
        .context("building the request")?;
    let response = sender
        .send_request(request)
        .await
        .context("reviewer socket: no answer")?;
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .context("reviewer socket: reading the answer")?
        .to_bytes();
    let value = serde_json::from_slice(&bytes)
        .with_context(|| format!("reviewer socket: the answer (HTTP {status}) is not JSON"))?;
    Ok((status, value))
}
