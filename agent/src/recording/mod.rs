//! Session recordings: every session as a tamper-evident stream of
//! length-prefixed MessagePack records, hash-chained with SHA-256. The
//! format is a public contract, specified in `docs/recording-format.md`.
//!
//! Layout:
//! - [`format`]: the record types (the contract in code).
//! - [`codec`]: framing, bounded frame reading, the chain hash.
//! - [`writer`]: [`Recorder`], the non-blocking [`RecordingSink`] and the
//!   writer thread that owns the files.
//! - [`reader`]: [`read_recording`], [`verify`], [`list`], [`locate`].
//! - [`render`]: [`render_transcript`], [`export_jsonl`].

pub mod codec;
pub mod format;
pub mod reader;
pub mod render;
pub mod writer;

#[cfg(test)]
mod tests;

pub use format::{Event, EventRecord, Header, Record, Trailer};
pub use reader::{
    list, locate, read_recording, verify, Problem, ReadError, Recording, RecordingFilter,
    RecordingSummary, VerifyReport,
};
pub use render::{export_jsonl, render_transcript};
pub use writer::{
    session_path, Fsync, OnOverflow, Recorder, RecorderHandle, RecorderSettings, RecordingSink,
    ShutdownReport,
};
