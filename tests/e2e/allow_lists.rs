//! Allow-list policies through a listener: the shipped
//! `policies/ci-readonly.toml` in front of a real server, with psql.

use std::process::Output;

use tollgate_tests::*;

/// The shipped read-only policy, its target placeholder aimed at the
/// harness's target `pg` (its tables are the file's own placeholders).
fn ci_readonly() -> String {
    let path = workspace_root().join("policies/ci-readonly.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("targets = [\"ci-readonly-*\"]"), "{text}");
    text.replace("targets = [\"ci-readonly-*\"]", "targets = [\"pg\"]")
}

const SCHEMA: &str = "create table example_orders(id int, total int); \
    insert into example_orders values (1, 10), (2, 32); \
    create table secrets(s text); insert into secrets values ('k')";

/// One psql session through the agent running each command in turn, going
/// on after errors.
fn session(port: u16, commands: &[&str]) -> Output {
    let mut cmd = psql_command(port, "select 'start'");
    cmd.args(["-v", "ON_ERROR_STOP=0"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.output().unwrap()
}

#[test]
fn ci_readonly_refuses_a_function_outside_its_list_and_runs_a_listed_read() {
    let g = Governed::start(&ci_readonly(), SCHEMA, "");
    let out = session(
        g.port,
        &[
            // lo_create has an effect the server keeps: it must not run.
            "select lo_create(4242)",
            "select count(*), sum(total), lower('OK') from example_orders",
            "select s from secrets",
            "set search_path = pg_catalog",
            "show standard_conforming_strings",
            "selec 1",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The refusals leave the session usable: every allowed command ran.
    assert_eq!(stdout, "start\n2|42|ok\non\n", "stderr: {stderr}");
    for want in [
        "ERROR:  tollgate: SELECT denied by rule \"ci-readonly-functions\": only the built-in functions listed in ci-readonly.toml may be called on this read-only target",
        "ERROR:  tollgate: SELECT denied by rule \"ci-readonly-tables\": only the tables listed in ci-readonly.toml may be read on this target",
        "ERROR:  tollgate: SET denied by rule \"ci-readonly-no-settings\": settings cannot be changed on a read-only target",
        "denied by rule \"ci-readonly-unparsable\"",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in\n{stderr}");
    }
    assert_eq!(stderr.matches("ERROR:").count(), 4, "{stderr}");
    assert_eq!(
        g.server("select count(*) from pg_largeobject_metadata where oid = 4242"),
        "0"
    );
}
