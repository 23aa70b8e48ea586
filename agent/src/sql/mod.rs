//! Statement analysis: SQL text in, one neutral [`StatementSummary`] per
//! statement out. Pure functions, no I/O; the policy engine reads only these
//! summaries, never a parse tree.
//!
//! - [`analyze`]: text to [`Analysis`], built on `pg_query` (PostgreSQL's own
//!   parser): the whole parse tree of every statement, walked with a visitor
//!   generated from the parser's node definitions (`visit.rs`, by
//!   `cargo xtask sql-visitor`), so no node type is left unwalked.
//! - [`AnalysisCache`]: a bounded LRU of analyses shared by statements
//!   that differ only in literal values.
//! - [`column_refs`]: the names a statement's expressions refer to, for
//!   masking computed values (full parse, paid only when a `mask` rule
//!   applies).
//!
//! Input is UTF-8 text: the protocol layer converts from the client encoding
//! before calling in.

mod analyze;
mod cache;
mod labels;
pub mod mysql;
mod redact;
mod refs;
mod session_ops;
mod shape;
#[cfg(test)]
mod tests;
mod visit;

/// The statement-shape scanner, for the fuzz targets in `fuzz/` (built with
/// the `fuzzing` feature); not a stable interface.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// The shape of `sql` (its text with literal contents blanked), `None`
    /// when the scanner cannot vouch for it.
    pub fn shape(sql: &str) -> Option<Vec<u8>> {
        super::shape::shape(sql)
    }

    /// Appends the shape of `sql` to `key`, as the analysis cache does;
    /// `false` when there is none.
    pub fn shape_into(sql: &str, key: &mut Vec<u8>) -> bool {
        super::shape::shape_into(sql, key)
    }

    /// `sql` with every integer, numeric and string literal replaced by the
    /// given spellings; `None` when `sql` has no shape.
    pub fn respell(sql: &str, integer: &str, numeric: &str, string: &str) -> Option<String> {
        super::shape::respell(sql, integer, numeric, string)
    }
}

pub use analyze::{analyze, analyze_read, function_call};
pub use cache::{AnalysisCache, MAX_CACHED_TEXT_LEN};
pub use redact::{shown_to_reviewer, Shown, HIDDEN_LITERAL};
pub use refs::{column_refs, ColumnRefs};
pub use session_ops::{
    changes_reading_setting, prepared_query_text, sql_op, SqlOp, READING_SETTINGS,
};

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// How the server reads a backslash in a plain string literal (`'...'`):
/// its `standard_conforming_strings` setting. The same text can hold
/// different statements under the two readings (`'\'; DROP TABLE t; --'`
/// is one literal where backslashes escape, and a literal, a DROP and a
/// comment where they do not), so the analysis reads text the way the
/// session's server will.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reading {
    /// `standard_conforming_strings = on` (the default): a backslash is an
    /// ordinary character.
    #[default]
    Standard,
    /// `standard_conforming_strings = off`: a backslash escapes, as in
    /// `E'...'`.
    BackslashEscapes,
}

impl Reading {
    pub(crate) fn parser_options(self) -> pg_query::ParserOptions {
        match self {
            Reading::Standard => pg_query::ParserOptions::DEFAULT,
            Reading::BackslashEscapes => {
                pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS
            }
        }
    }

    /// Whether `sql` may read otherwise than under the standard reading:
    /// it has a backslash, or an `&` (a `U&'...'` string, which the server
    /// refuses where backslashes escape).
    fn matters_for(self, sql: &str) -> bool {
        self == Reading::BackslashEscapes && sql.contains(['\\', '&'])
    }
}

/// What a statement does, coarsely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementKind {
    /// SELECT, VALUES, TABLE, and SELECT ... INTO is `create`.
    Select,
    /// INSERT.
    Insert,
    /// UPDATE.
    Update,
    /// DELETE.
    Delete,
    /// MERGE.
    Merge,
    /// COPY (either direction).
    Copy,
    /// CREATE ... (tables, indexes, functions, roles, ...).
    Create,
    /// ALTER ... (including ALTER SYSTEM).
    Alter,
    /// DROP ...
    Drop,
    /// TRUNCATE.
    Truncate,
    /// GRANT.
    Grant,
    /// REVOKE.
    Revoke,
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT, ...
    Transaction,
    /// SET, RESET, SHOW.
    Set,
    /// CALL.
    Call,
    /// DO (anonymous code block).
    Do,
    /// PREPARE, EXECUTE, DEALLOCATE at the SQL level.
    Prepared,
    /// EXPLAIN (the explained statement's tables and flags are included).
    Explain,
    /// Anything else (VACUUM, ANALYZE, LISTEN, ...).
    Other,
    /// SSH: a command run by an `exec` request (`ssh host 'uptime'`, scp,
    /// git, rsync).
    Exec,
    /// SSH: an interactive shell.
    Shell,
    /// SSH: a subsystem such as `sftp`.
    Subsystem,
    /// SSH: a port forward (`ssh -L`, `-D`, `-R`).
    Forward,
}

impl StatementKind {
    /// The name policies, logs and recordings use (its serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            StatementKind::Select => "select",
            StatementKind::Insert => "insert",
            StatementKind::Update => "update",
            StatementKind::Delete => "delete",
            StatementKind::Merge => "merge",
            StatementKind::Copy => "copy",
            StatementKind::Create => "create",
            StatementKind::Alter => "alter",
            StatementKind::Drop => "drop",
            StatementKind::Truncate => "truncate",
            StatementKind::Grant => "grant",
            StatementKind::Revoke => "revoke",
            StatementKind::Transaction => "transaction",
            StatementKind::Set => "set",
            StatementKind::Call => "call",
            StatementKind::Do => "do",
            StatementKind::Prepared => "prepared",
            StatementKind::Explain => "explain",
            StatementKind::Other => "other",
            StatementKind::Exec => "exec",
            StatementKind::Shell => "shell",
            StatementKind::Subsystem => "subsystem",
            StatementKind::Forward => "forward",
        }
    }
}

/// A transaction-control statement, when the kind is `transaction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransactionOp {
    /// BEGIN / START TRANSACTION.
    Begin,
    /// COMMIT / END.
    Commit,
    /// ROLLBACK / ABORT.
    Rollback,
    /// SAVEPOINT, RELEASE, ROLLBACK TO, PREPARE TRANSACTION, COMMIT/ROLLBACK PREPARED.
    Other,
}

/// A table (or view, sequence) named by a statement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TableRef {
    /// Schema when written in the statement (`public.users` gives `public`).
    pub schema: Option<String>,
    /// Relation name, as PostgreSQL folds it (unquoted names lowercased).
    pub name: String,
}

/// The SQL dialect a statement was written in: which server reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dialect {
    /// PostgreSQL.
    #[default]
    Postgres,
    /// MySQL and MariaDB.
    Mysql,
}

impl Dialect {
    /// Its name in files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Postgres => "postgres",
            Dialect::Mysql => "mysql",
        }
    }

    /// Analyses `text` as this dialect's server reads it (MySQL's reading
    /// of backslashes not known: text must read alike either way).
    pub fn analyze(self, text: &str) -> Analysis {
        match self {
            Dialect::Postgres => analyze(text),
            Dialect::Mysql => mysql::analyze(text),
        }
    }
}

/// Properties a policy may want to match on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementFlags {
    /// UPDATE or DELETE without a WHERE clause.
    pub no_where: bool,
    /// COPY ... TO PROGRAM / FROM PROGRAM.
    pub copy_program: bool,
    /// COPY to or from a server-side file (not STDIN/STDOUT).
    pub copy_server_file: bool,
    /// Calls a function that reads or writes server files or large objects
    /// (pg_read_file, pg_read_binary_file, pg_ls_dir, lo_import, lo_export, ...).
    pub server_file_access: bool,
    /// Changes server configuration (ALTER SYSTEM, set_config(), pg_reload_conf()).
    pub config_change: bool,
    /// Stores a value in a user variable (MySQL `SELECT ... INTO @v`,
    /// `@v := expr`): what the statement reads outlives its result.
    #[serde(default)]
    pub sets_user_variable: bool,
    /// Reads from a derived table or a `WITH` query. A MySQL server reports
    /// the columns of such a result under their derived names, not the
    /// columns they come from.
    #[serde(default)]
    pub derived_tables: bool,
}

impl StatementFlags {
    /// Sets every flag `other` has set too (one statement standing for
    /// another, as a MySQL `EXECUTE` for what was prepared).
    pub fn include(&mut self, other: &StatementFlags) {
        let StatementFlags {
            no_where,
            copy_program,
            copy_server_file,
            server_file_access,
            config_change,
            sets_user_variable,
            derived_tables,
        } = other;
        self.no_where |= no_where;
        self.copy_program |= copy_program;
        self.copy_server_file |= copy_server_file;
        self.server_file_access |= server_file_access;
        self.config_change |= config_change;
        self.sets_user_variable |= sets_user_variable;
        self.derived_tables |= derived_tables;
    }
}

/// One statement, analysed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementSummary {
    /// What it does.
    pub kind: StatementKind,
    /// For `transaction` statements, which one.
    pub transaction: Option<TransactionOp>,
    /// A short uppercase label such as "DROP TABLE", "SELECT", "ALTER SYSTEM",
    /// used in messages (`tollgate: DROP TABLE denied by rule ...`).
    /// Shared (with every statement event that names it).
    pub command: Arc<str>,
    /// Tables read.
    pub tables_read: Vec<TableRef>,
    /// Tables written (inserted into, updated, deleted from, created,
    /// altered, dropped, truncated, copied into).
    pub tables_written: Vec<TableRef>,
    /// Functions called, lowercased, schema-qualified when written so.
    pub functions: Vec<String>,
    /// Flags.
    pub flags: StatementFlags,
    /// pg_query fingerprint (hex): equal for statements that differ only in
    /// literal values. Shared, like `command`.
    pub fingerprint: Arc<str>,
    /// This statement's own text (a slice of a multi-statement message).
    pub text: String,
}

/// The analysis of one piece of SQL text (one simple Query message or one
/// Parse).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Analysis {
    /// Every statement in the text, in order (empty text gives none).
    Parsed {
        /// The statements.
        statements: Vec<StatementSummary>,
    },
    /// The text does not parse as PostgreSQL SQL.
    Unparsable {
        /// The parser's message.
        error: String,
    },
}
