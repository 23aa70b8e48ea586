//! A throwaway MariaDB server from Debian's package, in a temporary
//! directory on a free port, and the `mariadb` command-line client.
//!
//! As root (as CI runs) the server runs as the `mysql` account the package
//! creates. Each server gets a user `app` (password `secret`,
//! mysql_native_password, every privilege) reachable over TCP, which the
//! tests use through the agent, and a database `shop`.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, is_root};

/// The account tests connect as, through the agent or directly.
pub const USER: &str = "app";
/// Its password.
pub const PASSWORD: &str = "secret";
/// The database made for the tests.
pub const DATABASE: &str = "shop";

/// A running MariaDB server.
pub struct Mariadb {
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl Mariadb {
    /// Installs a fresh data directory, starts the server and waits until
    /// it accepts connections; `schema` is then run in `shop` as root.
    pub fn start(schema: &str) -> Mariadb {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-mariadb-")
            .tempdir()
            .unwrap()
            .keep();
        Mariadb::start_in(dir, schema, &[])
    }

    /// [`Mariadb::start`] listening on `also` besides 127.0.0.1 (a test
    /// address, for connections that take the redirect).
    pub fn start_listening(schema: &str, also: std::net::Ipv4Addr) -> Mariadb {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-mariadb-")
            .tempdir()
            .unwrap()
            .keep();
        Mariadb::start_in(dir, schema, &[format!("--bind-address=127.0.0.1,{also}")])
    }

    /// [`Mariadb::start`] with more server options (`--log-bin`).
    pub fn start_with(schema: &str, options: &[&str]) -> Mariadb {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-mariadb-")
            .tempdir()
            .unwrap()
            .keep();
        let options: Vec<String> = options.iter().map(|o| (*o).to_owned()).collect();
        Mariadb::start_in(dir, schema, &options)
    }

    /// [`Mariadb::start`] with TLS: a CA made for it signs the server's
    /// certificate (names `localhost` and 127.0.0.1); the CA's PEM file is
    /// [`Mariadb::tls_ca`].
    pub fn start_tls(schema: &str) -> Mariadb {
        Mariadb::start_tls_with(schema, &[])
    }

    /// [`Mariadb::start_tls`] with more server options (`--bind-address`).
    pub fn start_tls_with(schema: &str, options: &[&str]) -> Mariadb {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-mariadb-")
            .tempdir()
            .unwrap()
            .keep();
        let tls = dir.join("tls");
        fs::create_dir_all(&tls).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&tls)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=tollgate test CA",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server-key.pem",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        fs::write(
            tls.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        let mut args = vec![
            format!("--ssl-ca={}", tls.join("ca.pem").display()),
            format!("--ssl-cert={}", tls.join("server.pem").display()),
            format!("--ssl-key={}", tls.join("server-key.pem").display()),
        ];
        args.extend(options.iter().map(|o| (*o).to_owned()));
        Mariadb::start_in(dir, schema, &args)
    }

    /// The PEM file of the CA that signed the certificate of a server
    /// started with [`Mariadb::start_tls`].
    pub fn tls_ca(&self) -> PathBuf {
        self.dir.join("tls/ca.pem")
    }

    fn start_in(dir: PathBuf, schema: &str, server_args: &[String]) -> Mariadb {
        let data = dir.join("data");
        // A temporary directory of its own: the bootstrap's temporary
        // tables in a /tmp shared with other servers starting at the same
        // time were seen to vanish under it.
        let tmp = dir.join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        let tmpdir = format!("--tmpdir={}", tmp.display());
        let user_args: Vec<String> = if is_root() {
            vec!["--user=mysql".into()]
        } else {
            vec![]
        };
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "mysql:mysql"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success());
        }
        let out = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(&tmpdir)
            .args(&user_args)
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ])
            .output()
            .expect("mariadb-install-db (scripts/setup.sh installs mariadb-server)");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let socket = dir.join("mysqld.sock");
        let log = fs::File::create(dir.join("server.log")).unwrap();
        let child = Command::new("/usr/sbin/mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", dir.join("mysqld.pid").display()))
            .arg(format!("--port={port}"))
            .arg(&tmpdir)
            .args(&user_args)
            .args(
                if server_args.iter().any(|a| a.starts_with("--bind-address")) {
                    &[][..]
                } else {
                    &["--bind-address=127.0.0.1"][..]
                },
            )
            .args([
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=16M",
                "--innodb-log-file-size=8M",
                "--performance-schema=OFF",
            ])
            .args(server_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mariadbd");
        let server = Mariadb { port, dir, child };
        server.wait_until_ready();
        let setup = format!(
            "CREATE USER '{USER}'@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('{PASSWORD}');
             GRANT ALL PRIVILEGES ON *.* TO '{USER}'@'%';
             CREATE DATABASE {DATABASE};"
        );
        server.as_root(&setup);
        if !schema.is_empty() {
            server.as_root(&format!("USE {DATABASE}; {schema}"));
        }
        server
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Runs `sql` as root over the server's socket; panics on failure.
    pub fn as_root(&self, sql: &str) -> String {
        let out = Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!(
                "--socket={}",
                self.dir.join("mysqld.sock").display()
            ))
            .args(["-u", "root", "--batch", "--skip-column-names", "-e", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let socket = self.dir.join("mysqld.sock");
        loop {
            let ping = Command::new("mariadb-admin")
                .arg("--no-defaults")
                .arg(format!("--socket={}", socket.display()))
                .args(["-u", "root", "ping"])
                .output()
                .unwrap();
            if ping.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "MariaDB did not start: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The `mariadb` client as `app` over TCP to 127.0.0.1:`port` (the agent or
/// the server), in batch mode, database `shop`, running `sql`.
pub fn mariadb_command(port: u16, sql: &str) -> Command {
    let mut cmd = Command::new("mariadb");
    cmd.arg("--no-defaults")
        .args(["-h", "127.0.0.1", "-P", &port.to_string()])
        .args(["-u", USER, &format!("-p{PASSWORD}")])
        .args([
            "--protocol=TCP",
            "--skip-ssl",
            "--batch",
            "--skip-column-names",
        ])
        .args(["-D", DATABASE, "-e", sql]);
    cmd
}

/// Runs [`mariadb_command`]; its output.
pub fn mariadb(port: u16, sql: &str) -> Output {
    mariadb_command(port, sql)
        .output()
        .expect("the mariadb client")
}

/// What a Python driver made of one statement (tests/data/mysql_driver.py).
#[derive(Debug)]
pub enum DriverResult {
    /// Every result's rows, each value as text (`None` for NULL).
    Rows(Vec<Vec<Vec<Option<String>>>>),
    /// The driver's error message.
    Error(String),
}

/// Runs `statements` as [`USER`] in [`DATABASE`] through a Python driver on
/// `port`: `connector` (mysql-connector-python, server-side prepared
/// statements and binary rows) or `pymysql` (text protocol, several
/// statements in one text allowed). One result per statement.
pub fn python_driver(driver: &str, port: u16, statements: &[&str]) -> Vec<DriverResult> {
    let out = Command::new("python3")
        .arg(crate::workspace_root().join("tests/data/mysql_driver.py"))
        .arg(driver)
        .arg(port.to_string())
        .args(statements)
        .output()
        .expect("python3 (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "mysql_driver.py {driver} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<DriverResult> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            match v.get("error").and_then(|e| e.as_str()) {
                Some(error) => DriverResult::Error(error.to_owned()),
                None => DriverResult::Rows(serde_json::from_value(v["results"].clone()).unwrap()),
            }
        })
        .collect();
    assert_eq!(results.len(), statements.len(), "{results:?}");
    results
}
