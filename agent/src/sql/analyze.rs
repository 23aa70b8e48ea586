//! [`analyze`]: SQL text in, one [`StatementSummary`] per statement out.
//!
//! The cheap path does everything from `pg_query::summary` (one raw parse and
//! a walk in C, no parse tree crossing into Rust) plus `pg_query::fingerprint`.
//! The scanner's tokens (`pg_query::scan_tokens`, no protobuf) fill two gaps
//! of the summary's walk cheaply: whether a top-level UPDATE or DELETE has a
//! WHERE, and the RETURNING lists and cursor queries the walk does not enter
//! (each summarised on its own). The full tree (`pg_query::parse`, several
//! times dearer) is built only where a field decides: COPY (direction,
//! PROGRAM, file), MERGE (its source), DROP / GRANT / transaction / SET /
//! EXPLAIN and other utility statements whose label depends on a field, and
//! statements with an UPDATE, DELETE or MERGE under WITH, EXPLAIN or PREPARE.

use std::collections::BTreeSet;
use std::sync::Arc;

use pg_query::protobuf::summary_result::Context;
use pg_query::protobuf::{self, ScanToken, Token, TransactionStmtKind, VariableSetKind};
use pg_query::{FingerprintOptions, Node, NodeEnum, SummaryResult};

use super::labels::{self, Class};
use super::{Analysis, StatementFlags, StatementKind, StatementSummary, TableRef, TransactionOp};

/// Functions that read or write files on the database server, list its
/// directories, or move large objects to and from its file system. Matched
/// on the bare (unqualified, lowercased) name.
const SERVER_FILE_FUNCTIONS: &[&str] = &[
    "pg_read_file",
    "pg_read_binary_file",
    "pg_stat_file",
    "pg_ls_dir",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_ls_logicalsnapdir",
    "pg_ls_logicalmapdir",
    "pg_ls_replslotdir",
    "lo_import",
    "lo_export",
    // adminpack
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "pg_file_sync",
    "pg_logdir_ls",
];

/// Functions that change server configuration.
const CONFIG_FUNCTIONS: &[&str] = &["set_config", "pg_reload_conf"];

/// Analyses SQL text: one summary per statement, in order.
///
/// The text must already be UTF-8: the protocol layer converts it from the
/// client encoding (`client_encoding` from the startup packet or a later
/// `SET`) before calling this; byte offsets and names here are those of the
/// UTF-8 text.
///
/// Text that does not parse gives [`Analysis::Unparsable`] with the parser's
/// message; empty text, or text of only whitespace, comments and semicolons,
/// gives [`Analysis::Parsed`] with no statements. Malformed input gives an
/// error, not a panic (tested on every prefix and on mutations of tricky
/// statements).
pub fn analyze(sql: &str) -> Analysis {
    match analyze_text(sql) {
        Ok(statements) => Analysis::Parsed { statements },
        Err(error) => Analysis::Unparsable { error },
    }
}

fn analyze_text(sql: &str) -> Result<Vec<StatementSummary>, String> {
    // PostgreSQL separates statements with `;`: text without one (apart from
    // trailing ones) holds at most one statement, and the split, a raw parse
    // of its own, can be skipped.
    let body = sql.trim_end_matches(|c: char| c == ';' || c.is_ascii_whitespace());
    if !body.as_bytes().contains(&b';') {
        return Ok(analyze_statement(sql)?
            .map(|mut statement| {
                statement.text = single_statement_text(sql).to_owned();
                statement
            })
            .into_iter()
            .collect());
    }
    let pieces = pg_query::split_with_parser(sql).map_err(error_message)?;
    let mut statements = Vec::with_capacity(pieces.len());
    for piece in pieces {
        statements.extend(analyze_statement(piece)?);
    }
    Ok(statements)
}

/// Analyses text holding at most one statement (`None` when it holds none).
fn analyze_statement(sql: &str) -> Result<Option<StatementSummary>, String> {
    let summary = pg_query::summary(sql, 0, -1).map_err(error_message)?;
    // Statement types come in walk order, the top-level statement first.
    let Some(top) = summary.statement_types.first() else {
        return Ok(None);
    };
    let fingerprint = pg_query::fingerprint(sql, 0, fingerprint_options())
        .map_err(error_message)?
        .hex;

    let mut facts = Facts::new(summary.cte_names.clone());
    facts.add_summary(&summary, false);
    let mut need_tree = false;
    let (mut kind, mut command) = match labels::classify(top) {
        Class::Fixed(kind, label) => (kind, label.to_owned()),
        Class::Tree => {
            need_tree = true;
            (StatementKind::Other, String::new())
        }
        Class::Unknown => labels::fallback(top),
    };
    let mut transaction = None;

    // An UPDATE, DELETE or MERGE below the top (under WITH, EXPLAIN,
    // PREPARE, COPY) needs the tree for its WHERE or its source.
    need_tree |= summary
        .statement_types
        .iter()
        .skip(1)
        .any(|t| matches!(t.as_str(), "UpdateStmt" | "DeleteStmt" | "MergeStmt"));
    let mut tokens = Tokens::new(sql);
    match top.as_str() {
        "SelectStmt" if has_context(&summary, Context::Ddl) => {
            // The only DDL target a SELECT has is its INTO table.
            kind = StatementKind::Create;
            command = "SELECT INTO".to_owned();
        }
        "UpdateStmt" | "DeleteStmt" => {
            let scanned = tokens.get()?;
            if has_with(scanned) {
                // A WITH query may hold another UPDATE or DELETE.
                need_tree = true;
            } else {
                facts.flags.no_where = !has_top_level_where(scanned);
            }
        }
        "AlterSystemStmt" | "AlterRoleSetStmt" | "AlterDatabaseSetStmt" => {
            facts.flags.config_change = true;
        }
        // A row-level security policy's table is in the tree only.
        "CreatePolicyStmt" | "AlterPolicyStmt" => need_tree = true,
        // LOAD reads a shared library from the server's file system.
        "LoadStmt" => facts.flags.server_file_access = true,
        _ => {}
    }

    // The summary does not look inside a cursor's query (also under EXPLAIN).
    if summary
        .statement_types
        .iter()
        .any(|t| t == "DeclareCursorStmt")
    {
        if let Some(query) = cursor_query(sql, tokens.get()?) {
            if let Some(inner) = analyze_statement(query)? {
                facts.add_statement(inner);
            }
        }
    }

    // The summary does not look inside RETURNING lists: summarise each one
    // that could call a function or hold a subquery as a SELECT list.
    let modifies = summary.statement_types.iter().any(|t| {
        matches!(
            t.as_str(),
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt"
        )
    });
    if modifies && contains_ignore_ascii_case(sql, "returning") {
        for list in returning_lists(sql, tokens.get()?) {
            let select = format!("SELECT {list}");
            let returning = pg_query::summary(&select, 0, -1)
                .map_err(|e| format!("cannot analyse RETURNING list: {}", error_message(e)))?;
            facts.add_summary(&returning, true);
        }
    }

    if need_tree {
        let parsed = pg_query::parse(sql, 0).map_err(error_message)?;
        let node = parsed
            .protobuf
            .stmts
            .first()
            .and_then(|raw| raw.stmt.as_deref())
            .and_then(|node| node.node.as_ref());
        if let Some(node) = node {
            if let Some(label) = tree_label(node) {
                kind = label.kind;
                command = label.command;
                transaction = label.transaction;
            }
            facts.visit(node);
        }
    }
    if command.is_empty() {
        (kind, command) = labels::fallback(top);
    }

    Ok(Some(StatementSummary {
        kind,
        transaction,
        command: Arc::from(command),
        tables_read: facts.read.into_iter().collect(),
        tables_written: facts.written.into_iter().collect(),
        functions: facts.functions.into_iter().collect(),
        flags: facts.flags,
        fingerprint: Arc::from(fingerprint),
        text: statement_text(sql).to_owned(),
    }))
}

/// Fingerprint options: relation names count in full, with their schema and
/// without their alias, so that a fingerprint approved for
/// `DELETE FROM staging.users u WHERE id = $1` does not also cover
/// `prod.users` or another table aliased `u` (pg_query's default, following
/// PostgreSQL 18's query id, ignores schemas, digit runs and aliased names).
fn fingerprint_options() -> FingerprintOptions {
    FingerprintOptions::RANGEVAR_PG17_COMPAT | FingerprintOptions::FULL_RELNAME
}

fn has_context(summary: &SummaryResult, context: Context) -> bool {
    summary.tables.iter().any(|t| t.context == context)
}

/// What one statement touches, gathered from the summary and, when built,
/// the tree.
struct Facts {
    read: BTreeSet<TableRef>,
    written: BTreeSet<TableRef>,
    functions: BTreeSet<String>,
    flags: StatementFlags,
    /// The statement's CTE names: unqualified names read under these are
    /// not tables.
    cte_names: Vec<String>,
}

impl Facts {
    fn new(cte_names: Vec<String>) -> Self {
        Facts {
            read: BTreeSet::new(),
            written: BTreeSet::new(),
            functions: BTreeSet::new(),
            flags: StatementFlags::default(),
            cte_names,
        }
    }

    fn is_cte(&self, schema: &str, name: &str) -> bool {
        schema.is_empty() && self.cte_names.iter().any(|c| c == name)
    }

    /// Adds the tables and function calls of a summary; `part` when it
    /// summarises a part of the statement (a RETURNING list), which does
    /// not know the statement's CTE names.
    fn add_summary(&mut self, summary: &SummaryResult, part: bool) {
        for table in &summary.tables {
            let table_ref = TableRef {
                schema: non_empty(&table.schema_name),
                name: table.table_name.clone(),
            };
            match table.context {
                Context::Dml | Context::Ddl => {
                    self.written.insert(table_ref);
                }
                Context::Select | Context::Call | Context::None => {
                    if !(part && self.is_cte(&table.schema_name, &table.table_name)) {
                        self.read.insert(table_ref);
                    }
                }
            }
        }
        for function in &summary.functions {
            if function.context != Context::Call {
                continue;
            }
            let bare = function.function_name.to_lowercase();
            if SERVER_FILE_FUNCTIONS.contains(&bare.as_str()) {
                self.flags.server_file_access = true;
            }
            if CONFIG_FUNCTIONS.contains(&bare.as_str()) {
                self.flags.config_change = true;
            }
            let name = match &function.schema_name {
                Some(schema) => format!("{}.{bare}", schema.to_lowercase()),
                None => bare,
            };
            self.functions.insert(name);
        }
    }

    /// Adds what an inner statement (a cursor's query) touches.
    fn add_statement(&mut self, inner: StatementSummary) {
        self.read.extend(inner.tables_read);
        self.written.extend(inner.tables_written);
        self.functions.extend(inner.functions);
        let (flags, more) = (&mut self.flags, inner.flags);
        flags.no_where |= more.no_where;
        flags.copy_program |= more.copy_program;
        flags.copy_server_file |= more.copy_server_file;
        flags.server_file_access |= more.server_file_access;
        flags.config_change |= more.config_change;
    }

    /// Visits a statement and the statements it contains or executes (WITH
    /// queries, EXPLAIN and PREPARE targets, COPY queries),
    /// adding what the summary does not tell. Recursion depth is bounded by
    /// the protobuf decoder's nesting limit.
    fn visit(&mut self, node: &NodeEnum) {
        match node {
            NodeEnum::UpdateStmt(s) => {
                self.flags.no_where |= s.where_clause.is_none();
                self.visit_with(s.with_clause.as_ref());
            }
            NodeEnum::DeleteStmt(s) => {
                self.flags.no_where |= s.where_clause.is_none();
                self.visit_with(s.with_clause.as_ref());
            }
            NodeEnum::MergeStmt(s) => {
                // The summary records only the target; a plain or joined
                // source relation is read.
                if let Some(source) = s.source_relation.as_deref() {
                    self.read_relations(source);
                }
                self.visit_with(s.with_clause.as_ref());
            }
            NodeEnum::SelectStmt(s) => self.visit_select(s),
            NodeEnum::InsertStmt(s) => {
                self.visit_with(s.with_clause.as_ref());
                self.visit_opt(s.select_stmt.as_deref());
            }
            NodeEnum::ExplainStmt(s) => self.visit_opt(s.query.as_deref()),
            NodeEnum::PrepareStmt(s) => self.visit_opt(s.query.as_deref()),
            NodeEnum::CreateTableAsStmt(s) => self.visit_opt(s.query.as_deref()),
            NodeEnum::CopyStmt(s) => {
                self.flags.copy_program |= s.is_program;
                self.flags.copy_server_file |= !s.is_program && !s.filename.is_empty();
                if let Some(relation) = &s.relation {
                    // The summary files a COPY's table as read either way.
                    let table = table_ref(relation);
                    if s.is_from {
                        self.read.remove(&table);
                        self.written.insert(table);
                    } else {
                        self.read.insert(table);
                    }
                }
                self.visit_opt(s.query.as_deref());
            }
            NodeEnum::DropStmt(s) if labels::is_relation_type(s.remove_type) => {
                for object in &s.objects {
                    if let Some(NodeEnum::List(list)) = &object.node {
                        if let Some(table) = table_from_names(&list.items) {
                            self.written.insert(table);
                        }
                    }
                }
            }
            // `DROP POLICY p ON t`: the name list ends with the policy's.
            NodeEnum::DropStmt(s) if s.remove_type == protobuf::ObjectType::ObjectPolicy as i32 => {
                for object in &s.objects {
                    if let Some(NodeEnum::List(list)) = &object.node {
                        let table = list.items.split_last().map(|(_, table)| table);
                        if let Some(table) = table.and_then(table_from_names) {
                            self.written.insert(table);
                        }
                    }
                }
            }
            NodeEnum::CreatePolicyStmt(s) => {
                if let Some(relation) = &s.table {
                    self.written.insert(table_ref(relation));
                }
            }
            NodeEnum::AlterPolicyStmt(s) => {
                if let Some(relation) = &s.table {
                    self.written.insert(table_ref(relation));
                }
            }
            // Renaming a column, constraint or trigger, or moving a relation
            // to another schema, alters the relation.
            NodeEnum::RenameStmt(s) => {
                if let Some(relation) = &s.relation {
                    self.written.insert(table_ref(relation));
                }
            }
            NodeEnum::AlterObjectSchemaStmt(s) => {
                if let Some(relation) = &s.relation {
                    self.written.insert(table_ref(relation));
                }
            }
            _ => {}
        }
    }

    fn visit_select(&mut self, select: &protobuf::SelectStmt) {
        self.visit_with(select.with_clause.as_ref());
        for arm in [&select.larg, &select.rarg].into_iter().flatten() {
            self.visit_select(arm);
        }
    }

    fn visit_opt(&mut self, node: Option<&Node>) {
        if let Some(node) = node.and_then(|n| n.node.as_ref()) {
            self.visit(node);
        }
    }

    fn visit_with(&mut self, with: Option<&protobuf::WithClause>) {
        for cte in with.into_iter().flat_map(|w| &w.ctes) {
            if let Some(NodeEnum::CommonTableExpr(cte)) = &cte.node {
                self.visit_opt(cte.ctequery.as_deref());
            }
        }
    }

    /// Records the relations of a FROM-list item as read: plain names and
    /// both sides of joins (subqueries are in the summary already).
    fn read_relations(&mut self, node: &Node) {
        match &node.node {
            Some(NodeEnum::RangeVar(relation))
                if !self.is_cte(&relation.schemaname, &relation.relname) =>
            {
                self.read.insert(table_ref(relation));
            }
            Some(NodeEnum::JoinExpr(join)) => {
                for side in [&join.larg, &join.rarg].into_iter().flatten() {
                    self.read_relations(side);
                }
            }
            _ => {}
        }
    }
}

/// Kind, label and transaction operation read from the top-level node.
struct TreeLabel {
    kind: StatementKind,
    command: String,
    transaction: Option<TransactionOp>,
}

fn tree_label(node: &NodeEnum) -> Option<TreeLabel> {
    use StatementKind as K;
    let label = |kind, command: &str| TreeLabel {
        kind,
        command: command.to_owned(),
        transaction: None,
    };
    let words = labels::object_type_words;
    Some(match node {
        NodeEnum::MergeStmt(_) => label(K::Merge, "MERGE"),
        NodeEnum::CopyStmt(_) => label(K::Copy, "COPY"),
        NodeEnum::ExplainStmt(s) => {
            if s.options.iter().any(is_true_analyze_option) {
                label(K::Explain, "EXPLAIN ANALYZE")
            } else {
                label(K::Explain, "EXPLAIN")
            }
        }
        NodeEnum::TransactionStmt(s) => transaction_label(s.kind),
        NodeEnum::VariableSetStmt(s) => label(K::Set, set_label(s)),
        NodeEnum::DropStmt(s) => label(K::Drop, &format!("DROP {}", words(s.remove_type))),
        NodeEnum::GrantStmt(s) if s.is_grant => label(K::Grant, "GRANT"),
        NodeEnum::GrantStmt(_) => label(K::Revoke, "REVOKE"),
        NodeEnum::GrantRoleStmt(s) if s.is_grant => label(K::Grant, "GRANT ROLE"),
        NodeEnum::GrantRoleStmt(_) => label(K::Revoke, "REVOKE ROLE"),
        NodeEnum::AlterTableStmt(s) => label(K::Alter, &format!("ALTER {}", words(s.objtype))),
        NodeEnum::RenameStmt(s) => {
            // Renaming a column or constraint is an ALTER of its relation.
            let object = match protobuf::ObjectType::try_from(s.rename_type) {
                Ok(
                    protobuf::ObjectType::ObjectColumn
                    | protobuf::ObjectType::ObjectTabconstraint
                    | protobuf::ObjectType::ObjectAttribute,
                ) => s.relation_type,
                _ => s.rename_type,
            };
            label(K::Alter, &format!("ALTER {}", words(object)))
        }
        NodeEnum::AlterObjectSchemaStmt(s) => {
            label(K::Alter, &format!("ALTER {}", words(s.object_type)))
        }
        NodeEnum::AlterOwnerStmt(s) => label(K::Alter, &format!("ALTER {}", words(s.object_type))),
        NodeEnum::AlterObjectDependsStmt(s) => {
            label(K::Alter, &format!("ALTER {}", words(s.object_type)))
        }
        NodeEnum::AlterFunctionStmt(s) => label(K::Alter, &format!("ALTER {}", words(s.objtype))),
        NodeEnum::CreateTableAsStmt(s) if s.is_select_into => label(K::Create, "SELECT INTO"),
        NodeEnum::CreateTableAsStmt(s)
            if s.objtype == protobuf::ObjectType::ObjectMatview as i32 =>
        {
            label(K::Create, "CREATE MATERIALIZED VIEW")
        }
        NodeEnum::CreateTableAsStmt(_) => label(K::Create, "CREATE TABLE AS"),
        NodeEnum::CreateFunctionStmt(s) if s.is_procedure => label(K::Create, "CREATE PROCEDURE"),
        NodeEnum::CreateFunctionStmt(_) => label(K::Create, "CREATE FUNCTION"),
        NodeEnum::DefineStmt(s) => label(K::Create, &format!("CREATE {}", words(s.kind))),
        NodeEnum::VacuumStmt(s) if s.is_vacuumcmd => label(K::Other, "VACUUM"),
        NodeEnum::VacuumStmt(_) => label(K::Other, "ANALYZE"),
        NodeEnum::FetchStmt(s) if s.ismove => label(K::Other, "MOVE"),
        NodeEnum::FetchStmt(_) => label(K::Other, "FETCH"),
        _ => return None,
    })
}

fn transaction_label(kind: i32) -> TreeLabel {
    use TransactionStmtKind as T;
    let (op, command) = match TransactionStmtKind::try_from(kind) {
        Ok(T::TransStmtBegin) => (TransactionOp::Begin, "BEGIN"),
        Ok(T::TransStmtStart) => (TransactionOp::Begin, "START TRANSACTION"),
        Ok(T::TransStmtCommit) => (TransactionOp::Commit, "COMMIT"),
        Ok(T::TransStmtRollback) => (TransactionOp::Rollback, "ROLLBACK"),
        Ok(T::TransStmtSavepoint) => (TransactionOp::Other, "SAVEPOINT"),
        Ok(T::TransStmtRelease) => (TransactionOp::Other, "RELEASE"),
        Ok(T::TransStmtRollbackTo) => (TransactionOp::Other, "ROLLBACK TO SAVEPOINT"),
        Ok(T::TransStmtPrepare) => (TransactionOp::Other, "PREPARE TRANSACTION"),
        Ok(T::TransStmtCommitPrepared) => (TransactionOp::Other, "COMMIT PREPARED"),
        Ok(T::TransStmtRollbackPrepared) => (TransactionOp::Other, "ROLLBACK PREPARED"),
        Ok(T::Undefined) | Err(_) => (TransactionOp::Other, "TRANSACTION"),
    };
    TreeLabel {
        kind: StatementKind::Transaction,
        command: command.to_owned(),
        transaction: Some(op),
    }
}

/// "SET", "RESET", and the role-changing forms named apart.
fn set_label(s: &protobuf::VariableSetStmt) -> &'static str {
    let reset = matches!(
        VariableSetKind::try_from(s.kind),
        Ok(VariableSetKind::VarReset | VariableSetKind::VarResetAll)
    );
    match (reset, s.name.as_str()) {
        (false, "role") => "SET ROLE",
        (false, "session_authorization") => "SET SESSION AUTHORIZATION",
        (false, _) => "SET",
        (true, _) => "RESET",
    }
}

/// Whether an EXPLAIN option turns ANALYZE on (`ANALYZE`, `(ANALYZE)`,
/// `(ANALYZE true)`, `(ANALYZE on)`, `(ANALYZE 1)`).
fn is_true_analyze_option(option: &Node) -> bool {
    let Some(NodeEnum::DefElem(option)) = &option.node else {
        return false;
    };
    if !option.defname.eq_ignore_ascii_case("analyze") {
        return false;
    }
    match option.arg.as_deref().and_then(|a| a.node.as_ref()) {
        None => true,
        Some(NodeEnum::Boolean(b)) => b.boolval,
        Some(NodeEnum::Integer(i)) => i.ival != 0,
        Some(NodeEnum::String(s)) => !matches!(
            s.sval.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        ),
        // Anything else is an error on the server; count it as on.
        Some(_) => true,
    }
}

/// The scanner's tokens for a statement, scanned on first use.
struct Tokens<'a> {
    sql: &'a str,
    scanned: Option<Vec<ScanToken>>,
}

impl<'a> Tokens<'a> {
    fn new(sql: &'a str) -> Self {
        Tokens { sql, scanned: None }
    }

    fn get(&mut self) -> Result<&[ScanToken], String> {
        if self.scanned.is_none() {
            self.scanned = Some(pg_query::scan_tokens(self.sql).map_err(error_message)?);
        }
        Ok(self.scanned.as_deref().unwrap_or_default())
    }
}

fn is(token: &ScanToken, kind: Token) -> bool {
    token.token == kind as i32
}

/// Nesting depth change of a token: `(` opens, `)` closes.
fn depth_change(token: &ScanToken) -> i64 {
    if is(token, Token::Ascii40) {
        1
    } else if is(token, Token::Ascii41) {
        -1
    } else {
        0
    }
}

fn has_with(tokens: &[ScanToken]) -> bool {
    tokens
        .iter()
        .any(|t| is(t, Token::With) || is(t, Token::WithLa))
}

/// Whether a `WHERE` appears outside parentheses. In an UPDATE or DELETE
/// without WITH, that can only be the statement's own WHERE: subqueries,
/// FILTER (WHERE ...) and RETURNING subqueries are parenthesised.
fn has_top_level_where(tokens: &[ScanToken]) -> bool {
    let mut depth: i64 = 0;
    for token in tokens {
        depth += depth_change(token);
        if depth == 0 && is(token, Token::Where) {
            return true;
        }
    }
    false
}

/// The text of each RETURNING list that holds a parenthesis (so may call a
/// function or hold a subquery), without a leading `WITH (OLD AS o, ...)`.
/// A list runs to the end of the parenthesis level of its RETURNING: the
/// end of the text for the statement's own, the closing `)` for one in a
/// WITH query.
fn returning_lists<'s>(sql: &'s str, tokens: &[ScanToken]) -> Vec<&'s str> {
    let mut lists = Vec::new();
    for (at, token) in tokens.iter().enumerate() {
        if !is(token, Token::Returning) {
            continue;
        }
        let rest = tokens.get(at + 1..).unwrap_or_default();
        let mut start = token.end;
        let mut skip = 0;
        if rest
            .first()
            .is_some_and(|t| is(t, Token::With) || is(t, Token::WithLa))
            && rest.get(1).is_some_and(|t| is(t, Token::Ascii40))
        {
            // Skip `WITH ( ... )` up to its closing parenthesis.
            let mut depth: i64 = 0;
            for (i, t) in rest.iter().enumerate().skip(1) {
                depth += depth_change(t);
                if depth == 0 {
                    start = t.end;
                    skip = i + 1;
                    break;
                }
            }
        }
        let mut depth: i64 = 0;
        let mut end = None;
        let mut has_paren = false;
        for t in rest.iter().skip(skip) {
            depth += depth_change(t);
            if depth < 0 {
                end = Some(t.start);
                break;
            }
            has_paren |= is(t, Token::Ascii40);
        }
        if !has_paren {
            continue;
        }
        let range = usize::try_from(start).ok().zip(match end {
            Some(end) => usize::try_from(end).ok(),
            None => Some(sql.len()),
        });
        if let Some(list) = range.and_then(|(start, end)| sql.get(start..end)) {
            lists.push(list);
        }
    }
    lists
}

/// The query of `DECLARE name ... CURSOR ... FOR query`: the text after the
/// first `FOR` that follows `CURSOR`.
fn cursor_query<'s>(sql: &'s str, tokens: &[ScanToken]) -> Option<&'s str> {
    let cursor = tokens.iter().position(|t| is(t, Token::Cursor))?;
    let for_ = tokens
        .get(cursor + 1..)?
        .iter()
        .find(|t| is(t, Token::For))?;
    sql.get(usize::try_from(for_.end).ok()?..)
}

/// ASCII case-insensitive substring test (`needle` lowercase).
fn contains_ignore_ascii_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

fn table_ref(relation: &protobuf::RangeVar) -> TableRef {
    TableRef {
        schema: non_empty(&relation.schemaname),
        name: relation.relname.clone(),
    }
}

/// A relation from a dotted name list (`[schema,] name` or
/// `catalog, schema, name`).
fn table_from_names(items: &[Node]) -> Option<TableRef> {
    let mut names = items.iter().rev().map(|item| match &item.node {
        Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
        _ => None,
    });
    let name = names.next()??;
    let schema = names.next().flatten();
    Some(TableRef {
        schema: schema.map(str::to_owned),
        name: name.to_owned(),
    })
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// A statement's own text: without the whitespace and comments before it
/// or the whitespace after it.
fn statement_text(sql: &str) -> &str {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix("--") {
            rest = after.split_once('\n').map_or("", |(_, next)| next);
        } else if rest.starts_with("/*") {
            rest = skip_block_comment(rest);
        } else {
            break;
        }
    }
    rest.trim_end()
}

/// The text of the one statement in `sql` (text analysed without a split):
/// without leading whitespace and comments or trailing whitespace and
/// semicolons.
pub(super) fn single_statement_text(sql: &str) -> &str {
    // A statement with no split has its trailing `;` to drop.
    trim_end_semicolons(statement_text(sql))
}

/// Drops trailing semicolons (and whitespace) from a statement's text.
fn trim_end_semicolons(text: &str) -> &str {
    text.trim_end_matches(|c: char| c == ';' || c.is_whitespace())
}

/// Skips a block comment at the start of `s` (PostgreSQL's nest); an
/// unterminated one runs to the end.
fn skip_block_comment(s: &str) -> &str {
    let bytes = s.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(pair) = bytes.get(i..i + 2) {
        match pair {
            b"/*" => {
                depth += 1;
                i += 2;
            }
            b"*/" => {
                depth = depth.saturating_sub(1);
                i += 2;
                if depth == 0 {
                    // `i` follows an ASCII byte, so it is a char boundary.
                    return s.get(i..).unwrap_or("");
                }
            }
            _ => i += 1,
        }
    }
    ""
}

fn error_message(error: pg_query::Error) -> String {
    match error {
        pg_query::Error::Parse(message)
        | pg_query::Error::Split(message)
        | pg_query::Error::Scan(message) => message,
        pg_query::Error::Conversion(nul) => format!(
            "statement text contains a NUL byte at offset {}",
            nul.nul_position()
        ),
        // The decoder's message spells out the whole path; its limit on
        // nesting is what is hit.
        pg_query::Error::Decode(_) => {
            "statement is nested too deeply to analyse (parse tree deeper than the \
             protobuf decoder's recursion limit)"
                .to_owned()
        }
        other => other.to_string(),
    }
}

/// The two ways of answering "has a WHERE?", for tests that check they
/// agree.
#[cfg(test)]
pub(super) mod probe {
    /// From the scanner's tokens (`None`: the tree is needed).
    pub(in crate::sql) fn where_by_tokens(sql: &str) -> Option<bool> {
        let tokens = pg_query::scan_tokens(sql).ok()?;
        (!super::has_with(&tokens)).then(|| super::has_top_level_where(&tokens))
    }

    /// From the tree: whether any UPDATE or DELETE lacks a WHERE.
    pub(in crate::sql) fn no_where_by_tree(sql: &str) -> bool {
        let Ok(parsed) = pg_query::parse(sql, 0) else {
            return false;
        };
        let mut facts = super::Facts::new(Vec::new());
        for raw in &parsed.protobuf.stmts {
            if let Some(node) = raw.stmt.as_deref().and_then(|n| n.node.as_ref()) {
                facts.visit(node);
            }
        }
        facts.flags.no_where
    }
}
