//! The configuration file exactly as written, and its validation.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::located::{parse_toml, LocatedErrors};

use crate::policy::{IdentityMatch, IdentitySpec};

use super::{
    line_column, secret, AgentSettings, BrokeredCredential, ClientCertificate, ClientCredentials,
    ClientTls, Config, ConfigError, ConfigErrors, GovernedCgroup, HostPaths, Listener, NotifyKind,
    NotifyTarget, ObjectLock, ObjectLockMode, PolicyOrigin, PolicySourceSettings, PortRange,
    ProtectMode, ProtectSettings, Protocol, RecordingFailure, RecordingFsync, RedirectSettings,
    S3Access, SharedApprovalsSettings, Target, TargetAddress, TargetSet, UnlistedPolicy,
    UploadSettings, Upstream, UpstreamTls,
};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    target: Vec<RawTarget>,
    #[serde(default)]
    listener: Vec<RawListener>,
    #[serde(default)]
    cgroup: Vec<RawCgroup>,
    redirect: Option<RawRedirect>,
    #[serde(default)]
    reviewers: std::collections::BTreeMap<String, Spanned<RawReviewers>>,
    protect: Option<Spanned<RawProtect>>,
    #[serde(default)]
    notify: Vec<Spanned<RawNotify>>,
    upload: Option<Spanned<RawUpload>>,
    policy_source: Option<Spanned<RawPolicySource>>,
    shared_approvals: Option<Spanned<RawSharedApprovals>>,
}

/// `[shared_approvals]`: review requests in a PostgreSQL database every
/// agent of the fleet and the review server share.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSharedApprovals {
    database: Spanned<String>,
    password_file: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
}

/// `[policy_source]`: the policy from a bucket or a git repository.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicySource {
    s3: Option<Spanned<String>>,
    endpoint: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    access_key_id: Option<Spanned<String>>,
    secret_access_key_file: Option<Spanned<String>>,
    git: Option<Spanned<String>>,
    branch: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    dir: Option<Spanned<String>>,
}

/// `[upload]`: recordings to S3-compatible object storage.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpload {
    bucket: Spanned<String>,
    endpoint: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    access_key_id: Option<Spanned<String>>,
    secret_access_key_file: Option<Spanned<String>>,
    max_spool_size: Option<Spanned<RawSize>>,
    max_retry_interval: Option<Spanned<String>>,
    object_lock_mode: Option<Spanned<String>>,
    object_lock_days: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    kind: Spanned<String>,
    url: Spanned<String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, Spanned<String>>,
    link: Option<Spanned<String>>,
    events: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReviewers {
    users: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProtect {
    mode: Spanned<String>,
    targets: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedirect {
    port: Option<Spanned<i64>>,
    pin_dir: Option<Spanned<String>>,
    exec_cgroup: Option<Spanned<String>>,
    exec_unlisted: Option<Spanned<String>>,
    #[serde(default)]
    resolvers: Vec<Spanned<String>>,
    exec_socket: Option<Spanned<String>>,
    job_timeline: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    control_socket: Option<Spanned<String>>,
    metrics_listen: Option<Spanned<String>>,
    recording_dir: Option<Spanned<String>>,
    #[serde(default)]
    policy_paths: Vec<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    worker_threads: Option<Spanned<i64>>,
    recording_fsync: Option<Spanned<String>>,
    recording_on_failure: Option<Spanned<String>>,
    recording_signing_key: Option<Spanned<String>>,
    recording_retention_days: Option<Spanned<i64>>,
    recording_max_total_size: Option<Spanned<RawSize>>,
    shutdown_grace: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    client_tls: Option<Spanned<String>>,
    tls_dir: Option<Spanned<String>>,
    approvals_socket: Option<Spanned<String>>,
    approvals_socket_mode: Option<Spanned<String>>,
    approvals_socket_group: Option<Spanned<String>>,
    approvals_store: Option<Spanned<String>>,
    approvals_listen: Option<Spanned<String>>,
    approvals_tls_cert: Option<Spanned<String>>,
    approvals_tls_key: Option<Spanned<String>>,
    approvals_tokens: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: Spanned<String>,
    address: Spanned<String>,
    ports: Spanned<Vec<RawPort>>,
    protocol: Spanned<String>,
    tls: Option<Spanned<String>>,
    tls_ca_file: Option<Spanned<String>>,
    tls_server_name: Option<Spanned<String>>,
    record_raw: Option<Spanned<bool>>,
    #[serde(default)]
    credential: Vec<RawCredential>,
    client_credentials: Option<Spanned<String>>,
    ssh_known_hosts: Option<Spanned<String>>,
}

/// `[[target.credential]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    user: Spanned<String>,
    password_file: Option<Spanned<String>>,
    tls_client_cert: Option<Spanned<String>>,
    tls_client_key: Option<Spanned<String>>,
    ssh_key_file: Option<Spanned<String>>,
    ssh_certificate: Option<Spanned<bool>>,
    #[serde(rename = "match", default)]
    identity: Option<Spanned<RawIdentityMatch>>,
}

/// A credential's `match`: the identity conditions of a policy rule.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIdentityMatch {
    users: Option<Vec<String>>,
    uids: Option<Vec<u32>>,
    exe: Option<Vec<String>>,
    cgroup: Option<Vec<String>>,
    ci_repository: Option<Vec<String>>,
    ci_branch: Option<Vec<String>>,
    ci_job: Option<Vec<String>>,
    ci_workflow: Option<Vec<String>>,
    ci_verified: Option<bool>,
}

/// A size written as a number of bytes or as text with a unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Number(i64),
    Text(String),
}

impl RawSize {
    /// The size in bytes: a number, or text such as "10GiB".
    fn bytes(&self) -> Result<u64, String> {
        match self {
            RawSize::Number(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative")),
            RawSize::Text(t) => super::parse_size(t),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    listen: Spanned<String>,
    target: Spanned<String>,
    upstream: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCgroup {
    path: Spanned<String>,
    unlisted: Option<Spanned<String>>,
}

/// Collects errors with their place in the file.
struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl<'a> Checker<'a> {
    fn new(path: &'a Path, text: &'a str) -> Checker<'a> {
        Checker {
            path,
            text,
            errors: Vec::new(),
        }
    }

    /// `value`, or every problem found on the way to it.
    fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(LocatedErrors(self.errors))
        }
    }

    fn error_at(&mut self, offset: usize, message: impl Into<String>) {
        let (line, column) = line_column(self.text, offset);
        self.errors.push(ConfigError {
            path: self.path.to_path_buf(),
            line: Some(line),
            column: Some(column),
            message: message.into(),
        });
    }

    fn error<T>(&mut self, value: &Spanned<T>, message: impl Into<String>) {
        self.error_at(value.span().start, message);
    }

    /// `value` as a path when it is absolute; otherwise `message` is
    /// reported at it.
    fn absolute_path(
        &mut self,
        value: &Spanned<String>,
        message: impl Into<String>,
    ) -> Option<PathBuf> {
        if Path::new(value.get_ref()).is_absolute() {
            Some(PathBuf::from(value.get_ref()))
        } else {
            self.error(value, message);
            None
        }
    }

    fn duration(
        &mut self,
        value: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
    ) -> Duration {
        let Some(v) = value else { return default };
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.error(v, format!("{field} must be longer than zero"));
                default
            }
            Err(e) => {
                self.error(
                    v,
                    format!("{field} \"{}\" is not a duration ({e}); write it like \"30s\", \"5m\" or \"1h\"", v.get_ref()),
                );
                default
            }
        }
    }
}

/// Only the keys behind [`HostPaths`]; every other key and table is
/// ignored (no `deny_unknown_fields`), unread and unchecked.
#[derive(Deserialize, Default)]
struct RawHostPaths {
    #[serde(default)]
    agent: RawHostPathsAgent,
    #[serde(default)]
    redirect: RawHostPathsRedirect,
}

#[derive(Deserialize, Default)]
struct RawHostPathsAgent {
    control_socket: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
struct RawHostPathsRedirect {
    pin_dir: Option<Spanned<String>>,
    exec_socket: Option<Spanned<String>>,
}

pub(super) fn check_host_paths(path: &Path, text: &str) -> Result<HostPaths, ConfigErrors> {
    let raw: RawHostPaths = parse_toml(path, text).map_err(|e| LocatedErrors(vec![e]))?;
    let mut c = Checker::new(path, text);
    let agent = AgentSettings::default();
    let redirect = RedirectSettings::default();
    let paths = HostPaths {
        control_socket: raw
            .agent
            .control_socket
            .and_then(|s| control_socket(&mut c, &s))
            .unwrap_or(agent.control_socket),
        pin_dir: raw
            .redirect
            .pin_dir
            .and_then(|d| pin_dir(&mut c, &d))
            .unwrap_or(redirect.pin_dir),
        exec_socket: raw
            .redirect
            .exec_socket
            .and_then(|s| exec_socket(&mut c, &s))
            .unwrap_or(redirect.exec_socket),
    };
    c.finish(paths)
}

pub(super) fn check(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let raw: RawConfig = parse_toml(path, text).map_err(|e| LocatedErrors(vec![e]))?;
    let mut c = Checker::new(path, text);
    let agent = check_agent(&mut c, &raw.agent);
    let targets = check_targets(&mut c, &raw.target);
    let listeners = check_listeners(&mut c, &raw.listener, &targets);
    let cgroups = check_cgroups(&mut c, &raw.cgroup);
    let redirect = raw.redirect.as_ref().map(|r| check_redirect(&mut c, r));
    let reviewers = check_reviewers(&mut c, &raw.reviewers);
    let notify = check_notify(&mut c, &raw.notify);
    let protect = raw
        .protect
        .as_ref()
        .and_then(|p| check_protect(&mut c, p, &targets, redirect.is_some()));
    let upload = raw
        .upload
        .as_ref()
        .and_then(|u| check_upload(&mut c, u, &raw.agent));
    let mut agent = agent;
    let policy_source = raw
        .policy_source
        .as_ref()
        .and_then(|p| check_policy_source(&mut c, p, &raw.agent));
    if let Some(source) = &policy_source {
        agent.policy_paths = vec![source.current()];
    }
    let shared_approvals = raw
        .shared_approvals
        .as_ref()
        .and_then(|s| check_shared_approvals(&mut c, s));
    c.finish(Config {
        source: path.to_path_buf(),
        agent,
        targets,
        listeners,
        cgroups,
        redirect,
        reviewers,
        protect,
        notify,
        upload,
        policy_source,
        shared_approvals,
    })
}

fn check_agent(c: &mut Checker<'_>, raw: &RawAgent) -> AgentSettings {
    let defaults = AgentSettings::default();
    let mut agent = AgentSettings {
        shutdown_grace: c.duration(
            &raw.shutdown_grace,
            "shutdown_grace",
            defaults.shutdown_grace,
        ),
        idle_timeout: c.duration(&raw.idle_timeout, "idle_timeout", defaults.idle_timeout),
        connect_timeout: c.duration(
            &raw.connect_timeout,
            "connect_timeout",
            defaults.connect_timeout,
        ),
        ..defaults
    };
    if let Some(path) = raw
        .control_socket
        .as_ref()
        .and_then(|s| control_socket(c, s))
    {
        agent.control_socket = path;
    }
    if let Some(m) = &raw.metrics_listen {
        match m.get_ref().parse::<SocketAddr>() {
            Ok(addr) => agent.metrics_listen = Some(addr),
            Err(_) => c.error(
                m,
                format!(
                    "metrics_listen \"{}\" is not an address; write it like \"127.0.0.1:9187\"",
                    m.get_ref()
                ),
            ),
        }
    }
    if let Some(f) = &raw.recording_fsync {
        match f.get_ref().as_str() {
            "every-event" => agent.recording_fsync = RecordingFsync::EveryEvent,
            "on-close" => agent.recording_fsync = RecordingFsync::OnClose,
            other => match humantime::parse_duration(other) {
                Ok(d) if !d.is_zero() => agent.recording_fsync = RecordingFsync::Interval(d),
                _ => c.error(f, format!(
                    "recording_fsync \"{other}\" is not known; use \"every-event\", \"on-close\" or an interval such as \"1s\""
                )),
            },
        }
    }
    if let Some(f) = &raw.recording_on_failure {
        match f.get_ref().as_str() {
            "refuse" => agent.recording_on_failure = RecordingFailure::Refuse,
            "continue" => agent.recording_on_failure = RecordingFailure::Continue,
            other => c.error(
                f,
                format!(
                    "recording_on_failure \"{other}\" is not known; use \"refuse\" or \"continue\""
                ),
            ),
        }
    }
    if let Some(d) = &raw.recording_dir {
        agent.recording_dir = PathBuf::from(d.get_ref());
    }
    if let Some(k) = &raw.recording_signing_key {
        if k.get_ref().is_empty() {
            c.error(
                k,
                "recording_signing_key is empty; give the path of a key made by `tollgate recordings keygen --out PATH`, or remove the setting",
            );
        } else {
            agent.recording_signing_key = Some(PathBuf::from(k.get_ref()));
        }
    }
    if let Some(days) = &raw.recording_retention_days {
        // Up to 100 years: larger would overflow the clock arithmetic and
        // means "keep" anyway.
        match u64::try_from(*days.get_ref()) {
            Ok(d) if (1..=36_500).contains(&d) => {
                agent.recording_retention = Some(Duration::from_secs(d * 86_400));
            }
            _ => c.error(
                days,
                "recording_retention_days must be a whole number of days between 1 and 36500; remove it to keep recordings forever",
            ),
        }
    }
    if let Some(size) = &raw.recording_max_total_size {
        match size.get_ref().bytes() {
            Ok(0) => c.error(
                size,
                "recording_max_total_size must be more than zero; remove it for no size limit",
            ),
            Ok(n) => agent.recording_max_total_size = Some(n),
            Err(e) => c.error(size, format!("recording_max_total_size: {e}")),
        }
    }
    agent.policy_paths = raw
        .policy_paths
        .iter()
        .map(|p| PathBuf::from(p.get_ref()))
        .collect();
    if let Some(n) = &raw.max_connections {
        match usize::try_from(*n.get_ref()) {
            Ok(v) if (1..=1_000_000).contains(&v) => agent.max_connections = v,
            _ => c.error(n, "max_connections must be between 1 and 1000000"),
        }
    }
    if let Some(n) = &raw.worker_threads {
        match usize::try_from(*n.get_ref()) {
            Ok(v) if (1..=1024).contains(&v) => agent.worker_threads = Some(v),
            _ => c.error(n, "worker_threads must be between 1 and 1024"),
        }
    }
    if let Some(m) = &raw.client_tls {
        match m.get_ref().as_str() {
            "off" => agent.client_tls = ClientTls::Off,
            "terminate" => agent.client_tls = ClientTls::Terminate,
            other => c.error(
                m,
                format!("client_tls = \"{other}\" is not known; use \"off\" or \"terminate\""),
            ),
        }
    }
    if let Some(d) = &raw.tls_dir {
        if d.get_ref().is_empty() {
            c.error(
                d,
                "tls_dir is empty; give a directory such as /var/lib/tollgate/tls",
            );
        } else {
            agent.tls_dir = PathBuf::from(d.get_ref());
        }
    }
    check_approvals(c, raw, &mut agent);
    agent
}

fn check_approvals(c: &mut Checker<'_>, raw: &RawAgent, agent: &mut AgentSettings) {
    for (value, field, target) in [
        (
            &raw.approvals_socket,
            "approvals_socket",
            &mut agent.approvals_socket,
        ),
        (
            &raw.approvals_store,
            "approvals_store",
            &mut agent.approvals_store,
        ),
        (
            &raw.approvals_tokens,
            "approvals_tokens",
            &mut agent.approvals_tokens,
        ),
    ] {
        if let Some(path) = value
            .as_ref()
            .and_then(|v| c.absolute_path(v, format!("{field} must be an absolute path")))
        {
            *target = path;
        }
    }
    if let Some(m) = &raw.approvals_socket_mode {
        match u32::from_str_radix(m.get_ref(), 8) {
            Ok(mode) if mode <= 0o777 && mode & 0o600 == 0o600 => {
                agent.approvals_socket_mode = mode
            }
            _ => c.error(
                m,
                format!(
                    "approvals_socket_mode \"{}\" is not a file mode; write it in octal like \"0660\" (the owner needs read and write)",
                    m.get_ref()
                ),
            ),
        }
    }
    if let Some(g) = &raw.approvals_socket_group {
        if g.get_ref().is_empty() || g.get_ref().contains([':', '/', ' ']) {
            c.error(g, "approvals_socket_group must be a Unix group name");
        } else {
            agent.approvals_socket_group = Some(g.get_ref().clone());
        }
    }
    check_approvals_listener(c, raw, agent);
}

/// `approvals_listen` with its certificate and key: TLS only, so both are
/// required with it (and mean nothing without it).
fn check_approvals_listener(c: &mut Checker<'_>, raw: &RawAgent, agent: &mut AgentSettings) {
    for (value, field, target) in [
        (
            &raw.approvals_tls_cert,
            "approvals_tls_cert",
            &mut agent.approvals_tls_cert,
        ),
        (
            &raw.approvals_tls_key,
            "approvals_tls_key",
            &mut agent.approvals_tls_key,
        ),
    ] {
        if let Some(path) = value.as_ref().and_then(|v| {
            c.absolute_path(v, format!("{field} must be an absolute path to a PEM file"))
        }) {
            *target = Some(path);
        }
    }
    let Some(listen) = &raw.approvals_listen else {
        for (value, field) in [
            (&raw.approvals_tls_cert, "approvals_tls_cert"),
            (&raw.approvals_tls_key, "approvals_tls_key"),
        ] {
            if let Some(v) = value {
                c.error(
                    v,
                    format!(
                        "{field} is set but approvals_listen is not; set both, or remove {field}"
                    ),
                );
            }
        }
        return;
    };
    match listen.get_ref().parse::<std::net::SocketAddr>() {
        Ok(addr) => agent.approvals_listen = Some(addr),
        Err(_) => c.error(
            listen,
            format!(
                "approvals_listen \"{}\" is not an address; write it like \"0.0.0.0:8443\"",
                listen.get_ref()
            ),
        ),
    }
    if raw.approvals_tls_cert.is_none() || raw.approvals_tls_key.is_none() {
        c.error(
            listen,
            "approvals_listen serves the reviewer API over TLS only: set approvals_tls_cert and approvals_tls_key to PEM files of its certificate chain and private key",
        );
    }
}

fn check_reviewers(
    c: &mut Checker<'_>,
    raw: &std::collections::BTreeMap<String, Spanned<RawReviewers>>,
) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut groups = std::collections::BTreeMap::new();
    for (name, group) in raw {
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'));
        if !name_ok {
            c.error(
                group,
                format!("reviewer group name \"{name}\" must be letters, digits, '-', '_' or '.'"),
            );
            continue;
        }
        let users = group.get_ref().users.get_ref();
        if users.is_empty() {
            c.error(
                &group.get_ref().users,
                format!("[reviewers.{name}] users is empty; name the users who may review"),
            );
        }
        let mut names: Vec<String> = Vec::new();
        for user in users {
            let u = user.get_ref();
            if u.is_empty() || u.contains([':', ',', ' ', '/']) {
                c.error(user, format!("\"{u}\" is not a user name"));
            } else if !names.contains(u) {
                names.push(u.clone());
            }
        }
        groups.insert(name.clone(), names);
    }
    groups
}

/// The request events a `[[notify]]` entry may name.
const NOTIFY_EVENTS: [crate::approval::RequestEventKind; 6] = {
    use crate::approval::RequestEventKind as E;
    [
        E::Requested,
        E::Approved,
        E::Denied,
        E::Expired,
        E::Cancelled,
        E::Aborted,
    ]
};

fn check_notify(c: &mut Checker<'_>, raw: &[Spanned<RawNotify>]) -> Vec<NotifyTarget> {
    let mut targets = Vec::new();
    for entry in raw {
        let n = entry.get_ref();
        let kind = match n.kind.get_ref().as_str() {
            "webhook" => Some(NotifyKind::Webhook),
            "slack" => Some(NotifyKind::Slack),
            other => {
                c.error(
                    &n.kind,
                    format!("notify kind \"{other}\" is not known; use \"webhook\" or \"slack\""),
                );
                None
            }
        };
        let url = match parse_notify_url(n.url.get_ref()) {
            Ok(url) => Some(url),
            Err(why) => {
                c.error(&n.url, format!("notify url \"{}\" {why}", n.url.get_ref()));
                None
            }
        };
        let mut headers = Vec::new();
        for (name, value) in &n.headers {
            let name_ok = hyper::header::HeaderName::from_bytes(name.as_bytes()).is_ok();
            let value_ok = hyper::header::HeaderValue::from_str(value.get_ref()).is_ok();
            if !name_ok {
                c.error(
                    value,
                    format!("notify header name \"{name}\" is not a valid HTTP header name"),
                );
            } else if !value_ok {
                c.error(value, format!("notify header \"{name}\" has a value that is not valid in HTTP (control characters?)"));
            } else {
                headers.push((name.clone(), value.get_ref().clone()));
            }
        }
        let link = match &n.link {
            Some(link) if parse_notify_url(link.get_ref()).is_err() => {
                c.error(link, format!("notify link \"{}\" must be an http:// or https:// URL of the reviewers' page", link.get_ref()));
                None
            }
            Some(link) => Some(link.get_ref().clone()),
            None => None,
        };
        let mut events = Vec::new();
        match &n.events {
            None => events.push(crate::approval::RequestEventKind::Requested),
            Some(names) => {
                for name in names {
                    match NOTIFY_EVENTS.iter().find(|e| e.as_str() == name.get_ref()) {
                        Some(e) if !events.contains(e) => events.push(*e),
                        Some(_) => {}
                        None => {
                            let allowed: Vec<&str> =
                                NOTIFY_EVENTS.iter().map(|e| e.as_str()).collect();
                            c.error(
                                name,
                                format!(
                                    "notify event \"{}\" is not known; use {}",
                                    name.get_ref(),
                                    allowed.join(", ")
                                ),
                            );
                        }
                    }
                }
                if names.is_empty() {
                    c.error(
                        entry,
                        "notify events is empty; leave it out to send \"requested\"",
                    );
                }
            }
        }
        if let (Some(kind), Some(url)) = (kind, url) {
            targets.push(NotifyTarget {
                kind,
                url,
                headers,
                link,
                events,
            });
        }
    }
    targets
}

/// An `http://` or `https://` URL with a host; why not otherwise.
pub(super) fn parse_notify_url(text: &str) -> Result<hyper::Uri, &'static str> {
    if !text.starts_with("http://") && !text.starts_with("https://") {
        return Err("must start with http:// or https://");
    }
    let uri: hyper::Uri = text
        .parse()
        .map_err(|_| "is not a URL; write it like \"https://hooks.example.com/tollgate\"")?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must start with http:// or https://"),
    }
    let authority = uri.authority().ok_or("has no host")?;
    if authority.as_str().contains('@') {
        return Err("must not carry a user name or password; use headers (authorization) instead");
    }
    if authority.host().is_empty() {
        return Err("has no host");
    }
    Ok(uri)
}

fn check_targets(c: &mut Checker<'_>, raw: &[RawTarget]) -> TargetSet {
    let mut names = HashSet::new();
    let mut targets = Vec::new();
    for t in raw {
        let name = t.name.get_ref().trim().to_string();
        let name_ok = !name.is_empty()
            && name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
        if !name_ok {
            c.error(&t.name, format!(
                "target name \"{}\" must be non-empty and use only letters, digits, '-', '_' and '.'",
                t.name.get_ref()
            ));
        } else if !names.insert(name.clone()) {
            c.error(
                &t.name,
                format!("target \"{name}\" is defined twice; target names must be unique"),
            );
        }
        let address = match TargetAddress::parse(t.address.get_ref()) {
            Ok(a) => Some(a),
            Err(e) => {
                c.error(&t.address, e);
                None
            }
        };
        let mut ports = Vec::new();
        if t.ports.get_ref().is_empty() {
            c.error(
                &t.ports,
                "ports is empty; list at least one port, e.g. ports = [5432]",
            );
        }
        for p in t.ports.get_ref() {
            let parsed = match p {
                RawPort::Number(n) => u16::try_from(*n)
                    .ok()
                    .filter(|n| *n > 0)
                    .map(|n| PortRange { first: n, last: n })
                    .ok_or_else(|| format!("{n} is not a port (1-65535)")),
                RawPort::Text(s) => PortRange::parse(s),
            };
            match parsed {
                Ok(r) => ports.push(r),
                Err(e) => c.error(&t.ports, e),
            }
        }
        let protocol = match t.protocol.get_ref().parse::<Protocol>() {
            Ok(p) => Some(p),
            Err(e) => {
                c.error(&t.protocol, e);
                None
            }
        };
        let tls = check_tls(c, t);
        let (credentials, client_credentials) = check_credentials(c, t, protocol);
        let ssh_known_hosts = check_ssh_target(c, t, protocol);
        if let (Some(address), Some(protocol)) = (address, protocol) {
            targets.push(Target {
                name,
                address,
                ports,
                protocol,
                tls,
                record_raw: t.record_raw.as_ref().is_some_and(|r| *r.get_ref()),
                credentials,
                client_credentials,
                ssh_known_hosts,
            });
        }
    }
    TargetSet::new(targets)
}

/// `[upload]`. Local retention is refused beside it: it would remove
/// recordings that are not uploaded yet, and the bucket's lifecycle rules
/// keep the uploaded ones.
fn check_upload(
    c: &mut Checker<'_>,
    raw: &Spanned<RawUpload>,
    agent: &RawAgent,
) -> Option<UploadSettings> {
    let before = c.errors.len();
    let u = raw.get_ref();
    for local in [
        agent.recording_retention_days.as_ref().map(|v| v.span()),
        agent.recording_max_total_size.as_ref().map(|v| v.span()),
    ]
    .into_iter()
    .flatten()
    {
        c.error_at(local.start, "local retention (recording_retention_days, recording_max_total_size) cannot be combined with [upload]: it would remove recordings not yet uploaded; uploaded recordings are deleted locally once verified, and the bucket's lifecycle rules keep them");
    }
    let s3 = check_s3_access(
        c,
        "upload",
        &u.bucket,
        u.bucket.get_ref(),
        RawS3Access {
            endpoint: u.endpoint.as_ref(),
            region: u.region.as_ref(),
            access_key_id: u.access_key_id.as_ref(),
            secret_access_key_file: u.secret_access_key_file.as_ref(),
        },
    );
    let prefix = u
        .prefix
        .as_ref()
        .map(|p| key_prefix(c, "upload prefix", p, p.get_ref()))
        .unwrap_or_default();
    let host = match &u.host {
        Some(h) => {
            let name = h.get_ref();
            if !is_key_segment(name) {
                c.error(h, format!("upload host \"{name}\" must be letters, digits, '.', '-' and '_' only (it is part of every object key)"));
            }
            name.clone()
        }
        None => super::this_host_name(),
    };
    let max_spool_size = match &u.max_spool_size {
        Some(size) => match size.get_ref().bytes() {
            Ok(0) => {
                c.error(size, "max_spool_size must be more than zero");
                0
            }
            Ok(n) => n,
            Err(e) => {
                c.error(size, format!("max_spool_size: {e}"));
                0
            }
        },
        None => UploadSettings::DEFAULT_MAX_SPOOL_SIZE,
    };
    let max_retry_interval = c.duration(
        &u.max_retry_interval,
        "max_retry_interval",
        UploadSettings::DEFAULT_MAX_RETRY_INTERVAL,
    );
    let object_lock = check_object_lock(c, u);
    (c.errors.len() == before).then_some(UploadSettings {
        s3,
        prefix,
        host,
        max_spool_size,
        max_retry_interval,
        object_lock,
    })
}

/// `object_lock_mode` and `object_lock_days`, both or neither.
fn check_object_lock(c: &mut Checker<'_>, u: &RawUpload) -> Option<ObjectLock> {
    match (&u.object_lock_mode, &u.object_lock_days) {
        (None, None) => None,
        (Some(mode), Some(days)) => {
            let mode = match mode.get_ref().as_str() {
                "compliance" => Some(ObjectLockMode::Compliance),
                "governance" => Some(ObjectLockMode::Governance),
                other => {
                    c.error(mode, format!("object_lock_mode \"{other}\" is not known; use \"compliance\" or \"governance\""));
                    None
                }
            };
            let days = match u64::try_from(*days.get_ref()) {
                Ok(d) if (1..=36_500).contains(&d) => Some(d),
                _ => {
                    c.error(
                        days,
                        "object_lock_days must be a whole number of days between 1 and 36500",
                    );
                    None
                }
            };
            mode.zip(days).map(|(mode, days)| ObjectLock { mode, days })
        }
        (Some(mode), None) => {
            c.error(mode, "object_lock_mode needs object_lock_days beside it (how long each recording is kept)");
            None
        }
        (None, Some(days)) => {
            c.error(days, "object_lock_days needs object_lock_mode beside it (\"compliance\" or \"governance\")");
            None
        }
    }
}

/// The settings that reach a bucket, as written.
struct RawS3Access<'a> {
    endpoint: Option<&'a Spanned<String>>,
    region: Option<&'a Spanned<String>>,
    access_key_id: Option<&'a Spanned<String>>,
    secret_access_key_file: Option<&'a Spanned<String>>,
}

/// A bucket name (`at` for messages) and how to reach it; `section` names
/// the table in messages.
fn check_s3_access<T>(
    c: &mut Checker<'_>,
    section: &str,
    at: &Spanned<T>,
    bucket: &str,
    raw: RawS3Access<'_>,
) -> S3Access {
    let bucket = bucket.trim();
    if bucket.is_empty() || bucket.contains('/') {
        c.error(
            at,
            format!("{section} bucket must be a bucket name such as \"tollgate-recordings\" (no slashes)"),
        );
    }
    let endpoint = raw
        .endpoint
        .and_then(|e| match parse_notify_url(e.get_ref()) {
            Ok(_) => Some(e.get_ref().trim_end_matches('/').to_string()),
            Err(why) => {
                c.error(e, format!("{section} endpoint \"{}\" {why}", e.get_ref()));
                None
            }
        });
    let secret_access_key_file =
        secret_path(c, "secret_access_key_file", raw.secret_access_key_file).unwrap_or(None);
    match (raw.access_key_id, raw.secret_access_key_file) {
        (Some(id), None) => c.error(id, "access_key_id needs secret_access_key_file beside it (a root-only file holding the secret key)"),
        (None, Some(file)) => c.error(file, "secret_access_key_file needs access_key_id beside it"),
        _ => {}
    }
    S3Access {
        bucket: bucket.to_string(),
        endpoint,
        region: raw
            .region
            .map(|r| r.get_ref().clone())
            .unwrap_or_else(|| "us-east-1".to_string()),
        access_key_id: raw.access_key_id.map(|i| i.get_ref().clone()),
        secret_access_key_file,
    }
}

/// An object key prefix, without slashes around it.
fn key_prefix<T>(c: &mut Checker<'_>, what: &str, at: &Spanned<T>, text: &str) -> String {
    match object_store::path::Path::parse(text.trim_matches('/')) {
        Ok(path) => path.to_string(),
        Err(e) => {
            c.error(
                at,
                format!("{what} \"{text}\" is not a valid object key prefix: {e}"),
            );
            String::new()
        }
    }
}

/// `[policy_source]`: exactly one of `s3` and `git`; the policy paths
/// become its cached copy, so `agent.policy_paths` is refused beside it.
fn check_policy_source(
    c: &mut Checker<'_>,
    raw: &Spanned<RawPolicySource>,
    agent: &RawAgent,
) -> Option<PolicySourceSettings> {
    let before = c.errors.len();
    let p = raw.get_ref();
    if let Some(first) = agent.policy_paths.first() {
        c.error(first, "agent.policy_paths cannot be combined with [policy_source]: the policy in force is the source's, kept in its dir");
    }
    let s3_only = [
        &p.endpoint,
        &p.region,
        &p.access_key_id,
        &p.secret_access_key_file,
    ];
    let git_only = [&p.branch, &p.path];
    let origin = match (&p.s3, &p.git) {
        (Some(url), None) => {
            for extra in git_only.into_iter().flatten() {
                c.error(extra, "branch and path apply to a git source");
            }
            let text = url.get_ref();
            let Some(rest) = text.strip_prefix("s3://") else {
                c.error(
                    url,
                    format!("policy_source s3 \"{text}\" must be s3://BUCKET/PREFIX"),
                );
                return None;
            };
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let s3 = check_s3_access(
                c,
                "policy_source",
                url,
                bucket,
                RawS3Access {
                    endpoint: p.endpoint.as_ref(),
                    region: p.region.as_ref(),
                    access_key_id: p.access_key_id.as_ref(),
                    secret_access_key_file: p.secret_access_key_file.as_ref(),
                },
            );
            let prefix = key_prefix(c, "policy_source prefix", url, prefix);
            PolicyOrigin::S3 { s3, prefix }
        }
        (None, Some(url)) => {
            for extra in s3_only.into_iter().flatten() {
                c.error(
                    extra,
                    "endpoint, region and the access key apply to an s3 source",
                );
            }
            let path = p
                .path
                .as_ref()
                .map_or(".".to_string(), |p| p.get_ref().clone());
            if path.starts_with('/') || path.split('/').any(|part| part == "..") {
                if let Some(at) = &p.path {
                    c.error(at, "policy_source path is a directory inside the repository (no leading '/', no '..')");
                }
            }
            if url.get_ref().trim().is_empty() || url.get_ref().starts_with('-') {
                c.error(
                    url,
                    "policy_source git must be a repository URL, as git clone takes it",
                );
            }
            PolicyOrigin::Git {
                url: url.get_ref().clone(),
                branch: p
                    .branch
                    .as_ref()
                    .map_or("main".to_string(), |b| b.get_ref().clone()),
                path,
            }
        }
        (Some(_), Some(git)) => {
            c.error(git, "[policy_source] takes one of s3 and git");
            return None;
        }
        (None, None) => {
            c.error_at(
                raw.span().start,
                "[policy_source] needs s3 = \"s3://BUCKET/PREFIX\" or git = \"URL\"",
            );
            return None;
        }
    };
    let interval = c.duration(
        &p.interval,
        "interval",
        PolicySourceSettings::DEFAULT_INTERVAL,
    );
    let dir = p.dir.as_ref().map_or_else(
        || PathBuf::from(PolicySourceSettings::DEFAULT_DIR),
        |d| PathBuf::from(d.get_ref()),
    );
    if !dir.is_absolute() {
        if let Some(at) = &p.dir {
            c.error(at, "policy_source dir must be an absolute path");
        }
    }
    (c.errors.len() == before).then_some(PolicySourceSettings {
        origin,
        dir,
        interval,
    })
}

/// `[shared_approvals]`: a connection string the PostgreSQL client takes,
/// without a password (that goes in `password_file`), and a host name
/// that is one object-key-safe word.
fn check_shared_approvals(
    c: &mut Checker<'_>,
    raw: &Spanned<RawSharedApprovals>,
) -> Option<SharedApprovalsSettings> {
    let before = c.errors.len();
    let s = raw.get_ref();
    let database = s.database.get_ref().trim().to_string();
    match database.parse::<tokio_postgres::Config>() {
        Ok(parsed) if parsed.get_password().is_some() => c.error(
            &s.database,
            "shared_approvals database must not hold the password; put it in a root-only password_file",
        ),
        Ok(parsed) if parsed.get_hosts().is_empty() => c.error(
            &s.database,
            "shared_approvals database names no host (host=... or postgresql://HOST/DB)",
        ),
        Ok(_) => {}
        Err(e) => c.error(
            &s.database,
            format!("shared_approvals database is not a PostgreSQL connection string (postgresql://USER@HOST:PORT/DB or key=value pairs): {e}"),
        ),
    }
    let password_file = secret_path(c, "password_file", s.password_file.as_ref()).unwrap_or(None);
    let ca_file = s
        .ca_file
        .as_ref()
        .and_then(|f| c.absolute_path(f, "shared_approvals ca_file must be an absolute path"));
    let host = match &s.host {
        Some(h) => {
            let name = h.get_ref();
            if !is_key_segment(name)
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                c.error(h, format!("shared_approvals host \"{name}\" must be letters, digits, '.', '-' and '_' only"));
            }
            name.clone()
        }
        None => super::this_host_name(),
    };
    (c.errors.len() == before).then_some(SharedApprovalsSettings {
        database,
        password_file,
        ca_file,
        host,
    })
}

/// Whether `s` can stand as one segment of an object key as it is.
fn is_key_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// A secret file setting (`field`), checked as secret files are; `Err`
/// once the error is reported.
fn secret_path(
    c: &mut Checker<'_>,
    field: &str,
    file: Option<&Spanned<String>>,
) -> Result<Option<PathBuf>, ()> {
    let Some(file) = file else {
        return Ok(None);
    };
    let path = PathBuf::from(file.get_ref());
    match secret::check_secret_file(&path) {
        Ok(()) => Ok(Some(path)),
        Err(e) => {
            c.error(file, format!("{field}: {e}"));
            Err(())
        }
    }
}

/// An SSH target's settings: a known-hosts file for the real host's key
/// (never trust on first use) and brokered keys for every session (the
/// agent terminates SSH, so a client's own key cannot reach the host).
fn check_ssh_target(
    c: &mut Checker<'_>,
    t: &RawTarget,
    protocol: Option<Protocol>,
) -> Option<PathBuf> {
    if protocol != Some(Protocol::Ssh) {
        if let Some(file) = &t.ssh_known_hosts {
            c.error(file, "ssh_known_hosts applies only to protocol = \"ssh\"");
        }
        return None;
    }
    if let Some(v) = &t.client_credentials {
        if v.get_ref() == "pass" {
            c.error(v, "an ssh target cannot pass the client's own credentials: the agent ends the client's SSH connection and logs in to the host itself; give a [[target.credential]] for every process instead");
        }
    }
    if t.credential.is_empty() {
        c.error(&t.protocol, "an ssh target needs at least one [[target.credential]] with an ssh_key_file: the agent logs in to the host itself");
    }
    if t.tls.is_some() {
        if let Some(tls) = &t.tls {
            c.error(
                tls,
                "tls does not apply to an ssh target (SSH encrypts both legs itself)",
            );
        }
    }
    match &t.ssh_known_hosts {
        None => {
            c.error(&t.protocol, "an ssh target needs ssh_known_hosts: a known-hosts file with the host's key, which the agent checks on every connection");
            None
        }
        Some(file) => {
            let path = PathBuf::from(file.get_ref());
            match std::fs::read_to_string(&path) {
                Ok(_) => Some(path),
                Err(e) => {
                    c.error(
                        file,
                        format!("ssh_known_hosts: cannot read {}: {e}", path.display()),
                    );
                    None
                }
            }
        }
    }
}

fn check_credentials(
    c: &mut Checker<'_>,
    t: &RawTarget,
    protocol: Option<Protocol>,
) -> (Vec<BrokeredCredential>, ClientCredentials) {
    let mut credentials = Vec::new();
    for raw in &t.credential {
        if protocol == Some(Protocol::Tcp) {
            c.error(
                &raw.user,
                "brokered credentials need a protocol the agent speaks: postgres, mysql or ssh",
            );
            continue;
        }
        if protocol == Some(Protocol::Ssh) {
            if raw.password_file.is_some() || raw.tls_client_cert.is_some() {
                c.error(&raw.user, "an ssh credential is a key: give ssh_key_file (password_file and tls_client_cert are for database targets)");
                continue;
            }
        } else if let Some(key) = &raw.ssh_key_file {
            c.error(key, "ssh_key_file applies only to an ssh target");
            continue;
        }
        if protocol == Some(Protocol::Mysql) {
            if let Some(cert) = &raw.tls_client_cert {
                c.error(
                    cert,
                    "client certificates are brokered for postgres targets only; give a mysql credential a password_file",
                );
                continue;
            }
        }
        let user = raw.user.get_ref().trim();
        if user.is_empty() || user.contains('\0') {
            c.error(
                &raw.user,
                "user must name the database role the agent logs in as",
            );
            continue;
        }
        let Ok(password_file) = secret_path(c, "password_file", raw.password_file.as_ref()) else {
            continue;
        };
        let client_cert = match (&raw.tls_client_cert, &raw.tls_client_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let key_file = PathBuf::from(key.get_ref());
                if let Err(e) = secret::check_secret_file(&key_file) {
                    c.error(key, format!("tls_client_key: {e}"));
                    continue;
                }
                if matches!(
                    t.tls.as_ref().map(|m| m.get_ref().as_str()),
                    None | Some("disable" | "prefer")
                ) {
                    c.error(cert, "a client certificate is presented only on a TLS upstream leg; set the target's tls to \"require\" or \"verify-full\"");
                    continue;
                }
                Some(ClientCertificate {
                    cert_file: PathBuf::from(cert.get_ref()),
                    key_file,
                })
            }
            (Some(one), None) | (None, Some(one)) => {
                c.error(one, "tls_client_cert and tls_client_key go together");
                continue;
            }
        };
        let Ok(ssh_key_file) = secret_path(c, "ssh_key_file", raw.ssh_key_file.as_ref()) else {
            continue;
        };
        let ssh_certificate = raw.ssh_certificate.as_ref().is_some_and(|v| *v.get_ref());
        if let Some(flag) = &raw.ssh_certificate {
            if protocol != Some(Protocol::Ssh) {
                c.error(flag, "ssh_certificate applies only to an ssh target");
                continue;
            }
            if ssh_certificate && ssh_key_file.is_some() {
                c.error(
                    flag,
                    "give ssh_key_file or ssh_certificate = true, not both",
                );
                continue;
            }
        }
        if protocol == Some(Protocol::Ssh) && ssh_key_file.is_none() && !ssh_certificate {
            c.error(&raw.user, "an ssh credential needs ssh_key_file (the private key the agent logs in with) or ssh_certificate = true (a certificate from the agent's user CA, for hosts that trust it)");
            continue;
        }
        if protocol != Some(Protocol::Ssh) && password_file.is_none() && client_cert.is_none() {
            c.error(
                &raw.user,
                "a credential needs password_file, or tls_client_cert and tls_client_key, or both",
            );
            continue;
        }
        let spec = match &raw.identity {
            None => IdentitySpec::default(),
            Some(m) => {
                let m = m.get_ref();
                let lists: [(&str, Option<usize>); 8] = [
                    ("users", m.users.as_ref().map(Vec::len)),
                    ("uids", m.uids.as_ref().map(Vec::len)),
                    ("exe", m.exe.as_ref().map(Vec::len)),
                    ("cgroup", m.cgroup.as_ref().map(Vec::len)),
                    ("ci_repository", m.ci_repository.as_ref().map(Vec::len)),
                    ("ci_branch", m.ci_branch.as_ref().map(Vec::len)),
                    ("ci_job", m.ci_job.as_ref().map(Vec::len)),
                    ("ci_workflow", m.ci_workflow.as_ref().map(Vec::len)),
                ];
                if let Some((field, _)) = lists.iter().find(|(_, n)| *n == Some(0)) {
                    let span = raw.identity.as_ref().map_or(0, |m| m.span().start);
                    c.error_at(
                        span,
                        format!("`{field}` is an empty list, which no process matches; remove it or list a value"),
                    );
                    continue;
                }
                IdentitySpec {
                    users: m.users.clone().unwrap_or_default(),
                    uids: m.uids.clone().unwrap_or_default(),
                    exe: m.exe.clone().unwrap_or_default(),
                    cgroup: m.cgroup.clone().unwrap_or_default(),
                    ci_repository: m.ci_repository.clone().unwrap_or_default(),
                    ci_branch: m.ci_branch.clone().unwrap_or_default(),
                    ci_job: m.ci_job.clone().unwrap_or_default(),
                    ci_workflow: m.ci_workflow.clone().unwrap_or_default(),
                    ci_verified: m.ci_verified,
                }
            }
        };
        match IdentityMatch::compile(&spec) {
            Ok(identity) => credentials.push(BrokeredCredential {
                user: user.to_owned(),
                password_file,
                client_cert,
                ssh_key_file,
                ssh_certificate,
                identity: std::sync::Arc::new(identity),
            }),
            Err(e) => {
                let span = raw.identity.as_ref().map_or(0, |m| m.span().start);
                c.error_at(span, e);
            }
        }
    }
    let client_credentials = match &t.client_credentials {
        None => ClientCredentials::Refuse,
        Some(v) if t.credential.is_empty() => {
            c.error(
                v,
                "client_credentials applies only to a target with [[target.credential]] entries",
            );
            ClientCredentials::Refuse
        }
        Some(v) => match v.get_ref().as_str() {
            "refuse" => ClientCredentials::Refuse,
            "pass" => ClientCredentials::Pass,
            other => {
                c.error(
                    v,
                    format!("client_credentials = \"{other}\" is not known; use refuse or pass"),
                );
                ClientCredentials::Refuse
            }
        },
    };
    (credentials, client_credentials)
}

fn check_tls(c: &mut Checker<'_>, t: &RawTarget) -> UpstreamTls {
    let mode = t.tls.as_ref().map(|m| m.get_ref().as_str());
    let tls = match mode {
        None | Some("prefer") => UpstreamTls::Prefer,
        Some("disable") => UpstreamTls::Disable,
        Some("require") => UpstreamTls::Require,
        Some("verify-full") => match &t.tls_ca_file {
            Some(ca) => UpstreamTls::VerifyFull {
                ca_file: PathBuf::from(ca.get_ref()),
                server_name: t.tls_server_name.as_ref().map(|n| n.get_ref().clone()),
            },
            None => {
                if let Some(m) = &t.tls {
                    c.error(
                        m,
                        "tls = \"verify-full\" needs tls_ca_file = \"/path/to/ca.pem\"",
                    );
                }
                UpstreamTls::Prefer
            }
        },
        Some(other) => {
            if let Some(m) = &t.tls {
                c.error(m, format!("tls = \"{other}\" is not known; use disable, prefer, require or verify-full"));
            }
            UpstreamTls::Prefer
        }
    };
    if !matches!(tls, UpstreamTls::VerifyFull { .. }) {
        for (field, value) in [
            ("tls_ca_file", &t.tls_ca_file),
            ("tls_server_name", &t.tls_server_name),
        ] {
            if let Some(v) = value {
                c.error(
                    v,
                    format!("{field} applies only with tls = \"verify-full\""),
                );
            }
        }
    }
    tls
}

fn check_listeners(c: &mut Checker<'_>, raw: &[RawListener], targets: &TargetSet) -> Vec<Listener> {
    let mut seen = HashSet::new();
    let mut listeners = Vec::new();
    for l in raw {
        let listen = match l.listen.get_ref().parse::<SocketAddr>() {
            Ok(a) => {
                if !seen.insert(a) {
                    c.error(
                        &l.listen,
                        format!("{a} is used by two listeners; give each its own address"),
                    );
                }
                Some(a)
            }
            Err(_) => {
                c.error(
                    &l.listen,
                    format!(
                        "listen \"{}\" is not an address; write it like \"127.0.0.1:15432\"",
                        l.listen.get_ref()
                    ),
                );
                None
            }
        };
        let Some(target) = targets.get(l.target.get_ref().trim()) else {
            let known: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
            c.error(
                &l.target,
                format!(
                    "listener names target \"{}\", which is not defined; known targets: {}",
                    l.target.get_ref(),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
            continue;
        };
        let upstream = match &l.upstream {
            Some(u) => match parse_upstream(u.get_ref()) {
                Ok(up) => Some(up),
                Err(e) => {
                    c.error(u, e);
                    None
                }
            },
            None => match (target.address.single_host(), target.single_port()) {
                (Some(host), Some(port)) => Some(Upstream { host, port }),
                _ => {
                    c.error(&l.target, format!(
                        "target \"{}\" covers several hosts or ports, so this listener needs upstream = \"HOST:PORT\"",
                        target.name
                    ));
                    None
                }
            },
        };
        if let (Some(listen), Some(upstream)) = (listen, upstream) {
            listeners.push(Listener {
                listen,
                target: target.name.clone(),
                upstream,
            });
        }
    }
    listeners
}

/// Parses `host:port` or `[v6]:port`.
fn parse_upstream(s: &str) -> Result<Upstream, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(Upstream {
            host: addr.ip().to_string(),
            port: addr.port(),
        });
    }
    let bad = || format!("upstream \"{s}\" is not HOST:PORT (example: db.internal:5432)");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(bad)?;
    match TargetAddress::parse(host) {
        Ok(TargetAddress::Host(h)) => Ok(Upstream { host: h, port }),
        _ => Err(bad()),
    }
}

fn unlisted_policy(c: &mut Checker<'_>, value: Option<&Spanned<String>>) -> Option<UnlistedPolicy> {
    match value.map(|u| u.get_ref().as_str()) {
        None | Some("pass") => Some(UnlistedPolicy::Pass),
        Some("deny") => Some(UnlistedPolicy::Deny),
        Some(other) => {
            if let Some(u) = value {
                c.error(
                    u,
                    format!("unlisted = \"{other}\" is not known; use \"pass\" or \"deny\""),
                );
            }
            None
        }
    }
}

fn cgroup_path_ok(path: &str) -> bool {
    !path.is_empty() && !path.split('/').any(|p| p == "..")
}

fn check_redirect(c: &mut Checker<'_>, raw: &RawRedirect) -> RedirectSettings {
    let mut r = RedirectSettings::default();
    if let Some(p) = &raw.port {
        match u16::try_from(*p.get_ref()) {
            Ok(port) if port > 0 => r.port = port,
            _ => c.error(p, "redirect.port must be a port between 1 and 65535"),
        }
    }
    if let Some(d) = raw.pin_dir.as_ref().and_then(|d| pin_dir(c, d)) {
        r.pin_dir = d;
    }
    if let Some(g) = &raw.exec_cgroup {
        let path = g.get_ref().trim().trim_start_matches('/');
        if cgroup_path_ok(path) {
            r.exec_cgroup = PathBuf::from(path);
        } else {
            c.error(
                g,
                "redirect.exec_cgroup must be a non-empty cgroup path without \"..\"",
            );
        }
    }
    if let Some(policy) = unlisted_policy(c, raw.exec_unlisted.as_ref()) {
        r.exec_unlisted = policy;
    }
    if let Some(on) = raw.job_timeline {
        r.job_timeline = on;
    }
    if let Some(sock) = raw.exec_socket.as_ref().and_then(|s| exec_socket(c, s)) {
        r.exec_socket = sock;
    }
    for resolver in &raw.resolvers {
        match resolver.get_ref().parse() {
            Ok(ip) => r.resolvers.push(ip),
            Err(_) => c.error(
                resolver,
                format!("resolver \"{}\" is not an IP address", resolver.get_ref()),
            ),
        }
    }
    r
}

fn control_socket(c: &mut Checker<'_>, s: &Spanned<String>) -> Option<PathBuf> {
    if s.get_ref().is_empty() {
        c.error(
            s,
            "control_socket is empty; give a path such as /run/tollgate/control.sock",
        );
        return None;
    }
    Some(PathBuf::from(s.get_ref()))
}

fn pin_dir(c: &mut Checker<'_>, d: &Spanned<String>) -> Option<PathBuf> {
    c.absolute_path(
        d,
        "redirect.pin_dir must be an absolute path on bpffs, such as /sys/fs/bpf/tollgate",
    )
}

fn exec_socket(c: &mut Checker<'_>, s: &Spanned<String>) -> Option<PathBuf> {
    c.absolute_path(s, "redirect.exec_socket must be an absolute path")
}

fn check_protect(
    c: &mut Checker<'_>,
    raw: &Spanned<RawProtect>,
    targets: &TargetSet,
    has_redirect: bool,
) -> Option<ProtectSettings> {
    if !has_redirect {
        c.error(
            raw,
            "[protect] needs [redirect]: protection tells redirected connections from those that skipped the redirect, and pins its program under redirect.pin_dir",
        );
        return None;
    }
    let p = raw.get_ref();
    let mode = match p.mode.get_ref().as_str() {
        "audit" => ProtectMode::Audit,
        "deny" => ProtectMode::Deny,
        other => {
            c.error(
                &p.mode,
                format!("protect.mode = \"{other}\" is not known; use \"audit\" or \"deny\""),
            );
            return None;
        }
    };
    let names = match &p.targets {
        None => None,
        Some(list) => {
            let mut names = Vec::new();
            for name in list {
                if targets.get(name.get_ref()).is_none() {
                    c.error(
                        name,
                        format!(
                            "protect.targets names \"{}\", which no [[target]] is called",
                            name.get_ref()
                        ),
                    );
                } else {
                    names.push(name.get_ref().clone());
                }
            }
            if list.is_empty() {
                c.error(
                    raw,
                    "protect.targets is empty; name at least one target, or leave the key out to protect every target",
                );
            }
            Some(names)
        }
    };
    Some(ProtectSettings {
        mode,
        targets: names,
    })
}

fn check_cgroups(c: &mut Checker<'_>, raw: &[RawCgroup]) -> Vec<GovernedCgroup> {
    let mut cgroups = Vec::new();
    for g in raw {
        let path = g.path.get_ref().trim();
        if path.is_empty() || path.split('/').any(|p| p == "..") {
            c.error(
                &g.path,
                "cgroup path must be non-empty and must not contain \"..\"",
            );
            continue;
        }
        let unlisted = match g.unlisted.as_ref().map(|u| u.get_ref().as_str()) {
            None | Some("pass") => UnlistedPolicy::Pass,
            Some("deny") => UnlistedPolicy::Deny,
            Some(other) => {
                if let Some(u) = &g.unlisted {
                    c.error(
                        u,
                        format!("unlisted = \"{other}\" is not known; use \"pass\" or \"deny\""),
                    );
                }
                continue;
            }
        };
        cgroups.push(GovernedCgroup {
            path: PathBuf::from(path),
            unlisted,
        });
    }
    cgroups
}
