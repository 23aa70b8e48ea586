//! Messages from the client to the server.
//!
//! Decoding borrows from the read buffer: strings and payloads are slices of
//! it, and only the lists a message carries (parameter types, formats,
//! values, start-up parameters) are collected into vectors, sized after the
//! count from the wire was checked against the bytes left.

use super::codec::{
    check_cancel_key, expect_empty, CodecError, MessageWriter, Reader, MAX_MESSAGE,
    MAX_SMALL_MESSAGE,
};

/// Message type bytes of client messages.
pub mod tag {
    /// Bind.
    pub const BIND: u8 = b'B';
    /// Close.
    pub const CLOSE: u8 = b'C';
    /// CopyData.
    pub const COPY_DATA: u8 = b'd';
    /// CopyDone.
    pub const COPY_DONE: u8 = b'c';
    /// CopyFail.
    pub const COPY_FAIL: u8 = b'f';
    /// Describe.
    pub const DESCRIBE: u8 = b'D';
    /// Execute.
    pub const EXECUTE: u8 = b'E';
    /// Flush.
    pub const FLUSH: u8 = b'H';
    /// FunctionCall.
    pub const FUNCTION_CALL: u8 = b'F';
    /// Parse.
    pub const PARSE: u8 = b'P';
    /// PasswordMessage, SASLInitialResponse, SASLResponse or GSSResponse.
    pub const PASSWORD: u8 = b'p';
    /// Query.
    pub const QUERY: u8 = b'Q';
    /// Sync.
    pub const SYNC: u8 = b'S';
    /// Terminate.
    pub const TERMINATE: u8 = b'X';
}

/// Request codes of untyped start-up packets (the `Int32` after the length).
pub mod code {
    /// CancelRequest (1234.5678).
    pub const CANCEL_REQUEST: u32 = 1234 << 16 | 5678;
    /// SSLRequest (1234.5679).
    pub const SSL_REQUEST: u32 = 1234 << 16 | 5679;
    /// GSSENCRequest (1234.5680).
    pub const GSSENC_REQUEST: u32 = 1234 << 16 | 5680;
    /// StartupMessage for protocol 3.0.
    pub const PROTOCOL_3_0: u32 = 3 << 16;
    /// StartupMessage for protocol 3.2 (PostgreSQL 18, long cancel keys).
    pub const PROTOCOL_3_2: u32 = 3 << 16 | 2;
}

/// Prefix of protocol options in a StartupMessage (`_pq_.name`): they are
/// negotiated, not session settings.
pub const PROTOCOL_OPTION_PREFIX: &str = "_pq_.";

/// What Describe and Close refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// A prepared statement (`S`).
    Statement,
    /// A portal (`P`).
    Portal,
}

impl Target {
    /// The wire byte.
    pub fn byte(self) -> u8 {
        match self {
            Target::Statement => b'S',
            Target::Portal => b'P',
        }
    }

    /// The target a wire byte names, if any.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            b'S' => Some(Target::Statement),
            b'P' => Some(Target::Portal),
            _ => None,
        }
    }
}

/// One message from the client.
///
/// The first four variants are untyped start-up packets (decoded by
/// [`decode_startup`]); the others are typed messages (decoded by
/// [`decode_frontend`]). Tag `p` means a different message in each
/// authentication method, so it stays raw as [`FrontendMessage::Password`];
/// see [`SaslInitialResponse`] and [`password_text`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage<'a> {
    /// StartupMessage: protocol version and parameters, in wire order.
    /// Protocol options (`_pq_.*`) are kept; see [`is_protocol_option`].
    Startup {
        /// Major version (always 3).
        major: u16,
        /// Minor version (0 to 2 today).
        minor: u16,
        /// Name and value pairs (`user`, `database`, `options`, ...).
        params: Vec<(&'a str, &'a str)>,
    },
    /// SSLRequest: asks for TLS; answered with one byte.
    SslRequest,
    /// GSSENCRequest: asks for GSSAPI encryption; answered with one byte.
    GssEncRequest,
    /// CancelRequest, on a connection of its own.
    CancelRequest {
        /// Process id from BackendKeyData.
        pid: i32,
        /// Secret key from BackendKeyData: 4 bytes in 3.0, up to 256 in 3.2.
        secret: &'a [u8],
    },
    /// Query (`Q`): simple query, possibly several statements.
    Query(&'a str),
    /// Parse (`P`).
    Parse {
        /// Statement name (empty: the unnamed statement).
        name: &'a str,
        /// Query text.
        query: &'a str,
        /// Parameter type OIDs (0: unspecified).
        param_types: Vec<u32>,
    },
    /// Bind (`B`).
    Bind {
        /// Destination portal (empty: the unnamed portal).
        portal: &'a str,
        /// Source statement.
        statement: &'a str,
        /// Parameter format codes (none: all text; one: for all).
        param_formats: Vec<i16>,
        /// Parameter values, `None` for NULL.
        params: Vec<Option<&'a [u8]>>,
        /// Result column format codes.
        result_formats: Vec<i16>,
    },
    /// Describe (`D`).
    Describe {
        /// Statement or portal.
        kind: Target,
        /// Its name.
        name: &'a str,
    },
    /// Execute (`E`).
    Execute {
        /// Portal name.
        portal: &'a str,
        /// Row limit, 0 for none.
        max_rows: i32,
    },
    /// Sync (`S`).
    Sync,
    /// Flush (`H`).
    Flush,
    /// Close (`C`).
    Close {
        /// Statement or portal.
        kind: Target,
        /// Its name.
        name: &'a str,
    },
    /// FunctionCall (`F`): the legacy fast-path call interface.
    FunctionCall {
        /// Function OID.
        oid: u32,
        /// Argument format codes.
        arg_formats: Vec<i16>,
        /// Argument values, `None` for NULL.
        args: Vec<Option<&'a [u8]>>,
        /// Result format code.
        result_format: i16,
    },
    /// CopyData (`d`).
    CopyData(&'a [u8]),
    /// CopyDone (`c`).
    CopyDone,
    /// CopyFail (`f`): the reason.
    CopyFail(&'a str),
    /// Terminate (`X`).
    Terminate,
    /// `p`: PasswordMessage, SASLInitialResponse, SASLResponse or
    /// GSSResponse, depending on the authentication request it answers; the
    /// raw body.
    Password(&'a [u8]),
    /// A message type this codec does not know, kept as it came.
    Unknown {
        /// The type byte.
        tag: u8,
        /// The body.
        body: &'a [u8],
    },
}

/// Whether a start-up parameter is a protocol option (`_pq_.*`), to be
/// negotiated rather than passed on as a setting.
pub fn is_protocol_option(name: &str) -> bool {
    name.starts_with(PROTOCOL_OPTION_PREFIX)
}

/// Whether a proxy may pass a client message of this type through in chunks
/// as it arrives (after [`frame`](super::codec::frame) saw the header)
/// instead of buffering it whole: only CopyData, whose content the proxy
/// does not decide on.
pub fn is_streamable(tag: u8) -> bool {
    tag == tag::COPY_DATA
}

/// The largest client message of type `tag` to accept after
/// authentication, as PostgreSQL decides it (`SocketBackend` in
/// `postgres.c`): [`MAX_MESSAGE`] for the types that carry statements or
/// data (Query, Parse, Bind, FunctionCall, CopyData), [`MAX_SMALL_MESSAGE`]
/// for all others. Pass it to [`frame`](super::codec::frame) once the tag is
/// known, so a 1 GiB Sync is refused on its header.
pub fn max_len(tag: u8) -> usize {
    match tag {
        tag::QUERY | tag::PARSE | tag::BIND | tag::FUNCTION_CALL | tag::COPY_DATA => MAX_MESSAGE,
        _ => MAX_SMALL_MESSAGE,
    }
}

/// Decodes a start-up packet from its body: the bytes after the length
/// field, request code first (see
/// [`split_startup`](super::codec::split_startup)).
///
/// Start-up parameter names and values must be UTF-8; a client sending
/// other bytes is refused (the proxy cannot apply rules to names it cannot
/// read).
pub fn decode_startup(body: &[u8]) -> Result<FrontendMessage<'_>, CodecError> {
    let mut r = Reader::new("start-up packet", body);
    let version = r.get_u32("request code")?;
    match version {
        code::SSL_REQUEST => expect_empty("SSLRequest", r.rest(), FrontendMessage::SslRequest),
        code::GSSENC_REQUEST => {
            expect_empty("GSSENCRequest", r.rest(), FrontendMessage::GssEncRequest)
        }
        code::CANCEL_REQUEST => {
            let mut r = Reader::new("CancelRequest", r.rest());
            let pid = r.get_i32("process id")?;
            let secret = r.rest();
            check_cancel_key("CancelRequest", secret)?;
            Ok(FrontendMessage::CancelRequest { pid, secret })
        }
        _ => {
            let [a, b, c, d] = version.to_be_bytes();
            let (major, minor) = (u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]));
            if major != 3 {
                return Err(CodecError::UnsupportedProtocol { major, minor });
            }
            let mut r = Reader::new("StartupMessage", r.rest());
            let mut params = Vec::new();
            loop {
                let name = r.get_cstr("parameter name")?;
                if name.is_empty() {
                    break;
                }
                params.push((name, r.get_cstr("parameter value")?));
            }
            r.finish()?;
            Ok(FrontendMessage::Startup {
                major,
                minor,
                params,
            })
        }
    }
}

/// The fields of a client message the proxy decides on, read in place (no
/// allocation) as raw bytes in the client's encoding, which need not be
/// UTF-8 (`client_encoding = LATIN1`). This is what the session reads;
/// [`decode_frontend`] reads the same fields through the same functions,
/// then checks them as UTF-8 and reads the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head<'a> {
    /// Query: the whole message, statement text.
    Query(&'a [u8]),
    /// Parse: the statement name and text; the parameter types are not read.
    Parse {
        /// Statement name.
        name: &'a [u8],
        /// Query text.
        query: &'a [u8],
    },
    /// Bind: the two names in front of the parameters (see [`bind_names`]).
    Bind {
        /// Destination portal.
        portal: &'a [u8],
        /// Source statement.
        statement: &'a [u8],
    },
    /// Describe: the target byte, as sent (`S` for a statement; the server
    /// judges any other).
    Describe {
        /// `S`, `P`, or what the client sent.
        kind: u8,
    },
    /// Close: the target byte, as sent, and the name.
    Close {
        /// `S`, `P`, or what the client sent.
        kind: u8,
        /// Its name.
        name: &'a [u8],
    },
    /// Execute: the portal name; the row limit is not read.
    Execute {
        /// Portal name.
        portal: &'a [u8],
    },
    /// FunctionCall: the function; the arguments are not read.
    FunctionCall {
        /// Function OID.
        oid: u32,
    },
    /// Any other message: nothing in it is decided on.
    Other,
}

/// Reads the [`Head`] of the client message `tag` from its `body`. Only a
/// Query is read to its end; the other messages' later fields are left to
/// the server, as the proxy passes them on unread.
pub fn decode_head(tag: u8, body: &[u8]) -> Result<Head<'_>, CodecError> {
    Ok(match tag {
        tag::QUERY => Head::Query(read_query(Reader::new("Query", body))?),
        tag::PARSE => {
            let (name, query) = read_parse_head(&mut Reader::new("Parse", body))?;
            Head::Parse { name, query }
        }
        tag::BIND => {
            let (portal, statement) = read_bind_names(&mut Reader::new("Bind", body))?;
            Head::Bind { portal, statement }
        }
        tag::DESCRIBE => Head::Describe {
            kind: Reader::new("Describe", body).get_u8("target")?,
        },
        tag::CLOSE => {
            let (kind, name) = read_target_head(&mut Reader::new("Close", body))?;
            Head::Close { kind, name }
        }
        tag::EXECUTE => Head::Execute {
            portal: Reader::new("Execute", body).get_cstr_bytes("portal name")?,
        },
        tag::FUNCTION_CALL => Head::FunctionCall {
            oid: Reader::new("FunctionCall", body).get_u32("function oid")?,
        },
        _ => Head::Other,
    })
}

/// The portal and statement names at the start of a Bind, from the first
/// bytes of its body (the parameters after them may not have arrived);
/// `None` until both names are there.
pub fn bind_names(body_start: &[u8]) -> Option<(&[u8], &[u8])> {
    read_bind_names(&mut Reader::new("Bind", body_start)).ok()
}

/// A Query's text, checked to the end of the message.
fn read_query(mut r: Reader<'_>) -> Result<&[u8], CodecError> {
    let query = r.get_cstr_bytes("query string")?;
    r.finish()?;
    Ok(query)
}

/// A Parse's statement name and text.
fn read_parse_head<'a>(r: &mut Reader<'a>) -> Result<(&'a [u8], &'a [u8]), CodecError> {
    let name = r.get_cstr_bytes("statement name")?;
    let query = r.get_cstr_bytes("query string")?;
    Ok((name, query))
}

/// A Bind's portal and statement names.
fn read_bind_names<'a>(r: &mut Reader<'a>) -> Result<(&'a [u8], &'a [u8]), CodecError> {
    let portal = r.get_cstr_bytes("portal name")?;
    let statement = r.get_cstr_bytes("statement name")?;
    Ok((portal, statement))
}

/// The target byte and name of a Describe or Close, the byte unchecked.
fn read_target_head<'a>(r: &mut Reader<'a>) -> Result<(u8, &'a [u8]), CodecError> {
    let kind = r.get_u8("target")?;
    let name = r.get_cstr_bytes("name")?;
    Ok((kind, name))
}

/// `bytes` (field `field` of `message`) as UTF-8.
fn utf8<'a>(
    message: &'static str,
    field: &'static str,
    bytes: &'a [u8],
) -> Result<&'a str, CodecError> {
    std::str::from_utf8(bytes).map_err(|_| CodecError::InvalidUtf8 { message, field })
}

/// Decodes a typed client message from its type byte and body (the bytes
/// after the length field). Unknown types become
/// [`FrontendMessage::Unknown`]; known types must be well formed, with no
/// bytes left over.
pub fn decode_frontend(tag: u8, body: &[u8]) -> Result<FrontendMessage<'_>, CodecError> {
    let msg = match tag {
        tag::QUERY => {
            let query = read_query(Reader::new("Query", body))?;
            FrontendMessage::Query(utf8("Query", "query string", query)?)
        }
        tag::PARSE => {
            let mut r = Reader::new("Parse", body);
            let (name, query) = read_parse_head(&mut r)?;
            let name = utf8("Parse", "statement name", name)?;
            let query = utf8("Parse", "query string", query)?;
            let n = r.get_count("parameter type", 4)?;
            let mut param_types = Vec::with_capacity(n);
            for _ in 0..n {
                param_types.push(r.get_u32("parameter type")?);
            }
            r.finish()?;
            FrontendMessage::Parse {
                name,
                query,
                param_types,
            }
        }
        tag::BIND => {
            let mut r = Reader::new("Bind", body);
            let (portal, statement) = read_bind_names(&mut r)?;
            let portal = utf8("Bind", "portal name", portal)?;
            let statement = utf8("Bind", "statement name", statement)?;
            let param_formats = r.get_formats("parameter format")?;
            let params = r.get_values("parameter")?;
            let result_formats = r.get_formats("result format")?;
            r.finish()?;
            FrontendMessage::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            }
        }
        tag::DESCRIBE => {
            let (kind, name) = decode_target("Describe", body)?;
            FrontendMessage::Describe { kind, name }
        }
        tag::CLOSE => {
            let (kind, name) = decode_target("Close", body)?;
            FrontendMessage::Close { kind, name }
        }
        tag::EXECUTE => {
            let mut r = Reader::new("Execute", body);
            let portal = utf8("Execute", "portal name", r.get_cstr_bytes("portal name")?)?;
            let max_rows = r.get_i32("row limit")?;
            r.finish()?;
            FrontendMessage::Execute { portal, max_rows }
        }
        tag::FUNCTION_CALL => {
            let mut r = Reader::new("FunctionCall", body);
            let oid = r.get_u32("function oid")?;
            let arg_formats = r.get_formats("argument format")?;
            let args = r.get_values("argument")?;
            let result_format = r.get_i16("result format")?;
            r.finish()?;
            FrontendMessage::FunctionCall {
                oid,
                arg_formats,
                args,
                result_format,
            }
        }
        tag::COPY_FAIL => {
            let mut r = Reader::new("CopyFail", body);
            let reason = r.get_cstr("error message")?;
            r.finish()?;
            FrontendMessage::CopyFail(reason)
        }
        tag::COPY_DATA => FrontendMessage::CopyData(body),
        tag::PASSWORD => FrontendMessage::Password(body),
        tag::SYNC => expect_empty("Sync", body, FrontendMessage::Sync)?,
        tag::FLUSH => expect_empty("Flush", body, FrontendMessage::Flush)?,
        tag::COPY_DONE => expect_empty("CopyDone", body, FrontendMessage::CopyDone)?,
        tag::TERMINATE => expect_empty("Terminate", body, FrontendMessage::Terminate)?,
        _ => FrontendMessage::Unknown { tag, body },
    };
    Ok(msg)
}

/// The body of Describe and Close: what, then its name.
fn decode_target<'a>(
    message: &'static str,
    body: &'a [u8],
) -> Result<(Target, &'a str), CodecError> {
    let mut r = Reader::new(message, body);
    let (kind, name) = read_target_head(&mut r)?;
    let kind = Target::from_byte(kind).ok_or(CodecError::InvalidValue {
        message,
        field: "target",
        value: kind.into(),
    })?;
    let name = utf8(message, "name", name)?;
    r.finish()?;
    Ok((kind, name))
}

impl<'a> FrontendMessage<'a> {
    /// The [`Head`] of this message: what [`decode_head`] reads from its
    /// bytes.
    pub fn head(&self) -> Head<'a> {
        match *self {
            FrontendMessage::Query(query) => Head::Query(query.as_bytes()),
            FrontendMessage::Parse { name, query, .. } => Head::Parse {
                name: name.as_bytes(),
                query: query.as_bytes(),
            },
            FrontendMessage::Bind {
                portal, statement, ..
            } => Head::Bind {
                portal: portal.as_bytes(),
                statement: statement.as_bytes(),
            },
            FrontendMessage::Describe { kind, .. } => Head::Describe { kind: kind.byte() },
            FrontendMessage::Close { kind, name } => Head::Close {
                kind: kind.byte(),
                name: name.as_bytes(),
            },
            FrontendMessage::Execute { portal, .. } => Head::Execute {
                portal: portal.as_bytes(),
            },
            FrontendMessage::FunctionCall { oid, .. } => Head::FunctionCall { oid },
            _ => Head::Other,
        }
    }
}

impl FrontendMessage<'_> {
    /// The type byte, or `None` for the untyped start-up packets.
    pub fn tag(&self) -> Option<u8> {
        Some(match self {
            FrontendMessage::Startup { .. }
            | FrontendMessage::SslRequest
            | FrontendMessage::GssEncRequest
            | FrontendMessage::CancelRequest { .. } => return None,
            FrontendMessage::Query(_) => tag::QUERY,
            FrontendMessage::Parse { .. } => tag::PARSE,
            FrontendMessage::Bind { .. } => tag::BIND,
            FrontendMessage::Describe { .. } => tag::DESCRIBE,
            FrontendMessage::Execute { .. } => tag::EXECUTE,
            FrontendMessage::Sync => tag::SYNC,
            FrontendMessage::Flush => tag::FLUSH,
            FrontendMessage::Close { .. } => tag::CLOSE,
            FrontendMessage::FunctionCall { .. } => tag::FUNCTION_CALL,
            FrontendMessage::CopyData(_) => tag::COPY_DATA,
            FrontendMessage::CopyDone => tag::COPY_DONE,
            FrontendMessage::CopyFail(_) => tag::COPY_FAIL,
            FrontendMessage::Terminate => tag::TERMINATE,
            FrontendMessage::Password(_) => tag::PASSWORD,
            FrontendMessage::Unknown { tag, .. } => *tag,
        })
    }

    /// The message's name in the protocol documentation, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            FrontendMessage::Startup { .. } => "StartupMessage",
            FrontendMessage::SslRequest => "SSLRequest",
            FrontendMessage::GssEncRequest => "GSSENCRequest",
            FrontendMessage::CancelRequest { .. } => "CancelRequest",
            FrontendMessage::Query(_) => "Query",
            FrontendMessage::Parse { .. } => "Parse",
            FrontendMessage::Bind { .. } => "Bind",
            FrontendMessage::Describe { .. } => "Describe",
            FrontendMessage::Execute { .. } => "Execute",
            FrontendMessage::Sync => "Sync",
            FrontendMessage::Flush => "Flush",
            FrontendMessage::Close { .. } => "Close",
            FrontendMessage::FunctionCall { .. } => "FunctionCall",
            FrontendMessage::CopyData(_) => "CopyData",
            FrontendMessage::CopyDone => "CopyDone",
            FrontendMessage::CopyFail(_) => "CopyFail",
            FrontendMessage::Terminate => "Terminate",
            FrontendMessage::Password(_) => "PasswordMessage",
            FrontendMessage::Unknown { .. } => "unknown message",
        }
    }

    /// Appends the message in wire format to `out`.
    ///
    /// Decoded messages re-encode to the bytes they came from. For messages
    /// built by hand: strings lose interior NULs, lists longer than 65,535
    /// are cut to 65,535, and a start-up parameter with an empty name (which
    /// would end the list) is left out.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = match self.tag() {
            Some(t) => MessageWriter::new(out, t),
            None => MessageWriter::untyped(out),
        };
        match self {
            FrontendMessage::Startup {
                major,
                minor,
                params,
            } => {
                w.put_u16(*major).put_u16(*minor);
                for (name, value) in params.iter().filter(|(n, _)| !n.is_empty()) {
                    w.put_cstr(name).put_cstr(value);
                }
                w.put_u8(0);
            }
            FrontendMessage::SslRequest => {
                w.put_u32(code::SSL_REQUEST);
            }
            FrontendMessage::GssEncRequest => {
                w.put_u32(code::GSSENC_REQUEST);
            }
            FrontendMessage::CancelRequest { pid, secret } => {
                w.put_u32(code::CANCEL_REQUEST)
                    .put_i32(*pid)
                    .put_bytes(secret);
            }
            FrontendMessage::Query(q) => {
                w.put_cstr(q);
            }
            FrontendMessage::Parse {
                name,
                query,
                param_types,
            } => {
                w.put_cstr(name).put_cstr(query);
                let n = w.count(param_types.len());
                for &t in param_types.iter().take(n) {
                    w.put_u32(t);
                }
            }
            FrontendMessage::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            } => {
                w.put_cstr(portal).put_cstr(statement);
                w.put_formats(param_formats);
                w.put_values(params);
                w.put_formats(result_formats);
            }
            FrontendMessage::Describe { kind, name } | FrontendMessage::Close { kind, name } => {
                w.put_u8(kind.byte()).put_cstr(name);
            }
            FrontendMessage::Execute { portal, max_rows } => {
                w.put_cstr(portal).put_i32(*max_rows);
            }
            FrontendMessage::FunctionCall {
                oid,
                arg_formats,
                args,
                result_format,
            } => {
                w.put_u32(*oid);
                w.put_formats(arg_formats);
                w.put_values(args);
                w.put_i16(*result_format);
            }
            FrontendMessage::CopyFail(reason) => {
                w.put_cstr(reason);
            }
            FrontendMessage::CopyData(body)
            | FrontendMessage::Password(body)
            | FrontendMessage::Unknown { body, .. } => {
                w.put_bytes(body);
            }
            FrontendMessage::Sync
            | FrontendMessage::Flush
            | FrontendMessage::CopyDone
            | FrontendMessage::Terminate => {}
        }
        w.finish();
    }
}

/// SASLInitialResponse: the body of the first `p` message of a SASL
/// exchange (after AuthenticationSASL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaslInitialResponse<'a> {
    /// The mechanism chosen, e.g. `SCRAM-SHA-256`.
    pub mechanism: &'a str,
    /// The initial client response (`client-first-message` for SCRAM);
    /// `None` when absent (length -1).
    pub data: Option<&'a [u8]>,
}

impl<'a> SaslInitialResponse<'a> {
    /// Decodes the body of a `p` message the caller knows to be a
    /// SASLInitialResponse.
    pub fn decode(body: &'a [u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new("SASLInitialResponse", body);
        let mechanism = r.get_cstr("mechanism")?;
        let data = r.get_value("initial response")?;
        r.finish()?;
        Ok(Self { mechanism, data })
    }

    /// Appends the whole `p` message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = MessageWriter::new(out, tag::PASSWORD);
        w.put_cstr(self.mechanism).put_value(self.data);
        w.finish();
    }
}

/// The password in the body of a `p` message the caller knows to be a
/// PasswordMessage (cleartext, or `md5` followed by 32 hex digits).
pub fn password_text(body: &[u8]) -> Result<&[u8], CodecError> {
    let mut r = Reader::new("PasswordMessage", body);
    let password = r.get_cstr_bytes("password")?;
    r.finish()?;
    Ok(password)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::super::codec::{split_frame, split_startup, MAX_MESSAGE};
    use super::*;

    /// Decodes one whole message (typed, or untyped when `startup`) and
    /// checks that it re-encodes to the same bytes.
    fn round_trip(wire: &[u8], startup: bool) -> FrontendMessage<'_> {
        let msg = if startup {
            decode_startup(split_startup(wire).unwrap().unwrap()).unwrap()
        } else {
            let f = split_frame(wire, MAX_MESSAGE).unwrap().unwrap();
            assert_eq!(f.wire_len(), wire.len(), "one message");
            decode_frontend(f.tag, f.body).unwrap()
        };
        let mut out = Vec::new();
        msg.encode(&mut out);
        assert_eq!(out, wire, "{msg:?}");
        msg
    }

    /// Builds a typed message from its body, for tests.
    fn typed(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn startup_from_psql() {
        // psql 16: user, database, application_name, client_encoding.
        let wire = b"\x00\x00\x00\x4d\x00\x03\x00\x00\
            user\0alice\0database\0shop\0application_name\0psql\0\
            client_encoding\0UTF8\0\0";
        assert_eq!(wire.len(), 0x4d);
        let msg = round_trip(wire, true);
        assert_eq!(
            msg,
            FrontendMessage::Startup {
                major: 3,
                minor: 0,
                params: vec![
                    ("user", "alice"),
                    ("database", "shop"),
                    ("application_name", "psql"),
                    ("client_encoding", "UTF8"),
                ],
            }
        );
    }

    #[test]
    fn startup_3_2_with_protocol_options() {
        let mut body = code::PROTOCOL_3_2.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0bob\0_pq_.compression\0on\0\0");
        let mut wire = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        wire.extend_from_slice(&body);
        let FrontendMessage::Startup {
            major,
            minor,
            params,
        } = round_trip(&wire, true)
        else {
            panic!("not a startup")
        };
        assert_eq!((major, minor), (3, 2));
        assert!(is_protocol_option(params[1].0));
        assert!(!is_protocol_option(params[0].0));
    }

    #[test]
    fn startup_requests() {
        assert_eq!(
            round_trip(b"\0\0\0\x08\x04\xd2\x16\x2f", true),
            FrontendMessage::SslRequest
        );
        assert_eq!(
            round_trip(b"\0\0\0\x08\x04\xd2\x16\x30", true),
            FrontendMessage::GssEncRequest
        );
        // Protocol 3.0 cancel: 16 bytes, 4-byte key.
        assert_eq!(
            round_trip(
                b"\0\0\0\x10\x04\xd2\x16\x2e\0\0\x30\x39\xde\xad\xbe\xef",
                true
            ),
            FrontendMessage::CancelRequest {
                pid: 12345,
                secret: b"\xde\xad\xbe\xef"
            }
        );
        // Protocol 3.2 cancel: 32-byte key.
        let mut wire = b"\0\0\0\x2c\x04\xd2\x16\x2e\0\0\0\x07".to_vec();
        wire.extend_from_slice(&[0xab; 32]);
        assert!(matches!(
            round_trip(&wire, true),
            FrontendMessage::CancelRequest { pid: 7, secret } if secret.len() == 32
        ));
    }

    #[test]
    fn startup_rejects() {
        // Trailing bytes after SSLRequest.
        assert!(matches!(
            decode_startup(b"\x04\xd2\x16\x2fX"),
            Err(CodecError::TrailingBytes { .. })
        ));
        // Protocol 2.0.
        assert_eq!(
            decode_startup(b"\0\x02\0\0user\0x\0\0")
                .unwrap_err()
                .to_string(),
            "start-up packet: unsupported protocol version 2.0"
        );
        // Unknown 1234.x request.
        assert!(matches!(
            decode_startup(b"\x04\xd2\x16\x31"),
            Err(CodecError::UnsupportedProtocol {
                major: 1234,
                minor: 5681
            })
        ));
        // Missing final terminator.
        assert!(decode_startup(b"\0\x03\0\0user\0x\0").is_err());
        // A name without a value.
        assert!(decode_startup(b"\0\x03\0\0user\0").is_err());
        // Bytes after the terminator.
        assert!(matches!(
            decode_startup(b"\0\x03\0\0user\0x\0\0\0"),
            Err(CodecError::TrailingBytes { count: 1, .. })
        ));
        // Non-UTF-8 user name.
        assert_eq!(
            decode_startup(b"\0\x03\0\0user\0\xe9\0\0")
                .unwrap_err()
                .to_string(),
            "StartupMessage: parameter value is not valid UTF-8"
        );
        // Cancel keys of 3 and 257 bytes.
        assert!(decode_startup(b"\x04\xd2\x16\x2e\0\0\0\x01abc").is_err());
        let mut long = b"\x04\xd2\x16\x2e\0\0\0\x01".to_vec();
        long.extend_from_slice(&[0; 257]);
        assert_eq!(
            decode_startup(&long).unwrap_err().to_string(),
            "CancelRequest: invalid cancel key length 257"
        );
    }

    #[test]
    fn simple_query() {
        let wire = b"Q\0\0\0\x0eSELECT 1;\0";
        assert_eq!(round_trip(wire, false), FrontendMessage::Query("SELECT 1;"));
        assert_eq!(decode_head(b'Q', &wire[5..]), Ok(Head::Query(b"SELECT 1;")));
        assert!(decode_head(b'Q', b"SELECT").is_err());
        // Bytes a client in LATIN1 sends are read as they are.
        assert_eq!(
            decode_head(b'Q', b"SELECT '\xe9'\0"),
            Ok(Head::Query(b"SELECT '\xe9'"))
        );
    }

    #[test]
    fn extended_query_from_pgjdbc() {
        // Parse/Bind/Describe/Execute/Sync as pgjdbc sends
        // `SELECT * FROM t WHERE id = $1` with one int4 parameter.
        let mut parse = b"P\0\0\0\x2cS_1\0SELECT * FROM t WHERE id = $1\0\0\x01\0\0\0\x17".to_vec();
        assert_eq!(parse.len(), 0x2d);
        assert_eq!(
            round_trip(&parse, false),
            FrontendMessage::Parse {
                name: "S_1",
                query: "SELECT * FROM t WHERE id = $1",
                param_types: vec![23],
            }
        );
        assert_eq!(
            decode_head(b'P', &parse[5..]),
            Ok(Head::Parse {
                name: b"S_1",
                query: b"SELECT * FROM t WHERE id = $1"
            })
        );
        // The next message's first byte does not belong to this one.
        parse.push(b'B');
        let f = split_frame(&parse, MAX_MESSAGE).unwrap().unwrap();
        assert_eq!(f.wire_len(), 0x2d);

        // Bind: unnamed portal, S_1, one binary format, one 4-byte value,
        // one result format (text).
        let bind = b"B\0\0\0\x1b\0S_1\0\0\x01\0\x01\0\x01\0\0\0\x04\0\0\0\x2a\0\x01\0\0";
        assert_eq!(bind.len(), 0x1c);
        assert_eq!(
            round_trip(bind, false),
            FrontendMessage::Bind {
                portal: "",
                statement: "S_1",
                param_formats: vec![1],
                params: vec![Some(b"\0\0\0\x2a")],
                result_formats: vec![0],
            }
        );
        assert_eq!(
            round_trip(b"D\0\0\0\x06P\0", false),
            FrontendMessage::Describe {
                kind: Target::Portal,
                name: ""
            }
        );
        assert_eq!(
            round_trip(b"D\0\0\0\x09SS_1\0", false),
            FrontendMessage::Describe {
                kind: Target::Statement,
                name: "S_1"
            }
        );
        assert_eq!(
            round_trip(b"E\0\0\0\x09\0\0\0\0\0", false),
            FrontendMessage::Execute {
                portal: "",
                max_rows: 0
            }
        );
        assert_eq!(round_trip(b"S\0\0\0\x04", false), FrontendMessage::Sync);
        assert_eq!(round_trip(b"H\0\0\0\x04", false), FrontendMessage::Flush);
        assert_eq!(
            round_trip(b"C\0\0\0\x09SS_1\0", false),
            FrontendMessage::Close {
                kind: Target::Statement,
                name: "S_1"
            }
        );
        assert_eq!(round_trip(b"C\0\0\0\x09PC_1\0", false).name(), "Close");
    }

    #[test]
    fn bind_with_null_and_no_formats() {
        let wire = typed(b'B', b"p1\0s1\0\0\0\0\x02\xff\xff\xff\xff\0\0\0\0\0\0");
        assert_eq!(
            round_trip(&wire, false),
            FrontendMessage::Bind {
                portal: "p1",
                statement: "s1",
                param_formats: vec![],
                params: vec![None, Some(b"")],
                result_formats: vec![],
            }
        );
    }

    #[test]
    fn bind_rejects_bad_counts_and_lengths() {
        // 65535 parameters announced, 12 bytes left.
        let body = b"\0\0\0\0\xff\xff0123456789ab";
        assert_eq!(
            decode_frontend(b'B', body).unwrap_err().to_string(),
            "Bind: parameter count 65535 exceeds the 12 bytes left (at least 4 bytes each)"
        );
        // A value length of -2.
        let body = b"\0\0\0\0\0\x01\xff\xff\xff\xfe\0\0";
        assert_eq!(
            decode_frontend(b'B', body).unwrap_err().to_string(),
            "Bind: invalid parameter -2"
        );
        // A value longer than the message.
        let body = b"\0\0\0\0\0\x01\0\0\0\x10ab\0\0";
        assert!(matches!(
            decode_frontend(b'B', body),
            Err(CodecError::Truncated { needed: 16, .. })
        ));
        // A trailing byte.
        let body = b"\0\0\0\0\0\0\0\0X";
        assert!(matches!(
            decode_frontend(b'B', body),
            Err(CodecError::TrailingBytes { count: 1, .. })
        ));
    }

    #[test]
    fn function_call() {
        let wire = typed(
            b'F',
            b"\0\0\x03\xc8\0\x01\0\x01\0\x02\0\0\0\x04\0\0\0\x01\xff\xff\xff\xff\0\x01",
        );
        assert_eq!(
            round_trip(&wire, false),
            FrontendMessage::FunctionCall {
                oid: 968,
                arg_formats: vec![1],
                args: vec![Some(b"\0\0\0\x01"), None],
                result_format: 1,
            }
        );
    }

    #[test]
    fn copy_messages() {
        assert_eq!(
            round_trip(b"d\0\0\0\x0a1\tfoo\n", false),
            FrontendMessage::CopyData(b"1\tfoo\n")
        );
        assert_eq!(round_trip(b"c\0\0\0\x04", false), FrontendMessage::CopyDone);
        assert_eq!(
            round_trip(b"f\0\0\0\x0caborted\0", false),
            FrontendMessage::CopyFail("aborted")
        );
        assert!(is_streamable(b'd'));
        assert!(!is_streamable(b'D'));
    }

    #[test]
    fn terminate_and_empty_bodies() {
        assert_eq!(
            round_trip(b"X\0\0\0\x04", false),
            FrontendMessage::Terminate
        );
        for t in [b'X', b'S', b'H', b'c'] {
            assert!(matches!(
                decode_frontend(t, b"?"),
                Err(CodecError::TrailingBytes { count: 1, .. })
            ));
        }
    }

    #[test]
    fn password_and_sasl() {
        // md5 password message: "md5" + 32 hex digits + NUL.
        let wire = typed(b'p', b"md5f2a1ac1e4b6a3e6f7e0ddba5d0a7c2b1\0");
        let FrontendMessage::Password(body) = round_trip(&wire, false) else {
            panic!("not a password")
        };
        assert_eq!(
            password_text(body).unwrap(),
            b"md5f2a1ac1e4b6a3e6f7e0ddba5d0a7c2b1"
        );
        assert!(password_text(b"pw").is_err());
        assert!(password_text(b"pw\0x").is_err());

        // libpq's SASLInitialResponse for SCRAM-SHA-256 without channel binding.
        let first = b"n,,n=,r=rOprNGfwEbeRWgbNEkqO";
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&(first.len() as i32).to_be_bytes());
        body.extend_from_slice(first);
        let wire = typed(b'p', &body);
        let FrontendMessage::Password(body) = round_trip(&wire, false) else {
            panic!("not a password")
        };
        let sasl = SaslInitialResponse::decode(body).unwrap();
        assert_eq!(sasl.mechanism, "SCRAM-SHA-256");
        assert_eq!(sasl.data, Some(&first[..]));
        let mut out = Vec::new();
        sasl.encode(&mut out);
        assert_eq!(out, wire);

        let none = SaslInitialResponse::decode(b"X\0\xff\xff\xff\xff").unwrap();
        assert_eq!(none.data, None);
        assert!(SaslInitialResponse::decode(b"X\0\0\0\0\x05ab").is_err());
        assert!(SaslInitialResponse::decode(b"X\0\0\0\0\x01ab").is_err());
    }

    #[test]
    fn unknown_tags_survive() {
        let wire = typed(b'z', b"\x01\x02\0whatever");
        assert_eq!(
            round_trip(&wire, false),
            FrontendMessage::Unknown {
                tag: b'z',
                body: b"\x01\x02\0whatever"
            }
        );
        // `T` (RowDescription) is a server message: unknown from a client.
        assert!(matches!(
            decode_frontend(b'T', b""),
            Ok(FrontendMessage::Unknown { tag: b'T', .. })
        ));
    }

    #[test]
    fn per_type_limits_follow_postgres() {
        assert_eq!(max_len(b'Q'), MAX_MESSAGE);
        assert_eq!(max_len(b'd'), MAX_MESSAGE);
        assert_eq!(max_len(b'S'), MAX_SMALL_MESSAGE);
        assert_eq!(max_len(b'z'), MAX_SMALL_MESSAGE);
        let wire = b"S\0\x01\0\0";
        assert!(matches!(
            split_frame(wire, max_len(wire[0])),
            Err(CodecError::LengthTooLong { limit: 10_000, .. })
        ));
    }

    #[test]
    fn describe_rejects_bad_target() {
        assert_eq!(
            decode_frontend(b'D', b"X\0").unwrap_err().to_string(),
            "Describe: invalid target 88"
        );
    }

    #[test]
    fn non_utf8_query_is_invalid() {
        assert_eq!(
            decode_frontend(b'Q', b"SELECT '\xff'\0")
                .unwrap_err()
                .to_string(),
            "Query: query string is not valid UTF-8"
        );
        assert!(decode_frontend(b'P', b"\0SELECT '\xc3'\0\0\0").is_err());
    }

    #[test]
    fn truncations_are_incomplete_or_invalid() {
        let samples: Vec<Vec<u8>> = vec![
            b"Q\0\0\0\x0eSELECT 1;\0".to_vec(),
            b"P\0\0\0\x2cS_1\0SELECT * FROM t WHERE id = $1\0\0\x01\0\0\0\x17".to_vec(),
            b"B\0\0\0\x1b\0S_1\0\0\x01\0\x01\0\x01\0\0\0\x04\0\0\0\x2a\0\x01\0\0".to_vec(),
            b"D\0\0\0\x09SS_1\0".to_vec(),
            b"E\0\0\0\x09\0\0\0\0\0".to_vec(),
            b"C\0\0\0\x09SS_1\0".to_vec(),
            b"f\0\0\0\x0caborted\0".to_vec(),
            typed(
                b'F',
                b"\0\0\x03\xc8\0\x01\0\x01\0\x02\0\0\0\x04\0\0\0\x01\xff\xff\xff\xff\0\x01",
            ),
        ];
        for wire in &samples {
            for n in 0..wire.len() {
                // Framing: incomplete, never an error, for every prefix.
                assert_eq!(split_frame(&wire[..n], MAX_MESSAGE), Ok(None));
                // Decoding a cut body: invalid, never a panic.
                if n >= 5 {
                    assert!(decode_frontend(wire[0], &wire[5..n]).is_err(), "{n}");
                }
            }
        }
        let startup = b"\x00\x00\x00\x14\x00\x03\x00\x00user\0alice\0\0";
        for n in 0..startup.len() {
            assert_eq!(split_startup(&startup[..n]), Ok(None));
            if n >= 4 {
                assert!(decode_startup(&startup[4..n]).is_err(), "{n}");
            }
        }
        assert!(split_startup(startup).unwrap().is_some());
    }

    #[test]
    fn hand_built_messages_stay_framed() {
        let mut out = Vec::new();
        FrontendMessage::Startup {
            major: 3,
            minor: 0,
            params: vec![("", "dropped"), ("user", "a\0b")],
        }
        .encode(&mut out);
        assert_eq!(
            decode_startup(split_startup(&out).unwrap().unwrap()).unwrap(),
            FrontendMessage::Startup {
                major: 3,
                minor: 0,
                params: vec![("user", "ab")],
            }
        );
    }
}
