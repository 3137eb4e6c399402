//! HTTP client of one ComfyUI instance.
//!
//! Every call maps failures to [`ComfyError`], whose variants are the caller's
//! decisions: [`ComfyError::is_retryable`] tells infrastructure trouble (unreachable,
//! timeout, 5xx) from answers that will not change on retry.

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use reqwest::{Response, StatusCode, multipart};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use url::Url;
use uuid::Uuid;

use super::protocol::{
    Features, HistoryEntry, ObjectInfo, OutputFile, PromptAccepted, PromptRejection, QueueState,
    QueueStatus, SystemStats, UploadedFile,
};

/// Largest JSON answer read into memory (`/object_info` with many custom nodes is a
/// few MiB).
const MAX_JSON_BODY: usize = 64 * 1024 * 1024;
/// How much of an error body is kept in an error.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// Failure of a ComfyUI HTTP call.
#[derive(Debug, thiserror::Error)]
pub enum ComfyError {
    /// The base URL cannot be used.
    #[error("invalid ComfyUI base URL {url}: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Could not connect (ComfyUI down, restarting, wrong address). Retryable.
    #[error("ComfyUI unreachable: {0}")]
    Unreachable(#[source] reqwest::Error),
    /// The call took longer than its timeout. Retryable.
    #[error("ComfyUI call timed out: {0}")]
    Timeout(String),
    /// The connection failed mid-call (reset, body cut). Retryable.
    #[error("ComfyUI transport error: {0}")]
    Transport(#[source] reqwest::Error),
    /// ComfyUI answered 5xx. Retryable.
    #[error("ComfyUI server error {status}: {body}")]
    Server {
        /// Status code.
        status: StatusCode,
        /// Start of the body.
        body: String,
    },
    /// ComfyUI answered 404 (no such file, model folder, route).
    #[error("ComfyUI: not found: {0}")]
    NotFound(String),
    /// ComfyUI answered another 4xx: the request is wrong and will stay wrong.
    #[error("ComfyUI refused the request with {status}: {body}")]
    Refused {
        /// Status code.
        status: StatusCode,
        /// Start of the body.
        body: String,
    },
    /// The answer does not have the expected shape (wrong server or version).
    #[error("unexpected ComfyUI answer: {0}")]
    Protocol(String),
}

impl ComfyError {
    /// Whether retrying later (or on another instance) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unreachable(_) | Self::Timeout(_) | Self::Transport(_) | Self::Server { .. }
        )
    }

    fn from_reqwest(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            Self::Timeout(e.to_string())
        } else if e.is_connect() {
            Self::Unreachable(e)
        } else if e.is_decode() {
            Self::Protocol(e.to_string())
        } else if e.is_builder() {
            Self::InvalidUrl {
                url: e.url().map(Url::to_string).unwrap_or_default(),
                reason: e.to_string(),
            }
        } else {
            Self::Transport(e)
        }
    }
}

/// Failure of `POST /prompt`.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// ComfyUI validated the prompt and refused it: a user error, never retried.
    #[error("prompt rejected: {0}")]
    Rejected(Box<PromptRejection>),
    /// 400 whose body is not a validation answer (e.g. `no_prompt` on old servers that
    /// answer in another shape): not retryable.
    #[error("prompt refused with {status}: {body}")]
    BadRequest {
        /// Status code.
        status: StatusCode,
        /// Start of the body.
        body: String,
    },
    /// Anything else: see [`ComfyError::is_retryable`].
    #[error(transparent)]
    Comfy(#[from] ComfyError),
}

impl SubmitError {
    /// Whether retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Rejected(_) | Self::BadRequest { .. } => false,
            Self::Comfy(e) => e.is_retryable(),
        }
    }
}

/// Timeouts of a [`ComfyClient`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Whole-call timeout of JSON calls.
    pub request_timeout: Duration,
    /// Whole-call timeout of an upload.
    pub upload_timeout: Duration,
    /// Longest wait for the next chunk of a `/view` download (downloads have no total
    /// timeout; their headers must come within `request_timeout`).
    pub read_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            upload_timeout: Duration::from_secs(600),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// What to upload with [`ComfyClient::upload_image`].
#[derive(Debug, Clone)]
pub struct UploadImage {
    /// File name to store under.
    pub name: String,
    /// Subfolder of `input/` (empty for none).
    pub subfolder: String,
    /// Replace an existing file of that name (else ComfyUI renames to `name (1).ext`
    /// when the contents differ).
    pub overwrite: bool,
    /// MIME type of the part, e.g. `image/png`.
    pub content_type: String,
    /// Byte length, if known (lets the request carry a `Content-Length`).
    pub content_length: Option<u64>,
}

/// A streamed `/view` download.
pub struct ViewResponse {
    /// `Content-Length`, if sent.
    pub content_length: Option<u64>,
    /// `Content-Type`, if sent.
    pub content_type: Option<String>,
    /// The body, chunk by chunk.
    pub stream: Pin<Box<dyn Stream<Item = Result<Bytes, ComfyError>> + Send>>,
}

impl fmt::Debug for ViewResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ViewResponse")
            .field("content_length", &self.content_length)
            .field("content_type", &self.content_type)
            .finish_non_exhaustive()
    }
}

/// HTTP client of one ComfyUI instance. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ComfyClient {
    http: reqwest::Client,
    base: Url,
    config: ClientConfig,
}

impl ComfyClient {
    /// A client for the ComfyUI at `base` (e.g. `http://127.0.0.1:8188/`; a path prefix
    /// such as `http://host/comfy/` is kept).
    pub fn new(base: Url, config: ClientConfig) -> Result<Self, ComfyError> {
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(ComfyError::InvalidUrl {
                url: base.to_string(),
                reason: "expected an http(s) URL".to_owned(),
            });
        }
        let http = reqwest::Client::builder()
            // No client-wide read timeout: reqwest's also bounds the time until the
            // response headers, which would cut long uploads.
            .connect_timeout(config.connect_timeout)
            .build()
            .map_err(|e| ComfyError::InvalidUrl {
                url: base.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self { http, base, config })
    }

    /// The base URL.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// `base` + path segments (each percent-encoded as needed).
    pub fn endpoint(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.set_query(None);
        url.set_fragment(None);
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Response, ComfyError> {
        let resp = req.send().await.map_err(ComfyError::from_reqwest)?;
        check_status(resp).await
    }

    async fn get_json<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<T, ComfyError> {
        let req = self
            .http
            .get(self.endpoint(segments))
            .timeout(self.config.request_timeout);
        let resp = self.send(req).await?;
        read_json(resp).await
    }

    async fn post_json_empty(&self, segments: &[&str], body: &Value) -> Result<(), ComfyError> {
        let req = self
            .http
            .post(self.endpoint(segments))
            .timeout(self.config.request_timeout)
            .json(body);
        self.send(req).await?;
        Ok(())
    }

    /// `GET /system_stats`.
    pub async fn system_stats(&self) -> Result<SystemStats, ComfyError> {
        self.get_json(&["system_stats"]).await
    }

    /// `GET /features`.
    pub async fn features(&self) -> Result<Features, ComfyError> {
        self.get_json(&["features"]).await
    }

    /// `GET /object_info`.
    pub async fn object_info(&self) -> Result<ObjectInfo, ComfyError> {
        self.get_json(&["object_info"]).await
    }

    /// `GET /models`: the model folder names.
    pub async fn model_folders(&self) -> Result<Vec<String>, ComfyError> {
        self.get_json(&["models"]).await
    }

    /// `GET /models/<folder>`: file names in a model folder (`checkpoints`, `loras`...).
    /// An unknown folder is [`ComfyError::NotFound`].
    pub async fn models(&self, folder: &str) -> Result<Vec<String>, ComfyError> {
        self.get_json(&["models", folder]).await
    }

    /// `GET /queue`.
    pub async fn queue(&self) -> Result<QueueState, ComfyError> {
        self.get_json(&["queue"]).await
    }

    /// `GET /prompt`: the number of prompts queued or running.
    pub async fn queue_remaining(&self) -> Result<u64, ComfyError> {
        let s: QueueStatus = self.get_json(&["prompt"]).await?;
        Ok(s.queue_remaining())
    }

    /// `GET /history/<prompt_id>`: `None` while the prompt is unknown or unfinished (the
    /// server answers `{}`; history is lost when ComfyUI restarts).
    pub async fn history(&self, prompt_id: &str) -> Result<Option<HistoryEntry>, ComfyError> {
        let req = self
            .http
            .get(self.endpoint(&["history", prompt_id]))
            .timeout(self.config.request_timeout);
        let resp = self.send(req).await?;
        let raw = read_limited(resp, MAX_JSON_BODY).await?;
        parse_history_response(prompt_id, &raw)
    }

    /// `POST /history {"delete": [...]}`: forget finished prompts.
    pub async fn delete_history(&self, prompt_ids: &[&str]) -> Result<(), ComfyError> {
        self.post_json_empty(&["history"], &json!({ "delete": prompt_ids }))
            .await
    }

    /// `POST /prompt` with our `prompt_id` (ComfyUI >= 0.3.4x keeps it; older servers
    /// ignore it and make their own: always follow [`PromptAccepted::prompt_id`]). Never
    /// sets `front`. A 200 may still carry `node_errors` (those outputs will not run).
    pub async fn submit_prompt(
        &self,
        prompt: &(impl serde::Serialize + ?Sized),
        client_id: &str,
        prompt_id: Uuid,
        extra_data: Option<&Value>,
    ) -> Result<PromptAccepted, SubmitError> {
        let mut body = json!({
            "prompt": prompt,
            "client_id": client_id,
            "prompt_id": prompt_id.to_string(),
        });
        if let Some(extra) = extra_data {
            body["extra_data"] = extra.clone();
        }
        let req = self
            .http
            .post(self.endpoint(&["prompt"]))
            .timeout(self.config.request_timeout)
            .json(&body);
        let resp = req.send().await.map_err(ComfyError::from_reqwest)?;
        let status = resp.status();
        let limit = if status.is_success() || status == StatusCode::BAD_REQUEST {
            MAX_JSON_BODY
        } else {
            MAX_ERROR_BODY
        };
        let raw = read_limited(resp, limit).await?;
        parse_submit_response(status, &raw)
    }

    /// `POST /upload/image` (multipart `image`, `type=input`, `subfolder`, `overwrite`).
    /// The body is streamed, never buffered here.
    pub async fn upload_image(
        &self,
        upload: &UploadImage,
        body: reqwest::Body,
    ) -> Result<UploadedFile, ComfyError> {
        let part = match upload.content_length {
            Some(len) => multipart::Part::stream_with_length(body, len),
            None => multipart::Part::stream(body),
        }
        .file_name(upload.name.clone())
        .mime_str(&upload.content_type)
        .map_err(|e| ComfyError::Protocol(format!("content type {}: {e}", upload.content_type)))?;
        let form = multipart::Form::new()
            .part("image", part)
            .text("type", "input")
            .text("subfolder", upload.subfolder.clone())
            .text("overwrite", if upload.overwrite { "true" } else { "false" });
        let req = self
            .http
            .post(self.endpoint(&["upload", "image"]))
            .timeout(self.config.upload_timeout)
            .multipart(form);
        let resp = self.send(req).await?;
        read_json(resp).await
    }

    /// `GET /view` of an output file, streamed (bounded memory).
    pub async fn view(&self, file: &OutputFile) -> Result<ViewResponse, ComfyError> {
        let mut url = self.endpoint(&["view"]);
        url.query_pairs_mut()
            .append_pair("filename", &file.filename)
            .append_pair("subfolder", &file.subfolder)
            .append_pair("type", &file.folder_type);
        let send = self.http.get(url).send();
        let resp = match tokio::time::timeout(self.config.request_timeout, send).await {
            Err(_) => {
                return Err(ComfyError::Timeout(format!(
                    "/view of {}: no answer within {:?}",
                    file.filename, self.config.request_timeout
                )));
            }
            Ok(resp) => check_status(resp.map_err(ComfyError::from_reqwest)?).await?,
        };
        let content_length = resp.content_length();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let read_timeout = self.config.read_timeout;
        let body = resp.bytes_stream().boxed();
        let stream = futures::stream::unfold(Some(body), move |state| async move {
            let mut body = state?;
            match tokio::time::timeout(read_timeout, body.next()).await {
                Err(_) => Some((
                    Err(ComfyError::Timeout(format!(
                        "/view download stalled for {read_timeout:?}"
                    ))),
                    None,
                )),
                Ok(None) => None,
                Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(body))),
                Ok(Some(Err(e))) => Some((Err(ComfyError::from_reqwest(e)), None)),
            }
        })
        .boxed();
        Ok(ViewResponse {
            content_length,
            content_type,
            stream,
        })
    }

    /// `POST /interrupt`: `Some(id)` interrupts only if that prompt is running; `None`
    /// interrupts whatever runs.
    pub async fn interrupt(&self, prompt_id: Option<&str>) -> Result<(), ComfyError> {
        let body = match prompt_id {
            Some(id) => json!({ "prompt_id": id }),
            None => json!({}),
        };
        self.post_json_empty(&["interrupt"], &body).await
    }

    /// `POST /queue {"delete": [...]}`: removes pending prompts (not the running one).
    pub async fn delete_queued(&self, prompt_ids: &[&str]) -> Result<(), ComfyError> {
        self.post_json_empty(&["queue"], &json!({ "delete": prompt_ids }))
            .await
    }

    /// `POST /free`: unload models and/or free cached memory.
    pub async fn free(&self, unload_models: bool, free_memory: bool) -> Result<(), ComfyError> {
        self.post_json_empty(
            &["free"],
            &json!({ "unload_models": unload_models, "free_memory": free_memory }),
        )
        .await
    }
}

/// Interprets a `GET /history/<prompt_id>` body: `{}` is `None` (unknown or unfinished).
pub fn parse_history_response(
    prompt_id: &str,
    body: &[u8],
) -> Result<Option<HistoryEntry>, ComfyError> {
    let mut map: serde_json::Map<String, Value> = serde_json::from_slice(body).map_err(|e| {
        ComfyError::Protocol(format!(
            "history of {prompt_id}: {e}; body: {}",
            lossy_prefix(body)
        ))
    })?;
    let Some(entry) = map.remove(prompt_id) else {
        return match map.len() {
            0 => Ok(None),
            _ => Err(ComfyError::Protocol(format!(
                "history of {prompt_id} holds other prompts only"
            ))),
        };
    };
    let mut parsed: HistoryEntry = serde_json::from_value(entry.clone())
        .map_err(|e| ComfyError::Protocol(format!("history entry of {prompt_id}: {e}")))?;
    parsed.raw = entry;
    Ok(Some(parsed))
}

/// Interprets a `POST /prompt` answer: 200 → accepted (maybe with `node_errors`); 4xx
/// with a validation body → [`SubmitError::Rejected`]; other 4xx → `BadRequest` (404:
/// `NotFound`); 5xx → retryable [`ComfyError::Server`].
pub fn parse_submit_response(
    status: StatusCode,
    body: &[u8],
) -> Result<PromptAccepted, SubmitError> {
    if status.is_success() {
        return serde_json::from_slice(body).map_err(|e| {
            ComfyError::Protocol(format!("/prompt: {e}; body: {}", lossy_prefix(body))).into()
        });
    }
    if status == StatusCode::NOT_FOUND {
        return Err(ComfyError::NotFound("/prompt".to_owned()).into());
    }
    if status.is_client_error() {
        return Err(match serde_json::from_slice::<PromptRejection>(body) {
            Ok(rejection) => SubmitError::Rejected(Box::new(rejection)),
            Err(_) => SubmitError::BadRequest {
                status,
                body: lossy_prefix(body),
            },
        });
    }
    let body = lossy_prefix(body);
    Err(if status.is_server_error() {
        ComfyError::Server { status, body }
    } else {
        ComfyError::Protocol(format!("/prompt answered {status}: {body}"))
    }
    .into())
}

/// Turns a non-2xx answer into an error.
async fn check_status(resp: Response) -> Result<Response, ComfyError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let path = resp.url().path().to_owned();
    let body = read_limited(resp, MAX_ERROR_BODY)
        .await
        .map(|b| lossy_prefix(&b))
        .unwrap_or_default();
    Err(if status == StatusCode::NOT_FOUND {
        ComfyError::NotFound(path)
    } else if status.is_server_error() {
        ComfyError::Server { status, body }
    } else {
        ComfyError::Refused { status, body }
    })
}

async fn read_json<T: DeserializeOwned>(resp: Response) -> Result<T, ComfyError> {
    let path = resp.url().path().to_owned();
    let raw = read_limited(resp, MAX_JSON_BODY).await?;
    serde_json::from_slice(&raw)
        .map_err(|e| ComfyError::Protocol(format!("{path}: {e}; body: {}", lossy_prefix(&raw))))
}

/// Reads a body up to `limit` bytes; longer bodies are a protocol error, except for error
/// bodies (`limit == MAX_ERROR_BODY`) which are cut.
async fn read_limited(resp: Response, limit: usize) -> Result<Bytes, ComfyError> {
    let mut out = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(ComfyError::from_reqwest)?;
        let room = limit - out.len();
        if chunk.len() > room {
            if limit == MAX_ERROR_BODY {
                out.extend_from_slice(&chunk[..room]);
                break;
            }
            return Err(ComfyError::Protocol(format!(
                "answer larger than {limit} bytes"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

fn lossy_prefix(raw: &[u8]) -> String {
    let cut = &raw[..raw.len().min(MAX_ERROR_BODY)];
    String::from_utf8_lossy(cut).trim().to_owned()
}
