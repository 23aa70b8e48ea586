//! The sftp follower on arbitrary channel bytes, cut into arbitrary reads
//! each way.
//!
//! Beyond "no panic": once the follower reports that it stopped following
//! (`unfollowed`), it reports nothing more; no file reports more bytes
//! than the input held.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_agent::protocol::ssh::sftp::SftpFollower;

fuzz_target!(|data: &[u8]| {
    let mut follower = SftpFollower::default();
    let mut stopped = false;
    let mut rest = data;
    while let Some((&cut, tail)) = rest.split_first() {
        // The first byte of each read: its direction and length.
        let len = usize::from(cut >> 1).min(tail.len());
        let (chunk, next) = tail.split_at(len);
        rest = next;
        let ops = if cut & 1 == 0 {
            follower.from_client(chunk)
        } else {
            follower.from_server(chunk)
        };
        for op in &ops {
            assert!(!stopped, "an operation after the follower stopped: {op:?}");
            assert!(op.bytes_read + op.bytes_written <= data.len() as u64);
            if op.op == "unfollowed" {
                stopped = true;
            }
        }
    }
    for op in follower.finish() {
        assert!(
            !stopped,
            "a file left open after the follower stopped: {op:?}"
        );
    }
});
