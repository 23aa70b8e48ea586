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
    let mut sender = connect(socket).await?;
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

/// An HTTP/1.1 connection to the reviewer socket, driven by a task of its
/// own.
async fn connect(
    socket: &Path,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach the reviewer socket {} (is the agent running? pass --socket or --config)",
            socket.display()
        )
    })?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("reviewer socket: handshake failed")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "reviewer socket: connection ended");
        }
    });
    Ok(sender)
}

/// Longest line a watch stream may send.
const MAX_WATCH_LINE: usize = 16 * 1024 * 1024;

/// Opens `GET /v1/watch` and hands `each` every event (the JSON of a
/// `data:` line) as it arrives; returns when the agent ends the stream.
pub async fn watch(socket: &Path, mut each: impl FnMut(Value)) -> anyhow::Result<()> {
    let mut sender = connect(socket).await?;
    let request = Request::builder()
        .method(Method::GET)
        .uri("/v1/watch")
        .header(hyper::header::HOST, "tollgate")
        .header(hyper::header::ACCEPT, "text/event-stream")
        .body(Full::new(Bytes::new()))
        .context("building the request")?;
    let response = sender
        .send_request(request)
        .await
        .context("reviewer socket: no answer")?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    if status != 200 {
        let bytes = body
            .collect()
            .await
            .context("reviewer socket: reading the answer")?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let message = value["error"].as_str().unwrap_or("no reason given");
        anyhow::bail!("refused (HTTP {status}): {message}");
    }
    let mut pending: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context(
            "the agent ended the watch (it stopped or restarted, or the connection broke)",
        )?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            if let Some(json) = line.trim_end().strip_prefix("data:") {
                match serde_json::from_str(json.trim_start()) {
                    Ok(value) => each(value),
                    Err(e) => {
                        tracing::debug!(error = %e, "reviewer socket: a watch line is not JSON")
                    }
                }
            }
        }
        if pending.len() > MAX_WATCH_LINE {
            anyhow::bail!("reviewer socket: a watch event is longer than {MAX_WATCH_LINE} bytes");
        }
    }
    Ok(())
}
