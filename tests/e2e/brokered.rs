//! Brokered credentials: the agent logs in to PostgreSQL with a credential
//! it holds, chosen by the identity of the process behind the session; the
//! governed client connects with no secret.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::listener::http_get;
use crate::recording::walk;
use tollgate_tests::*;

/// Only the postgres superuser logs in without a password; `md5_reader`
/// with md5, `plain_writer` with a cleartext password, anyone else with
/// SCRAM-SHA-256.
const HBA: &[u8] = b"local all all trust\n\
host all postgres 127.0.0.1/32 trust\n\
host all md5_reader 127.0.0.1/32 md5\n\
host all plain_writer 127.0.0.1/32 password\n\
host all all 127.0.0.1/32 scram-sha-256\n";

const DEPLOY_SECRET: &str = "deploy-secret-1";
const READ_SECRET: &str = "read-secret-2";
const WRITE_SECRET: &str = "write-secret-3";

/// A directory with the three passwords in root-only files `deploy`,
/// `read` and `write`.
fn secrets_dir() -> tempfile::TempDir {
    let secrets = tempfile::tempdir().unwrap();
    secret_file(secrets.path(), "deploy", DEPLOY_SECRET);
    secret_file(secrets.path(), "read", READ_SECRET);
    secret_file(secrets.path(), "write", WRITE_SECRET);
    secrets
}

fn secret_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{text}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// psql through the agent as Unix user `user` (None: this test's own),
/// asking for database user `postgres`, never prompting for a password.
fn psql_as(user: Option<&str>, port: u16, sql: &str) -> Output {
    let psql = pg_tool("psql");
    let args = [
        "-X",
        "-A",
        "-t",
        "-w",
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
        "-d",
        "postgres",
    ];
    let mut cmd = match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--"]).arg(&psql);
            c
        }
        None => Command::new(&psql),
    };
    cmd.args(args)
        .args(["-p", &port.to_string(), "-c", sql])
        .env_remove("PGPASSWORD")
        .env("PGCONNECT_TIMEOUT", "10")
        .current_dir("/");
    cmd.output().unwrap()
}

/// The client succeeded and printed `user` (its current user).
fn logged_in_as(out: Output, user: &str) {
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), user);
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn config(listen: u16, upstream: u16, secrets: &Path, client_credentials: &str) -> String {
    format!(
        "[[target]]\nname = \"pg\"\naddress = \"127.0.0.1\"\nports = [{upstream}]\nprotocol = \"postgres\"\ntls = \"disable\"\n{client_credentials}\n\
         [[target.credential]]\nuser = \"deployer\"\npassword_file = \"{deploy}\"\nmatch = {{ uids = [0] }}\n\n\
         [[target.credential]]\nuser = \"md5_reader\"\npassword_file = \"{read}\"\nmatch = {{ users = [\"nobody\"] }}\n\n\
         [[target.credential]]\nuser = \"plain_writer\"\npassword_file = \"{write}\"\nmatch = {{ users = [\"daemon\"] }}\n\n\
         [[listener]]\nlisten = \"127.0.0.1:{listen}\"\ntarget = \"pg\"\n",
        deploy = secrets.join("deploy").display(),
        read = secrets.join("read").display(),
        write = secrets.join("write").display(),
    )
}

fn server_with_roles() -> Postgres {
    let pg = Postgres::start_with(&[], &[("pg_hba.conf", HBA)], &[]);
    psql(
        pg.port,
        &format!(
            "CREATE ROLE deployer LOGIN PASSWORD '{DEPLOY_SECRET}'; \
             CREATE ROLE plain_writer LOGIN PASSWORD '{WRITE_SECRET}'; \
             SET password_encryption = 'md5'; \
             CREATE ROLE md5_reader LOGIN PASSWORD '{READ_SECRET}'"
        ),
    )
    .unwrap();
    pg
}

#[test]
fn a_psql_with_no_password_logs_in_as_the_role_its_identity_maps_to() {
    if !is_root() {
        eprintln!("skipped: running psql as other Unix users needs root");
        return;
    }
    let pg = server_with_roles();
    // Directly, without the password, the server refuses the role.
    let direct = Command::new(pg_tool("psql"))
        .args([
            "-X",
            "-w",
            "-h",
            "127.0.0.1",
            "-U",
            "deployer",
            "-d",
            "postgres",
        ])
        .args(["-p", &pg.port.to_string(), "-c", "select 1"])
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    assert!(!direct.status.success(), "{}", text(&direct));
    assert!(text(&direct).contains("password"), "{}", text(&direct));

    let secrets = secrets_dir();
    let port = free_port();
    let metrics_port = free_port();
    let agent = Agent::start(&format!(
        "[agent]\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\n{}",
        config(port, pg.port, secrets.path(), "")
    ));

    // Root's psql asks for `postgres` and gets `deployer` (SCRAM-SHA-256).
    logged_in_as(psql_as(None, port, "select current_user"), "deployer");
    // nobody's psql gets `md5_reader` (md5).
    logged_in_as(
        psql_as(Some("nobody"), port, "select current_user"),
        "md5_reader",
    );
    // daemon's credential needs a cleartext password, which the agent does
    // not send over a plaintext leg.
    let out = psql_as(Some("daemon"), port, "select current_user");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("in cleartext over an unencrypted connection"),
        "{}",
        text(&out)
    );
    // A process no credential is for is refused, saying so.
    let out = psql_as(Some("bin"), port, "select current_user");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out)
            .contains("logs in with brokered credentials and none of them is for this process"),
        "{}",
        text(&out)
    );

    // A wrong password: the server's refusal, naming the role. The file is
    // read for each session, so a rotated password needs no reload.
    secret_file(secrets.path(), "deploy", "not-the-password");
    let out = psql_as(None, port, "select 1");
    assert!(!out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("the server refused the brokered credential for role \"deployer\"")
            && said.contains("password authentication failed"),
        "{said}"
    );
    secret_file(secrets.path(), "deploy", DEPLOY_SECRET);
    let out = psql_as(None, port, "select current_user");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "deployer",
        "{}",
        text(&out)
    );

    // Both users are recorded: the one asked for and the one logged in as.
    let started = agent
        .wait_for_log(
            |l| l["brokered_user"] == "md5_reader",
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(started["db_user"], "postgres", "{started}");
    let session = started["session"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(500));
    let shown = agent.cli(&["recordings", "show", &session]);
    let shown = text(&shown);
    assert!(
        shown.contains("user postgres") && shown.contains("logged in by the agent as md5_reader"),
        "{shown}"
    );

    // No secret anywhere the agent writes or answers.
    let mut everything = agent.log_text();
    // What a client was told when the server refused the credential.
    everything.push_str(&said);
    let status = text(&agent.cli(&["status"]));
    assert!(
        status.contains("brokered: deployer, md5_reader, plain_writer"),
        "{status}"
    );
    everything.push_str(&status);
    everything.push_str(&text(&agent.cli(&["status", "--json"])));
    everything.push_str(&http_get(metrics_port, "/metrics"));
    for entry in walk(&agent.recordings()) {
        everything.push_str(&String::from_utf8_lossy(&std::fs::read(entry).unwrap()));
    }
    assert!(
        everything.contains("deployer"),
        "the check reads what it should"
    );
    for secret in [DEPLOY_SECRET, READ_SECRET, WRITE_SECRET] {
        assert!(!everything.contains(secret), "{secret} leaked");
    }
}

#[test]
fn a_target_can_let_processes_without_a_credential_use_their_own() {
    if !is_root() {
        eprintln!("skipped: running psql as other Unix users needs root");
        return;
    }
    let pg = server_with_roles();
    let secrets = secrets_dir();
    let port = free_port();
    let _agent = Agent::start(&config(
        port,
        pg.port,
        secrets.path(),
        "client_credentials = \"pass\"",
    ));
    // bin has no credential: its own login (postgres, trusted) is relayed.
    let out = psql_as(Some("bin"), port, "select current_user");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "postgres");
    let out = psql_as(None, port, "select current_user");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "deployer",
        "{}",
        text(&out)
    );
}

#[test]
fn a_statement_pipelined_behind_the_startup_waits_for_the_agents_login_and_is_decided() {
    // The client sends its StartupMessage and a query in one write, before
    // any authentication: the query must not reach the server before the
    // agent logged in, nor skip the policy.
    let pg = server_with_roles();
    psql(
        pg.port,
        "CREATE TABLE secrets (s text); INSERT INTO secrets VALUES ('the-key'); GRANT SELECT ON secrets TO deployer",
    )
    .unwrap();
    let secrets = secrets_dir();
    let policy = policy_file(
        "[[rule]]\nname = \"no-secrets\"\naction = \"deny\"\n[rule.match]\ntables = [\"secrets\"]\n",
    );
    let port = free_port();
    let _agent = Agent::start(&format!(
        "[agent]\n{}\n\n{}",
        policy.line,
        config(port, pg.port, secrets.path(), "")
    ));
    let mut wire = tollgate_tests::pg_wire::startup_packet();
    wire.extend_from_slice(&tollgate_tests::pg_wire::query("SELECT s FROM secrets"));
    wire.extend_from_slice(&tollgate_tests::pg_wire::query("SELECT current_user"));
    wire.extend_from_slice(&[b'X', 0, 0, 0, 4]);
    let answer = tollgate_tests::pg_wire::send_and_read_to_close(("127.0.0.1", port), &wire, false);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("denied by rule \"no-secrets\""), "{answer}");
    assert!(!answer.contains("the-key"), "{answer}");
    // The next statement ran as the brokered role.
    assert!(answer.contains("deployer"), "{answer}");
}

#[test]
fn a_secret_file_others_can_read_stops_the_agent_at_start() {
    let secrets = tempfile::tempdir().unwrap();
    let open = secrets.path().join("deploy");
    std::fs::write(&open, DEPLOY_SECRET).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config_path = secrets.path().join("tollgate.toml");
    std::fs::write(
        &config_path,
        format!(
            "[[target]]\nname = \"pg\"\naddress = \"127.0.0.1\"\nports = [5432]\nprotocol = \"postgres\"\n\
             [[target.credential]]\nuser = \"deployer\"\npassword_file = \"{}\"\n",
            open.display()
        ),
    )
    .unwrap();
    let out = Command::new(agent_binary())
        .args(["config", "check", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("password_file") && said.contains("chmod 600"),
        "{said}"
    );
    assert!(!said.contains(DEPLOY_SECRET), "{said}");
}

#[test]
fn a_client_certificate_logs_in_with_no_password() {
    let (ca, issuer) = tollgate_tests::certs::make_ca("test CA");
    let (server_cert, server_key) = tollgate_tests::certs::server_cert(&issuer);
    let (client_cert, client_key) = tollgate_tests::certs::client_cert(&issuer, "cert_user");
    let hba = b"local all all trust\n\
hostssl all cert_user 127.0.0.1/32 cert\n\
host all postgres 127.0.0.1/32 trust\n";
    let pg = Postgres::start_with(
        &[],
        &[
            ("pg_hba.conf", hba),
            ("server.crt", server_cert.as_bytes()),
            ("server.key", server_key.as_bytes()),
            ("root.crt", ca.as_bytes()),
        ],
        &[
            "-c",
            "ssl=on",
            "-c",
            "ssl_cert_file=server.crt",
            "-c",
            "ssl_key_file=server.key",
            "-c",
            "ssl_ca_file=root.crt",
        ],
    );
    psql(pg.port, "CREATE ROLE cert_user LOGIN").unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let cert_file = secrets.path().join("cert_user.crt");
    std::fs::write(&cert_file, &client_cert).unwrap();
    let key_file = secret_file(secrets.path(), "cert_user.key", client_key.trim_end());
    let ca_file = secrets.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let port = free_port();
    let _agent = Agent::start(&format!(
        "[[target]]\nname = \"pg\"\naddress = \"127.0.0.1\"\nports = [{}]\nprotocol = \"postgres\"\n\
         tls = \"verify-full\"\ntls_ca_file = \"{}\"\n\
         [[target.credential]]\nuser = \"cert_user\"\ntls_client_cert = \"{}\"\ntls_client_key = \"{}\"\n\n\
         [[listener]]\nlisten = \"127.0.0.1:{port}\"\ntarget = \"pg\"\n",
        pg.port,
        ca_file.display(),
        cert_file.display(),
        key_file.display(),
    ));
    // The agent presents the certificate; the server maps its name to the
    // role and asks for nothing else.
    let out = psql_as(
        None,
        port,
        "select current_user || ' ' || client_dn from pg_stat_ssl where pid = pg_backend_pid()",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "cert_user /CN=cert_user"
    );
}

#[test]
fn through_the_redirect_a_governed_psql_needs_no_password() {
    if let Some(why) = ebpf_unavailable() {
        eprintln!("skipping: {why}");
        return;
    }
    let addrs = TestAddresses::add();
    let hba = b"local all all trust\n\
host all postgres 127.0.0.1/32 trust\n\
host all all 0.0.0.0/0 scram-sha-256\n\
host all all ::/0 scram-sha-256\n";
    let pg = Postgres::start_with(&[addrs.v4.into()], &[("pg_hba.conf", hba)], &[]);
    psql(
        pg.port,
        &format!("CREATE ROLE md5_reader LOGIN PASSWORD '{READ_SECRET}'"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password = secret_file(dir.path(), "read", READ_SECRET);
    let agent = Agent::start(&format!(
        "[agent]\n\n{}\n[[target]]\nname = \"remote-pg\"\naddress = \"{}\"\nports = [{}]\nprotocol = \"postgres\"\n\
         [[target.credential]]\nuser = \"md5_reader\"\npassword_file = \"{}\"\nmatch = {{ users = [\"nobody\"] }}\n",
        redirect_section(dir.path(), "pass"),
        addrs.v4,
        pg.port,
        password.display(),
    ));
    let keep = dir.path().join("agent.toml");
    std::fs::copy(&agent.config, &keep).unwrap();
    let psql_line = format!(
        "{} -X -A -t -w -h {} -p {} -U postgres -d postgres -c 'select current_user'",
        pg_tool("psql").display(),
        addrs.v4,
        pg.port
    );
    // Not governed, nobody's psql has no password to give.
    let as_nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "sh",
        "-c",
        &psql_line,
    ];
    let direct = Command::new(as_nobody[0])
        .args(&as_nobody[1..])
        .env_remove("PGPASSWORD")
        .current_dir("/")
        .output()
        .unwrap();
    assert!(!direct.status.success(), "{}", text(&direct));
    // Governed, the same command logs in as the credential's role.
    let governed = exec_command(&agent, &as_nobody)
        .env_remove("PGPASSWORD")
        .current_dir("/")
        .output()
        .unwrap();
    assert!(governed.status.success(), "{}", text(&governed));
    assert_eq!(
        String::from_utf8_lossy(&governed.stdout).trim(),
        "md5_reader"
    );
    let started = agent
        .wait_for_log(|l| l["arrival"] == "redirect", Duration::from_secs(5))
        .unwrap();
    assert_eq!(started["uid"].as_u64(), Some(65534), "{started}");
    drop(agent);
    cleanup_redirect(&keep);
}

/// The `mariadb` client through the agent as Unix user `user` (None: this
/// test's own), asking for database user `whoever` with no password.
fn mariadb_as(user: Option<&str>, port: u16, sql: &str) -> Output {
    let mut cmd = match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--", "mariadb"]);
            c
        }
        None => Command::new("mariadb"),
    };
    cmd.arg("--no-defaults")
        .args(["-h", "127.0.0.1", "-P", &port.to_string(), "-u", "whoever"])
        .args([
            "--protocol=TCP",
            "--skip-ssl",
            "--batch",
            "--skip-column-names",
        ])
        .args(["-D", "shop", "-e", sql])
        .current_dir("/");
    cmd.output().unwrap()
}

#[test]
fn a_mariadb_client_with_no_password_logs_in_as_the_user_its_identity_maps_to() {
    if !is_root() {
        eprintln!("skipped: running mariadb as other Unix users needs root");
        return;
    }
    let db = tollgate_tests::mariadb::Mariadb::start("CREATE TABLE orders (id INT)");
    db.as_root(&format!(
        "CREATE USER 'deployer'@'%' IDENTIFIED BY '{DEPLOY_SECRET}'; GRANT ALL ON shop.* TO 'deployer'@'%'; \
         CREATE USER 'reader'@'%' IDENTIFIED BY '{READ_SECRET}'; GRANT SELECT ON shop.* TO 'reader'@'%'"
    ));
    let secrets = tempfile::tempdir().unwrap();
    secret_file(secrets.path(), "deploy", DEPLOY_SECRET);
    secret_file(secrets.path(), "read", READ_SECRET);
    let port = free_port();
    let agent = Agent::start(&format!(
        "[[target]]\nname = \"shop\"\naddress = \"127.0.0.1\"\nports = [{}]\nprotocol = \"mysql\"\n\
         [[target.credential]]\nuser = \"deployer\"\npassword_file = \"{}\"\nmatch = {{ uids = [0] }}\n\n\
         [[target.credential]]\nuser = \"reader\"\npassword_file = \"{}\"\nmatch = {{ users = [\"nobody\"] }}\n\n\
         [[listener]]\nlisten = \"127.0.0.1:{port}\"\ntarget = \"shop\"\n",
        db.port,
        secrets.path().join("deploy").display(),
        secrets.path().join("read").display(),
    ));
    logged_in_as(
        mariadb_as(None, port, "SELECT CURRENT_USER()"),
        "deployer@%",
    );
    logged_in_as(
        mariadb_as(Some("nobody"), port, "SELECT CURRENT_USER()"),
        "reader@%",
    );
    // The role's own privileges still hold: reader cannot write.
    let out = mariadb_as(Some("nobody"), port, "INSERT INTO orders VALUES (1)");
    assert!(!out.status.success(), "{}", text(&out));
    // A change of user would leave the credential behind: refused, and the
    // session goes on as it was.
    let results = tollgate_tests::mariadb::python_driver(
        "connector",
        port,
        &["-- change-user root x shop", "SELECT CURRENT_USER()"],
    );
    match &results[..] {
        [tollgate_tests::mariadb::DriverResult::Error(e), tollgate_tests::mariadb::DriverResult::Rows(rows)] =>
        {
            assert!(e.contains("COM_CHANGE_USER is refused"), "{e}");
            assert_eq!(rows[0][0][0].as_deref(), Some("deployer@%"));
        }
        other => panic!("{other:?}"),
    }
    let out = mariadb_as(Some("bin"), port, "SELECT CURRENT_USER()");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("none of them is for this process"),
        "{}",
        text(&out)
    );
    secret_file(secrets.path(), "deploy", "not-the-password");
    let out = mariadb_as(None, port, "SELECT 1");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("the server refused the brokered credential for user \"deployer\"")
            && text(&out).contains("Access denied"),
        "{}",
        text(&out)
    );
    let started = agent
        .wait_for_log(|l| l["brokered_user"] == "reader", Duration::from_secs(5))
        .unwrap();
    assert_eq!(started["db_user"], "whoever", "{started}");
    let mut everything = agent.log_text();
    for entry in walk(&agent.recordings()) {
        everything.push_str(&String::from_utf8_lossy(&std::fs::read(entry).unwrap()));
    }
    for secret in [DEPLOY_SECRET, READ_SECRET] {
        assert!(!everything.contains(secret), "{secret} leaked");
    }
}

#[test]
fn reviewers_see_the_role_a_brokered_session_runs_as() {
    if !is_root() {
        eprintln!("skipped: reviewing as another Unix user needs root");
        return;
    }
    let pg = server_with_roles();
    psql(
        pg.port,
        "CREATE TABLE orders (id int); GRANT ALL ON orders TO deployer",
    )
    .unwrap();
    let secrets = secrets_dir();
    let policy = policy_file(
        "[[rule]]\nname = \"review-deletes\"\naction = \"review\"\napprovers = [\"group:daemon\"]\n[rule.match]\nkinds = [\"delete\"]\n",
    );
    let port = free_port();
    let agent = Agent::start(&format!(
        "[agent]\n{}\n\n{}",
        policy.line,
        config(port, pg.port, secrets.path(), "")
    ));
    let socket = agent.dir.path().join("approvals.sock");
    let psql_bin = pg_tool("psql");
    let mut held = Command::new(&psql_bin)
        .args([
            "-X",
            "-w",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["-p", &port.to_string(), "-c", "delete from orders"])
        .env_remove("PGPASSWORD")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pending = tollgate_tests::review::pending_from(&socket, &mut held);
    // The client asked for postgres; the statement would run as deployer.
    assert_eq!(
        pending[0]["context"]["database_user"], "deployer",
        "{}",
        pending[0]
    );
    let _ = held.kill();
    let _ = held.wait();
}
