//! Rendering `tollgate status` for a terminal.

use std::fmt::Write as _;

use serde_json::Value;

use crate::control::StatusReport;

/// Formats a status report as aligned tables.
pub fn print_status(report: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tollgate {} (pid {}), configuration {}",
        report.version, report.pid, report.config
    );

    let _ = writeln!(out, "\nListeners:");
    let rows: Vec<Vec<String>> = report
        .listeners
        .iter()
        .map(|l| vec![l.listen.clone(), l.target.clone(), l.upstream.clone()])
        .collect();
    table(&mut out, &["LISTEN", "TARGET", "UPSTREAM"], &rows);

    if let Some(policy) = &report.policy {
        let _ = writeln!(
            out,
            "\nPolicy: {} rules from {} files, digest {}",
            policy.rules,
            policy.files.len(),
            policy.digest
        );
        if let Some(source) = &policy.source {
            let _ = writeln!(
                out,
                "  from {}, revision {}{}",
                source.origin,
                source.revision.as_deref().unwrap_or("(the cached copy)"),
                source
                    .last_error
                    .as_ref()
                    .map(|e| format!("; last poll: {e}"))
                    .unwrap_or_default()
            );
        }
    }
    if let Some(shared) = &report.shared_approvals {
        let _ = writeln!(
            out,
            "\nShared approvals: requests listed as host {}; database {}; {} decisions of the review server applied",
            shared.host,
            if shared.connected {
                "connected".to_string()
            } else {
                format!(
                    "UNREACHABLE ({}); held statements wait here until it is back or they time out",
                    shared.last_error.as_deref().unwrap_or("not connected yet")
                )
            },
            shared.decisions_applied
        );
    }

    let _ = writeln!(out, "\nTargets:");
    let rows: Vec<Vec<String>> = report
        .targets
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.protocol.clone(),
                t.address.clone(),
                t.ports.join(","),
                t.login.clone(),
            ]
        })
        .collect();
    table(
        &mut out,
        &["NAME", "PROTOCOL", "ADDRESS", "PORTS", "LOGIN"],
        &rows,
    );

    match &report.redirect {
        None => {
            let _ = writeln!(out, "\nTransparent redirect: off (no [redirect] section)");
        }
        Some(r) => {
            let k = &r.kernel;
            let _ = writeln!(
                out,
                "\nTransparent redirect: on, proxy at {}; exec cgroup {}",
                r.listening.join(" and "),
                r.exec_cgroup
            );
            let _ = writeln!(
                out,
                "  kernel: {} redirected, {} denied, {} passed, {} errors; {} origin records pending; {} pinned objects",
                k.redirected, k.denied, k.passed, k.errors, r.pending_origins, r.pinned.len()
            );
            let rows: Vec<Vec<String>> = r
                .cgroups
                .iter()
                .map(|c| {
                    vec![
                        str_of(&c["path"]).unwrap_or("?").to_string(),
                        c["id"].as_u64().map_or("?".into(), |i| i.to_string()),
                        str_of(&c["unlisted"]).unwrap_or("?").to_string(),
                        cgroup_state(c),
                        kernel_programs(c),
                    ]
                })
                .collect();
            table(
                &mut out,
                &["CGROUP", "ID", "UNLISTED", "STATE", "KERNEL PROGRAMS"],
                &rows,
            );
            for c in &r.cgroups {
                let state = str_of(&c["kernel"]["state"]).unwrap_or("unknown");
                if state == "attached" {
                    continue;
                }
                let path = str_of(&c["path"]).unwrap_or("?");
                let why = match str_of(&c["kernel"]["error"]) {
                    Some(e) => e.to_string(),
                    None => format!("the kernel reports the redirect programs {state} on it"),
                };
                let _ = writeln!(
                    out,
                    "  warning: {path} is not governed as configured: {why}; its pins were removed or its programs detached behind the agent's back; restart the agent to attach again"
                );
            }
            match &r.jobs {
                None => {
                    let _ = writeln!(
                        out,
                        "\nJob timeline: off (redirect.job_timeline = false, or the kernel lacks what it needs: see the agent's log)"
                    );
                }
                Some(j) => {
                    let _ = writeln!(
                        out,
                        "\nJob timeline: {} jobs open; {} kernel events, {} dropped in the kernel, {} by the agent (tollgate jobs list)",
                        j.open.len(),
                        j.events_sent,
                        j.events_dropped_in_kernel,
                        j.events_dropped_by_agent
                    );
                    let rows: Vec<Vec<String>> = j
                        .open
                        .iter()
                        .map(|o| {
                            vec![
                                o.job.to_string(),
                                o.cgroup.clone(),
                                format!("{}s", o.open_s),
                            ]
                        })
                        .collect();
                    if !rows.is_empty() {
                        table(&mut out, &["JOB", "CGROUP", "OPEN"], &rows);
                    }
                }
            }
            match &r.protect {
                None => {
                    let _ = writeln!(out, "\nProtect: off (no [protect] section)");
                }
                Some(p) => {
                    let s = &p.stats;
                    let ours: Vec<String> = p
                        .kernel
                        .programs
                        .iter()
                        .filter(|k| k.ours)
                        .map(|k| format!("{} {} (id {})", k.attach_point, k.name, k.id))
                        .collect();
                    let _ = writeln!(
                        out,
                        "\nProtect: {} on {} ({}{}) for {}; kernel: {}",
                        p.mode,
                        p.cgroup,
                        p.kernel.state,
                        if p.readopted { ", re-adopted" } else { "" },
                        p.targets.join(", "),
                        if ours.is_empty() {
                            "none of ours attached".to_string()
                        } else {
                            ours.join(", ")
                        }
                    );
                    let _ = writeln!(
                        out,
                        "  bypass attempts: {} audited, {} denied; {} of the agent's own connects exempt; {} reports dropped",
                        s.audited, s.denied, s.exempt, s.dropped
                    );
                    if p.kernel.state != "attached" {
                        let _ = writeln!(
                            out,
                            "  warning: the kernel does not have the protect programs on {}: {}; restart the agent to attach them again",
                            p.cgroup,
                            p.kernel.error.as_deref().unwrap_or("their pins were removed or the programs detached")
                        );
                    }
                }
            }
        }
    }

    if let Some(r) = &report.recording {
        let _ = writeln!(
            out,
            "\nRecording: {} to {}; {} events lost, {} queued, {} sessions refused; {}; {} pruned ({} bytes)",
            if r.failed { "FAILED" } else { "ok" },
            r.dir,
            r.events_lost,
            r.queued,
            r.sessions_refused,
            match &r.signing_key_id {
                Some(id) => format!("signed with key {id}"),
                None => "unsigned".to_string(),
            },
            r.pruned,
            r.pruned_bytes
        );
        if let Some(u) = &r.upload {
            let _ = writeln!(
                out,
                "Upload: to bucket {}: {} recordings ({} bytes of at most {}) on this host, oldest closed one waiting {} s; {} uploaded, {} already there, {} failed, {} conflicts{}",
                u.bucket,
                u.spool_recordings,
                u.spool_bytes,
                u.max_spool_size,
                u.oldest_unshipped_seconds,
                u.uploaded,
                u.already_present,
                u.failed,
                u.conflicts,
                u.last_error
                    .as_ref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
            if let Some(full) = &u.spool_full {
                let _ = writeln!(out, "  SPOOL FULL: {full}");
            }
        }
        if let Some(why) = &r.failure {
            let _ = writeln!(
                out,
                "  failure: {why} (on_failure = {}: {})",
                r.on_failure,
                if r.on_failure == "refuse" {
                    "new sessions are refused until the agent restarts"
                } else {
                    "sessions are served and lost events counted"
                }
            );
        }
    }

    if !report.held.is_empty() {
        let _ = writeln!(
            out,
            "\nStopped by on_match ({}; `tollgate thaw WHAT` lets it run):",
            report.held.len()
        );
        let rows: Vec<Vec<String>> = report
            .held
            .iter()
            .map(|h| {
                let what = match (&h.cgroup, h.pid) {
                    (Some(cgroup), _) => cgroup.clone(),
                    (None, Some(pid)) => pid.to_string(),
                    (None, None) => "?".to_owned(),
                };
                vec![what, h.rule.clone(), h.session.clone()]
            })
            .collect();
        table(&mut out, &["WHAT", "RULE", "SESSION"], &rows);
    }

    let _ = writeln!(out, "\nOpen sessions: {}", report.sessions.len());
    let rows: Vec<Vec<String>> = report
        .sessions
        .iter()
        .map(|s| {
            let i = &s.info;
            let id = &i["identity"];
            let user = match (str_of(&id["user"]), id["uid"].as_u64()) {
                (Some(u), Some(uid)) => format!("{u}({uid})"),
                (None, Some(uid)) => uid.to_string(),
                _ => "?".into(),
            };
            let ci = &id["ci"];
            let ci = match (str_of(&ci["provider"]), str_of(&ci["repository"])) {
                (Some(p), Some(r)) => format!("{p}:{r}"),
                (Some(p), None) => p.to_string(),
                _ => "-".into(),
            };
            vec![
                str_of(&i["id"]).unwrap_or("?").to_string(),
                str_of(&i["target"]).unwrap_or("?").to_string(),
                str_of(&i["arrival"]).unwrap_or("?").to_string(),
                str_of(&i["upstream"]).unwrap_or("?").to_string(),
                id["pid"].as_u64().map_or("?".into(), |p| p.to_string()),
                user,
                exe_cell(id),
                ci,
                format!("{:.0}s", s.open_seconds),
                s.bytes_from_client.to_string(),
                s.bytes_from_upstream.to_string(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        table(
            &mut out,
            &[
                "SESSION",
                "TARGET",
                "VIA",
                "UPSTREAM",
                "PID",
                "USER",
                "EXE",
                "CI",
                "OPEN",
                "BYTES_IN",
                "BYTES_OUT",
            ],
            &rows,
        );
    }
    out
}

/// The STATE cell: the kernel's answer, not the agent's memory of it.
fn cgroup_state(c: &Value) -> String {
    match str_of(&c["kernel"]["state"]) {
        Some("attached") if c["readopted"].as_bool() == Some(true) => "re-adopted".into(),
        Some("attached") => "attached".into(),
        Some(other) => other.to_uppercase(),
        // An agent from before the kernel view was reported.
        None => "?".into(),
    }
}

/// `connect4:12 connect6:13 sock_ops:14 sendmsg4:15 sendmsg6:16`, foreign
/// programs marked with `!`.
fn kernel_programs(c: &Value) -> String {
    let programs = c["kernel"]["programs"].as_array();
    let cells: Vec<String> = programs
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{}{}:{}",
                if p["ours"].as_bool() == Some(true) {
                    ""
                } else {
                    "!"
                },
                str_of(&p["attach_point"]).unwrap_or("?"),
                p["id"].as_u64().map_or("?".into(), |i| i.to_string())
            )
        })
        .collect();
    if cells.is_empty() {
        "-".into()
    } else {
        cells.join(" ")
    }
}

fn str_of(v: &Value) -> Option<&str> {
    v.as_str()
}

fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    if rows.is_empty() {
        let _ = writeln!(out, "  (none)");
        return;
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::from(" ");
        for (cell, w) in cells.zip(&widths) {
            let _ = write!(l, " {cell:<w$}");
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
}

/// The executable of a session's identity, marked when it is not the one
/// that connected (or could not be compared): exe rules do not apply then.
fn exe_cell(identity: &serde_json::Value) -> String {
    let exe = str_of(&identity["exe"]).unwrap_or("?");
    match str_of(&identity["instance"]["verdict"]) {
        Some("changed") => format!("{exe} [CHANGED since connect]"),
        Some("unverified") => format!("{exe} [unverified]"),
        _ => exe.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_executable_that_changed_since_connect_is_marked() {
        let same = json!({"exe": "/usr/bin/psql", "instance": {"verdict": "same"}});
        assert_eq!(exe_cell(&same), "/usr/bin/psql");
        assert_eq!(exe_cell(&json!({"exe": "/usr/bin/psql"})), "/usr/bin/psql");
        let changed = json!({"exe": "/usr/bin/psql", "instance": {"verdict": "changed"}});
        assert_eq!(exe_cell(&changed), "/usr/bin/psql [CHANGED since connect]");
        let unverified = json!({"instance": {"verdict": "unverified"}});
        assert_eq!(exe_cell(&unverified), "? [unverified]");
    }

    #[test]
    fn the_state_cell_is_the_kernels_answer() {
        let programs = json!([
            {"attach_point": "connect4", "id": 7, "name": "tollgate_connec", "ours": true},
            {"attach_point": "connect6", "id": 8, "name": "tollgate_connec", "ours": true},
            {"attach_point": "sock_ops", "id": 9, "name": "tollgate_sockop", "ours": true},
            {"attach_point": "connect4", "id": 40, "name": "other", "ours": false},
        ]);
        let attached =
            json!({"readopted": false, "kernel": {"state": "attached", "programs": programs}});
        assert_eq!(cgroup_state(&attached), "attached");
        assert_eq!(
            kernel_programs(&attached),
            "connect4:7 connect6:8 sock_ops:9 !connect4:40"
        );
        let readopted = json!({"readopted": true, "kernel": {"state": "attached", "programs": []}});
        assert_eq!(cgroup_state(&readopted), "re-adopted");
        // The agent remembers attaching; the kernel says otherwise: the kernel wins.
        let detached = json!({"readopted": false, "kernel": {"state": "detached", "programs": []}});
        assert_eq!(cgroup_state(&detached), "DETACHED");
        assert_eq!(kernel_programs(&detached), "-");
        assert_eq!(cgroup_state(&json!({"readopted": false})), "?");
    }
}
