//! The uploader against an in-memory object store: what goes up, under
//! which key, and when the local file may go.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;

use md5::Digest as _;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{Attribute, GetOptions, ObjectStore as _, ObjectStoreExt as _, PutPayload};

use super::{object_key, Fingerprint, KeyParts, Outcome, Uploader, CHAIN_HEAD_METADATA};
use crate::config::UploadSettings;
use crate::recording::tests::record_session;
use crate::recording::{read_recording, Fsync};

fn settings() -> UploadSettings {
    UploadSettings {
        s3: crate::config::S3Access {
            bucket: "recordings".into(),
            endpoint: None,
            region: "us-east-1".into(),
            access_key_id: None,
            secret_access_key_file: None,
        },
        prefix: "fleet/eu".into(),
        host: "runner-a".into(),
        max_spool_size: 1 << 20,
        max_retry_interval: std::time::Duration::from_secs(1),
        object_lock: None,
    }
}

fn key_of(path: &Path) -> ObjectPath {
    let header = read_recording(path).unwrap().header().unwrap().clone();
    object_key(&settings(), &KeyParts::of(Some(&header), path).unwrap()).unwrap()
}

async fn object(store: &InMemory, key: &ObjectPath) -> Vec<u8> {
    store
        .get(key)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn a_recording_goes_up_under_its_key_and_the_local_copy_goes_once_verified() {
    let dir = tempfile::tempdir().unwrap();
    let (info, path) = record_session(dir.path(), Fsync::OnClose);
    let original = std::fs::read(&path).unwrap();
    let key = key_of(&path);
    let day = read_recording(&path).unwrap().header().unwrap().started_at[..10].to_string();
    assert_eq!(
        key.to_string(),
        format!("fleet/eu/runner-a/{day}/orders-prod/{}.tgrec", info.id)
    );
    let store = Arc::new(InMemory::new());
    let uploader = Uploader::new(store.clone(), settings());

    assert_eq!(uploader.upload(&path).await, Outcome::Uploaded);
    assert!(!path.exists(), "the local copy is deleted once verified");
    assert_eq!(object(&store, &key).await, original);
    // The chain head in the metadata is the last record's hash.
    let copy = dir.path().join("copy.tgrec");
    std::fs::write(&copy, &original).unwrap();
    let local = Fingerprint::of(&copy, u64::MAX, 1 << 20).unwrap();
    let head = store
        .get_opts(
            &key,
            GetOptions {
                head: true,
                ..GetOptions::default()
            },
        )
        .await
        .unwrap();
    let stored = head
        .attributes
        .get(&Attribute::Metadata(CHAIN_HEAD_METADATA.into()))
        .map(|v| v.as_ref().to_string());
    assert!(local.chain_head.is_some());
    assert_eq!(stored, local.chain_head);
}

#[tokio::test]
async fn the_same_recording_found_in_the_bucket_is_not_written_again() {
    // What an agent killed between the upload and the delete leaves: the
    // object is there and the local file too.
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = record_session(dir.path(), Fsync::OnClose);
    let original = std::fs::read(&path).unwrap();
    let store = Arc::new(InMemory::new());
    let uploader = Uploader::new(store.clone(), settings());
    assert_eq!(uploader.upload(&path).await, Outcome::Uploaded);
    let first = store
        .head(&key_of_bytes(&original, dir.path()))
        .await
        .unwrap();

    std::fs::write(&path, &original).unwrap();
    assert_eq!(uploader.upload(&path).await, Outcome::AlreadyPresent);
    assert!(!path.exists());
    let again = store.head(&first.location).await.unwrap();
    assert_eq!(again.e_tag, first.e_tag, "the object was not written twice");
}

fn key_of_bytes(bytes: &[u8], dir: &Path) -> ObjectPath {
    let header = crate::recording::reader::read_from(bytes, Path::new("x"))
        .unwrap()
        .header()
        .unwrap()
        .clone();
    let named = dir.join(format!("{}.tgrec", header.session));
    object_key(&settings(), &KeyParts::of(Some(&header), &named).unwrap()).unwrap()
}

#[tokio::test]
async fn a_file_without_a_readable_header_goes_up_as_it_is_and_blocks_nothing() {
    // What a crash right after creating a file leaves (nothing), and a
    // damaged start: both are uploaded under "unreadable", by their name.
    let dir = tempfile::tempdir().unwrap();
    let day = dir.path().join("2026/12/07");
    std::fs::create_dir_all(&day).unwrap();
    let store = Arc::new(InMemory::new());
    let uploader = Uploader::new(store.clone(), settings());
    for (name, bytes) in [
        ("01a24f0f-615b-76d6-9fe2-9a6817dee47f", &b""[..]),
        (
            "01a24f0f-615b-76d6-9fe2-9a6817dee480",
            &b"\0\0\0\x03abc"[..],
        ),
    ] {
        let path = day.join(format!("{name}.tgrec"));
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(uploader.upload(&path).await, Outcome::Uploaded);
        assert!(!path.exists());
        let key = ObjectPath::from(format!(
            "fleet/eu/runner-a/2026-12-07/unreadable/{name}.tgrec"
        ));
        assert_eq!(object(&store, &key).await, bytes);
    }
}

#[tokio::test]
async fn another_object_under_the_key_is_a_conflict_and_the_local_file_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = record_session(dir.path(), Fsync::OnClose);
    let key = key_of(&path);
    let store = Arc::new(InMemory::new());
    store
        .put(&key, PutPayload::from_static(b"someone else's bytes"))
        .await
        .unwrap();
    let uploader = Uploader::new(store.clone(), settings());
    match uploader.upload(&path).await {
        Outcome::Conflict(why) => assert!(why.contains("another object"), "{why}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(path.exists(), "the local recording is kept");
    assert_eq!(object(&store, &key).await, b"someone else's bytes");
}

#[tokio::test]
async fn a_recording_over_the_single_put_size_goes_in_parts_and_is_verified() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = record_session(dir.path(), Fsync::OnClose);
    let original = std::fs::read(&path).unwrap();
    assert!(original.len() > 300, "a few parts: {}", original.len());
    let key = key_of(&path);
    let store = Arc::new(InMemory::new());
    let uploader = Uploader::new(store.clone(), settings()).with_parts(100, 128);
    assert_eq!(uploader.upload(&path).await, Outcome::Uploaded);
    assert!(!path.exists());
    assert_eq!(object(&store, &key).await, original);
}

#[test]
fn the_etag_is_the_md5_or_the_multipart_md5_of_md5s() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = record_session(dir.path(), Fsync::OnClose);
    let bytes = std::fs::read(&path).unwrap();
    let single = Fingerprint::of(&path, u64::MAX, 1 << 20).unwrap();
    assert_eq!(single.etag(), hex::encode(md5::Md5::digest(&bytes)));
    let parts = Fingerprint::of(&path, 0, 100).unwrap();
    let count = bytes.len().div_ceil(100);
    let mut of_parts = Vec::new();
    for chunk in bytes.chunks(100) {
        of_parts.extend_from_slice(&md5::Md5::digest(chunk));
    }
    assert_eq!(
        parts.etag(),
        format!("{}-{count}", hex::encode(md5::Md5::digest(&of_parts)))
    );
}

#[test]
fn key_segments_from_names_cannot_climb_or_split_the_key() {
    assert_eq!(super::key_segment("orders/prod"), "orders_prod");
    assert_eq!(super::key_segment(".."), "_");
    assert_eq!(super::key_segment(""), "_");
    assert_eq!(super::key_segment("db-1.eu_west"), "db-1.eu_west");
}
