//! MySQL and MariaDB statement analysis: SQL text in, one neutral
//! [`StatementSummary`] per statement out, as [`super::analyze`] does for
//! PostgreSQL. Pure functions, no I/O.
//!
//! Built on `sqlparser` with its MySQL dialect. That parser is not the
//! server's, and a hostile client chooses the text, so wherever the two may
//! read the text differently the analysis refuses it
//! ([`Analysis::Unparsable`]: the caller refuses the statement) rather than
//! return a summary that misses something:
//!
//! - The text is first lexed the way the MySQL server lexes it ([`scan`]):
//!   strings, quoted identifiers and comments, with MySQL's rules (`-- `
//!   needs whitespace or a control character after it, `#` runs to the end
//!   of the line, `/* */` does not nest, `x'..'` and `b'..'` take no
//!   escapes). The boundaries it finds must be exactly those of
//!   `sqlparser`'s tokenizer, or the text is refused.
//! - Executable comments (`/*! ... */`, `/*!50700 ... */`, MariaDB's
//!   `/*M! ... */`) are refused by the analysis: the server runs their
//!   content or not depending on its version, and lexes it with rules
//!   (strings holding `*/`, line comments) no other lexer reproduces. The
//!   protocol handler first resolves them for the server it talks to
//!   ([`resolve_executable_comments`]) and forwards the resolved text, so
//!   the server never sees one and runs what was analysed.
//! - Strings are lexed twice, with backslash escapes (MySQL's default) and
//!   without (`sql_mode` `NO_BACKSLASH_ESCAPES`, which a client may set for
//!   its own session): text that splits differently under the two readings
//!   (`'\'; DROP TABLE t; -- '`) is refused.
//! - Double quotes delimit strings by default and identifiers under
//!   `ANSI_QUOTES`. A double-quoted name in a table position is read as the
//!   table (`FROM "secrets"` reads `secrets`); a double-quoted function name
//!   does not parse and is refused.
//! - Statements the dialect does not parse (compound statements, account
//!   management, ...) are refused. A few MySQL forms it lacks are read here
//!   from the tokens: `LOAD DATA|XML ... INFILE`, `SELECT ... INTO
//!   OUTFILE|DUMPFILE`, `SET PERSIST|PERSIST_ONLY`, `PREPARE name FROM
//!   'text'`, `DO expr, ...` (as the select of its expressions) and
//!   `HANDLER name OPEN|READ|CLOSE`.
//!
//! Table names are lowercased, as the server does with
//! `lower_case_table_names=1` (and as case-insensitive file systems do), so
//! that a policy naming `secrets` also matches `SECRETS` and `` `Secrets` ``
//! whatever the server's setting. CTE names hide a table only when spelled
//! exactly alike, so a difference in case can only add a table read.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use sqlparser::ast::{
    AssignmentTarget, BinaryOperator, Delete, Expr, FromTable, GrantObjects, Ident, ObjectName,
    ObjectType, Query, SetExpr, Statement, TableFactor, TableObject, TableWithJoins, Update, Value,
    ValueWithSpan, Visit, VisitMut, Visitor, VisitorMut,
};
use sqlparser::dialect::MySqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer, Whitespace, Word};

use super::{Analysis, StatementFlags, StatementKind, StatementSummary, TableRef, TransactionOp};

#[path = "mysql/names.rs"]
mod names;
pub use names::{name_use, names_something, NameUse};

/// Functions that read files on the database server.
const SERVER_FILE_FUNCTIONS: &[&str] = &["load_file"];

/// Analyses MySQL/MariaDB SQL text: one summary per statement, in order.
///
/// Text the server may read otherwise than this analysis does gives
/// [`Analysis::Unparsable`] (see the module documentation), as does text
/// that does not parse; empty text, or text of only whitespace, comments
/// and semicolons, gives [`Analysis::Parsed`] with no statements.
pub fn analyze(text: &str) -> Analysis {
    analyze_read(text, Escapes::Unknown)
}

/// How the session's server reads a backslash in a string literal: its
/// `sql_mode` `NO_BACKSLASH_ESCAPES` (reported in the status flags of every
/// OK packet, `SERVER_STATUS_NO_BACKSLASH_ESCAPES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Escapes {
    /// Not known: text is accepted only where both readings agree on where
    /// every string, quoted name and comment begins and ends.
    #[default]
    Unknown,
    /// A backslash escapes the next character (MySQL's default).
    Backslash,
    /// `NO_BACKSLASH_ESCAPES`: a backslash is an ordinary character. The
    /// parser always reads backslash escapes, so text where the difference
    /// matters is refused.
    NoBackslash,
}

/// [`analyze`] with string literals read as the server reads them under
/// `escapes`.
pub fn analyze_read(text: &str, escapes: Escapes) -> Analysis {
    match analyze_text(text, escapes) {
        Ok(statements) => Analysis::Parsed { statements },
        Err(error) => Analysis::Unparsable { error },
    }
}

fn analyze_text(text: &str, escapes: Escapes) -> Result<Vec<StatementSummary>, String> {
    if text.contains('\0') {
        return Err("statement text contains a NUL character".to_owned());
    }
    let server = match escapes {
        Escapes::Backslash => scan(text, true)?,
        Escapes::NoBackslash => scan(text, false)?,
        Escapes::Unknown => match (scan(text, true), scan(text, false)) {
            (Ok(with), Ok(without)) if with == without => with,
            (Err(error), _) => return Err(error),
            _ => {
                return Err("statement text reads differently with and without \
                            backslash escapes (sql_mode NO_BACKSLASH_ESCAPES)"
                    .to_owned())
            }
        },
    };
    let dialect = MySqlDialect {};
    let tokens = Tokenizer::new(&dialect, text)
        .tokenize_with_location()
        .map_err(|e| e.to_string())?;
    let index = Offsets::new(text);
    let parser_regions = token_regions(&tokens, &index, text)?;
    if parser_regions != server {
        return Err(
            "statement text is lexed differently by the analysis and by MySQL \
             (strings, quoted names or comments do not line up)"
                .to_owned(),
        );
    }
    let mut statements = Vec::new();
    for piece in tokens.split(|t| t.token == Token::SemiColon) {
        if piece.iter().all(|t| is_trivia(&t.token)) {
            continue;
        }
        statements.push(summarise(piece, text, &index, escapes)?);
    }
    Ok(statements)
}

// ---------------------------------------------------------------------------
// Executable comments.

/// The server a text goes to, as its greeting names it: what decides which
/// executable comments it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerVersion {
    /// `major * 10000 + minor * 100 + patch` (10.11.19 is 101119), as
    /// `/*!NNNNN` compares it.
    pub id: u32,
    /// MariaDB, which also runs `/*M!` comments.
    pub mariadb: bool,
}

impl ServerVersion {
    /// Reads a greeting's version string: `8.0.36`, `10.11.19-MariaDB-...`,
    /// or `5.5.5-10.11.19-MariaDB-...` (MariaDB's prefix for old clients).
    pub fn parse(version: &str) -> Option<ServerVersion> {
        let mariadb = version.contains("MariaDB");
        let version = match version.strip_prefix("5.5.5-") {
            Some(rest) if mariadb => rest,
            _ => version,
        };
        let numbers = version.split(['-', '+', ' ', '~']).next()?;
        let mut parts = numbers.split('.').map(|p| p.parse::<u32>().ok());
        let (major, minor, patch) = (parts.next()??, parts.next()??, parts.next()??);
        if minor > 99 || patch > 99 {
            return None;
        }
        Some(ServerVersion {
            id: major.checked_mul(10_000)? + minor * 100 + patch,
            mariadb,
        })
    }
}

/// Resolves the executable comments of `text` for `server`, as the server
/// would: the content of `/*! ... */` and of `/*!NNNNN ... */` up to its
/// version (and, on MariaDB, of `/*M! ... */` and `/*M!NNNNNN ... */`)
/// becomes plain text, and the others are dropped, each replaced by a
/// space so that no token joins its neighbour. The caller analyses and
/// forwards the resolved text in place of the client's, so the server
/// never reads an executable comment and runs exactly what was analysed;
/// how the client meant a comment whose content holds `/*` is not guessed
/// at (refused). Text without executable comments comes back as it is.
pub fn resolve_executable_comments(
    text: &str,
    escapes: Escapes,
    server: ServerVersion,
) -> Result<std::borrow::Cow<'_, str>, String> {
    if !text.contains("/*!") && !text.contains("/*M!") {
        return Ok(std::borrow::Cow::Borrowed(text));
    }
    let regions = match escapes {
        Escapes::Backslash => scan_with(text, true, true)?,
        Escapes::NoBackslash => scan_with(text, false, true)?,
        Escapes::Unknown => {
            let with = scan_with(text, true, true)?;
            if with != scan_with(text, false, true)? {
                return Err("statement text reads differently with and without \
                            backslash escapes (sql_mode NO_BACKSLASH_ESCAPES)"
                    .to_owned());
            }
            with
        }
    };
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for region in regions.iter().filter(|r| r.executable) {
        let comment = text
            .get(region.start..region.end)
            .ok_or("an executable comment inside a character")?;
        let (mariadb_only, rest) = match comment.strip_prefix("/*M!") {
            Some(rest) => (true, rest),
            None => (false, comment.get(3..).unwrap_or_default()),
        };
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let version = match digits {
            0 => None,
            5 | 6 => rest.get(..digits).and_then(|d| d.parse::<u32>().ok()),
            _ => {
                return Err(format!(
                    "executable comment at byte {} with a version of {digits} digits, \
                     which servers read differently",
                    region.start
                ))
            }
        };
        let content = rest
            .get(digits..rest.len().saturating_sub(2))
            .unwrap_or_default();
        if content.contains("/*") {
            return Err(format!(
                "executable comment at byte {} holding another comment",
                region.start
            ));
        }
        // Content that opens a quote it does not close (or a line comment)
        // would change how the text after the comment is read once
        // resolved; the server's reading of it is not guessed at.
        let stands_alone = |backslashes| {
            scan(content, backslashes).is_ok_and(|regions| regions.iter().all(|r| !r.comment))
        };
        if !stands_alone(true) || !stands_alone(false) {
            return Err(format!(
                "executable comment at byte {} whose content leaves a quote open or holds a comment",
                region.start
            ));
        }
        let runs = (!mariadb_only || server.mariadb) && version.is_none_or(|v| v <= server.id);
        out.push_str(text.get(at..region.start).unwrap_or_default());
        out.push(' ');
        if runs {
            out.push_str(content);
            out.push(' ');
        }
        at = region.end;
    }
    out.push_str(text.get(at..).unwrap_or_default());
    Ok(std::borrow::Cow::Owned(out))
}

// ---------------------------------------------------------------------------
// The server's lexer, for the boundaries that decide.

/// A string, quoted identifier or comment: byte range in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    start: usize,
    end: usize,
    comment: bool,
    /// An executable comment (`/*!`, `/*M!`), up to the first `*/`.
    executable: bool,
}

/// Finds the strings, quoted identifiers and comments of `text` as the
/// MySQL server's lexer does, with backslash escapes in strings or not.
/// Refuses executable comments and unterminated strings or comments.
fn scan(text: &str, backslash_escapes: bool) -> Result<Vec<Region>, String> {
    scan_with(text, backslash_escapes, false)
}

/// [`scan`], with executable comments found (`executable`) rather than
/// refused.
fn scan_with(text: &str, backslash_escapes: bool, executable: bool) -> Result<Vec<Region>, String> {
    let bytes = text.as_bytes();
    let mut regions = Vec::new();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let next = bytes.get(i + 1).copied();
        match b {
            b'\'' | b'"' | b'`' => {
                // x'..' and b'..' (hex and bit literals) take no escapes.
                let prefixed = b == b'\''
                    && i >= 1
                    && matches!(bytes.get(i - 1), Some(b'x' | b'X' | b'b' | b'B'))
                    && (i < 2 || !bytes.get(i - 2).is_some_and(|c| is_word_byte(*c)));
                let escapes = backslash_escapes && b != b'`' && !prefixed;
                let end = quoted_end(bytes, i, escapes)
                    .ok_or_else(|| format!("unterminated quoted text at byte {i}"))?;
                regions.push(Region {
                    start: i,
                    end,
                    comment: false,
                    executable: false,
                });
                i = end;
            }
            b'#' => {
                let end = line_end(bytes, i);
                regions.push(Region {
                    start: i,
                    end,
                    comment: true,
                    executable: false,
                });
                i = end;
            }
            b'-' if next == Some(b'-')
                && bytes
                    .get(i + 2)
                    .is_none_or(|c| c.is_ascii_whitespace() || c.is_ascii_control()) =>
            {
                let end = line_end(bytes, i);
                regions.push(Region {
                    start: i,
                    end,
                    comment: true,
                    executable: false,
                });
                i = end;
            }
            b'/' if next == Some(b'*') => {
                let body = bytes.get(i + 2..).unwrap_or_default();
                let is_executable = body.starts_with(b"!") || body.starts_with(b"M!");
                if is_executable && !executable {
                    return Err(format!(
                        "executable comment (/*! or /*M!) at byte {i}: its content runs \
                         depending on the server's version and is not analysed"
                    ));
                }
                let close = body
                    .windows(2)
                    .position(|w| w == b"*/")
                    .ok_or_else(|| format!("unterminated comment at byte {i}"))?;
                let end = i + 2 + close + 2;
                regions.push(Region {
                    start: i,
                    end,
                    comment: true,
                    executable: is_executable,
                });
                i = end;
            }
            _ => i += 1,
        }
    }
    Ok(regions)
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// The end (exclusive) of the quoted text opening at `start`: a doubled
/// quote is a quote; with `escapes`, a backslash takes the next character.
fn quoted_end(bytes: &[u8], start: usize, escapes: bool) -> Option<usize> {
    let quote = *bytes.get(start)?;
    let mut i = start + 1;
    loop {
        let b = *bytes.get(i)?;
        if escapes && b == b'\\' {
            // The escaped character may be multi-byte; its continuation
            // bytes are never quotes or backslashes.
            i += 2;
        } else if b == quote {
            if bytes.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return Some(i + 1);
            }
        } else {
            i += 1;
        }
    }
}

/// A line comment runs to the newline (not included).
fn line_end(bytes: &[u8], start: usize) -> usize {
    bytes
        .get(start..)
        .and_then(|rest| rest.iter().position(|b| *b == b'\n'))
        .map_or(bytes.len(), |n| start + n)
}

/// Byte offsets of the tokenizer's (line, column) locations.
struct Offsets {
    /// Byte offset of every character, and of the end of the text.
    char_bytes: Vec<usize>,
    /// Index (in characters) where each line starts.
    line_starts: Vec<usize>,
}

impl Offsets {
    fn new(text: &str) -> Self {
        let mut char_bytes = Vec::with_capacity(text.len() + 1);
        let mut line_starts = vec![0];
        for (n, (byte, c)) in text.char_indices().enumerate() {
            char_bytes.push(byte);
            if c == '\n' {
                line_starts.push(n + 1);
            }
        }
        char_bytes.push(text.len());
        Self {
            char_bytes,
            line_starts,
        }
    }

    fn byte(&self, location: Location) -> Option<usize> {
        let line = usize::try_from(location.line).ok()?.checked_sub(1)?;
        let column = usize::try_from(location.column).ok()?.checked_sub(1)?;
        let char_index = self.line_starts.get(line)?.checked_add(column)?;
        self.char_bytes.get(char_index).copied()
    }
}

fn token_range(token: &TokenWithSpan, index: &Offsets) -> Result<(usize, usize), String> {
    match (index.byte(token.span.start), index.byte(token.span.end)) {
        (Some(start), Some(end)) if start <= end => Ok((start, end)),
        _ => Err(format!("token {} has no place in the text", token.token)),
    }
}

/// The strings, quoted identifiers and comments of the tokenizer's output,
/// in the shape [`scan`] gives them (a string starts at its quote, after
/// any `N`, `X` or `B` prefix).
fn token_regions(
    tokens: &[TokenWithSpan],
    index: &Offsets,
    text: &str,
) -> Result<Vec<Region>, String> {
    let mut regions = Vec::new();
    for token in tokens {
        let comment = match &token.token {
            Token::Whitespace(
                Whitespace::SingleLineComment { .. } | Whitespace::MultiLineComment(_),
            ) => true,
            Token::Whitespace(_)
            | Token::EOF
            | Token::Number(..)
            | Token::Word(Word {
                quote_style: None, ..
            }) => continue,
            _ => false,
        };
        let (start, end) = token_range(token, index)?;
        let slice = text.get(start..end).unwrap_or_default();
        let start = if comment {
            start
        } else {
            match slice.find(['\'', '"', '`']) {
                Some(quote) => start + quote,
                // Operators and punctuation: no quoted text.
                None => continue,
            }
        };
        regions.push(Region {
            start,
            end,
            comment,
            executable: false,
        });
    }
    Ok(regions)
}

fn is_trivia(token: &Token) -> bool {
    matches!(token, Token::Whitespace(_) | Token::EOF)
}

// ---------------------------------------------------------------------------
// One statement.

/// What one statement touches.
#[derive(Default)]
struct Facts {
    read: BTreeSet<TableRef>,
    written: BTreeSet<TableRef>,
    functions: BTreeSet<String>,
    flags: StatementFlags,
    /// Relations (by address) the statements being walked modify.
    targets: HashSet<*const ObjectName>,
    /// Relations (by address) that name another relation of the statement
    /// (`DELETE FROM a USING t AS a`): not tables themselves.
    aliases: HashSet<*const ObjectName>,
    /// CTE names in scope, one frame per query level (innermost last).
    scopes: Vec<Frame>,
    /// Why the statement cannot be summarised, found while walking it.
    unreadable: Option<String>,
}

#[derive(Default)]
struct Frame {
    /// Names visible at this level and below.
    names: Vec<String>,
    /// The CTE queries of a plain WITH not yet walked, with their names:
    /// each name becomes visible once its own query has been walked.
    pending: Vec<(*const Query, String)>,
}

/// Summarises the tokens of one statement (no `;`).
fn summarise(
    piece: &[TokenWithSpan],
    text: &str,
    index: &Offsets,
    escapes: Escapes,
) -> Result<StatementSummary, String> {
    let own_text = statement_text(piece, text, index)?;
    let words = leading_words(piece, 3);
    let first = words.first().map(String::as_str).unwrap_or_default();
    let second = words.get(1).map(String::as_str).unwrap_or_default();

    if first == "LOAD" && matches!(second, "DATA" | "XML") {
        return load_data(piece, own_text, second);
    }
    if first == "PREPARE" {
        return prepare(piece, own_text, index, text, escapes);
    }
    if first == "EXECUTE" && second == "IMMEDIATE" {
        return execute_immediate(piece, own_text, index, text, escapes);
    }
    if first == "HANDLER" {
        return handler(piece, own_text);
    }
    if first == "ALTER" && second == "TABLE" {
        if let Some(summary) = alter_keys(piece, own_text) {
            return Ok(summary);
        }
    }

    let mut tokens = piece.to_vec();
    let mut facts = Facts::default();
    let mut markers = String::new();
    if first == "DO" {
        // `DO expr, ...` evaluates what `SELECT expr, ...` would and
        // returns nothing: read as that select, labelled DO.
        if let Some(token) = tokens.iter_mut().find(|t| !is_trivia(&t.token)) {
            token.token = Token::make_keyword("SELECT");
        }
        markers.push_str(" DO");
    }
    if first == "DROP" && second == "PREPARE" {
        // MySQL's other spelling of DEALLOCATE PREPARE, which the dialect
        // lacks.
        if let Some(token) = tokens.iter_mut().find(|t| !is_trivia(&t.token)) {
            token.token = Token::make_keyword("DEALLOCATE");
        }
    }
    if first == "SET" {
        for token in &mut tokens {
            let Token::Word(word) = &mut token.token else {
                continue;
            };
            if word.quote_style.is_some() {
                continue;
            }
            let lower = word.value.to_ascii_lowercase();
            match lower.as_str() {
                "persist" | "persist_only" => {
                    // The dialect lacks these scopes; for what the
                    // statement touches they are GLOBAL.
                    markers.push_str(" SET ");
                    markers.push_str(&lower);
                    word.value = "GLOBAL".to_owned();
                    word.keyword = sqlparser::keywords::Keyword::GLOBAL;
                    facts.flags.config_change = true;
                }
                "global" | "@@global" | "@@persist" | "@@persist_only" => {
                    facts.flags.config_change = true;
                }
                _ => {}
            }
        }
    }
    if let Some(kinds) = remove_into_file(&mut tokens)? {
        facts.flags.server_file_access = true;
        markers.push_str(&kinds);
    }

    let dialect = MySqlDialect {};
    let mut statements = Parser::new(&dialect)
        .with_tokens_with_locations(tokens)
        .parse_statements()
        .map_err(|e| e.to_string())?;
    let statement = match (statements.pop(), statements.is_empty()) {
        (Some(statement), true) => statement,
        _ => return Err("expected one statement between semicolons".to_owned()),
    };

    let _ = statement.visit(&mut facts);
    if let Some(why) = facts.unreadable.take() {
        return Err(why);
    }
    let (kind, command, transaction) = match first {
        "DO" => (StatementKind::Do, "DO".to_owned(), None),
        _ => label(&statement, first),
    };
    let fingerprint = fingerprint(&statement, &markers);
    Ok(summary(
        kind,
        transaction,
        command,
        facts,
        fingerprint,
        own_text,
    ))
}

fn summary(
    kind: StatementKind,
    transaction: Option<TransactionOp>,
    command: String,
    facts: Facts,
    fingerprint: String,
    text: &str,
) -> StatementSummary {
    StatementSummary {
        kind,
        transaction,
        command: Arc::from(command),
        tables_read: facts.read.into_iter().collect(),
        tables_written: facts.written.into_iter().collect(),
        functions: facts.functions.into_iter().collect(),
        flags: facts.flags,
        fingerprint: Arc::from(fingerprint),
        text: text.to_owned(),
    }
}

/// The statement's own text: from its first token to its last, without
/// the whitespace and comments around it.
fn statement_text<'t>(
    piece: &[TokenWithSpan],
    text: &'t str,
    index: &Offsets,
) -> Result<&'t str, String> {
    let mut solid = piece.iter().filter(|t| !is_trivia(&t.token));
    let (Some(first), last) = (solid.next(), solid.next_back()) else {
        return Ok("");
    };
    let (start, mut end) = token_range(first, index)?;
    if let Some(last) = last {
        end = token_range(last, index)?.1;
    }
    Ok(text.get(start..end).unwrap_or(text))
}

/// The first `n` unquoted words of a statement, uppercased.
fn leading_words(piece: &[TokenWithSpan], n: usize) -> Vec<String> {
    piece
        .iter()
        .filter(|t| !is_trivia(&t.token))
        .take(n)
        .map(|t| match &t.token {
            Token::Word(w) if w.quote_style.is_none() => w.value.to_ascii_uppercase(),
            _ => String::new(),
        })
        .collect()
}

fn is_word(token: &Token, word: &str) -> bool {
    matches!(token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
}

fn is_string(token: &Token) -> bool {
    matches!(
        token,
        Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::NationalStringLiteral(_)
            | Token::HexStringLiteral(_)
    )
}

/// Removes `INTO OUTFILE 'file' [options]` and `INTO DUMPFILE 'file'`
/// clauses, which the dialect does not parse, and names the kinds removed.
/// What is removed holds only keywords and string literals.
fn remove_into_file(tokens: &mut Vec<TokenWithSpan>) -> Result<Option<String>, String> {
    let mut removed = String::new();
    let mut i = 0;
    while i < tokens.len() {
        if !tokens.get(i).is_some_and(|t| is_word(&t.token, "into")) {
            i += 1;
            continue;
        }
        let solid: Vec<usize> = (i + 1..tokens.len())
            .filter(|&j| tokens.get(j).is_some_and(|t| !is_trivia(&t.token)))
            .collect();
        let at = |k: usize| solid.get(k).and_then(|&j| tokens.get(j)).map(|t| &t.token);
        let outfile = at(0).is_some_and(|t| is_word(t, "outfile"));
        let dumpfile = at(0).is_some_and(|t| is_word(t, "dumpfile"));
        if !outfile && !dumpfile {
            i += 1;
            continue;
        }
        if !at(1).is_some_and(is_string) {
            return Err("INTO OUTFILE or DUMPFILE without a file name".to_owned());
        }
        // Index (in `solid`) of the last token of the clause.
        let mut last = 1;
        if outfile {
            loop {
                let word = |k: usize, w: &str| at(k).is_some_and(|t| is_word(t, w));
                if word(last + 1, "character") && word(last + 2, "set") {
                    last += 3;
                } else if word(last + 1, "charset") {
                    last += 2;
                } else if ["fields", "columns", "lines"]
                    .iter()
                    .any(|w| word(last + 1, w))
                    || (word(last + 1, "optionally") && word(last + 2, "enclosed"))
                {
                    last += 1;
                    continue;
                } else if ["terminated", "enclosed", "escaped", "starting"]
                    .iter()
                    .any(|w| word(last + 1, w))
                    && word(last + 2, "by")
                {
                    last += 3;
                    if !at(last).is_some_and(is_string) {
                        return Err("INTO OUTFILE option without its string".to_owned());
                    }
                    continue;
                } else {
                    break;
                }
                // CHARACTER SET's value: a name or a string.
                if !at(last).is_some_and(|t| {
                    is_string(t) || matches!(t, Token::Word(w) if w.quote_style.is_none())
                }) {
                    return Err("INTO OUTFILE CHARACTER SET without a name".to_owned());
                }
            }
        }
        let end = solid.get(last).copied().unwrap_or(i);
        tokens.drain(i..=end);
        removed.push_str(if outfile {
            " INTO OUTFILE"
        } else {
            " INTO DUMPFILE"
        });
    }
    Ok((!removed.is_empty()).then_some(removed))
}

/// `LOAD DATA|XML [LOW_PRIORITY|CONCURRENT] [LOCAL] INFILE 'file'
/// [REPLACE|IGNORE] INTO TABLE name ... [SET col = expr, ...]`, read from
/// the tokens: the table is written; the SET clause's expressions are
/// parsed (as an UPDATE of the table) for what they read and call.
fn load_data(
    piece: &[TokenWithSpan],
    own_text: &str,
    what: &str,
) -> Result<StatementSummary, String> {
    let solid: Vec<&TokenWithSpan> = piece.iter().filter(|t| !is_trivia(&t.token)).collect();
    let at = |k: usize| solid.get(k).map(|t| &t.token);
    let mut k = 2;
    while at(k).is_some_and(|t| is_word(t, "low_priority") || is_word(t, "concurrent")) {
        k += 1;
    }
    let local = at(k).is_some_and(|t| is_word(t, "local"));
    if local {
        k += 1;
    }
    if !(at(k).is_some_and(|t| is_word(t, "infile")) && at(k + 1).is_some_and(is_string)) {
        return Err(format!("LOAD {what} without INFILE 'file'"));
    }
    k += 2;
    if at(k).is_some_and(|t| is_word(t, "replace") || is_word(t, "ignore")) {
        k += 1;
    }
    if !(at(k).is_some_and(|t| is_word(t, "into"))
        && at(k + 1).is_some_and(|t| is_word(t, "table")))
    {
        return Err(format!("LOAD {what} without INTO TABLE"));
    }
    k += 2;
    let name_start = k;
    let name_part =
        |t: Option<&Token>| matches!(t, Some(Token::Word(_) | Token::DoubleQuotedString(_)));
    if !name_part(at(k)) {
        return Err(format!("LOAD {what} without a table name"));
    }
    k += 1;
    if at(k) == Some(&Token::Period) && name_part(at(k + 1)) {
        k += 2;
    }
    let name_end = k;
    // Up to SET: options, a column list, user variables; no expressions.
    while let Some(token) = at(k) {
        let charset = k > 0 && at(k - 1).is_some_and(|t| is_word(t, "character"));
        if is_word(token, "set") && !charset {
            break;
        }
        let plain = matches!(
            token,
            Token::Word(_)
                | Token::Number(..)
                | Token::Comma
                | Token::LParen
                | Token::RParen
                | Token::Period
                | Token::AtSign
        ) || is_string(token);
        let query = ["select", "table", "values", "with"]
            .iter()
            .any(|w| is_word(token, w));
        if !plain || query {
            return Err(format!("LOAD {what}: unexpected {token}"));
        }
        k += 1;
    }

    // The table, and the SET clause if any, as `UPDATE name SET ...`.
    let mut tokens = vec![TokenWithSpan::wrap(Token::make_keyword("UPDATE"))];
    for token in solid.get(name_start..name_end).unwrap_or_default() {
        tokens.push(TokenWithSpan::wrap(Token::Whitespace(Whitespace::Space)));
        tokens.push((*token).clone());
    }
    let has_set = at(k).is_some();
    if has_set {
        for token in solid.get(k..).unwrap_or_default() {
            tokens.push(TokenWithSpan::wrap(Token::Whitespace(Whitespace::Space)));
            tokens.push((*token).clone());
        }
    } else {
        for word in ["SET", "__load_data", "=", "0"] {
            tokens.push(TokenWithSpan::wrap(Token::Whitespace(Whitespace::Space)));
            tokens.push(TokenWithSpan::wrap(match word {
                "=" => Token::Eq,
                "0" => Token::Number("0".to_owned(), false),
                w => Token::make_word(w, None),
            }));
        }
    }
    let mut facts = Facts::default();
    walk_one(
        tokens,
        &mut facts,
        &format!("LOAD {what}"),
        "one table and SET clause",
    )?;
    facts.flags.no_where = false;
    facts.flags.server_file_access = true;
    let fingerprint = hash(&token_shape(&solid));
    Ok(summary(
        StatementKind::Copy,
        None,
        if local {
            format!("LOAD {what} LOCAL")
        } else {
            format!("LOAD {what}")
        },
        facts,
        fingerprint,
        own_text,
    ))
}

/// `ALTER TABLE name DISABLE KEYS` and `... ENABLE KEYS` (mysqldump writes
/// them around its INSERTs; the dialect lacks them): a change to the table,
/// exactly that form or `None`.
fn alter_keys(piece: &[TokenWithSpan], own_text: &str) -> Option<StatementSummary> {
    let solid: Vec<&TokenWithSpan> = piece.iter().filter(|t| !is_trivia(&t.token)).collect();
    let [_, _, name @ .., switch, keys] = solid.as_slice() else {
        return None;
    };
    let switch = ["DISABLE", "ENABLE"]
        .into_iter()
        .find(|w| is_word(&switch.token, w))?;
    if !is_word(&keys.token, "KEYS") {
        return None;
    }
    let ident = |t: &TokenWithSpan| match &t.token {
        Token::Word(w) => Some(Ident {
            value: w.value.clone(),
            quote_style: w.quote_style,
            span: t.span,
        }),
        _ => None,
    };
    let parts = match name {
        [table] => vec![ident(table)?],
        [db, dot, table] if dot.token == Token::Period => vec![ident(db)?, ident(table)?],
        _ => return None,
    };
    let mut facts = Facts::default();
    facts.written.insert(table_ref(&ObjectName::from(parts))?);
    let fingerprint = hash(&token_shape(&solid));
    Some(summary(
        StatementKind::Alter,
        None,
        format!("ALTER TABLE {switch} KEYS"),
        facts,
        fingerprint,
        own_text,
    ))
}

/// `HANDLER name OPEN [[AS] alias]`, `HANDLER name READ ...` and
/// `HANDLER name CLOSE`, which the dialect lacks: MySQL's row-by-row
/// reading of a table, past the optimizer. Labelled `HANDLER OPEN`,
/// `HANDLER READ`, `HANDLER CLOSE`, of kind `other` (an allow-list of
/// `select` does not let them through), each reading the name it uses; a
/// `READ`'s index values and `WHERE` condition are read as the select
/// `SELECT (values) FROM name WHERE condition` would be (their functions
/// and subqueries count). A `READ` names the handler, which `OPEN` named
/// after the table or the alias it gave: the table's rules apply at
/// `OPEN`. A result of it cannot be masked (kind `other`), so a `mask`
/// rule refuses it.
fn handler(piece: &[TokenWithSpan], own_text: &str) -> Result<StatementSummary, String> {
    let solid: Vec<&TokenWithSpan> = piece.iter().filter(|t| !is_trivia(&t.token)).collect();
    let at = |k: usize| solid.get(k).map(|t| &t.token);
    let name_part =
        |t: Option<&Token>| matches!(t, Some(Token::Word(_) | Token::DoubleQuotedString(_)));
    if !name_part(at(1)) {
        return Err("HANDLER without a table name".to_owned());
    }
    let mut k = 2;
    if at(k) == Some(&Token::Period) && name_part(at(k + 1)) {
        k += 2;
    }
    let name = solid.get(1..k).unwrap_or_default();
    let verb = ["OPEN", "READ", "CLOSE"]
        .into_iter()
        .find(|w| at(k).is_some_and(|t| is_word(t, w)))
        .ok_or("HANDLER: expected OPEN, READ or CLOSE after the table name")?;
    let rest = solid.get(k + 1..).unwrap_or_default();
    // A READ's WHERE and LIMIT clauses, kept for the select.
    let mut depth = 0i32;
    let clause = rest
        .iter()
        .position(|t| {
            match t.token {
                Token::LParen => depth += 1,
                Token::RParen => depth -= 1,
                _ => {}
            }
            depth == 0 && (is_word(&t.token, "where") || is_word(&t.token, "limit"))
        })
        .unwrap_or(rest.len());
    let (position, clauses) = rest.split_at(clause);
    let mut select = vec![TokenWithSpan::wrap(Token::make_keyword("SELECT"))];
    let space = || TokenWithSpan::wrap(Token::Whitespace(Whitespace::Space));
    match verb {
        "OPEN" => {
            let alias = match rest {
                [] => true,
                [alias] | [_, alias] => {
                    matches!(alias.token, Token::Word(_)) && !is_word(&alias.token, "as")
                }
                _ => false,
            };
            let with_as = rest.len() != 2 || rest.first().is_some_and(|t| is_word(&t.token, "as"));
            if !(alias && with_as) {
                return Err("HANDLER ... OPEN: expected at most [AS] alias after OPEN".to_owned());
            }
            select.extend([space(), TokenWithSpan::wrap(Token::Mul)]);
        }
        "CLOSE" => {
            if !rest.is_empty() {
                return Err("HANDLER ... CLOSE: nothing may follow CLOSE".to_owned());
            }
            select.extend([space(), TokenWithSpan::wrap(Token::Mul)]);
        }
        _ => {
            let keyword =
                |t: &TokenWithSpan, words: &[&str]| words.iter().any(|w| is_word(&t.token, w));
            let comparison = |t: &TokenWithSpan| {
                matches!(
                    t.token,
                    Token::Eq | Token::LtEq | Token::GtEq | Token::Lt | Token::Gt
                )
            };
            match position {
                [first] if keyword(first, &["first", "next"]) => {
                    select.extend([space(), TokenWithSpan::wrap(Token::Mul)]);
                }
                [index, order]
                    if matches!(index.token, Token::Word(_))
                        && keyword(order, &["first", "next", "prev", "last"]) =>
                {
                    select.extend([space(), TokenWithSpan::wrap(Token::Mul)]);
                }
                [index, op, values @ ..]
                    if matches!(index.token, Token::Word(_))
                        && comparison(op)
                        && values.first().is_some_and(|t| t.token == Token::LParen)
                        && values.last().is_some_and(|t| t.token == Token::RParen) =>
                {
                    for token in values {
                        select.extend([space(), (*token).clone()]);
                    }
                }
                _ => {
                    return Err("HANDLER ... READ: expected [index] FIRST|NEXT, index PREV|LAST, or index =|<=|>=|<|> (values)".to_owned())
                }
            }
        }
    }
    select.extend([space(), TokenWithSpan::wrap(Token::make_keyword("FROM"))]);
    for token in name {
        select.extend([space(), (*token).clone()]);
    }
    if verb == "READ" {
        for token in clauses {
            select.extend([space(), (*token).clone()]);
        }
    }
    let mut facts = Facts::default();
    walk_one(
        select,
        &mut facts,
        &format!("HANDLER ... {verb}"),
        "one handler command",
    )?;
    if let Some(why) = facts.unreadable.take() {
        return Err(why);
    }
    let fingerprint = hash(&token_shape(&solid));
    Ok(summary(
        StatementKind::Other,
        None,
        format!("HANDLER {verb}"),
        facts,
        fingerprint,
        own_text,
    ))
}

/// `PREPARE name FROM 'text'` (the text's one statement is analysed and
/// counts). `PREPARE name FROM @variable` is refused: its text is not known
/// here, and it could be anything.
fn prepare(
    piece: &[TokenWithSpan],
    own_text: &str,
    index: &Offsets,
    text: &str,
    escapes: Escapes,
) -> Result<StatementSummary, String> {
    let solid: Vec<&TokenWithSpan> = piece.iter().filter(|t| !is_trivia(&t.token)).collect();
    let from = solid.get(2).is_some_and(|t| is_word(&t.token, "from"));
    let name = solid.get(1).map(|t| &t.token);
    if !from || !matches!(name, Some(Token::Word(_))) || solid.len() != 4 {
        return Err("PREPARE: expected PREPARE name FROM 'statement' or @variable".to_owned());
    }
    let statement = text_statement(
        "PREPARE",
        "PREPARE name FROM 'statement'",
        solid.get(3),
        index,
        text,
        escapes,
    )?;
    let mut facts = Facts::default();
    let shape = format!("PREPARE ? FROM {}", statement.fingerprint);
    facts.include(statement);
    Ok(summary(
        StatementKind::Prepared,
        None,
        "PREPARE".to_owned(),
        facts,
        hash(&shape),
        own_text,
    ))
}

/// MariaDB's `EXECUTE IMMEDIATE 'text' [USING expr, ...]` prepares, runs
/// and drops the statement in the text at once: decided as that statement
/// (and what the `USING` expressions read). A statement from an expression
/// or a variable is refused, as for `PREPARE`.
fn execute_immediate(
    piece: &[TokenWithSpan],
    own_text: &str,
    index: &Offsets,
    text: &str,
    escapes: Escapes,
) -> Result<StatementSummary, String> {
    let solid: Vec<&TokenWithSpan> = piece.iter().filter(|t| !is_trivia(&t.token)).collect();
    let statement = text_statement(
        "EXECUTE IMMEDIATE",
        "EXECUTE IMMEDIATE 'statement'",
        solid.get(2),
        index,
        text,
        escapes,
    )?;
    let mut facts = Facts::default();
    let mut shape = format!("EXECUTE IMMEDIATE ? {}", statement.fingerprint);
    facts.include(statement);
    let rest = solid.get(3..).unwrap_or_default();
    if let Some((using, values)) = rest.split_first() {
        if !is_word(&using.token, "using") || values.is_empty() {
            return Err("EXECUTE IMMEDIATE: expected USING after the statement text".to_owned());
        }
        // The values are read as a select of them would read.
        let space = || TokenWithSpan::wrap(Token::Whitespace(Whitespace::Space));
        let mut select = vec![TokenWithSpan::wrap(Token::make_keyword("SELECT"))];
        for token in values {
            select.extend([space(), (*token).clone()]);
        }
        walk_one(
            select,
            &mut facts,
            "EXECUTE IMMEDIATE ... USING",
            "one list of values",
        )?;
        if let Some(why) = facts.unreadable.take() {
            return Err(why);
        }
        shape.push_str(" USING ");
        shape.push_str(&token_shape(values));
    }
    Ok(summary(
        StatementKind::Prepared,
        None,
        "EXECUTE IMMEDIATE".to_owned(),
        facts,
        hash(&shape),
        own_text,
    ))
}

/// Parses `tokens` (a statement the analysis wrote for one it reads) as
/// one statement and adds what it reads, writes and calls to `facts`.
/// `what` starts an error; `expected` says what the one statement is.
fn walk_one(
    tokens: Vec<TokenWithSpan>,
    facts: &mut Facts,
    what: &str,
    expected: &str,
) -> Result<(), String> {
    let dialect = MySqlDialect {};
    let mut statements = Parser::new(&dialect)
        .with_tokens_with_locations(tokens)
        .parse_statements()
        .map_err(|e| format!("{what}: {e}"))?;
    let statement = match (statements.pop(), statements.is_empty()) {
        (Some(statement), true) => statement,
        _ => return Err(format!("{what}: expected {expected}")),
    };
    let _ = statement.visit(facts);
    Ok(())
}

/// The one statement in the string literal `source` that `PREPARE` or
/// `EXECUTE IMMEDIATE` (`what`, written as `form`) takes its statement
/// from.
fn text_statement(
    what: &str,
    form: &str,
    source: Option<&&TokenWithSpan>,
    index: &Offsets,
    text: &str,
    escapes: Escapes,
) -> Result<StatementSummary, String> {
    let inner = match source.map(|t| &t.token) {
        Some(Token::SingleQuotedString(inner) | Token::DoubleQuotedString(inner)) => inner,
        Some(Token::Word(w)) if w.quote_style.is_none() && w.value.starts_with('@') => {
            return Err(format!(
                "{what} ... @variable: the statement is in a user variable, which the \
                 agent cannot read; write {form}"
            ));
        }
        _ => {
            return Err(format!(
                "{what}: the statement must be a string literal, which the agent can read \
                 (not an expression or a variable); write {form}"
            ))
        }
    };
    let raw = match source {
        Some(token) => {
            let (start, end) = token_range(token, index)?;
            text.get(start..end).unwrap_or_default()
        }
        None => "",
    };
    if raw.contains('\\') {
        return Err(format!(
            "{what}: statement text with backslashes, whose meaning depends on sql_mode \
             NO_BACKSLASH_ESCAPES"
        ));
    }
    // The prefix tells the refusal of the inner text from one of the
    // statement itself: an executable comment inside the string is not
    // resolved (the string is data until the server prepares it).
    let mut inner = analyze_text(inner, escapes)
        .map_err(|error| format!("{what}: in the statement text: {error}"))?;
    match (inner.pop(), inner.is_empty()) {
        // What a name stands for is followed where the name is used as a
        // statement of its own, not inside a prepared one.
        (Some(statement), true) if names_something(&statement) => Err(format!(
            "{what}: {} cannot be prepared through the agent; send it as a statement of its own",
            statement.command
        )),
        (Some(statement), true) => Ok(statement),
        _ => Err(format!("{what}: the text must hold one statement")),
    }
}

// ---------------------------------------------------------------------------
// Labels.

fn label(
    statement: &Statement,
    first_word: &str,
) -> (StatementKind, String, Option<TransactionOp>) {
    use StatementKind as K;
    let plain = |kind, command: &str| (kind, command.to_owned(), None);
    let transaction = |op, command: &str| (K::Transaction, command.to_owned(), Some(op));
    match statement {
        Statement::Query(_) => plain(K::Select, "SELECT"),
        Statement::Insert(insert) if insert.replace_into => plain(K::Insert, "REPLACE"),
        Statement::Insert(_) => plain(K::Insert, "INSERT"),
        Statement::Update(_) => plain(K::Update, "UPDATE"),
        Statement::Delete(_) => plain(K::Delete, "DELETE"),
        Statement::Truncate(_) => plain(K::Truncate, "TRUNCATE TABLE"),
        Statement::CreateTable(_) => plain(K::Create, "CREATE TABLE"),
        Statement::CreateView(_) => plain(K::Create, "CREATE VIEW"),
        Statement::CreateIndex(_) => plain(K::Create, "CREATE INDEX"),
        Statement::CreateDatabase { .. } => plain(K::Create, "CREATE DATABASE"),
        Statement::CreateSchema { .. } => plain(K::Create, "CREATE SCHEMA"),
        Statement::CreateFunction(_) => plain(K::Create, "CREATE FUNCTION"),
        Statement::CreateProcedure { .. } => plain(K::Create, "CREATE PROCEDURE"),
        Statement::CreateTrigger(_) => plain(K::Create, "CREATE TRIGGER"),
        Statement::CreateRole(_) => plain(K::Create, "CREATE ROLE"),
        Statement::CreateUser(_) => plain(K::Create, "CREATE USER"),
        Statement::AlterTable(_) => plain(K::Alter, "ALTER TABLE"),
        Statement::AlterView(_) => plain(K::Alter, "ALTER VIEW"),
        Statement::AlterUser(_) => plain(K::Alter, "ALTER USER"),
        Statement::RenameTable(_) => plain(K::Alter, "RENAME TABLE"),
        Statement::Drop { object_type, .. } => (K::Drop, format!("DROP {object_type}"), None),
        Statement::DropFunction(_) => plain(K::Drop, "DROP FUNCTION"),
        Statement::DropProcedure { .. } => plain(K::Drop, "DROP PROCEDURE"),
        Statement::DropTrigger(_) => plain(K::Drop, "DROP TRIGGER"),
        Statement::Grant(_) | Statement::GrantRole(_) => plain(K::Grant, "GRANT"),
        Statement::Revoke(_) | Statement::RevokeRole(_) => plain(K::Revoke, "REVOKE"),
        Statement::StartTransaction { begin: true, .. } => {
            transaction(TransactionOp::Begin, "BEGIN")
        }
        Statement::StartTransaction { .. } => {
            transaction(TransactionOp::Begin, "START TRANSACTION")
        }
        Statement::Commit { .. } => transaction(TransactionOp::Commit, "COMMIT"),
        Statement::Rollback {
            savepoint: Some(_), ..
        } => transaction(TransactionOp::Other, "ROLLBACK TO SAVEPOINT"),
        Statement::Rollback { .. } => transaction(TransactionOp::Rollback, "ROLLBACK"),
        Statement::Savepoint { .. } => transaction(TransactionOp::Other, "SAVEPOINT"),
        Statement::ReleaseSavepoint { .. } => {
            transaction(TransactionOp::Other, "RELEASE SAVEPOINT")
        }
        Statement::Set(_) => plain(K::Set, "SET"),
        Statement::Use(_) => plain(K::Set, "USE"),
        Statement::Call(_) => plain(K::Call, "CALL"),
        Statement::Prepare { .. } => plain(K::Prepared, "PREPARE"),
        Statement::Execute { .. } => plain(K::Prepared, "EXECUTE"),
        Statement::Deallocate { .. } => plain(K::Prepared, "DEALLOCATE PREPARE"),
        Statement::Explain { .. } | Statement::ExplainTable { .. } => plain(K::Explain, "EXPLAIN"),
        Statement::LockTables { .. } => plain(K::Other, "LOCK TABLES"),
        Statement::UnlockTables => plain(K::Other, "UNLOCK TABLES"),
        other => fallback_label(other, first_word),
    }
}

/// Kind and label of the statements not named above, from the printed
/// statement: its first word gives the kind, and with CREATE, ALTER, DROP
/// and SHOW the next word joins the label.
fn fallback_label(
    statement: &Statement,
    first_word: &str,
) -> (StatementKind, String, Option<TransactionOp>) {
    use StatementKind as K;
    let printed = statement.to_string();
    let mut words = printed.split_whitespace();
    let first = words
        .next()
        .map_or_else(|| first_word.to_owned(), str::to_ascii_uppercase);
    let (kind, two) = match first.as_str() {
        "CREATE" => (K::Create, true),
        "ALTER" => (K::Alter, true),
        "DROP" => (K::Drop, true),
        "SHOW" => (K::Set, true),
        "SET" => (K::Set, false),
        _ => (K::Other, false),
    };
    let command = match words.next() {
        Some(second) if two && second.chars().all(|c| c.is_ascii_alphabetic()) => {
            format!("{first} {}", second.to_ascii_uppercase())
        }
        _ => first,
    };
    (kind, command, None)
}

// ---------------------------------------------------------------------------
// Tables, functions and flags.

fn table_ref(name: &ObjectName) -> Option<TableRef> {
    let mut parts = name.0.iter().rev().map(|part| part.as_ident());
    let table = parts.next()??;
    let schema = parts.next().flatten();
    Some(TableRef {
        schema: schema.map(|s| s.value.to_lowercase()),
        name: table.value.to_lowercase(),
    })
}

fn single_ident(name: &ObjectName) -> Option<&Ident> {
    match name.0.as_slice() {
        [only] => only.as_ident(),
        _ => None,
    }
}

/// A table of a FROM list: its name and alias.
struct Source<'a> {
    name: &'a ObjectName,
    alias: Option<&'a Ident>,
}

impl Source<'_> {
    /// Whether a qualifier (`a` of `a.x`, or `db.t`) names this source.
    fn answers_to(&self, qualifier: &[&Ident]) -> bool {
        match (qualifier, self.alias) {
            ([one], Some(alias)) => one.value.eq_ignore_ascii_case(&alias.value),
            (_, Some(_)) => false,
            (names, None) => {
                let mine: Vec<String> = self
                    .name
                    .0
                    .iter()
                    .filter_map(|p| p.as_ident().map(|i| i.value.to_lowercase()))
                    .collect();
                let theirs: Vec<String> = names.iter().map(|i| i.value.to_lowercase()).collect();
                mine.ends_with(&theirs) && !theirs.is_empty()
            }
        }
    }
}

fn sources<'a>(tables: &'a [TableWithJoins], out: &mut Vec<Source<'a>>) {
    for table in tables {
        factor_sources(&table.relation, out);
        for join in &table.joins {
            factor_sources(&join.relation, out);
        }
    }
}

fn factor_sources<'a>(factor: &'a TableFactor, out: &mut Vec<Source<'a>>) {
    match factor {
        TableFactor::Table { name, alias, .. } => out.push(Source {
            name,
            alias: alias.as_ref().map(|a| &a.name),
        }),
        TableFactor::NestedJoin {
            table_with_joins, ..
        } => sources(std::slice::from_ref(table_with_joins.as_ref()), out),
        _ => {}
    }
}

impl Facts {
    /// Counts what `statement` reads, writes, calls and flags as this
    /// statement's own.
    fn include(&mut self, statement: StatementSummary) {
        self.read.extend(statement.tables_read);
        self.written.extend(statement.tables_written);
        self.functions.extend(statement.functions);
        self.flags.include(&statement.flags);
    }

    fn target(&mut self, name: &ObjectName) {
        self.targets.insert(name);
    }

    fn write(&mut self, name: &ObjectName) {
        if let Some(table) = table_ref(name) {
            self.written.insert(table);
        }
    }

    fn read(&mut self, name: &ObjectName) {
        if let Some(table) = table_ref(name) {
            self.read.insert(table);
        }
    }

    fn function(&mut self, name: &ObjectName) {
        let parts: Vec<String> = name
            .0
            .iter()
            .filter_map(|p| p.as_ident().map(|i| i.value.to_lowercase()))
            .collect();
        let Some(bare) = parts.last() else {
            return;
        };
        if SERVER_FILE_FUNCTIONS.contains(&bare.as_str()) {
            self.flags.server_file_access = true;
        }
        self.functions.insert(parts.join("."));
    }

    /// A multi-table UPDATE modifies the tables its assignments name
    /// (`SET a.x = ...`); an unqualified column may belong to any of them.
    fn update_targets(&mut self, update: &Update) {
        self.flags.no_where |= update.selection.is_none();
        let mut list = Vec::new();
        sources(std::slice::from_ref(&update.table), &mut list);
        let mut all = list.len() == 1;
        let mut chosen = Vec::new();
        for assignment in &update.assignments {
            let columns: Vec<&ObjectName> = match &assignment.target {
                AssignmentTarget::ColumnName(name) => vec![name],
                AssignmentTarget::Tuple(names) => names.iter().collect(),
            };
            for column in columns {
                let parts: Vec<&Ident> = column.0.iter().filter_map(|p| p.as_ident()).collect();
                let qualifier = parts.split_last().map_or(&[][..], |(_, q)| q);
                let matching: Vec<usize> = (0..list.len())
                    .filter(|&n| list.get(n).is_some_and(|s| s.answers_to(qualifier)))
                    .collect();
                if qualifier.is_empty() || matching.is_empty() {
                    all = true;
                }
                chosen.extend(matching);
            }
        }
        for (n, source) in list.iter().enumerate() {
            if all || chosen.contains(&n) {
                self.targets.insert(source.name);
            }
        }
    }

    /// DELETE: `DELETE FROM t`, `DELETE t1, a FROM t1 JOIN t2 AS a ...` and
    /// `DELETE FROM t1, a USING t1 JOIN t2 AS a ...` delete from the named
    /// tables (or aliases); the others are read.
    fn delete_targets(&mut self, delete: &Delete) {
        self.flags.no_where |= delete.selection.is_none();
        let from = match &delete.from {
            FromTable::WithFromKeyword(tables) | FromTable::WithoutKeyword(tables) => tables,
        };
        let mut list = Vec::new();
        let names: Vec<&ObjectName> = if !delete.tables.is_empty() {
            sources(from, &mut list);
            delete.tables.iter().collect()
        } else if let Some(using) = &delete.using {
            sources(using, &mut list);
            let mut named = Vec::new();
            sources(from, &mut named);
            named.iter().map(|s| s.name).collect()
        } else {
            sources(from, &mut list);
            for source in &list {
                self.targets.insert(source.name);
            }
            return;
        };
        for name in names {
            let parts: Vec<&Ident> = name.0.iter().filter_map(|p| p.as_ident()).collect();
            let matching: Vec<&Source> = list.iter().filter(|s| s.answers_to(&parts)).collect();
            if matching.is_empty() {
                // Not a table of the statement (the server refuses it);
                // count the name itself.
                self.write(name);
                self.aliases.insert(name);
            } else {
                for source in matching {
                    self.targets.insert(source.name);
                }
                // The name itself (walked as a relation in the USING
                // form) is the matched one's other spelling.
                self.aliases.insert(name);
            }
        }
    }

    fn is_cte(&self, name: &ObjectName) -> bool {
        single_ident(name).is_some_and(|ident| {
            self.scopes
                .iter()
                .any(|frame| frame.names.contains(&ident.value))
        })
    }
}

impl Visitor for Facts {
    type Break = ();

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        match statement {
            Statement::Insert(insert) => {
                if let TableObject::TableName(name) = &insert.table {
                    self.target(name);
                }
            }
            Statement::Update(update) => self.update_targets(update),
            Statement::Delete(delete) => self.delete_targets(delete),
            Statement::CreateTable(create) => {
                self.target(&create.name);
                if let Some(
                    sqlparser::ast::CreateTableLikeKind::Plain(like)
                    | sqlparser::ast::CreateTableLikeKind::Parenthesized(like),
                ) = &create.like
                {
                    self.read(&like.name);
                }
            }
            Statement::CreateView(view) => self.target(&view.name),
            Statement::CreateIndex(index) => self.target(&index.table_name),
            Statement::AlterTable(alter) => self.target(&alter.name),
            Statement::AlterView(view) => self.target(&view.name),
            Statement::Truncate(truncate) => {
                for table in &truncate.table_names {
                    self.target(&table.name);
                }
            }
            Statement::Drop {
                object_type,
                names,
                table,
                ..
            } => {
                if matches!(object_type, ObjectType::Table | ObjectType::View) {
                    for name in names {
                        self.write(name);
                    }
                }
                if let Some(table) = table {
                    self.write(table);
                }
            }
            Statement::DropTrigger(drop) => {
                if let Some(table) = &drop.table_name {
                    self.write(table);
                }
            }
            Statement::RenameTable(renames) => {
                for rename in renames {
                    self.write(&rename.old_name);
                    self.write(&rename.new_name);
                }
            }
            // As for PostgreSQL's LOCK TABLE: a lock shows no rows, and
            // holds back other sessions' writes.
            Statement::LockTables { tables } => {
                for table in tables {
                    let name = ObjectName::from(vec![table.table.clone()]);
                    self.write(&name);
                }
            }
            Statement::Grant(grant) => {
                if let Some(GrantObjects::Tables(names) | GrantObjects::Views(names)) =
                    &grant.objects
                {
                    for name in names {
                        self.write(name);
                    }
                }
            }
            Statement::Revoke(revoke) => {
                if let Some(GrantObjects::Tables(names) | GrantObjects::Views(names)) =
                    &revoke.objects
                {
                    for name in names {
                        self.write(name);
                    }
                }
            }
            Statement::Call(function) => self.function(&function.name),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        let mut frame = Frame::default();
        if selects_into(&query.body) {
            self.flags.sets_user_variable = true;
        }
        // `TABLE t` (MySQL 8) names its table outside the relations the
        // visitor walks.
        let mut tables = Vec::new();
        table_bodies(&query.body, &mut tables);
        for table in tables {
            match &table.table_name {
                Some(name) => {
                    let mut parts: Vec<Ident> = table.schema_name.iter().cloned().collect();
                    parts.push(name.clone());
                    let name = ObjectName::from(parts);
                    if !self.is_cte(&name) {
                        self.read(&name);
                    }
                }
                None => self.unreadable = Some("TABLE without a table name".to_owned()),
            }
        }
        if let Some(with) = &query.with {
            self.flags.derived_tables = true;
            for cte in &with.cte_tables {
                let name = cte.alias.name.value.clone();
                if with.recursive {
                    frame.names.push(name);
                } else {
                    frame.pending.push((&*cte.query, name));
                }
            }
        }
        self.scopes.push(frame);
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        self.scopes.pop();
        // A plain WITH's CTE is visible to the CTEs after it and to the
        // query's body once its own query has been walked.
        if let Some(frame) = self.scopes.last_mut() {
            if let Some(n) = frame
                .pending
                .iter()
                .position(|(q, _)| std::ptr::eq(*q, query))
            {
                let (_, name) = frame.pending.remove(n);
                frame.names.push(name);
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        let address: *const ObjectName = relation;
        if self.targets.contains(&address) {
            self.write(relation);
        } else if self.aliases.contains(&address) || self.is_cte(relation) {
            // Another name of a relation of the statement, or a CTE.
        } else {
            self.read(relation);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Function { name, .. } => self.function(name),
            TableFactor::Derived { .. } => self.flags.derived_tables = true,
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::Function(function) => self.function(&function.name),
            Expr::BinaryOp {
                op: BinaryOperator::Assignment,
                ..
            } => self.flags.sets_user_variable = true,
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// The `TABLE name` bodies of a query body (any branch of a set operation).
fn table_bodies<'a>(body: &'a SetExpr, out: &mut Vec<&'a sqlparser::ast::Table>) {
    match body {
        SetExpr::Table(table) => out.push(table),
        SetExpr::SetOperation { left, right, .. } => {
            table_bodies(left, out);
            table_bodies(right, out);
        }
        _ => {}
    }
}

/// Whether a query body (any branch of a set operation) is a `SELECT ...
/// INTO` (a user variable, or a file, which is read apart).
fn selects_into(body: &SetExpr) -> bool {
    match body {
        SetExpr::Select(select) => select.into.is_some(),
        SetExpr::SetOperation { left, right, .. } => selects_into(left) || selects_into(right),
        _ => false,
    }
}

/// Whether an expression of `text` (one statement) may compute a value
/// from a column named in `columns` (lowercase): a word of the text, quoted
/// or not, is one of the names, or the text has a `*` other than that of
/// `COUNT(*)` (a `*` in a subquery or an expression can reach a column
/// without naming it). Text that does not tokenize may.
pub fn may_read_columns(text: &str, columns: &[&str]) -> bool {
    let dialect = MySqlDialect {};
    let Ok(tokens) = Tokenizer::new(&dialect, text).tokenize() else {
        return true;
    };
    let tokens: Vec<&Token> = tokens.iter().filter(|t| !is_trivia(t)).collect();
    tokens.iter().enumerate().any(|(i, token)| match token {
        // A double-quoted name is an identifier under ANSI_QUOTES.
        Token::Word(Word { value, .. }) | Token::DoubleQuotedString(value) => {
            columns.iter().any(|c| value.eq_ignore_ascii_case(c))
        }
        Token::Mul => {
            let count_star = i >= 2
                && matches!(tokens[i - 1], Token::LParen)
                && matches!(tokens[i - 2], Token::Word(w) if w.value.eq_ignore_ascii_case("count"))
                && matches!(tokens.get(i + 1), Some(Token::RParen));
            !count_star
        }
        _ => false,
    })
}

/// Words of statements that take values by position (`INSERT INTO t
/// VALUES (...)` names no column) or hand them to code the agent does not
/// read (`CALL`): their literals may be bound for a masked column unnamed.
const POSITIONAL_WORDS: &[&str] = &["insert", "replace", "values", "call", "load", "execute"];

/// What a reviewer may be shown of MySQL `text`, where `sensitive` holds
/// the lowercase names of masked columns. Coarser than PostgreSQL's, which
/// finds the literals that meet a masked column: here every literal is
/// hidden when the text may reach a masked column ([`may_read_columns`]:
/// it names one, or has a `*`) or takes values by position
/// ([`POSITIONAL_WORDS`]). Text that does not tokenize, or whose strings
/// hold backslashes while the server may read them as escapes, is withheld.
pub fn shown_to_reviewer(
    text: &str,
    escapes: Escapes,
    sensitive: &HashSet<String>,
) -> super::Shown {
    use super::Shown;
    if sensitive.is_empty() {
        return Shown::AsSent;
    }
    let dialect = MySqlDialect {};
    let Ok(tokens) = Tokenizer::new(&dialect, text).tokenize_with_location() else {
        return Shown::Withheld;
    };
    let names: Vec<&str> = sensitive.iter().map(String::as_str).collect();
    let positional = tokens.iter().any(|t| {
        matches!(&t.token, Token::Word(w) if w.quote_style.is_none()
            && POSITIONAL_WORDS.iter().any(|p| w.value.eq_ignore_ascii_case(p)))
    });
    if !positional && !may_read_columns(text, &names) {
        return Shown::AsSent;
    }
    let index = Offsets::new(text);
    let mut out = String::with_capacity(text.len());
    let mut values = Vec::new();
    let mut copied = 0;
    for token in &tokens {
        let literal = match &token.token {
            Token::Number(..) => true,
            // Backquoted names are not literals; every quoted string is.
            Token::Word(_) | Token::Whitespace(_) | Token::EOF => false,
            other => other.to_string().contains(['\'', '"']),
        };
        if !literal {
            continue;
        }
        let Ok((start, end)) = token_range(token, &index) else {
            return Shown::Withheld;
        };
        let Some(slice) = text.get(start..end) else {
            return Shown::Withheld;
        };
        if escapes != Escapes::NoBackslash && slice.contains('\\') {
            return Shown::Withheld;
        }
        let Some(before) = text.get(copied..start) else {
            return Shown::Withheld;
        };
        out.push_str(before);
        out.push_str(super::HIDDEN_LITERAL);
        values.push(unquoted(slice));
        copied = end;
    }
    if values.is_empty() {
        return Shown::AsSent;
    }
    out.push_str(text.get(copied..).unwrap_or_default());
    Shown::Hidden {
        text: out,
        literals: values.len(),
        values,
    }
}

/// A literal's value without its prefix and quotes: `N'a''b'` gives `a'b`,
/// `x'41'` gives `41`, `5` stays.
fn unquoted(literal: &str) -> String {
    let body = literal.trim_start_matches(|c: char| c.is_ascii_alphabetic());
    for quote in ['\'', '"'] {
        if let Some(inner) = body.strip_prefix(quote).and_then(|b| b.strip_suffix(quote)) {
            return inner.replace(&format!("{quote}{quote}"), &quote.to_string());
        }
    }
    literal.to_owned()
}

/// The database a `USE db` statement switches to (lowercased, as table
/// names are); `None` for any other statement.
pub fn used_database(statement_text: &str) -> Option<String> {
    let dialect = MySqlDialect {};
    let mut statements = Parser::parse_sql(&dialect, statement_text).ok()?;
    match (statements.pop(), statements.is_empty()) {
        (Some(Statement::Use(sqlparser::ast::Use::Object(name))), true) => {
            single_ident(&name).map(|ident| ident.value.to_lowercase())
        }
        _ => None,
    }
}

/// Whether a statement of `analysis` names a table without its database.
pub fn has_unqualified_tables(analysis: &Analysis) -> bool {
    match analysis {
        Analysis::Parsed { statements } => statements.iter().any(|s| {
            s.tables_read
                .iter()
                .chain(&s.tables_written)
                .any(|t| t.schema.is_none())
        }),
        Analysis::Unparsable { .. } => false,
    }
}

/// `analysis` with every table named without its database given the
/// server's current database, which is the table's (a table's schema is
/// its database): `current` for the first statements, and after a `USE` of
/// the same text, the database it switches to. With `keep_unqualified` the
/// name without a database stays too, so that a later call qualifies it
/// again (a prepared statement, for the database current at each
/// execution). `None` when no table needs it.
pub fn in_database(
    analysis: &Analysis,
    current: Option<&str>,
    keep_unqualified: bool,
) -> Option<Analysis> {
    if !has_unqualified_tables(analysis) {
        return None;
    }
    let Analysis::Parsed { statements } = analysis else {
        return None;
    };
    if current.is_none() && !statements.iter().any(|s| &*s.command == "USE") {
        return None;
    }
    let qualify = |tables: &[TableRef], database: Option<&str>| {
        let mut out: Vec<TableRef> = Vec::with_capacity(tables.len() * 2);
        for t in tables {
            match (&t.schema, database) {
                (None, Some(database)) => {
                    if keep_unqualified {
                        out.push(t.clone());
                    }
                    out.push(TableRef {
                        schema: Some(database.to_owned()),
                        name: t.name.clone(),
                    });
                }
                _ => out.push(t.clone()),
            }
        }
        out.sort();
        out.dedup();
        out
    };
    let mut database = current.map(str::to_owned);
    let mut qualified = Vec::with_capacity(statements.len());
    for s in statements {
        qualified.push(StatementSummary {
            tables_read: qualify(&s.tables_read, database.as_deref()),
            tables_written: qualify(&s.tables_written, database.as_deref()),
            ..s.clone()
        });
        if &*s.command == "USE" {
            if let Some(used) = used_database(&s.text) {
                database = Some(used);
            }
        }
    }
    Some(Analysis::Parsed {
        statements: qualified,
    })
}

/// A protocol command that is not a statement (`COM_BINLOG_DUMP`) as a
/// summary the policy decides: kind `other`, the command's name as its
/// command label and its text, nothing read or written.
pub fn command_summary(command: &str) -> Analysis {
    Analysis::Parsed {
        statements: vec![summary(
            StatementKind::Other,
            None,
            command.to_owned(),
            Facts::default(),
            hash(command),
            command,
        )],
    }
}

/// The connection id a `KILL [CONNECTION | QUERY] id` statement names
/// (`None` for any other statement, and for MariaDB's `KILL USER` and
/// `KILL QUERY ID`, which name no connection).
pub fn kill_target(statement_text: &str) -> Option<u64> {
    let dialect = MySqlDialect {};
    let mut statements = Parser::parse_sql(&dialect, statement_text).ok()?;
    match (statements.pop(), statements.is_empty()) {
        (Some(Statement::Kill { id, .. }), true) => Some(id),
        _ => None,
    }
}

/// What a statement does to the character set the server reads the
/// client's text in (`character_set_client`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CharsetChange {
    /// Sets it to a character set whose multi-byte characters never hold
    /// an ASCII byte (`SET NAMES utf8mb4`).
    Safe,
    /// Sets it to one of `unsafe_names` (big5, cp932, gbk, gb18030, sjis).
    Unsafe(String),
    /// Changes it, or may, to something not read here (a variable, an
    /// expression, `DEFAULT`, several assignments).
    Unknown,
}

/// Character sets a client may read text in whose multi-byte characters
/// hold no ASCII byte.
const SAFE_CLIENT_CHARSETS: &[&str] = &[
    "utf8mb4", "utf8mb3", "utf8", "latin1", "latin2", "ascii", "binary", "cp1250", "cp1251",
    "cp1252", "cp1256", "cp1257", "koi8r", "koi8u", "greek", "hebrew", "latin5", "latin7", "euckr",
    "ujis", "eucjpms", "gb2312",
];

/// What one statement (its own text) does to `character_set_client`, if
/// it touches it: `SET NAMES`, `SET CHARACTER SET`, `SET CHARSET`, an
/// assignment to `character_set_client`. Only the plain forms with one
/// character set named are read as [`CharsetChange::Safe`]; a statement
/// naming one of `unsafe_names` anywhere is [`CharsetChange::Unsafe`]; any
/// other that touches it is [`CharsetChange::Unknown`].
pub fn client_charset_change(statement_text: &str, unsafe_names: &[&str]) -> Option<CharsetChange> {
    let dialect = MySqlDialect {};
    let Ok(tokens) = Tokenizer::new(&dialect, statement_text).tokenize() else {
        return Some(CharsetChange::Unknown);
    };
    let solid: Vec<&Token> = tokens.iter().filter(|t| !is_trivia(t)).collect();
    let word = |t: &Token| match t {
        Token::Word(w) => Some(w.value.to_ascii_lowercase()),
        Token::SingleQuotedString(v) | Token::DoubleQuotedString(v) => Some(v.to_ascii_lowercase()),
        _ => None,
    };
    let words: Vec<Option<String>> = solid.iter().map(|t| word(t)).collect();
    let is = |i: usize, w: &str| words.get(i).and_then(|x| x.as_deref()) == Some(w);
    // Only SET changes it, and only names (not strings) say what.
    let names: Vec<Option<String>> = solid
        .iter()
        .map(|t| match t {
            Token::Word(w) => Some(w.value.to_ascii_lowercase()),
            _ => None,
        })
        .collect();
    if names.first().and_then(|w| w.as_deref()) != Some("set") {
        return None;
    }
    let touches = names.iter().enumerate().any(|(i, w)| match w.as_deref() {
        Some("names" | "charset" | "character_set_client") => true,
        Some("character") => is(i + 1, "set"),
        Some(w) => w.ends_with(".character_set_client") || w.ends_with("@character_set_client"),
        None => false,
    });
    if !touches {
        return None;
    }
    if let Some(name) = words
        .iter()
        .flatten()
        .find(|w| unsafe_names.iter().any(|u| w.starts_with(u)))
    {
        return Some(CharsetChange::Unsafe(name.clone()));
    }
    // The plain forms: SET NAMES x [COLLATE y], SET CHARACTER SET x,
    // SET CHARSET x, SET [SESSION] character_set_client = x.
    let safe = |i: usize| {
        words
            .get(i)
            .and_then(|w| w.as_deref())
            .is_some_and(|w| SAFE_CLIENT_CHARSETS.contains(&w))
    };
    let n = solid.len();
    let plain = is(0, "set")
        && match () {
            _ if is(1, "names") => {
                safe(2) && (n == 3 || (n == 5 && is(3, "collate") && words[4].is_some()))
            }
            _ if is(1, "character") && is(2, "set") => n == 4 && safe(3),
            _ if is(1, "charset") => n == 3 && safe(2),
            _ if is(1, "character_set_client") => {
                n == 4 && matches!(solid[2], Token::Eq) && safe(3)
            }
            _ if is(1, "session") && is(2, "character_set_client") => {
                n == 5 && matches!(solid[3], Token::Eq) && safe(4)
            }
            _ => false,
        };
    Some(if plain {
        CharsetChange::Safe
    } else {
        CharsetChange::Unknown
    })
}

/// The file a `LOAD DATA LOCAL INFILE 'file'` (or `LOAD XML LOCAL`)
/// statement reads on the client's side, as written; `None` for any other
/// statement.
pub fn local_infile(statement_text: &str) -> Option<String> {
    let dialect = MySqlDialect {};
    let tokens = Tokenizer::new(&dialect, statement_text).tokenize().ok()?;
    let solid: Vec<&Token> = tokens.iter().filter(|t| !is_trivia(t)).collect();
    if !(solid.first().is_some_and(|t| is_word(t, "load"))
        && solid
            .get(1)
            .is_some_and(|t| is_word(t, "data") || is_word(t, "xml")))
    {
        return None;
    }
    let mut k = 2;
    while solid
        .get(k)
        .is_some_and(|t| is_word(t, "low_priority") || is_word(t, "concurrent"))
    {
        k += 1;
    }
    if !(solid.get(k).is_some_and(|t| is_word(t, "local"))
        && solid.get(k + 1).is_some_and(|t| is_word(t, "infile")))
    {
        return None;
    }
    match solid.get(k + 2) {
        Some(Token::SingleQuotedString(name) | Token::DoubleQuotedString(name)) => {
            Some(name.clone())
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Fingerprint.

/// Replaces every literal with a placeholder.
struct Blank;

impl VisitorMut for Blank {
    type Break = ();

    fn pre_visit_value(&mut self, value: &mut ValueWithSpan) -> ControlFlow<()> {
        value.value = Value::Placeholder("?".to_owned());
        ControlFlow::Continue(())
    }
}

/// The statement's fingerprint: every literal replaced by `?`, the
/// statement printed (with `markers` for clauses read apart from the
/// parser, such as INTO OUTFILE), and the first 16 hex digits of the
/// SHA-256 of that text. Statements that differ only in literal values
/// (numbers, strings, booleans, NULL) share it; a different table, column,
/// function, operator or clause changes it.
fn fingerprint(statement: &Statement, markers: &str) -> String {
    let mut blank = statement.clone();
    let _ = VisitMut::visit(&mut blank, &mut Blank);
    hash(&format!("{blank}{markers}"))
}

/// A statement's tokens with literals as `?`, for the statements read from
/// the tokens.
fn token_shape(tokens: &[&TokenWithSpan]) -> String {
    let mut shape = String::new();
    for token in tokens {
        match &token.token {
            Token::Number(..) => shape.push('?'),
            t if is_string(t) => shape.push('?'),
            t => {
                let _ = write!(shape, "{t}");
            }
        }
        shape.push(' ');
    }
    shape
}

fn hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut hex = String::with_capacity(16);
    for byte in digest.iter().take(8) {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

#[cfg(test)]
#[path = "mysql/tests.rs"]
mod tests;
