//! Policy tests, like `opa test`: `NAME.tests.toml` next to `NAME.toml`
//! holds cases (target, identity, SQL, expected action and rules), and
//! [`run_tests`] runs every case of a directory.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::compile::{items, Checker, OneOrMany, CI_PROVIDER_NAMES};
use super::{
    collect_files, most_restrictive, Action, Decision, PolicyError, PolicyErrors, PolicySet,
    TESTS_SUFFIX,
};
use crate::identity::{Ancestor, CiContext, CiProvider, ProcessIdentity};
use crate::located::parse_toml;
use crate::located::LocatedErrors;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTests {
    policies: Option<Spanned<OneOrMany<String>>>,
    #[serde(default)]
    case: Vec<Spanned<RawCase>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: Spanned<String>,
    target: String,
    sql: String,
    #[serde(default)]
    identity: Option<Spanned<RawIdentity>>,
    expect: Spanned<String>,
    expect_rules: Option<Vec<Spanned<String>>>,
    /// `postgres` (the default) or `mysql`: how `sql` is read.
    #[serde(default)]
    dialect: crate::sql::Dialect,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    pid: Option<u32>,
    user: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
    group: Option<String>,
    comm: Option<String>,
    exe: Option<String>,
    exe_sha256: Option<String>,
    #[serde(default)]
    cmdline: Vec<String>,
    cgroup: Option<String>,
    #[serde(default)]
    ancestry: Vec<RawAncestor>,
    ci_provider: Option<Spanned<String>>,
    ci_repository: Option<String>,
    ci_branch: Option<String>,
    ci_job: Option<String>,
    ci_workflow: Option<String>,
    ci_verified: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAncestor {
    #[serde(default)]
    pid: u32,
    comm: String,
    exe: Option<String>,
}

/// One validated test case.
#[derive(Debug)]
pub(super) struct Case {
    pub(super) line: usize,
    pub(super) name: String,
    pub(super) target: String,
    pub(super) sql: String,
    pub(super) identity: ProcessIdentity,
    pub(super) expect: Action,
    pub(super) expect_rules: Option<Vec<String>>,
    pub(super) dialect: crate::sql::Dialect,
}

/// A validated test file and the policy files its cases run against.
#[derive(Debug)]
pub(super) struct TestsFile {
    pub(super) path: PathBuf,
    pub(super) policies: Vec<PathBuf>,
    pub(super) cases: Vec<Case>,
}

/// The policy file a tests file sits next to: `NAME.tests.toml` tests
/// `NAME.toml`.
fn sibling_policy(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(TESTS_SUFFIX)?;
    Some(path.with_file_name(format!("{stem}.toml")))
}

/// Parses and validates a tests file (not its policies).
pub(super) fn parse_tests_file(path: &Path, text: &str) -> Result<TestsFile, Vec<PolicyError>> {
    let raw: RawTests = parse_toml(path, text).map_err(|e| vec![e])?;
    let mut c = Checker::new(path, text);
    let dir = path.parent().unwrap_or(Path::new(""));
    let policies = match &raw.policies {
        Some(list) => {
            let list = items(list);
            if list.is_empty() {
                c.at(
                    0..0,
                    "`policies` is empty; name the policy files these cases run against",
                );
            }
            list.into_iter()
                .map(|(_, p)| dir.join(p))
                .collect::<Vec<_>>()
        }
        None => match sibling_policy(path) {
            Some(p) if p.is_file() => vec![p],
            Some(p) => {
                c.at(
                    0..0,
                    format!(
                        "no policy file {} next to this test file; create it, or list the files these cases test with `policies = [\"...\"]`",
                        p.display()
                    ),
                );
                Vec::new()
            }
            None => Vec::new(),
        },
    };
    if raw.case.is_empty() {
        c.at(0..0, "no test cases; add [[case]] tables");
    }
    let mut cases = Vec::new();
    let mut names = HashMap::new();
    for spanned in &raw.case {
        let rc = spanned.get_ref();
        let (line, _) = c.position(rc.name.span().start);
        if let Some(first) = names.insert(rc.name.get_ref().clone(), line) {
            c.at(
                rc.name.span(),
                format!(
                    "duplicate case name \"{}\" (first at line {first})",
                    rc.name.get_ref()
                ),
            );
        }
        let expect = c.action(&rc.expect, "expected action");
        let identity = identity(&mut c, rc.identity.as_ref());
        let expect_rules = rc
            .expect_rules
            .as_ref()
            .map(|rules| rules.iter().map(|r| r.get_ref().clone()).collect());
        if let Some(expect) = expect {
            cases.push(Case {
                line,
                name: rc.name.get_ref().clone(),
                target: rc.target.clone(),
                sql: rc.sql.clone(),
                identity,
                expect,
                expect_rules,
                dialect: rc.dialect,
            });
        }
    }
    if c.errors.is_empty() {
        Ok(TestsFile {
            path: path.to_path_buf(),
            policies,
            cases,
        })
    } else {
        Err(c.errors)
    }
}

/// Checks that every `expect_rules` name exists in the set the cases run
/// against (a typo would otherwise only show up as a failing case).
pub(super) fn check_rule_names(path: &Path, text: &str, set: &PolicySet) -> Vec<PolicyError> {
    let Ok(raw) = parse_toml::<RawTests>(path, text) else {
        return Vec::new();
    };
    let known: BTreeSet<&str> = set.rule_names().collect();
    let mut c = Checker::new(path, text);
    for case in &raw.case {
        for rule in case.get_ref().expect_rules.iter().flatten() {
            if !known.contains(rule.get_ref().as_str()) {
                c.at(
                    rule.span(),
                    format!(
                        "expect_rules names \"{}\", which none of the tested policy files defines",
                        rule.get_ref()
                    ),
                );
            }
        }
    }
    c.errors
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentityOnly {
    identity: Spanned<RawIdentity>,
}

/// Parses an identity written like a test case's `identity`, without the
/// braces: `user = "runner", uid = 1001, ci_provider = "github_actions"`
/// (for `tollgate policy explain --identity`). Empty text is the unknown
/// identity.
pub fn parse_identity(spec: &str) -> Result<ProcessIdentity, PolicyErrors> {
    let text = format!("identity = {{ {spec} }}");
    let path = Path::new("--identity");
    let raw: RawIdentityOnly = parse_toml(path, &text).map_err(|e| {
        // Positions are in the wrapped text; the message alone is clearer.
        crate::located::LocatedErrors(vec![PolicyError::file(
            path,
            format!(
                "{}; write it like: user = \"runner\", uid = 1001, exe = \"/usr/bin/psql\", ci_provider = \"github_actions\", ci_verified = true",
                e.message
            ),
        )])
    })?;
    let mut c = Checker::new(path, &text);
    let id = identity(&mut c, Some(&raw.identity));
    if c.errors.is_empty() {
        Ok(id)
    } else {
        Err(LocatedErrors(
            c.errors
                .into_iter()
                .map(|e| PolicyError::file(path, e.message))
                .collect(),
        ))
    }
}

fn identity(c: &mut Checker<'_>, raw: Option<&Spanned<RawIdentity>>) -> ProcessIdentity {
    let Some(spanned) = raw else {
        return ProcessIdentity::default();
    };
    let raw = spanned.get_ref();
    let provider = raw.ci_provider.as_ref().and_then(|p| {
        let found = [
            CiProvider::GithubActions,
            CiProvider::GitlabCi,
            CiProvider::Buildkite,
            CiProvider::Jenkins,
        ]
        .into_iter()
        .find(|x| x.as_str() == p.get_ref());
        if found.is_none() {
            c.at(
                p.span(),
                format!(
                    "unknown ci_provider \"{}\"; expected one of {}",
                    p.get_ref(),
                    CI_PROVIDER_NAMES.join(", ")
                ),
            );
        }
        found
    });
    let ci_fields = raw.ci_repository.is_some()
        || raw.ci_branch.is_some()
        || raw.ci_job.is_some()
        || raw.ci_workflow.is_some()
        || raw.ci_verified.is_some();
    if ci_fields && raw.ci_provider.is_none() {
        c.at(
            spanned.span(),
            "an identity with ci_repository, ci_branch, ci_job, ci_workflow or ci_verified needs ci_provider",
        );
    }
    ProcessIdentity {
        pid: raw.pid,
        uid: raw.uid,
        gid: raw.gid,
        user: raw.user.clone(),
        group: raw.group.clone(),
        comm: raw.comm.clone(),
        exe: raw.exe.clone(),
        exe_sha256: raw.exe_sha256.clone(),
        cmdline: raw.cmdline.clone(),
        cgroup: raw.cgroup.clone(),
        ancestry: raw
            .ancestry
            .iter()
            .map(|a| Ancestor {
                pid: a.pid,
                comm: a.comm.clone(),
                exe: a.exe.clone(),
            })
            .collect(),
        ci: provider.map(|provider| CiContext {
            provider,
            repository: raw.ci_repository.clone(),
            branch: raw.ci_branch.clone(),
            job: raw.ci_job.clone(),
            run_id: None,
            workflow: raw.ci_workflow.clone(),
            actor: None,
            url: None,
            commit: None,
            runner_pid: None,
            verified: raw.ci_verified.unwrap_or(false),
        }),
        gaps: Vec::new(),
        instance: None,
    }
}

/// The outcome of one case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaseResult {
    /// The tests file.
    pub file: PathBuf,
    /// The line of the case's name.
    pub line: usize,
    /// The case's name.
    pub name: String,
    /// The expected action.
    pub expected: Action,
    /// The most restrictive action over the case's statements.
    pub actual: Action,
    /// The expected rule names, if the case says.
    pub expected_rules: Option<Vec<String>>,
    /// The rules that matched any statement, in order, without repeats.
    pub actual_rules: Vec<String>,
    /// No rule matched any statement (every decision was a default).
    pub default_used: bool,
    /// Why the case failed; `None` when it passed.
    pub failure: Option<String>,
}

impl CaseResult {
    /// The case passed.
    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }
}

/// Every case of a directory, in file and case order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestReport {
    /// The cases.
    pub cases: Vec<CaseResult>,
    /// Policy files in the directory that no tests file covers.
    pub untested: Vec<PathBuf>,
}

impl TestReport {
    /// How many cases passed.
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.passed()).count()
    }

    /// How many cases failed.
    pub fn failed(&self) -> usize {
        self.cases.len() - self.passed()
    }

    /// Every case passed.
    pub fn success(&self) -> bool {
        self.failed() == 0
    }
}

impl fmt::Display for TestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.cases {
            let got = if c.actual_rules.is_empty() {
                format!("{} (default)", c.actual)
            } else {
                format!("{} by {}", c.actual, quoted(&c.actual_rules))
            };
            match &c.failure {
                None => writeln!(
                    f,
                    "ok    {}:{}: {}: {got}",
                    c.file.display(),
                    c.line,
                    c.name
                )?,
                Some(why) => writeln!(
                    f,
                    "FAIL  {}:{}: {}: {why}",
                    c.file.display(),
                    c.line,
                    c.name
                )?,
            }
        }
        for p in &self.untested {
            writeln!(
                f,
                "note: {} has no tests; add {}",
                p.display(),
                p.with_extension("tests.toml").display()
            )?;
        }
        write!(f, "{} passed, {} failed", self.passed(), self.failed())
    }
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the policy tests of a directory (not its subdirectories).
///
/// Every `*.toml` policy in `dir` must load (each on its own). Every
/// `NAME.tests.toml` runs its cases against `NAME.toml`, or against the
/// files its top-level `policies = [...]` lists (relative to the tests
/// file), loaded together as one set. Each case's SQL is analysed; a text
/// with several statements is decided statement by statement (with the
/// `multi_statement` flag) and the case is about the most restrictive
/// action; `expect_rules`, when given, must equal the set of rules that
/// matched any statement (`[]`: no rule matched).
///
/// Errors (unreadable or invalid files, no cases at all) come back as
/// [`PolicyErrors`]; failing cases are in the report.
pub fn run_tests(dir: &Path) -> Result<TestReport, PolicyErrors> {
    if !dir.is_dir() {
        return Err(crate::located::LocatedErrors(vec![PolicyError::file(
            dir,
            "not a directory; `tollgate policy test` takes the directory that holds NAME.toml and NAME.tests.toml",
        )]));
    }
    let found = collect_files(&[dir.to_path_buf()])?;
    let mut errors = Vec::new();
    let mut texts: HashMap<PathBuf, String> = HashMap::new();
    for p in found.policies.iter().chain(&found.tests) {
        match std::fs::read_to_string(p) {
            Ok(t) => {
                texts.insert(p.clone(), t);
            }
            Err(e) => errors.push(PolicyError::file(p, format!("cannot read: {e}"))),
        }
    }
    // Every policy of the directory must compile, tested or not.
    for p in &found.policies {
        if let Some(text) = texts.get(p) {
            if let Err(mut e) = PolicySet::from_str(p, text) {
                errors.append(&mut e.0);
            }
        }
    }
    let mut files = Vec::new();
    for t in &found.tests {
        let Some(text) = texts.get(t) else { continue };
        match parse_tests_file(t, text) {
            Ok(tf) => files.push((tf, text.clone())),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if !errors.is_empty() {
        return Err(LocatedErrors(errors));
    }

    let mut report = TestReport {
        cases: Vec::new(),
        untested: Vec::new(),
    };
    let mut covered = BTreeSet::new();
    for (tf, text) in &files {
        let set = match load_set(&tf.policies, &mut texts) {
            Ok(set) => set,
            Err(mut e) => {
                errors.append(&mut e.0);
                continue;
            }
        };
        let mut names = check_rule_names(&tf.path, text, &set);
        if !names.is_empty() {
            errors.append(&mut names);
            continue;
        }
        for p in &tf.policies {
            covered.insert(std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()));
        }
        for case in &tf.cases {
            report.cases.push(run_case(&set, &tf.path, case));
        }
    }
    if !errors.is_empty() {
        return Err(LocatedErrors(errors));
    }
    for p in &found.policies {
        let key = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        if !covered.contains(&key) {
            report.untested.push(p.clone());
        }
    }
    if report.cases.is_empty() {
        return Err(crate::located::LocatedErrors(vec![PolicyError::file(
            dir,
            "no test cases found; write NAME.tests.toml with [[case]] tables next to NAME.toml",
        )]));
    }
    Ok(report)
}

/// Loads the policy files a tests file names, reading any not read yet.
pub(super) fn load_set(
    paths: &[PathBuf],
    texts: &mut HashMap<PathBuf, String>,
) -> Result<PolicySet, PolicyErrors> {
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        if let Some(t) = texts.get(p) {
            sources.push((p.clone(), t.clone()));
            continue;
        }
        match std::fs::read_to_string(p) {
            Ok(t) => {
                texts.insert(p.clone(), t.clone());
                sources.push((p.clone(), t));
            }
            Err(e) => errors.push(PolicyError::file(p, format!("cannot read: {e}"))),
        }
    }
    if !errors.is_empty() {
        return Err(LocatedErrors(errors));
    }
    PolicySet::from_texts(&sources)
}

/// Runs one case.
pub(super) fn run_case(set: &PolicySet, file: &Path, case: &Case) -> CaseResult {
    let analysis = case.dialect.analyze(&case.sql);
    let decisions = set.decide_analysis(&case.target, &case.identity, &case.sql, &analysis);
    let mut result = CaseResult {
        file: file.to_path_buf(),
        line: case.line,
        name: case.name.clone(),
        expected: case.expect,
        actual: Action::Allow,
        expected_rules: case.expect_rules.clone(),
        actual_rules: Vec::new(),
        default_used: true,
        failure: None,
    };
    let Some(top) = most_restrictive(&decisions) else {
        result.failure = Some("the sql holds no statement; give the case one".to_owned());
        return result;
    };
    result.actual = top.action;
    result.actual_rules = rule_union(&decisions);
    result.default_used = result.actual_rules.is_empty();
    let mut problems = Vec::new();
    if top.action != case.expect {
        problems.push(format!(
            "expected {}, got {} ({})",
            case.expect, top.action, top.reason
        ));
    }
    if let Some(expected) = &case.expect_rules {
        let want: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
        let got: BTreeSet<&str> = result.actual_rules.iter().map(String::as_str).collect();
        if want != got {
            let show = |s: &BTreeSet<&str>| {
                if s.is_empty() {
                    "none".to_owned()
                } else {
                    s.iter()
                        .map(|n| format!("\"{n}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            problems.push(format!(
                "expected rules {}, matched {}",
                show(&want),
                show(&got)
            ));
        }
    }
    if !problems.is_empty() {
        result.failure = Some(problems.join("; "));
    }
    result
}

/// The names of the rules matched by any decision, first occurrence order.
fn rule_union(decisions: &[Decision]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in decisions {
        for r in &d.matched {
            if !out.iter().any(|name| *name == *r.name) {
                out.push(r.name.to_string());
            }
        }
    }
    out
}
