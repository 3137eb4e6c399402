//! Job media (inputs and outputs): one layer over any `object_store`
//! backend, chosen by URL (`MediaConfig::url`): the JetStream object store
//! ([`JetStreamObjectStore`], the default), S3, a local directory or memory.
//!
//! Everything streams: puts go through `object_store`'s `BufWriter` (one put
//! below [`PART_BYTES`], else a multipart upload holding at most
//! [`PART_CONCURRENCY`] parts) and gets are streams, so no object is ever
//! whole in memory.
//!
//! Layout: `<tenant>/<job>/inputs/<name>` and `<tenant>/<job>/outputs/<name>`.
//! Each object is described by its size, SHA-256, content type and original
//! name. The JetStream backend keeps all of it on the object itself (its
//! meta message, written after the chunks, carries the digest), so one meta
//! read describes an object. Other backends get a small JSON record per
//! object at `<tenant>/<job>/meta/<kind>/<name>`, written after the bytes
//! (the SHA-256 is known only then); there the record makes the object
//! visible: bytes without a record are an incomplete write. Reads check the
//! size, and a whole read the SHA-256, on the way out.

use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::signer::Signer;
use object_store::{Attribute, Attributes, GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::config::MediaConfig;
use crate::ids::{JobId, RunnerId, TenantId};
use crate::jetstream_store::JetStreamObjectStore;
use crate::names::Names;

/// Bytes per multipart part (S3's minimum part size) and parts in flight.
pub const PART_BYTES: usize = 5 * 1024 * 1024;
pub const PART_CONCURRENCY: usize = 2;
/// Bytes read from the source at a time.
const READ_BYTES: usize = 64 * 1024;
/// Bytes sniffed for magic numbers.
const SNIFF_BYTES: usize = 8 * 1024;
const META_DIR: &str = "meta";

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("object {0} not found")]
    NotFound(String),
    /// A name that is empty, `.`/`..`, has a slash, backslash or control
    /// character, or starts with a dot: it could escape its folder.
    #[error(
        "invalid object name {0:?}: names are one path segment, without `/`, `\\`, control characters or a leading dot"
    )]
    InvalidName(String),
    #[error("object {key} exceeds the {limit}-byte limit per object")]
    ObjectTooLarge { key: String, limit: u64 },
    #[error("object {key} would take the job over its {limit}-byte media limit")]
    JobTooLarge { key: String, limit: u64 },
    /// Stored bytes that do not match their record (size or SHA-256), or
    /// bytes without a record.
    #[error("object {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// The source being stored failed (a client's upload broke off).
    #[error("reading the data to store failed: {0}")]
    Source(#[source] std::io::Error),
    #[error("media store: {0}")]
    Store(#[from] object_store::Error),
    #[error("media configuration: {0}")]
    Config(String),
}

impl MediaError {
    /// The caller's fault (4xx), not the store's.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Self::InvalidName(_) | Self::ObjectTooLarge { .. } | Self::JobTooLarge { .. }
        )
    }
}

/// What the store knows about a stored object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredObject {
    pub key: String,
    pub size: u64,
    /// Lower-case hex SHA-256 of the bytes.
    pub sha256: String,
    /// From the bytes' magic numbers (then the name's extension).
    pub content_type: String,
    /// The name the object was stored under (the key's last segment).
    #[serde(default)]
    pub name: String,
}

/// A backend, parsed from `media.url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MediaUrl {
    /// `None`: the prefix's `<prefix>_media` bucket.
    Nats {
        bucket: Option<String>,
    },
    S3 {
        bucket: String,
        prefix: String,
    },
    File {
        path: std::path::PathBuf,
    },
    Memory,
}

impl MediaUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
        let host = url.host_str().unwrap_or_default().to_owned();
        let path = url.path().trim_matches('/').to_owned();
        match url.scheme() {
            "nats" if path.is_empty() => Ok(Self::Nats {
                bucket: (!host.is_empty()).then_some(host),
            }),
            "nats" => Err("nats://<bucket> takes no path".to_owned()),
            "s3" if !host.is_empty() => Ok(Self::S3 {
                bucket: host,
                prefix: path,
            }),
            "s3" => Err("s3://<bucket>/<prefix> needs a bucket".to_owned()),
            "file" if !path.is_empty() => Ok(Self::File {
                path: std::path::PathBuf::from(url.path()),
            }),
            "file" => Err("file:///<path> needs an absolute path".to_owned()),
            "memory" => Ok(Self::Memory),
            other => Err(format!(
                "unknown scheme {other:?} (nats, s3, file or memory)"
            )),
        }
    }
}

/// Per-object and per-job size limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MediaLimits {
    pub max_object_bytes: u64,
    pub max_job_bytes: u64,
}

impl From<&MediaConfig> for MediaLimits {
    fn from(config: &MediaConfig) -> Self {
        Self {
            max_object_bytes: config.max_object_bytes,
            max_job_bytes: config.max_job_bytes,
        }
    }
}

#[derive(Clone)]
pub struct MediaStore {
    store: Arc<dyn ObjectStore>,
    names: Names,
    limits: MediaLimits,
    /// Whether the backend keeps attributes (content type on the object).
    attributes: bool,
    /// Set when the backend is the JetStream store, which records each
    /// object's SHA-256 with it: then no separate record is written.
    jetstream: Option<JetStreamObjectStore>,
    presign: Option<Presign>,
    description: String,
}

#[derive(Clone)]
struct Presign {
    s3: Arc<AmazonS3>,
    prefix: Path,
    ttl: Duration,
}

/// A stored object's bytes, checked as they are read.
pub type MediaReader = Pin<Box<dyn AsyncRead + Send>>;

impl MediaStore {
    /// Opens the backend `config.url` names. For `nats://` the bucket is
    /// created if missing (with `max_age`), as provisioning does for the
    /// default one, unless `provisioning` is check-only.
    pub async fn open(
        config: &MediaConfig,
        js: &async_nats::jetstream::Context,
        names: Names,
        (max_age, replicas): (Duration, usize),
        provisioning: crate::config::Provisioning,
    ) -> Result<Self, MediaError> {
        let limits = MediaLimits::from(config);
        match MediaUrl::parse(&config.url).map_err(MediaError::Config)? {
            MediaUrl::Nats { bucket } => {
                let bucket = bucket.unwrap_or_else(|| names.media_bucket());
                crate::provision::ensure_object_store(js, provisioning, &bucket, max_age, replicas)
                    .await
                    .map_err(|e| MediaError::Config(e.to_string()))?;
                let store = JetStreamObjectStore::open(js.clone(), &bucket).await?;
                Ok(Self::jetstream(store, names, limits, &config.url))
            }
            MediaUrl::S3 { bucket, prefix } => {
                ensure_tls_provider();
                let s3 = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()?;
                Ok(Self::s3(s3, &prefix, names, limits, config.presign_ttl))
            }
            MediaUrl::File { path } => {
                std::fs::create_dir_all(&path)
                    .map_err(|e| MediaError::Config(format!("{}: {e}", path.display())))?;
                let local = object_store::local::LocalFileSystem::new_with_prefix(&path)?;
                let mut media = Self::new(Arc::new(local), names, limits, &config.url);
                media.attributes = false;
                Ok(media)
            }
            MediaUrl::Memory => Ok(Self::new(
                Arc::new(object_store::memory::InMemory::new()),
                names,
                limits,
                &config.url,
            )),
        }
    }

    /// The JetStream object store, which describes each object itself.
    pub fn jetstream(
        store: JetStreamObjectStore,
        names: Names,
        limits: MediaLimits,
        description: &str,
    ) -> Self {
        let mut media = Self::new(Arc::new(store.clone()), names, limits, description);
        media.jetstream = Some(store);
        media
    }

    /// Any `ObjectStore` that keeps attributes (tests, benchmarks).
    pub fn new(
        store: Arc<dyn ObjectStore>,
        names: Names,
        limits: MediaLimits,
        description: &str,
    ) -> Self {
        Self {
            store,
            names,
            limits,
            attributes: true,
            jetstream: None,
            presign: None,
            description: description.to_owned(),
        }
    }

    /// An S3 bucket under `prefix`; with `presign_ttl`, outputs can be
    /// handed out as presigned URLs.
    pub fn s3(
        s3: AmazonS3,
        prefix: &str,
        names: Names,
        limits: MediaLimits,
        presign_ttl: Option<Duration>,
    ) -> Self {
        let s3 = Arc::new(s3);
        let prefix = Path::from(prefix);
        let store: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
            s3.clone()
        } else {
            Arc::new(PrefixStore::new(s3.clone(), prefix.clone()))
        };
        let mut media = Self::new(store, names, limits, &format!("s3 {prefix}"));
        media.presign = presign_ttl.map(|ttl| Presign { s3, prefix, ttl });
        media
    }

    pub fn limits(&self) -> MediaLimits {
        self.limits
    }

    pub fn input_key(&self, tenant: &TenantId, job: &JobId, name: &str) -> String {
        self.names.input_object(tenant, job, name)
    }

    pub fn output_key(&self, tenant: &TenantId, job: &JobId, name: &str) -> String {
        self.names.output_object(tenant, job, name)
    }

    /// What the ComfyUI API keeps of a job it submitted ([`COMFY_PROMPT_OBJECT`],
    /// [`COMFY_HISTORY_OBJECT`]).
    pub fn comfy_key(&self, tenant: &TenantId, job: &JobId, name: &str) -> String {
        self.names.comfy_object(tenant, job, name)
    }

    /// A runner's [`COMFY_OBJECT_INFO_OBJECT`] (outside every tenant's folders:
    /// tenant ids never hold the runner folder's name).
    pub fn runner_key(&self, runner: &RunnerId, name: &str) -> String {
        self.names.runner_object(runner, name)
    }

    /// A file a tenant uploaded through the ComfyUI API (`/upload/image`).
    pub fn upload_key(&self, tenant: &TenantId, name: &str) -> String {
        self.names.upload_object(tenant, name)
    }

    /// Streams `reader` into `key`. `job_bytes` is what the job already
    /// stores (other objects): the object may use what the job limit leaves.
    /// `max_bytes` is the caller's own, lower cap for this object, if any.
    /// On any failure (including a limit) nothing of this write stays stored.
    pub async fn put(
        &self,
        key: &str,
        reader: &mut (impl AsyncRead + Unpin + Send),
        job_bytes: u64,
        max_bytes: Option<u64>,
    ) -> Result<StoredObject, MediaError> {
        let (path, meta_path, name) = split_key(key)?;
        let job_left = self.limits.max_job_bytes.saturating_sub(job_bytes);
        let object_limit = max_bytes.map_or(self.limits.max_object_bytes, |m| {
            m.min(self.limits.max_object_bytes)
        });
        let limit = object_limit.min(job_left);
        let too_large = || {
            if job_left < object_limit {
                MediaError::JobTooLarge {
                    key: key.to_owned(),
                    limit: self.limits.max_job_bytes,
                }
            } else {
                MediaError::ObjectTooLarge {
                    key: key.to_owned(),
                    limit: object_limit,
                }
            }
        };

        let mut head = Vec::with_capacity(SNIFF_BYTES);
        (&mut *reader)
            .take(SNIFF_BYTES as u64)
            .read_to_end(&mut head)
            .await
            .map_err(MediaError::Source)?;
        let content_type = sniff_content_type(&head, &name);
        let mut writer = BufWriter::with_capacity(self.store.clone(), path.clone(), PART_BYTES)
            .with_max_concurrency(PART_CONCURRENCY);
        if self.attributes {
            writer = writer.with_attributes(Attributes::from_iter([
                (Attribute::ContentType, content_type.clone()),
                (Attribute::Metadata("original-name".into()), name.clone()),
            ]));
        }

        let mut sha = Sha256::new();
        let mut size = 0u64;
        let written: Result<(), MediaError> = async {
            let mut buffer = vec![0u8; READ_BYTES];
            let mut pending = head;
            loop {
                if !pending.is_empty() {
                    size += pending.len() as u64;
                    if size > limit {
                        return Err(too_large());
                    }
                    sha.update(&pending);
                    writer.write_all(&pending).await.map_err(io_store)?;
                }
                let n = reader.read(&mut buffer).await.map_err(MediaError::Source)?;
                if n == 0 {
                    break;
                }
                pending = buffer[..n].to_vec();
            }
            Ok(())
        }
        .await;
        if let Err(error) = written {
            if let Err(abort) = writer.abort().await {
                tracing::warn!(%abort, key, "aborting a failed write");
            }
            return Err(error);
        }
        // Not aborted when it fails: `BufWriter::abort` panics once shutdown
        // has begun, and a multipart upload that never completed leaves no
        // visible object (the store's own cleanup removes its parts).
        writer.shutdown().await.map_err(io_store)?;
        let stored = StoredObject {
            key: key.to_owned(),
            size,
            sha256: hex::encode(sha.finalize()),
            content_type,
            name,
        };
        if self.jetstream.is_some() {
            return Ok(stored);
        }
        let record = serde_json::to_vec(&stored).map_err(|e| MediaError::Corrupt {
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
        if let Err(error) = self.store.put(&meta_path, record.into()).await {
            let _ = self.store.delete(&path).await;
            return Err(error.into());
        }
        Ok(stored)
    }

    pub async fn head(&self, key: &str) -> Result<StoredObject, MediaError> {
        let (path, meta_path, name) = split_key(key)?;
        if let Some(store) = &self.jetstream {
            let options = GetOptions::default().with_head(true);
            let (result, digest) = match store.get_described(&path, options).await {
                Ok(described) => described,
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(MediaError::NotFound(key.to_owned()));
                }
                Err(e) => return Err(e.into()),
            };
            return described(key, name, &result, digest);
        }
        match self.store.get(&meta_path).await {
            Ok(result) => {
                let bytes = result.bytes().await?;
                serde_json::from_slice(&bytes).map_err(|e| MediaError::Corrupt {
                    key: key.to_owned(),
                    reason: format!("unreadable record: {e}"),
                })
            }
            Err(object_store::Error::NotFound { .. }) => match self.store.head(&path).await {
                Ok(_) => Err(MediaError::Corrupt {
                    key: key.to_owned(),
                    reason: "bytes without a record (an incomplete write)".to_owned(),
                }),
                Err(object_store::Error::NotFound { .. }) => {
                    Err(MediaError::NotFound(key.to_owned()))
                }
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Opens the whole object; reading it fails at the end if its size or
    /// SHA-256 differ from its record.
    pub async fn get(&self, key: &str) -> Result<(StoredObject, MediaReader), MediaError> {
        if let Some(store) = &self.jetstream {
            return get_described(store, key, None).await;
        }
        let info = self.head(key).await?;
        let size = info.size;
        let reader = self.open_range(key, &info, 0..size).await?;
        Ok((info, reader))
    }

    /// Opens `range` (end exclusive, within the object); reading it fails if
    /// fewer bytes arrive.
    pub async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
    ) -> Result<(StoredObject, MediaReader), MediaError> {
        if let Some(store) = &self.jetstream {
            return get_described(store, key, Some(range)).await;
        }
        let info = self.head(key).await?;
        let reader = self.open_range(key, &info, range).await?;
        Ok((info, reader))
    }

    async fn open_range(
        &self,
        key: &str,
        info: &StoredObject,
        range: Range<u64>,
    ) -> Result<MediaReader, MediaError> {
        let (path, _, _) = split_key(key)?;
        let whole = range.start == 0 && range.end == info.size;
        let options = if whole || range.is_empty() {
            GetOptions::default()
        } else {
            GetOptions::default().with_range(Some(GetRange::Bounded(range.clone())))
        };
        let result = match self.store.get_opts(&path, options).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(MediaError::Corrupt {
                    key: key.to_owned(),
                    reason: "a record without bytes".to_owned(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        if whole && result.meta.size != info.size {
            return Err(MediaError::Corrupt {
                key: key.to_owned(),
                reason: format!("{} bytes stored, {} recorded", result.meta.size, info.size),
            });
        }
        let checked = Checked {
            inner: result.into_stream().boxed(),
            key: key.to_owned(),
            expected: range.end - range.start,
            seen: 0,
            sha: whole.then(Sha256::new),
            sha256: info.sha256.clone(),
        };
        Ok(Box::pin(tokio_util::io::StreamReader::new(checked)))
    }

    /// Deletes the object and its record; a missing one is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), MediaError> {
        let (path, meta_path, _) = split_key(key)?;
        // The record first: without it the bytes are invisible.
        let paths = if self.jetstream.is_some() {
            vec![path]
        } else {
            vec![meta_path, path]
        };
        for path in paths {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Deletes everything a job stored; returns how many objects.
    pub async fn delete_job(&self, tenant: &TenantId, job: &JobId) -> Result<usize, MediaError> {
        let prefix = Path::from_iter([tenant.as_str(), job.to_string().as_str()]);
        let locations = self
            .store
            .list(Some(&prefix))
            .map_ok(|meta| meta.location)
            .boxed();
        let deleted: Vec<Path> = self
            .store
            .delete_stream(locations)
            .try_filter_map(|p| futures::future::ready(Ok(Some(p))))
            .or_else(|e| async move {
                match e {
                    object_store::Error::NotFound { path, .. } => Ok(Path::from(path)),
                    other => Err(other),
                }
            })
            .try_collect()
            .await?;
        Ok(deleted.len())
    }

    /// A presigned, time-limited GET URL, when the backend is S3 and
    /// `presign_ttl` is set.
    pub async fn presigned_url(&self, key: &str) -> Result<Option<url::Url>, MediaError> {
        let Some(presign) = &self.presign else {
            return Ok(None);
        };
        let (path, _, _) = split_key(key)?;
        let full = if presign.prefix.as_ref().is_empty() {
            path
        } else {
            presign.prefix.parts().chain(path.parts()).collect()
        };
        let url = presign
            .s3
            .signed_url(http::Method::GET, &full, presign.ttl)
            .await?;
        Ok(Some(url))
    }

    /// Whether objects carry their own description (no record objects).
    pub fn describes_itself(&self) -> bool {
        self.jetstream.is_some()
    }

    /// The backend, for raw access (benchmarks, conformance tests).
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }
}

impl std::fmt::Debug for MediaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaStore")
            .field("backend", &self.description)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A read of an object of the JetStream store, which describes itself:
/// one meta read finds its description and its chunks.
async fn get_described(
    store: &JetStreamObjectStore,
    key: &str,
    range: Option<Range<u64>>,
) -> Result<(StoredObject, MediaReader), MediaError> {
    let (path, _, name) = split_key(key)?;
    let options = match &range {
        Some(range) if !range.is_empty() => {
            GetOptions::default().with_range(Some(GetRange::Bounded(range.clone())))
        }
        _ => GetOptions::default(),
    };
    let (result, digest) = match store.get_described(&path, options).await {
        Ok(described) => described,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(MediaError::NotFound(key.to_owned()));
        }
        Err(e) => return Err(e.into()),
    };
    let info = described(key, name, &result, digest)?;
    let range = range.unwrap_or(0..info.size);
    let whole = range.start == 0 && range.end == info.size;
    let checked = Checked {
        inner: result.into_stream().boxed(),
        key: key.to_owned(),
        expected: range.end.saturating_sub(range.start),
        seen: 0,
        sha: whole.then(Sha256::new),
        sha256: info.sha256.clone(),
    };
    Ok((info, Box::pin(tokio_util::io::StreamReader::new(checked))))
}

/// What a self-describing object's meta says of it.
fn described(
    key: &str,
    name: String,
    result: &object_store::GetResult,
    digest: Option<[u8; 32]>,
) -> Result<StoredObject, MediaError> {
    let attribute = |attribute: &Attribute| result.attributes.get(attribute).map(|v| v.to_string());
    let sha256 = digest.map(hex::encode).ok_or_else(|| MediaError::Corrupt {
        key: key.to_owned(),
        reason: "stored without its SHA-256".to_owned(),
    })?;
    Ok(StoredObject {
        key: key.to_owned(),
        size: result.meta.size,
        sha256,
        content_type: attribute(&Attribute::ContentType)
            .unwrap_or_else(|| "application/octet-stream".to_owned()),
        name: attribute(&Attribute::Metadata("original-name".into())).unwrap_or(name),
    })
}

/// `<tenant>/<job>/<inputs|outputs>/<name>` → the object's path, its
/// record's path and the name. Every segment must be one plain segment.
fn split_key(key: &str) -> Result<(Path, Path, String), MediaError> {
    let invalid = || MediaError::InvalidName(key.to_owned());
    let parts: Vec<&str> = key.split('/').collect();
    let [tenant, job, kind, name] = parts.as_slice() else {
        return Err(invalid());
    };
    if !matches!(*kind, "inputs" | "outputs" | "comfy") {
        return Err(invalid());
    }
    for segment in [tenant, job, name] {
        check_segment(segment).map_err(|_| MediaError::InvalidName((*segment).to_owned()))?;
    }
    let path = Path::from_iter([*tenant, *job, *kind, *name]);
    let meta = Path::from_iter([*tenant, *job, META_DIR, *kind, *name]);
    Ok((path, meta, (*name).to_owned()))
}

/// The ComfyUI API's copy of a prompt as its client sent it
/// (`[number, prompt_id, prompt, extra_data, outputs_to_execute]`).
pub const COMFY_PROMPT_OBJECT: &str = "prompt.json";
/// ComfyUI's own history entry of the job's last attempt (written by the runner).
pub const COMFY_HISTORY_OBJECT: &str = "history.json";
/// A runner's ComfyUI's `GET /object_info`, written by the runner at start.
pub const COMFY_OBJECT_INFO_OBJECT: &str = "object_info.json";

/// One safe path segment: not empty, no leading dot (so not `.` or `..`),
/// no `/`, `\`, NUL or other control character, at most 255 bytes.
pub fn check_segment(segment: &str) -> Result<(), MediaError> {
    let bad = segment.is_empty()
        || segment.len() > 255
        || segment.starts_with('.')
        || segment
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control());
    if bad {
        Err(MediaError::InvalidName(segment.to_owned()))
    } else {
        Ok(())
    }
}

/// object_store's HTTP client uses rustls without a bundled provider (so
/// aws-lc-rs, a C build, stays out of the tree); this installs ring, which
/// the rest of the workspace already uses. Call before building an S3 client.
pub fn ensure_tls_provider() {
    // Already installed (by this or anything else) is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn io_store(error: std::io::Error) -> MediaError {
    MediaError::Store(object_store::Error::Generic {
        store: "media",
        source: Box::new(error),
    })
}

/// Counts (and for a whole object hashes) the bytes as they pass, and ends
/// with an error if they do not match the record.
struct Checked {
    inner: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    key: String,
    expected: u64,
    seen: u64,
    sha: Option<Sha256>,
    sha256: String,
}

impl Stream for Checked {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                this.seen += bytes.len() as u64;
                if this.seen > this.expected {
                    return Poll::Ready(Some(Err(corrupt(&this.key, "more bytes than recorded"))));
                }
                if let Some(sha) = &mut this.sha {
                    sha.update(&bytes);
                }
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(std::io::Error::other(e)))),
            Poll::Ready(None) => {
                if this.seen != this.expected {
                    let why = format!("truncated: {} of {} bytes", this.seen, this.expected);
                    this.expected = this.seen; // Report once.
                    return Poll::Ready(Some(Err(corrupt(&this.key, &why))));
                }
                if let Some(sha) = this.sha.take()
                    && hex::encode(sha.finalize()) != this.sha256
                {
                    return Poll::Ready(Some(Err(corrupt(&this.key, "SHA-256 mismatch"))));
                }
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn corrupt(key: &str, why: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("object {key} is corrupt: {why}"),
    )
}

/// Content type judged from the bytes themselves (magic numbers), falling
/// back to the file name's extension, then to `application/octet-stream`.
pub fn sniff_content_type(head: &[u8], file_name: &str) -> String {
    if let Some(kind) = infer::get(head) {
        return kind.mime_type().to_owned();
    }
    let extension = file_name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase());
    match extension.as_deref() {
        Some("txt") => "text/plain; charset=utf-8",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_beats_extension() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert_eq!(sniff_content_type(png, "x.jpg"), "image/png");
        assert_eq!(
            sniff_content_type(b"hello", "x.txt"),
            "text/plain; charset=utf-8"
        );
        assert_eq!(
            sniff_content_type(b"\0\x01", "x"),
            "application/octet-stream"
        );
    }

    #[test]
    fn keys_reject_traversal() {
        for bad in [
            "t/j/inputs/..",
            "t/j/inputs/.",
            "t/j/inputs/../x",
            "t/j/inputs/a\\b",
            "t/j/inputs/",
            "t/j/secrets/x",
            "t/../inputs/x",
            "t/j/inputs/.hidden",
            "t/j/inputs/a\nb",
        ] {
            assert!(
                matches!(split_key(bad), Err(MediaError::InvalidName(_))),
                "{bad:?}"
            );
        }
        let (path, meta, name) = split_key("t/j/outputs/a b.png").expect("valid");
        assert_eq!(path.as_ref(), "t/j/outputs/a b.png");
        assert_eq!(meta.as_ref(), "t/j/meta/outputs/a b.png");
        assert_eq!(name, "a b.png");
    }

    #[test]
    fn urls_parse() {
        assert_eq!(
            MediaUrl::parse("nats://"),
            Ok(MediaUrl::Nats { bucket: None })
        );
        assert_eq!(
            MediaUrl::parse("nats://media"),
            Ok(MediaUrl::Nats {
                bucket: Some("media".to_owned())
            })
        );
        assert_eq!(
            MediaUrl::parse("s3://b/some/prefix"),
            Ok(MediaUrl::S3 {
                bucket: "b".to_owned(),
                prefix: "some/prefix".to_owned()
            })
        );
        assert_eq!(
            MediaUrl::parse("file:///var/media"),
            Ok(MediaUrl::File {
                path: "/var/media".into()
            })
        );
        assert_eq!(MediaUrl::parse("memory://"), Ok(MediaUrl::Memory));
        assert!(MediaUrl::parse("ftp://x").is_err());
        assert!(MediaUrl::parse("s3:///x").is_err());
    }
}
