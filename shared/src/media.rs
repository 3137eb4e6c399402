//! Job media (inputs and outputs) in the JetStream object store, streamed in
//! chunks: nothing here holds a whole file in memory.

use async_nats::jetstream::object_store::{self, ObjectMetadata};
use base64::Engine as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

use crate::ids::{JobId, TenantId};
use crate::names::Names;

const CONTENT_TYPE_KEY: &str = "content-type";

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("object {0} not found")]
    NotFound(String),
    #[error("media store: {0}")]
    Store(#[from] async_nats::Error),
}

/// What the store knows about a stored object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredObject {
    pub key: String,
    pub size: u64,
    /// Lower-case hex SHA-256 of the bytes.
    pub sha256: String,
    pub content_type: String,
}

#[derive(Clone)]
pub struct MediaStore {
    store: object_store::ObjectStore,
    names: Names,
}

impl MediaStore {
    pub fn new(store: object_store::ObjectStore, names: Names) -> Self {
        Self { store, names }
    }

    pub fn input_key(&self, tenant: &TenantId, job: &JobId, name: &str) -> String {
        self.names.input_object(tenant, job, name)
    }

    pub fn output_key(&self, tenant: &TenantId, job: &JobId, name: &str) -> String {
        self.names.output_object(tenant, job, name)
    }

    /// Streams `reader` into the object `key`.
    pub async fn put(
        &self,
        key: &str,
        content_type: &str,
        reader: &mut (impl AsyncRead + Unpin),
    ) -> Result<StoredObject, MediaError> {
        let meta = ObjectMetadata {
            name: key.to_owned(),
            metadata: [(CONTENT_TYPE_KEY.to_owned(), content_type.to_owned())].into(),
            ..Default::default()
        };
        let mut reader = FullChunks::new(reader, OBJECT_CHUNK);
        let info = self
            .store
            .put(meta, &mut reader)
            .await
            .map_err(|e| MediaError::Store(e.into()))?;
        Ok(stored(info))
    }

    pub async fn head(&self, key: &str) -> Result<StoredObject, MediaError> {
        match self.store.info(key).await {
            Ok(info) if !info.deleted => Ok(stored(info)),
            Ok(_) => Err(MediaError::NotFound(key.to_owned())),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => {
                Err(MediaError::NotFound(key.to_owned()))
            }
            Err(e) => Err(MediaError::Store(e.into())),
        }
    }

    /// Opens the object for streaming reads.
    pub async fn get(&self, key: &str) -> Result<(StoredObject, object_store::Object), MediaError> {
        match self.store.get(key).await {
            Ok(object) => {
                let info = stored(object.info().clone());
                Ok((info, object))
            }
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => {
                Err(MediaError::NotFound(key.to_owned()))
            }
            Err(e) => Err(MediaError::Store(e.into())),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), MediaError> {
        self.store
            .delete(key)
            .await
            .map_err(|e| MediaError::Store(e.into()))
    }
}

impl std::fmt::Debug for MediaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaStore")
            .field("prefix", &self.names.prefix())
            .finish_non_exhaustive()
    }
}

fn stored(info: object_store::ObjectInfo) -> StoredObject {
    StoredObject {
        sha256: info
            .digest
            .as_deref()
            .map(digest_to_hex)
            .unwrap_or_default(),
        content_type: info
            .metadata
            .get(CONTENT_TYPE_KEY)
            .cloned()
            .unwrap_or_else(|| "application/octet-stream".to_owned()),
        size: info.size as u64,
        key: info.name,
    }
}

/// async-nats records digests as `SHA-256=<base64url>`; comfyq shows hex.
fn digest_to_hex(digest: &str) -> String {
    let encoded = digest.strip_prefix("SHA-256=").unwrap_or(digest);
    base64::engine::general_purpose::URL_SAFE
        .decode(encoded)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded))
        .map(hex::encode)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn digest_converts_to_hex() {
        let sum = sha2::Sha256::digest(b"hello");
        let encoded = format!(
            "SHA-256={}",
            base64::engine::general_purpose::URL_SAFE.encode(sum)
        );
        assert_eq!(digest_to_hex(&encoded), hex::encode(sum));
    }
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
mod sniff_tests {
    use super::sniff_content_type;

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
}

/// async-nats' default object chunk size.
const OBJECT_CHUNK: usize = 128 * 1024;

/// Hands out whole chunks: async-nats makes one object-store chunk, with one
/// awaited publish, of every read. A network stream (a multipart part, a
/// `/view` body) reads a few KiB at a time, which made the 64 MiB upload of
/// the `media` load test several times slower than a raw object store put.
#[derive(Debug)]
struct FullChunks<'a, R> {
    inner: &'a mut R,
    buffer: BytesMut,
    chunk: usize,
    eof: bool,
}

impl<'a, R: AsyncRead + Unpin> FullChunks<'a, R> {
    fn new(inner: &'a mut R, chunk: usize) -> Self {
        Self {
            inner,
            buffer: BytesMut::with_capacity(chunk),
            chunk,
            eof: false,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for FullChunks<'_, R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.buffer.len() >= this.chunk || (this.eof && !this.buffer.is_empty()) {
                let n = out.remaining().min(this.buffer.len());
                out.put_slice(&this.buffer[..n]);
                this.buffer.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            this.buffer.reserve(this.chunk - this.buffer.len());
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut *this.inner),
                cx,
                &mut this.buffer
            ))?;
            if n == 0 {
                this.eof = true;
            }
        }
    }
}

#[cfg(test)]
mod full_chunks_tests {
    use tokio::io::AsyncReadExt;

    use super::FullChunks;

    #[tokio::test]
    async fn small_reads_come_out_as_whole_chunks() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        // A source that yields 7 bytes per read.
        let mut source = tokio_test_reader(&data, 7);
        let mut chunks = FullChunks::new(&mut source, 1024);
        let mut sizes = Vec::new();
        let mut all = Vec::new();
        loop {
            let mut buf = Vec::with_capacity(4096);
            let n = chunks.read_buf(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            sizes.push(n);
            all.extend_from_slice(&buf);
        }
        assert_eq!(all, data);
        let (last, whole) = sizes.split_last().expect("chunks");
        assert!(whole.iter().all(|n| *n == 1024), "{sizes:?}");
        assert_eq!(*last, 10_000 % 1024);
    }

    fn tokio_test_reader(data: &[u8], step: usize) -> impl tokio::io::AsyncRead + Unpin {
        let parts: Vec<std::io::Result<bytes::Bytes>> = data
            .chunks(step)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        tokio_util::io::StreamReader::new(futures::stream::iter(parts))
    }
}
