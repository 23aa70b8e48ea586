//! [`DecisionMemo`]: a session's decisions, reused for statements that
//! differ from an earlier one only in their text.

use std::sync::Arc;

use crate::identity::ProcessIdentity;
use crate::sql::{Analysis, StatementSummary};

use super::{Decision, PolicySet};

/// Analyses a memo keeps, the oldest replaced first. pgbench's TPC-B-like
/// script sends seven shapes; an ORM's hot loop a handful.
const MEMO_ENTRIES: usize = 16;

/// Statements with more names than this (tables read and written,
/// functions) are decided afresh: comparing them would cost about what
/// deciding does, and memos stay small however many sessions are open.
const MAX_MEMO_NAMES: usize = 32;

/// The decisions one session made, for its statements' analyses.
///
/// A decision reads the target and the process identity, both fixed for a
/// session, the statement's analysis, and its text only through
/// `match.text_regex`. So a statement whose analysis equals an earlier
/// one's in everything but the text (the same shape with new literal
/// values, as pgbench or an ORM sends it) gets the earlier decisions,
/// unless the policy has a `text_regex` condition, or was reloaded since.
/// One memo serves one session: it does not key on target or identity.
#[derive(Debug, Default)]
pub struct DecisionMemo {
    entries: Vec<MemoEntry>,
    /// Where the next entry goes once the memo is full.
    next: usize,
}

#[derive(Debug)]
struct MemoEntry {
    /// [`PolicySet::generation`] of the policy that decided.
    policy: u64,
    /// The analysed statements, their texts left empty.
    statements: Vec<StatementSummary>,
    decisions: Arc<[Decision]>,
}

impl DecisionMemo {
    /// [`PolicySet::decide_analysis`], from the memo when it can be (a
    /// hit shares the decisions, it does not copy them).
    pub fn decide(
        &mut self,
        policy: &PolicySet,
        target: &str,
        identity: &ProcessIdentity,
        text: &str,
        analysis: &Analysis,
    ) -> Arc<[Decision]> {
        let fresh = || Arc::from(policy.decide_analysis(target, identity, text, analysis));
        let Analysis::Parsed { statements } = analysis else {
            return fresh();
        };
        if policy.reads_text() || !memoisable(statements) {
            return fresh();
        }
        let generation = policy.generation();
        if let Some(entry) = self.entries.iter().find(|e| {
            e.policy == generation
                && e.statements.len() == statements.len()
                && e.statements
                    .iter()
                    .zip(statements)
                    .all(|(a, b)| same_but_text(a, b))
        }) {
            return Arc::clone(&entry.decisions);
        }
        let decisions = fresh();
        let entry = MemoEntry {
            policy: generation,
            statements: statements.iter().map(without_text).collect(),
            decisions: Arc::clone(&decisions),
        };
        if self.entries.len() < MEMO_ENTRIES {
            self.entries.push(entry);
        } else if let Some(slot) = self.entries.get_mut(self.next) {
            *slot = entry;
            self.next = (self.next + 1) % MEMO_ENTRIES;
        }
        decisions
    }

    /// How many analyses are kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn memoisable(statements: &[StatementSummary]) -> bool {
    let names: usize = statements
        .iter()
        .map(|s| s.tables_read.len() + s.tables_written.len() + s.functions.len())
        .sum();
    !statements.is_empty() && names <= MAX_MEMO_NAMES
}

/// A copy of `s` without its text (which the memo never compares).
fn without_text(s: &StatementSummary) -> StatementSummary {
    let StatementSummary {
        kind,
        transaction,
        command,
        tables_read,
        tables_written,
        functions,
        flags,
        fingerprint,
        text: _,
    } = s;
    StatementSummary {
        kind: *kind,
        transaction: *transaction,
        command: Arc::clone(command),
        tables_read: tables_read.clone(),
        tables_written: tables_written.clone(),
        functions: functions.clone(),
        flags: flags.clone(),
        fingerprint: Arc::clone(fingerprint),
        text: String::new(),
    }
}

/// Equal in everything a decision can read but the text. Written out
/// field by field, so a field added to the summary must be placed here
/// (the pattern below stops compiling until it is).
fn same_but_text(a: &StatementSummary, b: &StatementSummary) -> bool {
    let StatementSummary {
        kind,
        transaction,
        command,
        tables_read,
        tables_written,
        functions,
        flags,
        fingerprint,
        text: _,
    } = a;
    *kind == b.kind
        && *transaction == b.transaction
        && *flags == b.flags
        && *command == b.command
        && *fingerprint == b.fingerprint
        && *tables_read == b.tables_read
        && *tables_written == b.tables_written
        && *functions == b.functions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::set as policy;
    use crate::policy::Action;
    use crate::sql::AnalysisCache;

    const POLICY: &str = r#"
[defaults]
action = "allow"

[[rule]]
name = "no-secrets"
action = "deny"
[rule.match]
tables = ["secret*"]
"#;

    /// One session deciding under `set`, with the agent's analysis cache.
    struct Session {
        set: PolicySet,
        cache: AnalysisCache,
        memo: DecisionMemo,
        identity: ProcessIdentity,
    }

    impl Session {
        fn new(policy_text: &str) -> Session {
            Session {
                set: policy(policy_text),
                cache: AnalysisCache::new(256),
                memo: DecisionMemo::default(),
                identity: ProcessIdentity::default(),
            }
        }

        /// Decides `sql` through the memo, checks that a fresh decision
        /// agrees, and returns the memo's (shared) decisions.
        fn decide(&mut self, sql: &str) -> Arc<[Decision]> {
            let analysis = self.cache.analyze(sql);
            let memoised = self
                .memo
                .decide(&self.set, "db", &self.identity, sql, &analysis);
            let fresh = self
                .set
                .decide_analysis("db", &self.identity, sql, &analysis);
            assert_eq!(*memoised, *fresh, "{sql}");
            memoised
        }

        fn actions(&mut self, sql: &str) -> Vec<Action> {
            self.decide(sql).iter().map(|d| d.action).collect()
        }
    }

    #[test]
    fn a_new_literal_in_a_known_shape_reuses_the_decision() {
        let mut session = Session::new(POLICY);
        let first = session.decide("SELECT * FROM secrets WHERE id = 1");
        let first_actions: Vec<Action> = first.iter().map(|d| d.action).collect();
        assert_eq!(first_actions, [Action::Deny]);
        assert_eq!(session.memo.len(), 1);
        // The second text finds the first one's entry and shares it.
        let again = session.decide("SELECT * FROM secrets WHERE id = 2");
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(session.memo.len(), 1);
        // Another table is another analysis, decided on its own.
        assert_eq!(
            session.actions("SELECT * FROM orders WHERE id = 2"),
            [Action::Allow]
        );
        assert_eq!(session.memo.len(), 2);
    }

    #[test]
    fn a_policy_that_reads_the_text_is_decided_per_text() {
        let mut session = Session::new(
            "[[rule]]\nname = \"no-test-card\"\naction = \"deny\"\n[rule.match]\ntext_regex = \"4111\"\n",
        );
        assert!(session.set.reads_text());
        let allowed = session.actions("SELECT * FROM t WHERE card = '1234'");
        let denied = session.actions("SELECT * FROM t WHERE card = '4111'");
        assert_eq!(allowed, [Action::Allow]);
        assert_eq!(denied, [Action::Deny]);
        assert!(session.memo.is_empty());
    }

    #[test]
    fn a_reloaded_policy_decides_again() {
        let mut session = Session::new("[defaults]\naction = \"allow\"\n");
        let sql = "SELECT * FROM secrets WHERE id = 1";
        assert_eq!(session.actions(sql), [Action::Allow]);
        let before = session.set.generation();
        session.set = policy(POLICY);
        assert_ne!(before, session.set.generation());
        assert_eq!(session.actions(sql), [Action::Deny]);
    }

    #[test]
    fn the_memo_keeps_a_bounded_number_of_shapes() {
        let mut session = Session::new(POLICY);
        for round in 0..2 {
            for i in 0..MEMO_ENTRIES + 4 {
                let (table, want) = if i % 2 == 0 {
                    ("secret", Action::Deny)
                } else {
                    ("open", Action::Allow)
                };
                let sql = format!("SELECT * FROM {table}_{i} WHERE id = {round}");
                assert_eq!(session.actions(&sql), [want], "{sql}");
            }
        }
        assert_eq!(session.memo.len(), MEMO_ENTRIES);
    }

    #[test]
    fn allow_lists_are_decided_from_the_analysis_so_new_literals_reuse_them() {
        let mut session = Session::new(
            "[[rule]]\nname = \"only-listed\"\naction = \"deny\"\n[rule.match]\nfunctions_outside = [\"lower\"]\n[[rule]]\nname = \"only-orders\"\naction = \"deny\"\n[rule.match]\ntables_outside = [\"orders\"]\n",
        );
        assert!(!session.set.reads_text());
        let first = session.decide("SELECT lower(name) FROM orders WHERE id = 1");
        assert_eq!(first.first().map(|d| d.action), Some(Action::Allow));
        let again = session.decide("SELECT lower(name) FROM orders WHERE id = 2");
        assert!(Arc::ptr_eq(&first, &again));
        // Another function, table or schema is another analysis.
        for sql in [
            "SELECT upper(name) FROM orders WHERE id = 1",
            "SELECT lower(name) FROM secrets WHERE id = 1",
            "SELECT lower(name) FROM audit.orders WHERE id = 1",
            "SELECT evil.lower(name) FROM orders WHERE id = 1",
        ] {
            assert_eq!(session.actions(sql), [Action::Deny], "{sql}");
            assert_eq!(
                session.actions(&sql.replace('1', "2")),
                [Action::Deny],
                "{sql}"
            );
        }
        assert_eq!(session.memo.len(), 5);
    }

    #[test]
    fn several_statements_are_compared_one_by_one() {
        let mut session = Session::new(POLICY);
        assert_eq!(
            session.actions("SELECT 1; SELECT * FROM orders"),
            [Action::Allow, Action::Allow]
        );
        assert_eq!(
            session.actions("SELECT 1; SELECT * FROM secrets"),
            [Action::Allow, Action::Deny]
        );
    }
}
