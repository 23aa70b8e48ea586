//! Refusing a connection before its session starts, in the client's own
//! protocol, so the tool prints why instead of "server closed the
//! connection unexpectedly".

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::postgres::codec::{frame_startup, split_startup, MAX_STARTUP_PACKET};
use crate::protocol::postgres::error::{error_response, severity};
use crate::protocol::postgres::frontend::code;

/// SQLSTATE 57P03 `cannot_connect_now`: what PostgreSQL itself answers
/// while it cannot take connections.
const CANNOT_CONNECT_NOW: &str = "57P03";

/// Start-up packets read at most: SSLRequest, GSSENCRequest, then the
/// StartupMessage.
const MAX_PACKETS: usize = 3;

/// Reads a PostgreSQL client's start-up packet (declining TLS and GSS
/// encryption, so the answer is readable without a handshake) and answers
/// with a FATAL ErrorResponse carrying `message`, `detail` and `hint`, then
/// closes. A CancelRequest, a malformed packet, or a client silent for
/// `timeout` is closed without an answer.
pub(super) async fn refuse_postgres(
    mut client: TcpStream,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
    timeout: Duration,
) {
    let exchange = async {
        let mut buf = Vec::with_capacity(256);
        for _ in 0..MAX_PACKETS {
            let body = loop {
                match split_startup(&buf) {
                    Ok(Some(body)) => break body.to_vec(),
                    Ok(None) => {}
                    Err(_) => return None,
                }
                // The length was checked by frame_startup before any of this
                // is kept: at most MAX_STARTUP_PACKET bytes are buffered.
                let want = match frame_startup(&buf) {
                    Ok(Some(len)) => len.min(MAX_STARTUP_PACKET),
                    Ok(None) => 4,
                    Err(_) => return None,
                };
                let mut chunk = vec![0u8; want.saturating_sub(buf.len()).max(1)];
                let n = client.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(chunk.get(..n)?);
            };
            let packet_len = 4 + body.len();
            buf.drain(..packet_len.min(buf.len()));
            let request = body
                .get(..4)
                .and_then(|c| <[u8; 4]>::try_from(c).ok())
                .map(u32::from_be_bytes)?;
            match request {
                code::SSL_REQUEST | code::GSSENC_REQUEST => {
                    client.write_all(b"N").await.ok()?;
                }
                code::CANCEL_REQUEST => return None,
                _ => {
                    let wire =
                        error_response(severity::FATAL, CANNOT_CONNECT_NOW, message, detail, hint);
                    client.write_all(&wire).await.ok()?;
                    return Some(());
                }
            }
        }
        None
    };
    let _ = tokio::time::timeout(timeout, exchange).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), client.shutdown()).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
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
        let task = tokio::spawn(refuse_postgres(
            server,
            "tollgate: session refused: recording has failed",
            Some("disk full"),
            None,
            Duration::from_secs(5),
        ));
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

    #[tokio::test]
    async fn a_cancel_request_or_garbage_gets_no_answer() {
        for packet in [
            {
                let mut p = 16u32.to_be_bytes().to_vec();
                p.extend_from_slice(&code::CANCEL_REQUEST.to_be_bytes());
                p.extend_from_slice(&[0; 8]);
                p
            },
            // A length over the start-up limit.
            u32::MAX.to_be_bytes().to_vec(),
        ] {
            let (mut client, server) = pair().await;
            let task = tokio::spawn(refuse_postgres(
                server,
                "refused",
                None,
                None,
                Duration::from_secs(5),
            ));
            client.write_all(&packet).await.unwrap();
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            task.await.unwrap();
            assert!(reply.is_empty(), "{reply:?}");
        }
    }
}
