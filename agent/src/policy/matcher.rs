//! Compiled rule conditions, and the per-request view they are matched
//! against. Everything that can be computed once per statement (kind and
//! flag bits, the target's glob candidate) is computed once in
//! [`Subject::new`]; table names are formatted only if a rule asks for them.
//! Conditions are tested cheapest first, and the first that fails stops the
//! rule.

use std::cell::OnceCell;
use std::sync::Arc;

use globset::{Candidate, GlobSet};
use regex::RegexSet;

use super::{Action, Request, ReviewSettings, Statement};
use crate::identity::{CiProvider, ProcessIdentity};
use crate::masking::MaskRule;
use crate::sql::{StatementKind, StatementSummary, TableRef};

/// Flag bit: UPDATE or DELETE without WHERE.
const NO_WHERE: u8 = 1;
/// Flag bit: one of several statements in a message.
const MULTI_STATEMENT: u8 = 1 << 1;
/// Flag bit: the text does not parse.
const UNPARSABLE: u8 = 1 << 2;
/// Flag bit: COPY ... PROGRAM.
const COPY_PROGRAM: u8 = 1 << 3;
/// Flag bit: COPY to or from a server file.
const COPY_SERVER_FILE: u8 = 1 << 4;
/// Flag bit: server file or large-object functions.
const SERVER_FILE_ACCESS: u8 = 1 << 5;
/// Flag bit: ALTER SYSTEM, set_config(), pg_reload_conf().
const CONFIG_CHANGE: u8 = 1 << 6;

/// The names accepted in `flags`, with their bits.
pub(super) const FLAG_NAMES: [(&str, u8); 7] = [
    ("no_where", NO_WHERE),
    ("multi_statement", MULTI_STATEMENT),
    ("unparsable", UNPARSABLE),
    ("copy_program", COPY_PROGRAM),
    ("copy_server_file", COPY_SERVER_FILE),
    ("server_file_access", SERVER_FILE_ACCESS),
    ("config_change", CONFIG_CHANGE),
];

/// The names accepted in `kinds` (serde names of [`StatementKind`]), for
/// error messages; parsing goes through serde so it never drifts.
pub(super) const KIND_NAMES: [&str; 23] = [
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "copy",
    "create",
    "alter",
    "drop",
    "truncate",
    "grant",
    "revoke",
    "transaction",
    "set",
    "call",
    "do",
    "prepared",
    "explain",
    "other",
    "exec",
    "shell",
    "subsystem",
    "forward",
];

/// The bit of a statement kind in a `kinds` mask.
pub(super) fn kind_bit(kind: StatementKind) -> u32 {
    // Fieldless enum with fewer than 32 variants (KIND_NAMES' test checks).
    1u32 << (kind as u32 & 31)
}

/// One compiled rule.
#[derive(Debug)]
pub(super) struct Rule {
    // Shared: every decision that matches the rule carries them.
    pub(super) name: Arc<str>,
    pub(super) action: Action,
    pub(super) message: Option<Arc<str>>,
    pub(super) description: Option<String>,
    pub(super) file: Arc<str>,
    /// The decision's reason when this rule is the only one that matched:
    /// `rule "name" (action)`, made once.
    pub(super) reason_alone: Arc<str>,
    pub(super) when: Conditions,
    pub(super) except: Option<Conditions>,
    /// A `mask` rule's columns: it applies only to statements that read a
    /// table one of them may be in.
    pub(super) mask: Option<Arc<MaskRule>>,
    /// A `review` rule's settings.
    pub(super) review: Option<Arc<ReviewSettings>>,
    /// What it does to the process when it matches.
    pub(super) on_match: Option<super::ProcessAction>,
}

impl Rule {
    /// `match` holds and `except` (if any) does not. `target_ok` is the
    /// outcome of `match`'s `targets`, looked up for all rules at once by
    /// the set's target index.
    pub(super) fn applies(&self, s: &Subject<'_>, target_ok: bool) -> bool {
        target_ok
            && self
                .mask
                .as_ref()
                .is_none_or(|m| s.statement.is_some_and(|st| m.applies_to(st)))
            // Text that does not parse may call anything: an allow-list
            // condition counts it as outside in a deny rule, and in no other
            // (an allow or audit rule applying would replace the stricter
            // unparsable default), and never excuses it in `except`.
            && self.when.matches(s, false, self.action == Action::Deny)
            && !self.except.as_ref().is_some_and(|e| e.matches(s, true, false))
    }

    /// For explanations: what fell outside each allow-list of `[rule.match]`.
    pub(super) fn outside(&self, s: &Subject<'_>) -> Vec<(OutsideCondition, Option<Vec<String>>)> {
        self.when.outside(s)
    }
}

/// An allow-list condition: it holds when the statement has a kind, table or
/// function that its list does not name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OutsideCondition {
    /// `kinds_outside`.
    Kinds,
    /// `tables_outside`: tables read or written.
    Tables,
    /// `tables_read_outside`.
    TablesRead,
    /// `tables_written_outside`.
    TablesWritten,
    /// `functions_outside`.
    Functions,
}

impl OutsideCondition {
    /// The condition's name in policy files.
    pub(super) fn field(self) -> &'static str {
        match self {
            OutsideCondition::Kinds => "kinds_outside",
            OutsideCondition::Tables => "tables_outside",
            OutsideCondition::TablesRead => "tables_read_outside",
            OutsideCondition::TablesWritten => "tables_written_outside",
            OutsideCondition::Functions => "functions_outside",
        }
    }
}

/// The conditions of one `match` (or `except`) table; `None` is absent
/// (matches anything). Every present condition must hold.
#[derive(Debug, Default)]
pub(super) struct Conditions {
    pub(super) targets: Option<GlobSet>,
    /// The globs of `targets`, for the set-wide target index.
    pub(super) target_globs: Vec<globset::Glob>,
    pub(super) users: Option<Vec<String>>,
    pub(super) uids: Option<Vec<u32>>,
    pub(super) exe: Option<GlobSet>,
    /// Lowercase hex.
    pub(super) exe_sha256: Option<Vec<String>>,
    pub(super) ancestry_contains: Option<GlobSet>,
    pub(super) cgroup: Option<GlobSet>,
    pub(super) ci_provider: Option<Vec<CiProvider>>,
    pub(super) ci_repository: Option<GlobSet>,
    pub(super) ci_branch: Option<GlobSet>,
    pub(super) ci_job: Option<GlobSet>,
    pub(super) ci_workflow: Option<GlobSet>,
    pub(super) ci_verified: Option<bool>,
    /// Mask of [`kind_bit`]s.
    pub(super) kinds: Option<u32>,
    pub(super) commands: Option<SqlNames>,
    pub(super) tables: Option<SqlNames>,
    pub(super) tables_read: Option<SqlNames>,
    pub(super) tables_written: Option<SqlNames>,
    pub(super) functions: Option<SqlNames>,
    /// Allow-lists (see [`OutsideCondition`]). `kinds_outside` is the mask
    /// of the kinds listed.
    pub(super) kinds_outside: Option<u32>,
    pub(super) tables_outside: Option<SqlNames>,
    pub(super) tables_read_outside: Option<SqlNames>,
    pub(super) tables_written_outside: Option<SqlNames>,
    pub(super) functions_outside: Option<SqlNames>,
    /// Mask of flag bits (any-of).
    pub(super) flags: Option<u8>,
    pub(super) text_regex: Option<RegexSet>,
}

/// The statement side of a request, precomputed once per statement.
pub(super) struct Subject<'a> {
    target: Candidate<'a>,
    identity: &'a ProcessIdentity,
    /// `None` for an unparsable statement.
    statement: Option<&'a StatementSummary>,
    text: &'a str,
    /// [`kind_bit`] of the statement, 0 when unparsable.
    kind: u32,
    flags: u8,
    /// Lowercase names, made when a rule first asks (see [`SqlNames`]).
    tables_read: OnceCell<Vec<String>>,
    tables_written: OnceCell<Vec<String>>,
    command: OnceCell<String>,
    functions: OnceCell<Vec<String>>,
    /// Lowercase table names as written (`orders`, `public.orders`), for
    /// allow-lists.
    read_as_written: OnceCell<Vec<String>>,
    written_as_written: OnceCell<Vec<String>>,
}

impl<'a> Subject<'a> {
    /// The target as a glob candidate.
    pub(super) fn target(&self) -> &Candidate<'a> {
        &self.target
    }

    pub(super) fn new(req: &Request<'a>) -> Subject<'a> {
        let mut flags = if req.multi_statement {
            MULTI_STATEMENT
        } else {
            0
        };
        let (statement, text, kind) = match req.statement {
            Statement::Parsed(s) => {
                let f = &s.flags;
                for (set, bit) in [
                    (f.no_where, NO_WHERE),
                    (f.copy_program, COPY_PROGRAM),
                    (f.copy_server_file, COPY_SERVER_FILE),
                    (f.server_file_access, SERVER_FILE_ACCESS),
                    (f.config_change, CONFIG_CHANGE),
                ] {
                    if set {
                        flags |= bit;
                    }
                }
                (Some(s), s.text.as_str(), kind_bit(s.kind))
            }
            Statement::Unparsable { text, .. } => {
                flags |= UNPARSABLE;
                (None, text, 0)
            }
        };
        Subject {
            target: Candidate::new(req.target),
            identity: req.identity,
            statement,
            text,
            kind,
            flags,
            tables_read: OnceCell::new(),
            tables_written: OnceCell::new(),
            command: OnceCell::new(),
            functions: OnceCell::new(),
            read_as_written: OnceCell::new(),
            written_as_written: OnceCell::new(),
        }
    }

    fn command(&self, stmt: &StatementSummary) -> &str {
        self.command.get_or_init(|| stmt.command.to_lowercase())
    }

    fn functions(&self, stmt: &StatementSummary) -> &[String] {
        self.functions
            .get_or_init(|| stmt.functions.iter().map(|f| f.to_lowercase()).collect())
    }

    fn tables_read(&self) -> &[String] {
        match self.statement {
            Some(s) => self.tables_read.get_or_init(|| table_names(&s.tables_read)),
            None => &[],
        }
    }

    fn tables_written(&self) -> &[String] {
        match self.statement {
            Some(s) => self
                .tables_written
                .get_or_init(|| table_names(&s.tables_written)),
            None => &[],
        }
    }

    fn read_as_written(&self) -> &[String] {
        match self.statement {
            Some(s) => self
                .read_as_written
                .get_or_init(|| names_as_written(&s.tables_read)),
            None => &[],
        }
    }

    fn written_as_written(&self) -> &[String] {
        match self.statement {
            Some(s) => self
                .written_as_written
                .get_or_init(|| names_as_written(&s.tables_written)),
            None => &[],
        }
    }
}

/// The names a table is matched by: its bare name, and `schema.name` when
/// the statement wrote a schema.
fn table_names(tables: &[TableRef]) -> Vec<String> {
    let mut out = Vec::with_capacity(tables.len() * 2);
    for t in tables {
        let name = t.name.to_lowercase();
        let qualified = t
            .schema
            .as_ref()
            .map(|schema| format!("{}.{name}", schema.to_lowercase()));
        out.push(name);
        out.extend(qualified);
    }
    out
}

/// Each table's name as the statement wrote it, lower case.
fn names_as_written(tables: &[TableRef]) -> Vec<String> {
    tables
        .iter()
        .map(|t| match &t.schema {
            Some(schema) => format!("{}.{}", schema.to_lowercase(), t.name.to_lowercase()),
            None => t.name.to_lowercase(),
        })
        .collect()
}

/// Whether an allow-list names a table or function as the statement wrote
/// it, or, for one qualified with `pg_catalog` (the built-in itself), by
/// its bare name. Stricter than the other conditions on purpose: a bare
/// name does not admit another schema's object of that name, so
/// `tables_outside = ["orders"]` leaves `audit.orders` outside.
fn listed(set: &SqlNames, written: &str) -> bool {
    set.is_match(written)
        || written
            .strip_prefix("pg_catalog.")
            .is_some_and(|bare| set.is_match(bare))
}

/// The names of `names` that `set` does not list.
fn unlisted<'n>(set: &'n SqlNames, names: &'n [String]) -> impl Iterator<Item = &'n String> + 'n {
    names.iter().filter(move |n| !listed(set, n))
}

/// SQL name globs (`tables`, `functions`, `commands`), compared in lower
/// case. Plain names and `prefix*` patterns, what most rules hold, are
/// compared as strings; a glob set call costs far more, and a policy asks
/// every rule about every statement.
#[derive(Debug, Default)]
pub(super) struct SqlNames {
    pub(super) exact: Vec<String>,
    pub(super) prefixes: Vec<String>,
    /// The other patterns.
    pub(super) globs: Option<GlobSet>,
}

impl SqlNames {
    /// `name` must be lower case already.
    pub(super) fn is_match(&self, name: &str) -> bool {
        self.exact.iter().any(|e| e == name)
            || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
            || self.globs.as_ref().is_some_and(|g| g.is_match(name))
    }
}

/// Any of `names` matches `set`.
fn any_name(set: &SqlNames, names: &[String]) -> bool {
    names.iter().any(|n| set.is_match(n.as_str()))
}

/// An optional string matches a glob set (absent never matches).
fn opt_glob(set: &GlobSet, value: Option<&String>) -> bool {
    value.is_some_and(|v| set.is_match(v.as_str()))
}

/// A function name matches as written (`pg_catalog.pg_read_file`) or by its
/// last component (`pg_read_file`).
fn function_matches(set: &SqlNames, name: &str) -> bool {
    set.is_match(name)
        || name
            .rsplit_once('.')
            .is_some_and(|(_, bare)| set.is_match(bare))
}

impl Conditions {
    /// No condition at all (matches every statement).
    pub(super) fn is_empty(&self) -> bool {
        let Conditions {
            targets,
            target_globs: _,
            users,
            uids,
            exe,
            exe_sha256,
            ancestry_contains,
            cgroup,
            ci_provider,
            ci_repository,
            ci_branch,
            ci_job,
            ci_workflow,
            ci_verified,
            kinds,
            commands,
            tables,
            tables_read,
            tables_written,
            functions,
            kinds_outside,
            tables_outside,
            tables_read_outside,
            tables_written_outside,
            functions_outside,
            flags,
            text_regex,
        } = self;
        targets.is_none()
            && users.is_none()
            && uids.is_none()
            && exe.is_none()
            && exe_sha256.is_none()
            && ancestry_contains.is_none()
            && cgroup.is_none()
            && ci_provider.is_none()
            && ci_repository.is_none()
            && ci_branch.is_none()
            && ci_job.is_none()
            && ci_workflow.is_none()
            && ci_verified.is_none()
            && kinds.is_none()
            && commands.is_none()
            && tables.is_none()
            && tables_read.is_none()
            && tables_written.is_none()
            && functions.is_none()
            && kinds_outside.is_none()
            && tables_outside.is_none()
            && tables_read_outside.is_none()
            && tables_written_outside.is_none()
            && functions_outside.is_none()
            && flags.is_none()
            && text_regex.is_none()
    }

    /// Every present condition holds (`targets` only if `check_targets`).
    /// Cheap bit tests first, then the target, identity, statement names,
    /// and the regex last. `unknown_outside` is what an allow-list
    /// condition says about text that does not parse.
    pub(super) fn matches(
        &self,
        s: &Subject<'_>,
        check_targets: bool,
        unknown_outside: bool,
    ) -> bool {
        if let Some(mask) = self.kinds {
            if mask & s.kind == 0 {
                return false;
            }
        }
        if let Some(mask) = self.flags {
            if mask & s.flags == 0 {
                return false;
            }
        }
        if let Some(set) = self.targets.as_ref().filter(|_| check_targets) {
            if !set.is_match_candidate(&s.target) {
                return false;
            }
        }
        if !self.identity_matches(s) {
            return false;
        }
        if !self.statement_matches(s) {
            return false;
        }
        if !self.outside_matches(s, unknown_outside) {
            return false;
        }
        if let Some(set) = &self.text_regex {
            if !set.is_match(s.text) {
                return false;
            }
        }
        true
    }

    fn identity_matches(&self, s: &Subject<'_>) -> bool {
        self.identity_holds(s.identity)
    }

    /// The identity conditions (users, uids, CI, exe, cgroup, ancestry)
    /// hold for `id`; the others are not looked at.
    pub(super) fn identity_holds(&self, id: &ProcessIdentity) -> bool {
        let ci = || id.ci.as_ref();
        if let Some(users) = &self.users {
            if !id.user.as_ref().is_some_and(|u| users.contains(u)) {
                return false;
            }
        }
        if let Some(uids) = &self.uids {
            if !id.uid.is_some_and(|u| uids.contains(&u)) {
                return false;
            }
        }
        if let Some(providers) = &self.ci_provider {
            if !ci().is_some_and(|c| providers.contains(&c.provider)) {
                return false;
            }
        }
        if let Some(verified) = self.ci_verified {
            if ci().is_none_or(|c| c.verified != verified) {
                return false;
            }
        }
        if let Some(set) = &self.ci_repository {
            if !opt_glob(set, ci().and_then(|c| c.repository.as_ref())) {
                return false;
            }
        }
        if let Some(set) = &self.ci_branch {
            if !opt_glob(set, ci().and_then(|c| c.branch.as_ref())) {
                return false;
            }
        }
        if let Some(set) = &self.ci_job {
            if !opt_glob(set, ci().and_then(|c| c.job.as_ref())) {
                return false;
            }
        }
        if let Some(set) = &self.ci_workflow {
            if !opt_glob(set, ci().and_then(|c| c.workflow.as_ref())) {
                return false;
            }
        }
        // An executable that may not be the one that connected never
        // matches (see `ProcessIdentity::exe_trusted`).
        if let Some(set) = &self.exe {
            if !id.exe_trusted() || !opt_glob(set, id.exe.as_ref()) {
                return false;
            }
        }
        if let Some(hashes) = &self.exe_sha256 {
            let Some(h) = id.exe_sha256.as_ref().filter(|_| id.exe_trusted()) else {
                return false;
            };
            if !hashes.iter().any(|x| x.eq_ignore_ascii_case(h)) {
                return false;
            }
        }
        if let Some(set) = &self.cgroup {
            if !opt_glob(set, id.cgroup.as_ref()) {
                return false;
            }
        }
        if let Some(set) = &self.ancestry_contains {
            let hit = id
                .ancestry
                .iter()
                .any(|a| set.is_match(a.comm.as_str()) || opt_glob(set, a.exe.as_ref()));
            if !hit {
                return false;
            }
        }
        true
    }

    fn statement_matches(&self, s: &Subject<'_>) -> bool {
        let needs_parse = self.commands.is_some()
            || self.tables.is_some()
            || self.tables_read.is_some()
            || self.tables_written.is_some()
            || self.functions.is_some();
        if !needs_parse {
            return true;
        }
        let Some(stmt) = s.statement else {
            return false;
        };
        if let Some(set) = &self.commands {
            if !set.is_match(s.command(stmt)) {
                return false;
            }
        }
        if let Some(set) = &self.tables {
            if !any_name(set, s.tables_read()) && !any_name(set, s.tables_written()) {
                return false;
            }
        }
        if let Some(set) = &self.tables_read {
            if !any_name(set, s.tables_read()) {
                return false;
            }
        }
        if let Some(set) = &self.tables_written {
            if !any_name(set, s.tables_written()) {
                return false;
            }
        }
        if let Some(set) = &self.functions {
            if !s.functions(stmt).iter().any(|f| function_matches(set, f)) {
                return false;
            }
        }
        true
    }

    fn has_outside(&self) -> bool {
        self.kinds_outside.is_some()
            || self.tables_outside.is_some()
            || self.tables_read_outside.is_some()
            || self.tables_written_outside.is_some()
            || self.functions_outside.is_some()
    }

    /// Every allow-list condition holds: the statement has a kind, table or
    /// function outside each list. Without an analysis, `unknown`.
    fn outside_matches(&self, s: &Subject<'_>, unknown: bool) -> bool {
        if !self.has_outside() {
            return true;
        }
        let Some(stmt) = s.statement else {
            return unknown;
        };
        if let Some(allowed) = self.kinds_outside {
            if allowed & s.kind != 0 {
                return false;
            }
        }
        // Table names are made only when a list asks for them.
        if let Some(set) = &self.tables_outside {
            if unlisted(set, s.read_as_written())
                .chain(unlisted(set, s.written_as_written()))
                .next()
                .is_none()
            {
                return false;
            }
        }
        if let Some(set) = &self.tables_read_outside {
            if unlisted(set, s.read_as_written()).next().is_none() {
                return false;
            }
        }
        if let Some(set) = &self.tables_written_outside {
            if unlisted(set, s.written_as_written()).next().is_none() {
                return false;
            }
        }
        if let Some(set) = &self.functions_outside {
            if unlisted(set, s.functions(stmt)).next().is_none() {
                return false;
            }
        }
        true
    }

    /// For each allow-list condition present, what falls outside it (empty
    /// when nothing does), or `None` when the text does not parse.
    fn outside(&self, s: &Subject<'_>) -> Vec<(OutsideCondition, Option<Vec<String>>)> {
        let mut out = Vec::new();
        let stmt = s.statement;
        let collect = |set: &SqlNames, names: &[&[String]]| -> Option<Vec<String>> {
            stmt?;
            let mut items: Vec<String> = Vec::new();
            for n in names.iter().flat_map(|n| unlisted(set, n)) {
                if !items.contains(n) {
                    items.push(n.clone());
                }
            }
            Some(items)
        };
        if let Some(allowed) = self.kinds_outside {
            let kind = stmt.map(|st| {
                if allowed & s.kind == 0 {
                    vec![st.kind.as_str().to_owned()]
                } else {
                    Vec::new()
                }
            });
            out.push((OutsideCondition::Kinds, kind));
        }
        let read = s.read_as_written();
        let written = s.written_as_written();
        if let Some(set) = &self.tables_outside {
            out.push((OutsideCondition::Tables, collect(set, &[read, written])));
        }
        if let Some(set) = &self.tables_read_outside {
            out.push((OutsideCondition::TablesRead, collect(set, &[read])));
        }
        if let Some(set) = &self.tables_written_outside {
            out.push((OutsideCondition::TablesWritten, collect(set, &[written])));
        }
        if let Some(set) = &self.functions_outside {
            let functions = stmt.map_or(&[][..], |st| s.functions(st));
            out.push((OutsideCondition::Functions, collect(set, &[functions])));
        }
        out
    }
}
