//! A real S3-protocol server for the upload tests: moto's server (from
//! PyPI, `moto[server]`), which implements S3 closely enough for
//! conditional puts, versioning, multipart uploads and Object Lock, and
//! starts in a second on a free port with no disk to set up. Buckets are
//! made and read back with boto3, the AWS SDK for Python, so that what the
//! agent wrote is checked by another implementation of the protocol.

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running moto S3 server on 127.0.0.1.
pub struct S3Server {
    /// Its port.
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts a server on a free port.
    pub fn start() -> S3Server {
        S3Server::start_on(crate::free_port())
    }

    /// Starts a server on `port` (a test that starts the agent first
    /// picks the port before the server exists).
    pub fn start_on(port: u16) -> S3Server {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-s3-")
            .tempdir()
            .unwrap();
        let log = std::fs::File::create(dir.path().join("moto.log")).unwrap();
        // As a module of the python3 that setup.sh installed it for: its
        // `moto_server` script may not be on PATH (pyenv shims).
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("python3 -m moto.server (scripts/setup.sh installs moto[server])");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        S3Server {
            port,
            child,
            _dir: dir,
        }
    }

    /// The endpoint URL for `[upload] endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs a boto3 snippet with `s3` bound to a client of this server;
    /// its last line prints JSON, which is returned.
    pub fn boto(&self, code: &str) -> Value {
        boto(self.port, code)
    }

    /// Makes a bucket with Object Lock (versioning comes with it); with
    /// `default_retention`, objects put without retention headers are kept
    /// one day in COMPLIANCE mode.
    pub fn create_locked_bucket(&self, name: &str, default_retention: bool) {
        let mut code =
            format!("s3.create_bucket(Bucket='{name}', ObjectLockEnabledForBucket=True)\n");
        if default_retention {
            code.push_str(&format!(
                "s3.put_object_lock_configuration(Bucket='{name}', ObjectLockConfiguration={{'ObjectLockEnabled': 'Enabled', 'Rule': {{'DefaultRetention': {{'Mode': 'COMPLIANCE', 'Days': 1}}}}}})\n"
            ));
        }
        code.push_str("print('true')");
        self.boto(&code);
    }

    /// `[mode, whole days left]` of an object's Object Lock, nulls when none.
    pub fn object_lock(&self, bucket: &str, key: &str) -> Value {
        self.boto(&format!(
            "import datetime\n\
             h = s3.head_object(Bucket='{bucket}', Key={key:?})\n\
             until = h.get('ObjectLockRetainUntilDate')\n\
             left = (until - datetime.datetime.now(datetime.timezone.utc)).days if until else None\n\
             print(json.dumps([h.get('ObjectLockMode'), left]))"
        ))
    }

    /// Turns versioning on, so that a second write of a key would show.
    pub fn enable_versioning(&self, bucket: &str) {
        self.boto(&format!(
            "s3.put_bucket_versioning(Bucket='{bucket}', VersioningConfiguration={{'Status': 'Enabled'}})\nprint('true')"
        ));
    }

    /// Every version of every object: `[{"key", "size", "version"}]`.
    pub fn versions(&self, bucket: &str) -> Vec<Value> {
        let v = self.boto(&format!(
            "r = s3.list_object_versions(Bucket='{bucket}')\n\
             print(json.dumps([{{'key': v['Key'], 'size': v['Size'], 'version': v['VersionId']}} for v in r.get('Versions', [])]))"
        ));
        v.as_array().cloned().unwrap_or_default()
    }

    /// Every object: `[{"key", "size"}]`.
    pub fn objects(&self, bucket: &str) -> Vec<Value> {
        let v = self.boto(&format!(
            "r = s3.list_objects_v2(Bucket='{bucket}')\n\
             print(json.dumps([{{'key': o['Key'], 'size': o['Size']}} for o in r.get('Contents', [])]))"
        ));
        v.as_array().cloned().unwrap_or_default()
    }

    /// Puts `body` under `key`.
    pub fn put(&self, bucket: &str, key: &str, body: &str) {
        self.boto(&format!(
            "s3.put_object(Bucket='{bucket}', Key={key:?}, Body={body:?}.encode())\nprint('true')"
        ));
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `code` with `s3` (a boto3 client of 127.0.0.1:`port`) and `json`
/// in scope, and parses the last line it prints.
pub fn boto(port: u16, code: &str) -> Value {
    let script = format!(
        "import boto3, json, botocore\n\
         s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{port}', aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\n\
         {code}\n"
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "boto3 failed:\n{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("null")).unwrap_or(Value::Null)
}

/// The bucket the upload tests use.
pub const BUCKET: &str = "recordings";

/// What the agent and the responder need to reach the bucket: a
/// directory with the secret key file, and the `[upload]` section.
pub struct Upload {
    /// Holds the secret key file (and whatever a test adds).
    pub dir: tempfile::TempDir,
}

impl Upload {
    /// A directory with the secret key file.
    pub fn with_key_file() -> Upload {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-upload-")
            .tempdir()
            .unwrap();
        let secret = dir.path().join("s3-secret");
        std::fs::write(&secret, "test\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        Upload { dir }
    }

    /// The `[upload]` section of host `host`, with `extra` lines.
    pub fn section(&self, s3_port: u16, host: &str, extra: &str) -> String {
        format!(
            "\n[upload]\nbucket = \"{BUCKET}\"\nendpoint = \"http://127.0.0.1:{s3_port}\"\nprefix = \"fleet\"\nhost = \"{host}\"\naccess_key_id = \"test\"\nsecret_access_key_file = \"{}\"\n{extra}\n",
            self.dir.path().join("s3-secret").display()
        )
    }

    /// A configuration holding only `[upload]`: what a responder on
    /// another machine has.
    pub fn responder_config(&self, s3_port: u16) -> PathBuf {
        let path = self.dir.path().join("responder.toml");
        std::fs::write(&path, self.section(s3_port, "responder", "")).unwrap();
        path
    }
}
