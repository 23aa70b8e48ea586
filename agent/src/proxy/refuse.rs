//! Refusing a connection before its session starts, in the client's own
//! protocol, so the tool prints why instead of "server closed the
//! connection unexpectedly".

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::protocol::postgres::session::{self, Refusal};

/// SQLSTATE 57P03 `cannot_connect_now`: what PostgreSQL itself answers
/// while it cannot take connections.
const CANNOT_CONNECT_NOW: &str = "57P03";

/// Refuses a PostgreSQL client because recording has failed: FATAL 57P03
/// with `message`, `detail` and `hint`, after its start-up (over TLS when
/// `tls` is given and the client asks; see
/// [`session::refuse_at_startup`]).
pub(super) async fn refuse_postgres(
    client: TcpStream,
    tls: Option<&TlsAcceptor>,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
    timeout: Duration,
) {
    let refusal = Refusal {
        sqlstate: CANNOT_CONNECT_NOW,
        message,
        detail,
        hint,
    };
    session::refuse_at_startup(client, tls, &refusal, timeout).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::protocol::postgres::frontend::code;
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
        let task = tokio::spawn(refuse_postgres(
            server,
            None,
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

    /// Sends `packet` to a refusing agent and returns all it answers.
    async fn answer_to(packet: &[u8]) -> Vec<u8> {
        let (mut client, server) = pair().await;
        let task = tokio::spawn(refuse_postgres(
            server,
            None,
            "refused",
            None,
            None,
            Duration::from_secs(5),
        ));
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
    }
}
