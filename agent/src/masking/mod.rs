//! Masking: which result columns a `mask` rule hides, and what a masked
//! value becomes.
//!
//! A `mask` rule names columns (`mask_columns`) and a method (`mask_with`).
//! It applies only to statements that read a table one of its columns can
//! name, so a rule for `customers.email` leaves statements on other tables
//! alone. What a result column *is* comes from the server, not from the
//! statement's text: the protocol handler resolves the named columns to
//! the server's own identifiers at the moment the statement runs, and masks
//! every result field that comes from one of them, whatever alias or
//! subquery it went through. A field the server computes (an expression, a
//! whole row) cannot be traced to a column, so in a statement that reads a
//! masked table it is masked too: fail closed.
//!
//! This module knows nothing of a wire protocol: column names, methods,
//! and the bytes a masked value becomes. `protocol::postgres::mask` applies
//! it to PostgreSQL results.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::Serialize;

use crate::sql::{Dialect, StatementKind, StatementSummary, TableRef};

/// The value a redacted text field shows.
pub const REDACTED: &[u8] = b"****";

/// Longest name part accepted in a column spec (PostgreSQL's NAMEDATALEN - 1).
const MAX_NAME_PART: usize = 63;

/// One column a `mask` rule names: `column`, `table.column` or
/// `schema.table.column`, lowercased. A missing part matches any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ColumnSpec {
    /// Schema name, when given.
    pub schema: Option<Box<str>>,
    /// Table (or view) name, when given.
    pub table: Option<Box<str>>,
    /// Column name.
    pub column: Box<str>,
}

impl ColumnSpec {
    /// Parses `column`, `table.column` or `schema.table.column`. Parts are
    /// plain identifiers (letters, digits, `_`, `$`), compared without
    /// regard to case, as unquoted names are.
    pub fn parse(spec: &str) -> Result<ColumnSpec, String> {
        let parts: Vec<&str> = spec.split('.').collect();
        for part in &parts {
            let plain = !part.is_empty()
                && part.len() <= MAX_NAME_PART
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
                && !part.bytes().next().is_some_and(|b| b.is_ascii_digit());
            if !plain {
                return Err(format!(
                    "invalid column \"{spec}\": write `column`, `table.column` or `schema.table.column` with plain names (letters, digits, '_', '$', at most {MAX_NAME_PART} characters each)"
                ));
            }
        }
        let lower = |s: &str| Box::from(s.to_ascii_lowercase());
        match parts.as_slice() {
            [column] => Ok(ColumnSpec {
                schema: None,
                table: None,
                column: lower(column),
            }),
            [table, column] => Ok(ColumnSpec {
                schema: None,
                table: Some(lower(table)),
                column: lower(column),
            }),
            [schema, table, column] => Ok(ColumnSpec {
                schema: Some(lower(schema)),
                table: Some(lower(table)),
                column: lower(column),
            }),
            _ => Err(format!(
                "invalid column \"{spec}\": at most three parts, `schema.table.column`"
            )),
        }
    }

    /// Whether a table a statement reads may hold this column. A table
    /// written without a schema may be in any schema (the search path
    /// decides), so only a schema written on both sides can differ.
    pub fn may_be_in(&self, table: &TableRef) -> bool {
        let Some(spec_table) = &self.table else {
            return true;
        };
        if !table.name.eq_ignore_ascii_case(spec_table) {
            return false;
        }
        match (&self.schema, &table.schema) {
            (Some(a), Some(b)) => b.eq_ignore_ascii_case(a),
            _ => true,
        }
    }

    /// Whether the catalog's column `schema.table.column` may be this one
    /// (a schema not known matches any).
    pub fn names(&self, schema: Option<&str>, table: &str, column: &str) -> bool {
        column.eq_ignore_ascii_case(&self.column)
            && self
                .table
                .as_deref()
                .is_none_or(|t| table.eq_ignore_ascii_case(t))
            && match (self.schema.as_deref(), schema) {
                (Some(want), Some(got)) => got.eq_ignore_ascii_case(want),
                _ => true,
            }
    }
}

impl fmt::Display for ColumnSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(schema) = &self.schema {
            write!(f, "{schema}.")?;
        }
        if let Some(table) = &self.table {
            write!(f, "{table}.")?;
        }
        f.write_str(&self.column)
    }
}

/// What a masked value becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskMethod {
    /// Text becomes [`REDACTED`]; a value of any other type becomes NULL,
    /// since no fixed text is a valid number, date or JSON document.
    Redact,
    /// Every value becomes NULL.
    Null,
}

impl MaskMethod {
    /// The name used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            MaskMethod::Redact => "redact",
            MaskMethod::Null => "null",
        }
    }

    /// Parses a policy-file name.
    pub fn from_name(name: &str) -> Option<MaskMethod> {
        [MaskMethod::Redact, MaskMethod::Null]
            .into_iter()
            .find(|m| m.as_str() == name)
    }

    /// What a non-NULL value of a field becomes; `is_text` tells whether
    /// its type is a text type.
    pub fn replacement(self, is_text: bool) -> Replacement {
        match self {
            MaskMethod::Redact if is_text => Replacement::Text(REDACTED),
            _ => Replacement::Null,
        }
    }
}

impl fmt::Display for MaskMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A masked value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replacement {
    /// NULL.
    Null,
    /// These bytes (valid in text and binary format for text types).
    Text(&'static [u8]),
}

/// A `mask` rule's columns and method, compiled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MaskRule {
    /// The columns it masks.
    pub columns: Vec<ColumnSpec>,
    /// How.
    pub with: MaskMethod,
}

impl MaskRule {
    /// Whether the statement reads a table that may hold one of the
    /// columns, writes one with a `RETURNING` list (which returns what it
    /// wrote), or reads planner statistics (which hold sample values of
    /// every column): a mask rule applies to no other statement.
    pub fn applies_to(&self, statement: &StatementSummary) -> bool {
        let names = |tables: &[TableRef]| {
            tables
                .iter()
                .any(|t| self.columns.iter().any(|c| c.may_be_in(t)))
        };
        names(&statement.tables_read)
            || (names(&statement.tables_written) && mentions_returning(&statement.text))
            || statement.tables_read.iter().any(is_statistics_relation)
    }
}

/// Whether `text` has the word `returning` anywhere (a literal or a name
/// containing it too: erring towards applying the rule).
fn mentions_returning(text: &str) -> bool {
    text.as_bytes()
        .windows(9)
        .any(|w| w.eq_ignore_ascii_case(b"returning"))
}

/// Why masking cannot hide what a statement shows, for a statement that
/// is not a query writing nothing.
pub const MASK_ONLY_QUERIES: &str = "masking applies only to queries that write nothing";

/// Views and catalogs of planner statistics: they hold sample values
/// (most common values, histogram bounds) of every column, masked ones too.
const STATISTICS_RELATIONS: &[&str] = &[
    "pg_stats",
    "pg_statistic",
    "pg_stats_ext",
    "pg_stats_ext_exprs",
    "pg_statistic_ext_data",
];

/// Built-in functions without side effects: what they compute goes only
/// into the statement's result (masked when computed from a masked column)
/// or its filters. Any other function in a masked statement could carry a
/// masked value out another way (`pg_notify` in a notification,
/// `set_config` in a parameter status, `lo_from_bytea` into a large object,
/// `dblink` to another server, `setval` into a sequence, a user function
/// into anything), so such a statement is refused. Matched on the bare
/// name, unqualified or in `pg_catalog`.
const SIDE_EFFECT_FREE: &[&str] = &[
    // aggregates and window functions
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "bool_and",
    "bool_or",
    "every",
    "array_agg",
    "string_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "ntile",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "nth_value",
    // strings
    "lower",
    "upper",
    "initcap",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "bit_length",
    "substr",
    "substring",
    "left",
    "right",
    "trim",
    "btrim",
    "ltrim",
    "rtrim",
    "lpad",
    "rpad",
    "replace",
    "translate",
    "concat",
    "concat_ws",
    "format",
    "position",
    "strpos",
    "split_part",
    "reverse",
    "repeat",
    "starts_with",
    "overlay",
    "ascii",
    "chr",
    "md5",
    "to_hex",
    "encode",
    "decode",
    "convert_to",
    "convert_from",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "regexp_replace",
    "regexp_match",
    "regexp_matches",
    "regexp_like",
    "regexp_count",
    "regexp_instr",
    "regexp_substr",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "string_to_array",
    "array_to_string",
    "normalize",
    // numbers
    "abs",
    "ceil",
    "ceiling",
    "floor",
    "round",
    "trunc",
    "mod",
    "power",
    "sqrt",
    "cbrt",
    "exp",
    "ln",
    "log",
    "log10",
    "sign",
    "div",
    "gcd",
    "lcm",
    "width_bucket",
    "random",
    // dates and times
    "now",
    "date_trunc",
    "date_part",
    "date_bin",
    "extract",
    "age",
    "to_char",
    "to_date",
    "to_timestamp",
    "to_number",
    "make_date",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "make_interval",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "isfinite",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timezone",
    // arrays, sets, JSON
    "array_length",
    "array_lower",
    "array_upper",
    "array_ndims",
    "array_position",
    "array_positions",
    "array_append",
    "array_prepend",
    "array_cat",
    "array_remove",
    "array_replace",
    "cardinality",
    "unnest",
    "generate_series",
    "generate_subscripts",
    "to_json",
    "to_jsonb",
    "row_to_json",
    "array_to_json",
    "json_build_object",
    "jsonb_build_object",
    "json_build_array",
    "jsonb_build_array",
    "json_extract_path",
    "json_extract_path_text",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "json_array_elements",
    "jsonb_array_elements",
    "json_array_elements_text",
    "jsonb_array_elements_text",
    "json_each",
    "jsonb_each",
    "json_each_text",
    "jsonb_each_text",
    "json_typeof",
    "jsonb_typeof",
    "json_array_length",
    "jsonb_array_length",
    "jsonb_set",
    "jsonb_strip_nulls",
    "jsonb_pretty",
    // other pure helpers
    "gen_random_uuid",
    "num_nulls",
    "num_nonnulls",
    "pg_typeof",
];

/// MySQL and MariaDB built-ins without side effects, as [`SIDE_EFFECT_FREE`]
/// is for PostgreSQL. Only names the server itself defines: an unqualified
/// name it does not define is a stored function of the current database,
/// which can do anything. Left out on purpose: `sleep` and `benchmark`
/// (time), `get_lock` and its kin (lock names other sessions see),
/// `last_insert_id(expr)` (kept for the session), `setval`/`nextval`
/// (sequences), `load_file`, `master_pos_wait`, `name_const`.
const MYSQL_SIDE_EFFECT_FREE: &[&str] = &[
    // aggregates and window functions
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "group_concat",
    "bit_and",
    "bit_or",
    "bit_xor",
    "std",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "json_arrayagg",
    "json_objectagg",
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "ntile",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "nth_value",
    "median",
    "percentile_cont",
    "percentile_disc",
    // strings
    "lower",
    "upper",
    "lcase",
    "ucase",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "bit_length",
    "substr",
    "substring",
    "substring_index",
    "mid",
    "left",
    "right",
    "trim",
    "ltrim",
    "rtrim",
    "lpad",
    "rpad",
    "replace",
    "concat",
    "concat_ws",
    "format",
    "locate",
    "instr",
    "position",
    "reverse",
    "repeat",
    "space",
    "ascii",
    "ord",
    "char",
    "chr",
    "hex",
    "unhex",
    "md5",
    "sha",
    "sha1",
    "sha2",
    "crc32",
    "to_base64",
    "from_base64",
    "quote",
    "regexp_replace",
    "regexp_substr",
    "regexp_instr",
    "elt",
    "field",
    "find_in_set",
    "insert",
    "strcmp",
    "soundex",
    "make_set",
    "export_set",
    "weight_string",
    "collation",
    "charset",
    "coercibility",
    // control flow
    "if",
    "ifnull",
    "nullif",
    "coalesce",
    "greatest",
    "least",
    "isnull",
    "nvl",
    "nvl2",
    "interval",
    // numbers
    "abs",
    "ceil",
    "ceiling",
    "floor",
    "round",
    "truncate",
    "mod",
    "pow",
    "power",
    "sqrt",
    "exp",
    "ln",
    "log",
    "log2",
    "log10",
    "sign",
    "rand",
    "pi",
    "conv",
    "bin",
    "oct",
    "degrees",
    "radians",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "atan2",
    "cot",
    // dates and times
    "now",
    "curdate",
    "curtime",
    "current_date",
    "current_time",
    "current_timestamp",
    "localtime",
    "localtimestamp",
    "utc_date",
    "utc_time",
    "utc_timestamp",
    "sysdate",
    "date",
    "time",
    "timestamp",
    "year",
    "month",
    "monthname",
    "day",
    "dayname",
    "dayofmonth",
    "dayofweek",
    "dayofyear",
    "hour",
    "minute",
    "second",
    "microsecond",
    "week",
    "weekday",
    "weekofyear",
    "yearweek",
    "quarter",
    "date_format",
    "time_format",
    "date_add",
    "date_sub",
    "adddate",
    "subdate",
    "addtime",
    "subtime",
    "datediff",
    "timediff",
    "timestampdiff",
    "timestampadd",
    "str_to_date",
    "unix_timestamp",
    "from_unixtime",
    "from_days",
    "to_days",
    "to_seconds",
    "sec_to_time",
    "time_to_sec",
    "last_day",
    "makedate",
    "maketime",
    "period_add",
    "period_diff",
    "convert_tz",
    "get_format",
    // JSON
    "json_extract",
    "json_unquote",
    "json_object",
    "json_array",
    "json_length",
    "json_keys",
    "json_contains",
    "json_contains_path",
    "json_value",
    "json_query",
    "json_type",
    "json_valid",
    "json_depth",
    "json_quote",
    "json_search",
    "json_set",
    "json_insert",
    "json_replace",
    "json_remove",
    "json_merge",
    "json_merge_patch",
    "json_merge_preserve",
    "json_compact",
    "json_detailed",
    "json_pretty",
    // session facts
    "database",
    "schema",
    "user",
    "current_user",
    "session_user",
    "system_user",
    "version",
    "connection_id",
    "found_rows",
    "row_count",
    "uuid",
    "uuid_short",
];

/// Why a statement that a mask rule applies to cannot run masked: it is
/// not a query that writes nothing (COPY, CREATE TABLE AS, INSERT ...
/// SELECT, a cursor, EXPLAIN ANALYZE, SQL PREPARE would move the data where
/// no result row shows it), it reads planner statistics, it reads or writes
/// server files, it calls a function that could carry a masked value out
/// of the result, or (MySQL) it keeps a value in a user variable or reads
/// from a derived table, whose columns the server reports under their
/// derived names. `None`: it can run masked.
pub fn mask_obstacle(statement: &StatementSummary, dialect: Dialect) -> Option<Cow<'static, str>> {
    if let Some(table) = statement
        .tables_read
        .iter()
        .find(|t| is_statistics_relation(t))
    {
        return Some(Cow::Owned(format!(
            "planner statistics ({}) hold sample values of masked columns",
            table.name
        )));
    }
    if statement.kind != StatementKind::Select
        || !statement.tables_written.is_empty()
        || statement.flags.server_file_access
    {
        return Some(Cow::Borrowed(MASK_ONLY_QUERIES));
    }
    if statement.flags.sets_user_variable {
        return Some(Cow::Borrowed(
            "a value kept in a user variable (INTO @v, @v := ...) would outlive the masked result",
        ));
    }
    if dialect == Dialect::Mysql && statement.flags.derived_tables {
        return Some(Cow::Borrowed(
            "masking of MySQL results follows each column to the table column it comes from, \
             which a derived table or WITH query renames; select from the tables themselves",
        ));
    }
    if let Some(function) = statement
        .functions
        .iter()
        .find(|f| !is_side_effect_free(f, dialect))
    {
        return Some(Cow::Owned(format!(
            "masking cannot follow a masked value through {function}(), which is not a \
             side-effect-free built-in (it could send, store or report the value outside \
             the result)"
        )));
    }
    None
}

/// Whether a statement's rows can be masked as they are returned (see
/// [`mask_obstacle`]).
pub fn can_mask(statement: &StatementSummary, dialect: Dialect) -> bool {
    mask_obstacle(statement, dialect).is_none()
}

fn is_statistics_relation(table: &TableRef) -> bool {
    table.schema.as_deref().is_none_or(|s| s == "pg_catalog")
        && STATISTICS_RELATIONS.contains(&table.name.as_str())
}

/// A function name as the analysis reports it (lowercased, qualified when
/// written so) is one of [`SIDE_EFFECT_FREE`], unqualified or in
/// `pg_catalog`; for MySQL, one of [`MYSQL_SIDE_EFFECT_FREE`], unqualified
/// (a qualified name is a stored function).
fn is_side_effect_free(function: &str, dialect: Dialect) -> bool {
    match dialect {
        Dialect::Postgres => {
            let bare = match function.rsplit_once('.') {
                Some(("pg_catalog", bare)) => bare,
                Some(_) => return false,
                None => function,
            };
            SIDE_EFFECT_FREE.contains(&bare)
        }
        Dialect::Mysql => MYSQL_SIDE_EFFECT_FREE.contains(&function),
    }
}

/// The masked columns of one statement run, as the server identifies them:
/// (table OID, column number) → method.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResolvedColumns {
    columns: HashMap<(u32, i16), MaskMethod>,
}

/// Columns resolved at most for one statement (a bound on what the
/// catalog's answer can make the proxy hold).
pub const MAX_RESOLVED: usize = 64 * 1024;

impl ResolvedColumns {
    /// Adds a column the catalog named; the stricter method wins when two
    /// rules name it. `false` when the bound is reached.
    pub fn add(&mut self, table_oid: u32, column: i16, with: MaskMethod) -> bool {
        if self.columns.len() >= MAX_RESOLVED && !self.columns.contains_key(&(table_oid, column)) {
            return false;
        }
        let slot = self.columns.entry((table_oid, column)).or_insert(with);
        *slot = (*slot).max(with);
        true
    }

    /// The method for a result field from `table_oid`'s column `column`.
    pub fn get(&self, table_oid: u32, column: i16) -> Option<MaskMethod> {
        self.columns.get(&(table_oid, column)).copied()
    }

    /// How many columns are masked.
    pub fn len(&self) -> usize {
        self.columns.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }
}

/// What happens to one result field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldMask {
    /// Sent as it is.
    Keep,
    /// Masked.
    Mask(Replacement),
}

/// Where a result field comes from, as the server says.
#[derive(Debug, Clone, Copy)]
pub struct FieldOrigin {
    /// The table's OID, 0 for a computed field.
    pub table_oid: u32,
    /// The column's number, 0 or less for a whole row or a system column.
    pub column: i16,
    /// The field's type is a text type.
    pub is_text: bool,
}

/// The mask of one field. In a statement a mask rule applied to
/// (`statement_masked`), a field without a column of its own is masked with
/// the strictest method of the statement's rules, `fallback`.
pub fn field_mask(
    resolved: &ResolvedColumns,
    origin: FieldOrigin,
    statement_masked: bool,
    fallback: MaskMethod,
) -> FieldMask {
    if let Some(with) = resolved.get(origin.table_oid, origin.column) {
        return FieldMask::Mask(with.replacement(origin.is_text));
    }
    if statement_masked && (origin.table_oid == 0 || origin.column <= 0) {
        return FieldMask::Mask(fallback.replacement(origin.is_text));
    }
    FieldMask::Keep
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
