//! Session recordings: every session as a tamper-evident stream of
//! length-prefixed MessagePack records, hash-chained with SHA-256. The
//! format is a public contract, specified in `docs/recording-format.md`.
//!
//! Layout:
//! - [`format`]: the record types (the contract in code).
//! - [`codec`]: framing, bounded frame reading, the chain hash.
//! - [`writer`]: [`Recorder`], the non-blocking [`RecordingSink`] and the
//!   writer thread that owns the files.
//! - [`reader`]: [`read_recording`], [`verify`], [`verify_signed`],
//!   [`list`], [`locate`].
//! - [`render`]: [`render_transcript`], [`replay`], [`export_jsonl`].
//! - [`pcap`]: [`export_pcap`], raw bytes as a synthesized TCP capture.
//! - [`signing`]: ed25519 keys, the signed bytes, signature checks.
//! - [`retention`]: [`prune`], removing old closed recordings.

pub mod codec;
pub mod format;
pub mod pcap;
pub mod reader;
pub mod render;
pub mod retention;
pub mod signing;
pub mod upload;
pub mod writer;

#[cfg(test)]
mod tests;

pub use format::{Event, EventRecord, Header, Record, Trailer};
pub use pcap::{export_pcap, PcapError};
pub use reader::{
    list, locate, read_recording, verify, verify_signed, Problem, ReadError, Recording,
    RecordingFilter, RecordingSummary, SignatureStatus, VerifyReport,
};
pub use render::{export_asciicast, export_jsonl, render_transcript, replay, ReplayOptions};
pub use retention::{prune, PruneReport, Removed, Retention};
pub use signing::{generate_key, GeneratedKey, KeyError, PublicKey, SigningKey};
pub use writer::{
    session_path, Fsync, OnOverflow, Recorder, RecorderHandle, RecorderSettings, RecordingSink,
    SessionRefusal, ShutdownReport,
};
