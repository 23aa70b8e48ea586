//! The statement-shape scanner (the analysis cache's key) on arbitrary
//! UTF-8 text.
//!
//! Beyond "no panic": the shape is deterministic; `shape_into` appends
//! exactly the shape to what its buffer held (and reports whether there is
//! one); a shape is never longer than its text; respelling the literals
//! is possible exactly when there is a shape, and removing them leaves the
//! shape without its placeholders.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_agent::sql::fuzzing::{respell, shape, shape_into};

/// The placeholders the scanner writes (bytes that never occur in UTF-8).
const PLACEHOLDERS: [u8; 3] = [0xFD, 0xFE, 0xFF];

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let first = shape(sql);
    assert_eq!(first, shape(sql), "not deterministic");

    let mut key = b"\x00prefix".to_vec();
    let found = shape_into(sql, &mut key);
    assert_eq!(found, first.is_some());
    assert!(key.starts_with(b"\x00prefix"));
    if let Some(shape) = &first {
        assert_eq!(&key[7..], shape.as_slice());
    }

    let bare = respell(sql, "", "", "");
    assert_eq!(bare.is_some(), first.is_some());
    let (Some(shape), Some(bare)) = (first, bare) else {
        return;
    };
    assert!(shape.len() <= sql.len());
    let kept: Vec<u8> = shape
        .iter()
        .copied()
        .filter(|b| !PLACEHOLDERS.contains(b))
        .collect();
    assert_eq!(kept, bare.as_bytes());
});
