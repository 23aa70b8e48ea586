//! `tollgate policy explain` and `tollgate policy check`: what the engine
//! sees in a statement and why it decides what it does; whether files load.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use super::testing::{check_rule_names, load_set, parse_tests_file};
use super::{
    collect_files, most_restrictive, read_all, Action, Decision, OutsideNote, PolicyError,
    PolicyErrors, PolicySet, Request, Statement,
};
use crate::identity::ProcessIdentity;
use crate::located::LocatedErrors;
use crate::sql::{Analysis, Dialect, StatementSummary, TableRef};

/// One statement of an explained text.
#[derive(Debug, Clone, Serialize)]
pub struct ExplainedStatement {
    /// The statement's text (the whole text when it does not parse).
    pub text: String,
    /// The analysis; `None` when the text does not parse.
    pub summary: Option<StatementSummary>,
    /// The parser's message when the text does not parse.
    pub parse_error: Option<String>,
    /// Decided with the `multi_statement` flag.
    pub multi_statement: bool,
    /// The decision.
    pub decision: Decision,
    /// Where the default came from, when no rule matched
    /// (`policies/prod.toml [defaults.targets] "prod-*"`).
    pub default_source: Option<String>,
    /// For the rules that applied, what fell outside their allow-lists.
    pub outside: Vec<OutsideNote>,
}

/// Everything `tollgate policy explain` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The target.
    pub target: String,
    /// The SQL dialect the text was read in.
    pub dialect: Dialect,
    /// The identity, summarised on one line.
    pub identity: String,
    /// The policy files, in load order.
    pub policy_files: Vec<String>,
    /// How many rules are loaded.
    pub rules: usize,
    /// The policy set's digest.
    pub digest: String,
    /// Each statement, in order (empty for empty text).
    pub statements: Vec<ExplainedStatement>,
    /// The most restrictive action over the statements (`allow` for
    /// empty text).
    pub verdict: Action,
    /// The message is refused: a refusing verdict, or `mask` on a
    /// statement whose result cannot be masked.
    pub refused: bool,
    /// What the client is told when the message is refused.
    pub client_message: Option<String>,
    /// The `description` of each matched rule that has one, by name.
    pub descriptions: BTreeMap<String, String>,
}

/// Analyses `sql` in `dialect` and decides each statement as the proxy
/// would for `identity` on `target`.
pub fn explain(
    set: &PolicySet,
    target: &str,
    identity: &ProcessIdentity,
    sql: &str,
    dialect: Dialect,
) -> Explanation {
    let analysis = dialect.analyze(sql);
    explain_analysis(set, target, identity, sql, &analysis, dialect)
}

/// [`explain`] for text already analysed.
pub fn explain_analysis(
    set: &PolicySet,
    target: &str,
    identity: &ProcessIdentity,
    sql: &str,
    analysis: &Analysis,
    dialect: Dialect,
) -> Explanation {
    let decisions = set.decide_analysis(target, identity, sql, analysis);
    let notes = |statement: Statement<'_>, multi_statement: bool, d: &Decision| {
        let req = Request {
            target,
            identity,
            statement,
            multi_statement,
        };
        d.matched
            .iter()
            .flat_map(|r| set.outside(&r.name, &req))
            .collect::<Vec<_>>()
    };
    let mut statements = Vec::new();
    match analysis {
        Analysis::Parsed { statements: parsed } => {
            let multi = parsed.len() > 1;
            for (s, d) in parsed.iter().zip(&decisions) {
                statements.push(ExplainedStatement {
                    text: s.text.clone(),
                    summary: Some(s.clone()),
                    parse_error: None,
                    multi_statement: multi,
                    default_source: d
                        .default_used
                        .then(|| set.default_for(target, false).source),
                    outside: notes(Statement::Parsed(s), multi, d),
                    decision: d.clone(),
                });
            }
        }
        Analysis::Unparsable { error } => {
            for d in &decisions {
                statements.push(ExplainedStatement {
                    text: sql.to_owned(),
                    summary: None,
                    parse_error: Some(error.clone()),
                    multi_statement: false,
                    default_source: d.default_used.then(|| set.default_for(target, true).source),
                    outside: notes(Statement::Unparsable { text: sql, error }, false, d),
                    decision: d.clone(),
                });
            }
        }
    }
    let top = most_restrictive(&decisions);
    let verdict = top.map_or(Action::Allow, |d| d.action);
    fn command(s: &ExplainedStatement) -> &str {
        s.summary.as_ref().map_or("statement", |s| &*s.command)
    }
    let client_message = match top {
        Some(d) if d.action.is_refused() => statements
            .iter()
            .find(|s| s.decision == *d)
            .map(|s| d.client_message(command(s))),
        // A mask decision runs masked unless a statement cannot be.
        Some(d) if d.action == Action::Mask => statements.iter().find_map(|s| {
            let obstacle = (s.decision.action == Action::Mask)
                .then(|| s.decision.mask_obstacle(s.summary.as_ref(), dialect))
                .flatten()?;
            Some(s.decision.mask_refused_message(command(s), &obstacle))
        }),
        _ => None,
    };
    let mut descriptions = BTreeMap::new();
    for d in &decisions {
        for r in &d.matched {
            if let Some(text) = set.description(&r.name) {
                descriptions.insert(r.name.to_string(), text.to_owned());
            }
        }
    }
    Explanation {
        descriptions,
        target: target.to_owned(),
        dialect,
        identity: identity.summary(),
        policy_files: set.files().map(|p| p.display().to_string()).collect(),
        rules: set.rule_count(),
        digest: set.digest(),
        statements,
        verdict,
        refused: client_message.is_some(),
        client_message,
    }
}

fn tables(list: &[TableRef]) -> String {
    if list.is_empty() {
        return "-".to_owned();
    }
    list.iter()
        .map(|t| match &t.schema {
            Some(s) => format!("{s}.{}", t.name),
            None => t.name.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn flags(s: &StatementSummary, multi: bool) -> String {
    let f = &s.flags;
    let names: Vec<&str> = [
        (f.no_where, "no_where"),
        (multi, "multi_statement"),
        (f.copy_program, "copy_program"),
        (f.copy_server_file, "copy_server_file"),
        (f.server_file_access, "server_file_access"),
        (f.config_change, "config_change"),
    ]
    .into_iter()
    .filter_map(|(on, n)| on.then_some(n))
    .collect();
    if names.is_empty() {
        "-".to_owned()
    } else {
        names.join(", ")
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "target:    {} ({})", self.target, self.dialect.as_str())?;
        writeln!(f, "identity:  {}", self.identity)?;
        let files = if self.policy_files.is_empty() {
            "(none: built-in defaults only)".to_owned()
        } else {
            self.policy_files.join(", ")
        };
        writeln!(
            f,
            "policy:    {files} ({} rules, sha256 {})",
            self.rules,
            self.digest.get(..16).unwrap_or(&self.digest)
        )?;
        if self.statements.is_empty() {
            writeln!(f)?;
            writeln!(f, "the text holds no statement")?;
        }
        let n = self.statements.len();
        for (i, st) in self.statements.iter().enumerate() {
            writeln!(f)?;
            match &st.summary {
                Some(s) => {
                    writeln!(f, "statement {} of {n}: {}", i + 1, st.text.trim())?;
                    writeln!(f, "  kind:           {} ({})", s.kind.as_str(), s.command)?;
                    writeln!(f, "  tables read:    {}", tables(&s.tables_read))?;
                    writeln!(f, "  tables written: {}", tables(&s.tables_written))?;
                    let functions = if s.functions.is_empty() {
                        "-".to_owned()
                    } else {
                        s.functions.join(", ")
                    };
                    writeln!(f, "  functions:      {functions}")?;
                    writeln!(f, "  flags:          {}", flags(s, st.multi_statement))?;
                    writeln!(f, "  fingerprint:    {}", s.fingerprint)?;
                }
                None => {
                    writeln!(f, "unparsable text: {}", st.text.trim())?;
                    writeln!(
                        f,
                        "  parse error:    {}",
                        st.parse_error.as_deref().unwrap_or("-")
                    )?;
                    writeln!(f, "  flags:          unparsable")?;
                }
            }
            let d = &st.decision;
            if d.matched.is_empty() {
                writeln!(f, "  rules matched:  none")?;
            } else {
                writeln!(f, "  rules matched:")?;
                let width = d.matched.iter().map(|r| r.name.len()).max().unwrap_or(0);
                for r in &d.matched {
                    write!(f, "    {:<6}  {:<width$}  {}", r.action, r.name, r.file)?;
                    if let Some(m) = &r.message {
                        write!(f, "  \"{m}\"")?;
                    }
                    writeln!(f)?;
                    if let Some(why) = self.descriptions.get(&*r.name) {
                        writeln!(f, "    {:<6}  {:<width$}  ({why})", "", "")?;
                    }
                    for note in st.outside.iter().filter(|n| n.rule == *r.name) {
                        writeln!(f, "    {:<6}  {:<width$}  {}", "", "", outside_line(note))?;
                    }
                    if let Some(mask) = &r.mask {
                        let columns: Vec<String> =
                            mask.columns.iter().map(ToString::to_string).collect();
                        writeln!(
                            f,
                            "    {:<6}  {:<width$}  masks {} ({})",
                            "",
                            "",
                            columns.join(", "),
                            mask.with
                        )?;
                    }
                }
            }
            match (&st.default_source, d.deciding_rule()) {
                (Some(source), _) => {
                    writeln!(f, "  decision:       {} by default ({})", d.action, source)?
                }
                (None, Some(rule)) => writeln!(
                    f,
                    "  decision:       {} by rule \"{}\"",
                    d.action, rule.name
                )?,
                (None, None) => writeln!(f, "  decision:       {} ({})", d.action, d.reason)?,
            }
        }
        writeln!(f)?;
        let effect = match (self.refused, n > 1) {
            (true, true) => "refused; no statement of the message runs",
            (true, false) => "refused",
            (false, _) if self.verdict == Action::Audit => "forwarded and flagged for audit",
            (false, _) if self.verdict == Action::Mask => {
                "forwarded, with the result columns masked"
            }
            (false, _) => "forwarded",
        };
        write!(f, "verdict:   {} ({effect})", self.verdict)?;
        if let Some(m) = &self.client_message {
            write!(f, "\nclient sees: {m}")?;
        }
        Ok(())
    }
}

/// `functions_outside: dblink is not in the list`.
fn outside_line(note: &OutsideNote) -> String {
    match note.outside.as_deref() {
        None => format!(
            "{}: unknown, the text does not parse (counted as outside)",
            note.condition
        ),
        Some([]) => format!("{}: nothing outside the list", note.condition),
        Some([one]) => format!("{}: {one} is not in the list", note.condition),
        Some(many) => format!(
            "{}: {} are not in the list",
            note.condition,
            many.join(", ")
        ),
    }
}

/// What `tollgate policy check` found valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckSummary {
    /// Policy files, in load order.
    pub policy_files: Vec<PathBuf>,
    /// Rules in them.
    pub rules: usize,
    /// Test files checked (structure, rule names; not run).
    pub test_files: Vec<PathBuf>,
    /// Cases in them.
    pub cases: usize,
    /// Digest of the policy files as one set.
    pub digest: String,
}

impl fmt::Display for CheckSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ok: {} policy file{}, {} rule{}",
            self.policy_files.len(),
            plural(self.policy_files.len()),
            self.rules,
            plural(self.rules)
        )?;
        if !self.test_files.is_empty() {
            write!(
                f,
                "; {} test file{} with {} case{}",
                self.test_files.len(),
                plural(self.test_files.len()),
                self.cases,
                plural(self.cases)
            )?;
        }
        if !self.policy_files.is_empty() {
            write!(f, " (sha256 {})", self.digest)?;
        }
        Ok(())
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Validates policy files and directories as one set (as the agent would
/// load them), and the test files among them or in them (structure, and
/// that the rules they name exist; cases are not run). Every problem is
/// reported with `file:line:column`.
pub fn check(paths: &[PathBuf]) -> Result<CheckSummary, PolicyErrors> {
    let found = collect_files(paths)?;
    let mut errors = Vec::new();
    let sources = read_all(&found.policies, &mut errors);
    let mut summary = CheckSummary {
        policy_files: found.policies.clone(),
        rules: 0,
        test_files: found.tests.clone(),
        cases: 0,
        digest: String::new(),
    };
    let set_ok = match PolicySet::from_texts(&sources) {
        Ok(set) => {
            summary.rules = set.rule_count();
            summary.digest = set.digest();
            true
        }
        Err(mut e) => {
            errors.append(&mut e.0);
            false
        }
    };
    let mut texts: HashMap<PathBuf, String> = sources.into_iter().collect();
    for t in &found.tests {
        let text = match std::fs::read_to_string(t) {
            Ok(text) => text,
            Err(e) => {
                errors.push(PolicyError::file(t, format!("cannot read: {e}")));
                continue;
            }
        };
        let tf = match parse_tests_file(t, &text) {
            Ok(tf) => tf,
            Err(mut e) => {
                errors.append(&mut e);
                continue;
            }
        };
        summary.cases += tf.cases.len();
        match load_set(&tf.policies, &mut texts) {
            Ok(set) => errors.append(&mut check_rule_names(t, &text, &set)),
            // The policy's own errors are already reported above when it
            // was named; report them here only if they are new.
            Err(e) => {
                for err in e.0 {
                    if set_ok || !errors.contains(&err) {
                        errors.push(err);
                    }
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(summary)
    } else {
        Err(LocatedErrors(errors))
    }
}
