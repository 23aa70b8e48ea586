//! Policy files as written (serde with spans), and their validation into
//! compiled [`Rule`]s. Every problem is collected with its `file:line:column`;
//! a file compiles only when it has none.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use globset::{GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use regex::RegexSet;
use serde::de::{self, IntoDeserializer};
use serde::Deserialize;
use toml::Spanned;

use super::matcher::{Conditions, Rule, SqlNames, FLAG_NAMES, KIND_NAMES};
use super::review::RawReview;
use super::{Action, PolicyError, ProcessAction, ProcessActionKind, ProcessActionScope};
use crate::config::line_column;
use crate::identity::CiProvider;
use crate::located::parse_toml;
use crate::masking::{ColumnSpec, MaskMethod, MaskRule};
use crate::sql::StatementKind;

/// Longest rule name accepted.
const MAX_NAME_LEN: usize = 100;

/// The CI provider names accepted in `ci_provider`.
pub(super) const CI_PROVIDER_NAMES: [&str; 4] =
    ["github_actions", "gitlab_ci", "buildkite", "jenkins"];

/// A value or a list of values: `targets = "prod"` or
/// `targets = ["prod", "stage"]`.
pub(super) enum OneOrMany<T> {
    One(T),
    Many(Vec<Spanned<T>>),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> de::Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                let d: de::value::StrDeserializer<'_, E> = v.into_deserializer();
                T::deserialize(d).map(OneOrMany::One)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                let d: de::value::I64Deserializer<E> = v.into_deserializer();
                T::deserialize(d).map(OneOrMany::One)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                let d: de::value::BoolDeserializer<E> = v.into_deserializer();
                T::deserialize(d).map(OneOrMany::One)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<T>>()? {
                    items.push(item);
                }
                Ok(OneOrMany::Many(items))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// The items of a one-or-many value with their spans (a single value gets
/// the span of the whole value).
pub(super) fn items<T>(v: &Spanned<OneOrMany<T>>) -> Vec<(Range<usize>, &T)> {
    match v.get_ref() {
        OneOrMany::One(x) => vec![(v.span(), x)],
        OneOrMany::Many(xs) => xs.iter().map(|x| (x.span(), x.get_ref())).collect(),
    }
}

/// A TOML table kept in file order (`[defaults.targets]`).
pub(super) struct OrderedMap(pub(super) Vec<(Spanned<String>, Spanned<String>)>);

impl<'de> Deserialize<'de> for OrderedMap {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = OrderedMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of target glob = action")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<Spanned<String>, Spanned<String>>()? {
                    entries.push(entry);
                }
                Ok(OrderedMap(entries))
            }
        }
        d.deserialize_map(V)
    }
}

type List<T> = Option<Spanned<OneOrMany<T>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    defaults: Option<RawDefaults>,
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    action: Option<Spanned<String>>,
    unparsable: Option<Spanned<String>>,
    targets: Option<OrderedMap>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    action: Spanned<String>,
    message: Option<Spanned<String>>,
    #[serde(rename = "match")]
    when: Option<Spanned<RawMatch>>,
    except: Option<Spanned<RawMatch>>,
    mask_columns: List<String>,
    mask_with: Option<Spanned<String>>,
    approvers: List<String>,
    approvals: Option<Spanned<i64>>,
    timeout: Option<Spanned<String>>,
    grant: Option<Spanned<String>>,
    grant_hours: Option<Spanned<String>>,
    on_match: Option<Spanned<String>>,
    on_match_scope: Option<Spanned<String>>,
}

/// The conditions of `[rule.match]` and `[rule.except]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    targets: List<String>,
    users: List<String>,
    uids: List<i64>,
    exe: List<String>,
    exe_sha256: List<String>,
    ancestry_contains: List<String>,
    cgroup: List<String>,
    ci_provider: List<String>,
    ci_repository: List<String>,
    ci_branch: List<String>,
    ci_job: List<String>,
    ci_workflow: List<String>,
    ci_verified: Option<bool>,
    kinds: List<String>,
    commands: List<String>,
    tables: List<String>,
    tables_read: List<String>,
    tables_written: List<String>,
    functions: List<String>,
    kinds_outside: List<String>,
    tables_outside: List<String>,
    tables_read_outside: List<String>,
    tables_written_outside: List<String>,
    functions_outside: List<String>,
    flags: List<String>,
    text_regex: List<String>,
}

/// Per-file defaults, compiled.
#[derive(Debug, Default)]
pub(super) struct FileDefaults {
    /// `[defaults] action`.
    pub(super) action: Option<Action>,
    /// `[defaults] unparsable`.
    pub(super) unparsable: Option<Action>,
    /// `[defaults.targets]`, in file order.
    pub(super) targets: Vec<TargetDefault>,
}

/// One `[defaults.targets]` entry.
#[derive(Debug)]
pub(super) struct TargetDefault {
    pub(super) pattern: String,
    /// The pattern has no glob metacharacter.
    exact: bool,
    matcher: GlobMatcher,
    pub(super) action: Action,
}

impl FileDefaults {
    /// This file's default for a target and where it is written: an exact
    /// name first, then the first matching glob, then `[defaults] action`.
    pub(super) fn for_target(&self, target: &str) -> Option<(Action, String)> {
        let entry = self
            .targets
            .iter()
            .find(|t| t.exact && t.pattern == target)
            .or_else(|| {
                self.targets
                    .iter()
                    .find(|t| !t.exact && t.matcher.is_match(target))
            });
        match (entry, self.action) {
            (Some(t), _) => Some((t.action, format!("[defaults.targets] \"{}\"", t.pattern))),
            (None, Some(a)) => Some((a, "[defaults] action".to_owned())),
            (None, None) => None,
        }
    }
}

/// A compiled file: its defaults, and its rules with the (line, column) of
/// each name.
pub(super) struct CompiledFile {
    pub(super) defaults: FileDefaults,
    pub(super) rules: Vec<(Rule, (usize, usize))>,
}

/// Collects errors with their place in one file.
pub(super) struct Checker<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
    pub(super) errors: Vec<PolicyError>,
}

impl<'a> Checker<'a> {
    pub(super) fn new(path: &'a Path, text: &'a str) -> Checker<'a> {
        Checker {
            path,
            text,
            errors: Vec::new(),
        }
    }

    pub(super) fn position(&self, offset: usize) -> (usize, usize) {
        line_column(self.text, offset)
    }

    pub(super) fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.errors.push(PolicyError {
            path: self.path.to_path_buf(),
            line: Some(line),
            column: Some(column),
            message: message.into(),
        });
    }

    /// A rule's `mask_columns` and `mask_with`: required (the columns) for
    /// `action = "mask"`, refused for any other action.
    fn mask(&mut self, r: &RawRule, action: Option<Action>) -> Option<Arc<MaskRule>> {
        if action != Some(Action::Mask) {
            if action.is_some() {
                if let Some(v) = &r.mask_columns {
                    self.at(
                        v.span(),
                        "`mask_columns` belongs only to rules with action = \"mask\"",
                    );
                }
                if let Some(v) = &r.mask_with {
                    self.at(
                        v.span(),
                        "`mask_with` belongs only to rules with action = \"mask\"",
                    );
                }
            }
            return None;
        }
        let Some(list) = &r.mask_columns else {
            self.at(
                r.action.span(),
                "a mask rule needs `mask_columns`, the columns it masks (`[\"customers.email\"]`)",
            );
            return None;
        };
        let mut columns = Vec::new();
        for (span, spec) in items(list) {
            match ColumnSpec::parse(spec) {
                Ok(c) => columns.push(c),
                Err(e) => self.at(span, e),
            }
        }
        if columns.is_empty() {
            self.at(
                list.span(),
                "empty `mask_columns`; name the columns to mask",
            );
        }
        let with = match &r.mask_with {
            None => MaskMethod::Redact,
            Some(v) => match MaskMethod::from_name(v.get_ref()) {
                Some(m) => m,
                None => {
                    self.at(
                        v.span(),
                        format!(
                            "invalid mask_with \"{}\"; expected redact or null",
                            v.get_ref()
                        ),
                    );
                    MaskMethod::Redact
                }
            },
        };
        Some(Arc::new(MaskRule { columns, with }))
    }

    pub(super) fn action(&mut self, v: &Spanned<String>, what: &str) -> Option<Action> {
        let a = Action::from_name(v.get_ref());
        if a.is_none() {
            self.at(
                v.span(),
                format!(
                    "invalid {what} \"{}\"; expected one of allow, audit, mask, review, deny",
                    v.get_ref()
                ),
            );
        }
        a
    }

    /// The items of a list condition, refusing an empty list.
    fn list<'v, T>(&mut self, field: &str, v: &'v List<T>) -> Option<Vec<(Range<usize>, &'v T)>> {
        let v = v.as_ref()?;
        let list = items(v);
        if list.is_empty() {
            self.at(
                v.span(),
                format!(
                    "`{field}` is an empty list, which never matches; remove it to match anything"
                ),
            );
            return None;
        }
        Some(list)
    }

    fn globs(&mut self, field: &str, v: &List<String>, style: GlobStyle) -> Option<GlobSet> {
        self.glob_list(field, v, style).map(|(set, _)| set)
    }

    /// The compiled set, and the globs in it (for indexes across rules).
    fn glob_list(
        &mut self,
        field: &str,
        v: &List<String>,
        style: GlobStyle,
    ) -> Option<(GlobSet, Vec<globset::Glob>)> {
        let list = self.list(field, v)?;
        let mut set = GlobSetBuilder::new();
        let mut globs = Vec::new();
        let mut ok = true;
        for (span, pattern) in &list {
            match glob(pattern, style) {
                Ok(g) => {
                    set.add(g.clone());
                    globs.push(g);
                }
                Err(e) => {
                    self.at(span.clone(), format!("bad glob in `{field}`: {e}"));
                    ok = false;
                }
            }
        }
        if !ok {
            return None;
        }
        match set.build() {
            Ok(set) => Some((set, globs)),
            Err(e) => {
                let start = list.first().map_or(0, |(s, _)| s.start);
                self.at(
                    start..start,
                    format!("cannot compile the globs of `{field}`: {e}"),
                );
                None
            }
        }
    }

    /// SQL name globs: validated as globs, then split into plain names,
    /// `prefix*` patterns and the rest (see [`SqlNames`]).
    fn sql_names(&mut self, field: &str, v: &List<String>) -> Option<SqlNames> {
        // Compiling the whole list reports every bad pattern at its place.
        self.glob_list(field, v, GlobStyle::Sql)?;
        let mut names = SqlNames::default();
        let mut others = GlobSetBuilder::new();
        let mut any_other = false;
        for (span, pattern) in self.list(field, v)? {
            let lower = pattern.to_lowercase();
            if !glob_metachar(&lower) {
                names.exact.push(lower);
            } else if let Some(prefix) = lower.strip_suffix('*').filter(|p| !glob_metachar(p)) {
                names.prefixes.push(prefix.to_owned());
            } else {
                // Compiled once already above; an error is still reported,
                // so the rule is refused rather than left without the
                // condition.
                match glob(pattern, GlobStyle::Sql) {
                    Ok(g) => {
                        others.add(g);
                        any_other = true;
                    }
                    Err(e) => {
                        self.at(span, format!("bad glob in `{field}`: {e}"));
                        return None;
                    }
                }
            }
        }
        if any_other {
            match others.build() {
                Ok(set) => names.globs = Some(set),
                Err(e) => {
                    self.at(0..0, format!("cannot compile the globs of `{field}`: {e}"));
                    return None;
                }
            }
        }
        Some(names)
    }

    fn strings(&mut self, field: &str, v: &List<String>) -> Option<Vec<String>> {
        let list = self.list(field, v)?;
        let mut out = Vec::new();
        for (span, s) in list {
            if s.is_empty() {
                self.at(span, format!("empty value in `{field}`"));
            }
            out.push(s.clone());
        }
        Some(out)
    }

    fn uids(&mut self, v: &List<i64>) -> Option<Vec<u32>> {
        let list = self.list("uids", v)?;
        let mut out = Vec::new();
        for (span, n) in list {
            match u32::try_from(*n) {
                Ok(uid) => out.push(uid),
                Err(_) => self.at(span, format!("uid {n} is out of range (0 to 4294967295)")),
            }
        }
        Some(out)
    }

    fn hashes(&mut self, v: &List<String>) -> Option<Vec<String>> {
        let list = self.list("exe_sha256", v)?;
        let mut out = Vec::new();
        for (span, h) in list {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                self.at(
                    span,
                    format!("exe_sha256 \"{h}\" is not a SHA-256 (64 hexadecimal digits)"),
                );
            }
            out.push(h.to_ascii_lowercase());
        }
        Some(out)
    }

    fn providers(&mut self, v: &List<String>) -> Option<Vec<CiProvider>> {
        let list = self.list("ci_provider", v)?;
        let mut out = Vec::new();
        for (span, name) in list {
            let d: de::value::StrDeserializer<'_, de::value::Error> =
                name.as_str().into_deserializer();
            match CiProvider::deserialize(d) {
                Ok(p) => out.push(p),
                Err(_) => self.at(
                    span,
                    format!(
                        "unknown ci_provider \"{name}\"; expected one of {}",
                        CI_PROVIDER_NAMES.join(", ")
                    ),
                ),
            }
        }
        Some(out)
    }

    fn kinds(&mut self, v: &List<String>) -> Option<u32> {
        let list = self.list("kinds", v)?;
        let mut mask = 0u32;
        for (span, name) in list {
            let d: de::value::StrDeserializer<'_, de::value::Error> =
                name.as_str().into_deserializer();
            match StatementKind::deserialize(d) {
                Ok(k) => mask |= super::matcher::kind_bit(k),
                Err(_) => self.at(
                    span,
                    format!(
                        "unknown statement kind \"{name}\"; expected one of {}",
                        KIND_NAMES.join(", ")
                    ),
                ),
            }
        }
        Some(mask)
    }

    /// An allow-list's items; an empty list is refused, naming the rule.
    fn outside_list<'v>(
        &mut self,
        field: &str,
        v: &'v List<String>,
        rule: &str,
    ) -> Option<Vec<(Range<usize>, &'v String)>> {
        let v = v.as_ref()?;
        let list = items(v);
        if list.is_empty() {
            self.at(
                v.span(),
                format!(
                    "`{field}` of rule \"{rule}\" is an empty list, which would count every {what} as outside it; list what is allowed, or use `{plain} = [\"*\"]` to match any {what}",
                    what = match field {
                        "kinds_outside" => "statement",
                        "functions_outside" => "function call",
                        _ => "table",
                    },
                    plain = field.strip_suffix("_outside").unwrap_or(field),
                ),
            );
            return None;
        }
        Some(list)
    }

    /// A name allow-list (`tables_outside`, `functions_outside`, ...).
    fn outside_names(&mut self, field: &str, v: &List<String>, rule: &str) -> Option<SqlNames> {
        self.outside_list(field, v, rule)?;
        let before = self.errors.len();
        let names = self.sql_names(field, v);
        // The glob errors are shared with the other conditions: name the
        // rule here too, as every allow-list error does.
        for e in self.errors.iter_mut().skip(before) {
            e.message.push_str(&format!(" (rule \"{rule}\")"));
        }
        names
    }

    /// `kinds_outside`: the mask of the kinds listed.
    fn kinds_outside(&mut self, v: &List<String>, rule: &str) -> Option<u32> {
        let list = self.outside_list("kinds_outside", v, rule)?;
        let mut mask = 0u32;
        let mut ok = true;
        for (span, name) in list {
            let d: de::value::StrDeserializer<'_, de::value::Error> =
                name.as_str().into_deserializer();
            match StatementKind::deserialize(d) {
                Ok(k) => mask |= super::matcher::kind_bit(k),
                Err(_) => {
                    ok = false;
                    self.at(
                        span,
                        format!(
                            "unknown statement kind \"{name}\" in `kinds_outside` of rule \"{rule}\"; expected one of {}",
                            KIND_NAMES.join(", ")
                        ),
                    );
                }
            }
        }
        let every = KIND_NAMES.iter().fold(0u32, |m, name| {
            let d: de::value::StrDeserializer<'_, de::value::Error> = name.into_deserializer();
            StatementKind::deserialize(d).map_or(m, |k| m | super::matcher::kind_bit(k))
        });
        if ok && mask == every {
            if let Some(v) = v {
                self.at(
                    v.span(),
                    format!(
                        "`kinds_outside` of rule \"{rule}\" lists every statement kind, so it never matches; remove a kind or the condition"
                    ),
                );
            }
        }
        Some(mask)
    }

    fn flags(&mut self, v: &List<String>) -> Option<u8> {
        let list = self.list("flags", v)?;
        let mut mask = 0u8;
        for (span, name) in list {
            match FLAG_NAMES.iter().find(|(n, _)| *n == name.as_str()) {
                Some((_, bit)) => mask |= bit,
                None => self.at(
                    span,
                    format!(
                        "unknown flag \"{name}\"; expected one of {}",
                        FLAG_NAMES.map(|(n, _)| n).join(", ")
                    ),
                ),
            }
        }
        Some(mask)
    }

    fn regexes(&mut self, v: &List<String>) -> Option<RegexSet> {
        let list = self.list("text_regex", v)?;
        let mut ok = true;
        for (span, pattern) in &list {
            if let Err(e) = regex::Regex::new(pattern) {
                self.at(
                    span.clone(),
                    format!("bad regex in `text_regex`: {}", regex_error(&e)),
                );
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        match RegexSet::new(list.iter().map(|(_, p)| p.as_str())) {
            Ok(set) => Some(set),
            Err(e) => {
                let start = list.first().map_or(0, |(s, _)| s.start);
                self.at(
                    start..start,
                    format!("bad regex in `text_regex`: {}", regex_error(&e)),
                );
                None
            }
        }
    }

    /// A rule's `on_match` and `on_match_scope`.
    fn on_match(&mut self, r: &RawRule) -> Option<ProcessAction> {
        let scope = match &r.on_match_scope {
            None => ProcessActionScope::Process,
            Some(s) if r.on_match.is_none() => {
                self.at(
                    s.span(),
                    "on_match_scope needs on_match = \"stop\" or \"kill\"",
                );
                return None;
            }
            Some(s) => match s.get_ref().as_str() {
                "process" => ProcessActionScope::Process,
                "job" => ProcessActionScope::Job,
                other => {
                    self.at(
                        s.span(),
                        format!("on_match_scope = \"{other}\" is not known; use process or job"),
                    );
                    return None;
                }
            },
        };
        let kind = match r.on_match.as_ref()?.get_ref().as_str() {
            "stop" => ProcessActionKind::Stop,
            "kill" => ProcessActionKind::Kill,
            other => {
                let span = r.on_match.as_ref().map_or(0..0, |m| m.span());
                self.at(
                    span,
                    format!("on_match = \"{other}\" is not known; use stop or kill"),
                );
                return None;
            }
        };
        Some(ProcessAction { kind, scope })
    }

    fn conditions(&mut self, m: &RawMatch, rule: &str) -> Conditions {
        let (targets, target_globs) = match self.glob_list("targets", &m.targets, GlobStyle::Name) {
            Some((set, globs)) => (Some(set), globs),
            None => (None, Vec::new()),
        };
        Conditions {
            targets,
            target_globs,
            users: self.strings("users", &m.users),
            uids: self.uids(&m.uids),
            exe: self.globs("exe", &m.exe, GlobStyle::Path),
            exe_sha256: self.hashes(&m.exe_sha256),
            ancestry_contains: self.globs(
                "ancestry_contains",
                &m.ancestry_contains,
                GlobStyle::Path,
            ),
            cgroup: self.globs("cgroup", &m.cgroup, GlobStyle::Path),
            ci_provider: self.providers(&m.ci_provider),
            ci_repository: self.globs("ci_repository", &m.ci_repository, GlobStyle::Name),
            ci_branch: self.globs("ci_branch", &m.ci_branch, GlobStyle::Name),
            ci_job: self.globs("ci_job", &m.ci_job, GlobStyle::Name),
            ci_workflow: self.globs("ci_workflow", &m.ci_workflow, GlobStyle::Name),
            ci_verified: m.ci_verified,
            kinds: self.kinds(&m.kinds),
            commands: self.sql_names("commands", &m.commands),
            tables: self.sql_names("tables", &m.tables),
            tables_read: self.sql_names("tables_read", &m.tables_read),
            tables_written: self.sql_names("tables_written", &m.tables_written),
            functions: self.sql_names("functions", &m.functions),
            kinds_outside: self.kinds_outside(&m.kinds_outside, rule),
            tables_outside: self.outside_names("tables_outside", &m.tables_outside, rule),
            tables_read_outside: self.outside_names(
                "tables_read_outside",
                &m.tables_read_outside,
                rule,
            ),
            tables_written_outside: self.outside_names(
                "tables_written_outside",
                &m.tables_written_outside,
                rule,
            ),
            functions_outside: self.outside_names("functions_outside", &m.functions_outside, rule),
            flags: self.flags(&m.flags),
            text_regex: self.regexes(&m.text_regex),
        }
    }
}

/// How a glob treats `/` and case.
#[derive(Debug, Clone, Copy)]
pub(super) enum GlobStyle {
    /// Names (targets, CI repository/branch/job): `*` matches `/` too;
    /// case-sensitive.
    Name,
    /// Paths (exe, cgroup, ancestry): `*` stops at `/`, `**` crosses it;
    /// case-sensitive.
    Path,
    /// SQL names (tables, functions, commands): case-insensitive (both
    /// sides compared in lower case).
    Sql,
}

pub(super) fn glob(pattern: &str, style: GlobStyle) -> Result<globset::Glob, String> {
    if pattern.is_empty() {
        return Err("empty pattern".to_owned());
    }
    // SQL names are compared in lower case (the matcher lowercases them
    // too) rather than with a case-insensitive glob: globset runs those as
    // regular expressions, while a plain name or prefix glob is a literal
    // search, several times faster for every rule on every statement.
    let lowered;
    let source = if matches!(style, GlobStyle::Sql) {
        lowered = pattern.to_lowercase();
        lowered.as_str()
    } else {
        pattern
    };
    GlobBuilder::new(source)
        .literal_separator(matches!(style, GlobStyle::Path))
        .backslash_escape(true)
        .build()
        .map_err(|e| match e.kind() {
            globset::ErrorKind::InvalidRecursive => {
                format!("\"{pattern}\": `**` must be a whole path component (`a/**/b`)")
            }
            kind => format!("\"{pattern}\": {kind}"),
        })
}

/// A regex error on one line (the crate's syntax errors span several lines
/// with a caret diagram; keep the "error: ..." part).
fn regex_error(e: &regex::Error) -> String {
    let text = e.to_string();
    match text.lines().find_map(|l| l.trim().strip_prefix("error: ")) {
        Some(msg) => msg.to_owned(),
        None => text.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

fn glob_metachar(pattern: &str) -> bool {
    pattern.contains(['*', '?', '[', '{', '\\'])
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        && name.len() <= MAX_NAME_LEN
}

/// Compiles one policy file.
pub(super) fn compile_file(path: &Path, text: &str) -> Result<CompiledFile, Vec<PolicyError>> {
    let raw: RawPolicy = parse_toml(path, text).map_err(|e| vec![e])?;
    let mut c = Checker::new(path, text);
    let file = path.display().to_string();

    let mut defaults = FileDefaults::default();
    if let Some(d) = &raw.defaults {
        defaults.action = d
            .action
            .as_ref()
            .and_then(|a| c.action(a, "default action"));
        defaults.unparsable = d
            .unparsable
            .as_ref()
            .and_then(|a| c.action(a, "unparsable default"));
        for (pattern, action) in d.targets.iter().flat_map(|m| m.0.iter()) {
            let action = c.action(action, "target default");
            match glob(pattern.get_ref(), GlobStyle::Name) {
                Ok(g) => {
                    if let Some(action) = action {
                        defaults.targets.push(TargetDefault {
                            pattern: pattern.get_ref().clone(),
                            exact: !glob_metachar(pattern.get_ref()),
                            matcher: g.compile_matcher(),
                            action,
                        });
                    }
                }
                Err(e) => c.at(pattern.span(), format!("bad target glob: {e}")),
            }
        }
    }

    let mut rules = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for r in &raw.rule {
        let name = r.name.get_ref();
        let at = c.position(r.name.span().start);
        if !valid_name(name) {
            c.at(
                r.name.span(),
                format!(
                    "invalid rule name \"{name}\": use 1 to {MAX_NAME_LEN} letters, digits, '-', '_', '.' or ':', starting with a letter or digit"
                ),
            );
        } else if let Some((l, col)) = seen.get(name) {
            c.at(
                r.name.span(),
                format!(
                    "duplicate rule name \"{name}\" (first defined at {}:{l}:{col}); rule names must be unique across all loaded policy files",
                    path.display()
                ),
            );
        } else {
            seen.insert(name.clone(), at);
        }
        let action = c.action(&r.action, "action");
        let message = r.message.as_ref().map(|m| {
            if m.get_ref().trim().is_empty() {
                c.at(m.span(), "empty message; remove it or say why");
            }
            Arc::from(m.get_ref().as_str())
        });
        let when = match &r.when {
            Some(m) => c.conditions(m.get_ref(), name),
            None => c.conditions(&RawMatch::default(), name),
        };
        let except = match &r.except {
            Some(m) => {
                let before = c.errors.len();
                let cond = c.conditions(m.get_ref(), name);
                // A condition refused above leaves the table looking empty.
                if cond.is_empty() && c.errors.len() == before {
                    c.at(
                        m.span(),
                        "an empty `[rule.except]` would exclude every statement; give it conditions or remove it",
                    );
                }
                Some(cond)
            }
            None => None,
        };
        let mask = c.mask(r, action);
        let review = c
            .review(
                RawReview {
                    approvers: &r.approvers,
                    approvals: &r.approvals,
                    timeout: &r.timeout,
                    grant: &r.grant,
                    grant_hours: &r.grant_hours,
                },
                r.action.span(),
                action.map(|a| a == Action::Review),
            )
            .map(Arc::new);
        let on_match = c.on_match(r);
        if let Some(action) = action {
            rules.push((
                Rule {
                    name: Arc::from(name.as_str()),
                    action,
                    message,
                    description: r.description.clone(),
                    file: Arc::from(file.as_str()),
                    reason_alone: Arc::from(format!("rule \"{name}\" ({action})")),
                    when,
                    except,
                    mask,
                    review,
                    on_match,
                },
                at,
            ));
        }
    }

    if c.errors.is_empty() {
        Ok(CompiledFile { defaults, rules })
    } else {
        Err(c.errors)
    }
}
