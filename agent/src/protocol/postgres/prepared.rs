//! The prepared statements and portals of one session, as the server has
//! them, so that a statement decided at Parse is decided again at Bind and
//! at Execute when the policy has changed since: a reload must not leave a
//! statement it now refuses runnable for the life of the connection.
//!
//! The server creates a statement or portal only if it answers ParseComplete
//! or BindComplete, and removes one only on CloseComplete: after an error it
//! skips every message up to Sync. So what the client sends is kept as
//! *pending*, in order, one queue per message type, and applied when its
//! completion arrives (completions come in the order of their requests);
//! ReadyForQuery drops what is still pending, since the server skipped it.
//! Portals end with their transaction, so ReadyForQuery `I` drops them too.
//!
//! SQL `PREPARE` and protocol Parse fill one namespace on the server:
//! `EXECUTE` runs a statement of either kind, Bind binds either, and
//! `DEALLOCATE` and Close remove either. So a SQL `PREPARE` that ran (its
//! CommandComplete `PREPARE`, in order with the other statements' tags) is
//! kept with the statements from Parse, as its own statement decided alone
//! (kind `prepared`, with the tables and flags of the statement it
//! prepares); CommandComplete `DEALLOCATE` removes one, `DEALLOCATE ALL` and
//! `DISCARD ALL` remove them all. [`sql_ops`] reads the names from the
//! parse tree, where unquoted names are folded to lower case as the server
//! folds them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};

use super::mask::MaskPlan;
use crate::policy::PolicySet;
use crate::sql::{Analysis, StatementKind, StatementSummary};

/// Statements, portals and pending messages tracked at most per session.
/// More is refused (the client gets an error naming the limit): past it the
/// proxy could no longer tell which statements to decide again.
pub const MAX_TRACKED: usize = 10_000;

/// A statement as it was decided.
#[derive(Debug, Clone)]
pub struct Decided {
    /// The statement text (converted to UTF-8).
    pub text: Arc<str>,
    /// Its analysis.
    pub analysis: Arc<Analysis>,
    /// The policy that last allowed it (a weak reference: it keeps the
    /// allocation, so a new policy never compares equal, but not the rules).
    pub policy: Weak<PolicySet>,
    /// What to mask in its results, when a `mask` rule applied to it.
    pub mask: Option<Arc<MaskPlan>>,
    /// A `review` rule held its Parse and a reviewer (or a grant) let it
    /// run: the approval covers one execution, and every later Bind of it
    /// is decided (and held) again.
    pub reviewed: bool,
}

impl Decided {
    /// Whether `current` is another policy than the one that allowed this.
    pub fn is_stale(&self, current: &Arc<PolicySet>) -> bool {
        !std::ptr::eq(self.policy.as_ptr(), Arc::as_ptr(current))
    }
}

/// What a Close message closes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Closing {
    Statement(Vec<u8>),
    Portal(Vec<u8>),
}

/// A SQL statement that changes the named statements, awaiting its
/// CommandComplete.
#[derive(Debug, Clone)]
enum SqlPending {
    Prepare(Vec<u8>, Decided),
    Deallocate(Vec<u8>),
}

/// Where [`Prepared::statement`] finds a name: a pending Parse or SQL
/// `PREPARE` (by index), else the confirmed statements.
enum StatementSlot {
    Parse(usize),
    Sql(usize),
    Confirmed,
}

/// One session's statements and portals.
#[derive(Debug, Default)]
pub struct Prepared {
    statements: HashMap<Vec<u8>, Decided>,
    portals: HashMap<Vec<u8>, Decided>,
    parses: VecDeque<(Vec<u8>, Decided, u64)>,
    binds: VecDeque<(Vec<u8>, Decided, u64)>,
    closes: VecDeque<(Closing, u64)>,
    sql: VecDeque<(SqlPending, u64)>,
    /// Syncs, Queries and FunctionCalls the client sent (each answered by
    /// one ReadyForQuery); a pending message is kept with this count at
    /// the time it was sent, its batch.
    sent: u64,
    /// ReadyForQuerys received for them: the batches below this are over.
    answered: u64,
}

impl Prepared {
    /// Whether one more Parse or Bind can be tracked.
    pub fn has_room(&self) -> bool {
        self.has_room_for(1)
    }

    /// Whether `n` more statements or portals can be tracked.
    pub fn has_room_for(&self, n: usize) -> bool {
        let tracked = self.statements.len()
            + self.portals.len()
            + self.parses.len()
            + self.binds.len()
            + self.sql.len();
        tracked.saturating_add(n) <= MAX_TRACKED
    }

    /// The statement named `name`, as the server will have it when what
    /// is pending succeeds: the last Parse of that name still awaiting its
    /// ParseComplete (a Bind pipelined behind it binds that one), else the
    /// last SQL `PREPARE` of it awaiting its CommandComplete, else the
    /// confirmed statement.
    pub fn statement(&self, name: &[u8]) -> Option<&Decided> {
        match self.statement_slot(name) {
            StatementSlot::Parse(i) => self.parses.get(i).map(|(_, statement, _)| statement),
            StatementSlot::Sql(i) => match self.sql.get(i)? {
                (SqlPending::Prepare(_, statement), _) => Some(statement),
                (SqlPending::Deallocate(_), _) => None,
            },
            StatementSlot::Confirmed => self.statements.get(name),
        }
    }

    /// Every statement `name` may be when a message sent now runs: the
    /// confirmed one and each still pending (a Parse or `PREPARE` of a name
    /// that exists fails on the server, leaving the confirmed one in
    /// place, so the pending one cannot be trusted to replace it). Empty
    /// when the session never saw the name prepared.
    pub fn candidates(&self, name: &[u8]) -> Vec<Decided> {
        let parses = self
            .parses
            .iter()
            .filter(|(pending, _, _)| pending == name)
            .map(|(_, statement, _)| statement);
        let prepares = self.sql.iter().filter_map(|pending| match pending {
            (SqlPending::Prepare(pending, statement), _) if pending == name => Some(statement),
            _ => None,
        });
        let mut found: Vec<Decided> = Vec::new();
        for statement in self
            .statements
            .get(name)
            .into_iter()
            .chain(parses)
            .chain(prepares)
        {
            if !found.iter().any(|known| known.text == statement.text) {
                found.push(statement.clone());
            }
        }
        found
    }

    /// Whether named statement `name` exists and a Parse or `PREPARE` of
    /// it sent in an earlier batch is still unanswered: it fails on the
    /// server (the name exists) unless something removed the name first,
    /// so which statement a Bind binds is known only once it is answered.
    /// (A Parse in the batch being sent needs no answer: if it fails, the
    /// server skips the rest of the batch.)
    pub fn redefined_earlier(&self, name: &[u8]) -> bool {
        if name.is_empty() || !self.statements.contains_key(name) {
            return false;
        }
        let sent = self.sent;
        self.parses
            .iter()
            .any(|(pending, _, batch)| pending == name && *batch < sent)
            || self.sql.iter().any(|pending| {
                matches!(pending, (SqlPending::Prepare(pending, _), batch) if pending == name && *batch < sent)
            })
    }

    /// The statement behind portal `name`, as the server will have it when
    /// what is pending succeeds: the last Bind of that name still awaiting
    /// its BindComplete (an Execute pipelined behind it runs that one),
    /// else the confirmed portal.
    pub fn portal(&self, name: &[u8]) -> Option<&Decided> {
        match self.portal_slot(name) {
            Some(i) => self.binds.get(i).map(|(_, statement, _)| statement),
            None => self.portals.get(name),
        }
    }

    /// Records that statement `name` (the one [`Prepared::statement`]
    /// finds) was allowed again under a new policy.
    pub fn reallowed_statement(&mut self, name: &[u8], policy: &Arc<PolicySet>) {
        let entry = match self.statement_slot(name) {
            StatementSlot::Parse(i) => self.parses.get_mut(i).map(|(_, statement, _)| statement),
            StatementSlot::Sql(i) => match self.sql.get_mut(i) {
                Some((SqlPending::Prepare(_, statement), _)) => Some(statement),
                _ => None,
            },
            StatementSlot::Confirmed => self.statements.get_mut(name),
        };
        if let Some(entry) = entry {
            entry.policy = Arc::downgrade(policy);
        }
    }

    /// Records that portal `name` (the one [`Prepared::portal`] finds) was
    /// allowed again under a new policy.
    pub fn reallowed_portal(&mut self, name: &[u8], policy: &Arc<PolicySet>) {
        let entry = match self.portal_slot(name) {
            Some(i) => self.binds.get_mut(i).map(|(_, statement, _)| statement),
            None => self.portals.get_mut(name),
        };
        if let Some(entry) = entry {
            entry.policy = Arc::downgrade(policy);
        }
    }

    /// Where the statement `name` refers to is kept: the order of the
    /// search, written once for [`Prepared::statement`] and
    /// [`Prepared::reallowed_statement`].
    fn statement_slot(&self, name: &[u8]) -> StatementSlot {
        if let Some(i) = self
            .parses
            .iter()
            .rposition(|(pending, _, _)| pending == name)
        {
            return StatementSlot::Parse(i);
        }
        let prepare = |pending: &(SqlPending, u64)| matches!(pending, (SqlPending::Prepare(pending, _), _) if pending == name);
        match self.sql.iter().rposition(prepare) {
            Some(i) => StatementSlot::Sql(i),
            None => StatementSlot::Confirmed,
        }
    }

    /// The pending Bind portal `name` refers to, if any (else the
    /// confirmed portal).
    fn portal_slot(&self, name: &[u8]) -> Option<usize> {
        self.binds
            .iter()
            .rposition(|(pending, _, _)| pending == name)
    }

    /// A SQL `PREPARE name` (decided as `statement`) was forwarded to run.
    pub fn prepare_sent(&mut self, name: &[u8], statement: Decided) {
        self.sql
            .push_back((SqlPending::Prepare(name.to_vec(), statement), self.sent));
    }

    /// A SQL `DEALLOCATE name` was forwarded to run.
    pub fn deallocate_sent(&mut self, name: &[u8]) {
        self.sql
            .push_back((SqlPending::Deallocate(name.to_vec()), self.sent));
    }

    /// The server answered CommandComplete with `tag` (without its NUL).
    pub fn command_complete(&mut self, tag: &[u8]) {
        match tag {
            b"PREPARE" => {
                if let Some((SqlPending::Prepare(..), _)) = self.sql.front() {
                    if let Some((SqlPending::Prepare(name, statement), _)) = self.sql.pop_front() {
                        self.statements.insert(name, statement);
                    }
                }
            }
            b"DEALLOCATE" => {
                if let Some((SqlPending::Deallocate(_), _)) = self.sql.front() {
                    if let Some((SqlPending::Deallocate(name), _)) = self.sql.pop_front() {
                        self.statements.remove(&name);
                    }
                }
            }
            // Both drop every named statement; the unnamed one stays.
            b"DEALLOCATE ALL" => self.statements.retain(|name, _| name.is_empty()),
            b"DISCARD ALL" => {
                self.statements.retain(|name, _| name.is_empty());
                self.portals.clear();
            }
            _ => {}
        }
    }

    /// A Parse of `name` was forwarded.
    pub fn parse_sent(&mut self, name: &[u8], statement: Decided) {
        self.parses.push_back((name.to_vec(), statement, self.sent));
    }

    /// A Bind of portal `portal` to `statement` was forwarded.
    pub fn bind_sent(&mut self, portal: &[u8], statement: Decided) {
        self.binds
            .push_back((portal.to_vec(), statement, self.sent));
    }

    /// A Close of a statement (`b'S'`) or portal (`b'P'`) was forwarded.
    pub fn close_sent(&mut self, kind: u8, name: &[u8]) {
        let closing = if kind == b'S' {
            Closing::Statement(name.to_vec())
        } else {
            Closing::Portal(name.to_vec())
        };
        self.closes.push_back((closing, self.sent));
    }

    /// The server answered ParseComplete.
    pub fn parse_complete(&mut self) {
        if let Some((name, statement, _)) = self.parses.pop_front() {
            self.statements.insert(name, statement);
        }
    }

    /// The server answered BindComplete.
    pub fn bind_complete(&mut self) {
        if let Some((portal, statement, _)) = self.binds.pop_front() {
            self.portals.insert(portal, statement);
        }
    }

    /// The server answered CloseComplete.
    pub fn close_complete(&mut self) {
        match self.closes.pop_front() {
            Some((Closing::Statement(name), _)) => {
                self.statements.remove(&name);
            }
            Some((Closing::Portal(name), _)) => {
                self.portals.remove(&name);
            }
            None => {}
        }
    }

    /// The client sent a Sync, Query or FunctionCall, which ends a batch
    /// (called after the Query's own statements were recorded).
    pub fn batch_sent(&mut self) {
        self.sent = self.sent.saturating_add(1);
    }

    /// The Syncs, Queries and FunctionCalls sent, and the ReadyForQuerys
    /// that answered them.
    pub fn batches(&self) -> (u64, u64) {
        (self.sent, self.answered)
    }

    /// `n` Syncs the client sent during COPY FROM STDIN were ignored by
    /// the server (it ignores Sync in copy-in): no ReadyForQuery answers
    /// them.
    pub fn syncs_ignored(&mut self, n: u64) {
        self.sent = self.sent.saturating_sub(n).max(self.answered);
    }

    /// The server sent ReadyForQuery with transaction status `status`.
    pub fn ready_for_query(&mut self, status: u8) {
        // What is still pending of the batches this answer ends was
        // skipped by the server; messages of later batches (a client may
        // send them before this answer arrives) are still to be answered.
        self.answered = self.answered.saturating_add(1);
        let answered = self.answered;
        self.parses.retain(|(_, _, batch)| *batch >= answered);
        self.binds.retain(|(_, _, batch)| *batch >= answered);
        self.closes.retain(|(_, batch)| *batch >= answered);
        self.sql.retain(|(_, batch)| *batch >= answered);
        if status == b'I' {
            self.portals.clear();
        }
    }
}

/// Whether a CommandComplete tag is one [`Prepared::command_complete`]
/// acts on (checked before taking the lock).
pub fn changes_statements(tag: &[u8]) -> bool {
    matches!(
        tag,
        b"PREPARE" | b"DEALLOCATE" | b"DEALLOCATE ALL" | b"DISCARD ALL"
    )
}

pub use crate::sql::{prepared_query_text, SqlOp};

/// The prepared-statement operations of an analysis, in order, each with
/// its statement. The tree is parsed only for statements of kind
/// `prepared`, and for `EXPLAIN` and `CREATE` statements whose text says
/// `execute`; names come folded as the server folds them.
pub fn sql_ops(analysis: &Analysis) -> Vec<(SqlOp, &StatementSummary)> {
    let Analysis::Parsed { statements } = analysis else {
        return Vec::new();
    };
    statements
        .iter()
        .filter(|s| match s.kind {
            StatementKind::Prepared => true,
            StatementKind::Explain | StatementKind::Create => s
                .text
                .as_bytes()
                .windows(b"execute".len())
                .any(|w| w.eq_ignore_ascii_case(b"execute")),
            _ => false,
        })
        .filter_map(|s| Some((crate::sql::sql_op(&s.text)?, s)))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn decided(text: &str, policy: &Arc<PolicySet>) -> Decided {
        Decided {
            text: text.into(),
            analysis: Arc::new(crate::sql::analyze(text)),
            policy: Arc::downgrade(policy),
            mask: None,
            reviewed: false,
        }
    }

    #[test]
    fn statements_exist_once_the_server_confirms_them() {
        let policy = Arc::new(PolicySet::empty());
        let mut p = Prepared::default();
        p.parse_sent(b"s1", decided("select 1", &policy));
        p.parse_sent(b"s2", decided("select 2", &policy));
        p.parse_complete();
        assert_eq!(&*p.statement(b"s1").unwrap().text, "select 1");
        // The server failed s2 (an error, then ReadyForQuery): never created.
        p.ready_for_query(b'I');
        p.parse_complete();
        assert!(p.statement(b"s2").is_none());
    }

    #[test]
    fn a_ready_for_query_drops_only_what_its_own_batch_left_pending() {
        let policy = Arc::new(PolicySet::empty());
        let mut p = Prepared::default();
        // A refused Parse's batch, answered by an error then ReadyForQuery:
        // the client sends its next batch as soon as it reads the error.
        p.close_sent(b'S', b"old");
        p.batch_sent();
        p.parse_sent(b"next", decided("select 1", &policy));
        p.ready_for_query(b'I');
        assert!(p.statement(b"next").is_some(), "still pending");
        p.batch_sent();
        p.parse_complete();
        p.ready_for_query(b'I');
        assert_eq!(&*p.statement(b"next").unwrap().text, "select 1");
        // The first batch's Close was skipped: nothing completes it now.
        p.close_complete();
        assert!(p.statement(b"next").is_some());
    }

    #[test]
    fn a_name_redefined_in_an_unanswered_earlier_batch_is_known() {
        let policy = Arc::new(PolicySet::empty());
        let mut p = Prepared::default();
        p.parse_sent(b"s", decided("select 1", &policy));
        p.parse_complete();
        p.ready_for_query(b'I');
        // In the batch being sent: the server settles it before the Bind.
        p.parse_sent(b"s", decided("select 2", &policy));
        assert!(!p.redefined_earlier(b"s"));
        p.batch_sent();
        assert!(p.redefined_earlier(b"s"));
        assert!(!p.redefined_earlier(b"other"));
        // Answered (it failed: the name exists): the confirmed one stays.
        p.ready_for_query(b'I');
        assert!(!p.redefined_earlier(b"s"));
        assert_eq!(&*p.statement(b"s").unwrap().text, "select 1");
    }

    #[test]
    fn a_bind_pipelined_behind_its_parse_sees_the_pending_statement() {
        let policy = Arc::new(PolicySet::empty());
        let mut p = Prepared::default();
        p.parse_sent(b"", decided("select 1", &policy));
        p.parse_complete();
        p.parse_sent(b"", decided("select 2", &policy));
        assert_eq!(&*p.statement(b"").unwrap().text, "select 2");
        // The second Parse failed: the first statement is still the one.
        p.ready_for_query(b'I');
        assert_eq!(&*p.statement(b"").unwrap().text, "select 1");
    }

    #[test]
    fn portals_follow_binds_and_end_with_the_transaction() {
        let policy = Arc::new(PolicySet::empty());
        let mut p = Prepared::default();
        p.bind_sent(b"", decided("select 1", &policy));
        p.bind_sent(b"c", decided("select 2", &policy));
        p.bind_complete();
        p.bind_complete();
        assert_eq!(&*p.portal(b"c").unwrap().text, "select 2");
        p.ready_for_query(b'T');
        assert!(p.portal(b"c").is_some());
        p.ready_for_query(b'I');
        assert!(p.portal(b"c").is_none() && p.portal(b"").is_none());
    }

    #[test]
    fn close_applies_on_close_complete_only() {
        let policy = Arc::new(PolicySet::empty());
        let mut p = Prepared::default();
        p.parse_sent(b"s", decided("select 1", &policy));
        p.parse_complete();
        p.close_sent(b'S', b"s");
        // An earlier error made the server skip the Close.
        p.ready_for_query(b'I');
        p.close_complete();
        assert!(p.statement(b"s").is_some());
        p.close_sent(b'S', b"s");
        p.close_complete();
        assert!(p.statement(b"s").is_none());
    }

    #[test]
    fn a_new_policy_makes_every_decision_stale() {
        let old = Arc::new(PolicySet::empty());
        let new = Arc::new(PolicySet::empty());
        let mut p = Prepared::default();
        p.parse_sent(b"s", decided("select 1", &old));
        p.parse_complete();
        assert!(!p.statement(b"s").unwrap().is_stale(&old));
        assert!(p.statement(b"s").unwrap().is_stale(&new));
        p.reallowed_statement(b"s", &new);
        assert!(!p.statement(b"s").unwrap().is_stale(&new));
        // The old policy is gone; a new one at any address is still new.
        drop(old);
        let newer = Arc::new(PolicySet::empty());
        assert!(p.statement(b"s").unwrap().is_stale(&newer));
    }

    #[test]
    fn a_sql_prepare_exists_once_the_server_confirms_it() {
        let policy = Arc::new(PolicySet::empty());
        let mut p = Prepared::default();
        p.prepare_sent(b"q", decided("PREPARE q AS SELECT 1", &policy));
        // Pending: an EXECUTE pipelined behind it finds it.
        assert!(p.statement(b"q").is_some());
        // The server failed it: never created.
        p.ready_for_query(b'I');
        p.command_complete(b"PREPARE");
        assert!(p.statement(b"q").is_none());
        p.prepare_sent(b"q", decided("PREPARE q AS SELECT 1", &policy));
        p.command_complete(b"PREPARE");
        p.ready_for_query(b'I');
        assert_eq!(&*p.statement(b"q").unwrap().text, "PREPARE q AS SELECT 1");
        // Protocol Close of a SQL-prepared statement removes it too.
        p.close_sent(b'S', b"q");
        p.close_complete();
        assert!(p.statement(b"q").is_none());
    }

    #[test]
    fn sql_completions_apply_in_order_and_stop_at_an_error() {
        let policy = Arc::new(PolicySet::empty());
        let mut p = Prepared::default();
        p.parse_sent(b"b", decided("select 2", &policy));
        p.parse_complete();
        // PREPARE a; SELECT 1; DEALLOCATE b; PREPARE c (fails)
        p.prepare_sent(b"a", decided("PREPARE a AS SELECT 1", &policy));
        p.deallocate_sent(b"b");
        p.prepare_sent(b"c", decided("PREPARE c AS SELECT 3", &policy));
        p.command_complete(b"PREPARE");
        p.command_complete(b"SELECT 1");
        // A tag of another kind does not take the DEALLOCATE's place.
        p.command_complete(b"PREPARE");
        assert!(p.statement(b"b").is_some());
        p.command_complete(b"DEALLOCATE");
        assert!(
            p.statement(b"b").is_none(),
            "DEALLOCATE removes a Parse's too"
        );
        p.ready_for_query(b'I');
        assert!(p.statement(b"a").is_some());
        assert!(p.statement(b"c").is_none());
    }

    #[test]
    fn deallocate_all_and_discard_all_drop_every_named_statement() {
        let policy = Arc::new(PolicySet::empty());
        let mut p = Prepared::default();
        for name in [&b"a"[..], b"b", b""] {
            p.parse_sent(name, decided("select 1", &policy));
            p.parse_complete();
        }
        p.prepare_sent(b"c", decided("PREPARE c AS SELECT 1", &policy));
        p.command_complete(b"PREPARE");
        p.bind_sent(b"cur", decided("select 1", &policy));
        p.bind_complete();
        p.command_complete(b"DEALLOCATE ALL");
        assert!(p.statement(b"a").is_none() && p.statement(b"c").is_none());
        assert!(p.statement(b"").is_some(), "the unnamed statement stays");
        assert!(p.portal(b"cur").is_some(), "DEALLOCATE keeps portals");
        p.parse_sent(b"d", decided("select 1", &policy));
        p.parse_complete();
        p.command_complete(b"DISCARD ALL");
        assert!(p.statement(b"d").is_none());
        assert!(p.portal(b"cur").is_none(), "DISCARD ALL closes portals");
        // Other DISCARDs keep them.
        p.parse_sent(b"e", decided("select 1", &policy));
        p.parse_complete();
        p.command_complete(b"DISCARD PLANS");
        assert!(p.statement(b"e").is_some());
        assert!(changes_statements(b"DISCARD ALL") && !changes_statements(b"DISCARD PLANS"));
    }

    #[test]
    fn reallowing_updates_the_statement_that_is_found() {
        let old = Arc::new(PolicySet::empty());
        let new = Arc::new(PolicySet::empty());
        let mut p = Prepared::default();
        p.prepare_sent(b"q", decided("PREPARE q AS SELECT 1", &old));
        assert!(p.statement(b"q").unwrap().is_stale(&new));
        p.reallowed_statement(b"q", &new);
        assert!(
            !p.statement(b"q").unwrap().is_stale(&new),
            "the pending one"
        );
        p.command_complete(b"PREPARE");
        assert!(!p.statement(b"q").unwrap().is_stale(&new));
        p.bind_sent(b"", decided("select 1", &old));
        assert!(p.portal(b"").unwrap().is_stale(&new), "the pending Bind");
        p.reallowed_portal(b"", &new);
        p.bind_complete();
        assert!(!p.portal(b"").unwrap().is_stale(&new));
    }

    fn ops(sql: &str) -> Vec<SqlOp> {
        sql_ops(&crate::sql::analyze(sql))
            .into_iter()
            .map(|(op, _)| op)
            .collect()
    }

    #[test]
    fn sql_names_fold_as_the_server_folds_them() {
        use SqlOp::*;
        assert_eq!(
            ops("PREPARE Foo (int) AS SELECT $1; EXECUTE \"Foo\"(1); execute FOO(2); \
                 DEALLOCATE \"Bar\"; DEALLOCATE PREPARE baz; DEALLOCATE ALL; DEALLOCATE PREPARE ALL"),
            vec![
                Prepare(b"foo".to_vec()),
                Execute(b"Foo".to_vec()),
                Execute(b"foo".to_vec()),
                Deallocate(b"Bar".to_vec()),
                Deallocate(b"baz".to_vec()),
                DeallocateAll,
                DeallocateAll,
            ]
        );
        // EXECUTE runs the statement under EXPLAIN and CREATE TABLE AS too.
        assert_eq!(
            ops("EXPLAIN ANALYZE EXECUTE q; CREATE TABLE t AS EXECUTE \"Q\"(1)"),
            vec![Execute(b"q".to_vec()), Execute(b"Q".to_vec())]
        );
        // Other statements, even when they say `execute`, have none.
        assert_eq!(
            ops("SELECT 'execute q'; GRANT EXECUTE ON FUNCTION f() TO r; \
                 EXPLAIN SELECT 'execute'; CREATE TABLE execute_log (a int); DISCARD ALL"),
            vec![]
        );
        assert_eq!(ops("EXECUTE q("), vec![], "unparsable text");
    }

    #[test]
    fn the_statement_a_prepare_prepares_is_found_after_its_as() {
        assert_eq!(
            prepared_query_text("PREPARE q (int, character varying) AS SELECT $1 AS a FROM t"),
            Some("SELECT $1 AS a FROM t")
        );
        assert_eq!(
            prepared_query_text("prepare \"As\" as\n  insert into t values (1)"),
            Some("insert into t values (1)")
        );
        assert_eq!(prepared_query_text("EXECUTE q"), None);
        assert_eq!(prepared_query_text("PREPARE q AS"), None);
    }

    #[test]
    fn tracking_is_bounded() {
        let policy = Arc::new(PolicySet::empty());
        let mut p = Prepared::default();
        let one = decided("select 1", &policy);
        for i in 0..MAX_TRACKED {
            assert!(p.has_room());
            p.parse_sent(i.to_string().as_bytes(), one.clone());
        }
        assert!(!p.has_room());
        // SQL PREPAREs count against the same limit.
        let mut p = Prepared::default();
        for i in 0..MAX_TRACKED - 2 {
            p.prepare_sent(i.to_string().as_bytes(), one.clone());
        }
        assert!(p.has_room_for(2) && !p.has_room_for(3));
        p.command_complete(b"PREPARE");
        p.ready_for_query(b'I');
        assert!(p.has_room_for(MAX_TRACKED - 1) && !p.has_room_for(MAX_TRACKED));
    }
}
