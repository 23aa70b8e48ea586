//! Messages the proxy makes itself, byte-exact, and the SQLSTATE codes it
//! uses.
//!
//! Drivers act on these bytes as if the server had sent them, so they
//! follow what PostgreSQL writes: ErrorResponse carries `S` (severity), `V`
//! (the same severity, never localized), `C` (a real SQLSTATE) and `M`, then
//! `D` and `H` when given, then the terminating NUL.

use super::backend::{tag, TransactionStatus};
use super::codec::MessageWriter;

/// Severities for [`error_response`].
pub mod severity {
    /// The statement failed; the session goes on.
    pub const ERROR: &str = "ERROR";
    /// The session ends after this message.
    pub const FATAL: &str = "FATAL";
    /// Information for the client (a NoticeResponse); nothing failed.
    pub const NOTICE: &str = "NOTICE";
}

/// SQLSTATE codes the proxy sends (PostgreSQL Appendix A, "Error Codes").
///
/// Drivers and applications branch on the class (the first two
/// characters), so each refusal uses the code PostgreSQL itself would use
/// for the same situation.
pub mod sqlstate {
    /// `42501` insufficient_privilege: a policy denied the statement, as
    /// PostgreSQL answers a missing GRANT. Severity ERROR; the session goes
    /// on.
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    /// `08006` connection_failure: the upstream server could not be reached
    /// or went away. Severity FATAL.
    pub const CONNECTION_FAILURE: &str = "08006";
    /// `08P01` protocol_violation: the client sent a message the codec
    /// refused (bad length, malformed body, unexpected type). Severity
    /// FATAL: after a framing error the stream cannot be trusted.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// `57P01` admin_shutdown: the agent is shutting down and the grace
    /// period is over. Severity FATAL.
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// `57P03` cannot_connect_now: what PostgreSQL answers while it cannot
    /// take connections; the agent's answer when recording has failed.
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// `53300` too_many_connections: a connection limit of the proxy was
    /// reached. Severity FATAL.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// `28000` invalid_authorization_specification: a policy refuses this
    /// client, user or database at start-up, as `pg_hba.conf` would.
    /// Severity FATAL.
    pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
    /// `25P02` in_failed_sql_transaction: a statement arrived in a
    /// transaction block that already failed. Severity ERROR.
    pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
    /// `0A000` feature_not_supported: a request the proxy does not handle
    /// (an unsupported protocol version, a replication connection no rule
    /// allows). Severity FATAL at start-up.
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
}

/// An ErrorResponse (`E`) with fields S, V, C, M, then D and H if given.
///
/// `severity` is one of [`severity`]'s constants (written as both `S` and
/// `V`); `sqlstate` one of [`sqlstate`]'s. NUL bytes inside the strings
/// would end a field early and are dropped.
pub fn error_response(
    severity: &str,
    sqlstate: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> Vec<u8> {
    let mut out = Vec::new();
    write_error_response(&mut out, severity, sqlstate, message, detail, hint);
    out
}

/// [`error_response`], appended to `out` (no allocation when `out` has room).
pub fn write_error_response(
    out: &mut Vec<u8>,
    severity: &str,
    sqlstate: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) {
    use super::backend::field;
    let mut w = MessageWriter::new(out, tag::ERROR_RESPONSE);
    w.put_u8(field::SEVERITY).put_cstr(severity);
    w.put_u8(field::SEVERITY_NONLOCALIZED).put_cstr(severity);
    w.put_u8(field::CODE).put_cstr(sqlstate);
    w.put_u8(field::MESSAGE).put_cstr(message);
    if let Some(detail) = detail {
        w.put_u8(field::DETAIL).put_cstr(detail);
    }
    if let Some(hint) = hint {
        w.put_u8(field::HINT).put_cstr(hint);
    }
    w.put_u8(0);
    w.finish();
}

/// A NoticeResponse (`N`) with severity NOTICE and SQLSTATE `00000`, as
/// the server writes one for `RAISE NOTICE`, appended to `out`.
pub fn write_notice(out: &mut Vec<u8>, message: &str) {
    use super::backend::field;
    let mut w = MessageWriter::new(out, tag::NOTICE_RESPONSE);
    w.put_u8(field::SEVERITY).put_cstr(severity::NOTICE);
    w.put_u8(field::SEVERITY_NONLOCALIZED)
        .put_cstr(severity::NOTICE);
    w.put_u8(field::CODE).put_cstr("00000");
    w.put_u8(field::MESSAGE).put_cstr(message);
    w.put_u8(0);
    w.finish();
}

/// ReadyForQuery (`Z`) with `status`: six bytes.
pub fn ready_for_query(status: TransactionStatus) -> [u8; 6] {
    [tag::READY_FOR_QUERY, 0, 0, 0, 5, status.byte()]
}

/// The answer to SSLRequest or GSSENCRequest that refuses encryption: the
/// single byte `N`, after which the client may go on in plaintext.
pub fn ssl_refused() -> [u8; 1] {
    [b'N']
}

/// AuthenticationOk (`R`, code 0): nine bytes.
pub fn authentication_ok() -> [u8; 9] {
    [tag::AUTHENTICATION, 0, 0, 0, 8, 0, 0, 0, 0]
}

/// ParameterStatus (`S`).
pub fn parameter_status(name: &str, value: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = MessageWriter::new(&mut out, tag::PARAMETER_STATUS);
    w.put_cstr(name).put_cstr(value);
    w.finish();
    out
}

/// BackendKeyData (`K`). `secret` must be 4 bytes for protocol 3.0 and 4 to
/// 256 bytes for 3.2; it is written as given.
pub fn backend_key_data(pid: i32, secret: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = MessageWriter::new(&mut out, tag::BACKEND_KEY_DATA);
    w.put_i32(pid).put_bytes(secret);
    w.finish();
    out
}

/// NegotiateProtocolVersion (`v`): the newest minor version supported for
/// the major version the client asked for, and the `_pq_.*` options not
/// recognized.
pub fn negotiate_protocol_version(newest_minor: i32, unrecognized: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = MessageWriter::new(&mut out, tag::NEGOTIATE_PROTOCOL_VERSION);
    w.put_i32(newest_minor)
        .put_i32(i32::try_from(unrecognized.len()).unwrap_or(i32::MAX));
    for option in unrecognized {
        w.put_cstr(option);
    }
    w.finish();
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::super::backend::{decode_backend, Auth, BackendMessage};
    use super::super::codec::{split_frame, MAX_MESSAGE};
    use super::*;

    fn decode(wire: &[u8]) -> BackendMessage<'_> {
        let f = split_frame(wire, MAX_MESSAGE).unwrap().unwrap();
        assert_eq!(f.wire_len(), wire.len());
        decode_backend(f.tag, f.body).unwrap()
    }

    #[test]
    fn error_response_is_byte_exact() {
        let wire = error_response(
            severity::ERROR,
            sqlstate::INSUFFICIENT_PRIVILEGE,
            "permission denied",
            None,
            None,
        );
        let expected: &[u8] = b"E\0\0\0\x2d\
            SERROR\0VERROR\0C42501\0Mpermission denied\0\0";
        assert_eq!(wire, expected);
        let BackendMessage::ErrorResponse(fields) = decode(&wire) else {
            panic!("not an error")
        };
        assert_eq!(fields.severity(), Some("ERROR"));
        assert_eq!(fields.sqlstate(), Some("42501"));
        assert_eq!(fields.message(), Some("permission denied"));
    }

    #[test]
    fn error_response_with_detail_and_hint() {
        let wire = error_response(
            severity::FATAL,
            sqlstate::PROTOCOL_VIOLATION,
            "invalid frontend message",
            Some("Bind: parameter count 65535 exceeds the 12 bytes left"),
            Some("a\0b"),
        );
        let BackendMessage::ErrorResponse(fields) = decode(&wire) else {
            panic!("not an error")
        };
        let codes: Vec<u8> = fields.0.iter().map(|(c, _)| *c).collect();
        assert_eq!(codes, b"SVCMDH");
        assert_eq!(fields.get(b'H'), Some("ab"));
        assert_eq!(fields.severity(), Some("FATAL"));
        assert_eq!(*wire.last().unwrap(), 0);
    }

    #[test]
    fn small_messages() {
        assert_eq!(ready_for_query(TransactionStatus::Idle), *b"Z\0\0\0\x05I");
        assert_eq!(
            ready_for_query(TransactionStatus::InBlock),
            *b"Z\0\0\0\x05T"
        );
        assert_eq!(ready_for_query(TransactionStatus::Failed), *b"Z\0\0\0\x05E");
        assert_eq!(ssl_refused(), *b"N");
        assert_eq!(authentication_ok(), *b"R\0\0\0\x08\0\0\0\0");
        assert_eq!(
            decode(&authentication_ok()),
            BackendMessage::Authentication(Auth::Ok)
        );
        assert_eq!(
            parameter_status("client_encoding", "UTF8"),
            b"S\0\0\0\x19client_encoding\0UTF8\0"
        );
        assert_eq!(
            backend_key_data(4242, b"\x01\x02\x03\x04"),
            b"K\0\0\0\x0c\0\0\x10\x92\x01\x02\x03\x04"
        );
        assert_eq!(
            negotiate_protocol_version(0, &["_pq_.foo"]),
            b"v\0\0\0\x15\0\0\0\0\0\0\0\x01_pq_.foo\0"
        );
        assert_eq!(
            negotiate_protocol_version(2, &[]),
            b"v\0\0\0\x0c\0\0\0\x02\0\0\0\0"
        );
    }
}
