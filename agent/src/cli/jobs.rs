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
    /// The CI job, as the first process's identity names it.
    ci: Option<String>,
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
            ci: None,
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
            s.ci = h.identity.ci.as_ref().map(ci_line);
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

/// A CI job in one line: provider, repository, run and job.
fn ci_line(ci: &crate::identity::CiContext) -> String {
    format!(
        "{} {} run {} job {}{}",
        ci.provider.as_str(),
        ci.repository.as_deref().unwrap_or("?"),
        ci.run_id.as_deref().unwrap_or("?"),
        ci.job.as_deref().unwrap_or("?"),
        if ci.verified { "" } else { " (claimed)" }
    )
}

fn print_list(jobs: &[JobSummary]) {
    println!(
        "{:<36}  {:<24}  {:>8}  {:>8}  {:>7}  {:>6}  {:<6}  CGROUP / CI JOB",
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
        if let Some(ci) = &j.ci {
            println!("{:38}CI {ci}", "");
        }
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
    // Events without a time of their own (a drop marker, the close) keep
    // their place in the recording: never before the event recorded ahead
    // of them (the header's start is only to the millisecond).
    let mut last_at = 0;
    for e in rec.events() {
        let at = match &e.event {
            Event::ProcessExec(x) => x.at_unix_us,
            Event::ProcessFork(x) => x.at_unix_us,
            Event::ProcessExit(x) => x.at_unix_us,
            Event::Connect(x) => x.at_unix_us,
            Event::JobSession(x) => x.at_unix_us,
            _ => start_us.saturating_add(e.t_us).max(last_at),
        };
        last_at = at;
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
        ci_job: h.identity.ci.as_ref().map(ci_line),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::config::Protocol;
    use crate::events::{
        Arrival, CloseReason, EventSink, SessionEvent, SessionInfo, StatementEvent,
    };
    use crate::identity::ProcessIdentity;
    use crate::policy::Action;
    use crate::recording::format::{
        ConnectRecord, JobSessionRecord, ProcessExecRecord, ProcessExitRecord,
    };
    use crate::recording::{Recorder, RecorderSettings};

    fn info(id: Uuid, arrival: Arrival, target: &str, job: &JobRecord) -> Arc<SessionInfo> {
        let unspecified: SocketAddr = "0.0.0.0:0".parse().unwrap();
        Arc::new(SessionInfo {
            id,
            started_at: SystemTime::now(),
            arrival,
            local: unspecified,
            client: unspecified,
            target: target.to_string(),
            protocol: Protocol::Postgres,
            upstream: job.cgroup.clone(),
            identity: ProcessIdentity {
                pid: Some(100),
                ..ProcessIdentity::default()
            },
            kernel: None,
            job: Some(job.clone()),
        })
    }

    fn job_event(job: Uuid, event: Event) -> SessionEvent {
        SessionEvent::Job {
            session: job,
            record: Arc::new(event),
        }
    }

    fn closed(session: Uuid) -> SessionEvent {
        SessionEvent::Closed {
            session,
            bytes_from_client: 0,
            bytes_from_upstream: 0,
            duration: Duration::from_millis(5),
            reason: CloseReason::Completed,
        }
    }

    /// A job that runs psql, whose session sends a refused statement, and
    /// a connect the redirect denied: two recordings linked both ways.
    fn record_job(dir: &Path) -> (Uuid, Uuid) {
        let (sink, handle) = Recorder::start(RecorderSettings::new(dir)).unwrap();
        let job = JobRecord {
            id: Uuid::now_v7(),
            cgroup: "tollgate.exec/exec-100-0".to_string(),
            cgroup_id: 77,
        };
        let session = Uuid::now_v7();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        sink.emit(&SessionEvent::Started(info(
            job.id,
            Arrival::Job,
            "exec-100-0",
            &job,
        )));
        sink.emit(&job_event(
            job.id,
            Event::ProcessExec(ProcessExecRecord {
                at_unix_us: now,
                pid: 101,
                ppid: 100,
                uid: 0,
                exe: "/usr/bin/psql".into(),
                args: vec!["psql".into(), "-c".into(), "drop table t".into()],
                args_truncated: false,
            }),
        ));
        sink.emit(&job_event(
            job.id,
            Event::JobSession(JobSessionRecord {
                at_unix_us: now + 1000,
                session,
                target: "db".into(),
                pid: Some(101),
            }),
        ));
        sink.emit(&SessionEvent::Started(info(
            session,
            Arrival::Redirect,
            "db",
            &job,
        )));
        sink.emit(&SessionEvent::Statement(Arc::new(StatementEvent {
            session,
            text: "drop   table\n t".into(),
            command: "DROP TABLE".into(),
            kind: None,
            fingerprint: None,
            action: Action::Deny,
            refused: true,
            rule: Some("no-drop".into()),
            rules: vec!["no-drop".into()],
            reason: "denied".into(),
        })));
        sink.emit(&closed(session));
        sink.emit(&job_event(
            job.id,
            Event::Connect(ConnectRecord {
                // Later than anything the session recorded.
                at_unix_us: now + 10_000_000,
                pid: 101,
                comm: "psql".into(),
                destination: "192.0.2.1:443".parse().unwrap(),
                verdict: "deny".into(),
                target: None,
            }),
        ));
        sink.emit(&job_event(
            job.id,
            Event::ProcessExit(ProcessExitRecord {
                at_unix_us: now + 10_000_001,
                pid: 101,
                comm: "psql".into(),
                exit_code: Some(1),
                signal: None,
            }),
        ));
        sink.emit(&closed(job.id));
        assert_eq!(handle.shutdown().lost, 0);
        (job.id, session)
    }

    #[test]
    fn a_jobs_timeline_merges_its_sessions_statements_in_time_order() {
        let tmp = tempfile::tempdir().unwrap();
        let (job, session) = record_job(tmp.path());
        let by_cgroup = find_job(tmp.path(), "exec-100-0").unwrap();
        assert_eq!(find_job(tmp.path(), &job.to_string()).unwrap(), by_cgroup);
        assert_eq!(
            find_job(tmp.path(), "/tollgate.exec/exec-100-0").unwrap(),
            by_cgroup
        );
        assert!(find_job(tmp.path(), "exec-999-0").is_err());
        // A session recording is not a job's.
        let session_file = recording::locate(tmp.path(), session).unwrap();
        let not_a_job = recording::read_recording(&session_file).unwrap();
        assert!(timeline(tmp.path(), &not_a_job).is_err());

        let rec = recording::read_recording(&by_cgroup).unwrap();
        let t = timeline(tmp.path(), &rec).unwrap();
        assert!(t.complete);
        assert!(t.missing_sessions.is_empty());
        let kinds: Vec<&str> = t
            .entries
            .iter()
            .map(|e| match &e.event {
                Event::ProcessExec(_) => "exec",
                Event::JobSession(_) => "session",
                Event::Statement(_) => "statement",
                Event::Closed { .. } if e.session.is_some() => "session closed",
                Event::Closed { .. } => "job closed",
                Event::Connect(_) => "connect",
                Event::ProcessExit(_) => "exit",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "exec",
                "session",
                "statement",
                "session closed",
                "connect",
                "exit",
                "job closed"
            ]
        );
        let statement = t
            .entries
            .iter()
            .find(|e| matches!(e.event, Event::Statement(_)))
            .unwrap();
        assert_eq!(statement.session, Some(session));

        let summary = JobSummary::of(&by_cgroup, None);
        assert_eq!(summary.job, Some(job));
        assert_eq!(
            (
                summary.commands,
                summary.sessions,
                summary.connects_denied,
                summary.exits_failed
            ),
            (1, 1, 1, 1)
        );
        assert!(summary.complete);
        // Job recordings verify like session recordings.
        let report = recording::verify(&by_cgroup);
        assert!(report.complete && report.problem.is_none(), "{report:?}");
    }
}
