//! What single statements do to a session's own state, read from their
//! parse trees: the named prepared statements a `PREPARE`, `EXECUTE` or
//! `DEALLOCATE` touches, the statement a `PREPARE` prepares, and whether a
//! statement may change how the server reads later text. Protocol code asks
//! here rather than parse text itself, so that every parse of SQL goes
//! through this module.

use pg_query::NodeEnum;

/// What a SQL statement does to the named prepared statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlOp {
    /// `PREPARE name AS ...`.
    Prepare(Vec<u8>),
    /// `EXECUTE name`, alone or under `EXPLAIN` or `CREATE TABLE ... AS`.
    Execute(Vec<u8>),
    /// `DEALLOCATE name`.
    Deallocate(Vec<u8>),
    /// `DEALLOCATE ALL`.
    DeallocateAll,
}

/// Settings that change how the server reads statement text.
/// (`backslash_quote` only makes the server reject `\'`, and only matters
/// where backslashes are escapes, but it is read the same way here.)
pub const READING_SETTINGS: &[&str] = &[
    "standard_conforming_strings",
    "client_encoding",
    "backslash_quote",
];

/// The first statement of `text`'s parse tree, if it parses.
fn first_statement(text: &str) -> Result<Option<NodeEnum>, ()> {
    let parsed = pg_query::parse(text, 0).map_err(|_| ())?;
    Ok(parsed
        .protobuf
        .stmts
        .into_iter()
        .next()
        .and_then(|s| s.stmt)
        .and_then(|s| s.node))
}

/// The operation of one statement's text on named prepared statements
/// (names folded as the server folds them).
pub fn sql_op(text: &str) -> Option<SqlOp> {
    match first_statement(text).ok()?? {
        NodeEnum::PrepareStmt(s) => Some(SqlOp::Prepare(s.name.into_bytes())),
        NodeEnum::DeallocateStmt(s) if s.isall || s.name.is_empty() => Some(SqlOp::DeallocateAll),
        NodeEnum::DeallocateStmt(s) => Some(SqlOp::Deallocate(s.name.into_bytes())),
        other => executed(&other).map(SqlOp::Execute),
    }
}

/// The statement name an `EXECUTE` (possibly under `EXPLAIN` and
/// `CREATE TABLE ... AS`, which the grammar nests at most that deep) runs.
fn executed(node: &NodeEnum) -> Option<Vec<u8>> {
    let inner = |query: Option<&pg_query::protobuf::Node>| query?.node.as_ref().and_then(executed);
    match node {
        NodeEnum::ExecuteStmt(s) => Some(s.name.as_bytes().to_vec()),
        NodeEnum::ExplainStmt(s) => inner(s.query.as_deref()),
        NodeEnum::CreateTableAsStmt(s) => inner(s.query.as_deref()),
        _ => None,
    }
}

/// The statement a `PREPARE name [(types)] AS statement` prepares, as a
/// slice of its text (what follows the `AS` outside the parentheses of the
/// parameter types). `None` when the text is not read that way.
pub fn prepared_query_text(prepare: &str) -> Option<&str> {
    use pg_query::protobuf::Token;
    let tokens = pg_query::scan(prepare).ok()?.tokens;
    if tokens.first()?.token != Token::Prepare as i32 {
        return None;
    }
    let mut depth = 0usize;
    for token in &tokens {
        match Token::try_from(token.token) {
            Ok(Token::Ascii40) => depth = depth.saturating_add(1),
            Ok(Token::Ascii41) => depth = depth.saturating_sub(1),
            Ok(Token::As) if depth == 0 => {
                let end = usize::try_from(token.end).ok()?;
                let rest = prepare.get(end..)?.trim();
                return (!rest.is_empty()).then_some(rest);
            }
            _ => {}
        }
    }
    None
}

/// Whether a statement's text is a `SET`/`RESET` of a reading setting,
/// `RESET ALL`, `DISCARD ALL` or an `EXECUTE` (which runs a statement that
/// may be any of these); text that does not parse alone counts as one.
pub fn changes_reading_setting(text: &str) -> bool {
    let Ok(node) = first_statement(text) else {
        return true;
    };
    match node {
        Some(NodeEnum::VariableSetStmt(s)) => {
            use pg_query::protobuf::VariableSetKind;
            matches!(
                VariableSetKind::try_from(s.kind),
                Ok(VariableSetKind::VarResetAll)
            ) || READING_SETTINGS.contains(&s.name.to_lowercase().as_str())
        }
        Some(NodeEnum::DiscardStmt(s)) => {
            use pg_query::protobuf::DiscardMode;
            matches!(DiscardMode::try_from(s.target), Ok(DiscardMode::DiscardAll))
        }
        Some(NodeEnum::ExecuteStmt(_)) => true,
        _ => false,
    }
}
