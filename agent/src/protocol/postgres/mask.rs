//! Masking PostgreSQL results (see [`crate::masking`] for what is masked).
//!
//! A simple Query of one plain query of one relation
//! ([`MaskPlan::direct`]) is sent as it is: the server's RowDescription
//! names each field it traces to a table column by the column's own name,
//! and [`MaskPlan::resolve_direct`] matches the rules against the relation
//! as written and that name. Any other simple Query with a statement a
//! `mask` rule applies to is sent with a catalog lookup in front of it, in
//! the same message:
//!
//! ```sql
//! SELECT a.attrelid::pg_catalog.int8 AS "tollgate_mask_<nonce>_<n>", a.attnum,
//!        a.attname, a.attrelid::pg_catalog.regclass::pg_catalog.text
//!   FROM pg_catalog.pg_attribute a
//!  WHERE ... lower(a.attname) = ANY ('{email}')
//!    AND a.attrelid = ANY (ARRAY[to_regclass('"customers"')]); <the client's text>
//! ```
//!
//! The server answers the lookup first: the columns named by the rules, as
//! (table OID, column number), read at the moment the client's statements
//! run, in its transaction and under its search path ([`LookupScope`] says
//! how the relations are found). The upstream pump
//! recognises the lookup's RowDescription by its column name (the nonce is
//! random per session, so a client cannot forge it), keeps its rows and
//! forwards none of it, then masks every field of the client's results
//! that RowDescription traces to a masked column. If the lookup fails (in
//! a failed transaction block, say) the server runs nothing after it, so
//! nothing unmasked can follow; its error is forwarded as the client's.
//!
//! Operators in the lookup are schema-qualified (`OPERATOR(pg_catalog.=)`)
//! so that a client's own operators on its search path cannot change what
//! it finds. Error positions in the client's statements are shifted back
//! by the lookup's length, so psql's `LINE 1: ...` caret stays right.

use std::collections::VecDeque;
use std::sync::Arc;

use super::backend::{self, FieldDescription};
use super::codec::{MessageWriter, Reader};
use crate::masking::{
    field_mask, FieldMask, FieldOrigin, MaskMethod, MaskRule, Replacement, ResolvedColumns,
};
use crate::sql::TableRef;

/// What one masked Query needs masked, made when it was decided.
#[derive(Debug, Default)]
pub struct MaskPlan {
    /// The mask rules that applied to any of its statements.
    pub rules: Vec<Arc<MaskRule>>,
    /// Per statement, in order: the method for its computed fields when a
    /// mask rule applied to it, `None` when none did.
    pub statements: Vec<Option<MaskMethod>>,
    /// The relations the masked statements read, as written (names folded
    /// as PostgreSQL folds them, with their schema when the statement names
    /// one; deduplicated).
    pub relations: Vec<TableRef>,
    /// Its only masked statement is the first of its text: nothing runs
    /// between a lookup in front of it and the statement.
    pub only_first: bool,
    /// The relation, as written, that the text's one statement names each
    /// result field from (`crate::sql::ColumnRefs::direct_source`): such a text needs
    /// no lookup, since the server's RowDescription names every field it
    /// traces to a table column by that column's own name.
    pub direct: Option<TableRef>,
}

/// Where a lookup looks for the relations a masked statement reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupScope {
    /// Each relation as the session's search path resolves its name now
    /// (`to_regclass`): what the statement reads when it runs right after
    /// the lookup, and about half the server's time of [`EverySchema`].
    ///
    /// [`EverySchema`]: LookupScope::EverySchema
    SearchPath,
    /// Every relation of that name in any schema: right whatever runs
    /// between the lookup and the statement (a `SET search_path`, a new
    /// temporary table).
    EverySchema,
}

impl MaskPlan {
    /// The lookup statement (with its `;`) whose one RowDescription has
    /// `marker` as its first column's name: every column of the relations
    /// the masked statements read, found as `scope` says, whose name a
    /// rule names, with its relation as `regclass` text. Written for the
    /// planner, whose time is most of the lookup's cost: with
    /// [`LookupScope::EverySchema`] the relations come from the catalog's
    /// name index in a sub-select rather than a join (a join doubles the
    /// planning time). A relation name that is not ASCII, or holds a
    /// backslash, cannot go into a literal whatever the client encoding
    /// and `standard_conforming_strings`; then every relation is searched
    /// by column name (slower, the same answer).
    pub fn lookup_sql(&self, marker: &str, scope: LookupScope) -> String {
        let names = self.names_literal();
        let mut sql = lookup_select(marker, &names);
        let written = self
            .written_relations()
            .filter(|_| scope == LookupScope::SearchPath);
        if let Some(relations) = written {
            sql.push_str(" AND a.attrelid OPERATOR(pg_catalog.=) ANY (ARRAY[");
            for (i, relation) in relations.iter().enumerate() {
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str("pg_catalog.to_regclass(");
                sql.push_str(relation);
                sql.push(')');
            }
            sql.push_str("]::pg_catalog.oid[]);");
            return sql;
        }
        let tables = self.table_names();
        if !tables.is_empty() && tables.iter().all(|t| literal_safe(t)) {
            sql.push_str(
                " AND a.attrelid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT c.oid FROM pg_catalog.pg_class c \
                 WHERE c.relname OPERATOR(pg_catalog.=) ANY (ARRAY[",
            );
            for (i, table) in tables.iter().enumerate() {
                if i > 0 {
                    sql.push(',');
                }
                sql.push('\'');
                sql.push_str(&table.replace('\'', "''"));
                sql.push('\'');
            }
            sql.push_str("]::pg_catalog.name[])))");
        }
        sql.push(';');
        sql
    }

    /// The plan of a batch whose lookups covered `self` and then `more`:
    /// their rules and relations (statements are each Execute's own).
    pub fn merged(&self, more: &MaskPlan) -> MaskPlan {
        let mut rules = self.rules.clone();
        for rule in &more.rules {
            if !rules.iter().any(|known| Arc::ptr_eq(known, rule)) {
                rules.push(Arc::clone(rule));
            }
        }
        let mut relations = self.relations.clone();
        for relation in &more.relations {
            if !relations.contains(relation) {
                relations.push(relation.clone());
            }
        }
        MaskPlan {
            rules,
            statements: Vec::new(),
            relations,
            only_first: false,
            direct: None,
        }
    }

    /// The names of the relations read, whatever their schema, once each.
    pub fn table_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::with_capacity(self.relations.len());
        for relation in &self.relations {
            if !names.contains(&relation.name.as_str()) {
                names.push(&relation.name);
            }
        }
        names
    }

    /// The column names the rules name (lowercase plain identifiers), as a
    /// `text[]` literal.
    fn names_literal(&self) -> String {
        let mut names: Vec<&str> = self
            .rules
            .iter()
            .flat_map(|r| r.columns.iter().map(|c| &*c.column))
            .collect();
        names.sort_unstable();
        names.dedup();
        // Column specs are plain identifiers (letters, digits, '_', '$'):
        // no quoting inside the array literal.
        format!("'{{{}}}'::pg_catalog.text[]", names.join(","))
    }

    /// Each relation as written, as a string literal of its quoted name
    /// (`'"crm"."customers"'`), for `to_regclass`; `None` when there is
    /// none or one cannot be a literal ([`literal_safe`]).
    fn written_relations(&self) -> Option<Vec<String>> {
        let safe =
            |r: &TableRef| r.schema.as_deref().is_none_or(literal_safe) && literal_safe(&r.name);
        if self.relations.is_empty() || !self.relations.iter().all(safe) {
            return None;
        }
        let quoted = self.relations.iter().map(|relation| {
            let mut literal = String::from("'");
            if let Some(schema) = &relation.schema {
                push_identifier(&mut literal, schema);
                literal.push('.');
            }
            push_identifier(&mut literal, &relation.name);
            literal.push('\'');
            literal
        });
        Some(quoted.collect())
    }

    /// The prepared lookup's two parameters in text format, as a Bind
    /// carries them: the relations as written (each a quoted identifier,
    /// qualified when written so) and the column names the rules name,
    /// each a `text[]` literal. `None` when a relation cannot be sent
    /// ([`literal_safe`]) or there is none.
    pub fn lookup_parameters(&self) -> Option<[String; 2]> {
        let safe =
            |r: &TableRef| r.schema.as_deref().is_none_or(literal_safe) && literal_safe(&r.name);
        if self.relations.is_empty() || !self.relations.iter().all(safe) {
            return None;
        }
        // In an array literal an element in double quotes takes `\"` for
        // a quote; the identifier inside doubles its own quotes.
        let identifier = |out: &mut String, name: &str| {
            out.push_str("\\\"");
            out.push_str(&name.replace('"', "\\\"\\\""));
            out.push_str("\\\"");
        };
        let mut relations = String::from("{");
        for (i, relation) in self.relations.iter().enumerate() {
            if i > 0 {
                relations.push(',');
            }
            relations.push('"');
            if let Some(schema) = &relation.schema {
                identifier(&mut relations, schema);
                relations.push('.');
            }
            identifier(&mut relations, &relation.name);
            relations.push('"');
        }
        relations.push('}');
        let mut names: Vec<&str> = self
            .rules
            .iter()
            .flat_map(|r| r.columns.iter().map(|c| &*c.column))
            .collect();
        names.sort_unstable();
        names.dedup();
        Some([relations, format!("{{{}}}", names.join(","))])
    }

    /// Adds one row of the lookup's answer (text format: table OID, column
    /// number, column name, relation as `regclass` text) to `resolved`,
    /// with the strictest method of the rules that name it. Names not in
    /// UTF-8 (another client encoding) are compared as lossy text: they are
    /// not ASCII, so they cannot equal a rule's plain names anyway.
    pub fn resolve_row(
        &self,
        values: &[Option<&[u8]>],
        resolved: &mut ResolvedColumns,
    ) -> Result<(), String> {
        let value = |i: usize| -> Result<&[u8], String> {
            values
                .get(i)
                .copied()
                .flatten()
                .ok_or_else(|| format!("column {} of the masking lookup is missing", i + 1))
        };
        let number = |i: usize| -> Option<&str> { std::str::from_utf8(value(i).ok()?).ok() };
        let oid: u32 = number(0)
            .and_then(|v| v.parse().ok())
            .ok_or("the masking lookup returned no valid table OID")?;
        let column: i16 = number(1)
            .and_then(|v| v.parse().ok())
            .ok_or("the masking lookup returned no valid column number")?;
        let name = String::from_utf8_lossy(value(2)?);
        let relation = String::from_utf8_lossy(value(3)?);
        let (schema, table) = split_regclass(&relation);
        let with = self
            .rules
            .iter()
            .filter(|r| {
                r.columns
                    .iter()
                    .any(|c| c.names(schema.as_deref(), &table, &name))
            })
            .map(|r| r.with)
            .max();
        if let Some(with) = with {
            if !resolved.add(oid, column, with) {
                return Err("the masking lookup named more columns than the proxy holds".into());
            }
        }
        Ok(())
    }

    /// The masked columns among `fields`, the RowDescription of a text
    /// whose one statement names its result fields from `relation`
    /// ([`MaskPlan::direct`]): a field the server traces to a table column
    /// is that relation's column of the field's name, masked as the rules
    /// that name it say. The server can trace them to one table only; if
    /// it traces them to more, every one of them is masked, as NULL.
    pub fn resolve_direct(
        &self,
        relation: &TableRef,
        fields: &[FieldDescription<'_>],
    ) -> ResolvedColumns {
        resolve_direct(&self.rules, relation, fields)
    }
}

/// [`MaskPlan::resolve_direct`] for `rules`.
fn resolve_direct(
    rules: &[Arc<MaskRule>],
    relation: &TableRef,
    fields: &[FieldDescription<'_>],
) -> ResolvedColumns {
    let mut resolved = ResolvedColumns::default();
    let mut columns = fields.iter().filter(|f| f.table_oid != 0 && f.column > 0);
    let Some(first) = columns.clone().next() else {
        return resolved;
    };
    if columns.any(|f| f.table_oid != first.table_oid) {
        tracing::warn!(
            relation = %relation.name,
            "a query of one relation returned columns of several tables; all of them are masked"
        );
        for field in fields.iter().filter(|f| f.table_oid != 0 && f.column > 0) {
            resolved.add(field.table_oid, field.column, MaskMethod::Null);
        }
        return resolved;
    }
    for field in fields.iter().filter(|f| f.table_oid != 0 && f.column > 0) {
        let with = rules
            .iter()
            .filter(|r| {
                r.columns
                    .iter()
                    .any(|c| c.names(relation.schema.as_deref(), &relation.name, field.name))
            })
            .map(|r| r.with)
            .max();
        if let Some(with) = with {
            resolved.add(field.table_oid, field.column, with);
        }
    }
    resolved
}

/// Names a session's prepared lookup goes through at most: a new one is
/// taken when the server may or may not still hold the last (an error
/// where the proxy expected it to exist, or not to), and past this many
/// the session keeps to lookups in the Query's text.
pub const MAX_LOOKUP_NAMES: u32 = 8;

/// SQLSTATE of an `EXECUTE` of a statement that does not exist.
const UNDEFINED_PREPARED_STATEMENT: &str = "26000";
/// SQLSTATE of a `PREPARE` under a name taken.
const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";

/// The [`LookupScope::SearchPath`] lookup as a statement a session
/// prepares once (`PREPARE tollgate_mask_<nonce>_s<k>`) and executes in
/// front of each Query whose only masked statement is its first. A
/// prepared lookup runs on a generic plan after its fifth execution, so
/// the server no longer plans it for every message (the planning was most
/// of the lookup's cost, finding 13 in docs/performance.md).
///
/// Used only when nothing else is in flight, so that the first
/// CommandComplete or ErrorResponse of the answer is the `PREPARE`'s or
/// the `EXECUTE`'s: the `PREPARE`'s CommandComplete is dropped, an error
/// says whether the statement may exist, and the client's `DEALLOCATE ALL`
/// or `DISCARD ALL` removes it. The lookup's RowDescription keeps the
/// marker `tollgate_mask_<nonce>_0`. Prepared statements outlive a rolled
/// back transaction, so a `PREPARE` that completed holds.
#[derive(Debug, Default)]
pub struct PreparedLookup {
    /// Names taken so far; the current one ends in `s<names_taken>`.
    names_taken: u32,
    state: PreparedState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum PreparedState {
    /// Not on the server.
    #[default]
    Absent,
    /// Its `PREPARE` is in flight.
    Preparing,
    /// On the server.
    Ready,
}

impl PreparedLookup {
    /// The statements to put in front of a Query for `plan`: its
    /// `PREPARE` (until one completed) and its `EXECUTE`, each with its
    /// `;`. `marker` is the session's `tollgate_mask_<nonce>_`. `None` when
    /// the prepared form cannot serve: names used up, or a relation that
    /// cannot be a literal.
    pub fn sql(&mut self, marker: &str, plan: &MaskPlan) -> Option<String> {
        if self.names_taken >= MAX_LOOKUP_NAMES {
            return None;
        }
        let relations = plan.written_relations()?;
        let name = format!("{marker}s{}", self.names_taken);
        let mut sql = String::new();
        if self.state != PreparedState::Ready {
            sql.push_str(&format!(
                "PREPARE {name}(pg_catalog.text[], pg_catalog.text[]) AS "
            ));
            sql.push_str(&prepared_body(marker));
            sql.push(';');
            self.state = PreparedState::Preparing;
        }
        sql.push_str(&format!(
            "EXECUTE {name}(ARRAY[{}]::pg_catalog.text[], {});",
            relations.join(","),
            plan.names_literal()
        ));
        Some(sql)
    }

    /// The lookup as extended-protocol messages in front of a masked Parse
    /// that opens a batch: the statement's name and, until one completed,
    /// the text to Parse under that name (parameters: the relations as
    /// written and the column names, both `text[]`; see
    /// [`MaskPlan::lookup_parameters`]). `None` when the prepared form
    /// cannot serve (names used up). A Parse, Bind or Execute shares the
    /// statement namespace with SQL `PREPARE`, so both forms use one
    /// statement.
    pub fn for_batch(&mut self, marker: &str) -> Option<(String, Option<String>)> {
        if self.names_taken >= MAX_LOOKUP_NAMES {
            return None;
        }
        let name = format!("{marker}s{}", self.names_taken);
        let parse = (self.state != PreparedState::Ready).then(|| {
            self.state = PreparedState::Preparing;
            prepared_body(marker)
        });
        Some((name, parse))
    }

    /// The ParseComplete of the lookup's Parse sent in a batch.
    pub fn parse_complete(&mut self) {
        if self.state == PreparedState::Preparing {
            self.state = PreparedState::Ready;
        }
    }

    /// The first CommandComplete of an answer that uses the lookup, with
    /// its `tag`; `true` when it is the `PREPARE`'s (the client never sees
    /// it).
    pub fn command_complete(&mut self, tag: &[u8]) -> bool {
        if self.state == PreparedState::Preparing && tag == b"PREPARE" {
            self.state = PreparedState::Ready;
            return true;
        }
        false
    }

    /// The first ErrorResponse of an answer that uses the lookup, with its
    /// SQLSTATE (the server ran nothing after it).
    pub fn failed(&mut self, sqlstate: &str) {
        let lost = match self.state {
            PreparedState::Preparing => sqlstate == DUPLICATE_PREPARED_STATEMENT,
            PreparedState::Ready => sqlstate == UNDEFINED_PREPARED_STATEMENT,
            PreparedState::Absent => false,
        };
        if lost {
            self.names_taken += 1;
            self.state = PreparedState::Absent;
        } else if self.state == PreparedState::Preparing {
            self.state = PreparedState::Absent;
        }
    }

    /// The client's `DEALLOCATE ALL` or `DISCARD ALL` completed.
    pub fn deallocated(&mut self) {
        self.state = PreparedState::Absent;
    }
}

/// The prepared lookup's text: relations (`$1`) as the search path
/// resolves them when it runs, column names `$2`.
fn prepared_body(marker: &str) -> String {
    let mut sql = lookup_select(&format!("{marker}0"), "$2");
    sql.push_str(
        " AND a.attrelid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT pg_catalog.to_regclass(r) \
         FROM pg_catalog.unnest($1) r))",
    );
    sql
}

/// The lookup's select list and column-name condition, without the
/// relations' condition or the final `;`; `names` is a `text[]` expression.
fn lookup_select(marker: &str, names: &str) -> String {
    format!(
        "SELECT a.attrelid::pg_catalog.int8 AS \"{marker}\", a.attnum, a.attname, \
         a.attrelid::pg_catalog.regclass::pg_catalog.text \
         FROM pg_catalog.pg_attribute a \
         WHERE a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped \
         AND pg_catalog.lower(a.attname::pg_catalog.text) OPERATOR(pg_catalog.=) ANY ({names})"
    )
}

/// Whether a name can go into a string literal whatever the client
/// encoding (ASCII) and `standard_conforming_strings` (no backslash).
fn literal_safe(name: &str) -> bool {
    name.is_ascii() && !name.contains('\\')
}

/// `name` as a quoted identifier inside a string literal: `"` doubled for
/// the identifier, `'` doubled for the literal.
fn push_identifier(sql: &mut String, name: &str) {
    sql.push('"');
    for c in name.chars() {
        match c {
            '"' => sql.push_str("\"\""),
            '\'' => sql.push_str("''"),
            c => sql.push(c),
        }
    }
    sql.push('"');
}

/// A relation as `regclass` prints it: `name` when the search path finds
/// it (the schema is then not known), else `schema.name`, each part in
/// double quotes when it needs them (`""` for a quote inside).
fn split_regclass(text: &str) -> (Option<String>, String) {
    let mut parts = Vec::new();
    let mut part = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                part.push('"');
            }
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(std::mem::take(&mut part)),
            _ => part.push(ch),
        }
    }
    parts.push(part);
    let table = parts.pop().unwrap_or_default();
    (parts.pop(), table)
}

/// Type OIDs whose values are text in both formats: `text`, `varchar`,
/// `bpchar`, `name`, `unknown`.
fn is_text_type(type_oid: u32) -> bool {
    matches!(type_oid, 25 | 1043 | 1042 | 19 | 705)
}

/// The masks of one RowDescription's fields; `None` when no field is
/// masked (the rows then pass through untouched).
pub fn row_masks(
    fields: &[FieldDescription<'_>],
    resolved: &ResolvedColumns,
    statement: Option<MaskMethod>,
) -> Option<Vec<FieldMask>> {
    let masks: Vec<FieldMask> = fields
        .iter()
        .map(|f| {
            let origin = FieldOrigin {
                table_oid: f.table_oid,
                column: f.column,
                is_text: is_text_type(f.type_oid),
            };
            field_mask(
                resolved,
                origin,
                statement.is_some(),
                statement.unwrap_or(MaskMethod::Null),
            )
        })
        .collect();
    masks.iter().any(|m| *m != FieldMask::Keep).then_some(masks)
}

/// The values of a DataRow `body`.
fn data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, String> {
    match backend::decode_backend(backend::tag::DATA_ROW, body) {
        Ok(backend::BackendMessage::DataRow(values)) => Ok(values),
        Ok(_) => Err("a DataRow did not decode as one".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The fields of a RowDescription `body`.
fn row_fields(body: &[u8]) -> Result<Vec<FieldDescription<'_>>, String> {
    match backend::decode_backend(backend::tag::ROW_DESCRIPTION, body) {
        Ok(backend::BackendMessage::RowDescription(fields)) => Ok(fields),
        Ok(_) => Err("a RowDescription did not decode as one".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Writes the DataRow `body` with its masked fields replaced, as a whole
/// message, into `out`; returns how many values it masked (NULLs stay
/// NULL and are not counted). A row whose field count differs from the
/// RowDescription's is a server fault.
pub fn mask_data_row(body: &[u8], masks: &[FieldMask], out: &mut Vec<u8>) -> Result<u64, String> {
    let values = data_row(body)?;
    if values.len() != masks.len() {
        return Err(format!(
            "a DataRow has {} fields where its RowDescription has {}",
            values.len(),
            masks.len()
        ));
    }
    let mut w = MessageWriter::new(out, backend::tag::DATA_ROW);
    w.count(values.len());
    let mut masked = 0;
    for (value, mask) in values.iter().zip(masks) {
        let replacement = match (value, mask) {
            (None, _) | (_, FieldMask::Keep) => {
                w.put_value(*value);
                continue;
            }
            (Some(_), FieldMask::Mask(Replacement::Null)) => None,
            (Some(_), FieldMask::Mask(Replacement::Text(t))) => Some(*t),
        };
        w.put_value(replacement);
        masked += 1;
    }
    w.finish();
    Ok(masked)
}

/// Fields of an ErrorResponse kept when its text is withheld: severity,
/// SQLSTATE, the names of the schema, table, column, type and constraint,
/// and the server's source location. None of them holds a value of the
/// data.
const KEPT_ERROR_FIELDS: &[u8] = b"SVCstcdnFLR";

/// SQLSTATEs of errors raised before a statement runs, whose text is the
/// server's own and quotes no data: a failed transaction block (25P02)
/// and a server shutting down (57P01-57P03).
const FIXED_TEXT_ERRORS: [&[u8]; 4] = [b"25P02", b"57P01", b"57P02", b"57P03"];

/// Rewrites an ErrorResponse `body` answering a statement that reads masked
/// columns; `false`: forward it as it is.
///
/// An error found in the statement's text (parse analysis: an unknown
/// column, a bad literal) has a position there and quotes only that text:
/// it is kept, its position counted from the client's own text (`shift`
/// characters of the lookup stand in front of it; an error positioned in
/// the lookup is forwarded as it is). An error raised while the statement
/// runs has no position and its text (message, detail, hint, context) can
/// quote a value, a masked one too (`invalid input syntax for type
/// integer: "ada@example.com"` for `email::int`): the message says it was
/// withheld and the rest of that text is dropped, the fields of
/// [`KEPT_ERROR_FIELDS`] stay; the errors of [`FIXED_TEXT_ERRORS`] pass as
/// they are. A body that does not decode gives an error
/// with the withheld message alone.
pub fn answer_error(body: &[u8], shift: usize, out: &mut Vec<u8>) -> bool {
    let mut r = Reader::new("ErrorResponse", body);
    let mut fields: Vec<(u8, &[u8])> = Vec::new();
    let decoded = loop {
        let Ok(code) = r.get_u8("field type") else {
            break false;
        };
        if code == 0 {
            break true;
        }
        let Ok(value) = r.get_cstr_bytes("field value") else {
            break false;
        };
        fields.push((code, value));
    };
    if !decoded {
        fields.clear();
    }
    let position = fields
        .iter()
        .find(|(c, _)| *c == backend::field::POSITION)
        .map(|(_, v)| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
        });
    if let Some(position) = position {
        let Some(shifted) = position
            .and_then(|p| p.checked_sub(shift))
            .filter(|p| *p > 0)
        else {
            return false;
        };
        if shift == 0 {
            return false;
        }
        let shifted = shifted.to_string();
        let mut w = MessageWriter::new(out, backend::tag::ERROR_RESPONSE);
        for (code, value) in fields {
            let value = if code == backend::field::POSITION {
                shifted.as_bytes()
            } else {
                value
            };
            w.put_u8(code).put_cstr_bytes(value);
        }
        w.put_u8(0);
        w.finish();
        return true;
    }
    let code = fields
        .iter()
        .find(|(c, _)| *c == backend::field::CODE)
        .map_or(&b"XX000"[..], |(_, v)| *v);
    if FIXED_TEXT_ERRORS.contains(&code) {
        return false;
    }
    let message = format!(
        "tollgate: the server's error message is withheld: the statement reads masked columns, and the message could quote a masked value (SQLSTATE {})",
        String::from_utf8_lossy(code)
    );
    let mut w = MessageWriter::new(out, backend::tag::ERROR_RESPONSE);
    let mut wrote_message = false;
    for (field, value) in &fields {
        if *field == backend::field::MESSAGE && !wrote_message {
            w.put_u8(*field).put_cstr(&message);
            wrote_message = true;
        } else if KEPT_ERROR_FIELDS.contains(field) {
            w.put_u8(*field).put_cstr_bytes(value);
        }
    }
    if !decoded {
        w.put_u8(backend::field::SEVERITY).put_cstr("ERROR");
        w.put_u8(backend::field::CODE).put_cstr("XX000");
    }
    if !wrote_message {
        w.put_u8(backend::field::MESSAGE).put_cstr(&message);
    }
    w.put_u8(0);
    w.finish();
    true
}

/// Where the answer to a masked Query is.
#[derive(Debug)]
enum Phase {
    /// The lookup's rows.
    Lookup,
    /// The client's statements: the index of the one answering now.
    Statements(usize),
}

/// The upstream pump's state through the answer to one masked Query, from
/// the lookup's RowDescription to ReadyForQuery.
#[derive(Debug)]
pub struct MaskedAnswer {
    plan: Arc<MaskPlan>,
    resolved: ResolvedColumns,
    phase: Phase,
    /// The current result's field masks, when any field is masked.
    rows: Option<Vec<FieldMask>>,
    /// Characters of the lookup in front of the client's text.
    shift: usize,
}

impl MaskedAnswer {
    /// Starts at the lookup's RowDescription.
    pub fn new(plan: Arc<MaskPlan>, shift: usize) -> MaskedAnswer {
        MaskedAnswer {
            plan,
            resolved: ResolvedColumns::default(),
            phase: Phase::Lookup,
            rows: None,
            shift,
        }
    }

    /// Starts at the first message of the answer to a Query sent without a
    /// lookup ([`MaskPlan::direct`]).
    pub fn direct(plan: Arc<MaskPlan>) -> MaskedAnswer {
        MaskedAnswer {
            plan,
            resolved: ResolvedColumns::default(),
            phase: Phase::Statements(0),
            rows: None,
            shift: 0,
        }
    }

    /// Whether the lookup is still answering (its messages are dropped).
    pub fn in_lookup(&self) -> bool {
        matches!(self.phase, Phase::Lookup)
    }

    /// A DataRow of the lookup.
    pub fn lookup_row(&mut self, body: &[u8]) -> Result<(), String> {
        self.plan.resolve_row(&data_row(body)?, &mut self.resolved)
    }

    /// A CommandComplete (or EmptyQueryResponse): the lookup's ends it, a
    /// statement's moves to the next statement.
    pub fn statement_done(&mut self) {
        self.rows = None;
        self.phase = match self.phase {
            Phase::Lookup => Phase::Statements(0),
            Phase::Statements(i) => Phase::Statements(i.saturating_add(1)),
        };
    }

    /// A RowDescription of the client's statements. A statement past the
    /// analysed ones (which cannot happen unless the server split the text
    /// differently) is treated as masked.
    pub fn row_description(&mut self, body: &[u8]) -> Result<(), String> {
        let fields = row_fields(body)?;
        let statement = match self.phase {
            Phase::Statements(i) => self
                .plan
                .statements
                .get(i)
                .copied()
                .unwrap_or(Some(MaskMethod::Null)),
            Phase::Lookup => Some(MaskMethod::Null),
        };
        self.rows = match &self.plan.direct {
            Some(relation) => {
                let resolved = self.plan.resolve_direct(relation, &fields);
                row_masks(&fields, &resolved, statement)
            }
            None => row_masks(&fields, &self.resolved, statement),
        };
        Ok(())
    }

    /// The masks for the current result's rows, when any field is masked.
    pub fn rows(&self) -> Option<&[FieldMask]> {
        self.rows.as_deref()
    }

    /// How many columns the lookup resolved.
    pub fn resolved(&self) -> usize {
        self.resolved.len()
    }

    /// The lookup's length in characters.
    pub fn shift(&self) -> usize {
        self.shift
    }
}

/// What the client sent in a masked extended-protocol batch, in order: the
/// answers the upstream pump expects for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// ParseComplete, BindComplete or CloseComplete.
    Complete,
    /// Describe of a statement: ParameterDescription, then RowDescription
    /// or NoData.
    DescribeStatement,
    /// Describe of a portal: RowDescription or NoData. `Some` when the
    /// proxy sent it in front of a masked Execute (its answer is dropped):
    /// the method for computed fields of the portal's statement, if any.
    DescribePortal(Option<Option<MaskMethod>>),
    /// Describe of a portal the proxy sent in front of a masked Execute of
    /// a statement that names its fields from one relation
    /// ([`MaskPlan::direct`]): its answer is dropped and its fields masked
    /// by name.
    DescribeDirect(Option<MaskMethod>, DirectFields),
    /// Execute: rows (or COPY data) up to CommandComplete,
    /// EmptyQueryResponse or PortalSuspended; masked when the proxy's
    /// Describe in front of it found masked fields.
    Execute(Option<Vec<FieldMask>>),
    /// Sync: ReadyForQuery ends the batch.
    Sync,
    /// ParseComplete, BindComplete or CloseComplete of a message of the
    /// proxy's own lookup sent inside the batch: dropped.
    LookupComplete,
    /// The Execute of that lookup: its rows resolve the masked columns
    /// and its CommandComplete ends it; all dropped.
    LookupRows,
    /// The Parse of the session's prepared lookup (see
    /// [`PreparedLookup::for_batch`]): its ParseComplete is dropped and
    /// makes the statement known to exist; an error answering it or the
    /// Bind behind it ([`Expect::LookupBound`]) tells whether it may.
    LookupParsed,
    /// The Bind of the session's prepared lookup: dropped.
    LookupBound,
}

/// What masks the fields of a statement that names them from one relation
/// ([`MaskPlan::direct`]): the relation as written and the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectFields {
    relation: TableRef,
    rules: Vec<Arc<MaskRule>>,
}

impl DirectFields {
    /// `plan`'s, when its statement names its fields from one relation.
    pub fn of(plan: &MaskPlan) -> Option<DirectFields> {
        Some(DirectFields {
            relation: plan.direct.clone()?,
            rules: plan.rules.clone(),
        })
    }
}

/// Which message of a masked extended-protocol statement joins a batch
/// (see [`ExtendedBatch::narrow_covers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskedMessage {
    /// Its Parse: the statement's relations are resolved now.
    Parse,
    /// A Bind of it: a statement invalidated since its Parse (by a change
    /// of the search path, say) is analysed again here.
    Bind,
    /// An Execute of a portal of it.
    Execute,
}

/// A lookup resolved on the search path in front of a masked Parse, and
/// what was sent since: it holds for that statement as long as nothing
/// could have run between it and the statement's Bind.
#[derive(Debug)]
struct Narrow {
    plan: Arc<MaskPlan>,
    /// Parse, Bind, Close and Execute messages sent since the lookup (the
    /// statement's own Parse is the first).
    sent: u32,
    /// A Bind of the statement came with nothing run before it.
    bound: bool,
}

/// What the upstream pump does with one message of a masked batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Drop it: the lookup's answer, or the proxy's own Describe's.
    Drop,
    /// Forward it as it is (and handle it as usual).
    Forward,
    /// A DataRow to rewrite with [`ExtendedBatch::row_masks`].
    Mask,
    /// The lookup's ReadyForQuery: drop it, the session is ready again.
    LookupDone,
    /// The ParseComplete of the session's prepared lookup: drop it, the
    /// statement exists.
    LookupParsed,
}

/// The lookup's state in a batch.
#[derive(Debug)]
enum Lookup {
    /// None was sent: the batch is followed only so that a lookup can be
    /// sent inside it if a masked statement comes.
    NotSent,
    /// Sent inside the batch as extended-protocol messages; its rows come
    /// where [`Expect::LookupRows`] stands.
    Inline(ResolvedColumns),
    /// Its rows are coming.
    Answering(ResolvedColumns),
    /// It failed (the transaction had failed, say); its ReadyForQuery is
    /// still to come.
    FailedAnswering,
    /// Done.
    Resolved(ResolvedColumns),
    /// Failed: every field of a masked result is masked.
    Failed,
}

/// A batch of extended-protocol messages (up to Sync), begun at a moment
/// nothing else was in flight, so the server's answers come in a known
/// order: with a masked statement at its start, behind a lookup Query
/// ([`ExtendedBatch::new`]); otherwise followed from its first message
/// ([`ExtendedBatch::followed`]) so that a masked statement later in it
/// can have its lookup sent in front of it as extended-protocol messages
/// ([`ExtendedBatch::lookup_inline`]).
#[derive(Debug)]
pub struct ExtendedBatch {
    plan: Arc<MaskPlan>,
    lookup: Lookup,
    expect: VecDeque<Expect>,
    /// ParameterDescription of the Describe at the front came.
    parameters_seen: bool,
    /// The server answered an error: it skips everything up to Sync.
    skipping: bool,
    /// Expectations at the front of `expect` for messages sent before an
    /// inline lookup: their answers (errors too) are the client's as the
    /// server sent them.
    unmasked_ahead: usize,
    /// The lookup was resolved on the search path for one statement
    /// (`ExtendedBatch::lookup_prepared`): it covers only that one.
    narrow: Option<Narrow>,
    /// A masked statement that needs no lookup ([`MaskPlan::direct`]) was
    /// sent in it: its answers are masked whether or not a lookup is.
    holds_direct: bool,
}

/// Messages one batch can expect at most (past that it is refused).
pub const MAX_EXPECTED: usize = 64 * 1024;

impl ExtendedBatch {
    /// A batch whose lookup was just sent.
    pub fn new(plan: Arc<MaskPlan>) -> ExtendedBatch {
        ExtendedBatch {
            plan,
            lookup: Lookup::Answering(ResolvedColumns::default()),
            expect: VecDeque::new(),
            parameters_seen: false,
            skipping: false,
            unmasked_ahead: 0,
            narrow: None,
            holds_direct: false,
        }
    }

    /// A batch with no masked statement yet: no lookup is sent.
    pub fn followed() -> ExtendedBatch {
        ExtendedBatch {
            plan: Arc::new(MaskPlan::default()),
            lookup: Lookup::NotSent,
            expect: VecDeque::new(),
            parameters_seen: false,
            skipping: false,
            unmasked_ahead: 0,
            narrow: None,
            holds_direct: false,
        }
    }

    /// Whether no lookup was sent in it (it is only followed).
    pub fn lookup_not_sent(&self) -> bool {
        matches!(self.lookup, Lookup::NotSent)
    }

    /// Whether an error the server sends now may quote a masked value: it
    /// answers a message of a masked batch, not one sent before its inline
    /// lookup.
    pub fn error_may_quote_masked(&self) -> bool {
        self.holds_masked() && self.unmasked_ahead == 0
    }

    /// Whether a masked statement was sent in it (behind a lookup or
    /// needing none): it cannot be let go before its Sync is answered.
    pub fn holds_masked(&self) -> bool {
        !self.lookup_not_sent() || self.holds_direct
    }

    /// A masked statement that needs no lookup was sent in it
    /// ([`Expect::DescribeDirect`] masks its rows).
    pub fn direct_sent(&mut self) {
        // Errors answering what was sent before the first masked statement
        // are the client's as the server sent them.
        if !self.holds_masked() {
            self.unmasked_ahead = self.expect.len();
        }
        self.holds_direct = true;
    }

    /// The next expectation, taken off the front.
    fn pop(&mut self) -> Option<Expect> {
        self.unmasked_ahead = self.unmasked_ahead.saturating_sub(1);
        self.expect.pop_front()
    }

    /// Whether nothing of it is waiting for an answer.
    pub fn nothing_expected(&self) -> bool {
        self.expect.is_empty()
    }

    /// A lookup for `plan` is sent inside the batch now: its Parse, Bind,
    /// Execute and two Closes. The first of a followed batch; or one more,
    /// for relations or rules its earlier lookup did not cover, whose rows
    /// add to what that one resolved. `false` when the batch is full.
    pub fn lookup_inline(&mut self, plan: &MaskPlan) -> bool {
        if self.expect.len() + 5 > MAX_EXPECTED {
            return false;
        }
        if matches!(self.lookup, Lookup::NotSent) {
            self.plan = Arc::new(self.plan.merged(plan));
            self.lookup = Lookup::Inline(ResolvedColumns::default());
            // Errors answering a masked statement sent before it are
            // withheld (`unmasked_ahead` stops in front of that one).
            if !self.holds_direct {
                self.unmasked_ahead = self.expect.len();
            }
        } else {
            self.plan = Arc::new(self.plan.merged(plan));
        }
        self.expect.extend([
            Expect::LookupComplete,
            Expect::LookupComplete,
            Expect::LookupRows,
            Expect::LookupComplete,
            Expect::LookupComplete,
        ]);
        true
    }

    /// The session's prepared lookup is sent in front of `plan`'s Parse,
    /// the batch's first message: its Parse (`parse`, when the statement
    /// is not on the server yet), a Bind of a portal, an Execute and a
    /// Close of the portal. It resolves the relations on the search path
    /// at that moment, which is what the Parse behind it resolves, so it
    /// covers that statement alone (see [`ExtendedBatch::narrow_covers`]).
    pub fn lookup_prepared(&mut self, plan: &Arc<MaskPlan>, parse: bool) -> bool {
        if !matches!(self.lookup, Lookup::NotSent) || !self.expect.is_empty() {
            return false;
        }
        self.plan = Arc::clone(plan);
        self.lookup = Lookup::Inline(ResolvedColumns::default());
        if parse {
            self.expect.push_back(Expect::LookupParsed);
        }
        self.expect.extend([
            Expect::LookupBound,
            Expect::LookupRows,
            Expect::LookupComplete,
        ]);
        self.narrow = Some(Narrow {
            plan: Arc::clone(plan),
            sent: 0,
            bound: false,
        });
        true
    }

    /// Whether the batch's lookup was resolved on the search path for one
    /// statement; then `Some(covered)`: whether it covers `message` of the
    /// statement whose plan is `plan`. It does for the statement's first
    /// Bind when nothing but its Parse (and Describes, Flushes) was sent
    /// since the lookup, and for the Executes of the portal that Bind
    /// made. Anything else (another statement, another Bind, a Bind
    /// behind a message that may have run code, which could change the
    /// search path or add a temporary table that an analysis again at the
    /// Bind would find) needs a lookup over every schema.
    pub fn narrow_covers(&mut self, plan: &Arc<MaskPlan>, message: MaskedMessage) -> Option<bool> {
        let narrow = self.narrow.as_mut()?;
        if !Arc::ptr_eq(&narrow.plan, plan) {
            return Some(false);
        }
        Some(match message {
            MaskedMessage::Parse => false,
            MaskedMessage::Bind if narrow.sent == 1 && !narrow.bound => {
                narrow.bound = true;
                true
            }
            MaskedMessage::Bind => false,
            MaskedMessage::Execute => narrow.bound,
        })
    }

    /// The lookup resolved on the search path no longer covers anything
    /// new: one over every schema follows, for all of the batch's
    /// relations (returned), so that what is covered can again be told by
    /// relation name.
    pub fn widen(&mut self) -> Arc<MaskPlan> {
        self.narrow = None;
        Arc::clone(&self.plan)
    }

    /// Whether the lookup was resolved on the search path for one
    /// statement.
    pub fn is_narrow(&self) -> bool {
        self.narrow.is_some()
    }

    /// The plan its lookup resolves.
    pub fn plan(&self) -> &Arc<MaskPlan> {
        &self.plan
    }

    /// The client sent a message with this answer; `false` when the batch
    /// is full.
    pub fn expect(&mut self, answer: Expect) -> bool {
        if self.expect.len() >= MAX_EXPECTED {
            return false;
        }
        if let Some(narrow) = &mut self.narrow {
            if matches!(answer, Expect::Complete | Expect::Execute(_)) {
                narrow.sent = narrow.sent.saturating_add(1);
            }
        }
        self.expect.push_back(answer);
        true
    }

    /// The front expectation is the Parse or Bind of the session's
    /// prepared lookup (an error now is about that statement).
    pub fn prepared_lookup_ahead(&self) -> bool {
        matches!(
            self.expect.front(),
            Some(Expect::LookupParsed | Expect::LookupBound)
        )
    }

    /// Classifies the next message from the server, `tag`, with its body
    /// when the caller has it whole (RowDescription and DataRow of the
    /// lookup and of the proxy's Describe need it: see
    /// [`ExtendedBatch::needs_body`]). `Err` when the server's answers do
    /// not follow what was sent: the caller ends the session, since rows
    /// could no longer be told apart.
    pub fn answer(&mut self, tag: u8, body: Option<&[u8]>) -> Result<Disposition, String> {
        use backend::tag::*;
        if matches!(self.lookup, Lookup::Answering(_) | Lookup::FailedAnswering) {
            return self.lookup_answer(tag, body);
        }
        if self.skipping {
            return match tag {
                READY_FOR_QUERY => {
                    // What was sent after the error up to Sync was skipped.
                    while let Some(e) = self.pop() {
                        if e == Expect::Sync {
                            break;
                        }
                    }
                    self.skipping = false;
                    Ok(Disposition::Forward)
                }
                NOTICE_RESPONSE | PARAMETER_STATUS | NOTIFICATION_RESPONSE | ERROR_RESPONSE => {
                    Ok(Disposition::Forward)
                }
                _ => Err(format!(
                    "message type {} while the server skips to Sync",
                    char::from(tag)
                )),
            };
        }
        match tag {
            NOTICE_RESPONSE | PARAMETER_STATUS | NOTIFICATION_RESPONSE => Ok(Disposition::Forward),
            ERROR_RESPONSE => {
                self.skipping = true;
                self.parameters_seen = false;
                Ok(Disposition::Forward)
            }
            READY_FOR_QUERY => match self.pop() {
                Some(Expect::Sync) => Ok(Disposition::Forward),
                other => Err(format!("ReadyForQuery where {other:?} was expected")),
            },
            PARSE_COMPLETE | BIND_COMPLETE | CLOSE_COMPLETE => match self.pop() {
                Some(Expect::Complete) => Ok(Disposition::Forward),
                Some(Expect::LookupComplete | Expect::LookupBound) => Ok(Disposition::Drop),
                Some(Expect::LookupParsed) if tag == PARSE_COMPLETE => {
                    Ok(Disposition::LookupParsed)
                }
                other => Err(format!(
                    "message type {} where {other:?} was expected",
                    char::from(tag)
                )),
            },
            PARAMETER_DESCRIPTION => match self.expect.front() {
                Some(Expect::DescribeStatement) if !self.parameters_seen => {
                    self.parameters_seen = true;
                    Ok(Disposition::Forward)
                }
                other => Err(format!("ParameterDescription where {other:?} was expected")),
            },
            ROW_DESCRIPTION | NO_DATA => match self.pop() {
                Some(Expect::DescribeStatement) if self.parameters_seen => {
                    self.parameters_seen = false;
                    Ok(Disposition::Forward)
                }
                Some(Expect::DescribePortal(None)) => Ok(Disposition::Forward),
                Some(expect @ (Expect::DescribePortal(Some(_)) | Expect::DescribeDirect(_, _))) => {
                    let masks = match (tag, body, expect) {
                        (NO_DATA, _, _) => None,
                        (_, Some(body), Expect::DescribeDirect(computed, direct)) => {
                            let fields = row_fields(body)?;
                            let resolved = resolve_direct(&direct.rules, &direct.relation, &fields);
                            row_masks(&fields, &resolved, computed)
                        }
                        (_, Some(body), Expect::DescribePortal(Some(computed))) => {
                            self.describe_masks(body, computed)?
                        }
                        _ => return Err("a RowDescription was not read whole".into()),
                    };
                    match self.expect.front_mut() {
                        Some(Expect::Execute(slot)) => *slot = masks,
                        other => {
                            return Err(format!(
                                "the proxy's Describe is not followed by its Execute ({other:?})"
                            ))
                        }
                    }
                    Ok(Disposition::Drop)
                }
                other => Err(format!(
                    "message type {} where {other:?} was expected",
                    char::from(tag)
                )),
            },
            DATA_ROW => match self.expect.front() {
                Some(Expect::Execute(Some(_))) => Ok(Disposition::Mask),
                Some(Expect::Execute(None)) => Ok(Disposition::Forward),
                Some(Expect::LookupRows) => {
                    if let Lookup::Inline(resolved) | Lookup::Resolved(resolved) = &mut self.lookup
                    {
                        let body = body.ok_or("a lookup row was not read whole")?;
                        self.plan.resolve_row(&data_row(body)?, resolved)?;
                    }
                    Ok(Disposition::Drop)
                }
                other => Err(format!("DataRow where {other:?} was expected")),
            },
            COPY_IN_RESPONSE | COPY_OUT_RESPONSE | COPY_DATA | COPY_DONE => {
                match self.expect.front() {
                    Some(Expect::Execute(_)) => Ok(Disposition::Forward),
                    other => Err(format!(
                        "message type {} where {other:?} was expected",
                        char::from(tag)
                    )),
                }
            }
            COMMAND_COMPLETE | EMPTY_QUERY_RESPONSE | PORTAL_SUSPENDED => {
                match self.pop() {
                    Some(Expect::Execute(_)) => Ok(Disposition::Forward),
                    Some(Expect::LookupRows) if tag == COMMAND_COMPLETE => {
                        // The first inline lookup is done; a later one
                        // added its rows to what is resolved already.
                        if matches!(self.lookup, Lookup::Inline(_)) {
                            let lookup = std::mem::replace(&mut self.lookup, Lookup::Failed);
                            if let Lookup::Inline(resolved) = lookup {
                                self.lookup = Lookup::Resolved(resolved);
                            }
                        }
                        Ok(Disposition::Drop)
                    }
                    other => Err(format!(
                        "message type {} where {other:?} was expected",
                        char::from(tag)
                    )),
                }
            }
            _ => Err(format!(
                "message type {} in a masked batch",
                char::from(tag)
            )),
        }
    }

    /// Whether the caller must read a message of type `tag` whole before
    /// [`ExtendedBatch::answer`].
    pub fn needs_body(&self, tag: u8) -> bool {
        use backend::tag::*;
        match &self.lookup {
            Lookup::Answering(_) | Lookup::FailedAnswering => tag == DATA_ROW,
            _ => match tag {
                ROW_DESCRIPTION => {
                    matches!(
                        self.expect.front(),
                        Some(Expect::DescribePortal(Some(_)) | Expect::DescribeDirect(_, _))
                    )
                }
                DATA_ROW => matches!(
                    self.expect.front(),
                    Some(Expect::Execute(Some(_)) | Expect::LookupRows)
                ),
                _ => false,
            },
        }
    }

    /// The masks of the current Execute's rows.
    pub fn row_masks(&self) -> Option<&[FieldMask]> {
        match self.expect.front() {
            Some(Expect::Execute(Some(masks))) => Some(masks),
            _ => None,
        }
    }

    /// The batch is over (its Sync answered).
    pub fn is_done(&self) -> bool {
        !matches!(self.lookup, Lookup::Answering(_) | Lookup::FailedAnswering)
            && self.expect.is_empty()
    }

    /// A message of the lookup's answer: all dropped but for run-time
    /// parameter changes and notifications, which are the client's too.
    fn lookup_answer(&mut self, tag: u8, body: Option<&[u8]>) -> Result<Disposition, String> {
        use backend::tag::*;
        match tag {
            ROW_DESCRIPTION | COMMAND_COMPLETE | NOTICE_RESPONSE => Ok(Disposition::Drop),
            DATA_ROW => {
                if let Lookup::Answering(resolved) = &mut self.lookup {
                    let body = body.ok_or("a lookup row was not read whole")?;
                    self.plan.resolve_row(&data_row(body)?, resolved)?;
                }
                Ok(Disposition::Drop)
            }
            ERROR_RESPONSE => {
                self.lookup = Lookup::FailedAnswering;
                Ok(Disposition::Drop)
            }
            READY_FOR_QUERY => {
                let lookup = std::mem::replace(&mut self.lookup, Lookup::Failed);
                if let Lookup::Answering(resolved) = lookup {
                    self.lookup = Lookup::Resolved(resolved);
                }
                Ok(Disposition::LookupDone)
            }
            PARAMETER_STATUS | NOTIFICATION_RESPONSE => Ok(Disposition::Forward),
            _ => Err(format!(
                "message type {} in the answer to the masking lookup",
                char::from(tag)
            )),
        }
    }

    /// The masks for a masked portal's fields, from the proxy's Describe.
    fn describe_masks(
        &self,
        body: &[u8],
        computed: Option<MaskMethod>,
    ) -> Result<Option<Vec<FieldMask>>, String> {
        let fields = row_fields(body)?;
        match &self.lookup {
            Lookup::Resolved(resolved) => Ok(row_masks(&fields, resolved, computed)),
            // Nothing is known: every field is masked.
            _ => Ok(Some(
                fields
                    .iter()
                    .map(|f| {
                        FieldMask::Mask(MaskMethod::Null.replacement(is_text_type(f.type_oid)))
                    })
                    .collect(),
            )),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::masking::{ColumnSpec, REDACTED};

    fn plan(columns: &[&str], with: MaskMethod) -> MaskPlan {
        MaskPlan {
            rules: vec![Arc::new(MaskRule {
                columns: columns
                    .iter()
                    .map(|c| ColumnSpec::parse(c).unwrap())
                    .collect(),
                with,
            })],
            statements: vec![Some(with)],
            relations: Vec::new(),
            only_first: true,
            direct: None,
        }
    }

    /// Relations read without a schema.
    fn unqualified(names: &[&str]) -> Vec<TableRef> {
        names
            .iter()
            .map(|&name| TableRef {
                schema: None,
                name: name.to_owned(),
            })
            .collect()
    }

    fn field(name: &str, table_oid: u32, column: i16, type_oid: u32) -> FieldDescription<'_> {
        FieldDescription {
            name,
            table_oid,
            column,
            type_oid,
            type_len: -1,
            type_mod: -1,
            format: 0,
        }
    }

    #[test]
    fn a_direct_query_masks_the_fields_named_like_a_masked_column() {
        let mut plan = plan(
            &["customers.email", "crm.people.phone", "ssn"],
            MaskMethod::Redact,
        );
        let customers = TableRef {
            schema: None,
            name: "customers".into(),
        };
        let fields = [
            field("id", 16400, 1, 23),
            field("Email", 16400, 3, 25),
            field("ssn", 16400, 4, 25),
            field("upper", 0, 0, 25),
            field("ctid", 16400, -1, 27),
        ];
        let resolved = plan.resolve_direct(&customers, &fields);
        assert_eq!(resolved.get(16400, 3), Some(MaskMethod::Redact));
        assert_eq!(resolved.get(16400, 4), Some(MaskMethod::Redact));
        assert_eq!(resolved.len(), 2);
        let masks = row_masks(&fields, &resolved, Some(MaskMethod::Redact)).unwrap();
        assert_eq!(masks[0], FieldMask::Keep);
        assert!(matches!(masks[1], FieldMask::Mask(_)));
        // Computed fields follow the statement's method, as with a lookup.
        assert!(matches!(masks[3], FieldMask::Mask(_)));
        assert!(matches!(masks[4], FieldMask::Mask(_)));

        // A rule's schema is matched against the schema written; a table
        // written without one may be in any.
        let people = |schema: Option<&str>| TableRef {
            schema: schema.map(str::to_owned),
            name: "people".into(),
        };
        let phone = [field("phone", 16500, 2, 25)];
        assert_eq!(plan.resolve_direct(&people(None), &phone).len(), 1);
        assert_eq!(plan.resolve_direct(&people(Some("crm")), &phone).len(), 1);
        assert_eq!(
            plan.resolve_direct(&people(Some("public")), &phone).len(),
            0
        );
        assert_eq!(plan.resolve_direct(&customers, &phone).len(), 0);

        // Columns of two tables cannot come from a query of one: all of
        // them are masked, as NULL.
        plan.statements = vec![None];
        let two = [field("id", 16400, 1, 23), field("id", 16500, 1, 23)];
        let resolved = plan.resolve_direct(&customers, &two);
        assert_eq!(resolved.get(16400, 1), Some(MaskMethod::Null));
        assert_eq!(resolved.get(16500, 1), Some(MaskMethod::Null));
    }

    #[test]
    fn the_lookup_names_each_column_once_and_qualifies_its_operators() {
        let mut p = plan(
            &["customers.email", "crm.contacts.email", "ssn"],
            MaskMethod::Redact,
        );
        p.rules.push(Arc::new(MaskRule {
            columns: vec![ColumnSpec::parse("phone").unwrap()],
            with: MaskMethod::Null,
        }));
        p.relations = unqualified(&["customers", "it's", "customers"]);
        let sql = p.lookup_sql("tollgate_mask_00_1", LookupScope::EverySchema);
        assert!(sql.contains("AS \"tollgate_mask_00_1\""), "{sql}");
        assert!(
            sql.contains("ANY ('{email,phone,ssn}'::pg_catalog.text[])"),
            "{sql}"
        );
        assert!(
            sql.ends_with(
                "c.relname OPERATOR(pg_catalog.=) ANY (ARRAY['customers','it''s']::pg_catalog.name[])));"
            ),
            "{sql}"
        );
        assert!(!sql.contains(" = "), "every operator is qualified: {sql}");
        assert!(sql.is_ascii());
        // A name the client's encoding might not carry: every relation.
        p.relations = unqualified(&["customers", "café"]);
        let sql = p.lookup_sql("m", LookupScope::EverySchema);
        assert!(!sql.contains("relname OPERATOR"), "{sql}");
        assert!(sql.ends_with("::pg_catalog.text[]);"), "{sql}");
        // Nor one with a backslash (an escape when
        // standard_conforming_strings is off).
        p.relations = unqualified(&["a\\b"]);
        assert!(!p
            .lookup_sql("m", LookupScope::EverySchema)
            .contains("relname OPERATOR"));
    }

    #[test]
    fn a_lookup_on_the_search_path_resolves_each_relation_as_written() {
        let mut p = plan(&["customers.email"], MaskMethod::Redact);
        let relation = |schema: Option<&str>, name: &str| TableRef {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        };
        p.relations = vec![
            relation(None, "customers"),
            relation(Some("crm"), "customers"),
            relation(None, "Odd \"it's\""),
        ];
        let sql = p.lookup_sql("m", LookupScope::SearchPath);
        assert!(
            sql.ends_with(
                "a.attrelid OPERATOR(pg_catalog.=) ANY (ARRAY[pg_catalog.to_regclass('\"customers\"'),\
                 pg_catalog.to_regclass('\"crm\".\"customers\"'),\
                 pg_catalog.to_regclass('\"Odd \"\"it''s\"\"\"')]::pg_catalog.oid[]);"
            ),
            "{sql}"
        );
        assert!(!sql.contains("relname"), "{sql}");
        assert!(!sql.contains(" = "), "every operator is qualified: {sql}");
        // What cannot be a literal in any encoding: every schema, by name.
        p.relations.push(relation(Some("café"), "customers"));
        let sql = p.lookup_sql("m", LookupScope::SearchPath);
        assert!(!sql.contains("to_regclass"), "{sql}");
        // No relation (a statement reading none): every relation.
        p.relations.clear();
        let sql = p.lookup_sql("m", LookupScope::SearchPath);
        assert!(
            !sql.contains("to_regclass") && !sql.contains("relname"),
            "{sql}"
        );
    }

    #[test]
    fn the_prepared_lookup_is_prepared_once_and_renamed_when_it_may_be_lost() {
        let mut p = plan(&["customers.email", "phone"], MaskMethod::Redact);
        p.relations = vec![TableRef {
            schema: Some("crm".into()),
            name: "it's".into(),
        }];
        let mut lookup = PreparedLookup::default();
        let first = lookup.sql("tm_", &p).unwrap();
        assert_eq!(
            first,
            "PREPARE tm_s0(pg_catalog.text[], pg_catalog.text[]) AS SELECT a.attrelid::pg_catalog.int8 AS \"tm_0\", \
             a.attnum, a.attname, a.attrelid::pg_catalog.regclass::pg_catalog.text FROM pg_catalog.pg_attribute a \
             WHERE a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped \
             AND pg_catalog.lower(a.attname::pg_catalog.text) OPERATOR(pg_catalog.=) ANY ($2) \
             AND a.attrelid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT pg_catalog.to_regclass(r) FROM pg_catalog.unnest($1) r));\
             EXECUTE tm_s0(ARRAY['\"crm\".\"it''s\"']::pg_catalog.text[], '{email,phone}'::pg_catalog.text[]);"
        );
        // Until its PREPARE completes, it is prepared again.
        assert!(lookup.sql("tm_", &p).unwrap().starts_with("PREPARE tm_s0("));
        assert!(!lookup.command_complete(b"SELECT 1"));
        assert!(lookup.command_complete(b"PREPARE"));
        let execute = lookup.sql("tm_", &p).unwrap();
        assert!(execute.starts_with("EXECUTE tm_s0(ARRAY["), "{execute}");
        assert!(!lookup.command_complete(b"PREPARE"), "only its own PREPARE");
        // An aborted transaction fails the EXECUTE; the statement stays.
        lookup.failed("25P02");
        assert!(lookup.sql("tm_", &p).unwrap().starts_with("EXECUTE tm_s0("));
        // The client deallocated everything: prepared again, same name.
        lookup.deallocated();
        assert!(lookup.sql("tm_", &p).unwrap().starts_with("PREPARE tm_s0("));
        lookup.failed("25P02");
        assert!(lookup.sql("tm_", &p).unwrap().starts_with("PREPARE tm_s0("));
        // The name was taken: another.
        lookup.failed("42P05");
        assert!(lookup.sql("tm_", &p).unwrap().starts_with("PREPARE tm_s1("));
        assert!(lookup.command_complete(b"PREPARE"));
        // It vanished (a DEALLOCATE the proxy did not see): another name.
        lookup.failed("26000");
        assert!(lookup.sql("tm_", &p).unwrap().starts_with("PREPARE tm_s2("));
        for _ in 2..MAX_LOOKUP_NAMES {
            lookup.failed("42P05");
            lookup.sql("tm_", &p);
        }
        assert_eq!(lookup.sql("tm_", &p), None, "names used up");
        // A relation that cannot be a literal: not prepared.
        let mut fresh = PreparedLookup::default();
        p.relations[0].name = "café".into();
        assert_eq!(fresh.sql("tm_", &p), None);
    }

    #[test]
    fn the_prepared_lookup_in_a_batch_takes_its_parameters_as_a_bind_carries_them() {
        let mut p = plan(&["customers.email", "phone"], MaskMethod::Redact);
        p.relations = vec![
            TableRef {
                schema: Some("crm".into()),
                name: "say \"hi\"".into(),
            },
            TableRef {
                schema: None,
                name: "orders".into(),
            },
        ];
        assert_eq!(
            p.lookup_parameters(),
            Some([
                r#"{"\"crm\".\"say \"\"hi\"\"\"","\"orders\""}"#.to_owned(),
                "{email,phone}".to_owned()
            ])
        );
        let mut lookup = PreparedLookup::default();
        let (name, parse) = lookup.for_batch("tm_").unwrap();
        assert_eq!(name, "tm_s0");
        let parse = parse.unwrap();
        assert!(
            parse.starts_with("SELECT a.attrelid::pg_catalog.int8 AS \"tm_0\""),
            "{parse}"
        );
        assert!(parse.ends_with("FROM pg_catalog.unnest($1) r))"), "{parse}");
        // Parsed once; the SQL form then only executes it.
        lookup.parse_complete();
        assert_eq!(lookup.for_batch("tm_"), Some(("tm_s0".to_owned(), None)));
        assert!(lookup.sql("tm_", &p).unwrap().starts_with("EXECUTE tm_s0("));
        // Gone (its Bind failed): parsed again under another name.
        lookup.failed("26000");
        let (name, parse) = lookup.for_batch("tm_").unwrap();
        assert_eq!(name, "tm_s1");
        assert!(parse.is_some());
        // Its Parse failed in an aborted transaction: parsed again.
        lookup.failed("25P02");
        assert!(lookup.for_batch("tm_").unwrap().1.is_some());
        p.relations.clear();
        assert_eq!(p.lookup_parameters(), None, "no relation");
    }

    #[test]
    fn a_lookup_on_the_search_path_covers_its_statement_until_something_else_may_run() {
        use backend::tag::*;
        let statement = Arc::new(plan(&["customers.email"], MaskMethod::Redact));
        let other = Arc::new(plan(&["customers.email"], MaskMethod::Redact));
        let mut batch = ExtendedBatch::followed();
        assert!(batch.lookup_prepared(&statement, true));
        assert!(batch.is_narrow());
        // The statement's Parse, a Describe of it, then its Bind: covered.
        assert!(batch.expect(Expect::Complete));
        assert!(batch.expect(Expect::DescribeStatement));
        assert_eq!(
            batch.narrow_covers(&other, MaskedMessage::Bind),
            Some(false)
        );
        assert_eq!(
            batch.narrow_covers(&statement, MaskedMessage::Execute),
            Some(false)
        );
        assert_eq!(
            batch.narrow_covers(&statement, MaskedMessage::Bind),
            Some(true)
        );
        assert!(batch.expect(Expect::Complete));
        // Executes of the portal that Bind made are; a second Bind is not.
        assert_eq!(
            batch.narrow_covers(&statement, MaskedMessage::Execute),
            Some(true)
        );
        assert_eq!(
            batch.narrow_covers(&statement, MaskedMessage::Bind),
            Some(false)
        );
        assert_eq!(
            batch.narrow_covers(&statement, MaskedMessage::Parse),
            Some(false)
        );
        assert!(batch.expect(Expect::DescribePortal(Some(None))));
        assert!(batch.expect(Expect::Execute(None)));
        assert!(batch.expect(Expect::Sync));
        // The answers: the lookup's Parse, Bind, rows and Close dropped.
        assert_eq!(
            batch.answer(PARSE_COMPLETE, None),
            Ok(Disposition::LookupParsed)
        );
        assert!(batch.prepared_lookup_ahead());
        assert_eq!(batch.answer(BIND_COMPLETE, None), Ok(Disposition::Drop));
        assert!(!batch.prepared_lookup_ahead());
        let row = lookup_row("16384", "3", "email", "customers");
        assert!(batch.needs_body(DATA_ROW));
        assert_eq!(batch.answer(DATA_ROW, Some(&row)), Ok(Disposition::Drop));
        assert_eq!(batch.answer(COMMAND_COMPLETE, None), Ok(Disposition::Drop));
        assert_eq!(batch.answer(CLOSE_COMPLETE, None), Ok(Disposition::Drop));
        assert_eq!(batch.answer(PARSE_COMPLETE, None), Ok(Disposition::Forward));
        assert_eq!(
            batch.answer(PARAMETER_DESCRIPTION, None),
            Ok(Disposition::Forward)
        );
        assert_eq!(
            batch.answer(ROW_DESCRIPTION, None),
            Ok(Disposition::Forward)
        );
        assert_eq!(batch.answer(BIND_COMPLETE, None), Ok(Disposition::Forward));
        let fields = row_description(vec![
            field("id", 16384, 1, 23),
            field("email", 16384, 3, 25),
        ]);
        assert_eq!(
            batch.answer(ROW_DESCRIPTION, Some(&fields)),
            Ok(Disposition::Drop)
        );
        assert_eq!(batch.answer(DATA_ROW, None), Ok(Disposition::Mask));
        assert_eq!(
            batch.row_masks(),
            Some(
                &[
                    FieldMask::Keep,
                    FieldMask::Mask(Replacement::Text(crate::masking::REDACTED))
                ][..]
            )
        );
        assert_eq!(
            batch.answer(COMMAND_COMPLETE, None),
            Ok(Disposition::Forward)
        );
        the_sync_ends_it(&mut batch);

        // Something that may run code before the Bind (another statement's
        // Bind and Execute): not covered; the batch widens to every schema.
        let mut batch = ExtendedBatch::followed();
        assert!(batch.lookup_prepared(&statement, false));
        for e in [
            Expect::Complete,
            Expect::Complete,
            Expect::Complete,
            Expect::Execute(None),
        ] {
            assert!(batch.expect(e));
        }
        assert_eq!(
            batch.narrow_covers(&statement, MaskedMessage::Bind),
            Some(false)
        );
        let widened = batch.widen();
        assert!(Arc::ptr_eq(&widened, &statement));
        assert!(!batch.is_narrow());
        assert_eq!(batch.narrow_covers(&statement, MaskedMessage::Bind), None);
        // Only a batch's first message takes the lookup on the search path.
        assert!(!batch.lookup_prepared(&statement, false));
    }

    #[test]
    fn lookup_rows_resolve_only_the_columns_a_rule_names() {
        let p = plan(&["customers.email", "crm.people.phone"], MaskMethod::Redact);
        let mut resolved = ResolvedColumns::default();
        let row = |oid: &'static str, column: &'static str, relation: &'static str| {
            vec![
                Some(oid.as_bytes()),
                Some(&b"3"[..]),
                Some(column.as_bytes()),
                Some(relation.as_bytes()),
            ]
        };
        for (oid, column, relation, masked) in [
            ("16384", "email", "customers", true),
            ("16385", "EMAIL", "\"Sales\".customers", true),
            ("16390", "email", "orders", false),
            ("16391", "phone", "people", true),
            ("16392", "phone", "crm.people", true),
            ("16393", "phone", "hr.people", false),
            ("16394", "phone", "\"crm.x\".people", false),
        ] {
            p.resolve_row(&row(oid, column, relation), &mut resolved)
                .unwrap();
            let oid: u32 = oid.parse().unwrap();
            assert_eq!(
                resolved.get(oid, 3).is_some(),
                masked,
                "{relation}.{column}"
            );
        }
        let err = p
            .resolve_row(&row("x", "email", "customers"), &mut resolved)
            .unwrap_err();
        assert!(err.contains("no valid table OID"), "{err}");
        let err = p
            .resolve_row(&row("1", "email", "t")[..2], &mut resolved)
            .unwrap_err();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn regclass_text_splits_into_schema_and_name() {
        assert_eq!(split_regclass("customers"), (None, "customers".into()));
        assert_eq!(
            split_regclass("crm.customers"),
            (Some("crm".into()), "customers".into())
        );
        assert_eq!(
            split_regclass("\"My.Schema\".\"a \"\"b\"\"\""),
            (Some("My.Schema".into()), "a \"b\"".into())
        );
    }

    #[test]
    fn rows_are_rewritten_field_by_field() {
        let mut resolved = ResolvedColumns::default();
        resolved.add(16384, 3, MaskMethod::Redact);
        resolved.add(16384, 4, MaskMethod::Null);
        let fields = [
            field("id", 16384, 1, 23),
            field("e", 16384, 3, 25),
            field("born", 16384, 4, 1082),
            field("upper", 0, 0, 25),
        ];
        // Not a masked statement: only the resolved columns.
        let masks = row_masks(&fields, &resolved, None).unwrap();
        let mut row = Vec::new();
        let values: [Option<&[u8]>; 4] = [
            Some(b"7"),
            Some(b"ada@example.com"),
            Some(b"1815-12-10"),
            Some(b"ADA"),
        ];
        BackendMessage::DataRow(values.to_vec()).encode(&mut row);
        let mut out = Vec::new();
        assert_eq!(mask_data_row(&row[5..], &masks, &mut out).unwrap(), 2);
        let decoded = backend::decode_backend(out[0], &out[5..]).unwrap();
        assert_eq!(
            decoded,
            BackendMessage::DataRow(vec![Some(b"7"), Some(REDACTED), None, Some(b"ADA")])
        );
        // A masked statement: the computed field too.
        let masks = row_masks(&fields, &resolved, Some(MaskMethod::Redact)).unwrap();
        out.clear();
        assert_eq!(mask_data_row(&row[5..], &masks, &mut out).unwrap(), 3);
        let decoded = backend::decode_backend(out[0], &out[5..]).unwrap();
        assert_eq!(
            decoded,
            BackendMessage::DataRow(vec![Some(b"7"), Some(REDACTED), None, Some(REDACTED)])
        );
        // NULL stays NULL; a row of the wrong width is refused.
        out.clear();
        let mut nulls = Vec::new();
        BackendMessage::DataRow(vec![None, None, None, None]).encode(&mut nulls);
        assert_eq!(mask_data_row(&nulls[5..], &masks, &mut out).unwrap(), 0);
        assert_eq!(out, nulls);
        let err = mask_data_row(&nulls[5..], &masks[..2], &mut Vec::new()).unwrap_err();
        assert!(
            err.contains("4 fields where its RowDescription has 2"),
            "{err}"
        );
        // Nothing to mask: no masks at all.
        assert!(row_masks(&fields[..1], &resolved, None).is_none());
    }

    fn error_body(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (code, value) in fields {
            body.push(*code);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        body
    }

    fn decoded_fields(out: &[u8]) -> Vec<(u8, String)> {
        match backend::decode_backend(out[0], &out[5..]).unwrap() {
            BackendMessage::ErrorResponse(fields) => {
                fields.0.iter().map(|(c, v)| (*c, v.to_string())).collect()
            }
            other => panic!("{other:?}"),
        }
    }

    fn error_field(fields: &[(u8, String)], code: u8) -> Option<&str> {
        fields
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn errors_in_the_statements_text_keep_their_text_and_point_into_it() {
        let body = error_body(&[
            (b'S', "ERROR"),
            (b'C', "42703"),
            (b'M', "column \"emial\" does not exist"),
            (b'P', "108"),
        ]);
        let mut out = Vec::new();
        assert!(answer_error(&body, 100, &mut out));
        let fields = decoded_fields(&out);
        assert_eq!(error_field(&fields, b'P'), Some("8"));
        assert_eq!(
            error_field(&fields, b'M'),
            Some("column \"emial\" does not exist")
        );
        // A position inside the lookup, or no lookup in front: as it is.
        assert!(!answer_error(&body, 200, &mut Vec::new()));
        assert!(!answer_error(&body, 0, &mut Vec::new()));
    }

    #[test]
    fn errors_while_running_have_their_text_withheld() {
        let body = error_body(&[
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', "22P02"),
            (
                b'M',
                "invalid input syntax for type integer: \"ada@example.com\"",
            ),
            (b'D', "ada@example.com"),
            (b'W', "SQL function \"f\" ada@example.com"),
            (b't', "customers"),
            (b'F', "numutils.c"),
        ]);
        for shift in [0, 100] {
            let mut out = Vec::new();
            assert!(answer_error(&body, shift, &mut out));
            assert!(!String::from_utf8_lossy(&out).contains("ada@"), "{out:?}");
            let fields = decoded_fields(&out);
            assert_eq!(error_field(&fields, b'C'), Some("22P02"));
            assert_eq!(error_field(&fields, b't'), Some("customers"));
            assert_eq!(error_field(&fields, b'D'), None);
            assert_eq!(error_field(&fields, b'W'), None);
            assert!(error_field(&fields, b'M').unwrap().contains("withheld"));
        }
        // A body that does not decode still gives an error, with nothing of it.
        let mut out = Vec::new();
        assert!(answer_error(b"Mada@example.com", 0, &mut out));
        assert!(!String::from_utf8_lossy(&out).contains("ada@"));
        assert_eq!(error_field(&decoded_fields(&out), b'C'), Some("XX000"));
    }

    /// A lookup row: OID, column number, name, relation.
    fn lookup_row(oid: &str, column: &str, name: &str, relation: &str) -> Vec<u8> {
        let mut out = Vec::new();
        BackendMessage::DataRow(vec![
            Some(oid.as_bytes()),
            Some(column.as_bytes()),
            Some(name.as_bytes()),
            Some(relation.as_bytes()),
        ])
        .encode(&mut out);
        out.split_off(5)
    }

    fn row_description(fields: Vec<FieldDescription<'_>>) -> Vec<u8> {
        let mut out = Vec::new();
        BackendMessage::RowDescription(fields).encode(&mut out);
        out.split_off(5)
    }

    /// The lookup's ReadyForQuery: dropped, the session ready again.
    fn the_lookup_ends(batch: &mut ExtendedBatch) {
        assert_eq!(
            batch.answer(backend::tag::READY_FOR_QUERY, None),
            Ok(Disposition::LookupDone)
        );
    }

    /// The batch's own ReadyForQuery: forwarded, and the batch is over.
    fn the_sync_ends_it(batch: &mut ExtendedBatch) {
        assert_eq!(
            batch.answer(backend::tag::READY_FOR_QUERY, None),
            Ok(Disposition::Forward)
        );
        assert!(batch.is_done());
    }

    #[test]
    fn an_extended_batch_follows_the_answers_and_masks_the_executes_rows() {
        use backend::tag::*;
        let mut batch =
            ExtendedBatch::new(Arc::new(plan(&["customers.email"], MaskMethod::Redact)));
        // What the client sent: Parse, Bind, its own Describe of the
        // portal, the proxy's Describe, Execute, Sync.
        for e in [
            Expect::Complete,
            Expect::Complete,
            Expect::DescribePortal(None),
            Expect::DescribePortal(Some(None)),
            Expect::Execute(None),
            Expect::Sync,
        ] {
            assert!(batch.expect(e));
        }
        // The lookup's answer: all dropped, its rows read.
        assert_eq!(batch.answer(ROW_DESCRIPTION, None), Ok(Disposition::Drop));
        assert!(batch.needs_body(DATA_ROW));
        let row = lookup_row("16384", "3", "email", "customers");
        assert_eq!(batch.answer(DATA_ROW, Some(&row)), Ok(Disposition::Drop));
        assert_eq!(batch.answer(COMMAND_COMPLETE, None), Ok(Disposition::Drop));
        the_lookup_ends(&mut batch);
        // The client's answers.
        assert_eq!(batch.answer(PARSE_COMPLETE, None), Ok(Disposition::Forward));
        assert_eq!(batch.answer(BIND_COMPLETE, None), Ok(Disposition::Forward));
        assert!(
            !batch.needs_body(ROW_DESCRIPTION),
            "the client's own Describe"
        );
        assert_eq!(
            batch.answer(ROW_DESCRIPTION, None),
            Ok(Disposition::Forward)
        );
        assert!(batch.needs_body(ROW_DESCRIPTION), "the proxy's Describe");
        let fields = row_description(vec![
            field("id", 16384, 1, 23),
            field("email", 16384, 3, 25),
        ]);
        assert_eq!(
            batch.answer(ROW_DESCRIPTION, Some(&fields)),
            Ok(Disposition::Drop)
        );
        assert!(batch.needs_body(DATA_ROW));
        assert_eq!(batch.answer(DATA_ROW, None), Ok(Disposition::Mask));
        assert_eq!(
            batch.row_masks(),
            Some(
                &[
                    FieldMask::Keep,
                    FieldMask::Mask(Replacement::Text(crate::masking::REDACTED))
                ][..]
            )
        );
        assert_eq!(
            batch.answer(NOTICE_RESPONSE, None),
            Ok(Disposition::Forward)
        );
        assert_eq!(
            batch.answer(COMMAND_COMPLETE, None),
            Ok(Disposition::Forward)
        );
        assert!(!batch.is_done());
        the_sync_ends_it(&mut batch);
    }

    #[test]
    fn a_failed_lookup_masks_every_field_and_errors_skip_to_sync() {
        use backend::tag::*;
        let mut batch =
            ExtendedBatch::new(Arc::new(plan(&["customers.email"], MaskMethod::Redact)));
        for e in [
            Expect::DescribePortal(Some(None)),
            Expect::Execute(None),
            Expect::Complete,
            Expect::Execute(None),
            Expect::Sync,
        ] {
            assert!(batch.expect(e));
        }
        assert_eq!(batch.answer(ERROR_RESPONSE, None), Ok(Disposition::Drop));
        the_lookup_ends(&mut batch);
        let fields = row_description(vec![field("id", 16384, 1, 23), field("name", 16384, 2, 25)]);
        assert_eq!(
            batch.answer(ROW_DESCRIPTION, Some(&fields)),
            Ok(Disposition::Drop)
        );
        assert_eq!(
            batch.row_masks(),
            Some(
                &[
                    FieldMask::Mask(Replacement::Null),
                    FieldMask::Mask(Replacement::Null)
                ][..]
            )
        );
        assert_eq!(batch.answer(DATA_ROW, None), Ok(Disposition::Mask));
        assert_eq!(
            batch.answer(COMMAND_COMPLETE, None),
            Ok(Disposition::Forward)
        );
        // An error: the server skips the rest up to Sync.
        assert_eq!(batch.answer(ERROR_RESPONSE, None), Ok(Disposition::Forward));
        assert!(batch.answer(DATA_ROW, None).is_err());
        the_sync_ends_it(&mut batch);
    }

    /// The answers to one lookup sent inside a batch, with `rows`.
    fn inline_lookup_answered(batch: &mut ExtendedBatch, rows: &[Vec<u8>]) {
        use backend::tag::*;
        for tag in [PARSE_COMPLETE, BIND_COMPLETE] {
            assert_eq!(batch.answer(tag, None), Ok(Disposition::Drop));
        }
        for row in rows {
            assert!(batch.needs_body(DATA_ROW));
            assert_eq!(batch.answer(DATA_ROW, Some(row)), Ok(Disposition::Drop));
        }
        assert_eq!(batch.answer(COMMAND_COMPLETE, None), Ok(Disposition::Drop));
        for _ in 0..2 {
            assert_eq!(batch.answer(CLOSE_COMPLETE, None), Ok(Disposition::Drop));
        }
    }

    #[test]
    fn inline_lookups_add_to_what_a_followed_batch_resolved() {
        use backend::tag::*;
        let mut batch = ExtendedBatch::followed();
        // An unmasked Parse, Bind and Execute before anything is masked.
        for e in [Expect::Complete, Expect::Complete, Expect::Execute(None)] {
            assert!(batch.expect(e));
        }
        assert!(!batch.error_may_quote_masked());
        assert!(batch.lookup_inline(&plan(&["customers.email"], MaskMethod::Redact)));
        assert!(batch.expect(Expect::DescribePortal(Some(None))));
        assert!(batch.expect(Expect::Execute(None)));
        // A masked statement on another table: a second lookup.
        assert!(batch.lookup_inline(&plan(&["orders.phone"], MaskMethod::Redact)));
        assert!(batch.expect(Expect::DescribePortal(Some(None))));
        assert!(batch.expect(Expect::Execute(None)));
        assert!(batch.expect(Expect::Sync));

        for tag in [PARSE_COMPLETE, BIND_COMPLETE] {
            assert_eq!(batch.answer(tag, None), Ok(Disposition::Forward));
        }
        assert_eq!(batch.answer(DATA_ROW, None), Ok(Disposition::Forward));
        assert!(
            !batch.error_may_quote_masked(),
            "still the unmasked Execute"
        );
        assert_eq!(
            batch.answer(COMMAND_COMPLETE, None),
            Ok(Disposition::Forward)
        );
        assert!(batch.error_may_quote_masked());
        inline_lookup_answered(
            &mut batch,
            &[lookup_row("16384", "3", "email", "customers")],
        );
        let customers = row_description(vec![
            field("id", 16384, 1, 23),
            field("email", 16384, 3, 25),
        ]);
        assert_eq!(
            batch.answer(ROW_DESCRIPTION, Some(&customers)),
            Ok(Disposition::Drop)
        );
        assert_eq!(
            batch.row_masks(),
            Some(
                &[
                    FieldMask::Keep,
                    FieldMask::Mask(Replacement::Text(REDACTED))
                ][..]
            )
        );
        assert_eq!(batch.answer(DATA_ROW, None), Ok(Disposition::Mask));
        assert_eq!(
            batch.answer(COMMAND_COMPLETE, None),
            Ok(Disposition::Forward)
        );
        inline_lookup_answered(&mut batch, &[lookup_row("16500", "2", "phone", "orders")]);
        let orders = row_description(vec![
            field("phone", 16500, 2, 25),
            field("email", 16384, 3, 25),
        ]);
        assert_eq!(
            batch.answer(ROW_DESCRIPTION, Some(&orders)),
            Ok(Disposition::Drop)
        );
        // What the first lookup resolved holds, with what the second added.
        assert_eq!(
            batch.row_masks(),
            Some(
                &[
                    FieldMask::Mask(Replacement::Text(REDACTED)),
                    FieldMask::Mask(Replacement::Text(REDACTED))
                ][..]
            )
        );
        assert_eq!(
            batch.answer(COMMAND_COMPLETE, None),
            Ok(Disposition::Forward)
        );
        the_sync_ends_it(&mut batch);
    }

    #[test]
    fn answers_out_of_order_are_refused() {
        use backend::tag::*;
        let mut batch = ExtendedBatch::new(Arc::new(plan(&["email"], MaskMethod::Null)));
        assert!(batch.expect(Expect::Complete));
        assert!(batch.expect(Expect::Sync));
        assert!(
            batch.answer(BIND_COMPLETE, None).is_err(),
            "in the lookup's answer"
        );
        the_lookup_ends(&mut batch);
        assert!(batch.answer(DATA_ROW, None).is_err());
        let mut batch = ExtendedBatch::new(Arc::new(plan(&["email"], MaskMethod::Null)));
        assert!(batch.expect(Expect::Sync));
        the_lookup_ends(&mut batch);
        assert!(batch.answer(PARSE_COMPLETE, None).is_err());
    }

    use super::backend::BackendMessage;
}
