//! The statement-shape scanner (the analysis cache's key) on arbitrary
//! UTF-8 text.
//!
//! Beyond "no panic": the shape is deterministic; `shape_into` appends
//! exactly the shape to what its buffer held (and reports whether there is
//! one); a shape is never longer than its text; respelling the literals
//! is possible exactly when there is a shape, and removing them leaves the
//! shape without its placeholders. And the property the analysis cache
//! rests on: a respelling with the same shape is tokenised by PostgreSQL's
//! own lexer (pg_query's scanner) into the same sequence of token kinds.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pg_query::protobuf::Token;
use tollgate_agent::sql::fuzzing::{respell, shape, shape_into};

/// The placeholders the scanner writes (bytes that never occur in UTF-8).
const PLACEHOLDERS: [u8; 3] = [0xFD, 0xFE, 0xFF];

/// Other spellings of integer, numeric and string literals.
const SPELLINGS: [(&str, &str, &str); 3] = [
    ("0", "0.0", "''"),
    ("2147483648", "1e400", "'it''s; -- /* $$ \" é'"),
    ("7", ".5", "'\n'' select 1 '"),
];

/// The kinds of PostgreSQL's tokens of `sql` (an integer too large for
/// 32 bits is a numeric constant to the lexer: both count as one kind);
/// `None` when the lexer refuses the text.
fn token_kinds(sql: &str) -> Option<Vec<i32>> {
    let tokens = pg_query::scan(sql).ok()?.tokens;
    Some(
        tokens
            .iter()
            .map(|t| match t.token {
                k if k == Token::Fconst as i32 => Token::Iconst as i32,
                k => k,
            })
            .collect(),
    )
}

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

    let Some(kinds) = token_kinds(sql) else {
        return;
    };
    for (integer, numeric, string) in SPELLINGS {
        let Some(other) = respell(sql, integer, numeric, string) else {
            continue;
        };
        if tollgate_agent::sql::fuzzing::shape(&other).as_ref() != Some(&shape) {
            continue;
        }
        if let Some(other_kinds) = token_kinds(&other) {
            assert_eq!(
                kinds, other_kinds,
                "{sql:?} and {other:?} share a shape but not their tokens"
            );
        }
    }
});
