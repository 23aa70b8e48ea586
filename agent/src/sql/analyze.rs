//! [`analyze`]: SQL text in, one [`StatementSummary`] per statement out.
//!
//! One `pg_query::parse` of the text gives the tree of every statement;
//! [`Facts`] walks all of it with the generated visitor ([`super::visit`]),
//! which descends into every field of every node, so every statement type,
//! every embedded statement (rule actions, `CREATE SCHEMA` elements, cursor
//! and CTE queries, function bodies written in SQL) and every expression
//! (column defaults, RETURNING lists, policies, trigger conditions) is seen.
//! The walk interprets only what decides: relation references (read or
//! written, with SQL's scoping of CTE names), function calls and the
//! functions a created object will call (operators, aggregates, casts,
//! triggers, types, languages), and the flags. Results are cached by
//! statement shape ([`super::AnalysisCache`]), so the full parse is paid
//! once per shape, not per statement.

use std::collections::BTreeSet;
use std::sync::Arc;

use pg_query::protobuf::{self, TransactionStmtKind, VariableSetKind};
use pg_query::{FingerprintOptions, Node, NodeEnum, ParserOptions};

use super::labels::{self, Class};
use super::visit::{self, Visit};
use super::{
    Analysis, Reading, StatementFlags, StatementKind, StatementSummary, TableRef, TransactionOp,
};

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

/// Options of CREATE OPERATOR, AGGREGATE, TYPE, COLLATION, TEXT SEARCH
/// PARSER/TEMPLATE, ALTER OPERATOR/TYPE, CREATE TYPE ... AS RANGE and
/// FOREIGN DATA WRAPPER whose value names a function the created object
/// will call.
const FUNCTION_OPTIONS: &[&str] = &[
    // operators
    "function",
    "procedure",
    "restrict",
    "join",
    // aggregates
    "sfunc",
    "sfunc1",
    "finalfunc",
    "combinefunc",
    "serialfunc",
    "deserialfunc",
    "msfunc",
    "minvfunc",
    "mfinalfunc",
    // base types and ranges
    "input",
    "output",
    "receive",
    "send",
    "typmod_in",
    "typmod_out",
    "analyze",
    "subscript",
    "canonical",
    "subtype_diff",
    "multirange_type_name",
    // text search parsers and templates
    "start",
    "gettoken",
    "end",
    "headline",
    "lextypes",
    "init",
    "lexize",
    // foreign data wrappers
    "handler",
    "validator",
];

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
    analyze_read(sql, Reading::Standard)
}

/// [`analyze`] with plain string literals read as the server reads them
/// under `reading` (see [`Reading`]).
pub fn analyze_read(sql: &str, reading: Reading) -> Analysis {
    match analyze_text(sql, reading) {
        Ok(statements) => Analysis::Parsed { statements },
        Err(error) => Analysis::Unparsable { error },
    }
}

fn analyze_text(sql: &str, reading: Reading) -> Result<Vec<StatementSummary>, String> {
    let options = reading.parser_options();
    let parsed = pg_query::parse(sql, options).map_err(error_message)?;
    let raw = &parsed.protobuf.stmts;
    let mut statements = Vec::with_capacity(raw.len());
    for statement in raw {
        let Some(node) = statement.stmt.as_deref().and_then(|n| n.node.as_ref()) else {
            continue;
        };
        let text = raw_statement_text(sql, statement.stmt_location, statement.stmt_len);
        statements.push(summarise(node, text, options)?);
    }
    Ok(statements)
}

/// The text of one parsed statement: `len` bytes from `location` (0: to the
/// end), without the comments and whitespace around it. The parser's length
/// stops before the `;` that ends the statement.
fn raw_statement_text(sql: &str, location: i32, len: i32) -> &str {
    let start = usize::try_from(location).unwrap_or(0);
    let end = match usize::try_from(len) {
        Ok(0) | Err(_) => sql.len(),
        Ok(len) => start.saturating_add(len).min(sql.len()),
    };
    // The parser's offsets fall between tokens, so on char boundaries;
    // fall back to the whole text rather than panic if they ever do not.
    let piece = sql.get(start..end).unwrap_or(sql);
    statement_text(piece)
}

/// Summarises one statement from its tree.
fn summarise(
    node: &NodeEnum,
    text: &str,
    options: ParserOptions,
) -> Result<StatementSummary, String> {
    let fingerprint = pg_query::fingerprint(text, options, fingerprint_options())
        .map_err(error_message)?
        .hex;
    let node_type = visit::node_type_name(node);
    let (mut kind, mut command, mut transaction) = match labels::classify(node_type) {
        Class::Fixed(kind, label) => (kind, label.to_owned(), None),
        Class::Tree => match tree_label(node) {
            Some(label) => (label.kind, label.command, label.transaction),
            None => {
                let (kind, command) = labels::fallback(node_type);
                (kind, command, None)
            }
        },
        Class::Unknown => {
            let (kind, command) = labels::fallback(node_type);
            (kind, command, None)
        }
    };
    if let NodeEnum::SelectStmt(select) = node {
        if select.into_clause.is_some() {
            kind = StatementKind::Create;
            command = "SELECT INTO".to_owned();
            transaction = None;
        }
    }

    let mut facts = Facts::default();
    match node {
        NodeEnum::AlterSystemStmt(_)
        | NodeEnum::AlterRoleSetStmt(_)
        | NodeEnum::AlterDatabaseSetStmt(_) => facts.flags.config_change = true,
        // LOAD reads a shared library from the server's file system.
        NodeEnum::LoadStmt(_) => facts.flags.server_file_access = true,
        _ => {}
    }
    facts.visit_node_enum(node);

    Ok(StatementSummary {
        kind,
        transaction,
        command: Arc::from(command),
        tables_read: facts.read.into_iter().collect(),
        tables_written: facts.written.into_iter().collect(),
        functions: facts.functions.into_iter().collect(),
        flags: facts.flags,
        fingerprint: Arc::from(fingerprint),
        text: text.to_owned(),
    })
}

/// The analysis of a fast-path call of a built-in function (a
/// `FunctionCall` message, which carries no SQL): a query calling `name`
/// (in `pg_catalog`), recorded under `text`.
pub fn function_call(name: &str, text: &str) -> Analysis {
    let mut facts = Facts::default();
    let qualified = [string_node("pg_catalog"), string_node(name)];
    facts.function(&qualified);
    Analysis::Parsed {
        statements: vec![StatementSummary {
            kind: StatementKind::Select,
            transaction: None,
            command: Arc::from("FUNCTION CALL"),
            tables_read: Vec::new(),
            tables_written: Vec::new(),
            functions: facts.functions.into_iter().collect(),
            flags: facts.flags,
            fingerprint: Arc::from(format!("function call {name}")),
            text: text.to_owned(),
        }],
    }
}

fn string_node(value: &str) -> Node {
    Node {
        node: Some(NodeEnum::String(protobuf::String {
            sval: value.to_owned(),
        })),
    }
}

/// Fingerprint options: relation names count in full, with their schema and
/// without their alias, so that a fingerprint approved for
/// `DELETE FROM staging.users u WHERE id = $1` does not also cover
/// `prod.users` or another table aliased `u` (pg_query's default, following
/// PostgreSQL 18's query id, ignores schemas, digit runs and aliased names).
fn fingerprint_options() -> FingerprintOptions {
    FingerprintOptions::RANGEVAR_PG17_COMPAT | FingerprintOptions::FULL_RELNAME
}

/// How a relation named outside a query's FROM list or a statement's
/// target counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Role {
    /// In a query: read.
    Read,
    /// Directly under a utility statement (CREATE, ALTER, GRANT, LOCK,
    /// VACUUM, ...): that statement acts on it.
    #[default]
    Write,
}

/// What one statement touches, gathered by walking its whole tree.
#[derive(Default)]
struct Facts {
    read: BTreeSet<TableRef>,
    written: BTreeSet<TableRef>,
    functions: BTreeSet<String>,
    flags: StatementFlags,
    /// CTE names in scope, one frame per query level that has a WITH
    /// (innermost last): an unqualified name found here is not a table.
    scopes: Vec<Vec<String>>,
    /// How a relation reached now counts, unless it is a target.
    role: Role,
    /// The relations the statements being walked write to (an INSERT's,
    /// UPDATE's, DELETE's or MERGE's target, a COPY FROM's table, a SELECT
    /// INTO's or CREATE TABLE AS's new table), compared by address: a
    /// target is always a table, never a CTE.
    targets: Vec<*const protobuf::RangeVar>,
    /// Inside the options of a statement that creates or alters an object
    /// calling functions ([`FUNCTION_OPTIONS`]).
    in_definition: bool,
}

impl Facts {
    /// Walks a query level: its WITH names are in scope for the level and
    /// below, its relations are read (but for the targets), and `walk`
    /// visits the rest of the node.
    fn query_level(
        &mut self,
        with: Option<&protobuf::WithClause>,
        target: Option<&protobuf::RangeVar>,
        walk: impl FnOnce(&mut Self),
    ) {
        let saved = std::mem::replace(&mut self.role, Role::Read);
        let targets = self.targets.len();
        if let Some(target) = target {
            self.targets.push(target);
        }
        self.scopes.push(Vec::new());
        if let Some(with) = with {
            self.with_clause(with);
        }
        walk(self);
        self.scopes.pop();
        self.targets.truncate(targets);
        self.role = saved;
    }

    /// Walks the CTE queries of a WITH with SQL's visibility: in a plain
    /// WITH a query sees the CTEs before it; under RECURSIVE it sees all of
    /// them. The names stay in the innermost frame for the rest of the
    /// level.
    fn with_clause(&mut self, with: &protobuf::WithClause) {
        let names = with.ctes.iter().filter_map(|cte| match &cte.node {
            Some(NodeEnum::CommonTableExpr(cte)) => Some(cte.ctename.clone()),
            _ => None,
        });
        if with.recursive {
            let names: Vec<String> = names.collect();
            if let Some(frame) = self.scopes.last_mut() {
                frame.extend(names);
            }
        }
        for cte in &with.ctes {
            let Some(NodeEnum::CommonTableExpr(cte)) = &cte.node else {
                continue;
            };
            visit::walk_common_table_expr(self, cte);
            if !with.recursive {
                if let Some(frame) = self.scopes.last_mut() {
                    frame.push(cte.ctename.clone());
                }
            }
        }
    }

    fn is_cte(&self, relation: &protobuf::RangeVar) -> bool {
        relation.schemaname.is_empty()
            && relation.catalogname.is_empty()
            && self
                .scopes
                .iter()
                .rev()
                .any(|frame| frame.contains(&relation.relname))
    }

    /// Records a function by its (possibly qualified) name.
    fn function(&mut self, names: &[Node]) {
        let parts: Vec<&str> = names
            .iter()
            .filter_map(|n| match &n.node {
                Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
                _ => None,
            })
            .collect();
        let Some(bare) = parts.last().map(|name| name.to_lowercase()) else {
            return;
        };
        if SERVER_FILE_FUNCTIONS.contains(&bare.as_str()) {
            self.flags.server_file_access = true;
        }
        if CONFIG_FUNCTIONS.contains(&bare.as_str()) {
            self.flags.config_change = true;
        }
        let name = match parts.len() {
            0 | 1 => bare,
            n => {
                let schema = parts
                    .get(n - 2)
                    .map(|s| s.to_lowercase())
                    .unwrap_or_default();
                format!("{schema}.{bare}")
            }
        };
        self.functions.insert(name);
    }

    /// Records the function an object definition's option names, in any of
    /// the ways the grammar writes a function name there.
    fn function_option(&mut self, value: &Node) {
        match &value.node {
            Some(NodeEnum::TypeName(name)) => self.function(&name.names),
            Some(NodeEnum::List(list)) => self.function(&list.items),
            Some(NodeEnum::ObjectWithArgs(object)) => self.function(&object.objname),
            Some(NodeEnum::String(_)) => self.function(std::slice::from_ref(value)),
            _ => {}
        }
    }

    /// Walks an object definition, its options read as function names.
    fn definition(&mut self, walk: impl FnOnce(&mut Self)) {
        let saved = std::mem::replace(&mut self.in_definition, true);
        walk(self);
        self.in_definition = saved;
    }
}

impl Visit for Facts {
    fn visit_select_stmt(&mut self, node: &protobuf::SelectStmt) {
        let into = node.into_clause.as_ref().and_then(|into| into.rel.as_ref());
        self.query_level(node.with_clause.as_ref(), into, |facts| {
            visit::walk_select_stmt(facts, node)
        });
    }

    fn visit_insert_stmt(&mut self, node: &protobuf::InsertStmt) {
        self.query_level(node.with_clause.as_ref(), node.relation.as_ref(), |facts| {
            visit::walk_insert_stmt(facts, node)
        });
    }

    fn visit_update_stmt(&mut self, node: &protobuf::UpdateStmt) {
        self.flags.no_where |= node.where_clause.is_none();
        self.query_level(node.with_clause.as_ref(), node.relation.as_ref(), |facts| {
            visit::walk_update_stmt(facts, node)
        });
    }

    fn visit_delete_stmt(&mut self, node: &protobuf::DeleteStmt) {
        self.flags.no_where |= node.where_clause.is_none();
        self.query_level(node.with_clause.as_ref(), node.relation.as_ref(), |facts| {
            visit::walk_delete_stmt(facts, node)
        });
    }

    fn visit_merge_stmt(&mut self, node: &protobuf::MergeStmt) {
        self.query_level(node.with_clause.as_ref(), node.relation.as_ref(), |facts| {
            visit::walk_merge_stmt(facts, node)
        });
    }

    // CTE queries are walked by `query_level`, with their scoping.
    fn visit_with_clause(&mut self, _node: &protobuf::WithClause) {}

    fn visit_copy_stmt(&mut self, node: &protobuf::CopyStmt) {
        self.flags.copy_program |= node.is_program;
        self.flags.copy_server_file |= !node.is_program && !node.filename.is_empty();
        let target = node.relation.as_ref().filter(|_| node.is_from);
        self.query_level(None, target, |facts| visit::walk_copy_stmt(facts, node));
    }

    fn visit_create_table_as_stmt(&mut self, node: &protobuf::CreateTableAsStmt) {
        let saved = self.targets.len();
        if let Some(rel) = node.into.as_ref().and_then(|into| into.rel.as_ref()) {
            self.targets.push(rel);
        }
        visit::walk_create_table_as_stmt(self, node);
        self.targets.truncate(saved);
    }

    fn visit_range_var(&mut self, node: &protobuf::RangeVar) {
        let table = table_ref(node);
        if self.targets.iter().any(|t| std::ptr::eq(*t, node)) {
            self.written.insert(table);
        } else if self.is_cte(node) {
            // A CTE of an enclosing query level, not a table.
        } else if self.role == Role::Read {
            self.read.insert(table);
        } else {
            self.written.insert(table);
        }
        visit::walk_range_var(self, node);
    }

    fn visit_func_call(&mut self, node: &protobuf::FuncCall) {
        self.function(&node.funcname);
        visit::walk_func_call(self, node);
    }

    fn visit_drop_stmt(&mut self, node: &protobuf::DropStmt) {
        // Dropped relations and a dropped policy's table are name lists.
        // `DROP POLICY p ON t`, `DROP TRIGGER`, `DROP RULE`: the list ends
        // with the object's name, after its table's.
        let on_table = [
            protobuf::ObjectType::ObjectPolicy,
            protobuf::ObjectType::ObjectTrigger,
            protobuf::ObjectType::ObjectRule,
        ]
        .iter()
        .any(|t| node.remove_type == *t as i32);
        if labels::is_relation_type(node.remove_type) || on_table {
            for object in &node.objects {
                if let Some(NodeEnum::List(list)) = &object.node {
                    let names = if on_table {
                        list.items.split_last().map_or(&[][..], |(_, table)| table)
                    } else {
                        &list.items[..]
                    };
                    if let Some(table) = table_from_names(names) {
                        self.written.insert(table);
                    }
                }
            }
        }
        visit::walk_drop_stmt(self, node);
    }

    fn visit_rename_stmt(&mut self, node: &protobuf::RenameStmt) {
        // Renaming a relation writes its new name too.
        if let Some(relation) = node.relation.as_ref() {
            if labels::is_relation_type(node.rename_type) && !node.newname.is_empty() {
                self.written.insert(TableRef {
                    schema: non_empty(&relation.schemaname),
                    name: node.newname.clone(),
                });
            }
        }
        visit::walk_rename_stmt(self, node);
    }

    fn visit_def_elem(&mut self, node: &protobuf::DefElem) {
        if self.in_definition && FUNCTION_OPTIONS.contains(&node.defname.as_str()) {
            if let Some(value) = node.arg.as_deref() {
                self.function_option(value);
            }
        }
        visit::walk_def_elem(self, node);
    }

    fn visit_define_stmt(&mut self, node: &protobuf::DefineStmt) {
        self.definition(|facts| visit::walk_define_stmt(facts, node));
    }

    fn visit_alter_operator_stmt(&mut self, node: &protobuf::AlterOperatorStmt) {
        self.definition(|facts| visit::walk_alter_operator_stmt(facts, node));
    }

    fn visit_alter_type_stmt(&mut self, node: &protobuf::AlterTypeStmt) {
        self.definition(|facts| visit::walk_alter_type_stmt(facts, node));
    }

    fn visit_create_range_stmt(&mut self, node: &protobuf::CreateRangeStmt) {
        self.definition(|facts| visit::walk_create_range_stmt(facts, node));
    }

    fn visit_create_fdw_stmt(&mut self, node: &protobuf::CreateFdwStmt) {
        self.definition(|facts| visit::walk_create_fdw_stmt(facts, node));
    }

    fn visit_alter_fdw_stmt(&mut self, node: &protobuf::AlterFdwStmt) {
        self.definition(|facts| visit::walk_alter_fdw_stmt(facts, node));
    }

    fn visit_create_cast_stmt(&mut self, node: &protobuf::CreateCastStmt) {
        if let Some(func) = &node.func {
            self.function(&func.objname);
        }
        visit::walk_create_cast_stmt(self, node);
    }

    fn visit_create_trig_stmt(&mut self, node: &protobuf::CreateTrigStmt) {
        self.function(&node.funcname);
        visit::walk_create_trig_stmt(self, node);
    }

    fn visit_create_event_trig_stmt(&mut self, node: &protobuf::CreateEventTrigStmt) {
        self.function(&node.funcname);
        visit::walk_create_event_trig_stmt(self, node);
    }

    fn visit_create_transform_stmt(&mut self, node: &protobuf::CreateTransformStmt) {
        for func in [&node.fromsql, &node.tosql].into_iter().flatten() {
            self.function(&func.objname);
        }
        visit::walk_create_transform_stmt(self, node);
    }

    fn visit_create_op_class_item(&mut self, node: &protobuf::CreateOpClassItem) {
        // Item type 2 is FUNCTION n name(args) (OPCLASS_ITEM_FUNCTION).
        if node.itemtype == 2 {
            if let Some(name) = &node.name {
                self.function(&name.objname);
            }
        }
        visit::walk_create_op_class_item(self, node);
    }

    fn visit_create_p_lang_stmt(&mut self, node: &protobuf::CreatePLangStmt) {
        for names in [&node.plhandler, &node.plinline, &node.plvalidator] {
            self.function(names);
        }
        visit::walk_create_p_lang_stmt(self, node);
    }

    fn visit_create_conversion_stmt(&mut self, node: &protobuf::CreateConversionStmt) {
        self.function(&node.func_name);
        visit::walk_create_conversion_stmt(self, node);
    }

    fn visit_create_am_stmt(&mut self, node: &protobuf::CreateAmStmt) {
        self.function(&node.handler_name);
        visit::walk_create_am_stmt(self, node);
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
