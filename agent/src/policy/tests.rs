//! Table-driven tests of the matchers, conflict semantics, defaults,
//! unparsable handling, errors, loading, tests files and the shipped
//! policies.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use super::*;
use crate::identity::{Ancestor, CiContext, CiProvider, InstanceCheck, InstanceVerdict};
use crate::sql::{StatementFlags, StatementKind, TableRef};

// ---- fixtures -------------------------------------------------------------

fn table(name: &str) -> TableRef {
    match name.split_once('.') {
        Some((schema, name)) => TableRef {
            schema: Some(schema.to_owned()),
            name: name.to_owned(),
        },
        None => TableRef {
            schema: None,
            name: name.to_owned(),
        },
    }
}

fn stmt(kind: StatementKind, command: &str, read: &[&str], written: &[&str]) -> StatementSummary {
    StatementSummary {
        kind,
        transaction: None,
        command: command.into(),
        tables_read: read.iter().map(|t| table(t)).collect(),
        tables_written: written.iter().map(|t| table(t)).collect(),
        functions: Vec::new(),
        flags: StatementFlags::default(),
        fingerprint: "0123456789abcdef".into(),
        text: format!("{command} ..."),
    }
}

/// `DELETE FROM public.orders` (no WHERE), calling a file function.
fn delete_all() -> StatementSummary {
    let mut s = stmt(StatementKind::Delete, "DELETE", &[], &["public.orders"]);
    s.flags.no_where = true;
    s.functions = vec!["pg_catalog.pg_read_file".to_owned()];
    s.text = "DELETE FROM public.orders WHERE pg_catalog.pg_read_file('x') = ''".to_owned();
    s
}

fn select_secrets() -> StatementSummary {
    let mut s = stmt(StatementKind::Select, "SELECT", &["secrets"], &[]);
    s.text = "SELECT * FROM secrets".to_owned();
    s
}

const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn ci_identity() -> ProcessIdentity {
    ProcessIdentity {
        pid: Some(4242),
        uid: Some(1001),
        gid: Some(1001),
        user: Some("runner".to_owned()),
        group: Some("runner".to_owned()),
        comm: Some("psql".to_owned()),
        exe: Some("/usr/bin/psql".to_owned()),
        exe_sha256: Some(SHA.to_owned()),
        cmdline: vec!["psql".to_owned()],
        cgroup: Some("/ci.slice/job-1".to_owned()),
        ancestry: vec![
            Ancestor {
                pid: 4000,
                comm: "bash".to_owned(),
                exe: Some("/usr/bin/bash".to_owned()),
            },
            Ancestor {
                pid: 3000,
                comm: "Runner.Worker".to_owned(),
                exe: Some("/home/runner/bin/Runner.Worker".to_owned()),
            },
        ],
        ci: Some(CiContext {
            provider: CiProvider::GithubActions,
            repository: Some("acme/shop".to_owned()),
            branch: Some("main".to_owned()),
            job: Some("test-db".to_owned()),
            run_id: None,
            workflow: Some("CI".to_owned()),
            actor: None,
            url: None,
            commit: None,
            runner_pid: Some(3000),
            verified: true,
        }),
        gaps: Vec::new(),
        instance: None,
    }
}

/// The CI identity, compared with what the kernel captured at connect.
fn ci_identity_checked(verdict: InstanceVerdict) -> ProcessIdentity {
    ProcessIdentity {
        instance: Some(InstanceCheck {
            verdict,
            at_connect: None,
            at_accept: None,
            reason: None,
        }),
        ..ci_identity()
    }
}

pub(super) fn set(text: &str) -> PolicySet {
    match PolicySet::from_str(Path::new("p.toml"), text) {
        Ok(set) => set,
        Err(e) => panic!("policy does not load:\n{e}\n---\n{text}"),
    }
}

fn decide_parsed(
    set: &PolicySet,
    target: &str,
    id: &ProcessIdentity,
    s: &StatementSummary,
) -> Decision {
    set.decide(&Request {
        target,
        identity: id,
        statement: Statement::Parsed(s),
        multi_statement: false,
    })
}

fn decide_unparsable(set: &PolicySet, target: &str, text: &str) -> Decision {
    set.decide(&Request {
        target,
        identity: &ci_identity(),
        statement: Statement::Unparsable {
            text,
            error: "syntax error at or near \"FROMM\"",
        },
        multi_statement: false,
    })
}

fn one_rule(conditions: &str) -> String {
    format!("[[rule]]\nname = \"r\"\naction = \"deny\"\n[rule.match]\n{conditions}\n")
}

// ---- matchers ---------------------------------------------------------------

#[derive(Clone, Copy)]
enum Who {
    Ci,
    Nobody,
    /// `Ci`, shown to be the process that connected.
    Same,
    /// `Ci`, but it executed another program (or its pid was reused) after
    /// connecting.
    Changed,
    /// `Ci`, but the comparison could not be made.
    Unverified,
}

#[derive(Clone, Copy)]
enum What {
    DeleteAll,
    SelectSecrets,
    Multi,
}

#[test]
fn every_matcher_matches_and_misses() {
    use What::*;
    use Who::*;
    #[rustfmt::skip]
    let cases: &[(&str, &str, Who, What, bool)] = &[
        // (conditions, target, identity, statement, matches)
        ("", "prod-orders", Ci, DeleteAll, true),
        ("targets = [\"prod-*\"]", "prod-orders", Ci, DeleteAll, true),
        ("targets = \"prod-*\"", "prod-orders", Ci, DeleteAll, true),
        ("targets = [\"staging\", \"prod-orders\"]", "prod-orders", Ci, DeleteAll, true),
        ("targets = [\"prod-*\"]", "staging", Ci, DeleteAll, false),
        ("targets = [\"Prod-*\"]", "prod-orders", Ci, DeleteAll, false),
        ("users = [\"runner\"]", "t", Ci, DeleteAll, true),
        ("users = [\"root\", \"admin\"]", "t", Ci, DeleteAll, false),
        ("users = [\"runner\"]", "t", Nobody, DeleteAll, false),
        ("uids = [0, 1001]", "t", Ci, DeleteAll, true),
        ("uids = 1001", "t", Ci, DeleteAll, true),
        ("uids = [0]", "t", Ci, DeleteAll, false),
        ("uids = [0]", "t", Nobody, DeleteAll, false),
        ("exe = [\"/usr/bin/psql\"]", "t", Ci, DeleteAll, true),
        ("exe = [\"/usr/bin/*\"]", "t", Ci, DeleteAll, true),
        ("exe = [\"/usr/*\"]", "t", Ci, DeleteAll, false),
        ("exe = [\"/usr/**\"]", "t", Ci, DeleteAll, true),
        ("exe = [\"/usr/bin/pg_dump\"]", "t", Ci, DeleteAll, false),
        ("exe = [\"**\"]", "t", Nobody, DeleteAll, false),
        ("exe = [\"/usr/bin/psql\"]", "t", Same, DeleteAll, true),
        ("exe = [\"/usr/bin/psql\"]", "t", Changed, DeleteAll, false),
        ("exe = [\"**\"]", "t", Changed, DeleteAll, false),
        ("exe = [\"/usr/bin/psql\"]", "t", Unverified, DeleteAll, false),
        (&format!("exe_sha256 = [\"{SHA}\"]"), "t", Same, DeleteAll, true),
        (&format!("exe_sha256 = [\"{SHA}\"]"), "t", Changed, DeleteAll, false),
        (&format!("exe_sha256 = [\"{SHA}\"]"), "t", Unverified, DeleteAll, false),
        // Only executable conditions distrust a changed identity.
        ("users = [\"runner\"]", "t", Changed, DeleteAll, true),
        (&format!("exe_sha256 = [\"{}\"]", SHA.to_ascii_uppercase()), "t", Ci, DeleteAll, true),
        (&format!("exe_sha256 = [\"{}\"]", "0".repeat(64)), "t", Ci, DeleteAll, false),
        ("ancestry_contains = [\"Runner.Worker\"]", "t", Ci, DeleteAll, true),
        ("ancestry_contains = [\"**/Runner.Worker\"]", "t", Ci, DeleteAll, true),
        ("ancestry_contains = [\"/home/*/Runner.Worker\"]", "t", Ci, DeleteAll, false),
        ("ancestry_contains = [\"sshd\", \"tmux*\"]", "t", Ci, DeleteAll, false),
        ("ancestry_contains = [\"psql\"]", "t", Ci, DeleteAll, false), // the process itself is no ancestor
        ("cgroup = [\"/ci.slice/*\"]", "t", Ci, DeleteAll, true),
        ("cgroup = [\"/user.slice/**\"]", "t", Ci, DeleteAll, false),
        ("cgroup = [\"**\"]", "t", Nobody, DeleteAll, false),
        ("ci_provider = [\"github_actions\"]", "t", Ci, DeleteAll, true),
        ("ci_provider = [\"gitlab_ci\", \"jenkins\"]", "t", Ci, DeleteAll, false),
        ("ci_provider = [\"github_actions\"]", "t", Nobody, DeleteAll, false),
        ("ci_repository = [\"acme/*\"]", "t", Ci, DeleteAll, true),
        ("ci_repository = [\"other/*\"]", "t", Ci, DeleteAll, false),
        ("ci_branch = [\"main\", \"release/*\"]", "t", Ci, DeleteAll, true),
        ("ci_branch = [\"release/*\"]", "t", Ci, DeleteAll, false),
        ("ci_job = [\"test*\"]", "t", Ci, DeleteAll, true),
        ("ci_job = [\"deploy\"]", "t", Ci, DeleteAll, false),
        ("ci_workflow = [\"CI\"]", "t", Ci, DeleteAll, true),
        ("ci_workflow = [\"Deploy*\"]", "t", Ci, DeleteAll, false),
        ("ci_workflow = [\"CI\"]", "t", Nobody, DeleteAll, false),
        ("ci_verified = true", "t", Ci, DeleteAll, true),
        ("ci_verified = false", "t", Ci, DeleteAll, false),
        ("ci_verified = false", "t", Nobody, DeleteAll, false),
        ("ci_verified = true", "t", Nobody, DeleteAll, false),
        ("kinds = [\"delete\"]", "t", Ci, DeleteAll, true),
        ("kinds = [\"update\", \"delete\"]", "t", Ci, DeleteAll, true),
        ("kinds = [\"select\"]", "t", Ci, DeleteAll, false),
        ("commands = [\"delete\"]", "t", Ci, DeleteAll, true),
        ("commands = [\"DROP *\"]", "t", Ci, DeleteAll, false),
        ("tables = [\"orders\"]", "t", Ci, DeleteAll, true),
        ("tables = [\"public.orders\"]", "t", Ci, DeleteAll, true),
        ("tables = [\"ORDERS\"]", "t", Ci, DeleteAll, true),
        ("tables = [\"ord*\"]", "t", Ci, DeleteAll, true),
        ("tables = [\"*.orders\"]", "t", Ci, DeleteAll, true),
        ("tables = [\"other.orders\"]", "t", Ci, DeleteAll, false),
        // SQL names: plain, prefix and other globs, each in any case
        ("tables = [\"order\"]", "t", Ci, DeleteAll, false),
        ("tables = [\"ORD*\"]", "t", Ci, DeleteAll, true),
        ("tables = [\"Public.Ord*\"]", "t", Ci, DeleteAll, true),
        ("tables = [\"orders_*\"]", "t", Ci, DeleteAll, false),
        ("tables = [\"O?DERS\"]", "t", Ci, DeleteAll, true),
        ("tables = [\"o[rx]ders\", \"nothing\"]", "t", Ci, DeleteAll, true),
        ("tables = [\"*S\"]", "t", Ci, DeleteAll, true),
        ("tables = [\"ord*x\"]", "t", Ci, DeleteAll, false),
        ("commands = [\"DEL*\"]", "t", Ci, DeleteAll, true),
        ("functions = [\"PG_Read_*\"]", "t", Ci, DeleteAll, true),
        ("tables = [\"secrets\"]", "t", Ci, SelectSecrets, true),
        ("tables = [\"public.secrets\"]", "t", Ci, SelectSecrets, false), // schema not written
        ("tables_read = [\"orders\"]", "t", Ci, DeleteAll, false),
        ("tables_written = [\"orders\"]", "t", Ci, DeleteAll, true),
        ("tables_read = [\"secrets\"]", "t", Ci, SelectSecrets, true),
        ("tables_written = [\"secrets\"]", "t", Ci, SelectSecrets, false),
        ("functions = [\"pg_read_file\"]", "t", Ci, DeleteAll, true),
        ("functions = [\"pg_catalog.*\"]", "t", Ci, DeleteAll, true),
        ("functions = [\"lo_*\"]", "t", Ci, DeleteAll, false),
        ("functions = [\"*\"]", "t", Ci, SelectSecrets, false),
        ("flags = [\"no_where\"]", "t", Ci, DeleteAll, true),
        ("flags = [\"copy_program\", \"no_where\"]", "t", Ci, DeleteAll, true),
        ("flags = [\"copy_program\"]", "t", Ci, DeleteAll, false),
        ("flags = [\"multi_statement\"]", "t", Ci, DeleteAll, false),
        ("flags = [\"multi_statement\"]", "t", Ci, Multi, true),
        ("flags = [\"unparsable\"]", "t", Ci, DeleteAll, false),
        ("text_regex = \"(?i)delete\\\\s+from\"", "t", Ci, DeleteAll, true),
        ("text_regex = [\"^SELECT\", \"pg_read_file\"]", "t", Ci, DeleteAll, true),
        ("text_regex = \"^SELECT\"", "t", Ci, DeleteAll, false),
        // AND across conditions
        ("targets = [\"prod-*\"]\nkinds = [\"delete\"]\nci_provider = [\"github_actions\"]", "prod-orders", Ci, DeleteAll, true),
        ("targets = [\"prod-*\"]\nkinds = [\"delete\"]\nci_provider = [\"github_actions\"]", "dev", Ci, DeleteAll, false),
        ("targets = [\"prod-*\"]\nkinds = [\"select\"]\nci_provider = [\"github_actions\"]", "prod-orders", Ci, DeleteAll, false),
    ];
    let ci = ci_identity();
    let nobody = ProcessIdentity::default();
    let same = ci_identity_checked(InstanceVerdict::Same);
    let changed = ci_identity_checked(InstanceVerdict::Changed);
    let unverified = ci_identity_checked(InstanceVerdict::Unverified);
    let delete = delete_all();
    let secrets = select_secrets();
    for (conditions, target, who, what, want) in cases {
        let set = set(&one_rule(conditions));
        let id = match who {
            Who::Ci => &ci,
            Who::Nobody => &nobody,
            Who::Same => &same,
            Who::Changed => &changed,
            Who::Unverified => &unverified,
        };
        let (s, multi) = match what {
            What::DeleteAll => (&delete, false),
            What::SelectSecrets => (&secrets, false),
            What::Multi => (&delete, true),
        };
        let d = set.decide(&Request {
            target,
            identity: id,
            statement: Statement::Parsed(s),
            multi_statement: multi,
        });
        assert_eq!(
            !d.matched.is_empty(),
            *want,
            "conditions {conditions:?} on target {target}: {d:?}"
        );
        assert_eq!(d.default_used, !*want);
    }
}

#[test]
fn an_executable_exception_does_not_exempt_a_process_that_changed_since_connect() {
    let set = set(
        "[[rule]]\nname = \"no-delete\"\naction = \"deny\"\n[rule.match]\nkinds = [\"delete\"]\n[rule.except]\nexe = [\"/usr/bin/psql\"]\n",
    );
    let delete = delete_all();
    let decide = |identity: &ProcessIdentity| {
        set.decide(&Request {
            target: "t",
            identity,
            statement: Statement::Parsed(&delete),
            multi_statement: false,
        })
        .matched
        .len()
    };
    assert_eq!(decide(&ci_identity_checked(InstanceVerdict::Same)), 0);
    assert_eq!(decide(&ci_identity()), 0, "nothing captured: as before");
    assert_eq!(decide(&ci_identity_checked(InstanceVerdict::Changed)), 1);
    assert_eq!(decide(&ci_identity_checked(InstanceVerdict::Unverified)), 1);
}

#[test]
fn every_kind_name_parses_and_has_its_own_bit() {
    use crate::sql::StatementKind as K;
    // Exhaustive: a new kind fails to compile here until it is listed.
    let all = |k: K| match k {
        K::Select
        | K::Insert
        | K::Update
        | K::Delete
        | K::Merge
        | K::Copy
        | K::Create
        | K::Alter
        | K::Drop
        | K::Truncate
        | K::Grant
        | K::Revoke
        | K::Transaction
        | K::Set
        | K::Call
        | K::Do
        | K::Prepared
        | K::Explain
        | K::Other
        | K::Exec
        | K::Shell
        | K::Subsystem
        | K::Forward => (),
    };
    let mut bits = 0u32;
    for name in matcher::KIND_NAMES {
        let kind: K = match serde_json::from_value(serde_json::Value::String(name.to_owned())) {
            Ok(k) => k,
            Err(e) => panic!("{name}: {e}"),
        };
        all(kind);
        assert_eq!(kind.as_str(), name);
        let bit = matcher::kind_bit(kind);
        assert_eq!(bits & bit, 0, "{name} shares a bit");
        bits |= bit;
    }
    assert_eq!(bits.count_ones() as usize, matcher::KIND_NAMES.len());
}

// ---- conflicts --------------------------------------------------------------

const CONFLICT: &str = r#"
[[rule]]
name = "allow-all"
action = "allow"

[[rule]]
name = "audit-writes"
action = "audit"
[rule.match]
kinds = ["insert", "update", "delete"]

[[rule]]
name = "mask-secrets"
action = "mask"
mask_columns = ["secrets.api_key"]
[rule.match]
tables = ["secrets"]

[[rule]]
name = "review-deletes"
action = "review"
approvers = ["group:dba"]
[rule.match]
kinds = ["delete"]

[[rule]]
name = "deny-unbounded"
action = "deny"
message = "add a WHERE clause"
[rule.match]
flags = ["no_where"]
"#;

#[test]
fn most_restrictive_matching_rule_wins() {
    let set = set(CONFLICT);
    let id = ci_identity();
    let mut bounded = delete_all();
    bounded.flags.no_where = false;
    let insert = stmt(StatementKind::Insert, "INSERT", &[], &["orders"]);
    let read = stmt(StatementKind::Select, "SELECT", &["orders"], &[]);
    let secrets = select_secrets();
    let unbounded = delete_all();
    #[rustfmt::skip]
    let cases: Vec<(&StatementSummary, Action, &[&str])> = vec![
        (&read, Action::Allow, &["allow-all"]),
        (&insert, Action::Audit, &["allow-all", "audit-writes"]),
        (&secrets, Action::Mask, &["allow-all", "mask-secrets"]),
        (&bounded, Action::Review, &["allow-all", "audit-writes", "review-deletes"]),
        (&unbounded, Action::Deny, &["allow-all", "audit-writes", "review-deletes", "deny-unbounded"]),
    ];
    for (s, action, rules) in cases {
        let d = decide_parsed(&set, "t", &id, s);
        assert_eq!(d.action, action, "{}", s.text);
        let names: Vec<&str> = d.matched.iter().map(|r| &*r.name).collect();
        assert_eq!(names, rules);
        assert!(!d.default_used);
        assert_eq!(
            d.deciding_rule().map(|r| r.action),
            Some(action),
            "the deciding rule carries the verdict"
        );
    }
}

#[test]
fn rule_order_does_not_change_the_action() {
    let rules: Vec<&str> = CONFLICT.split("[[rule]]").skip(1).collect();
    let reversed: String = rules.iter().rev().map(|r| format!("[[rule]]{r}")).collect();
    let a = set(CONFLICT);
    let b = set(&reversed);
    let id = ci_identity();
    for s in [delete_all(), select_secrets()] {
        assert_eq!(
            decide_parsed(&a, "t", &id, &s).action,
            decide_parsed(&b, "t", &id, &s).action
        );
    }
}

#[test]
fn actions_order_from_allow_to_deny() {
    assert!(Action::Allow < Action::Audit);
    assert!(Action::Audit < Action::Mask);
    assert!(Action::Mask < Action::Review);
    assert!(Action::Review < Action::Deny);
    // Metrics index their counters by discriminant.
    for (i, a) in Action::ALL.into_iter().enumerate() {
        assert_eq!(a as usize, i, "{a}");
    }
    for a in Action::ALL {
        assert_eq!(Action::from_name(a.as_str()), Some(a));
        assert_eq!(
            serde_json::to_value(a).ok(),
            Some(serde_json::Value::String(a.as_str().to_owned()))
        );
    }
    let refused: Vec<Action> = Action::ALL.into_iter().filter(|a| a.is_refused()).collect();
    assert_eq!(refused, [Action::Review, Action::Deny]);
    assert_eq!(Action::from_name("block"), None);
}

#[test]
fn except_carves_exceptions_out_of_a_rule() {
    let set = set(r#"
[[rule]]
name = "no-drop"
action = "deny"
[rule.match]
kinds = ["drop"]
[rule.except]
targets = ["ci-*"]
kinds = ["drop"]
"#);
    let drop = stmt(StatementKind::Drop, "DROP TABLE", &[], &["orders"]);
    let id = ci_identity();
    assert_eq!(decide_parsed(&set, "prod", &id, &drop).action, Action::Deny);
    assert_eq!(
        decide_parsed(&set, "ci-db", &id, &drop).action,
        Action::Allow
    );
    // `except` needs all its conditions; on unparsable text its `kinds`
    // cannot hold, so it never excuses: fail closed.
    let set2 = self::set(
        r#"
[[rule]]
name = "deny-on-prod"
action = "deny"
[rule.match]
targets = ["prod"]
[rule.except]
kinds = ["select"]
"#,
    );
    assert_eq!(decide_unparsable(&set2, "prod", "SELEC 1").matched.len(), 1);
    let read = stmt(StatementKind::Select, "SELECT", &[], &[]);
    assert_eq!(
        decide_parsed(&set2, "prod", &id, &read).action,
        Action::Allow
    );
}

/// The rule mask of each target is kept after its first statement: the
/// targets of one set, asked in turn and again, keep their own answers.
#[test]
fn targets_decided_in_turn_keep_their_own_rules() {
    let set = set(r#"
[[rule]]
name = "prod-deletes"
action = "deny"
[rule.match]
targets = ["prod-*"]
kinds = ["delete"]

[[rule]]
name = "staging-deletes"
action = "audit"
[rule.match]
targets = ["staging"]
kinds = ["delete"]

[[rule]]
name = "everywhere"
action = "allow"
[rule.match]
kinds = ["delete"]
"#);
    let id = ci_identity();
    let delete = delete_all();
    for _ in 0..2 {
        for (target, want, rules) in [
            (
                "prod-orders",
                Action::Deny,
                vec!["prod-deletes", "everywhere"],
            ),
            (
                "staging",
                Action::Audit,
                vec!["staging-deletes", "everywhere"],
            ),
            ("dev", Action::Allow, vec!["everywhere"]),
            (
                "prod-users",
                Action::Deny,
                vec!["prod-deletes", "everywhere"],
            ),
        ] {
            let d = decide_parsed(&set, target, &id, &delete);
            let names: Vec<&str> = d.matched.iter().map(|r| &*r.name).collect();
            assert_eq!((d.action, names), (want, rules), "{target}");
        }
    }
}

// ---- defaults -----------------------------------------------------------------

#[test]
fn defaults_per_target() {
    let set = set(r#"
[defaults]
action = "audit"
[defaults.targets]
"prod-*" = "review"
"prod-orders" = "deny"
"prod-o*" = "allow"
"stage" = "allow"
"#);
    let read = stmt(StatementKind::Select, "SELECT", &["orders"], &[]);
    let id = ci_identity();
    #[rustfmt::skip]
    let cases = [
        ("prod-orders", Action::Deny),   // exact name beats globs, wherever it is
        ("prod-others", Action::Review), // first matching glob in file order
        ("stage", Action::Allow),
        ("dev", Action::Audit),          // file default
    ];
    // Twice: the second time from the per-target cache.
    for (target, want) in cases.into_iter().chain(cases) {
        let d = decide_parsed(&set, target, &id, &read);
        assert_eq!(d.action, want, "{target}");
        assert!(d.default_used);
        assert!(d.matched.is_empty());
        assert!(d.reason.contains(target), "{}", d.reason);
    }
}

#[test]
fn defaults_across_files_take_the_most_restrictive_that_is_set() {
    let files = |texts: &[&str]| {
        let sources: Vec<(PathBuf, String)> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (PathBuf::from(format!("f{i}.toml")), (*t).to_owned()))
            .collect();
        match PolicySet::from_texts(&sources) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    };
    let read = stmt(StatementKind::Select, "SELECT", &[], &[]);
    let id = ci_identity();
    #[rustfmt::skip]
    let cases: &[(&[&str], &str, Action)] = &[
        (&[], "x", Action::Allow), // built-in
        (&["[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\nkinds = [\"drop\"]"], "x", Action::Allow),
        (&["[defaults]\naction = \"allow\"", "[defaults.targets]\n\"prod*\" = \"deny\""], "prod1", Action::Deny),
        (&["[defaults]\naction = \"allow\"", "[defaults.targets]\n\"prod*\" = \"deny\""], "dev", Action::Allow),
        (&["[defaults]\naction = \"audit\"", "[defaults]\naction = \"allow\""], "dev", Action::Audit),
        (&["[defaults]\naction = \"allow\"", "[defaults]\naction = \"review\""], "dev", Action::Review),
    ];
    for (texts, target, want) in cases {
        let s = files(texts);
        assert_eq!(
            decide_parsed(&s, target, &id, &read).action,
            *want,
            "{texts:?} on {target}"
        );
    }
    let s = files(&[
        "[defaults]\naction = \"allow\"",
        "[defaults.targets]\n\"prod*\" = \"deny\"",
    ]);
    assert_eq!(
        s.default_for("prod1", false).source,
        "f1.toml [defaults.targets] \"prod*\""
    );
    assert_eq!(
        s.default_for("dev", false).source,
        "f0.toml [defaults] action"
    );
}

// ---- allow-lists -----------------------------------------------------------------

/// Whether the rule `one_rule(conditions)` (a deny rule) applies to every
/// statement of `sql`, as the analyser sees it.
fn applies_to_sql(set: &PolicySet, sql: &str) -> bool {
    let analysis = crate::sql::analyze(sql);
    let decisions = set.decide_analysis("t", &ci_identity(), sql, &analysis);
    assert!(!decisions.is_empty(), "{sql}: no statement");
    decisions.iter().all(|d| !d.matched.is_empty())
}

#[test]
fn allow_lists_match_a_statement_with_something_outside_them() {
    #[rustfmt::skip]
    let cases: &[(&str, &str, bool)] = &[
        // (conditions, sql, matches)
        ("functions_outside = [\"lower\", \"count\"]", "SELECT lower(name), count(*) FROM t", false),
        ("functions_outside = [\"lower\", \"count\"]", "SELECT lower(name), upper(name) FROM t", true),
        ("functions_outside = \"lower\"", "SELECT upper(name) FROM t", true),
        ("functions_outside = [\"lower\"]", "SELECT 1", false), // calls nothing
        ("functions_outside = [\"LOWER\"]", "SELECT Lower(name) FROM t", false),
        ("functions_outside = [\"lower\"]", "SELECT pg_catalog.lower(name) FROM t", false),
        ("functions_outside = [\"lower\"]", "SELECT evil.lower(name) FROM t", true), // not the built-in
        ("functions_outside = [\"evil.lower\"]", "SELECT evil.lower(name) FROM t", false),
        ("functions_outside = [\"substring\", \"btrim\"]", "SELECT substring(a from 1 for 2), trim(a) FROM t", false),
        ("functions_outside = [\"pg_*\"]", "SELECT pg_read_file('x')", false),
        ("functions_outside = [\"count\", \"sum\"]", "SELECT count(*) FROM dblink('x', 'y') AS r(a int)", true),
        ("functions_outside = [\"count\"]", "SELECT query_to_xml('select * from secrets', true, true, '')", true),
        ("kinds_outside = [\"select\"]", "SELECT 1", false),
        ("kinds_outside = [\"select\"]", "DROP TABLE t", true),
        ("kinds_outside = \"select\"", "INSERT INTO t VALUES (1)", true),
        ("kinds_outside = [\"select\", \"transaction\"]", "BEGIN", false),
        ("kinds_outside = [\"select\", \"transaction\"]", "DO $$ BEGIN END $$", true),
        ("tables_outside = [\"orders\"]", "SELECT * FROM orders", false),
        ("tables_outside = [\"ORDERS\"]", "SELECT * FROM Orders", false),
        ("tables_outside = [\"orders\"]", "SELECT 1", false), // names no table
        // A bare name admits the table written without a schema only.
        ("tables_outside = [\"orders\"]", "SELECT * FROM public.orders", true),
        ("tables_outside = [\"orders\"]", "SELECT * FROM audit.orders", true),
        ("tables_outside = [\"orders\", \"public.orders\"]", "SELECT * FROM public.orders", false),
        ("tables_outside = [\"public.*\"]", "SELECT * FROM public.orders", false),
        ("tables_outside = [\"public.*\"]", "SELECT * FROM orders", true), // no schema written
        ("tables_outside = [\"pg_class\"]", "SELECT * FROM pg_catalog.pg_class", false),
        ("tables_outside = [\"orders\"]", "SELECT * FROM orders JOIN secrets USING (id)", true),
        ("tables_outside = [\"orders\"]", "INSERT INTO secrets SELECT * FROM orders", true),
        ("tables_outside = [\"ord*\"]", "SELECT * FROM orders, order_items", false),
        ("tables_read_outside = [\"orders\"]", "INSERT INTO secrets SELECT * FROM orders", false),
        ("tables_read_outside = [\"orders\"]", "SELECT * FROM secrets", true),
        ("tables_written_outside = [\"orders\"]", "INSERT INTO secrets SELECT * FROM orders", true),
        ("tables_written_outside = [\"secrets\"]", "INSERT INTO secrets SELECT * FROM orders", false),
        ("tables_written_outside = [\"orders\"]", "WITH d AS (DELETE FROM secrets RETURNING *) SELECT * FROM d", true),
        // AND with each other and with the other conditions
        ("kinds_outside = [\"select\"]\nfunctions_outside = [\"lower\"]", "SELECT upper(x) FROM t", false),
        ("kinds = [\"select\"]\nfunctions_outside = [\"lower\"]", "SELECT upper(x) FROM t", true),
        ("kinds = [\"delete\"]\nfunctions_outside = [\"lower\"]", "SELECT upper(x) FROM t", false),
        ("tables_outside = [\"orders\"]\nfunctions_outside = [\"lower\"]", "SELECT upper(x) FROM secrets", true),
        ("tables_outside = [\"orders\"]\nfunctions_outside = [\"lower\"]", "SELECT upper(x) FROM orders", false),
        ("targets = [\"prod\"]\nfunctions_outside = [\"lower\"]", "SELECT upper(x) FROM t", false),
    ];
    for (conditions, sql, want) in cases {
        let set = set(&one_rule(conditions));
        assert_eq!(
            applies_to_sql(&set, sql),
            *want,
            "{conditions:?} on {sql:?}"
        );
    }
}

#[test]
fn an_allow_list_in_except_excuses_what_falls_outside() {
    let set = set(
        "[[rule]]\nname = \"r\"\naction = \"deny\"\n[rule.match]\nkinds = [\"select\"]\n[rule.except]\nfunctions_outside = [\"lower\"]\n",
    );
    assert!(applies_to_sql(&set, "SELECT lower(a) FROM t"));
    assert!(applies_to_sql(&set, "SELECT a FROM t"));
    assert!(!applies_to_sql(&set, "SELECT upper(a) FROM t"));
}

#[test]
fn unparsable_text_is_outside_every_allow_list_of_a_deny_rule_only() {
    let rule = |action: &str, table: &str, conditions: &str| {
        let approvers = if action == "review" {
            "approvers = [\"group:dba\"]\n"
        } else {
            ""
        };
        format!(
            "[[rule]]\nname = \"r\"\naction = \"{action}\"\n{approvers}[{table}]\n{conditions}\n"
        )
    };
    #[rustfmt::skip]
    let cases: &[(String, bool)] = &[
        // A deny rule refuses what may call anything.
        (rule("deny", "rule.match", "functions_outside = [\"lower\"]"), true),
        (rule("deny", "rule.match", "kinds_outside = [\"select\"]"), true),
        (rule("deny", "rule.match", "tables_outside = [\"orders\"]"), true),
        (rule("deny", "rule.match", "tables_read_outside = [\"orders\"]"), true),
        (rule("deny", "rule.match", "tables_written_outside = [\"orders\"]"), true),
        (rule("deny", "rule.match", "targets = [\"prod\"]\ntables_outside = [\"orders\"]"), true),
        (rule("deny", "rule.match", "targets = [\"dev\"]\ntables_outside = [\"orders\"]"), false),
        // Other conditions on the analysis still never match it.
        (rule("deny", "rule.match", "kinds = [\"select\"]\nfunctions_outside = [\"lower\"]"), false),
        // A looser rule would replace the unparsable default: it does not apply.
        (rule("allow", "rule.match", "kinds_outside = [\"drop\"]"), false),
        (rule("audit", "rule.match", "functions_outside = [\"lower\"]"), false),
        (rule("review", "rule.match", "functions_outside = [\"lower\"]"), false),
        // An except never excuses it.
        (rule("deny", "rule.match", "flags = [\"unparsable\"]\n[rule.except]\nfunctions_outside = [\"lower\"]"), true),
        (rule("deny", "rule.except", "tables_outside = [\"orders\"]"), true),
    ];
    for (text, want) in cases {
        let d = decide_unparsable(&set(text), "prod", "SELECT * FROMM t");
        assert_eq!(!d.matched.is_empty(), *want, "{text}");
        assert_eq!(d.action, Action::Deny, "{text}");
    }
}

#[test]
fn explain_names_what_fell_outside_an_allow_list() {
    let set = set(concat!(
        "[[rule]]\nname = \"only-listed-functions\"\naction = \"deny\"\n",
        "message = \"call only listed functions\"\n",
        "[rule.match]\nfunctions_outside = [\"lower\", \"count\"]\n",
        "[[rule]]\nname = \"only-reads\"\naction = \"deny\"\n",
        "[rule.match]\nkinds_outside = \"select\"\ntables_outside = [\"orders\"]\n",
    ));
    let id = ProcessIdentity::default();
    let e = explain(
        &set,
        "t",
        &id,
        "SELECT lower(a), dblink('x', 'y'), pg_catalog.query_to_xml('q', true, true, '') FROM orders",
        crate::sql::Dialect::Postgres,
    );
    assert_eq!(e.verdict, Action::Deny);
    let text = e.to_string();
    for want in [
        "deny    only-listed-functions  p.toml  \"call only listed functions\"",
        "functions_outside: dblink, pg_catalog.query_to_xml are not in the list",
        "client sees: tollgate: SELECT denied by rule \"only-listed-functions\": call only listed functions",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    assert!(!text.contains("only-reads"), "{text}");
    assert_eq!(
        e.statements[0].outside,
        [OutsideNote {
            rule: "only-listed-functions".to_owned(),
            condition: "functions_outside",
            outside: Some(vec![
                "dblink".to_owned(),
                "pg_catalog.query_to_xml".to_owned()
            ]),
        }]
    );

    let text = explain(
        &set,
        "t",
        &id,
        "DELETE FROM secrets WHERE id = 1",
        crate::sql::Dialect::Postgres,
    )
    .to_string();
    for want in [
        "kinds_outside: delete is not in the list",
        "tables_outside: secrets is not in the list",
        "decision:       deny by rule \"only-reads\"",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }

    let text = explain(
        &set,
        "t",
        &id,
        "SELEC lower(a)",
        crate::sql::Dialect::Postgres,
    )
    .to_string();
    for want in [
        "functions_outside: unknown, the text does not parse (counted as outside)",
        "kinds_outside: unknown, the text does not parse (counted as outside)",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}

// ---- unparsable -----------------------------------------------------------------

#[test]
fn unparsable_statements_match_only_non_statement_conditions() {
    #[rustfmt::skip]
    let cases: &[(&str, bool)] = &[
        ("", true),
        ("targets = [\"prod\"]", true),
        ("users = [\"runner\"]\nci_provider = [\"github_actions\"]", true),
        ("flags = [\"unparsable\"]", true),
        ("flags = [\"no_where\", \"unparsable\"]", true),
        ("flags = [\"no_where\"]", false),
        ("text_regex = \"FROMM\"", true),
        ("kinds = [\"select\", \"other\"]", false),
        ("commands = [\"*\"]", false),
        ("tables = [\"*\"]", false),
        ("tables_read = [\"*\"]", false),
        ("tables_written = [\"*\"]", false),
        ("functions = [\"*\"]", false),
        ("targets = [\"prod\"]\ntables = [\"*\"]", false),
    ];
    for (conditions, want) in cases {
        let set = set(&one_rule(conditions));
        let d = decide_unparsable(&set, "prod", "SELECT * FROMM t");
        assert_eq!(!d.matched.is_empty(), *want, "{conditions:?}");
    }
}

#[test]
fn unparsable_defaults() {
    let id_deny = decide_unparsable(&PolicySet::empty(), "t", "x y z");
    assert_eq!(id_deny.action, Action::Deny, "built-in");
    assert!(id_deny.default_used);
    assert!(
        id_deny.reason.contains("could not be parsed"),
        "{}",
        id_deny.reason
    );
    #[rustfmt::skip]
    let cases: &[(&str, &str, Action)] = &[
        ("[defaults]\nunparsable = \"audit\"", "dev", Action::Audit),
        ("[defaults]\nunparsable = \"deny\"\naction = \"allow\"", "dev", Action::Deny),
        // never looser than the target's own default
        ("[defaults]\nunparsable = \"audit\"\n[defaults.targets]\n\"prod*\" = \"deny\"", "prod1", Action::Deny),
        ("[defaults]\nunparsable = \"allow\"\naction = \"review\"", "dev", Action::Review),
        // a rule decides before any default
        ("[defaults]\nunparsable = \"deny\"\n[[rule]]\nname = \"ok\"\naction = \"audit\"\n[rule.match]\nflags = [\"unparsable\"]", "dev", Action::Audit),
    ];
    for (text, target, want) in cases {
        let d = decide_unparsable(&set(text), target, "x y z");
        assert_eq!(d.action, *want, "{text}");
    }
    // Parsed statements are unaffected by `unparsable`.
    let s = set("[defaults]\nunparsable = \"deny\"");
    let read = stmt(StatementKind::Select, "SELECT", &[], &[]);
    assert_eq!(
        decide_parsed(&s, "t", &ci_identity(), &read).action,
        Action::Allow
    );
}

// ---- messages -----------------------------------------------------------------

#[test]
fn client_messages() {
    let rule = |action, message: Option<&str>| MatchedRule {
        name: "no-ddl-in-ci".into(),
        action,
        message: message.map(Arc::from),
        file: "p.toml".into(),
        mask: None,
        review: None,
        on_match: None,
    };
    let decision = |action, matched: Vec<MatchedRule>| Decision {
        action,
        default_used: matched.is_empty(),
        reason: if matched.is_empty() {
            "no rule matched, and the default for target \"t\" is deny".into()
        } else {
            "r".into()
        },
        matched,
    };
    #[rustfmt::skip]
    let cases = [
        (decision(Action::Deny, vec![rule(Action::Deny, Some("schema changes go through the migration pipeline"))]), "DROP TABLE",
         "tollgate: DROP TABLE denied by rule \"no-ddl-in-ci\": schema changes go through the migration pipeline"),
        (decision(Action::Deny, vec![rule(Action::Deny, None)]), "DROP TABLE",
         "tollgate: DROP TABLE denied by rule \"no-ddl-in-ci\""),
        (decision(Action::Deny, vec![]), "DROP TABLE",
         "tollgate: DROP TABLE denied by the default policy (no rule matched, and the default for target \"t\" is deny)"),
        (decision(Action::Review, vec![rule(Action::Review, None)]), "SELECT",
         "tollgate: SELECT requires review by rule \"no-ddl-in-ci\", and it cannot be held for review here (no approvers are named for it, or it runs through EXECUTE of a prepared statement, a FunctionCall, or a prepared statement decided again after a policy change); refused"),
        (decision(Action::Mask, vec![rule(Action::Mask, Some("pii"))]), "SELECT",
         "tollgate: SELECT requires masking by rule \"no-ddl-in-ci\" (pii), and masking applies only to queries that write nothing; refused"),
        (decision(Action::Audit, vec![rule(Action::Audit, None)]), "INSERT",
         "tollgate: INSERT allowed and audited by rule \"no-ddl-in-ci\""),
    ];
    for (d, command, want) in cases {
        assert_eq!(d.client_message(command), want);
    }
}

#[test]
fn reasons_name_the_deciding_rule_and_the_others() {
    let set = set(CONFLICT);
    let d = decide_parsed(&set, "t", &ci_identity(), &delete_all());
    assert_eq!(
        &*d.reason,
        "rule \"deny-unbounded\" (deny); also matched: \"allow-all\" (allow), \"audit-writes\" (audit), \"review-deletes\" (review)"
    );
    assert_eq!(d.matched[3].message.as_deref(), Some("add a WHERE clause"));
    assert_eq!(&*d.matched[3].file, "p.toml");
}

#[test]
fn a_mask_rule_applies_only_where_its_columns_can_be_read() {
    let set = set(r#"
[[rule]]
name = "mask-email"
action = "mask"
mask_columns = ["crm.customers.email"]
mask_with = "null"
"#);
    let id = ci_identity();
    let cases = [
        (
            stmt(StatementKind::Select, "SELECT", &["customers"], &[]),
            Action::Mask,
        ),
        (
            stmt(StatementKind::Select, "SELECT", &["orders"], &[]),
            Action::Allow,
        ),
        (
            stmt(StatementKind::Update, "UPDATE", &[], &["customers"]),
            Action::Allow,
        ),
        (
            stmt(StatementKind::Drop, "DROP TABLE", &[], &[]),
            Action::Allow,
        ),
    ];
    for (s, want) in &cases {
        let d = decide_parsed(&set, "t", &id, s);
        assert_eq!(d.action, *want, "{s:?}");
        assert_eq!(d.mask_rules().count(), usize::from(*want == Action::Mask));
    }
    let d = decide_parsed(&set, "t", &id, &cases[0].0);
    let rule = d.mask_rules().next().unwrap();
    assert_eq!(rule.columns[0].to_string(), "crm.customers.email");
    assert_eq!(rule.with, crate::masking::MaskMethod::Null);
    assert!(!Action::Mask.is_refused(), "a mask decision runs, masked");
    assert!(
        set.masks_target("any"),
        "a rule without targets masks everywhere"
    );
    let scoped = super::tests::set(
        "[[rule]]\nname = \"m\"\naction = \"mask\"\nmask_columns = \"email\"\n[rule.match]\ntargets = [\"prod-*\"]\n",
    );
    assert!(scoped.masks_target("prod-orders"));
    assert!(!scoped.masks_target("staging"));
    assert!(!PolicySet::empty().masks_target("prod-orders"));
}

// ---- errors -------------------------------------------------------------------

#[test]
fn errors_point_at_file_line_column() {
    #[rustfmt::skip]
    let cases: &[(&str, &str)] = &[
        ("[[rule]]\nname = \"a\"\naction = \"block\"\n", "p.toml:3:10: invalid action \"block\""),
        ("[defaults]\naction = \"nope\"\n", "p.toml:2:10: invalid default action \"nope\""),
        ("[defaults]\nunparsable = \"nope\"\n", "p.toml:2:14: invalid unparsable default \"nope\""),
        ("[defaults.targets]\n\"prod*\" = \"nope\"\n", "p.toml:2:11: invalid target default \"nope\""),
        ("[defaults.targets]\n\"prod[\" = \"deny\"\n", "p.toml:2:1: bad target glob"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\nkinds = [\"select\", \"dropp\"]\n", "p.toml:5:20: unknown statement kind \"dropp\""),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\nflags = [\"nowhere\"]\n", "p.toml:5:10: unknown flag \"nowhere\""),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\ntables = [\"ok\", \"[bad\"]\n", "p.toml:5:17: bad glob in `tables`"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\ntext_regex = \"(unclosed\"\n", "p.toml:5:14: bad regex in `text_regex`"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\ntargetz = [\"x\"]\n", "p.toml:5:1: unknown field `targetz`"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\ncolour = \"red\"\n", "p.toml:4:1: unknown field `colour`"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[[rule]]\nname = \"a\"\naction = \"allow\"\n", "p.toml:5:8: duplicate rule name \"a\" (first defined at p.toml:2:8)"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\ntargets = []\n", "p.toml:5:11: `targets` is an empty list"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\nuids = [-1]\n", "p.toml:5:9: uid -1 is out of range"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\nexe_sha256 = \"abc\"\n", "p.toml:5:14: exe_sha256 \"abc\" is not a SHA-256"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\nci_provider = [\"circleci\"]\n", "p.toml:5:16: unknown ci_provider \"circleci\""),
        ("[[rule]]\nname = \"has space\"\naction = \"deny\"\n", "p.toml:2:8: invalid rule name \"has space\""),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.except]\n", "p.toml:4:1: an empty `[rule.except]`"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\nci_verified = \"yes\"\n", "p.toml:5:15: invalid type: string \"yes\", expected a boolean"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\ntargets = {}\n", "p.toml:5:11: invalid type: map, expected a value or a list of values"),
        ("[[rule]]\naction = \"deny\"\n", "p.toml:1:1: missing field `name`"),
        ("[[rule]]\nname = \"a\"\naction = \"mask\"\n", "p.toml:3:10: a mask rule needs `mask_columns`"),
        ("[[rule]]\nname = \"a\"\naction = \"mask\"\nmask_columns = []\n", "p.toml:4:16: empty `mask_columns`"),
        ("[[rule]]\nname = \"a\"\naction = \"mask\"\nmask_columns = [\"ok\", \"a.b.c.d\"]\n", "p.toml:4:23: invalid column \"a.b.c.d\": at most three parts"),
        ("[[rule]]\nname = \"a\"\naction = \"mask\"\nmask_columns = \"e'mail\"\n", "p.toml:4:16: invalid column \"e'mail\""),
        ("[[rule]]\nname = \"a\"\naction = \"mask\"\nmask_columns = \"email\"\nmask_with = \"blur\"\n", "p.toml:5:13: invalid mask_with \"blur\"; expected redact or null"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\nmask_columns = [\"email\"]\n", "p.toml:4:16: `mask_columns` belongs only to rules with action = \"mask\""),
        ("[[rule]]\nname = \"a\"\naction = \"audit\"\nmask_with = \"null\"\n", "p.toml:4:13: `mask_with` belongs only to rules with action = \"mask\""),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\nfunctions_outside = []\n", "p.toml:5:21: `functions_outside` of rule \"a\" is an empty list, which would count every function call as outside it; list what is allowed, or use `functions = [\"*\"]` to match any function call"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.except]\ntables_read_outside = []\n", "p.toml:5:23: `tables_read_outside` of rule \"a\" is an empty list"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\nkinds_outside = []\n", "p.toml:5:17: `kinds_outside` of rule \"a\" is an empty list, which would count every statement as outside it"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\nkinds_outside = [\"select\", \"selct\"]\n", "p.toml:5:28: unknown statement kind \"selct\" in `kinds_outside` of rule \"a\"; expected one of select, insert,"),
        (&format!("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\nkinds_outside = {:?}\n", matcher::KIND_NAMES), "p.toml:5:17: `kinds_outside` of rule \"a\" lists every statement kind, so it never matches"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\ntables_outside = [\"ok\", \"[bad\"]\n", "p.toml:5:25: bad glob in `tables_outside`: \"[bad\": unclosed character class; missing ']' (rule \"a\")"),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.match]\ntables_written_outside = 3\n", "p.toml:5:26: invalid type: integer `3`, expected a string"),
        ("[[rule]\n", "p.toml:1:7:"),
    ];
    for (text, want) in cases {
        let err = match PolicySet::from_str(Path::new("p.toml"), text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.starts_with(want),
            "for\n{text}\nwant prefix: {want}\ngot:         {err}"
        );
    }
}

#[test]
fn every_error_of_a_file_is_reported() {
    let text = "[[rule]]\nname = \"a\"\naction = \"block\"\n[rule.match]\nkinds = [\"x\"]\nflags = [\"y\"]\n";
    let err = match PolicySet::from_str(Path::new("p.toml"), text) {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };
    assert_eq!(err.0.len(), 3, "{err}");
    assert_eq!(err.to_string().lines().count(), 3);
}

#[test]
fn a_bad_condition_in_except_is_not_also_called_an_empty_except() {
    for conditions in [
        "tables_outside = [\"[x\"]",
        "tables = [\"[x\"]",
        "kinds_outside = []",
    ] {
        let text =
            format!("[[rule]]\nname = \"a\"\naction = \"deny\"\n[rule.except]\n{conditions}\n");
        let err = match PolicySet::from_str(Path::new("p.toml"), &text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e,
        };
        assert_eq!(err.0.len(), 1, "{err}");
    }
}

#[test]
fn duplicate_rule_names_across_files() {
    let a = "[[rule]]\nname = \"same\"\naction = \"deny\"\n".to_owned();
    let b = "# b\n[[rule]]\nname = \"other\"\naction = \"deny\"\n[[rule]]\nname = \"same\"\naction = \"allow\"\n".to_owned();
    let err = match PolicySet::from_texts(&[("a.toml".into(), a), ("b.toml".into(), b)]) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    assert_eq!(
        err,
        "b.toml:6:8: duplicate rule name \"same\" (first defined at a.toml:2:8); rule names must be unique across all loaded policy files"
    );
}

#[test]
fn one_or_many_values() {
    let a = set(&one_rule("targets = \"prod\"\nkinds = \"drop\"\nuids = 0"));
    let b = set(&one_rule(
        "targets = [\"prod\"]\nkinds = [\"drop\"]\nuids = [0]",
    ));
    let drop = stmt(StatementKind::Drop, "DROP TABLE", &[], &["t"]);
    let root = ProcessIdentity {
        uid: Some(0),
        ..ProcessIdentity::default()
    };
    for s in [&a, &b] {
        assert_eq!(decide_parsed(s, "prod", &root, &drop).action, Action::Deny);
        assert_eq!(decide_parsed(s, "dev", &root, &drop).action, Action::Allow);
    }
}

// ---- loading ------------------------------------------------------------------

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn load_directories_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "b.toml", "[[rule]]\nname = \"b\"\naction = \"deny\"\n");
    write(d, "a.toml", "[[rule]]\nname = \"a\"\naction = \"audit\"\n");
    write(d, "a.tests.toml", "[[case]]\n");
    write(d, "notes.txt", "not toml");
    write(
        d,
        "sub/c.toml",
        "[[rule]]\nname = \"c\"\naction = \"deny\"\n",
    );
    let set = PolicySet::load(&[d.to_path_buf()]).unwrap();
    let names: Vec<&str> = set.rule_names().collect();
    assert_eq!(
        names,
        ["a", "b"],
        "name order, not recursive, tests skipped"
    );
    assert_eq!(set.files().count(), 2);

    // A file named twice (directly and through its directory) loads once.
    let again = PolicySet::load(&[d.join("a.toml"), d.to_path_buf()]).unwrap();
    assert_eq!(again.rule_count(), 2);

    // Mixed: a directory and a file elsewhere.
    let set = PolicySet::load(&[d.join("sub"), d.join("a.toml")]).unwrap();
    assert_eq!(set.rule_names().collect::<Vec<_>>(), ["c", "a"]);

    #[rustfmt::skip]
    let failures: Vec<(Vec<PathBuf>, &str)> = vec![
        (vec![d.join("missing.toml")], "cannot read"),
        (vec![d.join("a.tests.toml")], "this is a policy test file"),
        (vec![], "no policy files or directories given"),
    ];
    for (paths, want) in failures {
        let err = PolicySet::load(&paths).unwrap_err().to_string();
        assert!(err.contains(want), "{paths:?}: {err}");
    }
    let empty = tempfile::tempdir().unwrap();
    let err = PolicySet::load(&[empty.path().to_path_buf()]).unwrap_err();
    assert!(
        err.to_string().contains("no policy files (*.toml)"),
        "{err}"
    );

    // Errors of several files come together.
    write(d, "z.toml", "[[rule]]\nname = \"z\"\naction = \"nope\"\n");
    write(d, "y.toml", "[[rule]]\nname = \"a\"\naction = \"deny\"\n");
    let err = PolicySet::load(&[d.to_path_buf()]).unwrap_err();
    assert_eq!(err.0.len(), 2, "{err}");
}

#[test]
fn digest_follows_content_and_order() {
    let a = (
        "a.toml".into(),
        "[[rule]]\nname = \"a\"\naction = \"deny\"\n".to_owned(),
    );
    let b = (
        "b.toml".into(),
        "[[rule]]\nname = \"b\"\naction = \"deny\"\n".to_owned(),
    );
    let ab = PolicySet::from_texts(&[a.clone(), b.clone()]).unwrap();
    let ab2 = PolicySet::from_texts(&[
        ("elsewhere/a.toml".into(), a.1.clone()),
        ("x.toml".into(), b.1.clone()),
    ])
    .unwrap();
    let ba = PolicySet::from_texts(&[b, a.clone()]).unwrap();
    let only_a = PolicySet::from_texts(&[a]).unwrap();
    assert_eq!(ab.digest(), ab2.digest(), "paths do not matter");
    assert_ne!(ab.digest(), ba.digest());
    assert_ne!(ab.digest(), only_a.digest());
    assert_eq!(ab.digest().len(), 64);
    assert_eq!(PolicySet::empty().digest().len(), 64);
}

// ---- a hundred rules ----------------------------------------------------------

#[test]
fn a_hundred_rules_decide_correctly() {
    let mut text = String::new();
    for i in 0..100 {
        text.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\naction = \"deny\"\n[rule.match]\ntargets = [\"t{i}-*\"]\nkinds = [\"drop\", \"truncate\"]\ntables = [\"table{i}*\"]\nci_repository = [\"acme/*\"]\n\n"
        ));
    }
    let set = set(&text);
    let drop = stmt(StatementKind::Drop, "DROP TABLE", &[], &["table99x"]);
    let id = ci_identity();
    let d = decide_parsed(&set, "t99-prod", &id, &drop);
    assert_eq!(d.action, Action::Deny);
    assert_eq!(d.matched.len(), 1);
    assert_eq!(&*d.matched[0].name, "r99");
    let d = decide_parsed(&set, "t98-prod", &id, &drop);
    assert!(d.default_used);
}

// ---- tests files, explain, check ------------------------------------------------

const TINY: &str = r#"
[defaults]
unparsable = "deny"

[[rule]]
name = "no-drop"
action = "deny"
message = "no"
[rule.match]
kinds = ["drop"]

[[rule]]
name = "ci-audit"
action = "audit"
[rule.match]
ci_provider = ["github_actions"]
ci_verified = true
"#;

#[test]
fn tests_files_parse_and_validate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "tiny.toml", TINY);
    #[rustfmt::skip]
    let cases: &[(&str, &str)] = &[
        ("[[case]]\nname = \"x\"\ntarget = \"t\"\nsql = \"SELECT 1\"\nexpect = \"nope\"\n", "tiny.tests.toml:5:10: invalid expected action \"nope\""),
        ("[[case]]\nname = \"x\"\ntarget = \"t\"\nsql = \"SELECT 1\"\nexpect = \"deny\"\nextra = 1\n", "tiny.tests.toml:6:1: unknown field `extra`"),
        ("[[case]]\nname = \"x\"\ntarget = \"t\"\nsql = \"SELECT 1\"\nexpect = \"deny\"\nidentity = { ci_repository = \"a/b\" }\n", "tiny.tests.toml:6:12: an identity with ci_repository"),
        ("[[case]]\nname = \"x\"\ntarget = \"t\"\nsql = \"SELECT 1\"\nexpect = \"deny\"\nidentity = { ci_provider = \"travis\" }\n", "tiny.tests.toml:6:28: unknown ci_provider \"travis\""),
        ("[[case]]\nname = \"x\"\ntarget = \"t\"\nsql = \"SELECT 1\"\nexpect = \"deny\"\n[[case]]\nname = \"x\"\ntarget = \"t\"\nsql = \"SELECT 1\"\nexpect = \"deny\"\n", "tiny.tests.toml:7:8: duplicate case name \"x\""),
        ("", "tiny.tests.toml:1:1: no test cases"),
        ("policies = [\"missing.toml\"]\n[[case]]\nname = \"x\"\ntarget = \"t\"\nsql = \"SELECT 1\"\nexpect = \"deny\"\n", "missing.toml: cannot read"),
        ("[[case]]\nname = \"x\"\ntarget = \"t\"\nsql = \"SELECT 1\"\nexpect = \"deny\"\nexpect_rules = [\"no-dorp\"]\n", "tiny.tests.toml:6:17: expect_rules names \"no-dorp\""),
    ];
    for (text, want) in cases {
        let t = write(d, "tiny.tests.toml", text);
        let err = check(std::slice::from_ref(&t)).unwrap_err().to_string();
        let err = err.replace(&format!("{}/", d.display()), "");
        assert!(
            err.starts_with(want),
            "for\n{text}\nwant prefix: {want}\ngot:         {err}"
        );
    }
    // A tests file without its policy.
    let lonely = write(
        d,
        "lonely.tests.toml",
        "[[case]]\nname = \"x\"\ntarget = \"t\"\nsql = \"SELECT 1\"\nexpect = \"deny\"\n",
    );
    let err = check(&[lonely]).unwrap_err().to_string();
    assert!(err.contains("no policy file"), "{err}");
}

#[test]
fn check_summarises_a_valid_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "tiny.toml", TINY);
    write(
        d,
        "tiny.tests.toml",
        "[[case]]\nname = \"x\"\ntarget = \"t\"\nsql = \"SELECT 1\"\nexpect = \"allow\"\nexpect_rules = []\n",
    );
    let s = check(&[d.to_path_buf()]).unwrap();
    assert_eq!(s.policy_files.len(), 1);
    assert_eq!(s.rules, 2);
    assert_eq!(s.test_files.len(), 1);
    assert_eq!(s.cases, 1);
    assert!(
        s.to_string()
            .starts_with("ok: 1 policy file, 2 rules; 1 test file with 1 case"),
        "{s}"
    );
    // check reports the policy's own errors with positions.
    write(
        d,
        "bad.toml",
        "[[rule]]\nname = \"no-drop\"\naction = \"deny\"\n",
    );
    let err = check(&[d.to_path_buf()]).unwrap_err().to_string();
    assert!(err.contains("duplicate rule name \"no-drop\""), "{err}");
}

fn analysis_of(statements: Vec<StatementSummary>) -> Analysis {
    Analysis::Parsed { statements }
}

#[test]
fn decide_analysis_sets_multi_statement_and_takes_the_worst() {
    let set = set("[[rule]]\nname = \"multi\"\naction = \"audit\"\n[rule.match]\nflags = [\"multi_statement\"]\n[[rule]]\nname = \"no-drop\"\naction = \"deny\"\n[rule.match]\nkinds = [\"drop\"]\n");
    let id = ci_identity();
    let one = analysis_of(vec![stmt(StatementKind::Select, "SELECT", &[], &[])]);
    let ds = set.decide_analysis("t", &id, "SELECT 1", &one);
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0].action, Action::Allow);
    let two = analysis_of(vec![
        stmt(StatementKind::Select, "SELECT", &[], &[]),
        stmt(StatementKind::Drop, "DROP TABLE", &[], &["x"]),
    ]);
    let ds = set.decide_analysis("t", &id, "SELECT 1; DROP TABLE x", &two);
    assert_eq!(
        ds.iter().map(|d| d.action).collect::<Vec<_>>(),
        [Action::Audit, Action::Deny]
    );
    assert_eq!(most_restrictive(&ds).map(|d| d.action), Some(Action::Deny));
    let bad = Analysis::Unparsable {
        error: "syntax error".to_owned(),
    };
    let ds = set.decide_analysis("t", &id, "SELEC", &bad);
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0].action, Action::Deny);
    assert!(set
        .decide_analysis("t", &id, "", &analysis_of(vec![]))
        .is_empty());
    assert!(most_restrictive(&[]).is_none());
}

#[test]
fn explanation_shows_analysis_rules_and_verdict() {
    let set = set(CONFLICT);
    let mut drop = stmt(
        StatementKind::Delete,
        "DELETE",
        &["public.items"],
        &["public.orders"],
    );
    drop.flags.no_where = true;
    drop.functions = vec!["now".to_owned()];
    drop.text = "DELETE FROM public.orders".to_owned();
    let analysis = analysis_of(vec![
        stmt(StatementKind::Select, "SELECT", &["orders"], &[]),
        drop,
    ]);
    let e = explain_analysis(
        &set,
        "prod-orders",
        &ci_identity(),
        "SELECT ...; DELETE ...",
        &analysis,
        crate::sql::Dialect::Postgres,
    );
    assert_eq!(e.verdict, Action::Deny);
    let text = e.to_string();
    for want in [
        "target:    prod-orders (postgres)",
        "identity:  pid=4242 exe=/usr/bin/psql uid=1001(runner) ci=github_actions:acme/shop",
        "statement 2 of 2: DELETE FROM public.orders",
        "kind:           delete (DELETE)",
        "tables read:    public.items",
        "tables written: public.orders",
        "functions:      now",
        "flags:          no_where, multi_statement",
        "fingerprint:    0123456789abcdef",
        "deny    deny-unbounded  p.toml  \"add a WHERE clause\"",
        "decision:       deny by rule \"deny-unbounded\"",
        "verdict:   deny (refused; no statement of the message runs)",
        "client sees: tollgate: DELETE denied by rule \"deny-unbounded\": add a WHERE clause",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let e = explain_analysis(
        &set_with_default(),
        "prod-x",
        &ProcessIdentity::default(),
        "SELEC",
        &Analysis::Unparsable {
            error: "syntax error at or near \"SELEC\"".to_owned(),
        },
        crate::sql::Dialect::Postgres,
    );
    let text = e.to_string();
    for want in [
        "unparsable text: SELEC",
        "parse error:    syntax error at or near \"SELEC\"",
        "rules matched:  none",
        "decision:       deny by default (p.toml [defaults] unparsable)",
        "client sees: tollgate: statement denied by the default policy (the statement could not be parsed",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}

fn set_with_default() -> PolicySet {
    set("[defaults]\naction = \"allow\"\nunparsable = \"deny\"\n")
}

#[test]
fn report_display_ends_with_counts() {
    let case = |name: &str, failure: Option<&str>| CaseResult {
        file: PathBuf::from("p.tests.toml"),
        line: 3,
        name: name.to_owned(),
        expected: Action::Deny,
        actual: Action::Deny,
        expected_rules: None,
        actual_rules: vec!["r".to_owned()],
        default_used: false,
        failure: failure.map(str::to_owned),
    };
    let report = TestReport {
        cases: vec![case("a", None), case("b", Some("expected allow, got deny"))],
        untested: vec![PathBuf::from("x.toml")],
    };
    let text = report.to_string();
    assert_eq!(
        text,
        "ok    p.tests.toml:3: a: deny by \"r\"\nFAIL  p.tests.toml:3: b: expected allow, got deny\nnote: x.toml has no tests; add x.tests.toml\n1 passed, 1 failed"
    );
    assert!(!report.success());
}

// ---- with the SQL analyser ----------------------------------------------------------

#[test]
fn run_tests_reports_passes_and_failures() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "tiny.toml", TINY);
    write(
        d,
        "untested.toml",
        "[[rule]]\nname = \"u\"\naction = \"audit\"\n",
    );
    write(
        d,
        "tiny.tests.toml",
        r#"
[[case]]
name = "drop is denied"
target = "t"
sql = "DROP TABLE orders"
expect = "deny"
expect_rules = ["no-drop"]

[[case]]
name = "verified ci is audited"
target = "t"
sql = "SELECT 1"
identity = { ci_provider = "github_actions", ci_verified = true }
expect = "audit"

[[case]]
name = "multi-statement: the worst counts"
target = "t"
sql = "SELECT 1; DROP TABLE orders"
expect = "deny"
expect_rules = ["no-drop"]

[[case]]
name = "garbage is denied by default"
target = "t"
sql = "SELEC * FROMM"
expect = "deny"
expect_rules = []

[[case]]
name = "this one fails"
target = "t"
sql = "SELECT 1"
expect = "deny"
"#,
    );
    let report = run_tests(d).unwrap();
    assert_eq!(report.passed(), 4, "{report}");
    assert_eq!(report.failed(), 1, "{report}");
    let failed = report.cases.iter().find(|c| !c.passed()).unwrap();
    assert_eq!(failed.name, "this one fails");
    assert_eq!(failed.actual, Action::Allow);
    assert!(failed
        .failure
        .as_deref()
        .unwrap_or("")
        .starts_with("expected deny, got allow"));
    assert_eq!(report.untested, [d.join("untested.toml")]);
    assert!(
        report.to_string().ends_with("\n4 passed, 1 failed"),
        "{report}"
    );

    let empty = tempfile::tempdir().unwrap();
    write(empty.path(), "p.toml", TINY);
    let err = run_tests(empty.path()).unwrap_err().to_string();
    assert!(err.contains("no test cases found"), "{err}");
    assert!(run_tests(&d.join("tiny.toml")).is_err());
}

#[test]
fn explain_analyses_sql() {
    let set = set(TINY);
    let e = explain(
        &set,
        "t",
        &ProcessIdentity::default(),
        "DROP TABLE public.orders",
        crate::sql::Dialect::Postgres,
    );
    assert_eq!(e.verdict, Action::Deny);
    assert_eq!(e.statements.len(), 1);
    let text = e.to_string();
    assert!(text.contains("tables written: public.orders"), "{text}");
    assert!(
        text.contains("client sees: tollgate: DROP TABLE denied by rule \"no-drop\": no"),
        "{text}"
    );
}

/// Every shipped policy's tests run in CI.
#[test]
fn shipped_policies_pass_their_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let report = match run_tests(&dir) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    assert!(report.passed() > 0, "{report}");
    assert_eq!(report.failed(), 0, "\n{report}");
    assert!(
        report.untested.is_empty(),
        "every shipped policy has tests:\n{report}"
    );
    // The shipped files also load together, as an agent pointed at the
    // directory would load them.
    if let Err(e) = PolicySet::load(std::slice::from_ref(&dir)) {
        panic!("{e}");
    }
    if let Err(e) = check(&[dir]) {
        panic!("{e}");
    }
}

#[test]
fn identities_parse_like_test_cases() {
    let id = parse_identity(
        "user = \"runner\", uid = 1001, exe = \"/usr/bin/psql\", ci_provider = \"github_actions\", ci_repository = \"acme/shop\", ci_verified = true, ancestry = [{ comm = \"Runner.Worker\" }]",
    )
    .unwrap();
    assert_eq!(id.user.as_deref(), Some("runner"));
    assert_eq!(id.uid, Some(1001));
    assert_eq!(id.ancestry.len(), 1);
    let ci = id.ci.unwrap();
    assert_eq!(ci.provider, CiProvider::GithubActions);
    assert!(ci.verified);
    assert_eq!(parse_identity("").unwrap(), ProcessIdentity::default());
    #[rustfmt::skip]
    let bad = [
        ("usr = \"x\"", "--identity: unknown field `usr`"),
        ("ci_provider = \"travis\"", "--identity: unknown ci_provider \"travis\""),
        ("ci_branch = \"main\"", "--identity: an identity with ci_repository"),
        ("uid = \"x\"", "--identity: invalid type: string \"x\", expected u32"),
    ];
    for (spec, want) in bad {
        let err = parse_identity(spec).unwrap_err().to_string();
        assert!(err.starts_with(want), "{spec}: {err}");
    }
}

#[test]
fn policy_sets_are_shareable_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<PolicySet>();
    send_sync::<Decision>();
}

/// Found by fuzzing (fuzz/regressions/policy/): a control character in a
/// comment is refused by the TOML parser with a place and no words.
#[test]
fn a_toml_error_without_words_is_worded() {
    let text =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(
            "../fuzz/regressions/policy/empty-error-message-control-character-in-comment.toml",
        ))
        .unwrap();
    let errors = PolicySet::from_str(std::path::Path::new("bad.toml"), &text).unwrap_err();
    let shown = errors.0.iter().map(|e| e.to_string()).collect::<Vec<_>>();
    assert!(errors.0.iter().all(|e| !e.message.is_empty()), "{shown:?}");
    assert!(shown[0].contains("invalid TOML here"), "{shown:?}");
}

// ---- review settings ----------------------------------------------------------

fn review_rule(settings: &str) -> String {
    format!("[[rule]]\nname = \"r\"\naction = \"review\"\n{settings}[rule.match]\nkinds = [\"delete\"]\n")
}

#[test]
fn review_settings_compile_with_their_defaults() {
    let decided = |text: &str| {
        let d = decide_parsed(&set(text), "prod", &ci_identity(), &delete_all());
        assert_eq!(d.action, Action::Review);
        match d.deciding_rule().and_then(|r| r.review.clone()) {
            Some(review) => (*review).clone(),
            None => panic!("no review settings in {d:?}"),
        }
    };
    let defaults = decided(&review_rule("approvers = \"group:dba\"\n"));
    assert_eq!(
        defaults,
        ReviewSettings {
            approvers: vec![Approver::UnixGroup("dba".into())],
            approvals: 1,
            timeout: DEFAULT_REVIEW_TIMEOUT,
            grant: GrantScope::Statement,
            grant_hours: None,
        }
    );
    let written = decided(&review_rule(
        "approvers = [\"group:dba\", \"reviewers:oncall\"]\napprovals = 2\ntimeout = \"90s\"\ngrant = \"1h\"\n",
    ));
    assert_eq!(
        written,
        ReviewSettings {
            approvers: vec![
                Approver::UnixGroup("dba".into()),
                Approver::Reviewers("oncall".into())
            ],
            approvals: 2,
            timeout: std::time::Duration::from_secs(90),
            grant: GrantScope::UpTo(std::time::Duration::from_secs(3600)),
            grant_hours: None,
        }
    );
    let statement_only = decided(&review_rule(
        "approvers = \"group:dba\"\ngrant = \"statement\"\n",
    ));
    assert_eq!(statement_only.grant, GrantScope::Statement);
    let office_hours = decided(&review_rule(
        "approvers = \"group:dba\"\ngrant = \"8h\"\ngrant_hours = \"09:30-18:00\"\n",
    ));
    let window = office_hours.grant_hours.expect("grant_hours compiled");
    assert_eq!(window.to_string(), "09:30-18:00");
    assert!(window.contains(9 * 60 + 30) && window.contains(17 * 60 + 59));
    assert!(!window.contains(9 * 60 + 29) && !window.contains(18 * 60));
}

#[test]
fn daily_windows_span_midnight_and_refuse_what_is_not_a_time() {
    let night = DailyWindow::parse("22:00-06:00").unwrap();
    assert!(night.contains(23 * 60) && night.contains(0) && night.contains(5 * 60 + 59));
    assert!(!night.contains(6 * 60) && !night.contains(12 * 60) && !night.contains(21 * 60 + 59));
    let to_midnight = DailyWindow::parse("18:00-24:00").unwrap();
    assert!(to_midnight.contains(23 * 60 + 59) && !to_midnight.contains(0));
    for bad in [
        "9:00-18:00",
        "09:00",
        "09:00-09:00",
        "25:00-26:00",
        "09:60-10:00",
        "24:00-01:00",
        "aa:bb-cc:dd",
        "",
        "09:00-18:00-19:00",
    ] {
        assert!(DailyWindow::parse(bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn review_settings_errors_point_at_the_setting() {
    #[rustfmt::skip]
    let cases: &[(String, &str)] = &[
        (review_rule(""), "p.toml:3:10: a review rule needs `approvers`"),
        (review_rule("approvers = []\n"), "p.toml:4:13: empty `approvers`"),
        (review_rule("approvers = \"dba\"\n"), "p.toml:4:13: invalid approver \"dba\"; write \"group:NAME\""),
        (review_rule("approvers = [\"group:dba\", \"user:bob\"]\n"), "p.toml:4:27: invalid approver \"user:bob\""),
        (review_rule("approvers = [\"group:dba\", \"group:dba\"]\n"), "p.toml:4:27: approver \"group:dba\" is listed twice"),
        (review_rule("approvers = \"group:\"\n"), "p.toml:4:13: invalid approver \"group:\""),
        (review_rule("approvers = \"group:dba\"\napprovals = 0\n"), "p.toml:5:13: approvals must be between 1 and 16"),
        (review_rule("approvers = \"group:dba\"\napprovals = 17\n"), "p.toml:5:13: approvals must be between 1 and 16"),
        (review_rule("approvers = \"group:dba\"\ntimeout = \"1s\"\n"), "p.toml:5:11: invalid timeout \"1s\"; give a duration between 10s and 24h"),
        (review_rule("approvers = \"group:dba\"\ntimeout = \"2d\"\n"), "p.toml:5:11: invalid timeout \"2d\""),
        (review_rule("approvers = \"group:dba\"\ntimeout = \"soon\"\n"), "p.toml:5:11: invalid timeout \"soon\""),
        (review_rule("approvers = \"group:dba\"\ngrant = \"forever\"\n"), "p.toml:5:9: invalid grant \"forever\"; use \"statement\""),
        (review_rule("approvers = \"group:dba\"\ngrant = \"8d\"\n"), "p.toml:5:9: invalid grant \"8d\""),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\napprovers = [\"group:dba\"]\n".into(), "p.toml:4:13: `approvers` belongs only to rules with action = \"review\""),
        ("[[rule]]\nname = \"a\"\naction = \"audit\"\ntimeout = \"1m\"\n".into(), "p.toml:4:11: `timeout` belongs only to rules with action = \"review\""),
        ("[[rule]]\nname = \"a\"\naction = \"allow\"\napprovals = 2\n".into(), "p.toml:4:13: `approvals` belongs only to rules with action = \"review\""),
        ("[[rule]]\nname = \"a\"\naction = \"mask\"\nmask_columns = \"email\"\ngrant = \"1h\"\n".into(), "p.toml:5:9: `grant` belongs only to rules with action = \"review\""),
        ("[[rule]]\nname = \"a\"\naction = \"deny\"\ngrant_hours = \"09:00-17:00\"\n".into(), "p.toml:4:15: `grant_hours` belongs only to rules with action = \"review\""),
        (review_rule("approvers = \"group:dba\"\ngrant_hours = \"09:00-17:00\"\n"), "p.toml:5:15: `grant_hours` limits when grants may be used, and this rule gives none"),
        (review_rule("approvers = \"group:dba\"\ngrant = \"1h\"\ngrant_hours = \"9-17\"\n"), "p.toml:6:15: invalid hours \"9-17\"; give a daily window"),
    ];
    for (text, want) in cases {
        let err = match PolicySet::from_str(Path::new("p.toml"), text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.starts_with(want),
            "for\n{text}\nwant prefix: {want}\ngot:         {err}"
        );
    }
}

#[test]
fn explain_reads_text_in_the_targets_dialect() {
    let set = set(
        "[[rule]]\nname = \"protect\"\naction = \"deny\"\n[rule.match]\ntables = [\"secrets\"]\n",
    );
    let sql = "SELECT * FROM `shop`.`secrets`";
    let e = explain(
        &set,
        "shop",
        &ProcessIdentity::default(),
        sql,
        crate::sql::Dialect::Mysql,
    );
    assert_eq!(e.verdict, Action::Deny);
    assert!(e.to_string().contains("target:    shop (mysql)"), "{e}");
    // Backquoted names are not PostgreSQL.
    let e = explain(
        &set,
        "shop",
        &ProcessIdentity::default(),
        sql,
        crate::sql::Dialect::Postgres,
    );
    assert!(e.statements[0].parse_error.is_some(), "{e}");
}

#[test]
fn on_match_is_compiled_and_the_strongest_one_wins() {
    let set = PolicySet::from_str(
        Path::new("p.toml"),
        r#"
[[rule]]
name = "stop-drops"
action = "deny"
on_match = "stop"
[rule.match]
kinds = ["drop"]

[[rule]]
name = "kill-job-on-secrets"
action = "deny"
on_match = "kill"
on_match_scope = "job"
[rule.match]
tables = ["secrets"]
"#,
    )
    .unwrap();
    let id = ProcessIdentity::default();
    let decide = |sql: &str| {
        set.decide_analysis("t", &id, sql, &crate::sql::analyze(sql))
            .into_iter()
            .next()
            .unwrap()
    };
    let stop = decide("drop table orders");
    assert_eq!(
        stop.process_action(),
        Some((
            ProcessAction {
                kind: ProcessActionKind::Stop,
                scope: ProcessActionScope::Process
            },
            "stop-drops"
        ))
    );
    let both = decide("drop table secrets");
    assert_eq!(
        both.process_action().map(|(a, r)| (a.kind, a.scope, r)),
        Some((
            ProcessActionKind::Kill,
            ProcessActionScope::Job,
            "kill-job-on-secrets"
        ))
    );
    assert_eq!(decide("select 1").process_action(), None);
    for (bad, why) in [
        ("on_match = \"freeze\"", "use stop or kill"),
        ("on_match_scope = \"job\"", "needs on_match"),
        (
            "on_match = \"stop\"\non_match_scope = \"host\"",
            "use process or job",
        ),
    ] {
        let text = format!("[[rule]]\nname = \"r\"\naction = \"deny\"\n{bad}\n");
        let err = PolicySet::from_str(Path::new("p.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains(why), "{bad}: {err}");
    }
}
