//! Names a MySQL session gives to what it opens for later statements: a
//! `HANDLER`'s and a prepared statement's. A later statement that uses
//! such a name reads what the name was given to, which its own text does
//! not say; the session follows the names (`protocol/mysql/names.rs`).

use sqlparser::dialect::MySqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer};

use super::{is_trivia, is_word};
use crate::sql::{StatementKind, StatementSummary};

/// What a statement does with a session-level name. The server compares
/// both kinds of name without regard to case; they are lowercased here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameUse {
    /// `HANDLER table OPEN [[AS] alias]`: the alias, else the table's name.
    OpenHandler(String),
    /// `HANDLER name READ ...`.
    ReadHandler(String),
    /// `HANDLER name CLOSE`.
    CloseHandler(String),
    /// `PREPARE name FROM 'text'`.
    Prepare(String),
    /// `EXECUTE name [USING ...]`.
    Execute(String),
    /// `DEALLOCATE PREPARE name`.
    Deallocate(String),
}

impl NameUse {
    /// The name used.
    pub fn name(&self) -> &str {
        match self {
            NameUse::OpenHandler(name)
            | NameUse::ReadHandler(name)
            | NameUse::CloseHandler(name)
            | NameUse::Prepare(name)
            | NameUse::Execute(name)
            | NameUse::Deallocate(name) => name,
        }
    }
}

/// Whether an analysed statement opens, uses or drops a session-level
/// name (its command label says so).
pub fn names_something(statement: &StatementSummary) -> bool {
    // The kind first: it rules out every statement of the common kinds.
    matches!(
        statement.kind,
        StatementKind::Other | StatementKind::Prepared
    ) && matches!(
        &*statement.command,
        "HANDLER OPEN"
            | "HANDLER READ"
            | "HANDLER CLOSE"
            | "PREPARE"
            | "EXECUTE"
            | "DEALLOCATE PREPARE"
    )
}

/// The session-level name an analysed statement opens, uses or drops, if
/// any (read from its own text).
pub fn name_use(statement: &StatementSummary) -> Option<NameUse> {
    if !names_something(statement) {
        return None;
    }
    let command = &*statement.command;
    let dialect = MySqlDialect {};
    let tokens = Tokenizer::new(&dialect, &statement.text).tokenize().ok()?;
    let solid: Vec<&Token> = tokens.iter().filter(|t| !is_trivia(t)).collect();
    let word = |k: usize| match solid.get(k) {
        Some(Token::Word(w)) => Some(w.value.to_lowercase()),
        // A name in double quotes (sql_mode ANSI_QUOTES).
        Some(Token::DoubleQuotedString(name)) => Some(name.to_lowercase()),
        _ => None,
    };
    match command {
        "HANDLER OPEN" | "HANDLER READ" | "HANDLER CLOSE" => {
            // HANDLER name [. name] verb ...
            let qualified = solid.get(2) == Some(&&Token::Period);
            let (table, verb) = if qualified {
                (word(3)?, 4)
            } else {
                (word(1)?, 2)
            };
            match command {
                "HANDLER OPEN" => {
                    let alias = match solid.get(verb + 1) {
                        Some(t) if is_word(t, "as") => word(verb + 2),
                        Some(_) => word(verb + 1),
                        None => None,
                    };
                    Some(NameUse::OpenHandler(alias.unwrap_or(table)))
                }
                "HANDLER READ" => Some(NameUse::ReadHandler(table)),
                _ => Some(NameUse::CloseHandler(table)),
            }
        }
        "PREPARE" => word(1).map(NameUse::Prepare),
        "EXECUTE" => word(1).map(NameUse::Execute),
        _ => word(2).map(NameUse::Deallocate),
    }
}
