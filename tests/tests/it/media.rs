//! Media: `JetStreamObjectStore` against object_store's published
//! conformance suite (its `integration` feature) on a real nats-server, and
//! the media layer's own tests against every backend: `nats://`, `file://`,
//! `memory://` and `s3://` (moto).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use comfyq_shared::ids::{JobId, TenantId};
use comfyq_shared::jetstream_store::JetStreamObjectStore;
use comfyq_shared::media::{MediaError, MediaLimits, MediaStore};
use comfyq_shared::names::Names;
use comfyq_tests::{MotoServer, NatsServer};
use futures::TryStreamExt;
use object_store::integration;
use object_store::path::Path;
use object_store::{DynObjectStore, ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

/// A fresh bucket on its own server, and the async-nats view of its stream.
async fn jetstream_store() -> (NatsServer, JetStreamObjectStore, jetstream::stream::Stream) {
    let server = NatsServer::start().await;
    let js = jetstream::new(server.client().await);
    comfyq_shared::provision::ensure_object_store(
        &js,
        comfyq_shared::config::Provisioning::CreateOrUpdate,
        "conformance",
        Duration::from_secs(3600),
        1,
    )
    .await
    .expect("bucket");
    let store = JetStreamObjectStore::open(js.clone(), "conformance")
        .await
        .expect("open");
    let stream = js.get_stream("OBJ_conformance").await.expect("stream");
    (server, store, stream)
}

/// Messages left in the bucket's stream: chunks of every live object plus
/// one meta message per name.
async fn stream_messages(stream: &mut jetstream::stream::Stream) -> u64 {
    stream.info().await.expect("stream info").state.messages
}

// --- object_store's conformance suite --------------------------------------
//
// Not run, because they cannot apply:
// - `multipart` / `multipart_with_opts` / `multipart_put_part_out_of_order`
//   need `MultipartStore` (parts with ids, completed in any order):
//   JetStream chunks are one ordered subject per object, so parts are written
//   in the order `put_part` is called (`multipart_out_of_order` below checks
//   that is the order of the calls, not of the awaits).
// - `list_paginated` needs `PaginatedListStore`: the object store has no
//   server-side listing by prefix or page (names are base64 in subjects).
// - versions in `get_opts`: a rollup keeps only the latest meta message, so
//   `ObjectMeta::version` is `None` and the test skips that part itself.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_put_get_delete_list() {
    let (_server, store, mut stream) = jetstream_store().await;
    integration::put_get_delete_list(&store).await;
    // Everything the test wrote it also deleted: no chunk is left behind.
    assert_eq!(
        stream_messages(&mut stream).await,
        count_meta_messages(&store).await
    );
}

/// Meta messages stay (as delete markers) until the bucket's age limit.
async fn count_meta_messages(store: &JetStreamObjectStore) -> u64 {
    let mut count = 0;
    let mut list = store.nats().watch_with_history().await.expect("watch");
    while let Ok(Some(Ok(_))) = tokio::time::timeout(
        Duration::from_millis(300),
        futures::StreamExt::next(&mut list),
    )
    .await
    {
        count += 1;
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_attributes_and_conditional_reads() {
    let (_server, store, _stream) = jetstream_store().await;
    integration::put_get_attributes(&store).await;
    integration::get_opts(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_conditional_puts() {
    let (_server, store, _stream) = jetstream_store().await;
    // `true`: PutMode::Update is supported (the ETag is the object's nuid,
    // checked by Nats-Expected-Last-Subject-Sequence on the meta message).
    integration::put_opts(&store, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_listing() {
    let (_server, store, _stream) = jetstream_store().await;
    integration::list_uses_directories_correctly(&store).await;
    integration::list_with_delimiter(&store).await;
    integration::list_with_offset_exclusivity(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_copy_and_missing_objects() {
    let (_server, store, _stream) = jetstream_store().await;
    let err = integration::get_nonexistent_object(&store, None)
        .await
        .expect_err("missing");
    assert!(matches!(err, object_store::Error::NotFound { .. }), "{err}");
    integration::rename_and_copy(&store).await;
    integration::copy_if_not_exists(&store).await;
    integration::copy_rename_nonexistent_object(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_multipart_uploads() {
    let (_server, store, mut stream) = jetstream_store().await;
    integration::stream_get(&store).await;
    integration::multipart_out_of_order(&store).await;
    // `true`: both uploads complete; the last to complete wins.
    integration::multipart_race_condition(&store, true).await;
    // The aborted uploads of `stream_get` and the overwritten versions left
    // no chunks: what remains is exactly the live objects' chunks + metas.
    let mut live_chunks = 0;
    let mut all = store.nats().list().await.expect("list");
    while let Some(info) = futures::StreamExt::next(&mut all).await {
        live_chunks += info.expect("info").chunks as u64;
    }
    let metas = count_meta_messages(&store).await;
    assert_eq!(stream_messages(&mut stream).await, live_chunks + metas);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_multipart_upload_leaves_nothing() {
    let (_server, store, mut stream) = jetstream_store().await;
    let path = Path::from("dropped");
    let mut upload = store.put_multipart(&path).await.expect("upload");
    upload
        .put_part(vec![7u8; 1 << 20].into())
        .await
        .expect("part");
    drop(upload);
    comfyq_tests::eventually(Duration::from_secs(10), "chunks purged", async || {
        (stream_messages(&mut stream).await == 0).then_some(())
    })
    .await;
    assert!(matches!(
        store.head(&path).await,
        Err(object_store::Error::NotFound { .. })
    ));
}

/// Reads of our own chunk consumer: a range across chunk boundaries, an
/// overwrite while a streamed read is under way (its chunks are purged: the
/// read fails instead of waiting forever), and chunks that do not match the
/// recorded digest or size.
/// Starts reading `path`, overwrites it after the first bytes arrive, and
/// checks that the read then fails as replaced; returns the first part's length.
async fn fails_when_overwritten_mid_read(store: &JetStreamObjectStore, path: &Path) -> usize {
    let mut reading = store.get(path).await.expect("get").into_stream();
    let first = reading.try_next().await.expect("first").expect("bytes");
    store
        .put(path, vec![1u8; 10].into())
        .await
        .expect("overwrite");
    let rest = tokio::time::timeout(Duration::from_secs(30), reading.try_collect::<Vec<_>>())
        .await
        .expect("the read ends");
    let err = rest.expect_err("replaced mid-read");
    assert!(err.to_string().contains("replaced or deleted"), "{err}");
    first.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_check_ranges_replacement_digest_and_size() {
    use base64::Engine as _;
    let (server, store, mut stream) = jetstream_store().await;
    let js = jetstream::new(server.client().await);
    let read = async |path: &Path| store.get(path).await?.bytes().await;

    // Small objects (up to 8 chunks) are read by direct gets: reading many
    // at once leaves no consumer behind (an ordered consumer outlives its
    // reader by 30 s, and many of them hit the server's consumer limit).
    let smalls: Vec<(Path, Vec<u8>)> = (0..40u32)
        .map(|i| {
            let len = 1000 + (i as usize) * 20_000;
            (
                Path::from(format!("s/{i}")),
                (0..len).map(|b| (b % 13) as u8 ^ i as u8).collect(),
            )
        })
        .collect();
    for (path, data) in &smalls {
        store
            .put(path, data.clone().into())
            .await
            .expect("put small");
    }
    let reads = futures::future::join_all(smalls.iter().map(|(path, _)| read(path))).await;
    for ((path, data), got) in smalls.iter().zip(reads) {
        assert_eq!(got.expect("small read")[..], data[..], "{path}");
    }
    let got = store
        .get_range(&smalls[39].0, 100_000..700_000)
        .await
        .expect("small range");
    assert_eq!(&got[..], &smalls[39].1[100_000..700_000]);
    assert_eq!(
        stream
            .info()
            .await
            .expect("stream info")
            .state
            .consumer_count,
        0,
        "small reads create no consumer"
    );

    // 1 MiB (8 chunks, direct gets, streamed): replaced after the first chunk.
    let direct = Path::from("direct");
    store
        .put(&direct, vec![7u8; 1 << 20].into())
        .await
        .expect("put");
    let first = fails_when_overwritten_mid_read(&store, &direct).await;
    assert_eq!(first, 128 * 1024);

    // 4 MiB: streamed (not read whole up front) and more than a few batches.
    let big = Path::from("big");
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    store.put(&big, data.clone().into()).await.expect("put");
    let got = store
        .get_range(&big, 200_000..1_000_000)
        .await
        .expect("range");
    assert_eq!(&got[..], &data[200_000..1_000_000]);
    assert_eq!(read(&big).await.expect("whole")[..], data[..]);

    let first = fails_when_overwritten_mid_read(&store, &big).await;
    assert!(first > 0);

    // A meta message (same chunks) recording another digest or size.
    let small = Path::from("small");
    store
        .put(&small, vec![9u8; 300_000].into())
        .await
        .expect("put");
    let info = store.nats().info("small").await.expect("info");
    let cases: [(fn(&mut _), &str); 3] = [
        (
            |i: &mut async_nats::jetstream::object_store::ObjectInfo| {
                i.digest = Some("SHA-256=AAAA".to_owned())
            },
            "SHA-256",
        ),
        (|i| i.size += 1, "ended before its recorded size"),
        (|i| i.size -= 1, "longer than its recorded size"),
    ];
    for (tamper, expected) in cases {
        let mut tampered = info.clone();
        tamper(&mut tampered);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_ROLLUP, "sub");
        let subject = format!(
            "$O.conformance.M.{}",
            base64::engine::general_purpose::URL_SAFE.encode("small")
        );
        let payload = serde_json::to_vec(&tampered).expect("json");
        js.publish_with_headers(subject, headers, payload.into())
            .await
            .expect("publish")
            .await
            .expect("ack");
        let err = read(&small).await.expect_err(expected);
        assert!(err.to_string().contains(expected), "{expected}: {err}");
    }
}

// --- the media layer on every backend ---------------------------------------

const LIMITS: MediaLimits = MediaLimits {
    max_object_bytes: 1 << 20,
    max_job_bytes: (1 << 20) + (1 << 19),
};

fn names() -> Names {
    Names::new("comfyq").expect("names")
}

async fn nats_media() -> (NatsServer, MediaStore) {
    let server = NatsServer::start().await;
    let js = jetstream::new(server.client().await);
    let config = comfyq_shared::config::MediaConfig {
        url: "nats://layer".to_owned(),
        max_object_bytes: LIMITS.max_object_bytes,
        max_job_bytes: LIMITS.max_job_bytes,
        presign_ttl: None,
    };
    let media = MediaStore::open(
        &config,
        &js,
        names(),
        (Duration::from_secs(3600), 1),
        comfyq_shared::config::Provisioning::CreateOrUpdate,
    )
    .await
    .expect("open");
    (server, media)
}

async fn file_media(dir: &std::path::Path) -> MediaStore {
    let server = NatsServer::start().await; // `open` needs a context; unused by file://
    let js = jetstream::new(server.client().await);
    let config = comfyq_shared::config::MediaConfig {
        url: format!("file://{}", dir.display()),
        max_object_bytes: LIMITS.max_object_bytes,
        max_job_bytes: LIMITS.max_job_bytes,
        presign_ttl: None,
    };
    MediaStore::open(
        &config,
        &js,
        names(),
        (Duration::from_secs(3600), 1),
        comfyq_shared::config::Provisioning::CreateOrUpdate,
    )
    .await
    .expect("open")
}

fn memory_media() -> MediaStore {
    MediaStore::new(
        Arc::new(object_store::memory::InMemory::new()),
        names(),
        LIMITS,
        "memory://",
    )
}

fn s3_media(moto: &MotoServer, presign: Option<Duration>) -> MediaStore {
    comfyq_shared::media::ensure_tls_provider();
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_bucket_name("media")
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .expect("s3");
    MediaStore::s3(s3, "comfyq/media", names(), LIMITS, presign)
}

/// Every object the store holds under the job (bytes and records).
async fn stored_under(media: &MediaStore, tenant: &TenantId, job: &JobId) -> Vec<Path> {
    let prefix = Path::from_iter([tenant.as_str(), job.to_string().as_str()]);
    media
        .object_store()
        .list(Some(&prefix))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .expect("list")
}

/// A reader that yields `good` bytes, then fails (a client that broke off).
struct Broken {
    left: usize,
}

impl tokio::io::AsyncRead for Broken {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.left == 0 {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "client went away",
            )));
        }
        let n = self.left.min(buf.remaining()).min(4096);
        buf.put_slice(&vec![1u8; n]);
        self.left -= n;
        std::task::Poll::Ready(Ok(()))
    }
}

async fn read_all(media: &MediaStore, key: &str) -> Result<Vec<u8>, std::io::Error> {
    let (_, mut reader) = media.get(key).await.map_err(std::io::Error::other)?;
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).await?;
    Ok(bytes)
}

/// Replaces an object's bytes behind the layer's back, keeping what the
/// store says of it (its record, or the JetStream object's meta): what disk
/// corruption or a foreign writer would leave.
enum Tamper<'a> {
    /// Backends with a record per object: the raw store's put does it.
    Raw,
    /// The JetStream store: write the bytes as a new object, then restore
    /// the meta's size and digest of the original.
    Nats(&'a jetstream::Context, &'a str),
}

impl Tamper<'_> {
    async fn replace(&self, media: &MediaStore, path: &Path, bytes: Vec<u8>) {
        match self {
            Tamper::Raw => {
                media
                    .object_store()
                    .put(path, bytes.into())
                    .await
                    .expect("raw put");
            }
            Tamper::Nats(js, bucket) => {
                let store = js.get_object_store(*bucket).await.expect("bucket");
                let original = store.info(path.as_ref()).await.expect("original meta");
                media
                    .object_store()
                    .put(path, bytes.into())
                    .await
                    .expect("raw put");
                let mut forged = store.info(path.as_ref()).await.expect("new meta");
                forged.size = original.size;
                forged.digest = original.digest.clone();
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(async_nats::header::NATS_ROLLUP, "sub");
                let subject = format!(
                    "$O.{bucket}.M.{}",
                    base64::Engine::encode(
                        &base64::engine::general_purpose::URL_SAFE,
                        path.as_ref()
                    )
                );
                js.publish_with_headers(
                    subject,
                    headers,
                    serde_json::to_vec(&forged).expect("meta JSON").into(),
                )
                .await
                .expect("publish meta")
                .await
                .expect("meta stored");
            }
        }
    }
}

/// The layer's contract, the same on every backend.
async fn layer_suite(media: &MediaStore, tamper: Tamper<'_>) {
    let tenant = TenantId::new("acme".to_owned()).expect("tenant");
    let job = JobId::new();
    let key = media.input_key(&tenant, &job, "photo.jpg");

    // Content type from the bytes (a PNG named .jpg), SHA-256 recorded.
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.extend((0..200_000u32).map(|i| (i % 251) as u8));
    let stored = media
        .put(&key, &mut png.as_slice(), 0, None)
        .await
        .expect("put");
    assert_eq!(stored.content_type, "image/png");
    assert_eq!(stored.size, png.len() as u64);
    assert_eq!(stored.sha256, hex::encode(Sha256::digest(&png)));
    assert_eq!(stored.name, "photo.jpg");
    assert_eq!(media.head(&key).await.expect("head"), stored);
    assert_eq!(read_all(media, &key).await.expect("get"), png);
    let (_, mut part) = media.get_range(&key, 1000..1100).await.expect("range");
    let mut bytes = Vec::new();
    part.read_to_end(&mut bytes).await.expect("read range");
    assert_eq!(bytes, &png[1000..1100]);

    // Missing object.
    let missing = media.output_key(&tenant, &job, "nope.png");
    assert!(matches!(
        media.get(&missing).await,
        Err(MediaError::NotFound(_))
    ));

    // Traversal names are refused before anything is written.
    for name in ["..", "../../etc/passwd", ".hidden", "a\\b", ""] {
        let bad = media.input_key(&tenant, &job, name);
        let err = media
            .put(&bad, &mut &b"x"[..], 0, None)
            .await
            .expect_err(name);
        assert!(matches!(err, MediaError::InvalidName(_)), "{name:?}: {err}");
    }

    // Over the object limit, over the job limit, a broken source: each a
    // clear error and nothing left (only the first object and its record).
    let big = vec![0u8; LIMITS.max_object_bytes as usize + 1];
    let over = media.output_key(&tenant, &job, "big.bin");
    let err = media
        .put(&over, &mut big.as_slice(), 0, None)
        .await
        .expect_err("too large");
    assert!(matches!(err, MediaError::ObjectTooLarge { .. }), "{err}");
    let err = media
        .put(&over, &mut &big[..800_000], stored.size + 1_000_000, None)
        .await
        .expect_err("job too large");
    assert!(matches!(err, MediaError::JobTooLarge { .. }), "{err}");
    let err = media
        .put(&over, &mut &big[..1000], 0, Some(999))
        .await
        .expect_err("caller cap");
    assert!(
        matches!(err, MediaError::ObjectTooLarge { limit: 999, .. }),
        "{err}"
    );
    let err = media
        .put(&over, &mut Broken { left: 300_000 }, 0, None)
        .await
        .expect_err("broken");
    assert!(matches!(err, MediaError::Source(_)), "{err}");
    assert!(matches!(
        media.head(&over).await,
        Err(MediaError::NotFound(_))
    ));
    // The object, and its record where the backend keeps no description.
    let per_object = if media.describes_itself() { 1 } else { 2 };
    assert_eq!(stored_under(media, &tenant, &job).await.len(), per_object);

    // Corrupt bytes (same size, other content) fail the read at the end;
    // truncated bytes fail it; bytes without a record are corrupt.
    let raw = media.object_store();
    let data = Path::from_iter([tenant.as_str(), &job.to_string(), "inputs", "photo.jpg"]);
    let mut flipped = png.clone();
    flipped[5000] ^= 0xff;
    tamper.replace(media, &data, flipped).await;
    let err = read_all(media, &key).await.expect_err("corrupt read");
    assert!(
        err.to_string().contains("SHA-256") || err.to_string().contains("digest"),
        "{err}"
    );
    tamper.replace(media, &data, png[..1000].to_vec()).await;
    let err = read_all(media, &key).await.expect_err("truncated read");
    assert!(
        err.to_string().contains("corrupt") || err.to_string().contains("recorded size"),
        "{err}"
    );
    let mut objects = 1;
    if !media.describes_itself() {
        let orphan = Path::from_iter([tenant.as_str(), &job.to_string(), "outputs", "orphan.png"]);
        raw.put(&orphan, vec![1u8; 10].into())
            .await
            .expect("orphan");
        let orphan_key = media.output_key(&tenant, &job, "orphan.png");
        assert!(matches!(
            media.head(&orphan_key).await,
            Err(MediaError::Corrupt { .. })
        ));
        objects = 3;
    }

    // Deleting the job leaves nothing.
    let removed = media.delete_job(&tenant, &job).await.expect("delete job");
    assert_eq!(removed, objects);
    assert!(stored_under(media, &tenant, &job).await.is_empty());
    assert!(matches!(
        media.head(&key).await,
        Err(MediaError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_on_nats() {
    let (server, media) = nats_media().await;
    let js = jetstream::new(server.client().await);
    layer_suite(&media, Tamper::Nats(&js, "layer")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_on_memory() {
    layer_suite(&memory_media(), Tamper::Raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_on_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let media = file_media(dir.path()).await;
    layer_suite(&media, Tamper::Raw).await;
    // No temporary files of failed writes either.
    let left: Vec<_> = walk(dir.path());
    assert!(left.is_empty(), "{left:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_on_s3() {
    let Some(moto) = MotoServer::start().await else {
        eprintln!("SKIPPED layer_on_s3: moto_server not installed (bash deploy/dev.sh setup)");
        return;
    };
    moto.create_bucket("media").await;
    let media = s3_media(&moto, Some(Duration::from_secs(60)));
    layer_suite(&media, Tamper::Raw).await;

    // A presigned output URL serves the bytes without credentials, for a while.
    let tenant = TenantId::new("acme".to_owned()).expect("tenant");
    let job = JobId::new();
    let key = media.output_key(&tenant, &job, "out.txt");
    media
        .put(&key, &mut &b"presigned bytes"[..], 0, None)
        .await
        .expect("put");
    let url = media
        .presigned_url(&key)
        .await
        .expect("sign")
        .expect("a URL");
    assert!(
        url.query().unwrap_or_default().contains("X-Amz-Expires=60"),
        "{url}"
    );
    let body = reqwest::get(url.as_str())
        .await
        .expect("GET presigned")
        .bytes()
        .await
        .expect("body");
    assert_eq!(&body[..], b"presigned bytes");
    // Without `presign_ttl` there is no URL: ingress streams.
    assert!(
        s3_media(&moto, None)
            .presigned_url(&key)
            .await
            .expect("no sign")
            .is_none()
    );
}

/// The raw store also passes the conformance basics on S3 (moto), so the
/// layer's assumptions hold there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_basics_on_s3() {
    let Some(moto) = MotoServer::start().await else {
        eprintln!("SKIPPED conformance_basics_on_s3: moto_server not installed");
        return;
    };
    moto.create_bucket("media").await;
    let media = s3_media(&moto, None);
    let store: &DynObjectStore = media.object_store().as_ref();
    integration::list_uses_directories_correctly(store).await;
    integration::list_with_delimiter(store).await;
}
