//! TLS on both legs: the upstream leg per target (prefer, require,
//! verify-full against a real TLS PostgreSQL server) and TLS termination
//! for clients with the agent's local CA.

use std::path::Path;
use std::process::{Command, Output};

use tollgate_tests::certs::{make_ca, server_cert};
use tollgate_tests::*;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A PostgreSQL server with TLS on, and its CA's certificate (PEM).
fn tls_server(extra_files: &[(&str, &[u8])]) -> (Postgres, String) {
    tls_server_listening(&[], extra_files)
}

/// [`tls_server`] also listening on `extra` addresses.
fn tls_server_listening(
    extra: &[std::net::IpAddr],
    extra_files: &[(&str, &[u8])],
) -> (Postgres, String) {
    let (ca, issuer) = make_ca("test CA");
    let (cert, key) = server_cert(&issuer);
    let mut files: Vec<(&str, &[u8])> = vec![
        ("server.crt", cert.as_bytes()),
        ("server.key", key.as_bytes()),
    ];
    files.extend_from_slice(extra_files);
    let pg = Postgres::start_with(
        extra,
        &files,
        &[
            "-c",
            "ssl=on",
            "-c",
            "ssl_cert_file=server.crt",
            "-c",
            "ssl_key_file=server.key",
        ],
    );
    (pg, ca)
}

/// An agent with one listener for a target on `upstream_port` with the
/// given target TLS lines and `[agent]` lines.
fn agent_for(upstream_port: u16, target_tls: &str, agent_extra: &str) -> (Agent, u16) {
    agent_at("127.0.0.1", upstream_port, target_tls, agent_extra)
}

/// [`agent_for`] a server at `address`.
fn agent_at(
    address: &str,
    upstream_port: u16,
    target_tls: &str,
    agent_extra: &str,
) -> (Agent, u16) {
    let port = free_port();
    let config = format!(
        "[agent]\n{agent_extra}\n\n[[target]]\nname = \"pg\"\naddress = \"{address}\"\nports = [{upstream_port}]\nprotocol = \"postgres\"\n{target_tls}\n\n\
         [[listener]]\nlisten = \"127.0.0.1:{port}\"\ntarget = \"pg\"\n"
    );
    (Agent::start(&config), port)
}

fn psql_conninfo(conninfo: &str, sql: &str) -> Output {
    Command::new(pg_tool("psql"))
        .args(["-X", "-A", "-t", "-c", sql, conninfo])
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE")
        .output()
        .unwrap()
}

const UPSTREAM_SSL: &str = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";

fn upstream_ssl(port: u16) -> Result<String, String> {
    let out = psql_conninfo(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable"),
        UPSTREAM_SSL,
    );
    if out.status.success() {
        Ok(text(&out.stdout).trim().to_owned())
    } else {
        Err(text(&out.stderr))
    }
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.display().to_string()
}

#[test]
fn upstream_tls_follows_the_target_setting() {
    let (pg, ca) = tls_server(&[]);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca);
    let (other_ca, _) = make_ca("some other CA");
    let wrong_ca_file = write(dir.path(), "wrong-ca.pem", &other_ca);

    // prefer (the default) against a TLS server uses TLS.
    let (agent, port) = agent_for(pg.port, "", "");
    assert_eq!(upstream_ssl(port), Ok("t".to_owned()));
    agent
        .wait_for_log(
            |l| {
                l["upstream_tls"]
                    .as_str()
                    .is_some_and(|v| v.starts_with("TLSv1"))
            },
            std::time::Duration::from_secs(5),
        )
        .unwrap();
    drop(agent);

    // require: encrypted, the certificate not checked.
    let (_agent, port) = agent_for(pg.port, "tls = \"require\"", "");
    assert_eq!(upstream_ssl(port), Ok("t".to_owned()));

    // disable: plaintext even though the server offers TLS.
    let (_agent, port) = agent_for(pg.port, "tls = \"disable\"", "");
    assert_eq!(upstream_ssl(port), Ok("f".to_owned()));

    // verify-full with the right CA (name: the upstream's IP).
    let (_agent, port) = agent_for(
        pg.port,
        &format!("tls = \"verify-full\"\ntls_ca_file = \"{ca_file}\""),
        "",
    );
    assert_eq!(upstream_ssl(port), Ok("t".to_owned()));

    // verify-full with a name the certificate does not carry.
    let (_agent, port) = agent_for(
        pg.port,
        &format!(
            "tls = \"verify-full\"\ntls_ca_file = \"{ca_file}\"\ntls_server_name = \"db.example.com\""
        ),
        "",
    );
    let err = upstream_ssl(port).unwrap_err();
    assert!(
        err.contains("FATAL:  tollgate: target \"pg\": TLS to the server failed"),
        "{err}"
    );
    assert!(err.contains("does not match the server name"), "{err}");

    // verify-full with a CA that did not sign the server's certificate.
    let (_agent, port) = agent_for(
        pg.port,
        &format!("tls = \"verify-full\"\ntls_ca_file = \"{wrong_ca_file}\""),
        "",
    );
    let err = upstream_ssl(port).unwrap_err();
    assert!(
        err.contains("the certificate is not trusted: it is not signed by a CA in tls_ca_file"),
        "{err}"
    );
}

#[test]
fn upstream_tls_against_a_server_without_tls() {
    let pg = Postgres::start();
    let (_agent, port) = agent_for(pg.port, "tls = \"prefer\"", "");
    assert_eq!(upstream_ssl(port), Ok("f".to_owned()));

    for mode in ["require", "verify-full"] {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = make_ca("unused CA");
        let ca_file = write(dir.path(), "ca.pem", &ca);
        let extra = if mode == "verify-full" {
            format!("\ntls_ca_file = \"{ca_file}\"")
        } else {
            String::new()
        };
        let (_agent, port) = agent_for(pg.port, &format!("tls = \"{mode}\"{extra}"), "");
        let err = upstream_ssl(port).unwrap_err();
        assert!(
            err.contains(
                "FATAL:  tollgate: target \"pg\" requires TLS but the server does not offer it"
            ),
            "{mode}: {err}"
        );
    }
}

#[test]
fn clients_get_tls_from_the_agents_local_ca() {
    let pg = Postgres::start();
    let tls_dir = tempfile::tempdir().unwrap();
    let tls_dir_path = tls_dir.path().join("tls");
    let (agent, port) = agent_for(pg.port, "", &terminating_client_tls(&tls_dir_path));
    let ssl_in_use = "select 'on'";
    let conninfo =
        |extra: &str| format!("host=127.0.0.1 port={port} user=postgres dbname=postgres {extra}");

    let out = psql_conninfo(&conninfo("sslmode=require"), ssl_in_use);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout).trim(), "on");

    let ca = tls_dir_path.join("ca.pem");
    assert!(ca.exists());
    let key_mode = |name: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(tls_dir_path.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(key_mode("ca-key.pem"), 0o600);
    assert_eq!(key_mode("server-key.pem"), 0o600);
    let out = psql_conninfo(
        &conninfo(&format!("sslmode=verify-full sslrootcert={}", ca.display())),
        ssl_in_use,
    );
    assert!(out.status.success(), "{out:?}");
    let out = Command::new(pg_tool("psql"))
        .args(["-X", "-A", "-t", "-c", ssl_in_use])
        .arg(format!(
            "host=localhost port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
            ca.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "by name: {out:?}");
    agent
        .wait_for_log(
            |l| {
                l["client_tls"]
                    .as_str()
                    .is_some_and(|v| v.starts_with("TLSv1"))
            },
            std::time::Duration::from_secs(5),
        )
        .unwrap();

    // Plaintext clients still work.
    let out = psql_conninfo(&conninfo("sslmode=disable"), ssl_in_use);
    assert!(out.status.success(), "{out:?}");

    // The CA is kept across restarts; the agent's certificate too while
    // the names stay the same.
    let ca_before = std::fs::read(&ca).unwrap();
    let leaf_before = std::fs::read(tls_dir_path.join("server.pem")).unwrap();
    drop(agent);
    let (_agent, port2) = agent_for(pg.port, "", &terminating_client_tls(&tls_dir_path));
    assert_eq!(std::fs::read(&ca).unwrap(), ca_before);
    assert_eq!(
        std::fs::read(tls_dir_path.join("server.pem")).unwrap(),
        leaf_before
    );
    let out = psql_conninfo(
        &format!(
            "host=127.0.0.1 port={port2} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
            ca.display()
        ),
        ssl_in_use,
    );
    assert!(out.status.success(), "{out:?}");
}

/// PostgreSQL 17's `sslnegotiation=direct`: the client starts with a TLS
/// ClientHello (ALPN "postgresql") instead of an SSLRequest. psql 15 cannot
/// send it, so Python's ssl module plays the client; without the ALPN
/// protocol the connection is refused, as the server refuses it.
#[test]
fn direct_tls_negotiation_with_alpn() {
    let pg = Postgres::start();
    let tls_dir = tempfile::tempdir().unwrap();
    let tls_dir_path = tls_dir.path().join("tls");
    let (agent, port) = agent_for(pg.port, "", &terminating_client_tls(&tls_dir_path));
    let ca = tls_dir_path.join("ca.pem");
    let script = |alpn: &str| {
        format!(
            r#"
import socket, ssl, struct
ctx = ssl.create_default_context(cafile="{ca}")
{alpn}
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", {port})), server_hostname="localhost")
params = b"user\0postgres\0database\0postgres\0\0"
s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
query = b"select 'direct ' || version() like 'direct PostgreSQL%'\0"
sent = False
buf = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
    if buf.endswith(b"Z\0\0\0\x05I"):
        if sent:
            break
        s.sendall(b"Q" + struct.pack("!i", 4 + len(query)) + query)
        sent = True
print(s.version(), s.selected_alpn_protocol(), b"D\0\0\0\x0b\0\x01\0\0\0\x01t" in buf)
"#,
            ca = ca.display(),
        )
    };
    let run = |alpn: &str| {
        Command::new("python3")
            .arg("-c")
            .arg(script(alpn))
            .output()
            .unwrap()
    };
    let out = run("ctx.set_alpn_protocols([\"postgresql\"])");
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("TLSv1."), "{stdout}");
    assert!(stdout.trim_end().ends_with("postgresql True"), "{stdout}");

    // No ALPN: the handshake completes, then the agent closes.
    let out = run("");
    assert!(
        !out.status.success() || !text(&out.stdout).contains("True"),
        "{out:?}"
    );
    agent
        .wait_for_log(
            |l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("without the \"postgresql\" ALPN protocol"))
            },
            std::time::Duration::from_secs(5),
        )
        .unwrap();
}

/// A client that insists on TLS still reads why it is refused when the
/// upstream cannot be reached: the refusal comes over TLS.
#[test]
fn an_unreachable_upstream_is_explained_to_a_tls_client() {
    let tls_dir = tempfile::tempdir().unwrap();
    let (_agent, port) = agent_for(free_port(), "", &terminating_client_tls(tls_dir.path()));
    let out = psql_conninfo(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=require"),
        "select 1",
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("FATAL:  tollgate: cannot reach the upstream of target \"pg\""),
        "{stderr}"
    );
}

#[test]
fn scram_passes_with_a_plaintext_client_leg_and_tls_upstream() {
    // SCRAM for user "scram" over TLS only; everything else trusted.
    let hba = "local all all trust\n\
               hostssl all scram 127.0.0.1/32 scram-sha-256\n\
               host all scram 127.0.0.1/32 reject\n\
               host all all 127.0.0.1/32 trust\n";
    let (pg, _ca) = tls_server(&[("pg_hba.conf", hba.as_bytes())]);
    psql(
        pg.port,
        "set password_encryption = 'scram-sha-256'; create role scram login password 'secret-pw'",
    )
    .unwrap();
    let (_agent, port) = agent_for(pg.port, "tls = \"require\"", "");
    // The server offers SCRAM-SHA-256-PLUS on its TLS connection; the agent
    // removes it, and a plaintext client (flag `n`) authenticates.
    let out = Command::new(pg_tool("psql"))
        .args(["-X", "-A", "-t", "-c", UPSTREAM_SSL])
        .arg(format!(
            "host=127.0.0.1 port={port} user=scram dbname=postgres sslmode=disable"
        ))
        .env("PGPASSWORD", "secret-pw")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout).trim(), "t");
    // A wrong password is still refused by the server.
    let out = Command::new(pg_tool("psql"))
        .args(["-X", "-A", "-t", "-c", "select 1"])
        .arg(format!(
            "host=127.0.0.1 port={port} user=scram dbname=postgres sslmode=disable"
        ))
        .env("PGPASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("password authentication failed"),
        "{out:?}"
    );

    // Documented limit: a client on TLS to the agent, with the upstream leg
    // on TLS too, cannot use SCRAM (its `y` flag reads as a downgrade).
    let tls_dir = tempfile::tempdir().unwrap();
    let (_agent, port) = agent_for(
        pg.port,
        "tls = \"require\"",
        &terminating_client_tls(tls_dir.path()),
    );
    let out = Command::new(pg_tool("psql"))
        .args(["-X", "-A", "-t", "-c", "select 1"])
        .arg(format!(
            "host=127.0.0.1 port={port} user=scram dbname=postgres sslmode=require"
        ))
        .env("PGPASSWORD", "secret-pw")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("channel binding"), "{out:?}");
}

/// pg_hba.conf's `password` method (AuthenticationCleartextPassword): the
/// agent must not carry a password the client sent under TLS over a
/// plaintext leg to another host, and carries it everywhere else.
#[test]
fn a_password_sent_in_clear_under_tls_never_crosses_a_plaintext_network_leg() {
    let hba = "local all all trust\n\
               host all clear 0.0.0.0/0 password\n\
               host all all 0.0.0.0/0 trust\n";
    let files: [(&str, &[u8]); 1] = [("pg_hba.conf", hba.as_bytes())];
    // The servers at an address that is not loopback (on `lo`, so the test
    // stays on this host).
    let Some(addrs) = TestAddresses::add_as_root() else {
        return;
    };
    let plain = Postgres::start_with(&[addrs.v4.into()], &files, &[]);
    let (tls, _ca) = tls_server_listening(&[addrs.v4.into()], &files);
    for pg in [&plain, &tls] {
        psql(pg.port, "create role clear login password 'clear-pw'").unwrap();
    }
    let tls_dir = tempfile::tempdir().unwrap();
    let client_tls = terminating_client_tls(tls_dir.path());
    let login = |port: u16, sslmode: &str, password: &str| {
        let out = Command::new(pg_tool("psql"))
            .args(["-X", "-A", "-t", "-c", "select current_user"])
            .arg(format!(
                "host=127.0.0.1 port={port} user=clear dbname=postgres sslmode={sslmode}"
            ))
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .unwrap();
        (out.status.success(), text(&out.stdout) + &text(&out.stderr))
    };
    let address = addrs.v4.to_string();

    // The client's leg is TLS, the server's plaintext: the server's request
    // never reaches the client, so the client never sends the password.
    let (agent, port) = agent_at(&address, plain.port, "tls = \"disable\"", &client_tls);
    let (ok, all) = login(port, "require", "clear-pw");
    assert!(!ok, "{all}");
    assert!(
        all.contains("FATAL:  tollgate: target \"pg\": the server asks for the password in clear (AuthenticationCleartextPassword")
            && all.contains("set the target's tls to \"require\""),
        "{all}"
    );
    agent
        .wait_for_log(
            |l| l["reason"].as_str().is_some_and(|r| r.contains("in clear")),
            std::time::Duration::from_secs(5),
        )
        .unwrap();
    // A client without TLS sends its password in clear itself: the agent
    // relays what the client chose, and the server checks it.
    assert_eq!(
        login(port, "disable", "clear-pw"),
        (true, "clear\n".to_owned())
    );
    let (ok, all) = login(port, "disable", "wrong");
    assert!(
        !ok && all.contains("password authentication failed"),
        "{all}"
    );
    drop(agent);

    // The same server on loopback: the password never leaves the host.
    let (_agent, port) = agent_at("127.0.0.1", plain.port, "tls = \"disable\"", &client_tls);
    assert_eq!(
        login(port, "require", "clear-pw"),
        (true, "clear\n".to_owned())
    );

    // A server leg on TLS carries it to the other host.
    let (_agent, port) = agent_at(&address, tls.port, "tls = \"require\"", &client_tls);
    assert_eq!(
        login(port, "require", "clear-pw"),
        (true, "clear\n".to_owned())
    );
}
