//! Human and machine renderings of a [`Recording`]: the transcript that
//! `tollgate recordings show` prints, the paced timeline of `replay`, and
//! the JSON lines of `export`. `show` and `replay` share the per-event
//! formatting, so they print the same lines.

use std::fmt::Write as _;
use std::io;
use std::time::Duration;

use super::format::{Event, EventRecord, Header, Record};
use super::reader::Recording;

struct Paint {
    on: bool,
}

impl Paint {
    fn wrap(&self, code: &str, s: &str) -> String {
        if self.on {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    fn bold(&self, s: &str) -> String {
        self.wrap("1", s)
    }
    fn dim(&self, s: &str) -> String {
        self.wrap("2", s)
    }
    fn verdict(&self, action: &str, refused: bool) -> String {
        let label = format!("{:<6}", action.to_uppercase());
        let code = if refused {
            "1;31"
        } else if action == "allow" {
            "32"
        } else {
            "33"
        };
        self.wrap(code, &label)
    }
}

/// The session as a readable transcript: header, identity, each event with
/// its offset from the start (statements with their verdict and rule), and
/// the close. `color` adds ANSI colours (for a terminal).
pub fn render_transcript(rec: &Recording, color: bool) -> String {
    let p = Paint { on: color };
    let mut out = opening(rec, &p);
    let ssh = is_ssh(rec);
    for e in rec.events() {
        out.push_str(&event_lines(&p, e, ssh));
    }
    out.push_str(&closing(rec, &p));
    out
}

/// How [`replay`] paces the timeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplayOptions {
    /// How many times faster than real time: 1 is real time, 10 ten times
    /// faster; 0 (or anything not above 0) prints without waiting.
    pub speed: f64,
    /// The longest wait between two events, whatever the recording says
    /// (idle stretches are cut to this), when set.
    pub max_wait: Option<Duration>,
    /// ANSI colours (for a terminal).
    pub color: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            speed: 1.0,
            max_wait: None,
            color: false,
        }
    }
}

impl ReplayOptions {
    /// The wait before an event `gap_us` microseconds after the previous one.
    pub fn delay(&self, gap_us: u64) -> Duration {
        if !self.speed.is_finite() || self.speed <= 0.0 {
            return Duration::ZERO;
        }
        let secs = gap_us as f64 / 1e6 / self.speed;
        // A tiny speed would overflow Duration: bounded by a day first.
        let d = Duration::from_secs_f64(secs.min(86_400.0));
        match self.max_wait {
            Some(max) => d.min(max),
            None => d,
        }
    }
}

/// Prints the session's timeline to `out` as `show` would, waiting between
/// events as long as the recorded monotonic offsets say (divided by
/// `speed`). `sleep` does the waiting (`std::thread::sleep` in the CLI);
/// `out` is flushed after every event so a pipe sees it live. Returns the
/// total time waited.
pub fn replay(
    rec: &Recording,
    options: &ReplayOptions,
    out: &mut dyn io::Write,
    sleep: &mut dyn FnMut(Duration),
) -> io::Result<Duration> {
    let p = Paint { on: options.color };
    out.write_all(opening(rec, &p).as_bytes())?;
    out.flush()?;
    let mut waited = Duration::ZERO;
    let mut last_t = 0u64;
    let ssh = is_ssh(rec);
    for e in rec.events() {
        let delay = options.delay(e.t_us.saturating_sub(last_t));
        last_t = last_t.max(e.t_us);
        if !delay.is_zero() {
            sleep(delay);
            waited += delay;
        }
        match &e.event {
            // An SSH terminal plays back as it was seen: the host's output
            // as written (the input echoes in it).
            Event::Raw { dir, data } if ssh && dir == "server" => out.write_all(data)?,
            Event::Raw { .. } if ssh => {}
            _ => out.write_all(event_lines(&p, e, ssh).as_bytes())?,
        }
        out.flush()?;
    }
    out.write_all(closing(rec, &p).as_bytes())?;
    out.flush()?;
    Ok(waited)
}

/// The header block (or why there is none).
fn opening(rec: &Recording, p: &Paint) -> String {
    let mut out = String::new();
    match rec.header() {
        Some(h) => header_lines(&mut out, p, h),
        None => {
            let _ = writeln!(
                out,
                "{} {}: no complete header (the file was cut before the session's first record)",
                p.bold("recording"),
                rec.path.display()
            );
        }
    }
    out
}

/// A time in Unix seconds, as RFC 3339.
fn unix_time(seconds: u64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds),
    )
}

/// One line for an event of a job recording (`None` for other events).
pub fn job_event_line(event: &Event) -> Option<String> {
    let quote = |args: &[String]| {
        args.iter()
            .map(|a| {
                if !a.is_empty()
                    && a.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
                {
                    a.clone()
                } else {
                    format!("'{}'", a.replace('\'', "'\\''"))
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    Some(match event {
        Event::ProcessExec(x) => format!(
            "exec    pid {} (parent {}, uid {}) {}: {}{}",
            x.pid,
            x.ppid,
            x.uid,
            x.exe,
            quote(&x.args),
            if x.args_truncated { " …" } else { "" }
        ),
        Event::ProcessFork(x) => {
            format!("fork    pid {} from pid {} ({})", x.pid, x.ppid, x.comm)
        }
        Event::ProcessExit(x) => {
            let how = match (x.exit_code, x.signal) {
                (Some(code), _) => format!("exit code {code}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                (None, None) => "ended".to_string(),
            };
            format!("exit    pid {} ({}) {how}", x.pid, x.comm)
        }
        Event::Connect(x) => format!(
            "connect pid {} ({}) to {}: {}{}",
            x.pid,
            x.comm,
            x.destination,
            x.verdict,
            x.target
                .as_deref()
                .map(|t| format!(" to target {t}"))
                .unwrap_or_default()
        ),
        Event::JobSession(x) => format!(
            "session {} of target {}{}",
            x.session,
            x.target,
            x.pid.map(|p| format!(" by pid {p}")).unwrap_or_default()
        ),
        Event::KernelEventsDropped { count } => {
            format!("{count} process events dropped here (ring buffer or recorder queue full)")
        }
        _ => return None,
    })
}

/// The lines of one event, its offset from the start first.
/// An SSH session's terminal output as an asciicast v2 file (for existing
/// players): a header line, then `[seconds, "o", text]` per output read.
/// `None` when the recording holds no terminal output (a session without a
/// pty on a target that does not record raw bytes).
pub fn export_asciicast(rec: &Recording) -> Option<String> {
    let header = rec.header()?;
    let mut lines = Vec::new();
    for e in rec.events() {
        if let Event::Raw { dir, data } = &e.event {
            if dir == "server" {
                let at = e.t_us as f64 / 1e6;
                let text = String::from_utf8_lossy(data);
                lines.push(serde_json::json!([at, "o", text]).to_string());
            }
        }
    }
    if lines.is_empty() {
        return None;
    }
    let head = serde_json::json!({
        "version": 2,
        "width": 80,
        "height": 24,
        "timestamp": header.started_at_unix_ms / 1000,
        "title": format!("{} session {} on target {}", header.protocol, header.session, header.target),
    });
    let mut out = head.to_string();
    for line in lines {
        out.push('\n');
        out.push_str(&line);
    }
    out.push('\n');
    Some(out)
}

/// Whether `rec` is of an SSH session (its log-in reads differently).
fn is_ssh(rec: &Recording) -> bool {
    rec.header().is_some_and(|h| h.protocol == "ssh")
}

fn event_lines(p: &Paint, e: &EventRecord, ssh: bool) -> String {
    let mut out = String::new();
    let t = p.dim(&format!("+{:>10.3}s", e.t_us as f64 / 1e6));
    match &e.event {
        Event::UpstreamConnected { peer, connect_us } => {
            let _ = writeln!(
                out,
                "{t}  upstream connected to {peer} in {:.1} ms",
                *connect_us as f64 / 1e3
            );
        }
        Event::Startup {
            user,
            database,
            application_name,
            brokered_user,
        } if ssh => {
            let _ = writeln!(
                out,
                "{t}  log-in: user {}{}",
                user.as_deref().unwrap_or("?"),
                brokered_user
                    .as_deref()
                    .map(|b| format!(" (logged in to the host by the agent as {b})"))
                    .unwrap_or_default()
            );
        }
        Event::Startup {
            user,
            database,
            application_name,
            brokered_user,
        } => {
            let _ = writeln!(
                out,
                "{t}  start-up: user {} database {}{}{}",
                user.as_deref().unwrap_or("?"),
                database.as_deref().or(user.as_deref()).unwrap_or("?"),
                application_name
                    .as_deref()
                    .map(|a| format!(" application {a}"))
                    .unwrap_or_default(),
                brokered_user
                    .as_deref()
                    .map(|b| format!(" (logged in by the agent as {b})"))
                    .unwrap_or_default()
            );
        }
        Event::Statement(s) => {
            let rule = match &s.rule {
                Some(r) => format!("rule {r}"),
                None => "default".to_string(),
            };
            let _ = writeln!(
                out,
                "{t}  {} {}  [{rule}] {}",
                p.verdict(&s.action, s.refused),
                p.bold(&s.command),
                s.reason
            );
            for line in s.text.lines() {
                let _ = writeln!(out, "{:13}    {line}", "");
            }
            if let Some(len) = s.text_len {
                let _ = writeln!(
                    out,
                    "{:13}    {}",
                    "",
                    p.dim(&format!("(text cut: {len} bytes in the original)"))
                );
            }
        }
        Event::Closed {
            bytes_from_client,
            bytes_from_upstream,
            duration_us,
            reason,
        } => {
            let _ = writeln!(
                out,
                "{t}  {}: {reason} after {:.3}s ({bytes_from_client} bytes from the client, {bytes_from_upstream} from the upstream)",
                p.bold("closed"),
                *duration_us as f64 / 1e6
            );
        }
        Event::EventsLost { count } => {
            let _ = writeln!(
                out,
                "{t}  {}",
                p.wrap(
                    "1;31",
                    &format!("{count} events lost here (recorder queue full)")
                )
            );
        }
        Event::RecordingStopped { reason } => {
            let _ = writeln!(out, "{t}  {}: {reason}", p.bold("recording stopped"));
        }
        Event::Raw { dir, data } if ssh => {
            // A terminal's streams: the text, control characters escaped.
            let what = if dir == "client" {
                "input: "
            } else {
                "output:"
            };
            let text = String::from_utf8_lossy(data);
            let _ = writeln!(out, "{t}  {} {text:?}", p.dim(what));
        }
        Event::Raw { dir, data } => {
            let _ = writeln!(
                out,
                "{t}  {}",
                p.dim(&format!("{} bytes from {dir}", data.len()))
            );
        }
        Event::ExeHashed { exe_sha256, error } => {
            let what = match (exe_sha256, error) {
                (Some(digest), _) => format!("sha256 {digest}"),
                (None, Some(why)) => format!("not hashed: {why}"),
                (None, None) => "not hashed".to_string(),
            };
            let _ = writeln!(out, "{t}  executable hashed: {what}");
        }
        Event::ReviewRequested(r) => {
            let _ = writeln!(
                out,
                "{t}  {} request {} by rule {}: {} of [{}], waiting up to {}",
                p.bold("held for review:"),
                r.request,
                r.rule,
                r.approvals_needed,
                r.approvers.join(", "),
                humantime::format_duration(std::time::Duration::from_secs(r.timeout_s))
            );
        }
        Event::ReviewEnded(r) => {
            let waited =
                humantime::format_duration(std::time::Duration::from_secs(r.waited_ms / 1000));
            let who = match (&r.denied_by, r.approvals.is_empty()) {
                (Some(by), _) => match &r.denied_via {
                    Some(via) => format!(" by {by} ({via})"),
                    None => format!(" by {by}"),
                },
                (None, false) => {
                    let names: Vec<String> = r
                        .approvals
                        .iter()
                        .map(|a| match &a.via {
                            Some(via) => format!("{} ({via})", a.by),
                            None => a.by.clone(),
                        })
                        .collect();
                    format!(" by {}", names.join(", "))
                }
                (None, true) => String::new(),
            };
            let why = r
                .reason
                .as_deref()
                .map(|w| format!(": {w}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{t}  {} request {} {}{who} after {waited}{why}",
                p.bold("review:"),
                r.request,
                r.outcome
            );
            for a in &r.approvals {
                if let Some(reason) = &a.reason {
                    let _ = writeln!(out, "{:13}    {} approved: {reason}", "", a.by);
                }
            }
            if let (Some(by), Some(text)) = (&r.edited_by, &r.edited_text) {
                let _ = writeln!(out, "{:13}    edited by {by} to:", "");
                for line in text.lines() {
                    let _ = writeln!(out, "{:13}      {line}", "");
                }
            }
        }
        Event::GrantUsed(r) => {
            let _ = writeln!(
                out,
                "{t}  {} grant {} (from request {}, approved by {}), until {}",
                p.bold("runs under"),
                r.grant,
                r.request,
                r.approved_by.join(", "),
                unix_time(r.expires_at)
            );
        }
        Event::GrantGiven(r) => {
            let _ = writeln!(
                out,
                "{t}  {} {} for {} (request {}, approved by {}), until {}",
                p.bold("grant given:"),
                r.grant,
                r.identity,
                r.request,
                r.approved_by.join(", "),
                unix_time(r.expires_at)
            );
        }
        Event::GrantRevoked(r) => {
            let _ = writeln!(
                out,
                "{t}  {} {} (from request {}) by {} ({}) at {}",
                p.bold("grant revoked:"),
                r.grant,
                r.request,
                r.by,
                r.via,
                unix_time(r.at)
            );
        }
        Event::Intervention(i) => {
            let _ = writeln!(out, "{t}  {} {}", p.bold("on_match:"), i.describe());
        }
        Event::Sftp(r) => {
            let what = match (r.op.as_str(), &r.to) {
                ("file", _) => format!(
                    "{} ({} bytes read, {} written)",
                    r.path, r.bytes_read, r.bytes_written
                ),
                (_, Some(to)) => format!("{} -> {to}", r.path),
                (_, None) => r.path.clone(),
            };
            let _ = writeln!(out, "{t}  {} {} {what}", p.bold("sftp:"), r.op);
        }
        Event::ChannelExit {
            channel,
            exit_status,
            exit_signal,
        } => {
            let how = match (exit_status, exit_signal) {
                (Some(code), _) => format!("exit status {code}"),
                (None, Some(signal)) => format!("killed by signal {signal}"),
                (None, None) => "ended".to_owned(),
            };
            let _ = writeln!(out, "{t}  {} channel {channel}: {how}", p.bold("ended:"));
        }
        Event::ProcessExec(_)
        | Event::ProcessFork(_)
        | Event::ProcessExit(_)
        | Event::Connect(_)
        | Event::JobSession(_)
        | Event::KernelEventsDropped { .. } => {
            if let Some(line) = job_event_line(&e.event) {
                let _ = writeln!(out, "{t}  {line}");
            }
        }
        Event::ReviewNotified(r) => {
            let attempts = match r.attempts {
                1 => "1 attempt".to_owned(),
                n => format!("{n} attempts"),
            };
            let result = match (r.ok, &r.error) {
                (true, _) => "delivered".to_owned(),
                (false, Some(e)) => format!("failed: {e}"),
                (false, None) => "failed".to_owned(),
            };
            let _ = writeln!(
                out,
                "{t}  {} {} {} of request {} to {}: {result} ({attempts})",
                p.bold("review notification:"),
                r.kind,
                r.event,
                r.request,
                r.host
            );
        }
        Event::Unknown => {
            let _ = writeln!(out, "{t}  (an event type this version does not know)");
        }
        // Read as the statement it repeats (reader::read_from).
        Event::StatementAgain { of } => {
            let _ = writeln!(out, "{t}  (the statement of record {of} again)");
        }
    }
    out
}

/// The counts, and whether the recording is incomplete.
fn closing(rec: &Recording, p: &Paint) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} statements, {} denied{}",
        rec.statements(),
        rec.denied(),
        match rec.lost() {
            0 => String::new(),
            n => format!(", {n} events lost"),
        }
    );
    match (rec.trailer(), rec.truncated_at) {
        (Some(_), _) => {}
        (None, Some(at)) => {
            let _ = writeln!(
                out,
                "{}",
                p.wrap(
                    "1;33",
                    &format!(
                        "incomplete: the file is cut at byte {at} (agent killed or disk full)"
                    )
                )
            );
        }
        (None, None) => {
            let _ = writeln!(
                out,
                "{}",
                p.wrap(
                    "1;33",
                    "incomplete: no trailer (session still open, or the agent was killed)"
                )
            );
        }
    }
    out
}

fn header_lines(out: &mut String, p: &Paint, h: &Header) {
    let id = &h.identity;
    let _ = writeln!(out, "{} {}", p.bold("session"), h.session);
    let _ = writeln!(
        out,
        "  started   {} on {} (agent {}){}",
        h.started_at,
        h.host,
        h.agent_version,
        h.policy_digest
            .as_deref()
            .map(|d| format!(", policy {d}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "  target    {} ({}) upstream {}, via {}",
        h.target, h.protocol, h.upstream, h.arrival
    );
    let _ = writeln!(out, "  client    {} -> {}", h.client, h.local);
    let opt = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "?".to_string());
    let _ = writeln!(
        out,
        "  process   pid {} uid {}{} gid {}{} comm {}",
        opt(id.pid),
        opt(id.uid),
        id.user
            .as_deref()
            .map(|u| format!(" ({u})"))
            .unwrap_or_default(),
        opt(id.gid),
        id.group
            .as_deref()
            .map(|g| format!(" ({g})"))
            .unwrap_or_default(),
        id.comm.as_deref().unwrap_or("?")
    );
    if let Some(exe) = &id.exe {
        let _ = writeln!(
            out,
            "  exe       {exe}{}",
            id.exe_sha256
                .as_deref()
                .map(|s| format!(" sha256 {s}"))
                .unwrap_or_default()
        );
    }
    if let Some(check) = id.instance.as_ref().filter(|c| !c.exe_trusted()) {
        let verdict = match check.verdict {
            crate::identity::InstanceVerdict::Changed => "CHANGED since connect",
            _ => "not verified against connect",
        };
        let _ = writeln!(
            out,
            "  identity  {}: {} (exe rules did not apply)",
            p.wrap("1;31", verdict),
            check.reason.as_deref().unwrap_or("no reason recorded")
        );
    }
    if !id.cmdline.is_empty() {
        let _ = writeln!(out, "  cmdline   {}", id.cmdline.join(" "));
    }
    if let Some(cg) = &id.cgroup {
        let _ = writeln!(out, "  cgroup    {cg}");
    }
    if !id.ancestry.is_empty() {
        let chain: Vec<String> = id
            .ancestry
            .iter()
            .map(|a| format!("{}[{}]", a.comm, a.pid))
            .collect();
        let _ = writeln!(out, "  ancestry  {}", chain.join(" < "));
    }
    if let Some(ci) = &id.ci {
        let f = |k: &str, v: &Option<String>| {
            v.as_deref()
                .map(|v| format!(" {k} {v}"))
                .unwrap_or_default()
        };
        let _ = writeln!(
            out,
            "  ci        {}{}{}{}{}{}{}",
            ci.provider.as_str(),
            f("repo", &ci.repository),
            f("branch", &ci.branch),
            f("workflow", &ci.workflow),
            f("job", &ci.job),
            f("run", &ci.run_id),
            if ci.verified {
                " (verified)"
            } else {
                " (unverified)"
            }
        );
    }
    if let Some(k) = &h.kernel {
        let _ = writeln!(
            out,
            "  kernel    original destination {} tgid {} uid {} gid {} cgroup {} comm {}",
            k.destination, k.tgid, k.uid, k.gid, k.cgroup_id, k.comm
        );
    }
    if !id.gaps.is_empty() {
        let _ = writeln!(out, "  gaps      {}", id.gaps.join("; "));
    }
}

/// One JSON object per record, one per line (for SIEMs). A `raw` event's
/// `data` is standard base64 (RFC 4648, with padding), not an array of
/// numbers.
pub fn export_jsonl(rec: &Recording) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for r in &rec.records {
        let value = serde_json::to_value::<&Record>(r).map(|mut v| {
            if let (Record::Event(e), Some(slot)) = (r, v.pointer_mut("/event/data")) {
                if let Event::Raw { data, .. } = &e.event {
                    *slot = serde_json::Value::String(
                        base64::engine::general_purpose::STANDARD.encode(data),
                    );
                }
            }
            v
        });
        match value.and_then(|v| serde_json::to_string(&v)) {
            Ok(line) => {
                out.push_str(&line);
                out.push('\n');
            }
            // Record types serialise to JSON without failure; keep the line
            // count honest anyway.
            Err(e) => {
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "record": "unserialisable", "error": e.to_string() })
                );
            }
        }
    }
    out
}
