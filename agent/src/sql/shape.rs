//! A statement's *shape*: its text with the contents of numeric and string
//! literals blanked out, the key under which [`super::AnalysisCache`] shares
//! one analysis between statements that differ only in literal values
//! (`... WHERE aid = 17` and `... WHERE aid = 42`).
//!
//! Sharing is only sound if two texts with one shape tokenise alike, so the
//! scanner is deliberately narrow: it follows PostgreSQL's lexer for
//! comments, quoted identifiers, parameters, plain `'...'` strings and
//! decimal numbers, and gives up (`None`, the cache then keys by exact text)
//! on everything whose tokenisation could depend on a setting or on the
//! literal's content: backslashes in strings (`standard_conforming_strings`),
//! prefixed strings (`E'..'`, `B'..'`, `X'..'`, `U&'..'`, `N'..'`),
//! dollar quoting, numbers followed by letters, digits, `_` or `..`
//! (`0x1F`, `1_000`, `1e`, `1..2`), and unterminated quotes or comments.

/// Stands for an integer literal (`17`).
const INTEGER: u8 = 0xFF;
/// Stands for a numeric literal with a point or an exponent (`1.5`, `2e3`).
const NUMERIC: u8 = 0xFE;
/// Stands for a standard string literal (`'abc'`).
const STRING: u8 = 0xFD;
// These bytes never occur in UTF-8, so a placeholder cannot be confused
// with text that was kept.

/// Appends the shape of `sql` to `key`; `false` when the scanner cannot
/// vouch that every text of that shape tokenises as `sql` does (`key` then
/// holds part of a shape behind what it held before).
pub(crate) fn shape_into(sql: &str, key: &mut Vec<u8>) -> bool {
    shape_onto(sql, key).is_some()
}

/// [`shape_into`] a new buffer, `None` when there is no shape.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn shape(sql: &str) -> Option<Vec<u8>> {
    let mut key = Vec::with_capacity(sql.len());
    shape_into(sql, &mut key).then_some(key)
}

fn shape_onto(sql: &str, key: &mut Vec<u8>) -> Option<()> {
    let bytes = sql.as_bytes();
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let next = bytes.get(i + 1).copied();
        match byte {
            b'\'' => {
                if i > 0 && bytes.get(i - 1).is_some_and(|&b| is_ident(b) || b == b'&') {
                    return None;
                }
                i = string_end(bytes, i + 1)?;
                key.push(STRING);
            }
            b'"' => {
                let end = quoted_identifier_end(bytes, i + 1)?;
                key.extend_from_slice(&bytes[i..end]);
                i = end;
            }
            b'-' if next == Some(b'-') => {
                let end = bytes[i..]
                    .iter()
                    .position(|&b| b == b'\n' || b == b'\r')
                    .map_or(bytes.len(), |n| i + n);
                key.extend_from_slice(&bytes[i..end]);
                i = end;
            }
            b'/' if next == Some(b'*') => {
                let end = block_comment_end(bytes, i)?;
                key.extend_from_slice(&bytes[i..end]);
                i = end;
            }
            b'$' => {
                // `$1` is a parameter; anything else could open a dollar
                // quote, whose body is opaque to this scanner.
                if !next.is_some_and(|b| b.is_ascii_digit()) {
                    return None;
                }
                let end = run_end(bytes, i + 1, |b| b.is_ascii_digit());
                key.extend_from_slice(&bytes[i..end]);
                i = end;
            }
            b'0'..=b'9' => {
                let (end, placeholder) = number_end(bytes, i)?;
                key.push(placeholder);
                i = end;
            }
            b'.' if next.is_some_and(|b| b.is_ascii_digit()) => {
                let (end, _) = number_end(bytes, i)?;
                key.push(NUMERIC);
                i = end;
            }
            b if is_ident_start(b) => {
                let end = run_end(bytes, i + 1, is_ident);
                key.extend_from_slice(&bytes[i..end]);
                i = end;
            }
            _ => {
                key.push(byte);
                i += 1;
            }
        }
    }
    Some(())
}

/// PostgreSQL's identifier characters: letters, `_` and every byte of a
/// non-ASCII character start an identifier; digits and `$` continue one.
fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

fn run_end(bytes: &[u8], from: usize, keep: impl Fn(u8) -> bool) -> usize {
    bytes[from..]
        .iter()
        .position(|&b| !keep(b))
        .map_or(bytes.len(), |n| from + n)
}

/// The end of a `'...'` string whose body starts at `from` (`''` is a quote
/// inside it); `None` for a backslash or a missing closing quote.
fn string_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    loop {
        match bytes.get(i)? {
            b'\\' => return None,
            b'\'' if bytes.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// The end of a `"..."` identifier whose body starts at `from`.
fn quoted_identifier_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    loop {
        match bytes.get(i)? {
            b'"' if bytes.get(i + 1) == Some(&b'"') => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// The end of a (nesting) block comment starting at `from`.
fn block_comment_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = from;
    loop {
        match bytes.get(i..i + 2)? {
            b"/*" => {
                depth += 1;
                i += 2;
            }
            b"*/" => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
}

/// The end of a decimal number starting at `from` and its placeholder;
/// `None` when what follows could make PostgreSQL read it otherwise.
fn number_end(bytes: &[u8], from: usize) -> Option<(usize, u8)> {
    let digits = |i: usize| run_end(bytes, i, |b| b.is_ascii_digit());
    let mut i = digits(from);
    let mut placeholder = INTEGER;
    if bytes.get(i) == Some(&b'.') {
        if bytes.get(i + 1) == Some(&b'.') {
            return None;
        }
        i = digits(i + 1);
        placeholder = NUMERIC;
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(bytes.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        if !bytes.get(j).is_some_and(|b| b.is_ascii_digit()) {
            return None;
        }
        i = digits(j);
        placeholder = NUMERIC;
    }
    if bytes
        .get(i)
        .is_some_and(|&b| is_ident(b) || b == b'.' || b == b'\'')
    {
        return None;
    }
    Some((i, placeholder))
}

/// `sql` with every literal replaced: integers by `integer`, numerics by
/// `numeric`, strings by `string` (each a whole literal token); `None` when
/// `sql` has no shape. Tests and fuzz targets use it to build other texts
/// of one shape.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn respell(sql: &str, integer: &str, numeric: &str, string: &str) -> Option<String> {
    let mut text = Vec::new();
    for byte in shape(sql)? {
        match byte {
            INTEGER => text.extend_from_slice(integer.as_bytes()),
            NUMERIC => text.extend_from_slice(numeric.as_bytes()),
            STRING => text.extend_from_slice(string.as_bytes()),
            other => text.push(other),
        }
    }
    String::from_utf8(text).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn same(a: &str, b: &str) -> bool {
        match (shape(a), shape(b)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        }
    }

    #[test]
    fn literals_are_blanked() {
        assert!(same(
            "SELECT abalance FROM pgbench_accounts WHERE aid = 17;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 4711;"
        ));
        assert!(same(
            "select * from t where name = 'bob' and x > 1.5",
            "select * from t where name = 'it''s' and x > 0.25"
        ));
        assert!(same("select .5, 1e10, 2.5E-3", "select .7, 3e1, 9.0e+2"));
        assert!(same("select $1 + 3", "select $1 + 4"));
        assert!(same("select date '2020-01-01'", "select date ''"));
    }

    #[test]
    fn everything_else_is_kept() {
        // Integers and numerics are different shapes.
        assert!(!same("select 1", "select 1.0"));
        assert!(!same("select $1", "select $2"));
        assert!(!same("select a1 from t", "select a2 from t"));
        assert!(!same("select \"it's\" from t", "select \"its\" from t"));
        assert!(!same("select 1 -- it's\n", "select 1 -- its\n"));
        assert!(!same("select /* 'a' */ 1", "select /* 'b' */ 1"));
        assert!(!same("select 'a' from t", "select 'a' from u"));
        // A string is not a number.
        assert!(!same("select 1", "select '1'"));
    }

    #[test]
    fn gives_up_where_tokenising_could_differ() {
        for sql in [
            "select 'a\\'b'",
            "select E'a'",
            "select e'a'",
            "select B'101'",
            "select X'1F'",
            "select U&'d\\0061t'",
            "select N'a'",
            "select $$a$$",
            "select $x$a$x$",
            "select 0x1F",
            "select 1_000",
            "select 1e",
            "select 1abc",
            "select a[1..2]",
            "select 1.x",
            "select 'unterminated",
            "select \"unterminated",
            "select /* unterminated",
            "select 1'a'",
        ] {
            assert_eq!(shape(sql), None, "{sql:?}");
        }
    }

    #[test]
    fn nested_comments_and_quoted_identifiers_hide_quotes() {
        let key = shape("select /* a /* 'b */ c' */ 1 from \"x'y\" where z = 'q'").unwrap();
        let text = String::from_utf8_lossy(&key);
        assert!(text.contains("/* a /* 'b */ c' */"), "{text}");
        assert!(text.contains("\"x'y\""), "{text}");
        assert_eq!(key.iter().filter(|&&b| b == STRING).count(), 1);
        assert_eq!(key.iter().filter(|&&b| b == INTEGER).count(), 1);
    }

    #[test]
    fn any_input_gives_an_answer_without_panicking() {
        let samples = [
            "select 'a''",
            "--",
            "/*/",
            "$",
            "1e+",
            ".",
            "'",
            "\"\"\"",
            "1.2.3",
        ];
        for sql in samples {
            let _ = shape(sql);
            for cut in 0..=sql.len() {
                if let Some(prefix) = sql.get(..cut) {
                    let _ = shape(prefix);
                }
            }
        }
    }
}
