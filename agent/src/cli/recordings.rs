//! `tollgate recordings`: list, show, replay, verify, export recordings, and
//! make a signing key.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};

use super::{load_config, print_json, CliError, ConfigArg, RecordingsCommand, RemoteArg};
use crate::recording::upload::{self, RemoteRecording};
use crate::recording::{self, Recording};

/// Runs one `tollgate recordings` subcommand.
pub fn run(command: RecordingsCommand) -> Result<(), CliError> {
    match command {
        RecordingsCommand::List {
            config,
            since,
            target,
            user,
            ci_repo,
            denied,
            json,
            remote,
            host,
        } => {
            if remote {
                let bucket = Bucket::open(&config)?;
                let since_day = since
                    .and_then(|d| std::time::SystemTime::now().checked_sub(d))
                    .map(|t| recording::writer::rfc3339_millis(t)[..10].to_string());
                let found: Vec<RemoteRecording> = bucket
                    .list()?
                    .into_iter()
                    .filter(|r| {
                        since_day.as_ref().is_none_or(|d| &r.day >= d)
                            && target.as_ref().is_none_or(|t| &r.target == t)
                            && host.as_ref().is_none_or(|h| &r.host == h)
                    })
                    .collect();
                if user.is_some() || ci_repo.is_some() || denied {
                    let filter = recording::RecordingFilter {
                        user,
                        ci_repo,
                        denied_only: denied,
                        sessions_only: true,
                        ..Default::default()
                    };
                    let mut summaries = Vec::new();
                    for r in &found {
                        let (name, bytes) = bucket.fetch_key(&r.key)?;
                        if let Some(s) = recording::reader::summarize(&bytes, &name, &filter) {
                            summaries.push(s);
                        }
                    }
                    if json {
                        print_json(&summaries);
                    } else {
                        print_list(&summaries);
                    }
                    return Ok(());
                }
                if json {
                    print_json(&found);
                } else {
                    print_remote_list(&found);
                }
                return Ok(());
            }
            let dir = load_config(&config.config)?.agent.recording_dir;
            let filter = recording::RecordingFilter {
                since: since.and_then(|d| std::time::SystemTime::now().checked_sub(d)),
                target,
                user,
                ci_repo,
                denied_only: denied,
                sessions_only: true,
                ..Default::default()
            };
            let found = recording::list(&dir, &filter);
            if json {
                print_json(&found);
            } else {
                print_list(&found);
            }
            Ok(())
        }
        RecordingsCommand::Show {
            config,
            remote,
            id,
            no_color,
        } => {
            let r = open_recording(&config, remote, &id)?;
            let color = !no_color && std::io::stdout().is_terminal();
            println!(
                "{}",
                recording::render_transcript(&r, color).trim_end_matches('\n')
            );
            Ok(())
        }
        RecordingsCommand::Replay {
            config,
            remote,
            id,
            speed,
            no_wait,
            max_wait,
            no_color,
        } => {
            let rec = open_recording(&config, remote, &id)?;
            let options = recording::ReplayOptions {
                speed: if no_wait { 0.0 } else { speed },
                max_wait,
                color: !no_color && std::io::stdout().is_terminal(),
            };
            let mut out = std::io::stdout().lock();
            match recording::replay(&rec, &options, &mut out, &mut std::thread::sleep) {
                Ok(_) => Ok(()),
                // A closed pipe (`| head`) is the reader's choice, not a failure.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                Err(e) => Err(CliError::failed(format!("cannot write the replay: {e}"))),
            }
        }
        RecordingsCommand::Keygen { out } => {
            let key = recording::generate_key(&out)
                .map_err(|e| CliError::failed(format!("cannot make a signing key: {e}")))?;
            println!("private key: {} (mode 0600)", key.private.display());
            println!("public key:  {}", key.public_path.display());
            println!("key id:      {}", key.public.key_id());
            println!("{}", key.public.to_hex());
            println!(
                "Set agent.recording_signing_key = \"{}\" and verify with --public-key {}",
                key.private.display(),
                key.public_path.display()
            );
            Ok(())
        }
        RecordingsCommand::Verify {
            config,
            remote,
            id,
            all,
            public_keys,
        } if remote.remote => verify_remote(&config, id.as_deref(), all, &public_keys),
        RecordingsCommand::Verify {
            config,
            remote: _,
            id,
            all,
            public_keys,
        } => verify(&config, id.as_deref(), all, &public_keys),
        RecordingsCommand::Export {
            config,
            remote,
            id,
            format,
            out,
        } => {
            let r = open_recording(&config, remote, &id)?;
            let bytes = if format == "pcap" {
                recording::export_pcap(&r)
                    .map_err(|e| CliError::failed(format!("cannot export {id} as pcap: {e}")))?
            } else if format == "asciicast" {
                recording::export_asciicast(&r)
                    .ok_or_else(|| CliError::failed(format!("cannot export {id} as asciicast: it holds no terminal output (an SSH session with a pty, or a target with record_raw = true)")))?
                    .into_bytes()
            } else {
                recording::export_jsonl(&r).into_bytes()
            };
            write_export(&bytes, out.as_deref(), format == "pcap")
        }
    }
}

/// The table `recordings list` prints.
fn print_list(found: &[recording::RecordingSummary]) {
    println!(
        "{:<36}  {:<24}  {:<12}  {:<10}  {:>7}  {:>6}  EXE",
        "SESSION", "STARTED", "TARGET", "USER", "STMTS", "DENIED"
    );
    for r in found {
        println!(
            "{:<36}  {:<24}  {:<12}  {:<10}  {:>7}  {:>6}  {}",
            r.id.map(|i| i.to_string()).unwrap_or_else(|| "?".into()),
            r.started_at.as_deref().unwrap_or("?"),
            r.target.as_deref().unwrap_or("?"),
            r.user.as_deref().unwrap_or("?"),
            r.statements,
            r.denied,
            r.exe.as_deref().unwrap_or("?"),
        );
    }
}

/// The table `recordings list --remote` prints.
fn print_remote_list(found: &[RemoteRecording]) {
    println!(
        "{:<36}  {:<10}  {:<20}  {:<12}  {:>9}  STORED",
        "SESSION", "DAY", "HOST", "TARGET", "BYTES"
    );
    for r in found {
        println!(
            "{:<36}  {:<10}  {:<20}  {:<12}  {:>9}  {}",
            r.id, r.day, r.host, r.target, r.size, r.stored_at
        );
    }
}

/// The bucket of the configuration's `[upload]` section, for `--remote`.
struct Bucket {
    store: object_store::aws::AmazonS3,
    settings: crate::config::UploadSettings,
    runtime: tokio::runtime::Runtime,
}

impl Bucket {
    fn open(config: &ConfigArg) -> Result<Bucket, CliError> {
        let settings = load_config(&config.config)?.upload.ok_or_else(|| {
            CliError::invalid(format!(
                "--remote reads the bucket of an [upload] section, and {} has none",
                config.config.display()
            ))
        })?;
        let store = upload::open_store(&settings.s3).map_err(CliError::failed)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError::failed(format!("cannot start: {e}")))?;
        Ok(Bucket {
            store,
            settings,
            runtime,
        })
    }

    fn list(&self) -> Result<Vec<RemoteRecording>, CliError> {
        self.runtime
            .block_on(upload::list_remote(&self.store, &self.settings))
            .map_err(CliError::failed)
    }

    /// The object under `key`: its name (`s3://BUCKET/KEY`) and bytes.
    fn fetch_key(&self, key: &str) -> Result<(PathBuf, Vec<u8>), CliError> {
        let bytes = self
            .runtime
            .block_on(upload::fetch_key(&self.store, key))
            .map_err(CliError::failed)?;
        Ok((
            PathBuf::from(format!("s3://{}/{key}", self.settings.s3.bucket)),
            bytes,
        ))
    }

    /// The recording of session `id`: its name (`s3://BUCKET/KEY`) and bytes.
    fn fetch(&self, id: &str) -> Result<(PathBuf, Vec<u8>), CliError> {
        let id = uuid::Uuid::parse_str(id).map_err(|_| {
            CliError::invalid(format!("\"{id}\" is not a session id (--remote takes ids)"))
        })?;
        let found = self
            .list()?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| {
                CliError::failed(format!(
                    "no recording of session {id} in bucket \"{}\"",
                    self.settings.s3.bucket
                ))
            })?;
        self.fetch_key(&found.key)
    }
}

/// `recordings verify --remote`: as [`verify`], on the bucket's copies.
fn verify_remote(
    config: &ConfigArg,
    id: Option<&str>,
    all: bool,
    public_keys: &[PathBuf],
) -> Result<(), CliError> {
    let keys = load_public_keys(public_keys)?;
    let bucket = Bucket::open(config)?;
    let fetched = if all {
        bucket
            .list()?
            .iter()
            .map(|r| Ok((bucket.fetch_key(&r.key)?, Some(r.id))))
            .collect::<Result<Vec<_>, CliError>>()?
    } else {
        let id = id.unwrap_or_default();
        vec![(bucket.fetch(id)?, uuid::Uuid::parse_str(id).ok())]
    };
    let reports: Vec<_> = fetched
        .into_iter()
        .map(|((name, bytes), id)| {
            recording::reader::verify_from(std::io::Cursor::new(bytes), &name, id, &keys)
        })
        .collect();
    report_verified(&reports, all)
}

fn load_public_keys(public_keys: &[PathBuf]) -> Result<Vec<recording::PublicKey>, CliError> {
    public_keys
        .iter()
        .map(|path| recording::PublicKey::load(path))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CliError::invalid(format!("cannot use --public-key {e}")))
}

/// Prints verification reports; exit 1 when one failed.
fn report_verified(reports: &[recording::VerifyReport], all: bool) -> Result<(), CliError> {
    let bad = reports.iter().filter(|r| !r.ok()).count();
    for report in reports {
        println!("{report}");
    }
    if all {
        println!("{} verified, {} failed", reports.len() - bad, bad);
    }
    if bad == 0 {
        Ok(())
    } else {
        Err(CliError::failed(format!(
            "{bad} of {} recording(s) failed verification",
            reports.len()
        )))
    }
}

/// `recordings verify`: every named recording's chain and signature; exit
/// 1 when one fails, 2 when a key or the recording cannot be found.
fn verify(
    config: &ConfigArg,
    id: Option<&str>,
    all: bool,
    public_keys: &[PathBuf],
) -> Result<(), CliError> {
    let keys = load_public_keys(public_keys)?;
    // A recording file given by path needs no configuration.
    let dir = match id {
        Some(p) if !all && Path::new(p).is_file() => PathBuf::new(),
        _ => load_config(&config.config)?.agent.recording_dir,
    };
    let paths: Vec<PathBuf> = if all {
        recording::list(&dir, &recording::RecordingFilter::default())
            .into_iter()
            .map(|r| r.path)
            .collect()
    } else {
        vec![find_recording(&dir, id.unwrap_or_default()).map_err(CliError::invalid)?]
    };
    let reports: Vec<_> = paths
        .iter()
        .map(|p| recording::verify_signed(p, &keys))
        .collect();
    report_verified(&reports, all)
}

/// The recording file for an id or a path given on the command line.
fn find_recording(dir: &Path, id: &str) -> Result<PathBuf, String> {
    let as_path = Path::new(id);
    if as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    let uuid = uuid::Uuid::parse_str(id)
        .map_err(|_| format!("\"{id}\" is neither a recording file nor a session id"))?;
    recording::locate(dir, uuid)
        .ok_or_else(|| format!("no recording of session {id} under {}", dir.display()))
}

/// Reads the recording an id or path names. A file path needs no
/// configuration (for checking recordings off the host); an id is looked
/// up under the configuration's recording_dir, or with `--remote` in the
/// bucket.
fn open_recording(config: &ConfigArg, remote: RemoteArg, id: &str) -> Result<Recording, CliError> {
    if remote.remote {
        let (name, bytes) = Bucket::open(config)?.fetch(id)?;
        return recording::reader::read_from(std::io::Cursor::new(bytes), &name)
            .map_err(|e| CliError::failed(format!("cannot read {}: {e}", name.display())));
    }
    let dir = if Path::new(id).is_file() {
        PathBuf::new()
    } else {
        load_config(&config.config)?.agent.recording_dir
    };
    let path = find_recording(&dir, id).map_err(CliError::failed)?;
    recording::read_recording(&path)
        .map_err(|e| CliError::failed(format!("cannot read {}: {e}", path.display())))
}

/// Writes an export to `out`, or to standard output; binary output is not
/// written to a terminal.
fn write_export(bytes: &[u8], out: Option<&Path>, binary: bool) -> Result<(), CliError> {
    match out {
        Some(path) => std::fs::write(path, bytes)
            .map_err(|e| CliError::failed(format!("cannot write {}: {e}", path.display()))),
        None if binary && std::io::stdout().is_terminal() => Err(CliError::failed(
            "a pcap is binary: give --out FILE or redirect standard output",
        )),
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(bytes)
                .and_then(|()| stdout.flush())
                .map_err(|e| CliError::failed(format!("cannot write the export: {e}")))
        }
    }
}
