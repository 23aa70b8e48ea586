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
            statements: statements
                .iter()
                .map(|s| StatementSummary {
                    text: String::new(),
                    ..s.clone()
                })
                .collect(),
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
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

    use crate::policy::tests::set as policy;

    /// The test policy, an analysis cache with room for every test's
    /// shapes, and an empty memo.
    fn fixtures() -> (PolicySet, AnalysisCache, DecisionMemo) {
        (
            policy(POLICY),
            AnalysisCache::new(256),
            DecisionMemo::default(),
        )
    }

    /// Decides `sql` through `memo` and afresh; both must agree.
    fn decide(
        memo: &mut DecisionMemo,
        set: &PolicySet,
        cache: &AnalysisCache,
        sql: &str,
    ) -> Vec<Decision> {
        let identity = ProcessIdentity::default();
        let analysis = cache.analyze(sql);
        let memoised = memo.decide(set, "db", &identity, sql, &analysis);
        let fresh = set.decide_analysis("db", &identity, sql, &analysis);
        assert_eq!(*memoised, *fresh, "{sql}");
        fresh
    }

    fn actions(decisions: &[Decision]) -> Vec<Action> {
        decisions.iter().map(|d| d.action).collect()
    }

    #[test]
    fn a_new_literal_in_a_known_shape_reuses_the_decision() {
        let (set, cache, mut memo) = fixtures();
        let first = decide(
            &mut memo,
            &set,
            &cache,
            "SELECT * FROM secrets WHERE id = 1",
        );
        assert_eq!(actions(&first), [Action::Deny]);
        assert_eq!(memo.len(), 1);
        let again = decide(
            &mut memo,
            &set,
            &cache,
            "SELECT * FROM secrets WHERE id = 2",
        );
        assert_eq!(again, first);
        assert_eq!(memo.len(), 1, "the second text found the first one's entry");
        // A hit shares the decisions made for the first text.
        let identity = ProcessIdentity::default();
        let [one, two] = [
            "SELECT * FROM secrets WHERE id = 3",
            "SELECT * FROM secrets WHERE id = 4",
        ]
        .map(|sql| memo.decide(&set, "db", &identity, sql, &cache.analyze(sql)));
        assert!(Arc::ptr_eq(&one, &two));
        // Another table is another analysis, decided on its own.
        let other = decide(&mut memo, &set, &cache, "SELECT * FROM orders WHERE id = 2");
        assert_eq!(actions(&other), [Action::Allow]);
        assert_eq!(memo.len(), 2);
    }

    #[test]
    fn a_policy_that_reads_the_text_is_decided_per_text() {
        let set = policy(
            r#"
[[rule]]
name = "no-test-card"
action = "deny"
[rule.match]
text_regex = "4111"
"#,
        );
        assert!(set.reads_text());
        let (cache, mut memo) = (AnalysisCache::new(64), DecisionMemo::default());
        let allowed = decide(
            &mut memo,
            &set,
            &cache,
            "SELECT * FROM t WHERE card = '1234'",
        );
        let denied = decide(
            &mut memo,
            &set,
            &cache,
            "SELECT * FROM t WHERE card = '4111'",
        );
        assert_eq!(actions(&allowed), [Action::Allow]);
        assert_eq!(actions(&denied), [Action::Deny]);
        assert!(memo.is_empty());
    }

    #[test]
    fn a_reloaded_policy_decides_again() {
        let (cache, mut memo) = (AnalysisCache::new(64), DecisionMemo::default());
        let before = policy("[defaults]\naction = \"allow\"\n");
        let sql = "SELECT * FROM secrets WHERE id = 1";
        assert_eq!(
            actions(&decide(&mut memo, &before, &cache, sql)),
            [Action::Allow]
        );
        let after = policy(POLICY);
        assert_ne!(before.generation(), after.generation());
        assert_eq!(
            actions(&decide(&mut memo, &after, &cache, sql)),
            [Action::Deny]
        );
    }

    #[test]
    fn the_memo_keeps_a_bounded_number_of_shapes() {
        let (set, cache, mut memo) = fixtures();
        for round in 0..2 {
            for i in 0..MEMO_ENTRIES + 4 {
                let table = if i % 2 == 0 { "secret" } else { "open" };
                let sql = format!("SELECT * FROM {table}_{i} WHERE id = {round}");
                let want = if i % 2 == 0 {
                    Action::Deny
                } else {
                    Action::Allow
                };
                assert_eq!(
                    actions(&decide(&mut memo, &set, &cache, &sql)),
                    [want],
                    "{sql}"
                );
            }
        }
        assert_eq!(memo.len(), MEMO_ENTRIES);
    }

    #[test]
    fn several_statements_are_compared_one_by_one() {
        let (set, cache, mut memo) = fixtures();
        let one = decide(&mut memo, &set, &cache, "SELECT 1; SELECT * FROM orders");
        assert_eq!(actions(&one), [Action::Allow, Action::Allow]);
        let two = decide(&mut memo, &set, &cache, "SELECT 1; SELECT * FROM secrets");
        assert_eq!(actions(&two), [Action::Allow, Action::Deny]);
    }
}
