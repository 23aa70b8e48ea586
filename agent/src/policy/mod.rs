//! Policy: which statements a governed process may run against a target,
//! decided one statement at a time.
//!
//! Policies are TOML files (docs/policy.md is the full reference, with
//! examples). The one
//! boundary is [`PolicySet::decide`]: a [`Request`] (target, identity, one
//! analysed statement) in, a [`Decision`] out. It does no I/O and never
//! fails; everything that can go wrong is caught when the files are loaded.
//!
//! # Semantics
//!
//! - **Rules.** A rule applies when every condition of its `[rule.match]`
//!   holds (AND) and not every condition of its optional `[rule.except]`
//!   holds. A list is any-of (OR); an absent condition matches anything; an
//!   empty list is a load error (it could never match).
//! - **Conflicts.** The decision is the most restrictive action among *all*
//!   rules that apply, in the order `deny > review > mask > audit > allow`
//!   ([`Action`]'s `Ord`). An `allow` rule therefore never overrides a
//!   `deny`; exceptions are written into the deny rule (`[rule.except]`).
//!   Rule order does not change the action; it only orders
//!   [`Decision::matched`] (files in load order, rules in file order).
//! - **Defaults.** When no rule applies, the default for the target decides:
//!   in each file, an exact name in `[defaults.targets]`, else the first
//!   matching glob there (file order), else the file's `[defaults] action`.
//!   Across files, the most restrictive of the files that say something
//!   wins; when no file says anything, the built-in default is `allow`.
//! - **Unparsable statements.** Only conditions that do not need a parse
//!   tree can match them: identity and target conditions, `text_regex` (on
//!   the raw text) and the flags `unparsable` and `multi_statement`. A rule
//!   with `kinds`, `commands`, `tables`, `tables_read`, `tables_written` or
//!   `functions` never matches one.
//!   Allow-lists (`*_outside`) count one as outside in a `deny` rule's
//!   `match` and nowhere else: the text may call anything, and a looser
//!   rule applying would replace the stricter unparsable default.
//!   With no rule applying, the decision is the most restrictive of the
//!   target's default and `[defaults] unparsable` (combined across files as
//!   above; built-in `deny`).
//! - **Refusal.** [`Action::is_refused`] is true for `review` and `deny`:
//!   a `review` decision is held for reviewers by the session where it can
//!   be (`crate::approval`), and refused where it cannot, with
//!   [`Decision::client_message`] saying why; `mask` is refused where
//!   masking cannot apply. Fail closed, never silently allow.
//!
//! # Layout
//!
//! - `compile`: the TOML as written (serde with spans) and its validation
//!   into compiled rules; every error carries `file:line:column`.
//! - `matcher`: compiled conditions (glob sets, regex sets, bit masks) and
//!   the per-request [`Request`] view they are matched against.
//! - `testing`: `NAME.tests.toml` cases and [`run_tests`].
//! - `explain`: [`explain`] and [`check`] for the CLI.

mod compile;
mod explain;
mod identity_match;
mod matcher;
mod memo;
pub mod reload;
mod review;
pub mod source;
mod testing;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::identity::ProcessIdentity;
use crate::located::LocatedErrors;
use crate::masking::MaskRule;
use crate::sql::{Analysis, StatementSummary};

pub use explain::{
    check, explain, explain_analysis, CheckSummary, ExplainedStatement, Explanation,
};
pub use identity_match::{IdentityMatch, IdentitySpec};
pub use memo::DecisionMemo;
pub use reload::{current_policy, PolicyView, SharedPolicy};
pub use review::{
    Approver, DailyWindow, GrantScope, ReviewSettings, DEFAULT_REVIEW_TIMEOUT, MAX_APPROVALS,
    MAX_GRANT,
};
pub use testing::{parse_identity, run_tests, CaseResult, TestReport};

/// What to do with a statement. Ordered from least to most restrictive, so
/// the decision among several rules is their maximum.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Forward the statement.
    #[default]
    Allow,
    /// Forward it, and flag it in the session record.
    Audit,
    /// Forward it and mask the result fields its rules name (see
    /// [`crate::masking`]); refused where masking cannot apply.
    Mask,
    /// Hold it for a human reviewer (`crate::approval`); refused where it
    /// cannot be held.
    Review,
    /// Refuse it, with the rule's message.
    Deny,
}

impl Action {
    /// Every action, least restrictive first.
    pub const ALL: [Action; 5] = [
        Action::Allow,
        Action::Audit,
        Action::Mask,
        Action::Review,
        Action::Deny,
    ];

    /// The name used in policy files (`"deny"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Audit => "audit",
            Action::Mask => "mask",
            Action::Review => "review",
            Action::Deny => "deny",
        }
    }

    /// Parses a policy-file name (`"deny"`); `None` for anything else.
    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == name)
    }

    /// Whether the statement must not reach the server in this version:
    /// `deny`, and `review` until it is implemented. A `mask` statement
    /// runs with its result masked, or is refused where that cannot be
    /// done ([`Decision::mask_refused_message`]).
    pub fn is_refused(self) -> bool {
        self >= Action::Review
    }
}

/// What a rule with `on_match` does to the process behind a session when
/// a statement matches it: stop it for inspection, or kill it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessActionKind {
    /// SIGSTOP the process, or freeze its job's cgroup (`cgroup.freeze`).
    Stop,
    /// SIGKILL the process, or kill its job's cgroup (`cgroup.kill`).
    Kill,
}

/// How far a rule's `on_match` reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessActionScope {
    /// The process that sent the statement.
    Process,
    /// Every process of its governed cgroup (the CI job, the `tollgate
    /// exec` command).
    Job,
}

/// A rule's `on_match` and `on_match_scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ProcessAction {
    /// Stop or kill.
    pub kind: ProcessActionKind,
    /// The process or its job.
    pub scope: ProcessActionScope,
}

impl ProcessActionKind {
    /// `stop` or `kill`, as written in policies.
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessActionKind::Stop => "stop",
            ProcessActionKind::Kill => "kill",
        }
    }
}

impl ProcessActionScope {
    /// `process` or `job`, as written in policies.
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessActionScope::Process => "process",
            ProcessActionScope::Job => "job",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One statement to decide, with who sends it where.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The target's configured name.
    pub target: &'a str,
    /// The process behind the connection.
    pub identity: &'a ProcessIdentity,
    /// The statement.
    pub statement: Statement<'a>,
    /// The statement came in one message with others (a simple Query with
    /// several statements); matched by the `multi_statement` flag.
    pub multi_statement: bool,
}

/// A statement as the analyser left it.
#[derive(Debug, Clone, Copy)]
pub enum Statement<'a> {
    /// Parsed and summarised.
    Parsed(&'a StatementSummary),
    /// The text does not parse.
    Unparsable {
        /// The text as received.
        text: &'a str,
        /// The parser's message.
        error: &'a str,
    },
}

/// A rule that applied to a statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MatchedRule {
    /// The rule's name (unique in a [`PolicySet`]).
    pub name: Arc<str>,
    /// Its action.
    pub action: Action,
    /// Its message for the client, if it has one.
    pub message: Option<Arc<str>>,
    /// The policy file that defines it, as it was named when loaded.
    pub file: Arc<str>,
    /// A `mask` rule's columns and method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<Arc<MaskRule>>,
    /// A `review` rule's approvers, approvals, timeout and grant scope.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review: Option<Arc<ReviewSettings>>,
    /// What the rule does to the process when it matches (`on_match`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_match: Option<ProcessAction>,
}

/// The verdict on one statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The most restrictive action of the rules that applied, or the default.
    pub action: Action,
    /// Every rule that applied, in load order.
    pub matched: Vec<MatchedRule>,
    /// No rule applied; `action` is the default.
    pub default_used: bool,
    /// Why, in one line without file paths (safe to show the client):
    /// `rule "no-ddl-in-ci" (deny)`, or
    /// `no rule matched, and the default for target "prod-orders" is deny`.
    /// Shared: usually one rule's reason, made when the policy loaded.
    pub reason: Arc<str>,
}

impl Decision {
    /// The decision once a reviewer approved the statement: what its other
    /// rules decide (`allow` when only `review` rules applied). Any other
    /// decision is returned as it is.
    pub fn reviewed(&self) -> Decision {
        if self.action != Action::Review {
            return self.clone();
        }
        let action = self
            .matched
            .iter()
            .map(|r| r.action)
            .filter(|a| *a != Action::Review)
            .max()
            .unwrap_or(Action::Allow);
        Decision {
            action,
            ..self.clone()
        }
    }

    /// The strongest `on_match` of the rules that applied (kill over stop,
    /// the job over the process), with the rule that asked for it.
    pub fn process_action(&self) -> Option<(ProcessAction, &str)> {
        self.matched
            .iter()
            .filter_map(|r| r.on_match.map(|a| (a, &*r.name)))
            .max_by_key(|(a, _)| *a)
    }

    /// The first matched rule with the decision's action: the one messages
    /// name. `None` when the default decided.
    pub fn deciding_rule(&self) -> Option<&MatchedRule> {
        self.matched.iter().find(|r| r.action == self.action)
    }

    /// The `mask` rules that applied (none when a default decided `mask`).
    pub fn mask_rules(&self) -> impl Iterator<Item = &MaskRule> {
        self.matched
            .iter()
            .filter(|r| r.action == Action::Mask)
            .filter_map(|r| r.mask.as_deref())
    }

    /// Why a `mask` decision on `statement` cannot be carried out by
    /// masking its result, whatever protocol it came in; `None` when it
    /// can.
    pub fn mask_obstacle(
        &self,
        statement: Option<&StatementSummary>,
        dialect: crate::sql::Dialect,
    ) -> Option<std::borrow::Cow<'static, str>> {
        if self.mask_rules().next().is_none() {
            Some("the default policy cannot say which columns to mask".into())
        } else {
            match statement {
                Some(statement) => crate::masking::mask_obstacle(statement, dialect),
                None => Some(MASK_ONLY_QUERIES.into()),
            }
        }
    }

    /// The message for a `mask` statement that cannot run masked, `why`
    /// saying what masking cannot do: `tollgate: COPY requires masking by
    /// rule "mask-pii", and masking applies only to ...; refused`.
    pub fn mask_refused_message(&self, command: &str, why: &str) -> String {
        let rule = self.deciding_rule();
        let by = match rule {
            Some(rule) => format!("by rule \"{}\"", rule.name),
            None => "by the default policy, which names no columns".to_owned(),
        };
        let message = rule
            .and_then(|r| r.message.as_deref())
            .map(|m| format!(" ({m})"))
            .unwrap_or_default();
        format!("tollgate: {command} requires masking {by}{message}, and {why}; refused")
    }

    /// The message for the client, naming the rule and its message.
    /// `command` is the statement's label (`"DROP TABLE"`), e.g.
    /// `tollgate: DROP TABLE denied by rule "no-ddl-in-ci": schema changes go
    /// through the migration pipeline`, or for an action that is not
    /// that cannot be carried out where it was decided, `tollgate: SELECT
    /// requires review by rule "x", and it cannot be held for review here
    /// (...); refused`.
    pub fn client_message(&self, command: &str) -> String {
        let by = match self.deciding_rule() {
            Some(rule) => format!("by rule \"{}\"", rule.name),
            None => "by the default policy".to_owned(),
        };
        let message = self.deciding_rule().and_then(|r| r.message.as_deref());
        // The rule's message, else (for a default) the reason.
        let why = match (message, self.default_used) {
            (Some(m), _) => Some(m),
            (None, true) => Some(&*self.reason),
            (None, false) => None,
        };
        let verb = match self.action {
            Action::Allow => "allowed",
            Action::Audit => "allowed and audited",
            Action::Deny => "denied",
            Action::Mask => return self.mask_refused_message(command, MASK_ONLY_QUERIES),
            Action::Review => {
                let why = why.map(|w| format!(" ({w})")).unwrap_or_default();
                return format!(
                    "tollgate: {command} requires review {by}{why}, and it cannot be held for review here (no approvers are named for it, or it runs through EXECUTE of a prepared statement, a FunctionCall, or a prepared statement decided again after a policy change); refused"
                );
            }
        };
        match (message, why) {
            (Some(m), _) => format!("tollgate: {command} {verb} {by}: {m}"),
            (None, Some(w)) => format!("tollgate: {command} {verb} {by} ({w})"),
            (None, None) => format!("tollgate: {command} {verb} {by}"),
        }
    }
}

/// What fell outside one allow-list condition of a rule that applied (see
/// [`PolicySet::outside`]), for explanations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutsideNote {
    /// The rule.
    pub rule: String,
    /// The condition (`functions_outside`).
    pub condition: &'static str,
    /// The kinds, tables or functions its list does not name, as the
    /// statement wrote them; `None` when the text does not parse (it may
    /// call anything).
    pub outside: Option<Vec<String>>,
}

/// Where masking applies, for refusals elsewhere.
pub const MASK_ONLY_QUERIES: &str = crate::masking::MASK_ONLY_QUERIES;

/// A problem in a policy or policy test file, with its place when known.
pub type PolicyError = crate::located::LocatedError;

/// Every problem found, files in load order, each file's in text order.
pub type PolicyErrors = crate::located::LocatedErrors;

/// One loaded policy file.
#[derive(Debug)]
struct LoadedFile {
    path: PathBuf,
    defaults: compile::FileDefaults,
}

/// Where a default came from, for explanations.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DefaultChoice {
    action: Action,
    /// `policies/prod.toml [defaults.targets] "prod-*"`, or `built-in`.
    source: String,
}

/// The compiled rules and defaults of one or more policy files. Immutable
/// and cheap to share (`Arc<PolicySet>`); a reload builds a new one.
#[derive(Debug)]
pub struct PolicySet {
    files: Vec<LoadedFile>,
    rules: Vec<matcher::Rule>,
    digest: String,
    /// Every rule's `match.targets` globs in one set: one lookup per
    /// statement instead of one per rule.
    target_index: globset::GlobSet,
    /// For each glob of `target_index`, the index of its rule.
    target_owner: Vec<usize>,
    /// Per rule: it has no `match.targets` (any target).
    untargeted: Arc<[bool]>,
    /// What depends on the target alone, per target name seen. A session
    /// decides all its statements for one target, so the globs of rules'
    /// `targets` and of `[defaults.targets]` run once per target rather
    /// than once per statement.
    targets: Mutex<HashMap<Box<str>, Arc<TargetFacts>>>,
    /// Distinct for every set made in this process (see [`DecisionMemo`]).
    generation: u64,
    /// Some rule reads the statement's text (`text_regex`): a decision
    /// cannot be reused for another text.
    reads_text: bool,
    /// Some rule masks.
    masks: bool,
}

/// The next [`PolicySet::generation`].
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

fn next_generation() -> u64 {
    NEXT_GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// The target-only part of a decision.
#[derive(Debug)]
struct TargetFacts {
    /// Per rule: its `match.targets` holds (or it has none).
    rules_ok: Arc<[bool]>,
    /// The default for a parsed statement no rule matches.
    default_action: Action,
    /// Its reason.
    default_reason: Arc<str>,
}

/// Targets whose rule mask [`PolicySet`] keeps (configurations name a few).
const MAX_CACHED_TARGETS: usize = 256;

impl PolicySet {
    /// A set without files: every parsed statement is allowed, unparsable
    /// ones are denied (the built-in defaults).
    pub fn empty() -> PolicySet {
        PolicySet {
            files: Vec::new(),
            rules: Vec::new(),
            digest: hex::encode(Sha256::new().finalize()),
            target_index: globset::GlobSet::empty(),
            target_owner: Vec::new(),
            untargeted: Arc::from([]),
            targets: Mutex::default(),
            generation: next_generation(),
            reads_text: false,
            masks: false,
        }
    }

    /// Loads policy files. A directory contributes every `*.toml` directly
    /// in it (not in subdirectories), except `*.tests.toml`, in name order;
    /// a file is loaded whatever its name, except that a `*.tests.toml` file
    /// is refused. All files are checked and every problem is reported.
    pub fn load(paths: &[PathBuf]) -> Result<PolicySet, PolicyErrors> {
        let found = collect_files(paths)?;
        let mut errors = Vec::new();
        for t in &found.named_tests {
            errors.push(PolicyError::file(
                t,
                "this is a policy test file, not a policy; run it with `tollgate policy test DIR`, or name the policy it tests",
            ));
        }
        let sources = read_all(&found.policies, &mut errors);
        if !errors.is_empty() {
            return Err(LocatedErrors(errors));
        }
        PolicySet::from_texts(&sources)
    }

    /// Compiles one policy text; `path` is used in messages and
    /// [`MatchedRule::file`] only.
    pub fn from_str(path: &Path, text: &str) -> Result<PolicySet, PolicyErrors> {
        PolicySet::from_texts(&[(path.to_path_buf(), text.to_owned())])
    }

    /// Compiles several policy texts as one set (rule names must be unique
    /// across them).
    pub fn from_texts(sources: &[(PathBuf, String)]) -> Result<PolicySet, PolicyErrors> {
        let mut errors = Vec::new();
        let mut files = Vec::new();
        let mut rules = Vec::new();
        let mut names: HashMap<String, String> = HashMap::new();
        let mut hasher = Sha256::new();
        for (path, text) in sources {
            hasher.update((text.len() as u64).to_le_bytes());
            hasher.update(text.as_bytes());
            match compile::compile_file(path, text) {
                Ok(file) => {
                    for (rule, at) in &file.rules {
                        if let Some(first) = names.get(&*rule.name) {
                            errors.push(PolicyError {
                                path: path.clone(),
                                line: Some(at.0),
                                column: Some(at.1),
                                message: format!(
                                    "duplicate rule name \"{}\" (first defined at {first}); rule names must be unique across all loaded policy files",
                                    rule.name
                                ),
                            });
                        } else {
                            names.insert(
                                rule.name.to_string(),
                                format!("{}:{}:{}", path.display(), at.0, at.1),
                            );
                        }
                    }
                    files.push(LoadedFile {
                        path: path.clone(),
                        defaults: file.defaults,
                    });
                    rules.extend(file.rules.into_iter().map(|(r, _)| r));
                }
                Err(mut e) => errors.append(&mut e),
            }
        }
        if !errors.is_empty() {
            return Err(LocatedErrors(errors));
        }
        let mut index = globset::GlobSetBuilder::new();
        let mut target_owner = Vec::new();
        let mut untargeted = Vec::with_capacity(rules.len());
        for (i, rule) in rules.iter().enumerate() {
            untargeted.push(rule.when.targets.is_none());
            for g in &rule.when.target_globs {
                index.add(g.clone());
                target_owner.push(i);
            }
        }
        let target_index = index.build().map_err(|e| {
            crate::located::LocatedErrors(vec![PolicyError::file(
                sources
                    .first()
                    .map_or(Path::new("policy"), |(p, _)| p.as_path()),
                format!("cannot compile the target globs of all rules together: {e}"),
            )])
        })?;
        let reads_text = rules.iter().any(|rule| {
            rule.when.text_regex.is_some()
                || rule.except.as_ref().is_some_and(|e| e.text_regex.is_some())
        });
        let masks = rules.iter().any(|rule| rule.mask.is_some());
        Ok(PolicySet {
            files,
            rules,
            digest: hex::encode(hasher.finalize()),
            target_index,
            target_owner,
            untargeted: Arc::from(untargeted),
            targets: Mutex::default(),
            generation: next_generation(),
            reads_text,
            masks,
        })
    }

    /// Distinct for every set made by this process, so a memo of
    /// decisions ([`DecisionMemo`]) can tell that the policy was reloaded.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether a rule reads the statement's text (`match.text_regex` or
    /// `except.text_regex`), so that texts of one shape may be decided
    /// differently.
    pub fn reads_text(&self) -> bool {
        self.reads_text
    }

    /// Whether a `mask` rule may apply to statements on `target` (its
    /// `match.targets`, if any, name it).
    pub fn masks_target(&self, target: &str) -> bool {
        self.masks
            && self.rules.iter().any(|rule| {
                rule.mask.is_some()
                    && rule
                        .when
                        .targets
                        .as_ref()
                        .is_none_or(|targets| targets.is_match(target))
            })
    }

    /// The lowercase names of the columns that `mask` rules for `target`
    /// hide: literals meeting them are not shown to reviewers.
    pub fn masked_column_names(&self, target: &str) -> std::collections::HashSet<String> {
        self.rules
            .iter()
            .filter(|rule| {
                rule.when
                    .targets
                    .as_ref()
                    .is_none_or(|targets| targets.is_match(target))
            })
            .filter_map(|rule| rule.mask.as_ref())
            .flat_map(|mask| mask.columns.iter().map(|c| c.column.to_lowercase()))
            .collect()
    }

    /// Hex SHA-256 over the loaded texts in load order (each prefixed by its
    /// length as a little-endian u64), for recordings: the same policy
    /// content loaded in the same order gives the same digest, wherever the
    /// files live.
    pub fn digest(&self) -> String {
        self.digest.clone()
    }

    /// The loaded files, in load order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// How many rules are loaded.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The names of the loaded rules, in load order.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| &*r.name)
    }

    /// The `description` of a loaded rule, if it has one.
    pub fn description(&self, rule: &str) -> Option<&str> {
        self.rules
            .iter()
            .find(|r| &*r.name == rule)
            .and_then(|r| r.description.as_deref())
    }

    /// What falls outside the allow-lists (`*_outside`) of `rule`'s
    /// `[rule.match]` for `req`, one note per condition; empty for an
    /// unknown rule or one without such conditions. For explanations: the
    /// decision itself does not keep it.
    pub fn outside(&self, rule: &str, req: &Request<'_>) -> Vec<OutsideNote> {
        let Some(r) = self.rules.iter().find(|r| &*r.name == rule) else {
            return Vec::new();
        };
        let subject = matcher::Subject::new(req);
        r.outside(&subject)
            .into_iter()
            .map(|(condition, outside)| OutsideNote {
                rule: rule.to_owned(),
                condition: condition.field(),
                outside,
            })
            .collect()
    }

    /// Every `review` rule's name and settings, in load order.
    pub fn review_rules(&self) -> impl Iterator<Item = (&str, &ReviewSettings)> {
        self.rules
            .iter()
            .filter_map(|r| r.review.as_deref().map(|review| (&*r.name, review)))
    }

    /// Decides one statement. No I/O, no failure; allocates only for the
    /// rules that match and the reason.
    pub fn decide(&self, req: &Request<'_>) -> Decision {
        let subject = matcher::Subject::new(req);
        let target = self.target_facts(req.target, &subject);
        let mut matched = Vec::new();
        let mut alone = None;
        let mut top: Option<Action> = None;
        for (rule, &target_ok) in self.rules.iter().zip(target.rules_ok.iter()) {
            if rule.applies(&subject, target_ok) {
                if top.is_none_or(|a| rule.action > a) {
                    top = Some(rule.action);
                }
                matched.push(MatchedRule {
                    name: Arc::clone(&rule.name),
                    action: rule.action,
                    message: rule.message.clone(),
                    file: Arc::clone(&rule.file),
                    mask: rule.mask.clone(),
                    review: rule.review.clone(),
                    on_match: rule.on_match,
                });
                alone = Some(&rule.reason_alone);
            }
        }
        if let Some(action) = top {
            let reason = match (alone, matched.len()) {
                (Some(reason), 1) => Arc::clone(reason),
                _ => Arc::from(rule_reason(action, &matched)),
            };
            return Decision {
                action,
                matched,
                default_used: false,
                reason,
            };
        }
        let (action, reason) = match req.statement {
            Statement::Parsed(_) => (target.default_action, Arc::clone(&target.default_reason)),
            Statement::Unparsable { error, .. } => {
                let action = self.default_for(req.target, true).action;
                let reason = format!(
                    "the statement could not be parsed ({}), no rule matched, and unparsable statements on target \"{}\" default to {action}",
                    one_line(error),
                    req.target,
                );
                (action, Arc::from(reason))
            }
        };
        Decision {
            action,
            matched,
            default_used: true,
            reason,
        }
    }

    /// What depends on `target` alone, made on its first statement.
    fn target_facts(&self, target: &str, subject: &matcher::Subject<'_>) -> Arc<TargetFacts> {
        let mut cache = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(facts) = cache.get(target) {
            return Arc::clone(facts);
        }
        let rules_ok = if self.target_index.is_empty() {
            Arc::clone(&self.untargeted)
        } else {
            let mut ok = self.untargeted.to_vec();
            for glob in self.target_index.matches_candidate(subject.target()) {
                if let Some(rule_ok) = self
                    .target_owner
                    .get(glob)
                    .and_then(|&rule| ok.get_mut(rule))
                {
                    *rule_ok = true;
                }
            }
            Arc::from(ok)
        };
        let default_action = self.default_for(target, false).action;
        let facts = Arc::new(TargetFacts {
            rules_ok,
            default_action,
            default_reason: Arc::from(format!(
                "no rule matched, and the default for target \"{target}\" is {default_action}"
            )),
        });
        if cache.len() < MAX_CACHED_TARGETS {
            cache.insert(Box::from(target), Arc::clone(&facts));
        }
        facts
    }

    /// Decides every statement of one analysed message (a simple Query or a
    /// Parse): one decision per statement, in order, or one for the whole
    /// text when it does not parse (empty text gives none). The message may
    /// run only if no decision [refuses](Action::is_refused) it; see
    /// [`most_restrictive`].
    pub fn decide_analysis(
        &self,
        target: &str,
        identity: &ProcessIdentity,
        text: &str,
        analysis: &Analysis,
    ) -> Vec<Decision> {
        match analysis {
            Analysis::Parsed { statements } => {
                let multi_statement = statements.len() > 1;
                statements
                    .iter()
                    .map(|s| {
                        self.decide(&Request {
                            target,
                            identity,
                            statement: Statement::Parsed(s),
                            multi_statement,
                        })
                    })
                    .collect()
            }
            Analysis::Unparsable { error } => vec![self.decide(&Request {
                target,
                identity,
                statement: Statement::Unparsable { text, error },
                multi_statement: false,
            })],
        }
    }

    /// The default for a target, and where it came from.
    fn default_for(&self, target: &str, unparsable: bool) -> DefaultChoice {
        let mut best: Option<DefaultChoice> = None;
        for file in &self.files {
            if let Some((action, source)) = file.defaults.for_target(target) {
                if best.as_ref().is_none_or(|b| action > b.action) {
                    best = Some(DefaultChoice {
                        action,
                        source: format!("{} {source}", file.path.display()),
                    });
                }
            }
        }
        let regular = best.unwrap_or_else(|| DefaultChoice {
            action: Action::Allow,
            source: "built-in default (allow)".to_owned(),
        });
        if !unparsable {
            return regular;
        }
        let mut unp: Option<DefaultChoice> = None;
        for file in &self.files {
            if let Some(action) = file.defaults.unparsable {
                if unp.as_ref().is_none_or(|b| action > b.action) {
                    unp = Some(DefaultChoice {
                        action,
                        source: format!("{} [defaults] unparsable", file.path.display()),
                    });
                }
            }
        }
        let unp = unp.unwrap_or_else(|| DefaultChoice {
            action: Action::Deny,
            source: "built-in default for unparsable statements (deny)".to_owned(),
        });
        if regular.action > unp.action {
            regular
        } else {
            unp
        }
    }
}

/// The most restrictive of several decisions (the first among equals):
/// the verdict on a message with several statements.
pub fn most_restrictive(decisions: &[Decision]) -> Option<&Decision> {
    let mut best: Option<&Decision> = None;
    for d in decisions {
        if best.is_none_or(|b| d.action > b.action) {
            best = Some(d);
        }
    }
    best
}

fn rule_reason(action: Action, matched: &[MatchedRule]) -> String {
    let mut reason = String::new();
    if let Some(rule) = matched.iter().find(|r| r.action == action) {
        reason = format!("rule \"{}\" ({})", rule.name, rule.action);
        let others: Vec<String> = matched
            .iter()
            .filter(|r| r.name != rule.name)
            .map(|r| format!("\"{}\" ({})", r.name, r.action))
            .collect();
        if !others.is_empty() {
            reason.push_str("; also matched: ");
            reason.push_str(&others.join(", "));
        }
    }
    reason
}

/// A parser message on one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Files found under the paths given on a command line or in the config.
#[derive(Debug, Default)]
struct Found {
    policies: Vec<PathBuf>,
    /// Every tests file, found in a directory or named.
    tests: Vec<PathBuf>,
    /// The tests files named directly (not found in a directory).
    named_tests: Vec<PathBuf>,
}

const TESTS_SUFFIX: &str = ".tests.toml";

fn is_tests_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(TESTS_SUFFIX))
}

/// Expands directories (not recursively) into their `*.toml` files, in name
/// order, split into policies and tests; files are taken as named. The same
/// file named twice is kept once.
fn collect_files(paths: &[PathBuf]) -> Result<Found, PolicyErrors> {
    let mut found = Found::default();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let mut add = |path: PathBuf, named: bool, found: &mut Found| {
        let key = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if seen.insert(key) {
            if is_tests_file(&path) {
                if named {
                    found.named_tests.push(path.clone());
                }
                found.tests.push(path);
            } else {
                found.policies.push(path);
            }
        }
    };
    if paths.is_empty() {
        errors.push(PolicyError::file(
            Path::new("tollgate"),
            "no policy files or directories given",
        ));
    }
    for path in paths {
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) => {
                errors.push(PolicyError::file(path, format!("cannot read: {e}")));
                continue;
            }
        };
        if !meta.is_dir() {
            add(path.clone(), true, &mut found);
            continue;
        }
        let entries = match std::fs::read_dir(path) {
            Ok(entries) => entries,
            Err(e) => {
                errors.push(PolicyError::file(
                    path,
                    format!("cannot list directory: {e}"),
                ));
                continue;
            }
        };
        let mut names: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        names.sort();
        if !names.iter().any(|p| !is_tests_file(p)) {
            errors.push(PolicyError::file(
                path,
                "no policy files (*.toml) in this directory",
            ));
        }
        for p in names {
            add(p, false, &mut found);
        }
    }
    if errors.is_empty() {
        Ok(found)
    } else {
        Err(LocatedErrors(errors))
    }
}

/// Reads files, recording an error for each that cannot be read.
fn read_all(paths: &[PathBuf], errors: &mut Vec<PolicyError>) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for path in paths {
        match std::fs::read_to_string(path) {
            Ok(text) => out.push((path.clone(), text)),
            Err(e) => errors.push(PolicyError::file(path, format!("cannot read: {e}"))),
        }
    }
    out
}
