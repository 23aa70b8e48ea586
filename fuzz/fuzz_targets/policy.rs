//! Arbitrary text loaded as a policy file: a policy or an error, never a
//! panic; and a policy that loads decides statements without panicking.
//!
//! Beyond "no panic": loading is deterministic (same digest, rules and
//! decisions); every error has a message or a place; decisions on a few
//! fixed statements (parsed, multi-statement, unparsable) are the same from
//! two loads of the text.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tollgate_agent::identity::ProcessIdentity;
use tollgate_agent::policy::PolicySet;
use tollgate_agent::sql::{analyze, Analysis};

/// Statements to decide: reads, writes, DDL, functions, flags, two in one
/// text, and text that does not parse.
const STATEMENTS: [&str; 8] = [
    "SELECT id, email FROM public.users WHERE id = 1",
    "DELETE FROM orders",
    "DROP TABLE audit.log",
    "COPY secrets TO PROGRAM 'curl x'",
    "SELECT pg_read_file('/etc/passwd'), set_config('a', 'b', false)",
    "BEGIN; UPDATE accounts SET balance = 0; COMMIT",
    "ALTER SYSTEM SET log_statement = 'none'",
    "selec 1 frm",
];

const TARGETS: [&str; 3] = ["prod-db", "staging/main", ""];

fn analyses() -> &'static [(&'static str, Analysis)] {
    static ANALYSES: OnceLock<Vec<(&'static str, Analysis)>> = OnceLock::new();
    ANALYSES.get_or_init(|| STATEMENTS.iter().map(|s| (*s, analyze(s))).collect())
}

fn identities() -> &'static [ProcessIdentity] {
    static IDENTITIES: OnceLock<Vec<ProcessIdentity>> = OnceLock::new();
    IDENTITIES.get_or_init(|| {
        let ci = ProcessIdentity {
            uid: Some(1001),
            user: Some("runner".into()),
            exe: Some("/usr/bin/psql".into()),
            ..ProcessIdentity::default()
        };
        vec![ProcessIdentity::default(), ci]
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    let set = match PolicySet::from_str(path, text) {
        Ok(set) => set,
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error without a problem");
            for e in &errors.0 {
                // Every error says what is wrong (a TOML syntax error the
                // parser gives no words for is worded by the loader:
                // fuzz/regressions/policy/).
                assert!(!e.message.is_empty(), "{e:?}");
                assert!(!e.to_string().is_empty());
            }
            assert_eq!(Err(errors), PolicySet::from_str(path, text).map(|_| ()));
            return;
        }
    };
    let again = PolicySet::from_str(path, text).expect("a policy that loaded loads again");
    assert_eq!(set.digest(), again.digest());
    assert!(set.rule_names().eq(again.rule_names()));
    for name in set.rule_names() {
        let _ = set.description(name);
    }
    for target in TARGETS {
        let _ = set.masks_target(target);
        for identity in identities() {
            for (sql, analysis) in analyses() {
                let decisions = set.decide_analysis(target, identity, sql, analysis);
                assert_eq!(
                    decisions,
                    again.decide_analysis(target, identity, sql, analysis)
                );
                for d in &decisions {
                    let _ = d.client_message("STATEMENT");
                }
            }
        }
    }
});
