//! What a reviewer is shown of a held statement: the text with every
//! literal that is compared with, assigned to or inserted into a column
//! that a `mask` rule hides replaced by `'***'`. A reviewer judges
//! `DELETE FROM customers WHERE email = '***'` without learning the
//! address; the statement that runs is the original.

use std::collections::HashSet;

use pg_query::protobuf as pb;
use pg_query::NodeEnum;

use super::visit::{self, Visit};
use super::Reading;

/// What replaces a hidden literal.
pub const HIDDEN_LITERAL: &str = "'***'";

/// What a reviewer may be shown of one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shown {
    /// No literal of it is sensitive: show it as sent.
    AsSent,
    /// These literals were replaced.
    Hidden {
        /// The text with each sensitive literal replaced.
        text: String,
        /// How many were replaced.
        literals: usize,
        /// The values they held (quotes removed), so that other things a
        /// reviewer sees (a command line that carries the statement) can
        /// be cleaned of them too.
        values: Vec<String>,
    },
    /// Sensitive literals may be in it, and the text cannot be cut at
    /// their ends safely (it does not parse; backslash escapes, which the
    /// scanner does not read as the server then does; a literal whose end
    /// is not found): nothing of it may be shown.
    Withheld,
}

/// The text of `sql` a reviewer may see, where `sensitive` holds the
/// lowercase names of masked columns. Text that does not parse is
/// withheld where anything is masked: its literals cannot be found.
pub fn shown_to_reviewer(sql: &str, reading: Reading, sensitive: &HashSet<String>) -> Shown {
    if sensitive.is_empty() {
        return Shown::AsSent;
    }
    let Ok(parsed) = pg_query::parse(sql, reading.parser_options()) else {
        return Shown::Withheld;
    };
    let mut finder = SensitiveLiterals {
        sensitive,
        starts: Vec::new(),
    };
    for statement in &parsed.protobuf.stmts {
        if let Some(node) = &statement.stmt {
            finder.visit_node(node);
        }
    }
    let mut starts = finder.starts;
    if starts.is_empty() {
        return Shown::AsSent;
    }
    if reading == Reading::BackslashEscapes {
        return Shown::Withheld;
    }
    starts.sort_unstable();
    starts.dedup();
    match replace_literals(sql, &starts) {
        Some((text, values)) => Shown::Hidden {
            text,
            literals: starts.len(),
            values,
        },
        None => Shown::Withheld,
    }
}

/// Replaces the literal starting at each byte offset of `starts` (sorted)
/// by [`HIDDEN_LITERAL`]; a leading minus sign goes with its number. The
/// text, and the values replaced.
fn replace_literals(sql: &str, starts: &[usize]) -> Option<(String, Vec<String>)> {
    let tokens = pg_query::scan(sql).ok()?.tokens;
    let mut values = Vec::new();
    let mut out = String::with_capacity(sql.len());
    let mut copied = 0;
    for &start in starts {
        if start < copied {
            // Inside a literal already replaced.
            continue;
        }
        let index = tokens
            .iter()
            .position(|t| usize::try_from(t.start).ok() == Some(start))?;
        let mut end = usize::try_from(tokens[index].end).ok()?;
        if sql.get(start..end) == Some("-") {
            end = usize::try_from(tokens.get(index + 1)?.end).ok()?;
        }
        out.push_str(sql.get(copied..start)?);
        out.push_str(HIDDEN_LITERAL);
        values.push(unquoted(sql.get(start..end)?));
        copied = end;
    }
    out.push_str(sql.get(copied..)?);
    Some((out, values))
}

/// A literal's value without its quotes: `'a''b'` gives `a'b`, `E'x'`
/// gives `x`, `$t$y$t$` gives `y`, `-5` stays.
fn unquoted(literal: &str) -> String {
    if let Some(rest) = literal.strip_prefix('$') {
        if let Some(tag_end) = rest.find('$') {
            let tag = &literal[..tag_end + 2];
            return literal
                .strip_prefix(tag)
                .and_then(|l| l.strip_suffix(tag))
                .unwrap_or(literal)
                .to_owned();
        }
    }
    let body = literal.trim_start_matches(|c: char| c.is_ascii_alphabetic() || c == '&');
    match body.strip_prefix('\'').and_then(|b| b.strip_suffix('\'')) {
        Some(inner) => inner.replace("''", "'"),
        None => literal.to_owned(),
    }
}

/// Finds the literals that meet a sensitive column.
struct SensitiveLiterals<'a> {
    sensitive: &'a HashSet<String>,
    /// Byte offsets where such literals start.
    starts: Vec<usize>,
}

impl SensitiveLiterals<'_> {
    fn is_sensitive_name(&self, name: &str) -> bool {
        self.sensitive.contains(&name.to_lowercase())
    }

    /// Whether an expression is a reference to a sensitive column (through
    /// casts, collations and function calls such as `lower(email)`).
    fn refers_to_sensitive(&self, node: &pb::Node) -> bool {
        let mut finder = ColumnNames::default();
        finder.visit_node(node);
        finder.names.iter().any(|n| self.is_sensitive_name(n))
    }

    /// Every literal in an expression.
    fn hide_literals_in(&mut self, node: &pb::Node) {
        let mut constants = Constants::default();
        constants.visit_node(node);
        self.starts.extend(constants.starts);
    }
}

impl Visit for SensitiveLiterals<'_> {
    /// `email = '...'`, `'...' = lower(email)`, `email IN (...)`,
    /// `email LIKE '...'`, `email BETWEEN ... AND ...`: the literals on
    /// the other side of a comparison with a sensitive column.
    fn visit_a_expr(&mut self, node: &pb::AExpr) {
        let sides = [node.lexpr.as_deref(), node.rexpr.as_deref()];
        if sides.iter().flatten().any(|s| self.refers_to_sensitive(s)) {
            for side in sides.into_iter().flatten() {
                self.hide_literals_in(side);
            }
        }
        visit::walk_a_expr(self, node);
    }

    /// `UPDATE ... SET email = '...'` and `ON CONFLICT DO UPDATE SET`.
    fn visit_res_target(&mut self, node: &pb::ResTarget) {
        if self.is_sensitive_name(&node.name) {
            if let Some(value) = node.val.as_deref() {
                self.hide_literals_in(value);
            }
        }
        visit::walk_res_target(self, node);
    }

    /// `INSERT INTO t (id, email) VALUES (1, '...')`: the literals in the
    /// positions of sensitive columns. Without a column list the positions
    /// are not known here, so every literal of the rows is hidden.
    fn visit_insert_stmt(&mut self, node: &pb::InsertStmt) {
        let columns: Vec<Option<&str>> = node
            .cols
            .iter()
            .map(|c| match &c.node {
                Some(NodeEnum::ResTarget(t)) => Some(t.name.as_str()),
                _ => None,
            })
            .collect();
        if let Some(NodeEnum::SelectStmt(select)) =
            node.select_stmt.as_ref().and_then(|s| s.node.as_ref())
        {
            for row in &select.values_lists {
                let Some(NodeEnum::List(values)) = &row.node else {
                    continue;
                };
                for (position, value) in values.items.iter().enumerate() {
                    let hide = columns.is_empty()
                        || columns
                            .get(position)
                            .is_none_or(|c| c.is_none_or(|name| self.is_sensitive_name(name)));
                    if hide {
                        self.hide_literals_in(value);
                    }
                }
            }
        }
        visit::walk_insert_stmt(self, node);
    }
}

/// The last name of every column reference in an expression.
#[derive(Default)]
struct ColumnNames {
    names: Vec<String>,
}

impl Visit for ColumnNames {
    fn visit_column_ref(&mut self, node: &pb::ColumnRef) {
        if let Some(NodeEnum::String(last)) = node.fields.last().and_then(|f| f.node.as_ref()) {
            self.names.push(last.sval.clone());
        }
        visit::walk_column_ref(self, node);
    }
}

/// Where every literal of an expression starts.
#[derive(Default)]
struct Constants {
    starts: Vec<usize>,
}

impl Visit for Constants {
    fn visit_a_const(&mut self, node: &pb::AConst) {
        if let Ok(start) = usize::try_from(node.location) {
            self.starts.push(start);
        }
        visit::walk_a_const(self, node);
    }
}

#[cfg(test)]
#[allow(clippy::panic)]
mod tests {
    use super::*;

    fn shown(sql: &str) -> Shown {
        let sensitive: HashSet<String> = ["email".to_owned(), "ssn".to_owned()].into();
        shown_to_reviewer(sql, Reading::Standard, &sensitive)
    }

    fn hidden(sql: &str) -> String {
        match shown(sql) {
            Shown::Hidden { text, .. } => text,
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn the_hidden_values_are_given_without_their_quotes() {
        let sql =
            "UPDATE c SET email = 'it''s', ssn = -12 WHERE email IN (E'a@b', $q$c@d$q$, $$e$$)";
        match shown(sql) {
            Shown::Hidden {
                values, literals, ..
            } => {
                assert_eq!(values, ["it's", "-12", "a@b", "c@d", "e"]);
                assert_eq!(literals, 5);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn literals_meeting_a_masked_column_are_hidden_and_the_rest_kept() {
        #[rustfmt::skip]
        let cases = [
            ("DELETE FROM customers WHERE email = 'ada@example.com' AND id = 3",
             "DELETE FROM customers WHERE email = '***' AND id = 3"),
            ("delete from customers where 'ada@example.com' = lower(c.EMAIL)",
             "delete from customers where '***' = lower(c.EMAIL)"),
            ("DELETE FROM customers WHERE email IN ('a@x', 'b@y')",
             "DELETE FROM customers WHERE email IN ('***', '***')"),
            ("DELETE FROM customers WHERE email LIKE E'ada\\\\_%' ",
             "DELETE FROM customers WHERE email LIKE '***' "),
            ("UPDATE customers SET email = 'new@example.com', name = 'Ada' WHERE ssn = -123",
             "UPDATE customers SET email = '***', name = 'Ada' WHERE ssn = '***'"),
            ("INSERT INTO customers (id, email) VALUES (4, 'x@y'), (5, $$z@w$$)",
             "INSERT INTO customers (id, email) VALUES (4, '***'), (5, '***')"),
            ("INSERT INTO customers VALUES (4, 'x@y')",
             "INSERT INTO customers VALUES ('***', '***')"),
            ("INSERT INTO c (id, email) VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET email = 'b'",
             "INSERT INTO c (id, email) VALUES (1, '***') ON CONFLICT (id) DO UPDATE SET email = '***'"),
            ("DELETE FROM customers WHERE email = 'it''s'; DELETE FROM orders WHERE id = 1",
             "DELETE FROM customers WHERE email = '***'; DELETE FROM orders WHERE id = 1"),
            ("DELETE FROM t WHERE id IN (SELECT id FROM c WHERE email::text = 'q@r'::text)",
             "DELETE FROM t WHERE id IN (SELECT id FROM c WHERE email::text = '***'::text)"),
        ];
        for (sql, want) in cases {
            assert_eq!(hidden(sql), want, "{sql}");
        }
    }

    #[test]
    fn statements_without_sensitive_literals_are_shown_as_sent() {
        for sql in [
            "DELETE FROM orders WHERE id = 1",
            "SELECT email FROM customers",
            "UPDATE customers SET name = 'Ada' WHERE id = 1",
        ] {
            assert_eq!(shown(sql), Shown::AsSent, "{sql}");
        }
        // Where nothing is found, nothing is shown.
        assert_eq!(
            shown("DELETE FROM c WHERE email = 'a@b' garbage"),
            Shown::Withheld
        );
        assert_eq!(
            shown_to_reviewer(
                "DELETE FROM customers WHERE email = 'a'",
                Reading::Standard,
                &HashSet::new()
            ),
            Shown::AsSent
        );
    }

    #[test]
    fn text_read_with_backslash_escapes_is_withheld_when_it_holds_a_sensitive_literal() {
        let sensitive: HashSet<String> = ["email".to_owned()].into();
        let sql = "DELETE FROM customers WHERE email = 'a\\' OR name = ''x'";
        assert_eq!(
            shown_to_reviewer(sql, Reading::BackslashEscapes, &sensitive),
            Shown::Withheld
        );
        assert_eq!(
            shown_to_reviewer(
                "DELETE FROM orders WHERE id = 1",
                Reading::BackslashEscapes,
                &sensitive
            ),
            Shown::AsSent
        );
    }
}
