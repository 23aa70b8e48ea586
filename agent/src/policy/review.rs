//! A `review` rule's settings: who may approve, how many approvals it takes,
//! how long a held statement waits, and what an approval may cover.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::compile::{items, Checker, OneOrMany};

/// How long a held statement waits when the rule says nothing.
pub const DEFAULT_REVIEW_TIMEOUT: Duration = Duration::from_secs(600);
/// The shortest and longest `timeout` accepted: a reviewer needs time to
/// read, and a client should not hang for more than a day.
const REVIEW_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_secs(10), Duration::from_secs(24 * 3600));
/// The most approvals a rule may require.
pub const MAX_APPROVALS: u32 = 16;
/// The longest grant a rule may allow: grants are for a working session or
/// a release, not standing permissions.
pub const MAX_GRANT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Who may approve: `"group:NAME"` (a Unix group, members looked up when
/// the reviewer acts) or `"reviewers:NAME"` (a `[reviewers.NAME]` group of
/// the agent configuration).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Approver {
    /// A Unix group.
    UnixGroup(String),
    /// A named reviewer group of the agent configuration.
    Reviewers(String),
}

impl Approver {
    /// Parses `group:dba` or `reviewers:oncall`.
    pub fn parse(text: &str) -> Result<Approver, String> {
        let valid = |name: &str| {
            !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        match text.split_once(':') {
            Some(("group", name)) if valid(name) => Ok(Approver::UnixGroup(name.to_owned())),
            Some(("reviewers", name)) if valid(name) => Ok(Approver::Reviewers(name.to_owned())),
            _ => Err(format!(
                "invalid approver \"{text}\"; write \"group:NAME\" for a Unix group or \"reviewers:NAME\" for a [reviewers.NAME] group of the agent configuration"
            )),
        }
    }
}

impl fmt::Display for Approver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Approver::UnixGroup(name) => write!(f, "group:{name}"),
            Approver::Reviewers(name) => write!(f, "reviewers:{name}"),
        }
    }
}

/// What one approval may cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantScope {
    /// The held statement only.
    Statement,
    /// The held statement, or a grant for the same statement shape,
    /// identity and target lasting at most this long.
    UpTo(#[serde(with = "seconds")] Duration),
}

mod seconds {
    pub(super) fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<std::time::Duration, D::Error> {
        <u64 as serde::Deserialize>::deserialize(d).map(std::time::Duration::from_secs)
    }
}

/// A `review` rule's settings, compiled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewSettings {
    /// Groups whose members may approve (any of them).
    pub approvers: Vec<Approver>,
    /// Distinct approvals required.
    pub approvals: u32,
    /// How long the statement is held before it expires.
    #[serde(with = "seconds")]
    pub timeout: Duration,
    /// What an approval may cover.
    pub grant: GrantScope,
    /// The hours of the day, in the host's local time, when a grant given
    /// under this rule may be used (`grant_hours = "09:00-18:00"`); outside
    /// them a statement the grant would cover is held again.
    pub grant_hours: Option<DailyWindow>,
}

/// A window of the day in the host's local time, `HH:MM-HH:MM`, start
/// included and end excluded; a window whose end is before its start
/// spans midnight (`22:00-06:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailyWindow {
    /// Minutes after midnight when the window opens.
    start: u16,
    /// Minutes after midnight when it closes.
    end: u16,
}

impl DailyWindow {
    /// Parses `09:00-18:00`.
    pub fn parse(text: &str) -> Result<DailyWindow, String> {
        let invalid = || {
            format!(
                "invalid hours \"{text}\"; give a daily window in the host's local time as HH:MM-HH:MM, such as \"09:00-18:00\""
            )
        };
        let minute_of = |part: &str| -> Option<u16> {
            let (h, m) = part.trim().split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            // 24:00 closes a window at midnight.
            let valid = (h < 24 && m < 60) || (h == 24 && m == 0);
            valid.then_some(h * 60 + m)
        };
        let (start, end) = text.split_once('-').ok_or_else(invalid)?;
        let (start, end) = (
            minute_of(start).ok_or_else(invalid)?,
            minute_of(end).ok_or_else(invalid)?,
        );
        if start == end || start == 24 * 60 {
            return Err(format!(
                "invalid hours \"{text}\"; the window must not be empty (for all day, leave grant_hours out)"
            ));
        }
        Ok(DailyWindow { start, end })
    }

    /// Whether the minute of the day `minute` (0..1440) is inside.
    pub fn contains(&self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

impl fmt::Display for DailyWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

impl Serialize for DailyWindow {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DailyWindow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DailyWindow, D::Error> {
        let text = String::deserialize(d)?;
        DailyWindow::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The review settings of a rule as written.
pub(super) struct RawReview<'a> {
    pub(super) approvers: &'a Option<Spanned<OneOrMany<String>>>,
    pub(super) approvals: &'a Option<Spanned<i64>>,
    pub(super) timeout: &'a Option<Spanned<String>>,
    pub(super) grant: &'a Option<Spanned<String>>,
    pub(super) grant_hours: &'a Option<Spanned<String>>,
}

impl Checker<'_> {
    /// A rule's review settings: `approvers` required for `action =
    /// "review"`, and every review setting refused for any other action.
    pub(super) fn review(
        &mut self,
        raw: RawReview<'_>,
        action_span: std::ops::Range<usize>,
        is_review: Option<bool>,
    ) -> Option<ReviewSettings> {
        match is_review {
            None => return None,
            Some(false) => {
                let spans = [
                    ("approvers", raw.approvers.as_ref().map(|v| v.span())),
                    ("approvals", raw.approvals.as_ref().map(|v| v.span())),
                    ("timeout", raw.timeout.as_ref().map(|v| v.span())),
                    ("grant", raw.grant.as_ref().map(|v| v.span())),
                    ("grant_hours", raw.grant_hours.as_ref().map(|v| v.span())),
                ];
                for (field, span) in spans {
                    if let Some(span) = span {
                        self.at(
                            span,
                            format!("`{field}` belongs only to rules with action = \"review\""),
                        );
                    }
                }
                return None;
            }
            Some(true) => {}
        }
        let mut approvers = Vec::new();
        match raw.approvers {
            None => self.at(
                action_span,
                "a review rule needs `approvers`, the groups whose members may approve ([\"group:dba\"])",
            ),
            Some(list) => {
                for (span, text) in items(list) {
                    match Approver::parse(text) {
                        Ok(a) if approvers.contains(&a) => {
                            self.at(span, format!("approver \"{text}\" is listed twice"))
                        }
                        Ok(a) => approvers.push(a),
                        Err(e) => self.at(span, e),
                    }
                }
                if items(list).is_empty() {
                    self.at(
                        list.span(),
                        "empty `approvers`; name the groups whose members may approve",
                    );
                }
            }
        }
        let approvals = match raw.approvals {
            None => 1,
            Some(n) => match u32::try_from(*n.get_ref()) {
                Ok(v) if (1..=MAX_APPROVALS).contains(&v) => v,
                _ => {
                    self.at(
                        n.span(),
                        format!("approvals must be between 1 and {MAX_APPROVALS}"),
                    );
                    1
                }
            },
        };
        let (low, high) = REVIEW_TIMEOUT_RANGE;
        let timeout = match raw.timeout {
            None => DEFAULT_REVIEW_TIMEOUT,
            Some(t) => match humantime::parse_duration(t.get_ref()) {
                Ok(d) if (low..=high).contains(&d) => d,
                _ => {
                    self.at(
                        t.span(),
                        format!(
                            "invalid timeout \"{}\"; give a duration between 10s and 24h, such as \"10m\"",
                            t.get_ref()
                        ),
                    );
                    DEFAULT_REVIEW_TIMEOUT
                }
            },
        };
        let grant = match raw.grant {
            None => GrantScope::Statement,
            Some(g) if g.get_ref() == "statement" => GrantScope::Statement,
            Some(g) => match humantime::parse_duration(g.get_ref()) {
                Ok(d) if !d.is_zero() && d <= MAX_GRANT => GrantScope::UpTo(d),
                _ => {
                    self.at(
                        g.span(),
                        format!(
                            "invalid grant \"{}\"; use \"statement\" (the held statement only) or the longest grant an approval may give, up to 7d, such as \"1h\"",
                            g.get_ref()
                        ),
                    );
                    GrantScope::Statement
                }
            },
        };
        let grant_hours = match raw.grant_hours {
            None => None,
            Some(h) if grant == GrantScope::Statement => {
                self.at(
                    h.span(),
                    "`grant_hours` limits when grants may be used, and this rule gives none; set `grant` to the longest grant an approval may give, such as \"8h\"",
                );
                None
            }
            Some(h) => match DailyWindow::parse(h.get_ref()) {
                Ok(w) => Some(w),
                Err(e) => {
                    self.at(h.span(), e);
                    None
                }
            },
        };
        Some(ReviewSettings {
            approvers,
            approvals,
            timeout,
            grant,
            grant_hours,
        })
    }
}
