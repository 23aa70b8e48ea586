//! Messages from the server to the client.
//!
//! Several type bytes mean something else from the client (`D` is DataRow
//! here and Describe there, `S` is ParameterStatus here and Sync there), so
//! server messages have their own enum and decoder.

use super::codec::{check_cancel_key, expect_empty, CodecError, MessageWriter, Reader};

/// Message type bytes of server messages.
pub mod tag {
    /// Authentication request or result.
    pub const AUTHENTICATION: u8 = b'R';
    /// BackendKeyData.
    pub const BACKEND_KEY_DATA: u8 = b'K';
    /// BindComplete.
    pub const BIND_COMPLETE: u8 = b'2';
    /// CloseComplete.
    pub const CLOSE_COMPLETE: u8 = b'3';
    /// CommandComplete.
    pub const COMMAND_COMPLETE: u8 = b'C';
    /// CopyBothResponse.
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    /// CopyData.
    pub const COPY_DATA: u8 = b'd';
    /// CopyDone.
    pub const COPY_DONE: u8 = b'c';
    /// CopyInResponse.
    pub const COPY_IN_RESPONSE: u8 = b'G';
    /// CopyOutResponse.
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    /// DataRow.
    pub const DATA_ROW: u8 = b'D';
    /// EmptyQueryResponse.
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    /// ErrorResponse.
    pub const ERROR_RESPONSE: u8 = b'E';
    /// FunctionCallResponse.
    pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
    /// NegotiateProtocolVersion.
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    /// NoData.
    pub const NO_DATA: u8 = b'n';
    /// NoticeResponse.
    pub const NOTICE_RESPONSE: u8 = b'N';
    /// NotificationResponse.
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    /// ParameterDescription.
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    /// ParameterStatus.
    pub const PARAMETER_STATUS: u8 = b'S';
    /// ParseComplete.
    pub const PARSE_COMPLETE: u8 = b'1';
    /// PortalSuspended.
    pub const PORTAL_SUSPENDED: u8 = b's';
    /// ReadyForQuery.
    pub const READY_FOR_QUERY: u8 = b'Z';
    /// RowDescription.
    pub const ROW_DESCRIPTION: u8 = b'T';
}

/// Authentication codes (the `Int32` after the `R` header).
pub mod auth_code {
    /// AuthenticationOk.
    pub const OK: i32 = 0;
    /// AuthenticationKerberosV5 (no longer supported by PostgreSQL).
    pub const KERBEROS_V5: i32 = 2;
    /// AuthenticationCleartextPassword.
    pub const CLEARTEXT_PASSWORD: i32 = 3;
    /// AuthenticationMD5Password.
    pub const MD5_PASSWORD: i32 = 5;
    /// AuthenticationGSS.
    pub const GSS: i32 = 7;
    /// AuthenticationGSSContinue.
    pub const GSS_CONTINUE: i32 = 8;
    /// AuthenticationSSPI.
    pub const SSPI: i32 = 9;
    /// AuthenticationSASL.
    pub const SASL: i32 = 10;
    /// AuthenticationSASLContinue.
    pub const SASL_CONTINUE: i32 = 11;
    /// AuthenticationSASLFinal.
    pub const SASL_FINAL: i32 = 12;
}

/// An authentication request or result (`R`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth<'a> {
    /// AuthenticationOk.
    Ok,
    /// AuthenticationCleartextPassword.
    CleartextPassword,
    /// AuthenticationMD5Password.
    Md5Password {
        /// Salt for the MD5 hash.
        salt: [u8; 4],
    },
    /// AuthenticationSASL: the mechanisms the server offers, in its order of
    /// preference.
    Sasl {
        /// Mechanism names (`SCRAM-SHA-256`, `SCRAM-SHA-256-PLUS`).
        mechanisms: Vec<&'a str>,
    },
    /// AuthenticationSASLContinue: server challenge.
    SaslContinue(&'a [u8]),
    /// AuthenticationSASLFinal: server's final message (signature).
    SaslFinal(&'a [u8]),
    /// AuthenticationGSS.
    Gss,
    /// AuthenticationGSSContinue: GSSAPI or SSPI data.
    GssContinue(&'a [u8]),
    /// AuthenticationSSPI.
    Sspi,
    /// Any other code (KerberosV5, SCM credentials, future codes), kept as
    /// it came.
    Other {
        /// The authentication code.
        code: i32,
        /// The bytes after it.
        data: &'a [u8],
    },
}

/// Transaction status in ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InBlock,
    /// `E`: in a failed transaction block (statements refused until its end).
    Failed,
    /// Any other byte, kept as it came.
    Unknown(u8),
}

impl TransactionStatus {
    /// The status for a wire byte.
    pub fn from_byte(b: u8) -> Self {
        match b {
            b'I' => TransactionStatus::Idle,
            b'T' => TransactionStatus::InBlock,
            b'E' => TransactionStatus::Failed,
            other => TransactionStatus::Unknown(other),
        }
    }

    /// The wire byte.
    pub fn byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InBlock => b'T',
            TransactionStatus::Failed => b'E',
            TransactionStatus::Unknown(b) => b,
        }
    }
}

/// One column of a RowDescription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldDescription<'a> {
    /// Column name (or alias).
    pub name: &'a str,
    /// OID of the table the column comes from, 0 if none.
    pub table_oid: u32,
    /// Attribute number of the column in that table, 0 if none.
    pub column: i16,
    /// OID of the column's type.
    pub type_oid: u32,
    /// Type size (`pg_type.typlen`), negative for variable width.
    pub type_len: i16,
    /// Type modifier (`pg_attribute.atttypmod`).
    pub type_mod: i32,
    /// Format code: 0 text, 1 binary (0 in answers to Describe of a
    /// statement).
    pub format: i16,
}

impl FieldDescription<'_> {
    /// Smallest encoding: an empty name and the fixed fields.
    const MIN_SIZE: usize = 1 + 4 + 2 + 4 + 2 + 4 + 2;
}

/// Field codes of ErrorResponse and NoticeResponse.
pub mod field {
    /// Severity, possibly localized.
    pub const SEVERITY: u8 = b'S';
    /// Severity, never localized (PostgreSQL 9.6 and later).
    pub const SEVERITY_NONLOCALIZED: u8 = b'V';
    /// SQLSTATE code.
    pub const CODE: u8 = b'C';
    /// Primary message.
    pub const MESSAGE: u8 = b'M';
    /// Detail.
    pub const DETAIL: u8 = b'D';
    /// Hint.
    pub const HINT: u8 = b'H';
    /// Position in the query string (decimal, 1-based characters).
    pub const POSITION: u8 = b'P';
}

/// The fields of an ErrorResponse or NoticeResponse: (code, value) in wire
/// order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fields<'a>(pub Vec<(u8, &'a str)>);

impl<'a> Fields<'a> {
    /// The value of the first field with `code`.
    pub fn get(&self, code: u8) -> Option<&'a str> {
        self.0.iter().find(|(c, _)| *c == code).map(|&(_, v)| v)
    }

    /// Severity (`ERROR`, `FATAL`, `NOTICE`, ...): the non-localized `V`
    /// field, or `S` from servers older than 9.6.
    pub fn severity(&self) -> Option<&'a str> {
        self.get(field::SEVERITY_NONLOCALIZED)
            .or_else(|| self.get(field::SEVERITY))
    }

    /// SQLSTATE (`C`).
    pub fn sqlstate(&self) -> Option<&'a str> {
        self.get(field::CODE)
    }

    /// Primary message (`M`).
    pub fn message(&self) -> Option<&'a str> {
        self.get(field::MESSAGE)
    }

    fn read(mut r: Reader<'a>) -> Result<Self, CodecError> {
        let mut fields = Vec::new();
        loop {
            let code = r.get_u8("field type")?;
            if code == 0 {
                break;
            }
            fields.push((code, r.get_cstr("field value")?));
        }
        r.finish()?;
        Ok(Fields(fields))
    }

    fn write(&self, w: &mut MessageWriter<'_>) {
        for &(code, value) in self.0.iter().filter(|(c, _)| *c != 0) {
            w.put_u8(code).put_cstr(value);
        }
        w.put_u8(0);
    }
}

/// One message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage<'a> {
    /// Authentication request or result (`R`).
    Authentication(Auth<'a>),
    /// ParameterStatus (`S`): a run-time parameter's current value.
    ParameterStatus {
        /// Parameter name.
        name: &'a str,
        /// Its value.
        value: &'a str,
    },
    /// BackendKeyData (`K`): the cancel key of this session.
    BackendKeyData {
        /// Server process id.
        pid: i32,
        /// Secret key: 4 bytes in 3.0, up to 256 in 3.2.
        secret: &'a [u8],
    },
    /// ReadyForQuery (`Z`).
    ReadyForQuery(TransactionStatus),
    /// RowDescription (`T`).
    RowDescription(Vec<FieldDescription<'a>>),
    /// DataRow (`D`): column values, `None` for NULL.
    DataRow(Vec<Option<&'a [u8]>>),
    /// CommandComplete (`C`): the command tag (`SELECT 3`, `INSERT 0 1`).
    CommandComplete(&'a str),
    /// EmptyQueryResponse (`I`).
    EmptyQueryResponse,
    /// ErrorResponse (`E`).
    ErrorResponse(Fields<'a>),
    /// NoticeResponse (`N`).
    NoticeResponse(Fields<'a>),
    /// ParseComplete (`1`).
    ParseComplete,
    /// BindComplete (`2`).
    BindComplete,
    /// CloseComplete (`3`).
    CloseComplete,
    /// NoData (`n`).
    NoData,
    /// ParameterDescription (`t`): parameter type OIDs.
    ParameterDescription(Vec<u32>),
    /// PortalSuspended (`s`): Execute's row limit was reached.
    PortalSuspended,
    /// CopyInResponse (`G`).
    CopyInResponse {
        /// Overall format: 0 text, 1 binary.
        format: i8,
        /// Per-column format codes.
        column_formats: Vec<i16>,
    },
    /// CopyOutResponse (`H`).
    CopyOutResponse {
        /// Overall format: 0 text, 1 binary.
        format: i8,
        /// Per-column format codes.
        column_formats: Vec<i16>,
    },
    /// CopyBothResponse (`W`), for streaming replication.
    CopyBothResponse {
        /// Overall format: 0 text, 1 binary.
        format: i8,
        /// Per-column format codes.
        column_formats: Vec<i16>,
    },
    /// CopyData (`d`).
    CopyData(&'a [u8]),
    /// CopyDone (`c`).
    CopyDone,
    /// NotificationResponse (`A`): a NOTIFY.
    NotificationResponse {
        /// Process id of the notifying session.
        pid: i32,
        /// Channel name.
        channel: &'a str,
        /// Payload.
        payload: &'a str,
    },
    /// NegotiateProtocolVersion (`v`).
    NegotiateProtocolVersion {
        /// Newest minor version the server supports for the major version
        /// asked for.
        newest_minor: i32,
        /// Protocol options (`_pq_.*`) the server did not recognize.
        unrecognized: Vec<&'a str>,
    },
    /// FunctionCallResponse (`V`): the result, `None` for NULL.
    FunctionCallResponse(Option<&'a [u8]>),
    /// A message type this codec does not know, kept as it came.
    Unknown {
        /// The type byte.
        tag: u8,
        /// The body.
        body: &'a [u8],
    },
}

/// Whether a proxy may pass a server message of this type through in chunks
/// as it arrives (after [`frame`](super::codec::frame) saw the header)
/// instead of buffering it whole: DataRow and CopyData, the only messages
/// that grow with the data, when no rule needs to look inside them
/// (masking needs whole DataRows).
pub fn is_streamable(tag: u8) -> bool {
    matches!(tag, tag::DATA_ROW | tag::COPY_DATA)
}

/// Decodes a server message from its type byte and body (the bytes after
/// the length field). Unknown types become [`BackendMessage::Unknown`];
/// known types must be well formed, with no bytes left over.
pub fn decode_backend(tag: u8, body: &[u8]) -> Result<BackendMessage<'_>, CodecError> {
    let msg = match tag {
        tag::AUTHENTICATION => BackendMessage::Authentication(decode_auth(body)?),
        tag::PARAMETER_STATUS => {
            let mut r = Reader::new("ParameterStatus", body);
            let name = r.get_cstr("parameter name")?;
            let value = r.get_cstr("parameter value")?;
            r.finish()?;
            BackendMessage::ParameterStatus { name, value }
        }
        tag::BACKEND_KEY_DATA => {
            let mut r = Reader::new("BackendKeyData", body);
            let pid = r.get_i32("process id")?;
            let secret = r.rest();
            check_cancel_key("BackendKeyData", secret)?;
            BackendMessage::BackendKeyData { pid, secret }
        }
        tag::READY_FOR_QUERY => {
            let mut r = Reader::new("ReadyForQuery", body);
            let status = TransactionStatus::from_byte(r.get_u8("transaction status")?);
            r.finish()?;
            BackendMessage::ReadyForQuery(status)
        }
        tag::ROW_DESCRIPTION => {
            let mut r = Reader::new("RowDescription", body);
            let n = r.get_count("field", FieldDescription::MIN_SIZE)?;
            let mut fields = Vec::with_capacity(n);
            for _ in 0..n {
                fields.push(FieldDescription {
                    name: r.get_cstr("field name")?,
                    table_oid: r.get_u32("table oid")?,
                    column: r.get_i16("column number")?,
                    type_oid: r.get_u32("type oid")?,
                    type_len: r.get_i16("type length")?,
                    type_mod: r.get_i32("type modifier")?,
                    format: r.get_i16("format code")?,
                });
            }
            r.finish()?;
            BackendMessage::RowDescription(fields)
        }
        tag::DATA_ROW => {
            let mut r = Reader::new("DataRow", body);
            let n = r.get_count("column", 4)?;
            let mut values = Vec::with_capacity(n);
            for _ in 0..n {
                values.push(r.get_value("column")?);
            }
            r.finish()?;
            BackendMessage::DataRow(values)
        }
        tag::COMMAND_COMPLETE => {
            let mut r = Reader::new("CommandComplete", body);
            let command = r.get_cstr("command tag")?;
            r.finish()?;
            BackendMessage::CommandComplete(command)
        }
        tag::ERROR_RESPONSE => {
            BackendMessage::ErrorResponse(Fields::read(Reader::new("ErrorResponse", body))?)
        }
        tag::NOTICE_RESPONSE => {
            BackendMessage::NoticeResponse(Fields::read(Reader::new("NoticeResponse", body))?)
        }
        tag::PARAMETER_DESCRIPTION => {
            let mut r = Reader::new("ParameterDescription", body);
            let n = r.get_count("parameter", 4)?;
            let mut types = Vec::with_capacity(n);
            for _ in 0..n {
                types.push(r.get_u32("parameter type")?);
            }
            r.finish()?;
            BackendMessage::ParameterDescription(types)
        }
        tag::COPY_IN_RESPONSE => {
            let (format, column_formats) = decode_copy_response("CopyInResponse", body)?;
            BackendMessage::CopyInResponse {
                format,
                column_formats,
            }
        }
        tag::COPY_OUT_RESPONSE => {
            let (format, column_formats) = decode_copy_response("CopyOutResponse", body)?;
            BackendMessage::CopyOutResponse {
                format,
                column_formats,
            }
        }
        tag::COPY_BOTH_RESPONSE => {
            let (format, column_formats) = decode_copy_response("CopyBothResponse", body)?;
            BackendMessage::CopyBothResponse {
                format,
                column_formats,
            }
        }
        tag::COPY_DATA => BackendMessage::CopyData(body),
        tag::NOTIFICATION_RESPONSE => {
            let mut r = Reader::new("NotificationResponse", body);
            let pid = r.get_i32("process id")?;
            let channel = r.get_cstr("channel")?;
            let payload = r.get_cstr("payload")?;
            r.finish()?;
            BackendMessage::NotificationResponse {
                pid,
                channel,
                payload,
            }
        }
        tag::NEGOTIATE_PROTOCOL_VERSION => {
            let mut r = Reader::new("NegotiateProtocolVersion", body);
            let newest_minor = r.get_i32("newest minor version")?;
            let n = r.get_count_i32("option", 1)?;
            let mut unrecognized = Vec::with_capacity(n);
            for _ in 0..n {
                unrecognized.push(r.get_cstr("option")?);
            }
            r.finish()?;
            BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            }
        }
        tag::FUNCTION_CALL_RESPONSE => {
            let mut r = Reader::new("FunctionCallResponse", body);
            let value = r.get_value("result")?;
            r.finish()?;
            BackendMessage::FunctionCallResponse(value)
        }
        tag::EMPTY_QUERY_RESPONSE => expect_empty(
            "EmptyQueryResponse",
            body,
            BackendMessage::EmptyQueryResponse,
        )?,
        tag::PARSE_COMPLETE => expect_empty("ParseComplete", body, BackendMessage::ParseComplete)?,
        tag::BIND_COMPLETE => expect_empty("BindComplete", body, BackendMessage::BindComplete)?,
        tag::CLOSE_COMPLETE => expect_empty("CloseComplete", body, BackendMessage::CloseComplete)?,
        tag::NO_DATA => expect_empty("NoData", body, BackendMessage::NoData)?,
        tag::PORTAL_SUSPENDED => {
            expect_empty("PortalSuspended", body, BackendMessage::PortalSuspended)?
        }
        tag::COPY_DONE => expect_empty("CopyDone", body, BackendMessage::CopyDone)?,
        _ => BackendMessage::Unknown { tag, body },
    };
    Ok(msg)
}

fn decode_auth(body: &[u8]) -> Result<Auth<'_>, CodecError> {
    let mut r = Reader::new("Authentication", body);
    let code = r.get_i32("authentication code")?;
    let auth = match code {
        auth_code::OK => Auth::Ok,
        auth_code::CLEARTEXT_PASSWORD => Auth::CleartextPassword,
        auth_code::MD5_PASSWORD => Auth::Md5Password {
            salt: r.get_array("salt")?,
        },
        auth_code::SASL => {
            let mut mechanisms = Vec::new();
            loop {
                let m = r.get_cstr("SASL mechanism")?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m);
            }
            Auth::Sasl { mechanisms }
        }
        auth_code::SASL_CONTINUE => Auth::SaslContinue(r.rest()),
        auth_code::SASL_FINAL => Auth::SaslFinal(r.rest()),
        auth_code::GSS => Auth::Gss,
        auth_code::GSS_CONTINUE => Auth::GssContinue(r.rest()),
        auth_code::SSPI => Auth::Sspi,
        code => Auth::Other {
            code,
            data: r.rest(),
        },
    };
    r.finish()?;
    Ok(auth)
}

fn decode_copy_response(message: &'static str, body: &[u8]) -> Result<(i8, Vec<i16>), CodecError> {
    let mut r = Reader::new(message, body);
    let format = i8::from_be_bytes([r.get_u8("format")?]);
    let column_formats = r.get_formats("column format")?;
    r.finish()?;
    Ok((format, column_formats))
}

impl BackendMessage<'_> {
    /// The type byte.
    pub fn tag(&self) -> u8 {
        match self {
            BackendMessage::Authentication(_) => tag::AUTHENTICATION,
            BackendMessage::ParameterStatus { .. } => tag::PARAMETER_STATUS,
            BackendMessage::BackendKeyData { .. } => tag::BACKEND_KEY_DATA,
            BackendMessage::ReadyForQuery(_) => tag::READY_FOR_QUERY,
            BackendMessage::RowDescription(_) => tag::ROW_DESCRIPTION,
            BackendMessage::DataRow(_) => tag::DATA_ROW,
            BackendMessage::CommandComplete(_) => tag::COMMAND_COMPLETE,
            BackendMessage::EmptyQueryResponse => tag::EMPTY_QUERY_RESPONSE,
            BackendMessage::ErrorResponse(_) => tag::ERROR_RESPONSE,
            BackendMessage::NoticeResponse(_) => tag::NOTICE_RESPONSE,
            BackendMessage::ParseComplete => tag::PARSE_COMPLETE,
            BackendMessage::BindComplete => tag::BIND_COMPLETE,
            BackendMessage::CloseComplete => tag::CLOSE_COMPLETE,
            BackendMessage::NoData => tag::NO_DATA,
            BackendMessage::ParameterDescription(_) => tag::PARAMETER_DESCRIPTION,
            BackendMessage::PortalSuspended => tag::PORTAL_SUSPENDED,
            BackendMessage::CopyInResponse { .. } => tag::COPY_IN_RESPONSE,
            BackendMessage::CopyOutResponse { .. } => tag::COPY_OUT_RESPONSE,
            BackendMessage::CopyBothResponse { .. } => tag::COPY_BOTH_RESPONSE,
            BackendMessage::CopyData(_) => tag::COPY_DATA,
            BackendMessage::CopyDone => tag::COPY_DONE,
            BackendMessage::NotificationResponse { .. } => tag::NOTIFICATION_RESPONSE,
            BackendMessage::NegotiateProtocolVersion { .. } => tag::NEGOTIATE_PROTOCOL_VERSION,
            BackendMessage::FunctionCallResponse(_) => tag::FUNCTION_CALL_RESPONSE,
            BackendMessage::Unknown { tag, .. } => *tag,
        }
    }

    /// The message's name in the protocol documentation, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            BackendMessage::Authentication(_) => "Authentication",
            BackendMessage::ParameterStatus { .. } => "ParameterStatus",
            BackendMessage::BackendKeyData { .. } => "BackendKeyData",
            BackendMessage::ReadyForQuery(_) => "ReadyForQuery",
            BackendMessage::RowDescription(_) => "RowDescription",
            BackendMessage::DataRow(_) => "DataRow",
            BackendMessage::CommandComplete(_) => "CommandComplete",
            BackendMessage::EmptyQueryResponse => "EmptyQueryResponse",
            BackendMessage::ErrorResponse(_) => "ErrorResponse",
            BackendMessage::NoticeResponse(_) => "NoticeResponse",
            BackendMessage::ParseComplete => "ParseComplete",
            BackendMessage::BindComplete => "BindComplete",
            BackendMessage::CloseComplete => "CloseComplete",
            BackendMessage::NoData => "NoData",
            BackendMessage::ParameterDescription(_) => "ParameterDescription",
            BackendMessage::PortalSuspended => "PortalSuspended",
            BackendMessage::CopyInResponse { .. } => "CopyInResponse",
            BackendMessage::CopyOutResponse { .. } => "CopyOutResponse",
            BackendMessage::CopyBothResponse { .. } => "CopyBothResponse",
            BackendMessage::CopyData(_) => "CopyData",
            BackendMessage::CopyDone => "CopyDone",
            BackendMessage::NotificationResponse { .. } => "NotificationResponse",
            BackendMessage::NegotiateProtocolVersion { .. } => "NegotiateProtocolVersion",
            BackendMessage::FunctionCallResponse(_) => "FunctionCallResponse",
            BackendMessage::Unknown { .. } => "unknown message",
        }
    }

    /// Appends the message in wire format to `out`.
    ///
    /// Decoded messages re-encode to the bytes they came from. For messages
    /// built by hand: strings lose interior NULs, lists with an `Int16`
    /// count are cut to 65,535 items, and entries that would end a list
    /// early (an empty SASL mechanism, an error field with code 0) are left
    /// out.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = MessageWriter::new(out, self.tag());
        match self {
            BackendMessage::Authentication(auth) => encode_auth(&mut w, auth),
            BackendMessage::ParameterStatus { name, value } => {
                w.put_cstr(name).put_cstr(value);
            }
            BackendMessage::BackendKeyData { pid, secret } => {
                w.put_i32(*pid).put_bytes(secret);
            }
            BackendMessage::ReadyForQuery(status) => {
                w.put_u8(status.byte());
            }
            BackendMessage::RowDescription(fields) => {
                let n = w.count(fields.len());
                for f in fields.iter().take(n) {
                    w.put_cstr(f.name)
                        .put_u32(f.table_oid)
                        .put_i16(f.column)
                        .put_u32(f.type_oid)
                        .put_i16(f.type_len)
                        .put_i32(f.type_mod)
                        .put_i16(f.format);
                }
            }
            BackendMessage::DataRow(values) => {
                w.put_values(values);
            }
            BackendMessage::CommandComplete(command) => {
                w.put_cstr(command);
            }
            BackendMessage::ErrorResponse(fields) | BackendMessage::NoticeResponse(fields) => {
                fields.write(&mut w);
            }
            BackendMessage::ParameterDescription(types) => {
                let n = w.count(types.len());
                for &t in types.iter().take(n) {
                    w.put_u32(t);
                }
            }
            BackendMessage::CopyInResponse {
                format,
                column_formats,
            }
            | BackendMessage::CopyOutResponse {
                format,
                column_formats,
            }
            | BackendMessage::CopyBothResponse {
                format,
                column_formats,
            } => {
                w.put_bytes(&format.to_be_bytes());
                w.put_formats(column_formats);
            }
            BackendMessage::NotificationResponse {
                pid,
                channel,
                payload,
            } => {
                w.put_i32(*pid).put_cstr(channel).put_cstr(payload);
            }
            BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            } => {
                let n = i32::try_from(unrecognized.len()).unwrap_or(i32::MAX);
                w.put_i32(*newest_minor).put_i32(n);
                for option in unrecognized {
                    w.put_cstr(option);
                }
            }
            BackendMessage::FunctionCallResponse(value) => {
                w.put_value(*value);
            }
            BackendMessage::CopyData(body) | BackendMessage::Unknown { body, .. } => {
                w.put_bytes(body);
            }
            BackendMessage::EmptyQueryResponse
            | BackendMessage::ParseComplete
            | BackendMessage::BindComplete
            | BackendMessage::CloseComplete
            | BackendMessage::NoData
            | BackendMessage::PortalSuspended
            | BackendMessage::CopyDone => {}
        }
        w.finish();
    }
}

fn encode_auth(w: &mut MessageWriter<'_>, auth: &Auth<'_>) {
    match auth {
        Auth::Ok => {
            w.put_i32(auth_code::OK);
        }
        Auth::CleartextPassword => {
            w.put_i32(auth_code::CLEARTEXT_PASSWORD);
        }
        Auth::Md5Password { salt } => {
            w.put_i32(auth_code::MD5_PASSWORD).put_bytes(salt);
        }
        Auth::Sasl { mechanisms } => {
            w.put_i32(auth_code::SASL);
            for m in mechanisms.iter().filter(|m| !m.is_empty()) {
                w.put_cstr(m);
            }
            w.put_u8(0);
        }
        Auth::SaslContinue(data) => {
            w.put_i32(auth_code::SASL_CONTINUE).put_bytes(data);
        }
        Auth::SaslFinal(data) => {
            w.put_i32(auth_code::SASL_FINAL).put_bytes(data);
        }
        Auth::Gss => {
            w.put_i32(auth_code::GSS);
        }
        Auth::GssContinue(data) => {
            w.put_i32(auth_code::GSS_CONTINUE).put_bytes(data);
        }
        Auth::Sspi => {
            w.put_i32(auth_code::SSPI);
        }
        Auth::Other { code, data } => {
            w.put_i32(*code).put_bytes(data);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::super::codec::{split_frame, MAX_MESSAGE};
    use super::*;

    /// Decodes one whole message and checks that it re-encodes to the same
    /// bytes.
    fn round_trip(wire: &[u8]) -> BackendMessage<'_> {
        let f = split_frame(wire, MAX_MESSAGE).unwrap().unwrap();
        assert_eq!(f.wire_len(), wire.len(), "one message");
        let msg = decode_backend(f.tag, f.body).unwrap();
        let mut out = Vec::new();
        msg.encode(&mut out);
        assert_eq!(out, wire, "{msg:?}");
        assert_eq!(msg.tag(), wire[0]);
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
    fn authentication_requests() {
        // PostgreSQL 16 on a plaintext connection, scram-sha-256 in pg_hba.
        assert_eq!(
            round_trip(b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0"),
            BackendMessage::Authentication(Auth::Sasl {
                mechanisms: vec!["SCRAM-SHA-256"]
            })
        );
        // The same on TLS: channel binding offered first.
        let wire = b"R\0\0\0\x2a\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        assert_eq!(wire.len(), 0x2b);
        assert_eq!(
            round_trip(wire),
            BackendMessage::Authentication(Auth::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
            })
        );
        let challenge = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
            s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let mut body = 11i32.to_be_bytes().to_vec();
        body.extend_from_slice(challenge);
        assert_eq!(
            round_trip(&typed(b'R', &body)),
            BackendMessage::Authentication(Auth::SaslContinue(challenge))
        );
        let mut body = 12i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
        assert!(matches!(
            round_trip(&typed(b'R', &body)),
            BackendMessage::Authentication(Auth::SaslFinal(v)) if v.starts_with(b"v=")
        ));
        assert_eq!(
            round_trip(b"R\0\0\0\x0c\0\0\0\x05\x93\x1a\x7f\x02"),
            BackendMessage::Authentication(Auth::Md5Password {
                salt: [0x93, 0x1a, 0x7f, 0x02]
            })
        );
        assert_eq!(
            round_trip(b"R\0\0\0\x08\0\0\0\x03"),
            BackendMessage::Authentication(Auth::CleartextPassword)
        );
        assert_eq!(
            round_trip(b"R\0\0\0\x08\0\0\0\0"),
            BackendMessage::Authentication(Auth::Ok)
        );
        assert_eq!(
            round_trip(b"R\0\0\0\x08\0\0\0\x07"),
            BackendMessage::Authentication(Auth::Gss)
        );
        assert_eq!(
            round_trip(b"R\0\0\0\x0b\0\0\0\x08\x60\x82\x01"),
            BackendMessage::Authentication(Auth::GssContinue(b"\x60\x82\x01"))
        );
        assert_eq!(
            round_trip(b"R\0\0\0\x08\0\0\0\x09"),
            BackendMessage::Authentication(Auth::Sspi)
        );
        assert_eq!(
            round_trip(b"R\0\0\0\x08\0\0\0\x02"),
            BackendMessage::Authentication(Auth::Other { code: 2, data: b"" })
        );
        assert_eq!(
            round_trip(b"R\0\0\0\x0a\0\0\0\x63xy"),
            BackendMessage::Authentication(Auth::Other {
                code: 99,
                data: b"xy"
            })
        );
    }

    #[test]
    fn authentication_rejects() {
        // AuthenticationOk with a trailing byte.
        assert!(matches!(
            decode_backend(b'R', b"\0\0\0\0\0"),
            Err(CodecError::TrailingBytes { count: 1, .. })
        ));
        // MD5 with a 3-byte salt.
        assert_eq!(
            decode_backend(b'R', b"\0\0\0\x05abc")
                .unwrap_err()
                .to_string(),
            "Authentication: salt needs 4 bytes but only 3 are left"
        );
        // SASL list without its terminator.
        assert!(decode_backend(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0").is_err());
        // Code cut short.
        assert!(decode_backend(b'R', b"\0\0").is_err());
    }

    #[test]
    fn session_start_messages() {
        assert_eq!(
            round_trip(b"S\0\0\0\x18server_version\x0016.4\0"),
            BackendMessage::ParameterStatus {
                name: "server_version",
                value: "16.4"
            }
        );
        assert_eq!(
            round_trip(b"K\0\0\0\x0c\0\0\x4e\x3b\x12\x34\x56\x78"),
            BackendMessage::BackendKeyData {
                pid: 20027,
                secret: b"\x12\x34\x56\x78"
            }
        );
        // Protocol 3.2: a 32-byte key.
        let mut wire = b"K\0\0\0\x28\0\0\0\x01".to_vec();
        wire.extend_from_slice(&[7; 32]);
        assert!(matches!(
            round_trip(&wire),
            BackendMessage::BackendKeyData { pid: 1, secret } if secret.len() == 32
        ));
        assert!(decode_backend(b'K', b"\0\0\0\x01abc").is_err());
        let mut long = b"\0\0\0\x01".to_vec();
        long.extend_from_slice(&[0; 257]);
        assert!(decode_backend(b'K', &long).is_err());
        let wire = typed(b'v', b"\0\0\0\0\0\0\0\x02_pq_.a\0_pq_.b\0");
        assert_eq!(
            round_trip(&wire),
            BackendMessage::NegotiateProtocolVersion {
                newest_minor: 0,
                unrecognized: vec!["_pq_.a", "_pq_.b"]
            }
        );
        assert!(matches!(
            decode_backend(b'v', b"\0\0\0\0\xff\xff\xff\xff"),
            Err(CodecError::InvalidValue { value: -1, .. })
        ));
        assert!(matches!(
            decode_backend(b'v', b"\0\0\0\0\0\0\x10\0ab\0"),
            Err(CodecError::CountTooLarge { count: 4096, .. })
        ));
    }

    #[test]
    fn ready_for_query() {
        for (byte, status) in [
            (b'I', TransactionStatus::Idle),
            (b'T', TransactionStatus::InBlock),
            (b'E', TransactionStatus::Failed),
            (b'x', TransactionStatus::Unknown(b'x')),
        ] {
            let wire = [b'Z', 0, 0, 0, 5, byte];
            assert_eq!(round_trip(&wire), BackendMessage::ReadyForQuery(status));
        }
        assert!(decode_backend(b'Z', b"").is_err());
        assert!(decode_backend(b'Z', b"II").is_err());
    }

    #[test]
    fn simple_query_results() {
        // psql `SELECT 1` answer.
        let wire = b"T\0\0\0\x21\0\x01?column?\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0";
        assert_eq!(
            round_trip(wire),
            BackendMessage::RowDescription(vec![FieldDescription {
                name: "?column?",
                table_oid: 0,
                column: 0,
                type_oid: 23,
                type_len: 4,
                type_mod: -1,
                format: 0,
            }])
        );
        assert_eq!(
            round_trip(b"D\0\0\0\x0b\0\x01\0\0\0\x011"),
            BackendMessage::DataRow(vec![Some(b"1")])
        );
        assert_eq!(
            round_trip(b"D\0\0\0\x0f\0\x02\0\0\0\x011\xff\xff\xff\xff"),
            BackendMessage::DataRow(vec![Some(b"1"), None])
        );
        assert_eq!(
            round_trip(b"D\0\0\0\x06\0\0"),
            BackendMessage::DataRow(vec![])
        );
        assert_eq!(
            round_trip(b"C\0\0\0\x0dSELECT 1\0"),
            BackendMessage::CommandComplete("SELECT 1")
        );
        assert_eq!(
            round_trip(b"I\0\0\0\x04"),
            BackendMessage::EmptyQueryResponse
        );
        assert!(is_streamable(b'D'));
        assert!(is_streamable(b'd'));
        assert!(!is_streamable(b'T'));
    }

    #[test]
    fn data_row_rejects() {
        assert_eq!(
            decode_backend(b'D', b"\xff\xff\0\0\0\x01a")
                .unwrap_err()
                .to_string(),
            "DataRow: column count 65535 exceeds the 5 bytes left (at least 4 bytes each)"
        );
        assert!(matches!(
            decode_backend(b'D', b"\0\x01\xff\xff\xff\xfe"),
            Err(CodecError::InvalidValue { value: -2, .. })
        ));
        assert!(matches!(
            decode_backend(b'D', b"\0\x01\x7f\xff\xff\xffab"),
            Err(CodecError::Truncated { .. })
        ));
        assert!(matches!(
            decode_backend(b'D', b"\0\x01\0\0\0\x01ab"),
            Err(CodecError::TrailingBytes { count: 1, .. })
        ));
        assert!(matches!(
            decode_backend(b'T', b"\0\x02?column?\0"),
            Err(CodecError::CountTooLarge { count: 2, .. })
        ));
    }

    #[test]
    fn errors_and_notices() {
        // PostgreSQL 16: `SELECT * FROM nope`.
        let body = b"SERROR\0VERROR\0C42P01\0Mrelation \"nope\" does not exist\0\
            P15\0Fparse_relation.c\0L1449\0RparserOpenTable\0\0";
        let wire = typed(b'E', body);
        let BackendMessage::ErrorResponse(fields) = round_trip(&wire) else {
            panic!("not an error")
        };
        assert_eq!(fields.severity(), Some("ERROR"));
        assert_eq!(fields.sqlstate(), Some("42P01"));
        assert_eq!(fields.message(), Some("relation \"nope\" does not exist"));
        assert_eq!(fields.get(field::POSITION), Some("15"));
        assert_eq!(fields.get(b'Z'), None);

        // A localized server before 9.6: only `S`.
        let body = b"SFEHLER\0C28P01\0MPasswort-Authentifizierung\0\0";
        let wire = typed(b'E', body);
        let BackendMessage::ErrorResponse(fields) = round_trip(&wire) else {
            panic!("not an error")
        };
        assert_eq!(fields.severity(), Some("FEHLER"));

        let body = b"SNOTICE\0VNOTICE\0C00000\0Mtable \"x\" does not exist, skipping\0\
            Ftablecmds.c\0L1300\0RDropErrorMsgNonExistent\0\0";
        assert!(matches!(
            round_trip(&typed(b'N', body)),
            BackendMessage::NoticeResponse(f) if f.severity() == Some("NOTICE")
        ));
        assert!(matches!(
            round_trip(b"E\0\0\0\x05\0"),
            BackendMessage::ErrorResponse(f) if f.0.is_empty()
        ));
        // No terminator, non-UTF-8 text, trailing bytes.
        assert!(decode_backend(b'E', b"SERROR\0").is_err());
        assert_eq!(
            decode_backend(b'N', b"Mcaf\xe9\0\0")
                .unwrap_err()
                .to_string(),
            "NoticeResponse: field value is not valid UTF-8"
        );
        assert!(decode_backend(b'E', b"\0\0").is_err());
    }

    #[test]
    fn extended_query_replies() {
        for (wire, msg) in [
            (&b"1\0\0\0\x04"[..], BackendMessage::ParseComplete),
            (b"2\0\0\0\x04", BackendMessage::BindComplete),
            (b"3\0\0\0\x04", BackendMessage::CloseComplete),
            (b"n\0\0\0\x04", BackendMessage::NoData),
            (b"s\0\0\0\x04", BackendMessage::PortalSuspended),
            (b"c\0\0\0\x04", BackendMessage::CopyDone),
        ] {
            assert_eq!(round_trip(wire), msg);
            assert!(decode_backend(wire[0], b"x").is_err());
        }
        assert_eq!(
            round_trip(b"t\0\0\0\x0a\0\x01\0\0\0\x17"),
            BackendMessage::ParameterDescription(vec![23])
        );
        assert_eq!(
            round_trip(b"t\0\0\0\x06\0\0"),
            BackendMessage::ParameterDescription(vec![])
        );
        assert!(decode_backend(b't', b"\0\x02\0\0\0\x17").is_err());
    }

    #[test]
    fn copy_messages() {
        assert_eq!(
            round_trip(b"G\0\0\0\x0b\0\0\x02\0\0\0\0"),
            BackendMessage::CopyInResponse {
                format: 0,
                column_formats: vec![0, 0]
            }
        );
        assert_eq!(
            round_trip(b"H\0\0\0\x09\x01\0\x01\0\x01"),
            BackendMessage::CopyOutResponse {
                format: 1,
                column_formats: vec![1]
            }
        );
        assert_eq!(
            round_trip(b"W\0\0\0\x07\0\0\0"),
            BackendMessage::CopyBothResponse {
                format: 0,
                column_formats: vec![]
            }
        );
        assert_eq!(
            round_trip(b"W\0\0\0\x07\xff\0\0"),
            BackendMessage::CopyBothResponse {
                format: -1,
                column_formats: vec![]
            }
        );
        assert_eq!(
            round_trip(b"d\0\0\0\x0a1\tfoo\n"),
            BackendMessage::CopyData(b"1\tfoo\n")
        );
        assert!(decode_backend(b'G', b"\0\0\x02\0\0").is_err());
    }

    #[test]
    fn async_and_function_messages() {
        let wire = typed(b'A', b"\0\0\x10\x92jobs\0job 7 done\0");
        assert_eq!(
            round_trip(&wire),
            BackendMessage::NotificationResponse {
                pid: 4242,
                channel: "jobs",
                payload: "job 7 done"
            }
        );
        assert_eq!(
            round_trip(b"V\0\0\0\x0c\0\0\0\x04\0\0\0\x01"),
            BackendMessage::FunctionCallResponse(Some(b"\0\0\0\x01"))
        );
        assert_eq!(
            round_trip(b"V\0\0\0\x08\xff\xff\xff\xff"),
            BackendMessage::FunctionCallResponse(None)
        );
    }

    #[test]
    fn unknown_tags_survive() {
        let wire = typed(b'q', b"\xff\0anything");
        assert_eq!(
            round_trip(&wire),
            BackendMessage::Unknown {
                tag: b'q',
                body: b"\xff\0anything"
            }
        );
        // `Q` and `P` are client messages: unknown from a server.
        assert!(matches!(
            decode_backend(b'Q', b"SELECT 1\0"),
            Ok(BackendMessage::Unknown { tag: b'Q', .. })
        ));
    }

    #[test]
    fn truncations_are_incomplete_or_invalid() {
        let samples: Vec<Vec<u8>> = vec![
            b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0".to_vec(),
            b"R\0\0\0\x0c\0\0\0\x05\x93\x1a\x7f\x02".to_vec(),
            b"S\0\0\0\x18server_version\x0016.4\0".to_vec(),
            b"K\0\0\0\x0c\0\0\x4e\x3b\x12\x34\x56\x78".to_vec(),
            b"Z\0\0\0\x05I".to_vec(),
            b"T\0\0\0\x21\0\x01?column?\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0".to_vec(),
            b"D\0\0\0\x0f\0\x02\0\0\0\x011\xff\xff\xff\xff".to_vec(),
            b"C\0\0\0\x0dSELECT 1\0".to_vec(),
            typed(b'E', b"SERROR\0VERROR\0C42P01\0Mno\0\0"),
            b"t\0\0\0\x0a\0\x01\0\0\0\x17".to_vec(),
            b"G\0\0\0\x0b\0\0\x02\0\0\0\0".to_vec(),
            typed(b'A', b"\0\0\x10\x92jobs\0job 7 done\0"),
            typed(b'v', b"\0\0\0\0\0\0\0\x02_pq_.a\0_pq_.b\0"),
            b"V\0\0\0\x0c\0\0\0\x04\0\0\0\x01".to_vec(),
        ];
        for wire in &samples {
            round_trip(wire);
            for n in 0..wire.len() {
                assert_eq!(split_frame(&wire[..n], MAX_MESSAGE), Ok(None));
                if n >= 5 {
                    assert!(decode_backend(wire[0], &wire[5..n]).is_err(), "{n}");
                }
            }
        }
    }

    #[test]
    fn hand_built_messages_stay_framed() {
        let msg = BackendMessage::ErrorResponse(Fields(vec![(0, "gone"), (b'M', "a\0b")]));
        let mut out = Vec::new();
        msg.encode(&mut out);
        assert_eq!(out, b"E\0\0\0\x09Mab\0\0");
        let msg = BackendMessage::Authentication(Auth::Sasl {
            mechanisms: vec!["", "SCRAM-SHA-256"],
        });
        let mut out = Vec::new();
        msg.encode(&mut out);
        assert_eq!(out, b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0");
        let msg = BackendMessage::DataRow(vec![None; 70_000]);
        let mut out = Vec::new();
        msg.encode(&mut out);
        let f = split_frame(&out, MAX_MESSAGE).unwrap().unwrap();
        assert!(
            matches!(decode_backend(f.tag, f.body), Ok(BackendMessage::DataRow(v)) if v.len() == 65_535)
        );
    }
}
