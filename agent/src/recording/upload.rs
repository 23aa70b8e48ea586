//! Recordings to S3-compatible object storage (`[upload]`).
//!
//! The recording directory is the spool: a recording closes there as
//! always, then [`keep_uploading`] puts it in the bucket under
//! `PREFIX/HOST/YYYY-MM-DD/TARGET/ID.tgrec`, reads back what the bucket
//! holds (size, the content's ETag, the chain head in the object's
//! metadata) and only then deletes the local file. A failed upload is
//! retried with backoff; what is not uploaded when the agent stops is
//! uploaded after it starts again, since the spool is only files.
//!
//! An object is never written twice: a recording's key is fixed by its
//! header, and the upload is conditional (`If-None-Match: *`). When the
//! agent died after the upload and before the delete, the retry finds the
//! object, verifies it, and deletes the local copy; a different object
//! under that key is a conflict that keeps the local file.
//!
//! Uses the `object_store` crate: one maintained client (Apache Arrow's)
//! for AWS S3 and every S3-compatible store, with conditional puts,
//! multipart uploads, retries and the standard AWS credential chain (the
//! environment, web identity, the instance's role), built on rustls with
//! ring as the rest of the agent. It cannot send per-object Object Lock
//! headers: retention comes from the bucket's default Object Lock rule.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use md5::Digest as _;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, AttributeValue, Attributes, BackoffConfig, ClientOptions, GetOptions, ObjectStore,
    ObjectStoreExt as _, PutMode, PutMultipartOptions, PutOptions, PutPayload, RetryConfig,
};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use super::codec::{body, decode_body, frame_hash, FrameRead, FrameReader};
use super::format::{Header, Record, FILE_EXTENSION};
use super::reader::day_dirs;
use super::retention::{recording_files, RecordingFile};
use super::RecordingSink;
use crate::config::{S3Access, UploadSettings};

/// The object metadata key (`x-amz-meta-...`) holding the hash of the
/// recording's last record: its chain head.
pub const CHAIN_HEAD_METADATA: &str = "tollgate-chain-head";

/// Recordings up to this size go in one conditional PUT; larger ones in
/// parts of [`PART_SIZE`], read from the file as they are sent.
const SINGLE_PUT_MAX: u64 = 64 << 20;
const PART_SIZE: usize = 16 << 20;

/// How often the spool is looked at when nothing failed.
const SCAN_INTERVAL: Duration = Duration::from_secs(2);
/// Backoff after a failed upload: doubled at each failure up to the
/// configured `max_retry_interval`.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);

/// Opens the bucket `settings` name. Credentials: the static key when
/// configured, else the AWS environment variables, web identity or the
/// instance's role, as the AWS tools find them.
pub fn open_store(settings: &S3Access) -> Result<AmazonS3, String> {
    s3_builder(settings, &[])?
        .build()
        .map_err(|e| format!("cannot use bucket \"{}\": {e}", settings.bucket))
}

/// The client for `settings`, sending `headers` with every request (signed
/// with it: object_store adds them before signing).
fn s3_builder(
    settings: &S3Access,
    headers: &[(&'static str, String)],
) -> Result<AmazonS3Builder, String> {
    // What AWS's own SDKs send beside x-amz-checksum-sha256; S3-compatible
    // stores with Object Lock may ask for it.
    let mut header_map = object_store::HeaderMap::new();
    header_map.insert(
        "x-amz-sdk-checksum-algorithm",
        object_store::HeaderValue::from_static("SHA256"),
    );
    for (name, value) in headers {
        let value = object_store::HeaderValue::from_str(value)
            .map_err(|e| format!("header {name}: {e}"))?;
        header_map.insert(*name, value);
    }
    // reqwest's rustls asks for the process's provider; the agent's TLS
    // uses ring everywhere. Already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&settings.bucket)
        .with_region(&settings.region)
        // The bucket checks what it received against this checksum; buckets
        // with Object Lock refuse uploads that carry none.
        .with_checksum_algorithm(object_store::aws::Checksum::SHA256)
        // Retries are the spool's (with backoff, forever); the client's own
        // are kept short so that a dead endpoint is noticed quickly.
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 2,
            retry_timeout: Duration::from_secs(20),
        })
        .with_client_options(
            ClientOptions::new()
                .with_connect_timeout(Duration::from_secs(5))
                .with_timeout(Duration::from_secs(300))
                .with_default_headers(header_map),
        );
    if let Some(endpoint) = &settings.endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false);
    }
    if let (Some(id), Some(file)) = (&settings.access_key_id, &settings.secret_access_key_file) {
        let secret = crate::config::secret::read_secret_file(file)?;
        let secret = std::str::from_utf8(secret.expose())
            .map_err(|_| format!("{} does not hold text", file.display()))?
            .trim()
            .to_string();
        builder = builder
            .with_access_key_id(id)
            .with_secret_access_key(secret);
    }
    Ok(builder)
}

/// The store uploads go through: with `[upload] object_lock_mode`, one
/// whose requests carry the Object Lock headers, retained until
/// `object_lock_days` from now; else `plain`.
fn uploading_store(
    settings: &UploadSettings,
    plain: &Arc<dyn ObjectStore>,
) -> Result<Arc<dyn ObjectStore>, String> {
    let Some(lock) = &settings.object_lock else {
        return Ok(Arc::clone(plain));
    };
    let until = SystemTime::now() + Duration::from_secs(lock.days * 86_400);
    let until = super::writer::rfc3339_millis(until);
    let store = s3_builder(
        &settings.s3,
        &[
            ("x-amz-object-lock-mode", lock.mode.as_header().to_string()),
            ("x-amz-object-lock-retain-until-date", until),
        ],
    )?
    .build()
    .map_err(|e| format!("cannot use bucket \"{}\": {e}", settings.s3.bucket))?;
    Ok(Arc::new(store))
}

/// What the uploader has done, for metrics and status.
#[derive(Debug, Default)]
pub struct UploadStats {
    /// Bytes of recordings in the spool (open ones included).
    pub spool_bytes: AtomicU64,
    /// Recordings in the spool (open ones included).
    pub spool_recordings: AtomicU64,
    /// When the oldest closed recording not yet uploaded was last written
    /// (Unix seconds), 0 when every closed one is uploaded.
    pub oldest_unshipped_unix: AtomicU64,
    /// Upload attempts by outcome.
    pub uploaded: AtomicU64,
    pub already_present: AtomicU64,
    pub failed: AtomicU64,
    pub conflict: AtomicU64,
    /// The last failure, in words.
    pub last_error: Mutex<Option<String>>,
}

impl UploadStats {
    /// Counts one attempt's outcome.
    fn count(&self, outcome: &Outcome) {
        let counter = match outcome {
            Outcome::Uploaded => &self.uploaded,
            Outcome::AlreadyPresent => &self.already_present,
            Outcome::Failed(_) => &self.failed,
            Outcome::Conflict(_) => &self.conflict,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Outcome::Failed(why) | Outcome::Conflict(why) = outcome {
            *self
                .last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why.clone());
        }
    }

    /// Seconds since the oldest unshipped recording was closed, 0 when none.
    pub fn oldest_unshipped_age(&self, now: SystemTime) -> u64 {
        match self.oldest_unshipped_unix.load(Ordering::Relaxed) {
            0 => 0,
            at => unix_secs(now).saturating_sub(at),
        }
    }

    /// The Prometheus lines for these counters.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP tollgate_upload_spool_bytes Bytes of recordings on this host, waiting for upload or still open.\n# TYPE tollgate_upload_spool_bytes gauge\ntollgate_upload_spool_bytes {}\n# HELP tollgate_upload_spool_recordings Recordings on this host, waiting for upload or still open.\n# TYPE tollgate_upload_spool_recordings gauge\ntollgate_upload_spool_recordings {}\n# HELP tollgate_upload_oldest_unshipped_seconds Age of the oldest closed recording not yet uploaded (0: none).\n# TYPE tollgate_upload_oldest_unshipped_seconds gauge\ntollgate_upload_oldest_unshipped_seconds {}\n# HELP tollgate_uploads_total Recording uploads, by outcome.\n# TYPE tollgate_uploads_total counter",
            load(&self.spool_bytes),
            load(&self.spool_recordings),
            self.oldest_unshipped_age(SystemTime::now()),
        );
        for (outcome, counter) in [
            ("uploaded", &self.uploaded),
            ("already_present", &self.already_present),
            ("failed", &self.failed),
            ("conflict", &self.conflict),
        ] {
            let _ = writeln!(
                out,
                "tollgate_uploads_total{{outcome=\"{outcome}\"}} {}",
                load(counter)
            );
        }
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// How one recording's upload went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Uploaded and verified; the local file is deleted.
    Uploaded,
    /// The bucket already held this very recording (an earlier run
    /// uploaded it and stopped before deleting it); the local file is
    /// deleted.
    AlreadyPresent,
    /// Not uploaded now (the bucket unreachable, say); retried later.
    Failed(String),
    /// The bucket holds a different object under this recording's key;
    /// the local file is kept and not tried again until restart.
    Conflict(String),
}

/// The uploader: the bucket, where keys go, and its counters.
pub struct Uploader {
    store: Arc<dyn ObjectStore>,
    settings: UploadSettings,
    /// Its counters.
    pub stats: Arc<UploadStats>,
    /// Files whose key holds another object: left alone until restart.
    conflicts: Mutex<HashSet<PathBuf>>,
    /// How files are sent: one PUT up to this size, else parts of
    /// `part_size` ([`SINGLE_PUT_MAX`], [`PART_SIZE`]; smaller in tests).
    single_put_max: u64,
    part_size: usize,
}

impl Uploader {
    /// An uploader to `store` as `settings` say.
    pub fn new(store: Arc<dyn ObjectStore>, settings: UploadSettings) -> Uploader {
        Uploader {
            store,
            settings,
            stats: Arc::default(),
            conflicts: Mutex::default(),
            single_put_max: SINGLE_PUT_MAX,
            part_size: PART_SIZE,
        }
    }

    /// Sends files over `single_put_max` bytes in parts of `part_size`.
    #[cfg(test)]
    fn with_parts(mut self, single_put_max: u64, part_size: usize) -> Uploader {
        self.single_put_max = single_put_max;
        self.part_size = part_size;
        self
    }

    /// Looks at the spool once: updates the counters, marks the spool full
    /// (or not) in `recorder`, and uploads the closed recordings oldest
    /// first until one fails. Returns whether every attempt succeeded.
    pub async fn pass(
        &self,
        dir: &Path,
        recorder: &RecordingSink,
        stop: &CancellationToken,
    ) -> bool {
        let Some(files) = self.scan(dir, recorder).await else {
            return false;
        };
        let mut spool_bytes: u64 = files.iter().map(|f| f.bytes).sum();
        let mut spool_files = files.len() as u64;
        let mut pending: std::collections::VecDeque<_> = {
            let conflicts = self.lock_conflicts();
            files
                .into_iter()
                .filter(|f| !f.writing && !conflicts.contains(&f.path))
                .collect()
        };
        self.publish(spool_bytes, spool_files, pending.front());
        while let Some(file) = pending.pop_front() {
            if stop.is_cancelled() {
                return false;
            }
            let outcome = self.upload(&file.path).await;
            self.stats.count(&outcome);
            match &outcome {
                Outcome::Uploaded | Outcome::AlreadyPresent => {
                    spool_bytes = spool_bytes.saturating_sub(file.bytes);
                    spool_files = spool_files.saturating_sub(1);
                    self.publish(spool_bytes, spool_files, pending.front());
                    self.mark_spool_full(recorder, spool_bytes);
                }
                Outcome::Conflict(why) => {
                    tracing::error!(path = %file.path.display(), "recording not uploaded and kept: {why}");
                    self.lock_conflicts().insert(file.path.clone());
                }
                Outcome::Failed(why) => {
                    tracing::warn!(path = %file.path.display(), "recording upload failed; retrying later: {why}");
                    return false;
                }
            }
        }
        true
    }

    /// Lists the spool and marks it full (or not) in `recorder`; the agent
    /// does this once before it serves, so that a spool left full by the
    /// last run refuses sessions from the first one.
    pub(crate) async fn scan(
        &self,
        dir: &Path,
        recorder: &RecordingSink,
    ) -> Option<Vec<RecordingFile>> {
        // Taken before the listing, as retention asks: a file created
        // after it is not listed.
        let open = recorder.writing_now();
        let writing = move |id: &uuid::Uuid| open.contains(id);
        let dir = dir.to_path_buf();
        let scan = tokio::task::spawn_blocking(move || {
            let mut errors = Vec::new();
            let files = recording_files(&day_dirs(&dir), SystemTime::now(), &writing, &mut errors);
            (files, errors)
        })
        .await;
        let Ok((files, errors)) = scan else {
            return None;
        };
        for e in errors {
            tracing::warn!("upload spool: {e}");
        }
        self.mark_spool_full(recorder, files.iter().map(|f| f.bytes).sum());
        Some(files)
    }

    fn lock_conflicts(&self) -> std::sync::MutexGuard<'_, HashSet<PathBuf>> {
        self.conflicts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish(&self, bytes: u64, files: u64, oldest: Option<&RecordingFile>) {
        self.stats.spool_bytes.store(bytes, Ordering::Relaxed);
        self.stats.spool_recordings.store(files, Ordering::Relaxed);
        self.stats.oldest_unshipped_unix.store(
            oldest.map_or(0, |f| unix_secs(f.modified).max(1)),
            Ordering::Relaxed,
        );
    }

    fn mark_spool_full(&self, recorder: &RecordingSink, bytes: u64) {
        let max = self.settings.max_spool_size;
        recorder.set_spool_full((bytes > max).then(|| {
            format!(
                "{bytes} bytes of recordings wait on this host for upload to bucket \"{}\" (max_spool_size is {max}); new sessions are refused until uploads catch up",
                self.settings.s3.bucket
            )
        }));
    }

    /// Uploads one closed recording and verifies the bucket's copy; the
    /// local file is deleted only once it is verified.
    pub async fn upload(&self, path: &Path) -> Outcome {
        let local = {
            let owned = path.to_path_buf();
            let (single_put_max, part_size) = (self.single_put_max, self.part_size);
            let fingerprint = move || Fingerprint::of(&owned, single_put_max, part_size);
            match tokio::task::spawn_blocking(fingerprint).await {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => {
                    return Outcome::Failed(format!("cannot read {}: {e}", path.display()))
                }
                Err(e) => return Outcome::Failed(e.to_string()),
            }
        };
        let Some(parts) = KeyParts::of(local.header.as_ref(), path) else {
            return Outcome::Conflict(format!("{} is not named <session>.tgrec", path.display()));
        };
        if local.header.is_none() {
            tracing::warn!(path = %path.display(), "a recording without a readable header (cut short at its start, or damaged) is uploaded as it is, under target \"{UNREADABLE}\"");
        }
        let key = match object_key(&self.settings, &parts) {
            Ok(k) => k,
            Err(e) => return Outcome::Conflict(e),
        };
        let created = match self.put(path, &key, &local).await {
            Ok(created) => created,
            Err(e) => return Outcome::Failed(format!("cannot upload to {key}: {e}")),
        };
        match self.check(&key, &local).await {
            Ok(()) => {}
            Err(Check::Unreachable(e)) => {
                return Outcome::Failed(format!("cannot read back {key}: {e}"))
            }
            Err(Check::Differs(why)) => {
                return Outcome::Conflict(format!(
                    "the bucket holds another object under {key}: {why}"
                ))
            }
        }
        if let Err(e) = tokio::fs::remove_file(path).await {
            if e.kind() != io::ErrorKind::NotFound {
                return Outcome::Failed(format!(
                    "uploaded to {key} but cannot delete {}: {e}",
                    path.display()
                ));
            }
        }
        tracing::info!(key = %key, bytes = local.size, "recording uploaded and verified; local copy deleted");
        if created {
            Outcome::Uploaded
        } else {
            Outcome::AlreadyPresent
        }
    }

    /// Puts the file under `key` unless an object is there already;
    /// `Ok(false)` when one was.
    async fn put(
        &self,
        path: &Path,
        key: &ObjectPath,
        local: &Fingerprint,
    ) -> Result<bool, object_store::Error> {
        let mut attributes = Attributes::new();
        if let Some(head) = &local.chain_head {
            attributes.insert(
                Attribute::Metadata(CHAIN_HEAD_METADATA.into()),
                AttributeValue::from(head.clone()),
            );
        }
        if local.part_md5.is_empty() {
            let bytes = tokio::fs::read(path)
                .await
                .map_err(|e| generic(format!("cannot read {}: {e}", path.display())))?;
            if bytes.len() as u64 != local.size {
                return Err(generic(format!(
                    "{} changed while uploading",
                    path.display()
                )));
            }
            let options = PutOptions {
                mode: PutMode::Create,
                attributes,
                ..PutOptions::default()
            };
            let store = uploading_store(&self.settings, &self.store).map_err(generic)?;
            return match store.put_opts(key, PutPayload::from(bytes), options).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(e),
            };
        }
        // Multipart uploads cannot be conditional: look first. One
        // uploader per host and the host in every key leave no one to race.
        match self.store.head(key).await {
            Ok(_) => return Ok(false),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let options = PutMultipartOptions {
            attributes,
            ..PutMultipartOptions::default()
        };
        let store = uploading_store(&self.settings, &self.store).map_err(generic)?;
        let mut upload = store.put_multipart_opts(key, options).await?;
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| generic(format!("cannot open {}: {e}", path.display())))?;
        let mut sent: u64 = 0;
        let result = async {
            while sent < local.size {
                let want = (local.size - sent).min(self.part_size as u64) as usize;
                let mut part = vec![0u8; want];
                tokio::io::AsyncReadExt::read_exact(&mut file, &mut part)
                    .await
                    .map_err(|e| generic(format!("cannot read {}: {e}", path.display())))?;
                upload.put_part(PutPayload::from(part)).await?;
                sent += want as u64;
            }
            upload.complete().await
        }
        .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) => {
                let _ = upload.abort().await;
                Err(e)
            }
        }
    }

    /// Whether the object under `key` is this recording: its size, its
    /// chain head, and its content (by ETag, or read back when the store's
    /// ETag is not an MD5 of the content, as with KMS encryption).
    async fn check(&self, key: &ObjectPath, local: &Fingerprint) -> Result<(), Check> {
        let head = self
            .store
            .get_opts(
                key,
                GetOptions {
                    head: true,
                    ..GetOptions::default()
                },
            )
            .await
            .map_err(|e| Check::Unreachable(e.to_string()))?;
        if head.meta.size != local.size {
            return Err(Check::Differs(format!(
                "{} bytes there, {} here",
                head.meta.size, local.size
            )));
        }
        let their_head = head
            .attributes
            .get(&Attribute::Metadata(CHAIN_HEAD_METADATA.into()))
            .map(|v| v.as_ref().to_string());
        if their_head != local.chain_head {
            return Err(Check::Differs(format!(
                "chain head {} there, {} here",
                their_head.as_deref().unwrap_or("(none)"),
                local.chain_head.as_deref().unwrap_or("(none)")
            )));
        }
        let etag = head.meta.e_tag.as_deref().map(|t| t.trim_matches('"'));
        if etag.is_some_and(|t| t == local.etag()) {
            return Ok(());
        }
        let bytes = self
            .store
            .get(key)
            .await
            .map_err(|e| Check::Unreachable(e.to_string()))?
            .bytes()
            .await
            .map_err(|e| Check::Unreachable(e.to_string()))?;
        if hex::encode(Sha256::digest(&bytes)) == local.sha256 {
            Ok(())
        } else {
            Err(Check::Differs("the content differs".into()))
        }
    }
}

/// Why a bucket's copy was not verified.
enum Check {
    Unreachable(String),
    Differs(String),
}

fn generic(message: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "upload",
        source: message.into(),
    }
}

/// Uploads closed recordings under `dir` until `stop`: a pass at start
/// and every [`SCAN_INTERVAL`], with backoff after a failure.
pub async fn keep_uploading(
    uploader: Arc<Uploader>,
    dir: PathBuf,
    recorder: Arc<RecordingSink>,
    stop: CancellationToken,
) {
    let most = uploader.settings.max_retry_interval.max(BACKOFF_FIRST);
    let mut backoff = BACKOFF_FIRST;
    loop {
        let wait = if uploader.pass(&dir, &recorder, &stop).await {
            backoff = BACKOFF_FIRST;
            SCAN_INTERVAL
        } else {
            let wait = backoff;
            backoff = (backoff * 2).min(most);
            wait
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// What is known of a local recording before it is uploaded.
struct Fingerprint {
    /// `None` when the file does not start with a readable header: what a
    /// crash right after creating it leaves, or damage. Such a file is
    /// uploaded all the same (as evidence), never left to block the spool.
    header: Option<Header>,
    size: u64,
    /// The last whole record's hash; `None` for a file with no record.
    chain_head: Option<String>,
    /// MD5 of the whole file, and of each part when it goes in parts.
    md5: [u8; 16],
    part_md5: Vec<[u8; 16]>,
    sha256: String,
}

impl Fingerprint {
    /// Reads `path` twice: its records (header, chain head), then its
    /// bytes (digests, per part of `part_size` when over `single_put_max`).
    fn of(path: &Path, single_put_max: u64, part_size: usize) -> io::Result<Fingerprint> {
        let mut frames = FrameReader::new(BufReader::new(File::open(path)?));
        let mut header = None;
        let mut chain_head = None;
        // What a crash leaves (a cut frame) or garbage ends the reading;
        // the file is uploaded as it is, and verification reports it.
        let mut first = true;
        while let FrameRead::Frame { bytes, .. } = frames.next_frame()? {
            if std::mem::take(&mut first) {
                if let Ok(Record::Header(h)) = decode_body(body(&bytes)) {
                    header = Some(*h);
                }
            }
            chain_head = Some(frame_hash(&bytes));
        }
        let mut file = BufReader::new(File::open(path)?);
        let mut md5 = md5::Md5::new();
        let mut part = md5::Md5::new();
        let mut sha = Sha256::new();
        let mut part_md5 = Vec::new();
        let (mut size, mut in_part) = (0u64, 0usize);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let mut chunk = &buf[..n];
            md5.update(chunk);
            sha.update(chunk);
            size += n as u64;
            while !chunk.is_empty() {
                let take = chunk.len().min(part_size - in_part);
                part.update(&chunk[..take]);
                in_part += take;
                chunk = &chunk[take..];
                if in_part == part_size {
                    part_md5.push(std::mem::take(&mut part).finalize().into());
                    in_part = 0;
                }
            }
        }
        if in_part > 0 {
            part_md5.push(part.finalize().into());
        }
        Ok(Fingerprint {
            header,
            size,
            chain_head,
            md5: md5.finalize().into(),
            part_md5: if size > single_put_max {
                part_md5
            } else {
                Vec::new()
            },
            sha256: hex::encode(sha.finalize()),
        })
    }

    /// The ETag S3 gives this content: the MD5 of a single PUT, or the
    /// MD5 of the parts' MD5s and their count for a multipart upload.
    fn etag(&self) -> String {
        if self.part_md5.is_empty() {
            return hex::encode(self.md5);
        }
        let mut of_parts = md5::Md5::new();
        for p in &self.part_md5 {
            of_parts.update(p);
        }
        format!(
            "{}-{}",
            hex::encode(of_parts.finalize()),
            self.part_md5.len()
        )
    }
}

/// The target segment of a recording with no readable header.
pub const UNREADABLE: &str = "unreadable";

/// What names a recording's object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyParts {
    /// `YYYY-MM-DD` the session started.
    pub day: String,
    /// Its target, `jobs` for a job recording, [`UNREADABLE`] without a
    /// readable header.
    pub target: String,
    /// The id the file is named after (unique in the spool; `verify`
    /// reports a header that says otherwise).
    pub id: uuid::Uuid,
}

impl KeyParts {
    /// From the header when there is one, else from the file's dated
    /// directory; `None` for a file not named `<uuid>.tgrec`.
    pub fn of(header: Option<&Header>, path: &Path) -> Option<KeyParts> {
        let id = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| uuid::Uuid::parse_str(s).ok())?;
        Some(match header {
            Some(h) => KeyParts {
                day: h.started_at.get(..10).unwrap_or("unknown-day").to_string(),
                target: if h.protocol == "job" {
                    "jobs".to_string()
                } else {
                    h.target.clone()
                },
                id,
            },
            None => KeyParts {
                day: path
                    .parent()
                    .and_then(super::reader::day_key_of_path)
                    .map_or("unknown-day".to_string(), |d| d.replace('/', "-")),
                target: UNREADABLE.to_string(),
                id,
            },
        })
    }
}

/// `PREFIX/HOST/YYYY-MM-DD/TARGET/ID.tgrec` for a recording.
pub fn object_key(settings: &UploadSettings, parts: &KeyParts) -> Result<ObjectPath, String> {
    let mut key = String::new();
    if !settings.prefix.is_empty() {
        key.push_str(&settings.prefix);
        key.push('/');
    }
    key.push_str(&format!(
        "{}/{}/{}/{}.{FILE_EXTENSION}",
        key_segment(&settings.host),
        key_segment(&parts.day),
        key_segment(&parts.target),
        parts.id
    ));
    ObjectPath::parse(&key).map_err(|e| format!("no valid object key for {}: {e}", parts.id))
}

/// `s` with every character but letters, digits, '.', '-' and '_' made
/// '_' (a name from configuration or a header, inside a key).
fn key_segment(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match cleaned.as_str() {
        "" | "." | ".." => "_".to_string(),
        _ => cleaned,
    }
}

/// One recording in the bucket, as its key names it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RemoteRecording {
    /// The object's key.
    pub key: String,
    /// The host that uploaded it.
    pub host: String,
    /// `YYYY-MM-DD` the session started.
    pub day: String,
    /// The target (`jobs` for job recordings).
    pub target: String,
    /// The session (or job) id.
    pub id: uuid::Uuid,
    /// Bytes.
    pub size: u64,
    /// When the bucket stored it, RFC 3339.
    pub stored_at: String,
}

/// Every recording under the configured prefix, oldest day first.
pub async fn list_remote(
    store: &dyn ObjectStore,
    settings: &UploadSettings,
) -> Result<Vec<RemoteRecording>, String> {
    use futures_util::StreamExt as _;
    let prefix = (!settings.prefix.is_empty()).then(|| ObjectPath::from(settings.prefix.as_str()));
    let mut listing = store.list(prefix.as_ref());
    let mut found = Vec::new();
    while let Some(meta) = listing.next().await {
        let meta =
            meta.map_err(|e| format!("cannot list bucket \"{}\": {e}", settings.s3.bucket))?;
        let key = meta.location.to_string();
        let rest = key
            .strip_prefix(settings.prefix.as_str())
            .unwrap_or(&key)
            .trim_start_matches('/');
        let parts: Vec<&str> = rest.split('/').collect();
        let [host, day, target, file] = parts[..] else {
            continue;
        };
        let Some(id) = file
            .strip_suffix(&format!(".{FILE_EXTENSION}"))
            .and_then(|s| uuid::Uuid::parse_str(s).ok())
        else {
            continue;
        };
        found.push(RemoteRecording {
            host: host.to_string(),
            day: day.to_string(),
            target: target.to_string(),
            id,
            size: meta.size,
            stored_at: meta.last_modified.to_rfc3339(),
            key,
        });
    }
    found.sort_by(|a, b| a.day.cmp(&b.day).then(a.id.cmp(&b.id)));
    Ok(found)
}

/// The bytes of the object under `key`.
pub async fn fetch_key(store: &dyn ObjectStore, key: &str) -> Result<Vec<u8>, String> {
    let bytes = store
        .get(&ObjectPath::from(key))
        .await
        .map_err(|e| format!("cannot read {key}: {e}"))?
        .bytes()
        .await
        .map_err(|e| format!("cannot read {key}: {e}"))?;
    Ok(bytes.to_vec())
}

#[cfg(test)]
#[path = "upload_tests.rs"]
mod tests;
