//! Arbitrary bytes read as a recording file: records or an error, never a
//! panic, and the same for verifying, rendering and exporting it.
//!
//! Beyond "no panic": every record read re-encodes to a frame that decodes
//! to the same record; a file cut short reads as the records before the cut
//! (the tail reported as truncated), never as an error the whole file did
//! not give; the length read is the file's length.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tollgate_agent::recording::codec::{body, decode_body, encode_frame};
use tollgate_agent::recording::reader::{read_from, verify_from};
use tollgate_agent::recording::{export_jsonl, render_transcript};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.tgrec");
    let report = verify_from(data, path, None, &[]);
    let _ = report.to_string();
    let rec = match read_from(data, path) {
        Ok(rec) => rec,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert_eq!(rec.len, data.len() as u64);
    assert_eq!(rec.records.len(), rec.offsets.len());
    for record in &rec.records {
        let frame = encode_frame(record).expect("a record read back encodes");
        let again = decode_body(body(&frame)).expect("an encoded record decodes");
        assert_eq!(&again, record);
    }
    let _ = render_transcript(&rec, false);
    let _ = export_jsonl(&rec);

    // Cut where the second half starts: the records wholly before the cut.
    let cut = data.len() / 2;
    let part = read_from(&data[..cut], path).expect("a prefix of a readable file reads");
    assert!(rec.records.starts_with(&part.records));
    // Each record ends where the next starts, the last where the file or
    // its incomplete tail does.
    let end = rec.truncated_at.unwrap_or(rec.len);
    let whole = rec
        .offsets
        .iter()
        .zip(rec.offsets.iter().skip(1).chain([&end]))
        .filter(|(_, &end)| end <= cut as u64)
        .count();
    assert_eq!(part.records.len(), whole);
    assert_eq!(part.len, cut as u64);
});
