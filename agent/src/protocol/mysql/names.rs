//! What a session's handler and prepared-statement names stand for.
//!
//! `HANDLER h READ` and `EXECUTE s` name something an earlier statement
//! opened; their own text does not say which table they read. The session
//! follows what each name was given to, and a statement that uses a name
//! is decided as reading what the name stands for as well as what its own
//! text names, under the policy in force when it runs. A name the session
//! never saw given is refused: it would be the server's to resolve, past
//! the gate.
//!
//! A name is given or dropped only when the server is known to have done
//! so: after a text of one statement, from the server's answer. In a text
//! of several statements one may fail and end the text, so there a name
//! given is added to what it may stand for and nothing is dropped.

use std::collections::{BTreeSet, HashMap};

use crate::sql::mysql::{name_use, names_something, NameUse};
use crate::sql::{Analysis, StatementFlags, StatementSummary, TableRef};

/// The most names a session follows, counted with the tables and
/// functions they stand for (the server's own limit on prepared
/// statements is `max_prepared_stmt_count`, 16382 by default, for all
/// sessions).
pub(super) const MAX_NAMED: usize = 4096;

/// What a prepared statement's name stands for: what the statements
/// prepared under it read, write, call and flag.
#[derive(Debug, Clone, Default)]
struct Facts {
    read: BTreeSet<TableRef>,
    written: BTreeSet<TableRef>,
    functions: BTreeSet<String>,
    flags: StatementFlags,
}

impl Facts {
    fn of(statement: &StatementSummary) -> Facts {
        Facts {
            read: statement.tables_read.iter().cloned().collect(),
            written: statement.tables_written.iter().cloned().collect(),
            functions: statement.functions.iter().cloned().collect(),
            flags: statement.flags.clone(),
        }
    }

    fn include(&mut self, other: &Facts) {
        self.read.extend(other.read.iter().cloned());
        self.written.extend(other.written.iter().cloned());
        self.functions.extend(other.functions.iter().cloned());
        self.flags.include(&other.flags);
    }

    fn size(&self) -> usize {
        self.read.len() + self.written.len() + self.functions.len()
    }
}

/// How a text that gave or dropped names ended on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// A text of one statement, which succeeded.
    Succeeded,
    /// A text of one statement, which failed.
    Failed,
    /// A text of several statements: which of them ran is not known.
    Partly,
}

/// A session's handler names (the tables each was opened on) and SQL
/// prepared statement names (what each prepared statement reads).
#[derive(Debug, Default)]
pub(super) struct SessionNames {
    handlers: HashMap<String, BTreeSet<TableRef>>,
    prepared: HashMap<String, Facts>,
    /// Counts changes: decisions that read the names are made again.
    epoch: u64,
}

impl SessionNames {
    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The names followed and the tables and functions they stand for.
    fn size(&self) -> usize {
        self.handlers.values().map(|t| 1 + t.len()).sum::<usize>()
            + self.prepared.values().map(|f| 1 + f.size()).sum::<usize>()
    }

    /// `analysis` with each statement that uses a name reading what the
    /// name stands for, counting names given earlier in the same text;
    /// `None` when no statement uses one. `Err` (the client's message)
    /// when a statement uses a name the session never saw given, or would
    /// give more names than the session follows.
    pub(super) fn resolve(&self, analysis: &Analysis) -> Result<Option<Analysis>, String> {
        let Analysis::Parsed { statements } = analysis else {
            return Ok(None);
        };
        if !statements.iter().any(names_something) {
            return Ok(None);
        }
        let uses = statements.iter().map(name_use);
        // Names given earlier in this text: when the statements after them
        // run, a name stands for what it stood for or for these.
        let mut given = SessionNames::default();
        let mut resolved = Vec::with_capacity(statements.len());
        for (statement, name) in statements.iter().zip(uses) {
            if name.is_none() && names_something(statement) {
                return Err(format!(
                    "tollgate: {} refused: the agent cannot read the name it uses",
                    statement.command
                ));
            }
            let mut statement = statement.clone();
            match &name {
                Some(NameUse::ReadHandler(handler)) => {
                    let tables: Vec<&TableRef> = [&self.handlers, &given.handlers]
                        .into_iter()
                        .filter_map(|handlers| handlers.get(handler))
                        .flatten()
                        .collect();
                    if tables.is_empty() {
                        return Err(format!(
                            "tollgate: HANDLER {handler} READ refused: no handler of that name \
                             was opened through the agent on this session"
                        ));
                    }
                    let mut read: BTreeSet<TableRef> = statement.tables_read.into_iter().collect();
                    read.extend(tables.into_iter().cloned());
                    statement.tables_read = read.into_iter().collect();
                }
                Some(NameUse::Execute(prepared)) => {
                    let facts: Vec<&Facts> = [&self.prepared, &given.prepared]
                        .into_iter()
                        .filter_map(|prepared_names| prepared_names.get(prepared))
                        .collect();
                    if facts.is_empty() {
                        return Err(format!(
                            "tollgate: EXECUTE {prepared} refused: no statement of that name was \
                             prepared through the agent on this session"
                        ));
                    }
                    let mut own = Facts::of(&statement);
                    for facts in facts {
                        own.include(facts);
                    }
                    statement.tables_read = own.read.into_iter().collect();
                    statement.tables_written = own.written.into_iter().collect();
                    statement.functions = own.functions.into_iter().collect();
                    statement.flags = own.flags;
                }
                Some(NameUse::OpenHandler(_) | NameUse::Prepare(_)) => {
                    given.give(name.as_ref(), &statement, Outcome::Partly);
                    if self.size() + given.size() > MAX_NAMED {
                        return Err(format!(
                            "tollgate: {} refused: this session's handlers and prepared \
                             statements, with the tables and functions they stand for, \
                             already number {MAX_NAMED}, the most the agent follows; close \
                             or deallocate some first",
                            statement.command
                        ));
                    }
                }
                _ => {}
            }
            resolved.push(statement);
        }
        Ok(Some(Analysis::Parsed {
            statements: resolved,
        }))
    }

    /// Follows the names a text gave and dropped once the server answered
    /// it. `analysis` is the text's, its tables qualified with the
    /// database each statement ran in.
    pub(super) fn follow(&mut self, analysis: &Analysis, outcome: Outcome) {
        let Analysis::Parsed { statements } = analysis else {
            return;
        };
        for statement in statements.iter().filter(|s| names_something(s)) {
            self.give(name_use(statement).as_ref(), statement, outcome);
        }
    }

    fn give(&mut self, name: Option<&NameUse>, statement: &StatementSummary, outcome: Outcome) {
        let changed = match (name, outcome) {
            // A failed OPEN leaves a handler of that name as it was; a
            // failed PREPARE of a name drops the one before it on the
            // server, and keeping it only adds to what EXECUTE is decided
            // as.
            (Some(NameUse::OpenHandler(_) | NameUse::Prepare(_)), Outcome::Failed) => false,
            (Some(NameUse::OpenHandler(handler)), Outcome::Succeeded) => {
                let tables = statement.tables_read.iter().cloned().collect();
                self.handlers.insert(handler.clone(), tables);
                true
            }
            (Some(NameUse::OpenHandler(handler)), Outcome::Partly) => {
                self.handlers
                    .entry(handler.clone())
                    .or_default()
                    .extend(statement.tables_read.iter().cloned());
                true
            }
            (Some(NameUse::Prepare(prepared)), Outcome::Succeeded) => {
                self.prepared.insert(prepared.clone(), Facts::of(statement));
                true
            }
            (Some(NameUse::Prepare(prepared)), Outcome::Partly) => {
                self.prepared
                    .entry(prepared.clone())
                    .or_default()
                    .include(&Facts::of(statement));
                true
            }
            (Some(NameUse::CloseHandler(handler)), Outcome::Succeeded) => {
                self.handlers.remove(handler).is_some()
            }
            (Some(NameUse::Deallocate(prepared)), Outcome::Succeeded) => {
                self.prepared.remove(prepared).is_some()
            }
            _ => false,
        };
        if changed {
            self.epoch += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::panic, clippy::unwrap_used)]

    use super::*;

    fn analysis(text: &str) -> Analysis {
        crate::sql::mysql::analyze(text)
    }

    fn qualified(text: &str) -> Analysis {
        let analysis = analysis(text);
        crate::sql::mysql::in_database(&analysis, Some("shop"), false).unwrap_or(analysis)
    }

    fn reads(analysis: &Analysis, at: usize) -> Vec<String> {
        let Analysis::Parsed { statements } = analysis else {
            panic!("unparsable: {analysis:?}");
        };
        statements[at]
            .tables_read
            .iter()
            .map(|t| match &t.schema {
                Some(schema) => format!("{schema}.{}", t.name),
                None => t.name.clone(),
            })
            .collect()
    }

    #[test]
    fn a_handler_read_reads_the_table_its_name_was_opened_on() {
        let mut names = SessionNames::default();
        names.follow(&qualified("HANDLER secrets OPEN AS h"), Outcome::Succeeded);
        let read = names
            .resolve(&analysis("HANDLER H READ FIRST"))
            .unwrap()
            .unwrap();
        assert_eq!(reads(&read, 0), ["h", "shop.secrets"]);
        // Another spelling of the table opened without an alias.
        names.follow(&qualified("HANDLER `Other` OPEN"), Outcome::Succeeded);
        let read = names
            .resolve(&analysis("HANDLER other READ NEXT"))
            .unwrap()
            .unwrap();
        assert_eq!(reads(&read, 0), ["other", "shop.other"]);
    }

    #[test]
    fn a_name_never_given_is_refused_and_a_closed_one_is_forgotten() {
        let mut names = SessionNames::default();
        let err = names
            .resolve(&analysis("HANDLER h READ FIRST"))
            .unwrap_err();
        assert!(err.contains("no handler of that name"), "{err}");
        let err = names.resolve(&analysis("EXECUTE s")).unwrap_err();
        assert!(err.contains("EXECUTE s refused"), "{err}");
        // The dialect reads an EXECUTE of a parenthesised expression.
        let err = names
            .resolve(&analysis("EXECUTE ('SELECT 1')"))
            .unwrap_err();
        assert!(err.contains("cannot read the name it uses"), "{err}");
        names.follow(&qualified("HANDLER t OPEN AS h"), Outcome::Succeeded);
        names.follow(&analysis("HANDLER h CLOSE"), Outcome::Succeeded);
        assert!(names.resolve(&analysis("HANDLER h READ FIRST")).is_err());
        names.follow(&qualified("PREPARE s FROM 'SELECT 1'"), Outcome::Succeeded);
        names.follow(&analysis("DEALLOCATE PREPARE S"), Outcome::Succeeded);
        assert!(names.resolve(&analysis("EXECUTE s")).is_err());
    }

    #[test]
    fn a_failed_open_keeps_what_the_name_stood_for() {
        let mut names = SessionNames::default();
        names.follow(&qualified("HANDLER secrets OPEN AS h"), Outcome::Succeeded);
        let before = names.epoch();
        // The server refuses an alias already open: h is still secrets.
        names.follow(&qualified("HANDLER t OPEN AS h"), Outcome::Failed);
        assert_eq!(names.epoch(), before);
        let read = names
            .resolve(&analysis("HANDLER h READ FIRST"))
            .unwrap()
            .unwrap();
        assert_eq!(reads(&read, 0), ["h", "shop.secrets"]);
        // In a text of several statements, names are only added to.
        names.follow(
            &qualified("HANDLER h CLOSE; HANDLER t OPEN AS h"),
            Outcome::Partly,
        );
        let read = names
            .resolve(&analysis("HANDLER h READ FIRST"))
            .unwrap()
            .unwrap();
        assert_eq!(reads(&read, 0), ["h", "shop.secrets", "shop.t"]);
    }

    #[test]
    fn an_execute_reads_what_was_prepared_under_its_name() {
        let mut names = SessionNames::default();
        names.follow(
            &qualified("PREPARE s FROM 'SELECT s FROM secrets WHERE x = ?'"),
            Outcome::Succeeded,
        );
        let run = names
            .resolve(&analysis("EXECUTE S USING @x"))
            .unwrap()
            .unwrap();
        assert_eq!(reads(&run, 0), ["shop.secrets"]);
        // Prepared and executed in one text.
        let names = SessionNames::default();
        let run = names
            .resolve(&qualified(
                "PREPARE s FROM 'DELETE FROM t'; EXECUTE s; HANDLER u OPEN AS h; HANDLER h READ FIRST",
            ))
            .unwrap()
            .unwrap();
        let Analysis::Parsed { statements } = &run else {
            panic!("{run:?}");
        };
        assert_eq!(statements[1].tables_written.len(), 1);
        assert!(statements[1].flags.no_where);
        assert_eq!(reads(&run, 3), ["shop.h", "shop.u"]);
    }

    #[test]
    fn names_are_followed_up_to_a_limit() {
        // Statements that read nothing count too: a text of several
        // statements adds names without the server's word.
        let mut names = SessionNames::default();
        for i in 0..MAX_NAMED {
            names.follow(
                &analysis(&format!("PREPARE s{i} FROM 'SELECT 1'; SELECT 1")),
                Outcome::Partly,
            );
        }
        let err = names
            .resolve(&analysis("PREPARE another FROM 'SELECT 1'"))
            .unwrap_err();
        assert!(err.contains("the most the agent follows"), "{err}");

        let mut names = SessionNames::default();
        for i in 0..MAX_NAMED / 2 {
            names.follow(
                &qualified(&format!("HANDLER t{i} OPEN")),
                Outcome::Succeeded,
            );
        }
        let err = names
            .resolve(&analysis("HANDLER another OPEN"))
            .unwrap_err();
        assert!(err.contains("the most the agent follows"), "{err}");
        // Statements that give no name are not held back.
        assert!(names.resolve(&analysis("SELECT 1")).unwrap().is_none());
    }
}
