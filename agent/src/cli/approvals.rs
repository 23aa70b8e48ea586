//! `tollgate approvals`: the reviewer API from a terminal.

use std::path::PathBuf;
use std::process::ExitCode;

use hyper::Method;
use serde_json::{json, Value};

use super::{ApprovalsCommand, ApprovalsConn};
use crate::approval::client;
use crate::config::{Config, DEFAULT_APPROVALS_SOCKET};

/// Runs one `tollgate approvals` subcommand.
pub fn approvals_command(command: ApprovalsCommand) -> ExitCode {
    let (conn, method, path, body) = match &command {
        ApprovalsCommand::List { conn } => (conn, Method::GET, "/v1/requests".to_owned(), None),
        ApprovalsCommand::Show { conn, id } => (
            conn,
            Method::GET,
            format!("/v1/requests/{}", escape(id)),
            None,
        ),
        ApprovalsCommand::Approve {
            conn,
            id,
            reason,
            edit,
            grant,
        } => (
            conn,
            Method::POST,
            format!("/v1/requests/{}/approve", escape(id)),
            Some(json!({
                "reason": reason,
                "edit": edit,
                "grant": grant.map(|d| humantime::format_duration(d).to_string()),
            })),
        ),
        ApprovalsCommand::Deny { conn, id, reason } => (
            conn,
            Method::POST,
            format!("/v1/requests/{}/deny", escape(id)),
            Some(json!({ "reason": reason })),
        ),
        ApprovalsCommand::Tokens(tokens) => return super::tokens::tokens_command(tokens),
        ApprovalsCommand::Grants { conn, revoke, all } => match revoke {
            Some(id) => (
                conn,
                Method::DELETE,
                format!("/v1/grants/{}", escape(id)),
                None,
            ),
            None if *all => (conn, Method::GET, "/v1/grants?all=1".to_owned(), None),
            None => (conn, Method::GET, "/v1/grants".to_owned(), None),
        },
        ApprovalsCommand::Watch { conn } => return watch_command(conn),
    };
    let socket = socket_of(conn);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let answer = runtime.block_on(client::call(&socket, method, &path, body.as_ref()));
    let (status, value) = match answer {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if status != 200 {
        let message = value["error"].as_str().unwrap_or("no reason given");
        eprintln!("tollgate: refused (HTTP {status}): {message}");
        return ExitCode::FAILURE;
    }
    if conn.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    let text = match &command {
        ApprovalsCommand::List { .. } => list_text(&value),
        ApprovalsCommand::Show { .. } => show_text(&value),
        ApprovalsCommand::Approve { id, .. } => approve_text(id, &value),
        ApprovalsCommand::Deny { id, .. } => format!("denied {id}\n"),
        ApprovalsCommand::Grants {
            revoke: Some(id), ..
        } => format!("revoked grant {id}\n"),
        ApprovalsCommand::Grants { .. } => grants_text(&value),
        ApprovalsCommand::Watch { .. } => String::new(),
        // Answered above, without the agent.
        ApprovalsCommand::Tokens(_) => String::new(),
    };
    print!("{text}");
    ExitCode::SUCCESS
}

/// `tollgate approvals watch`: events as they happen, until Ctrl-C or the
/// agent ends the stream.
fn watch_command(conn: &ApprovalsConn) -> ExitCode {
    let socket = socket_of(conn);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = conn.json;
    let print = move |event: Value| {
        if json {
            println!("{event}");
        } else {
            print!("{}", watch_line(&event));
        }
    };
    let watched = runtime.block_on(async {
        tokio::select! {
            watched = client::watch(&socket, print) => Some(watched),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    match watched {
        None => ExitCode::SUCCESS,
        Some(Ok(())) => {
            eprintln!("tollgate: the agent ended the watch (it stopped or restarted)");
            ExitCode::FAILURE
        }
        Some(Err(e)) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One line of `approvals watch`: time, event, request, requester, target,
/// statement.
fn watch_line(event: &Value) -> String {
    let at = event["at"].as_u64().map_or_else(
        || "-".to_owned(),
        |secs| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
            )
            .to_string()
        },
    );
    let kind = str_of(event, "event");
    if kind == "lagged" {
        return format!(
            "{at}  lagged            missed {} events (this watcher fell behind)\n",
            event["missed"].as_u64().unwrap_or(0)
        );
    }
    let r = &event["request"];
    let context = &r["context"];
    let outcome = &r["outcome"];
    let by = match (outcome["outcome"].as_str(), kind) {
        (Some("approved"), _) => outcome["by"]
            .as_array()
            .map(|by| {
                let names: Vec<&str> = by.iter().filter_map(Value::as_str).collect();
                format!(" by {}", names.join(", "))
            })
            .unwrap_or_default(),
        (Some("denied"), _) => format!(" by {}", str_of(outcome, "by")),
        (None, "approval_counted") => format!(
            " {}/{}",
            r["approvals"].as_array().map_or(0, Vec::len),
            r["approvals_needed"].as_u64().unwrap_or(1)
        ),
        (None, "edited") => format!(" by {}", str_of(r, "edited_by")),
        _ => String::new(),
    };
    format!(
        "{at}  {:<16}  {}  {}  {}  {}{by}\n",
        kind,
        str_of(r, "id"),
        who(&context["identity"]),
        str_of(context, "target"),
        short(str_of(r, "text")),
    )
}

/// `--socket`, else the configuration's, else the default (a reviewer may
/// not be able to read the agent's configuration).
fn socket_of(conn: &ApprovalsConn) -> PathBuf {
    if let Some(s) = &conn.socket {
        return s.clone();
    }
    match Config::load(&conn.config.config) {
        Ok(c) => c.agent.approvals_socket,
        Err(_) => PathBuf::from(DEFAULT_APPROVALS_SOCKET),
    }
}

/// Keeps an id from changing the request path; the agent checks its form.
fn escape(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("-")
}

/// The first line of a statement, at most 60 characters.
fn short(text: &str) -> String {
    let line = text.lines().next().unwrap_or("");
    let mut out: String = line.chars().take(60).collect();
    if line.chars().count() > 60 || text.lines().count() > 1 {
        out.push_str("...");
    }
    out
}

/// Unix seconds as an RFC 3339 time, or `-`.
fn unix_time(v: &Value) -> String {
    v.as_u64()
        .map(|t| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
            )
            .to_string()
        })
        .unwrap_or_else(|| "-".to_owned())
}

fn who(identity: &Value) -> String {
    let user = identity["user"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| identity["uid"].as_u64().map(|u| format!("uid {u}")))
        .unwrap_or_else(|| "unknown".to_owned());
    let exe = identity["exe"].as_str().unwrap_or("?");
    match identity["ci"]["repository"].as_str() {
        Some(repo) => format!("{user} {exe} ({repo})"),
        None => format!("{user} {exe}"),
    }
}

fn list_text(value: &Value) -> String {
    let Some(requests) = value.as_array().filter(|r| !r.is_empty()) else {
        return "no statements are waiting for review\n".to_owned();
    };
    let mut out = String::new();
    for r in requests {
        let context = &r["context"];
        // The review server names the agent holding each statement.
        let target = match r["host"].as_str() {
            Some(host) => format!("{host}:{}", str_of(context, "target")),
            None => str_of(context, "target").to_owned(),
        };
        out.push_str(&format!(
            "{}  {}  rule {}  {}/{} approvals  {}  {}\n",
            str_of(r, "id"),
            target,
            str_of(context, "rule"),
            r["approvals"].as_array().map_or(0, Vec::len),
            r["approvals_needed"].as_u64().unwrap_or(1),
            who(&context["identity"]),
            short(str_of(r, "text")),
        ));
    }
    out
}

fn show_text(r: &Value) -> String {
    let context = &r["context"];
    let identity = &context["identity"];
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<14} {v}\n"));
    line("request", str_of(r, "id").to_owned());
    if let Some(host) = r["host"].as_str() {
        line("held on", host.to_owned());
    }
    line("target", str_of(context, "target").to_owned());
    line("database user", str_of(context, "database_user").to_owned());
    line("rule", str_of(context, "rule").to_owned());
    if let Some(m) = context["rule_message"].as_str() {
        line("rule message", m.to_owned());
    }
    line("process", who(identity));
    if let Some(cgroup) = identity["cgroup"].as_str() {
        line("cgroup", cgroup.to_owned());
    }
    if let Some(ci) = identity["ci"].as_object() {
        let field = |k: &str| ci.get(k).and_then(Value::as_str).unwrap_or("-");
        line(
            "ci",
            format!(
                "{} {} workflow {} run {} actor {} commit {} ({})",
                field("provider"),
                field("repository"),
                field("workflow"),
                field("run_id"),
                field("actor"),
                field("commit"),
                if ci.get("verified").and_then(Value::as_bool) == Some(true) {
                    "verified"
                } else {
                    "unverified"
                }
            ),
        );
    }
    line("statement", str_of(context, "statement").to_owned());
    match context["hidden_literals"].as_u64() {
        Some(0) => {}
        Some(n) => line(
            "hidden",
            format!(
                "{n} literal(s) meeting masked columns shown as '***'; the statement runs as sent"
            ),
        ),
        None => line(
            "hidden",
            "the whole statement (it holds literals a mask rule hides that cannot be cut out)"
                .to_owned(),
        ),
    }
    if let Some(prior) = context["session_so_far"]
        .as_array()
        .filter(|p| !p.is_empty())
    {
        line(
            "session so far",
            format!("{} statement(s), oldest first:", prior.len()),
        );
        for p in prior {
            let when = unix_time(&p["at"]);
            let action = match (str_of(p, "action"), p["refused"].as_bool()) {
                (action, Some(true)) => format!("{action}, refused"),
                (action, _) => action.to_owned(),
            };
            line(
                "",
                format!("{when}  {action:<14} {}", short(str_of(p, "statement"))),
            );
        }
    }
    if let Some(by) = r["edited_by"].as_str() {
        line("edited by", by.to_owned());
        line("runs as", str_of(r, "text").to_owned());
    }
    // Each reviewer with how they authenticated (unix:UID, token:NAME).
    let approvals: Vec<String> = r["approvals"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| match x["via"].as_str() {
                    Some(via) => format!("{} ({via})", str_of(x, "by")),
                    None => str_of(x, "by").to_owned(),
                })
                .collect()
        })
        .unwrap_or_default();
    line(
        "approvals",
        format!(
            "{}/{} {}",
            approvals.len(),
            r["approvals_needed"].as_u64().unwrap_or(1),
            approvals.join(", ")
        ),
    );
    line("expires", unix_time(&r["expires_at"]));
    let outcome = match r["outcome"]["outcome"].as_str() {
        None => "pending".to_owned(),
        Some("denied") => format!(
            "denied by {}: {}",
            str_of(&r["outcome"], "by"),
            str_of(&r["outcome"], "reason")
        ),
        Some(other) => other.to_owned(),
    };
    line("outcome", outcome);
    out
}

fn approve_text(id: &str, v: &Value) -> String {
    match v["status"].as_str() {
        Some("counted") => format!(
            "approval of {id} counted: {} of {} needed\n",
            v["approvals"], v["needed"]
        ),
        _ => {
            let mut out = format!("approved {id}\n");
            if let Some(grant) = v["grant"].as_object() {
                out.push_str(&format!(
                    "grant {} until {}\n",
                    grant.get("id").and_then(Value::as_str).unwrap_or("-"),
                    grant
                        .get("expires_at")
                        .and_then(Value::as_u64)
                        .map(|t| humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t)
                        )
                        .to_string())
                        .unwrap_or_default()
                ));
            }
            out
        }
    }
}

fn grants_text(value: &Value) -> String {
    let Some(grants) = value.as_array().filter(|g| !g.is_empty()) else {
        return "no grants\n".to_owned();
    };
    let mut out = String::new();
    for g in grants {
        let subject = &g["subject"];
        let until = g["expires_at"]
            .as_u64()
            .map(|t| {
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
                )
                .to_string()
            })
            .unwrap_or_default();
        let state = match (g["revoked_by"].as_str(), g["revoked_via"].as_str()) {
            (Some(by), Some(via)) => format!("revoked by {by} ({via})"),
            (Some(by), None) => format!("revoked by {by}"),
            (None, _) => format!("until {until}"),
        };
        out.push_str(&format!(
            "{}  {}  {}  {}  {}  {}\n",
            str_of(g, "id"),
            str_of(subject, "target"),
            str_of(subject, "identity"),
            state,
            str_of(g, "rule"),
            short(str_of(g, "statement")),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::approval::{ApprovalAsk, Registry, RequestContext, Reviewer};
    use crate::identity::{CiContext, CiProvider, ProcessIdentity};
    use crate::policy::{Approver, GrantScope, ReviewSettings};

    fn pending() -> (Registry, crate::approval::RequestId) {
        let registry = Registry::new(BTreeMap::new());
        let context = RequestContext {
            target: "prod".into(),
            database_user: Some("app".into()),
            statement: "DELETE FROM orders\nWHERE id = 1".into(),
            run_text: "DELETE FROM orders\nWHERE id = 1".into(),
            hidden_literals: Some(1),
            session_so_far: vec![crate::approval::PriorStatement {
                at: 1_780_000_000,
                action: "deny".into(),
                refused: true,
                statement: "DROP TABLE orders".into(),
            }],
            fingerprint: Some("abc".into()),
            rule: "review-deletes".into(),
            rule_message: Some("deletes need a second pair of eyes".into()),
            review: Arc::new(ReviewSettings {
                approvers: vec![Approver::UnixGroup("dba".into())],
                approvals: 2,
                timeout: Duration::from_secs(600),
                grant: GrantScope::Statement,
                grant_hours: None,
            }),
            identity: ProcessIdentity {
                uid: Some(1001),
                user: Some("runner".into()),
                exe: Some("/usr/bin/psql".into()),
                cgroup: Some("/ci/job-7".into()),
                ci: Some(CiContext {
                    provider: CiProvider::GithubActions,
                    repository: Some("acme/shop".into()),
                    branch: None,
                    job: None,
                    run_id: Some("42".into()),
                    workflow: Some("deploy".into()),
                    actor: Some("octo".into()),
                    url: None,
                    commit: None,
                    runner_pid: None,
                    verified: true,
                }),
                ..ProcessIdentity::default()
            },
            session: None,
        };
        let at = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
        let (id, _outcome) = registry.submit(context, at).unwrap();
        let alice = Reviewer {
            uid: 2001,
            user: "alice".into(),
            groups: vec!["dba".into()],
            cgroup: None,
            ci_actor: None,
            via: "token:alice-laptop".into(),
        };
        registry
            .approve(&id, &alice, ApprovalAsk::default(), at)
            .unwrap();
        (registry, id)
    }

    #[test]
    fn pending_requests_are_listed_one_per_line() {
        let (registry, id) = pending();
        let listed = serde_json::to_value(registry.list()).unwrap();
        assert_eq!(
            list_text(&listed),
            format!("{id}  prod  rule review-deletes  1/2 approvals  runner /usr/bin/psql (acme/shop)  DELETE FROM orders...\n")
        );
        assert_eq!(
            list_text(&serde_json::json!([])),
            "no statements are waiting for review\n"
        );
    }

    #[test]
    fn a_request_is_shown_with_its_context() {
        let (registry, id) = pending();
        let shown = show_text(&serde_json::to_value(registry.show(&id).unwrap()).unwrap());
        for line in [
            format!("request        {id}"),
            "target         prod".to_owned(),
            "database user  app".to_owned(),
            "rule           review-deletes".to_owned(),
            "rule message   deletes need a second pair of eyes".to_owned(),
            "process        runner /usr/bin/psql (acme/shop)".to_owned(),
            "cgroup         /ci/job-7".to_owned(),
            "ci             github_actions acme/shop workflow deploy run 42 actor octo commit - (verified)"
                .to_owned(),
            "hidden         1 literal(s) meeting masked columns shown as '***'; the statement runs as sent".to_owned(),
            "session so far 1 statement(s), oldest first:".to_owned(),
            "               2026-05-28T20:26:40Z  deny, refused  DROP TABLE orders".to_owned(),
            "approvals      1/2 alice (token:alice-laptop)".to_owned(),
            "expires        2026-05-28T20:36:40Z".to_owned(),
            "outcome        pending".to_owned(),
        ] {
            assert!(shown.contains(&format!("{line}\n")), "{line}\nin\n{shown}");
        }
    }
}
