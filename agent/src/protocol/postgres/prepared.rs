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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};

use crate::policy::PolicySet;
use crate::sql::Analysis;

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

/// One session's statements and portals.
#[derive(Debug, Default)]
pub struct Prepared {
    statements: HashMap<Vec<u8>, Decided>,
    portals: HashMap<Vec<u8>, Decided>,
    parses: VecDeque<(Vec<u8>, Decided)>,
    binds: VecDeque<(Vec<u8>, Decided)>,
    closes: VecDeque<Closing>,
}

impl Prepared {
    /// Whether one more Parse or Bind can be tracked.
    pub fn has_room(&self) -> bool {
        self.statements.len() + self.portals.len() + self.parses.len() + self.binds.len()
            < MAX_TRACKED
    }

    /// The statement named `name`, as the server will have it when what
    /// is pending succeeds: the last Parse of that name still awaiting its
    /// ParseComplete (a Bind pipelined behind it binds that one), else the
    /// confirmed statement.
    pub fn statement(&self, name: &[u8]) -> Option<&Decided> {
        self.parses
            .iter()
            .rev()
            .find(|(pending, _)| pending == name)
            .map(|(_, statement)| statement)
            .or_else(|| self.statements.get(name))
    }

    /// The statement behind portal `name`, as it was bound.
    pub fn portal(&self, name: &[u8]) -> Option<&Decided> {
        self.portals.get(name)
    }

    /// Records that statement `name` was allowed again under a new policy.
    pub fn reallowed_statement(&mut self, name: &[u8], policy: &Arc<PolicySet>) {
        if let Some(entry) = self.statements.get_mut(name) {
            entry.policy = Arc::downgrade(policy);
        }
    }

    /// Records that portal `name` was allowed again under a new policy.
    pub fn reallowed_portal(&mut self, name: &[u8], policy: &Arc<PolicySet>) {
        if let Some(entry) = self.portals.get_mut(name) {
            entry.policy = Arc::downgrade(policy);
        }
    }

    /// A Parse of `name` was forwarded.
    pub fn parse_sent(&mut self, name: &[u8], statement: Decided) {
        self.parses.push_back((name.to_vec(), statement));
    }

    /// A Bind of portal `portal` to `statement` was forwarded.
    pub fn bind_sent(&mut self, portal: &[u8], statement: Decided) {
        self.binds.push_back((portal.to_vec(), statement));
    }

    /// A Close of a statement (`b'S'`) or portal (`b'P'`) was forwarded.
    pub fn close_sent(&mut self, kind: u8, name: &[u8]) {
        self.closes.push_back(if kind == b'S' {
            Closing::Statement(name.to_vec())
        } else {
            Closing::Portal(name.to_vec())
        });
    }

    /// The server answered ParseComplete.
    pub fn parse_complete(&mut self) {
        if let Some((name, statement)) = self.parses.pop_front() {
            self.statements.insert(name, statement);
        }
    }

    /// The server answered BindComplete.
    pub fn bind_complete(&mut self) {
        if let Some((portal, statement)) = self.binds.pop_front() {
            self.portals.insert(portal, statement);
        }
    }

    /// The server answered CloseComplete.
    pub fn close_complete(&mut self) {
        match self.closes.pop_front() {
            Some(Closing::Statement(name)) => {
                self.statements.remove(&name);
            }
            Some(Closing::Portal(name)) => {
                self.portals.remove(&name);
            }
            None => {}
        }
    }

    /// The server sent ReadyForQuery with transaction status `status`.
    pub fn ready_for_query(&mut self, status: u8) {
        self.parses.clear();
        self.binds.clear();
        self.closes.clear();
        if status == b'I' {
            self.portals.clear();
        }
    }
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
    fn tracking_is_bounded() {
        let policy = Arc::new(PolicySet::empty());
        let mut p = Prepared::default();
        let one = decided("select 1", &policy);
        for i in 0..MAX_TRACKED {
            assert!(p.has_room());
            p.parse_sent(i.to_string().as_bytes(), one.clone());
        }
        assert!(!p.has_room());
    }
}
