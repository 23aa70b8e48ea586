//! Statement analysis on arbitrary UTF-8 text, and the analysis cache that
//! shares one analysis between texts differing only in literal values.
//!
//! Beyond "no panic": the analysis is deterministic; each statement's text
//! is part of the input; and the cache, having analysed the input, answers
//! for the input and for respellings of its literals exactly what a fresh
//! analysis gives (and the same for column references). That is the
//! property the cache's soundness rests on: two texts of one shape must
//! tokenise, and so analyse, alike. Read with backslash escapes, the
//! input gets from the cache what a fresh analysis under that reading
//! gives.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_agent::sql::fuzzing::respell;
use tollgate_agent::sql::{analyze, analyze_read, column_refs, Analysis, AnalysisCache, Reading};

/// Other spellings of integer, numeric and string literals: empty and long
/// values, values past 32 and 64 bits, strings holding statement syntax.
const SPELLINGS: [(&str, &str, &str); 4] = [
    ("0", "0.0", "''"),
    ("987654321987654321", "3.25e-7", "'it''s; -- /* $$ \" é'"),
    ("2147483648", ".5", "'DROP TABLE t; '"),
    ("99999999999999999999999999", "1e400", "'\n'' select 1 '"),
];

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let fresh = analyze(sql);
    assert_eq!(fresh, analyze(sql), "not deterministic");
    match &fresh {
        Analysis::Parsed { statements } => {
            for statement in statements {
                assert!(
                    sql.contains(statement.text.as_str()),
                    "statement text {:?} is not part of the input",
                    statement.text
                );
                assert!(!statement.command.is_empty());
            }
        }
        Analysis::Unparsable { error } => assert!(!error.is_empty()),
    }

    let cache = AnalysisCache::new(8);
    assert_eq!(*cache.analyze(sql), fresh);
    // A hit answers what the miss did.
    assert_eq!(*cache.analyze(sql), fresh);
    let refs = column_refs(sql, Reading::Standard).ok();
    assert_eq!(
        cache.column_refs(sql, Reading::Standard).as_deref(),
        refs.as_ref()
    );
    // The other reading of backslashes (standard_conforming_strings off)
    // gets its own answer from the same cache, never the standard one.
    let escaped = analyze_read(sql, Reading::BackslashEscapes);
    assert_eq!(*cache.analyze_read(sql, Reading::BackslashEscapes), escaped);
    assert_eq!(*cache.analyze(sql), fresh);

    for (integer, numeric, string) in SPELLINGS {
        let Some(other) = respell(sql, integer, numeric, string) else {
            return;
        };
        assert_eq!(
            *cache.analyze(&other),
            analyze(&other),
            "{sql:?} respelled as {other:?}"
        );
        assert_eq!(
            cache.column_refs(&other, Reading::Standard).as_deref(),
            column_refs(&other, Reading::Standard).ok().as_ref(),
            "{sql:?} respelled as {other:?}"
        );
    }
});
