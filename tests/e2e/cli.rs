//! The command line as a user meets it: config errors, status, help.

use std::process::Command;

use tollgate_tests::{agent_binary, free_port, listener_config, succeeded};

#[test]
fn config_check_points_at_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[agent]\nidle_timeout = \"forever\"\n\n[[listener]]\nlisten = \"127.0.0.1:5000\"\ntarget = \"missing\"\n",
    )
    .unwrap();
    let out = Command::new(agent_binary())
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "invalid config exits 2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let p = path.display();
    assert!(
        stderr.contains(&format!(
            "{p}:2:16: idle_timeout \"forever\" is not a duration"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{p}:6:10: listener names target \"missing\", which is not defined"
        )),
        "{stderr}"
    );
}

#[test]
fn config_check_accepts_a_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("good.toml");
    std::fs::write(&path, listener_config(free_port(), 5432, "")).unwrap();
    let out = Command::new(agent_binary())
        .args(["config", "check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    succeeded(&out);
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("ok (1 targets, 1 listeners, 0 governed cgroups)"));
}

#[test]
fn run_refuses_an_invalid_config_without_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[[target]]\nname = \"t\"\n").unwrap();
    let out = Command::new(agent_binary())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing field `address`"), "{stderr}");
    assert!(stderr.contains("not starting"), "{stderr}");
}

#[test]
fn status_without_an_agent_says_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let out = Command::new(agent_binary())
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no agent is answering on"), "{stderr}");
    assert!(stderr.contains("is `tollgate run` running"), "{stderr}");
}

#[test]
fn help_lists_every_command() {
    let out = Command::new(agent_binary()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "config", "status", "Exit status"] {
        assert!(help.contains(cmd), "--help lacks {cmd}: {help}");
    }
}

#[test]
fn install_script_lays_out_binary_config_unit_and_service_drop_in() {
    let root = tempfile::tempdir().unwrap();
    let script = tollgate_tests::workspace_root().join("scripts/install.sh");
    let out = Command::new(&script)
        .arg("--root")
        .arg(root.path())
        .arg("--binary")
        .arg(agent_binary())
        .args([
            "--govern-service",
            "actions.runner.acme-shop.runner1.service",
            "--no-start",
        ])
        .output()
        .unwrap();
    succeeded(&out);
    let r = root.path();
    let bin = r.join("usr/local/bin/tollgate");
    assert!(bin.exists());
    let config = r.join("etc/tollgate/tollgate.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains("path = \"system.slice/actions.runner.acme-shop.runner1.service\""),
        "{text}"
    );
    let check = Command::new(&bin)
        .args(["config", "check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    succeeded(&check);
    let unit = std::fs::read_to_string(r.join("etc/systemd/system/tollgate.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/tollgate run --config /etc/tollgate/tollgate.toml"),
        "{unit}"
    );
    assert!(
        unit.contains("Before=actions.runner.acme-shop.runner1.service"),
        "{unit}"
    );
    assert!(!unit.contains('@'), "every placeholder is filled: {unit}");
    let drop_in = std::fs::read_to_string(
        r.join("etc/systemd/system/actions.runner.acme-shop.runner1.service.d/tollgate.conf"),
    )
    .unwrap();
    assert!(
        drop_in.contains("ExecStartPre=/usr/local/bin/tollgate ensure-governed"),
        "{drop_in}"
    );
    assert!(r.join("etc/tollgate/policies/default.toml").exists());

    // A second run keeps the edited configuration.
    std::fs::write(&config, format!("{text}\n# edited\n")).unwrap();
    let again = Command::new(&script)
        .arg("--root")
        .arg(r)
        .arg("--binary")
        .arg(agent_binary())
        .arg("--no-start")
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(std::fs::read_to_string(&config)
        .unwrap()
        .ends_with("# edited\n"));
}

#[test]
fn redirect_without_privileges_names_the_missing_capability() {
    if !tollgate_tests::is_root() {
        eprintln!("skipping: needs root to drop to an unprivileged user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let config = dir.path().join("t.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ncontrol_socket = \"{0}/c.sock\"\nrecording_dir = \"{0}/rec\"\n[redirect]\nport = {1}\npin_dir = \"/sys/fs/bpf/tollgate-nonroot-{2}\"\nexec_socket = \"{0}/e.sock\"\n",
            dir.path().display(),
            free_port(),
            std::process::id()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let pin_dir = format!("/sys/fs/bpf/tollgate-nonroot-{}", std::process::id());
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(agent_binary())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CAP_BPF"), "{stderr}");
    assert!(stderr.contains("explicit listeners"), "{stderr}");
    // The failed start left no directory behind on bpffs.
    assert!(
        !std::path::Path::new(&pin_dir).exists(),
        "{pin_dir} is left"
    );
}

#[test]
fn policy_commands_check_explain_and_test_the_shipped_policies() {
    let policies = tollgate_tests::workspace_root().join("policies");
    let run = |args: &[&str]| Command::new(agent_binary()).args(args).output().unwrap();

    let check = run(&["policy", "check", policies.to_str().unwrap()]);
    succeeded(&check);
    assert!(String::from_utf8_lossy(&check.stdout).starts_with("ok: "));

    let test = run(&["policy", "test", policies.to_str().unwrap()]);
    let report = String::from_utf8_lossy(&test.stdout);
    assert!(test.status.success(), "{report}");
    let last = report.lines().last().unwrap();
    assert!(last.ends_with(" passed, 0 failed"), "{last}");

    let demo = policies.join("demo.toml");
    let explain = run(&[
        "policy",
        "explain",
        "--policy",
        demo.to_str().unwrap(),
        "--target",
        "demo-db",
        "--identity",
        "user = \"runner\", ci_provider = \"github_actions\", ci_verified = true",
        "select 1; DROP TABLE customers",
    ]);
    let text = String::from_utf8_lossy(&explain.stdout);
    succeeded(&explain);
    assert!(
        text.contains("decision:       deny by rule \"no-ddl-in-ci\""),
        "{text}"
    );
    assert!(
        text.contains("client sees: tollgate: DROP TABLE denied by rule \"no-ddl-in-ci\""),
        "{text}"
    );

    // MySQL text with an executable comment: unparsable, unless resolved
    // for a server's version as the agent does; MySQL 8 skips MariaDB's.
    let hidden = "SELECT 1 /*M!100100 , (SELECT token FROM secrets) */";
    let explain_mysql = |version: Option<&str>| {
        let mut args = vec![
            "policy",
            "explain",
            "--policy",
            demo.to_str().unwrap(),
            "--target",
            "demo-mysql",
            "--dialect",
            "mysql",
        ];
        if let Some(version) = version {
            args.extend(["--server-version", version]);
        }
        args.push(hidden);
        let out = run(&args);
        succeeded(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = explain_mysql(None);
    assert!(
        text.contains("parse error:    executable comment"),
        "{text}"
    );
    let text = explain_mysql(Some("10.11.6-MariaDB"));
    assert!(
        text.contains("decision:       deny by rule \"protect-secrets\""),
        "{text}"
    );
    let text = explain_mysql(Some("8.0.36"));
    assert!(text.contains("tables read:    -"), "{text}");
    let out = run(&[
        "policy",
        "explain",
        "--policy",
        demo.to_str().unwrap(),
        "--target",
        "demo-db",
        "--server-version",
        "8.0.36",
        "SELECT 1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--server-version is for MySQL text"));
}

/// A command asked for `--json` that fails still prints JSON on stdout: an
/// object with the error, next to the message on stderr and the usual exit code.
#[test]
fn failing_json_commands_print_a_json_error_object() {
    let dir = tempfile::tempdir().unwrap();
    let json_error = |out: &std::process::Output| -> String {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout:?}"));
        value["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no \"error\" string in {value}"))
            .to_string()
    };

    let socket = dir.path().join("none.sock");
    let out = Command::new(agent_binary())
        .args(["status", "--json", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(json_error(&out).contains("no agent is answering on"));

    let suite = dir.path().join("suite");
    std::fs::create_dir(&suite).unwrap();
    std::fs::write(
        suite.join("bad.toml"),
        "[[rule]]\nname = \"r\"\naction = \"forbid\"\n[rule.match]\nkinds = [\"drop\"]\n",
    )
    .unwrap();
    let out = Command::new(agent_binary())
        .args(["policy", "test", "--json"])
        .arg(&suite)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let error = json_error(&out);
    assert!(error.contains("bad.toml:3:10:"), "{error}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml:3:10:"));
}

#[test]
fn policy_errors_point_at_file_line_and_column_and_failing_cases_fail() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[rule]]\nname = \"r\"\naction = \"forbid\"\n[rule.match]\nkinds = [\"drop\"]\n",
    )
    .unwrap();
    let out = Command::new(agent_binary())
        .args(["policy", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:3:10:", bad.display())),
        "{stderr}"
    );

    // A policy whose test expects the wrong verdict: `policy test` exits 1.
    let tests_dir = dir.path().join("suite");
    std::fs::create_dir(&tests_dir).unwrap();
    std::fs::write(
        tests_dir.join("p.toml"),
        "[[rule]]\nname = \"no-drop\"\naction = \"deny\"\n[rule.match]\nkinds = [\"drop\"]\n",
    )
    .unwrap();
    std::fs::write(
        tests_dir.join("p.tests.toml"),
        "[[case]]\nname = \"drop is allowed (wrong)\"\ntarget = \"t\"\nsql = \"drop table x\"\nexpect = \"allow\"\n",
    )
    .unwrap();
    let out = Command::new(agent_binary())
        .args(["policy", "test"])
        .arg(&tests_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 passed, 1 failed"));
}

#[test]
fn config_check_refuses_local_targets_that_overflow_a_trie_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.toml");
    // Five targets on loopback, two port ranges each: each is also governed
    // on the rest of 127.0.0.0/8, ten ranges on one prefix.
    let mut text = String::from("[redirect]\nport = 15999\n");
    for n in 1..=5 {
        text.push_str(&format!(
            "\n[[target]]\nname = \"t{n}\"\naddress = \"127.0.0.{n}\"\nports = [{}, \"{}-{}\"]\nprotocol = \"tcp\"\n",
            5000 + n,
            6000 + n * 10,
            6005 + n * 10
        ));
    }
    std::fs::write(&path, text).unwrap();
    let out = Command::new(agent_binary())
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .contains("target t1 is local: ports 5001, 6010-6015 on 127.0.0.0/8, ::1, 0.0.0.0, ::"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tollgate: the redirect would not start on this host: 10 port ranges apply to the address prefix 127.0.0.0/8 (10 of them because targets on this host are governed on its other local addresses too); the kernel program holds at most 8: merge ranges or targets"),
        "{stderr}"
    );
}
