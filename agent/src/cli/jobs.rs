//! `tollgate jobs`: the job timeline. `list` shows the job recordings;
//! `show` prints one job's commands, connects, exits and, from the session
//! recordings it links to, the statements its sessions sent, in order.

use std::path::{Path, PathBuf};

use serde::Serialize;
use uuid::Uuid;

use super::{load_config, print_json, CliError, JobsCommand};
use crate::recording::format::JobRecord;
use crate::recording::render::job_event_line;
use crate::recording::{self, Event, Recording};

/// Runs one `tollgate jobs` subcommand.
pub fn run(command: JobsCommand) -> Result<(), CliError> {
    match command {
        JobsCommand::List {
            config,
            since,
            json,
        } => {
            let dir = load_config(&config.config)?.agent.recording_dir;
            let filter = recording::RecordingFilter {
                since: since.and_then(|d| std::time::SystemTime::now().checked_sub(d)),
                protocol: Some("job".to_string()),
                ..Default::default()
            };
            let jobs: Vec<JobSummary> = recording::list(&dir, &filter)
                .iter()
                .map(|s| JobSummary::of(&s.path, s.error.clone()))
                .collect();
            if json {
                print_json(&jobs);
            } else {
                print_list(&jobs);
            }
            Ok(())
        }
        JobsCommand::Show { config, job, json } => {
            let dir = if Path::new(&job).is_file() {
                PathBuf::new()
            } else {
                load_config(&config.config)?.agent.recording_dir
            };
            let path = find_job(&dir, &job).map_err(CliError::failed)?;
            let rec = recording::read_recording(&path)
                .map_err(|e| CliError::failed(format!("cannot read {}: {e}", path.display())))?;
            let timeline = timeline(&dir, &rec)?;
            if json {
                print_json(&timeline);
            } else {
                print_timeline(&timeline);
            }
            Ok(())
        }
    }
}

/// One line of `jobs list`.
#[derive(Debug, Serialize)]
struct JobSummary {
    path: PathBuf,
    job: Option<Uuid>,
    started_at: Option<String>,
    cgroup: Option<String>,
    commands: u64,
    sessions: u64,
    connects_denied: u64,
    exits_failed: u64,
    complete: bool,
    error: Option<String>,
}

impl JobSummary {
    fn of(path: &Path, error: Option<String>) -> JobSummary {
        let mut s = JobSummary {
            path: path.to_path_buf(),
            job: None,
            started_at: None,
            cgroup: None,
            commands: 0,
            sessions: 0,
            connects_denied: 0,
            exits_failed: 0,
            complete: false,
            error,
        };
        let rec = match recording::read_recording(path) {
            Ok(rec) => rec,
            Err(e) => {
                s.error.get_or_insert(e.to_string());
                return s;
            }
        };
        if let Some(h) = rec.header() {
            s.job = Some(h.session);
            s.started_at = Some(h.started_at.clone());
            s.cgroup = h.job.as_ref().map(|j| j.cgroup.clone());
        }
        for e in rec.events() {
            match &e.event {
                Event::ProcessExec(_) => s.commands += 1,
                Event::JobSession(_) => s.sessions += 1,
                Event::Connect(c) if c.verdict == "deny" => s.connects_denied += 1,
                Event::ProcessExit(x) if x.exit_code != Some(0) => s.exits_failed += 1,
                _ => {}
            }
        }
        s.complete = rec.trailer().is_some();
        s
    }
}

fn print_list(jobs: &[JobSummary]) {
    println!(
        "{:<36}  {:<24}  {:>8}  {:>8}  {:>7}  {:>6}  {:<6}  CGROUP",
        "JOB", "STARTED", "COMMANDS", "SESSIONS", "DENIED", "FAILED", "STATE"
    );
    for j in jobs {
        if let Some(e) = &j.error {
            println!("{}: {e}", j.path.display());
            continue;
        }
        println!(
            "{:<36}  {:<24}  {:>8}  {:>8}  {:>7}  {:>6}  {:<6}  {}",
            j.job.map(|i| i.to_string()).unwrap_or_else(|| "?".into()),
            j.started_at.as_deref().unwrap_or("?"),
            j.commands,
            j.sessions,
            j.connects_denied,
            j.exits_failed,
            if j.complete { "closed" } else { "open" },
            j.cgroup.as_deref().unwrap_or("?"),
        );
    }
}

/// Finds a job recording by file, job id, or cgroup (its path or last
/// component, the newest such job).
fn find_job(dir: &Path, job: &str) -> Result<PathBuf, String> {
    let as_path = Path::new(job);
    if as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    if let Ok(id) = Uuid::parse_str(job) {
        return recording::locate(dir, id)
            .ok_or_else(|| format!("no recording of job {job} under {}", dir.display()));
    }
    let filter = recording::RecordingFilter {
        protocol: Some("job".to_string()),
        ..Default::default()
    };
    let wanted = job.trim_start_matches('/');
    recording::list(dir, &filter)
        .into_iter()
        .rev()
        .find(|s| {
            let cgroup = s.target.as_deref().unwrap_or_default();
            cgroup == wanted
                || recording::read_recording(&s.path)
                    .ok()
                    .and_then(|r| r.header().and_then(|h| h.job.clone()))
                    .is_some_and(|j| j.cgroup.trim_start_matches('/') == wanted)
        })
        .map(|s| s.path)
        .ok_or_else(|| {
            format!(
                "\"{job}\" is neither a job recording file, a job id nor the cgroup of a job under {}",
                dir.display()
            )
        })
}

/// A job's timeline, as `jobs show` prints it.
#[derive(Debug, Serialize)]
struct Timeline {
    job: Option<JobRecord>,
    host: Option<String>,
    started_at: Option<String>,
    complete: bool,
    /// Who ran it: the first process the agent saw.
    pid: Option<u32>,
    user: Option<String>,
    ci_job: Option<String>,
    entries: Vec<Entry>,
    /// Session recordings the job links to that could not be read.
    missing_sessions: Vec<String>,
}

/// One entry of the timeline, in time order.
#[derive(Debug, Serialize)]
struct Entry {
    /// Microseconds since the Unix epoch.
    at_unix_us: u64,
    /// The session the entry comes from, for statements.
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<Uuid>,
    /// The event as recorded.
    event: Event,
}

fn timeline(dir: &Path, rec: &Recording) -> Result<Timeline, CliError> {
    let h = rec.header().ok_or_else(|| {
        CliError::failed(format!("{} has no readable header", rec.path.display()))
    })?;
    if h.protocol != "job" {
        return Err(CliError::failed(format!(
            "{} is a session recording, not a job recording (see `tollgate recordings show`)",
            rec.path.display()
        )));
    }
    let start_us = h.started_at_unix_ms.saturating_mul(1000);
    let mut entries = Vec::new();
    let mut missing = Vec::new();
    for e in rec.events() {
        let at = match &e.event {
            Event::ProcessExec(x) => x.at_unix_us,
            Event::ProcessFork(x) => x.at_unix_us,
            Event::ProcessExit(x) => x.at_unix_us,
            Event::Connect(x) => x.at_unix_us,
            Event::JobSession(x) => x.at_unix_us,
            _ => start_us.saturating_add(e.t_us),
        };
        if let Event::JobSession(s) = &e.event {
            match session_statements(dir, s.session, s.at_unix_us) {
                Ok(mut statements) => entries.append(&mut statements),
                Err(why) => missing.push(format!("{}: {why}", s.session)),
            }
        }
        entries.push(Entry {
            at_unix_us: at,
            session: None,
            event: e.event.clone(),
        });
    }
    // Stable: at equal times a session's line comes before its statements,
    // which were added before it.
    entries.sort_by_key(|e| (e.at_unix_us, e.session.is_some()));
    Ok(Timeline {
        job: h.job.clone(),
        host: Some(h.host.clone()),
        started_at: Some(h.started_at.clone()),
        complete: rec.trailer().is_some(),
        pid: h.identity.pid,
        user: h.identity.user.clone(),
        ci_job: h.identity.ci.as_ref().and_then(|c| c.job.clone()),
        entries,
        missing_sessions: missing,
    })
}

/// The statements (and the close) of session `id`, timed from `opened_us`,
/// when the job recorded the session's start (its own header's start is
/// only to the millisecond, so a statement could sort before the session).
fn session_statements(dir: &Path, id: Uuid, opened_us: u64) -> Result<Vec<Entry>, String> {
    let path = recording::locate(dir, id).ok_or("its recording is not here")?;
    let rec = recording::read_recording(&path).map_err(|e| e.to_string())?;
    let header_us = rec
        .header()
        .map(|h| h.started_at_unix_ms.saturating_mul(1000))
        .ok_or("its recording has no header")?;
    let start_us = opened_us.max(header_us);
    Ok(rec
        .events()
        .filter(|e| {
            matches!(
                e.event,
                Event::Statement(_) | Event::Closed { .. } | Event::Intervention(_)
            )
        })
        .map(|e| Entry {
            at_unix_us: start_us.saturating_add(e.t_us),
            session: Some(id),
            event: e.event.clone(),
        })
        .collect())
}

fn print_timeline(t: &Timeline) {
    let job = t.job.as_ref();
    println!(
        "Job {}  cgroup {}  host {}  started {}{}",
        job.map(|j| j.id.to_string()).unwrap_or_else(|| "?".into()),
        job.map(|j| j.cgroup.as_str()).unwrap_or("?"),
        t.host.as_deref().unwrap_or("?"),
        t.started_at.as_deref().unwrap_or("?"),
        if t.complete { "" } else { "  (still open)" }
    );
    if let Some(ci) = &t.ci_job {
        println!("CI job {ci}");
    }
    for e in &t.entries {
        let at = clock(e.at_unix_us);
        let line = match (&e.event, e.session) {
            (Event::Statement(s), Some(session)) => {
                let rule = s
                    .rule
                    .as_deref()
                    .map(|r| format!(" [rule {r}]"))
                    .unwrap_or_default();
                format!(
                    "  statement {}{rule} {}  (session {})",
                    if s.refused {
                        format!("REFUSED ({})", s.action)
                    } else {
                        s.action.clone()
                    },
                    one_line(&s.text),
                    session
                )
            }
            (Event::Closed { reason, .. }, Some(session)) => {
                format!("  session {} closed: {reason}", session)
            }
            (Event::Intervention(i), Some(session)) => {
                format!("  on_match: {}  (session {})", i.describe(), session)
            }
            (event, _) => match job_event_line(event) {
                Some(line) => line,
                None => continue,
            },
        };
        println!("{at}  {line}");
    }
    for m in &t.missing_sessions {
        println!("(session {m})");
    }
}

/// `HH:MM:SS.mmm` (UTC) of a Unix time in microseconds.
fn clock(unix_us: u64) -> String {
    let secs = unix_us / 1_000_000;
    let ms = (unix_us / 1000) % 1000;
    let day = secs % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{ms:03}",
        day / 3600,
        (day / 60) % 60,
        day % 60
    )
}

/// A statement's text on one line, cut at 120 characters.
fn one_line(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 120 {
        let cut: String = flat.chars().take(119).collect();
        format!("{cut}…")
    } else {
        flat
    }
}
