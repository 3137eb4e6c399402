//! [`object_store::ObjectStore`] on a JetStream object store bucket.
//!
//! Info, list and delete go through async-nats' object store. Reads of small
//! objects (at most [`DIRECT_READ_CHUNKS`] chunks) take each chunk by a direct
//! get, with no consumer; larger reads consume the chunks with an ordered pull
//! consumer of their own, so a slow reader holds at most a few chunks in
//! memory (async-nats' reader is an ordered push consumer that buffers tens
//! of MiB ahead of a slow reader). Writes
//! publish the chunks and the meta message themselves, in the same wire format
//! (`$O.<bucket>.C.<nuid>` chunks, then the JSON `ObjectInfo` on
//! `$O.<bucket>.M.<base64url(name)>` with `Nats-Rollup: sub`), because
//! async-nats' `put` cannot give what the trait asks for:
//! - **conditional puts**: the meta message is published with
//!   `Nats-Expected-Last-Subject-Sequence`, so `PutMode::Create` and
//!   `PutMode::Update` are atomic on the server (the ETag is the object's
//!   nuid, unique per write);
//! - **nothing partial**: a write that fails, is aborted or is dropped purges
//!   its chunks (async-nats leaves them in the stream until `max_age`);
//! - **throughput**: up to [`ACK_WINDOW`] chunk publishes are in flight at once
//!   instead of one round trip per chunk.
//!
//! Not supported, by the nature of the store: versions (a rollup keeps only
//! the latest meta), tags, [`MultipartStore`](object_store::multipart::MultipartStore)
//! (parts have no ids: a [`MultipartUpload`] here writes its parts in call order)
//! and paginated listing. Listing reads every meta message of the bucket and
//! filters by prefix on the client: subjects carry base64 names, so the server
//! cannot filter by prefix.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::object_store::{
    InfoErrorKind, ObjectInfo, ObjectOptions, ObjectStore as NatsObjectStore,
};
use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::jetstream::{self, stream::Stream as JsStream};
use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    Attribute, AttributeValue, Attributes, CopyMode, CopyOptions, Error, GetOptions, GetResult,
    GetResultPayload, ListResult, MultipartUpload, ObjectMeta, PutMode, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, Result, UploadPart,
};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

const STORE: &str = "JetStream";
/// Chunk size, as async-nats' default (the payload must stay under the
/// server's `max_payload`, 1 MiB by default).
pub const CHUNK_SIZE: usize = 128 * 1024;
/// Chunk publishes awaiting their ack at once.
pub const ACK_WINDOW: usize = 32;

/// A JetStream object store bucket as an `object_store::ObjectStore`.
#[derive(Clone)]
pub struct JetStreamObjectStore {
    inner: Arc<Inner>,
}

struct Inner {
    js: jetstream::Context,
    bucket: String,
    store: NatsObjectStore,
    stream: JsStream,
}

impl JetStreamObjectStore {
    /// Opens an existing bucket (provisioning creates it).
    pub async fn open(js: jetstream::Context, bucket: &str) -> Result<Self> {
        let store = js.get_object_store(bucket).await.map_err(generic)?;
        let stream = js
            .get_stream(format!("OBJ_{bucket}"))
            .await
            .map_err(generic)?;
        Ok(Self {
            inner: Arc::new(Inner {
                js,
                bucket: bucket.to_owned(),
                store,
                stream,
            }),
        })
    }

    /// The async-nats handle of the same bucket (the benchmark's baseline).
    pub fn nats(&self) -> &NatsObjectStore {
        &self.inner.store
    }

    fn meta_subject(&self, location: &Path) -> String {
        format!(
            "$O.{}.M.{}",
            self.inner.bucket,
            URL_SAFE.encode(location.as_ref())
        )
    }

    fn chunk_subject(&self, nuid: &str) -> String {
        format!("$O.{}.C.{nuid}", self.inner.bucket)
    }

    /// The latest meta message of `location`: its stream sequence and info
    /// (deleted or not); `None` if the name was never written (or expired).
    async fn last_meta(&self, location: &Path) -> Result<Option<(u64, ObjectInfo)>> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        match self
            .inner
            .stream
            .get_last_raw_message_by_subject(&self.meta_subject(location))
            .await
        {
            Ok(message) => {
                let info: ObjectInfo = serde_json::from_slice(&message.payload).map_err(generic)?;
                Ok(Some((message.sequence, info)))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(generic(e)),
        }
    }

    async fn purge_chunks(&self, nuid: &str) {
        if let Err(error) = self
            .inner
            .stream
            .purge()
            .filter(self.chunk_subject(nuid))
            .await
        {
            tracing::warn!(%error, nuid, "object chunks not purged");
        }
    }

    /// Publishes `data` as the chunks of a new object version `nuid`, then
    /// commits it under `mode`. On any failure the chunks are purged.
    async fn write(
        &self,
        location: &Path,
        nuid: String,
        data: impl futures::Stream<Item = Result<Bytes>> + Send,
        attributes: &Attributes,
        mode: PutMode,
    ) -> Result<PutResult> {
        let written = self.write_chunks(&nuid, data).await;
        let result = match written {
            Ok((size, chunks, digest)) => {
                let info = ObjectInfo {
                    name: location.to_string(),
                    description: None,
                    metadata: attributes_to_metadata(attributes),
                    headers: None,
                    options: Some(ObjectOptions {
                        link: None,
                        max_chunk_size: Some(CHUNK_SIZE),
                    }),
                    bucket: self.inner.bucket.clone(),
                    nuid: nuid.clone(),
                    size,
                    chunks,
                    modified: Some(time::OffsetDateTime::now_utc()),
                    digest: Some(format!("SHA-256={}", URL_SAFE.encode(digest))),
                    deleted: false,
                };
                self.commit(location, &info, mode).await
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.purge_chunks(&nuid).await;
        }
        result
    }

    async fn write_chunks(
        &self,
        nuid: &str,
        data: impl futures::Stream<Item = Result<Bytes>> + Send,
    ) -> Result<(usize, usize, [u8; 32])> {
        let mut acks = VecDeque::with_capacity(ACK_WINDOW);
        let written = self.publish_chunks(nuid, data, &mut acks).await;
        if written.is_err() {
            // Let the chunks in flight land before the caller purges, or a
            // late one would outlive the purge.
            for ack in acks {
                let _ = ack.await;
            }
        }
        written
    }

    async fn publish_chunks(
        &self,
        nuid: &str,
        data: impl futures::Stream<Item = Result<Bytes>> + Send,
        acks: &mut VecDeque<jetstream::context::PublishAckFuture>,
    ) -> Result<(usize, usize, [u8; 32])> {
        let subject = self.chunk_subject(nuid);
        let mut data = std::pin::pin!(data);
        let mut buffer = BytesMut::with_capacity(CHUNK_SIZE);
        let mut sha = Sha256::new();
        let (mut size, mut chunks) = (0usize, 0usize);
        let mut done = false;
        while !done {
            match data.next().await {
                Some(bytes) => buffer.extend_from_slice(&bytes?),
                None => done = true,
            }
            while buffer.len() >= CHUNK_SIZE || (done && !buffer.is_empty()) {
                let n = buffer.len().min(CHUNK_SIZE);
                let chunk = buffer.split_to(n).freeze();
                sha.update(&chunk);
                size += chunk.len();
                chunks += 1;
                if acks.len() == ACK_WINDOW
                    && let Some(ack) = acks.pop_front()
                {
                    await_ack(ack).await?;
                }
                let ack = self
                    .inner
                    .js
                    .publish(subject.clone(), chunk)
                    .await
                    .map_err(generic)?;
                acks.push_back(ack);
            }
        }
        while let Some(ack) = acks.pop_front() {
            await_ack(ack).await?;
        }
        Ok((size, chunks, sha.finalize().into()))
    }

    /// Publishes the meta message, conditional on the subject's last
    /// sequence, then purges the chunks of the version it replaced.
    async fn commit(&self, location: &Path, info: &ObjectInfo, mode: PutMode) -> Result<PutResult> {
        let payload: Bytes = serde_json::to_vec(info).map_err(generic)?.into();
        // Most writes are of new names (a job's inputs and outputs): the
        // first attempt assumes one and saves the read of the last meta. The
        // server refuses it if the name has any meta message, deleted too.
        let mut assume_new = !matches!(mode, PutMode::Update(_));
        loop {
            let guessed = std::mem::take(&mut assume_new);
            let last = if guessed {
                None
            } else {
                self.last_meta(location).await?
            };
            let live = last.as_ref().filter(|(_, i)| !i.deleted);
            match (&mode, live) {
                (PutMode::Create, Some(_)) => {
                    return Err(Error::AlreadyExists {
                        path: location.to_string(),
                        source: "object exists".into(),
                    });
                }
                (PutMode::Update(version), current) => {
                    let matches = current
                        .is_some_and(|(_, i)| version.e_tag.as_deref() == Some(i.nuid.as_str()));
                    if !matches {
                        return Err(precondition(location, "ETag does not match"));
                    }
                }
                _ => {}
            }
            let expected = last.as_ref().map_or(0, |(seq, _)| *seq);
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_ROLLUP, "sub");
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                expected.to_string().as_str(),
            );
            let published = self
                .inner
                .js
                .publish_with_headers(self.meta_subject(location), headers, payload.clone())
                .await
                .map_err(generic)?
                .await;
            match published {
                Ok(_) => {
                    if let Some((_, old)) = last
                        && !old.nuid.is_empty()
                        && old.nuid != info.nuid
                    {
                        self.purge_chunks(&old.nuid).await;
                    }
                    return Ok(PutResult {
                        e_tag: Some(info.nuid.clone()),
                        version: None,
                        extensions: Default::default(),
                    });
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => match mode {
                    // The guess was wrong: read the last meta and decide.
                    _ if guessed => continue,
                    PutMode::Create => {
                        return Err(Error::AlreadyExists {
                            path: location.to_string(),
                            source: "object created concurrently".into(),
                        });
                    }
                    PutMode::Update(_) => {
                        return Err(precondition(location, "object changed concurrently"));
                    }
                    // Last writer wins: look again and retry.
                    PutMode::Overwrite => continue,
                },
                Err(e) => return Err(generic(e)),
            }
        }
    }

    /// `get_opts` that also returns the object's SHA-256 as its meta
    /// records it (one meta read describes the object entirely).
    pub async fn get_described(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> Result<(GetResult, Option<[u8; 32]>)> {
        for _ in 0..8 {
            if let Some((result, info)) = self.get_once_with_info(location, &options).await? {
                let digest = info
                    .digest
                    .as_deref()
                    .and_then(|d| d.strip_prefix("SHA-256="))
                    .and_then(|d| URL_SAFE.decode(d).ok())
                    .and_then(|d| <[u8; 32]>::try_from(d).ok());
                return Ok((result, digest));
            }
        }
        Err(Error::Generic {
            store: STORE,
            source: "object kept changing while being read".into(),
        })
    }

    /// One attempt of `get_opts`; `None` if the object was replaced while
    /// a small read was buffering it.
    async fn get_once(&self, location: &Path, options: &GetOptions) -> Result<Option<GetResult>> {
        Ok(self
            .get_once_with_info(location, options)
            .await?
            .map(|(result, _)| result))
    }

    async fn get_once_with_info(
        &self,
        location: &Path,
        options: &GetOptions,
    ) -> Result<Option<(GetResult, ObjectInfo)>> {
        let info = self.info(location).await?;
        // Our writer never makes links; following one would read another
        // object under this one's info.
        if !options.head && info.options.as_ref().is_some_and(|o| o.link.is_some()) {
            return Err(not_implemented("get of a linked object"));
        }
        let meta = object_meta(&info)?;
        options.check_preconditions(&meta)?;
        let range = match &options.range {
            Some(range) => range.as_range(meta.size).map_err(|e| Error::Generic {
                store: STORE,
                source: Box::new(e),
            })?,
            None => 0..meta.size,
        };
        let attributes = metadata_to_attributes(&info);
        // A head reads only the meta message; a get reads the chunks of the
        // version whose info it returns.
        let reader = if options.head {
            None
        } else {
            Some(WatchedRead {
                chunks: ChunkReader::open(self, &info).await?,
                store: self.clone(),
                location: location.clone(),
                nuid: info.nuid.clone(),
                skip: range.start,
                left: range.end - range.start,
                to_end: range.end == meta.size,
            })
        };
        let payload: BoxStream<'static, Result<Bytes>> = match reader {
            None => futures::stream::empty().boxed(),
            Some(mut reader) if range.end - range.start <= EAGER_BYTES => {
                let mut bytes = BytesMut::new();
                loop {
                    match reader.next_bytes().await {
                        Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
                        Ok(None) => break,
                        Err(ReadError::Replaced) => return Ok(None),
                        Err(ReadError::Failed(e)) => return Err(e),
                    }
                }
                futures::stream::once(futures::future::ready(Ok(bytes.freeze()))).boxed()
            }
            Some(reader) => futures::stream::try_unfold(reader, |mut reader| async move {
                match reader.next_bytes().await {
                    Ok(chunk) => Ok(chunk.map(|c| (c, reader))),
                    Err(ReadError::Replaced) => Err(Error::Generic {
                        store: STORE,
                        source: "object replaced or deleted while being read".into(),
                    }),
                    Err(ReadError::Failed(e)) => Err(e),
                }
            })
            .boxed(),
        };
        Ok(Some((
            GetResult {
                payload: GetResultPayload::Stream(payload),
                meta,
                range,
                attributes,
                extensions: Default::default(),
            },
            info,
        )))
    }

    async fn info(&self, location: &Path) -> Result<ObjectInfo> {
        match self.inner.store.info(location.as_ref()).await {
            Ok(info) if !info.deleted => Ok(info),
            Ok(_) => Err(not_found(location)),
            Err(e) if e.kind() == InfoErrorKind::NotFound => Err(not_found(location)),
            Err(e) => Err(generic(e)),
        }
    }
}

async fn await_ack(ack: jetstream::context::PublishAckFuture) -> Result<()> {
    ack.await.map(|_| ()).map_err(generic)
}

impl fmt::Debug for JetStreamObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamObjectStore")
            .field("bucket", &self.inner.bucket)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for JetStreamObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JetStreamObjectStore({})", self.inner.bucket)
    }
}

#[async_trait]
impl object_store::ObjectStore for JetStreamObjectStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        if !opts.tags.encoded().is_empty() {
            return Err(not_implemented("put_opts with tags"));
        }
        let data = futures::stream::iter(payload.into_iter().map(Ok));
        self.write(location, new_nuid(), data, &opts.attributes, opts.mode)
            .await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        if !opts.tags.encoded().is_empty() {
            return Err(not_implemented("put_multipart_opts with tags"));
        }
        let (parts, received) = mpsc::unbounded_channel();
        let store = self.clone();
        let location = location.clone();
        let task = tokio::spawn(async move {
            store
                .write(
                    &location,
                    new_nuid(),
                    part_stream(received),
                    &opts.attributes,
                    PutMode::Overwrite,
                )
                .await
        });
        Ok(Box::new(Upload {
            parts: Some(parts),
            task: Some(task),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        if options.version.is_some() {
            return Err(Error::NotSupported {
                source: "JetStream object store keeps no versions".into(),
            });
        }
        // A small read that lost a race with an overwrite starts again on
        // the new version (nothing was handed out yet).
        for _ in 0..8 {
            if let Some(result) = self.get_once(location, &options).await? {
                return Ok(result);
            }
        }
        Err(Error::Generic {
            store: STORE,
            source: "object kept changing while being read".into(),
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let store = self.clone();
        locations
            .map(move |location| {
                let store = store.clone();
                async move {
                    let location = location?;
                    match store.inner.store.delete(location.as_ref()).await {
                        Ok(()) => Ok(location),
                        Err(e)
                            if e.kind()
                                == async_nats::jetstream::object_store::DeleteErrorKind::NotFound =>
                        {
                            Err(not_found(&location))
                        }
                        Err(e) => Err(generic(e)),
                    }
                }
            })
            .buffered(8)
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let store = self.clone();
        let prefix = prefix.cloned().unwrap_or_default();
        futures::stream::once(async move { store.inner.store.list().await.map_err(generic) })
            .map_ok(move |list| {
                let prefix = prefix.clone();
                list.map_err(generic).try_filter_map(move |info| {
                    let found = Path::parse(&info.name)
                        .ok()
                        // A path equal to the prefix is not under it.
                        .filter(|path| {
                            path.prefix_match(&prefix)
                                .is_some_and(|mut rest| rest.next().is_some())
                        })
                        .map(|_| object_meta(&info))
                        .transpose();
                    futures::future::ready(found)
                })
            })
            .try_flatten()
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let base = prefix.cloned().unwrap_or_default();
        let mut objects = Vec::new();
        let mut prefixes = std::collections::BTreeSet::new();
        let mut all = self.list(prefix);
        while let Some(meta) = all.try_next().await? {
            let directory = {
                let Some(mut rest) = meta.location.prefix_match(&base) else {
                    continue;
                };
                match (rest.next(), rest.next()) {
                    (Some(part), Some(_)) => Some(base.clone().join(part)),
                    _ => None,
                }
            };
            match directory {
                Some(directory) => {
                    prefixes.insert(directory);
                }
                None => objects.push(meta),
            }
        }
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(ListResult {
            common_prefixes: prefixes.into_iter().collect(),
            objects,
            extensions: Default::default(),
        })
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        // Streamed through this process: a JetStream link would break when
        // the source is deleted.
        let source = self.get_opts(from, GetOptions::default()).await?;
        let mode = match options.mode {
            CopyMode::Overwrite => PutMode::Overwrite,
            CopyMode::Create => PutMode::Create,
        };
        let attributes = source.attributes.clone();
        let data = match source.payload {
            GetResultPayload::Stream(stream) => stream,
            #[allow(unreachable_patterns)]
            _ => return Err(not_implemented("copy of a file payload")),
        };
        self.write(to, new_nuid(), data, &attributes, mode)
            .await
            .map(|_| ())
    }
}

/// Reads at most this much at once into memory (and retries it whole if
/// the object is replaced meanwhile); larger reads stream.
const EAGER_BYTES: u64 = 4 * CHUNK_SIZE as u64;
/// Chunks one pull request asks for. The consumer asks for more when half
/// are consumed, so at most ~1.5 batches (~1.5 MiB of 128 KiB chunks) are
/// buffered ahead of a slow reader, unlike a push consumer.
const READ_BATCH: i64 = 8;
/// Objects of at most this many chunks are read by direct gets, one chunk
/// per request: no consumer is created for them. Creating one is a
/// JetStream API call, and an ordered consumer outlives its reader by its
/// inactive threshold (30 s), so reading many small outputs at once filled
/// the server's consumer limit. Larger objects use a consumer, which
/// pipelines its chunks.
const DIRECT_READ_CHUNKS: usize = 8;
/// Silence on a read after which the object's meta is checked.
const STALL_CHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// A direct get that finds no chunk waits this long before the object's
/// meta is checked (a replica may lag behind the leader for a moment).
const DIRECT_MISS_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

enum ReadError {
    /// The version being read was overwritten or deleted: its chunks are
    /// purged, and the consumer would wait for them forever.
    Replaced,
    Failed(Error),
}

/// What one read of a chunk brought.
enum ChunkRead {
    Chunk(Bytes),
    /// After the last chunk, once size and digest checked out.
    End,
    /// Nothing came: the version may have been replaced.
    Stalled,
}

/// Where the chunks come from.
enum ChunkSource {
    /// An empty object: no chunks.
    Empty,
    /// A small object: one direct get per chunk, each for the next message
    /// on the chunk subject at or after `next_sequence`.
    Direct {
        store: JetStreamObjectStore,
        subject: String,
        next_sequence: u64,
        left: usize,
    },
    /// A large object: an ordered pull consumer on the chunk subject.
    Consumer(Box<jetstream::consumer::pull::Ordered>),
}

/// The chunks of one object version, in order (flow-controlled: a consumer
/// fetches small batches as they are read). Checks the size and SHA-256
/// recorded in the info as the last chunk arrives, before handing it out.
struct ChunkReader {
    source: ChunkSource,
    size: u64,
    received: u64,
    sha: Sha256,
    digest: Option<String>,
    finished: bool,
}

impl ChunkReader {
    async fn open(store: &JetStreamObjectStore, info: &ObjectInfo) -> Result<Self> {
        let source = if info.chunks == 0 {
            ChunkSource::Empty
        } else if info.chunks <= DIRECT_READ_CHUNKS {
            ChunkSource::Direct {
                store: store.clone(),
                subject: store.chunk_subject(&info.nuid),
                next_sequence: 1,
                left: info.chunks,
            }
        } else {
            let consumer = store
                .inner
                .stream
                .create_consumer(jetstream::consumer::pull::OrderedConfig {
                    filter_subject: store.chunk_subject(&info.nuid),
                    // Caps the consumer's own pull requests (500 by default).
                    max_batch: READ_BATCH,
                    ..Default::default()
                })
                .await
                .map_err(generic)?;
            ChunkSource::Consumer(Box::new(consumer.messages().await.map_err(generic)?))
        };
        Ok(Self {
            finished: matches!(source, ChunkSource::Empty),
            source,
            size: info.size as u64,
            received: 0,
            sha: Sha256::new(),
            digest: info.digest.clone(),
        })
    }

    /// The next chunk; `End` after the last one, once it checked out;
    /// `Stalled` when nothing came within `wait`.
    async fn next(&mut self, wait: std::time::Duration) -> Result<ChunkRead> {
        if self.finished {
            // An empty object has no chunks to count.
            if self.received != self.size {
                return Err(corrupt("object ended before its recorded size"));
            }
            return Ok(ChunkRead::End);
        }
        let (chunk, last) = match &mut self.source {
            ChunkSource::Empty => return Ok(ChunkRead::End),
            ChunkSource::Direct {
                store,
                subject,
                next_sequence,
                left,
            } => {
                let message = match tokio::time::timeout(
                    wait,
                    store
                        .inner
                        .stream
                        .direct_get_next_for_subject(subject.as_str(), Some(*next_sequence)),
                )
                .await
                {
                    Ok(Ok(message)) => message,
                    Ok(Err(e)) if e.kind() == DirectGetErrorKind::NotFound => {
                        tokio::time::sleep(DIRECT_MISS_PAUSE).await;
                        return Ok(ChunkRead::Stalled);
                    }
                    Ok(Err(e)) => return Err(generic(e)),
                    Err(_elapsed) => return Ok(ChunkRead::Stalled),
                };
                *next_sequence = message.sequence + 1;
                *left -= 1;
                (message.payload, *left == 0)
            }
            ChunkSource::Consumer(messages) => {
                let message = match tokio::time::timeout(wait, messages.next()).await {
                    Ok(Some(message)) => message.map_err(generic)?,
                    Ok(None) => return Err(corrupt("chunk stream ended before the last chunk")),
                    Err(_elapsed) => return Ok(ChunkRead::Stalled),
                };
                // The server's count of chunks after this one: 0 marks the last.
                let pending = message.info().map_err(|e| corrupt(e.to_string()))?.pending;
                (message.message.payload, pending == 0)
            }
        };
        self.received += chunk.len() as u64;
        self.sha.update(&chunk);
        if self.received > self.size {
            return Err(corrupt("object longer than its recorded size"));
        }
        if last {
            self.finished = true;
            if self.received < self.size {
                return Err(corrupt("object ended before its recorded size"));
            }
            let sha = std::mem::take(&mut self.sha).finalize();
            if let Some(digest) = &self.digest
                && *digest != format!("SHA-256={}", URL_SAFE.encode(sha))
            {
                return Err(corrupt("object does not match its recorded SHA-256"));
            }
        }
        Ok(ChunkRead::Chunk(chunk))
    }
}

/// Streams a range of one object version. Chunks come in order from the
/// start, so a range skips its first bytes as they arrive; a read to the end
/// reads on to the last chunk, where size and SHA-256 are checked.
struct WatchedRead {
    chunks: ChunkReader,
    store: JetStreamObjectStore,
    location: Path,
    nuid: String,
    skip: u64,
    left: u64,
    /// The range ends at the object's end: read on to the last chunk.
    to_end: bool,
}

impl WatchedRead {
    async fn next_bytes(&mut self) -> std::result::Result<Option<Bytes>, ReadError> {
        loop {
            // A range to the object's end reads on to the last chunk, where
            // the reader checks size and digest.
            if self.left == 0 && !self.to_end {
                return Ok(None);
            }
            let mut chunk = match self.chunks.next(STALL_CHECK).await {
                Ok(ChunkRead::Chunk(chunk)) => chunk,
                Ok(ChunkRead::End) if self.left == 0 => return Ok(None),
                Ok(ChunkRead::End) => {
                    return Err(ReadError::Failed(corrupt(
                        "object ended before its recorded size",
                    )));
                }
                Ok(ChunkRead::Stalled) => {
                    // Silence: an overwrite or delete may have purged the
                    // chunks, which then never come.
                    let current = self
                        .store
                        .last_meta(&self.location)
                        .await
                        .map_err(ReadError::Failed)?;
                    let same =
                        matches!(&current, Some((_, i)) if i.nuid == self.nuid && !i.deleted);
                    if !same {
                        return Err(ReadError::Replaced);
                    }
                    continue;
                }
                Err(e) => return Err(ReadError::Failed(e)),
            };
            let skipped = self.skip.min(chunk.len() as u64);
            self.skip -= skipped;
            let _ = chunk.split_to(skipped as usize);
            // Empty once skipped, or (reading on to the end) past the range.
            if chunk.is_empty() || self.left == 0 {
                continue;
            }
            let n = self.left.min(chunk.len() as u64);
            chunk.truncate(n as usize);
            self.left -= n;
            return Ok(Some(chunk));
        }
    }
}

/// Parts in call order, then `Finish`; a channel closed without `Finish`
/// (the upload was dropped or aborted) fails the write, so it is not committed.
enum PartMessage {
    Part(PutPayload, oneshot::Sender<()>),
    Finish,
}

fn part_stream(
    received: mpsc::UnboundedReceiver<PartMessage>,
) -> impl futures::Stream<Item = Result<Bytes>> + Send {
    futures::stream::unfold(Some(received), |state| async move {
        let mut received = state?;
        match received.recv().await {
            Some(PartMessage::Part(payload, done)) => {
                // The sender learns its part was taken once the chunks are
                // handed on (it may then send the next one).
                let _ = done.send(());
                let bytes: Vec<Result<Bytes>> = payload.into_iter().map(Ok).collect();
                Some((futures::stream::iter(bytes), Some(received)))
            }
            Some(PartMessage::Finish) => None,
            None => Some((
                futures::stream::iter(vec![Err(Error::Generic {
                    store: STORE,
                    source: "multipart upload dropped before completion".into(),
                })]),
                None,
            )),
        }
    })
    .flatten()
}

#[derive(Debug)]
struct Upload {
    parts: Option<mpsc::UnboundedSender<PartMessage>>,
    task: Option<tokio::task::JoinHandle<Result<PutResult>>>,
}

#[async_trait]
impl MultipartUpload for Upload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let (done, taken) = oneshot::channel();
        let sent = self
            .parts
            .as_ref()
            .is_some_and(|parts| parts.send(PartMessage::Part(data, done)).is_ok());
        Box::pin(async move {
            if sent && taken.await.is_ok() {
                Ok(())
            } else {
                Err(Error::Generic {
                    store: STORE,
                    source: "multipart upload failed or finished".into(),
                })
            }
        })
    }

    async fn complete(&mut self) -> Result<PutResult> {
        if let Some(parts) = self.parts.take() {
            let _ = parts.send(PartMessage::Finish);
        }
        let task = self.task.take().ok_or_else(|| Error::Generic {
            store: STORE,
            source: "multipart upload already finished".into(),
        })?;
        task.await.map_err(|e| Error::JoinError { source: e })?
    }

    async fn abort(&mut self) -> Result<()> {
        // Closing the channel without `Finish` fails the write, which purges
        // its chunks.
        self.parts.take();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        Ok(())
    }
}

fn new_nuid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn object_meta(info: &ObjectInfo) -> Result<ObjectMeta> {
    let location = Path::parse(&info.name).map_err(|e| Error::InvalidPath { source: e })?;
    let last_modified = info
        .modified
        .and_then(|m| chrono::DateTime::from_timestamp(m.unix_timestamp(), m.nanosecond()))
        .unwrap_or_default();
    Ok(ObjectMeta {
        location,
        last_modified,
        size: info.size as u64,
        e_tag: Some(info.nuid.clone()),
        version: None,
    })
}

/// Attribute ↔ object metadata key. `content-type` is what comfyq stored
/// before this module existed, so old objects keep their type.
fn attribute_key(attribute: &Attribute) -> Option<String> {
    Some(match attribute {
        Attribute::ContentDisposition => "content-disposition".to_owned(),
        Attribute::ContentEncoding => "content-encoding".to_owned(),
        Attribute::ContentLanguage => "content-language".to_owned(),
        Attribute::ContentType => "content-type".to_owned(),
        Attribute::CacheControl => "cache-control".to_owned(),
        Attribute::StorageClass => "storage-class".to_owned(),
        Attribute::Metadata(key) => format!("meta-{key}"),
        _ => return None,
    })
}

fn attributes_to_metadata(attributes: &Attributes) -> std::collections::HashMap<String, String> {
    attributes
        .iter()
        .filter_map(|(attribute, value)| {
            attribute_key(attribute).map(|key| (key, value.as_ref().to_owned()))
        })
        .collect()
}

fn metadata_to_attributes(info: &ObjectInfo) -> Attributes {
    info.metadata
        .iter()
        .filter_map(|(key, value)| {
            let attribute = match key.as_str() {
                "content-disposition" => Attribute::ContentDisposition,
                "content-encoding" => Attribute::ContentEncoding,
                "content-language" => Attribute::ContentLanguage,
                "content-type" => Attribute::ContentType,
                "cache-control" => Attribute::CacheControl,
                "storage-class" => Attribute::StorageClass,
                other => Attribute::Metadata(other.strip_prefix("meta-")?.to_owned().into()),
            };
            Some((attribute, AttributeValue::from(value.clone())))
        })
        .collect()
}

fn generic(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Generic {
        store: STORE,
        source: Box::new(e),
    }
}

fn corrupt(why: impl Into<String>) -> Error {
    Error::Generic {
        store: STORE,
        source: why.into().into(),
    }
}

fn not_found(location: &Path) -> Error {
    Error::NotFound {
        path: location.to_string(),
        source: "no such object".into(),
    }
}

fn precondition(location: &Path, why: &'static str) -> Error {
    Error::Precondition {
        path: location.to_string(),
        source: why.into(),
    }
}

fn not_implemented(operation: &str) -> Error {
    Error::NotImplemented {
        operation: operation.to_owned(),
        implementer: "JetStreamObjectStore".to_owned(),
    }
}
