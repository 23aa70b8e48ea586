//! The PostgreSQL v3 wire protocol, sans I/O: bytes in, typed messages out,
//! and back. No sockets and no async here; the session code owns the
//! buffers and decides what to read next.
//!
//! # Layout
//!
//! - [`codec`]: framing ([`frame`], [`split_frame`], [`frame_startup`],
//!   [`split_startup`]), the checked [`Reader`] every decoder reads through,
//!   the [`MessageWriter`] every encoder writes through, the size limits and
//!   [`CodecError`].
//! - [`frontend`]: client messages, [`FrontendMessage`], decoded by
//!   [`decode_startup`] (untyped start-up packets) and [`decode_frontend`]
//!   (typed messages); [`decode_head`] reads, in place, the fields the
//!   session decides on, through the same functions.
//! - [`backend`]: server messages, [`BackendMessage`], decoded by
//!   [`decode_backend`]. Direction is a type: `D` is Describe from a client
//!   and DataRow from a server, and each decoder knows only its side.
//! - [`error`]: the messages the proxy writes itself (ErrorResponse,
//!   ReadyForQuery, the `N` that refuses TLS, ...), byte-exact, and the
//!   SQLSTATE codes it uses.
//!
//! The I/O side lives beside the codec: [`PostgresHandler`] is what the
//! proxy hands PostgreSQL sessions to (it owns the client-visible cancel
//! keys of [`cancel`] and the TLS material of [`tls`]), and [`session`] is
//! one session's state machine.
//!
//! # Reading a stream
//!
//! ```text
//! buf ──frame()──> Ok(None)         read more bytes
//!                  Err(e)           invalid: answer 08P01 and close
//!                  Ok(Some(header)) tag + total length, body maybe not here yet
//!                      ├─ inspected messages: wait for header.body(buf), decode
//!                      └─ DataRow / CopyData: forward header.chunk(..) as it comes
//! ```
//!
//! Incomplete is `Ok(None)`, never an error; invalid is an error, never a
//! panic. Decoders take the whole body of one message and insist on using
//! all of it (trailing bytes are an error), so decode then encode gives back
//! the same bytes, which the tests check for every message type and for
//! pseudo-random input.
//!
//! # Bounds
//!
//! Nothing is allocated from a number the peer chose before that number was
//! checked:
//!
//! - A length field counts itself: under 4 (under 8 for start-up packets)
//!   is invalid, and so is anything over the limit in force, checked on the
//!   header alone:
//!   - [`MAX_STARTUP_PACKET`] (10,000 bytes, as PostgreSQL) for start-up
//!     packets;
//!   - [`MAX_PRE_AUTH_MESSAGE`] (65,535 bytes, the server's limit on auth
//!     tokens) until authentication succeeded;
//!   - then, from the client, [`frontend::max_len`] per message type as
//!     PostgreSQL does: [`MAX_MESSAGE`] (1 GiB) for Query, Parse, Bind,
//!     FunctionCall and CopyData, [`MAX_SMALL_MESSAGE`] (10,000 bytes) for
//!     the rest; from the server, [`MAX_MESSAGE`].
//!
//!   The 1 GiB limit is what a peer may send, not what the proxy buffers:
//!   [`frame`] answers on the five header bytes, so large DataRow and
//!   CopyData messages are passed through in chunks
//!   ([`FrameHeader::chunk`]; see [`frontend::is_streamable`] and
//!   [`backend::is_streamable`]), and the session code caps what it buffers
//!   for the messages it inspects.
//! - Item counts (parameters, formats, columns, fields) are read unsigned,
//!   as PostgreSQL does (0 to 65,535), and checked against the bytes left
//!   times the smallest encoding of one item before a vector is sized.
//! - Strings are slices of the buffer, checked as UTF-8 where the type says
//!   `&str`: non-UTF-8 statement text cannot be analysed, so it is refused.
//!
//! # Speed
//!
//! Decoding borrows: strings and payloads point into the read buffer, and
//! only list-carrying messages allocate their vector. Messages that are only
//! forwarded need not be decoded at all: the header says what they are.

#![deny(missing_docs)]
#![deny(clippy::indexing_slicing)]

pub mod backend;
pub mod cancel;
pub mod codec;
pub mod error;
pub mod fastpath;
pub mod frontend;
mod handler;
pub mod mask;
pub mod prepared;
pub mod reading;
pub mod scram;
pub mod session;

#[cfg(test)]
mod tests;

pub use backend::{
    decode_backend, Auth, BackendMessage, FieldDescription, Fields, TransactionStatus,
};
pub use codec::{
    frame, frame_startup, split_frame, split_startup, CodecError, Frame, FrameHeader,
    MessageWriter, Reader, MAX_CANCEL_KEY, MAX_MESSAGE, MAX_PRE_AUTH_MESSAGE, MAX_SMALL_MESSAGE,
    MAX_STARTUP_PACKET, MIN_CANCEL_KEY,
};
pub use frontend::{
    bind_names, decode_frontend, decode_head, decode_startup, FrontendMessage, Head,
    SaslInitialResponse, Target,
};
pub use handler::PostgresHandler;
