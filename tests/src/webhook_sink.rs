//! An HTTP server that records webhooks and answers from a script.
//!
//! Every request (any method, any path) is recorded as a [`ReceivedWebhook`]
//! when its body has been read, then answered with the next queued
//! [`MockResponse`] or, when the queue is empty, the default response (200).

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One request received by a [`WebhookSink`].
#[derive(Debug, Clone)]
pub struct ReceivedWebhook {
    /// HTTP method.
    pub method: Method,
    /// Request URI as sent (path and query).
    pub uri: Uri,
    /// Request headers.
    pub headers: HeaderMap,
    /// The complete body.
    pub body: Bytes,
    /// When the body had been read, before any response delay.
    pub received_at: Instant,
    /// The status the sink answered with.
    pub answered: StatusCode,
}

impl ReceivedWebhook {
    /// The path without query.
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// A header as a string, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON.
    ///
    /// # Panics
    ///
    /// If the body is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "webhook body to {} is not JSON ({e}): {}",
                self.uri,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub struct MockResponse {
    /// Status code.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response body.
    pub body: Bytes,
    /// Wait this long before answering (to provoke client timeouts).
    pub delay: Option<Duration>,
}

impl MockResponse {
    /// An empty response with `status`.
    pub fn status(status: u16) -> MockResponse {
        MockResponse {
            status: StatusCode::from_u16(status)
                .unwrap_or_else(|e| panic!("invalid status {status}: {e}")),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            delay: None,
        }
    }

    /// Adds a header.
    ///
    /// # Panics
    ///
    /// If the name or value is invalid.
    pub fn header(mut self, name: &str, value: &str) -> MockResponse {
        let name = HeaderName::try_from(name)
            .unwrap_or_else(|e| panic!("invalid header name {name:?}: {e}"));
        let value = HeaderValue::try_from(value)
            .unwrap_or_else(|e| panic!("invalid header value {value:?}: {e}"));
        self.headers.append(name, value);
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> MockResponse {
        self.body = body.into();
        self
    }

    /// Delays the answer.
    pub fn delay(mut self, delay: Duration) -> MockResponse {
        self.delay = Some(delay);
        self
    }

    fn to_response(&self) -> Response {
        let mut response = Response::new(Body::from(self.body.clone()));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers.clone();
        response
    }
}

#[derive(Debug)]
struct Inner {
    requests: Vec<ReceivedWebhook>,
    queue: VecDeque<MockResponse>,
    default: MockResponse,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    count: watch::Sender<usize>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave Inner inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A recording HTTP server on 127.0.0.1; stops when dropped.
#[derive(Debug)]
pub struct WebhookSink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl WebhookSink {
    /// Binds 127.0.0.1:0 and serves in a background task.
    pub async fn start() -> WebhookSink {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// A sink on a given address: a receiver that comes back on the port it
    /// had before going down.
    pub async fn start_on(addr: SocketAddr) -> WebhookSink {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("webhook sink cannot bind {addr}: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("webhook sink has no local address: {e}"));
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                requests: Vec::new(),
                queue: VecDeque::new(),
                default: MockResponse::status(200),
            }),
            count: watch::Sender::new(0),
        });
        let app = Router::new()
            .fallback(record)
            .layer(DefaultBodyLimit::disable())
            .with_state(Arc::clone(&shared));
        let cancel = CancellationToken::new();
        let shutdown = cancel.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "webhook sink stopped");
            }
        });
        WebhookSink {
            addr,
            shared,
            cancel,
        }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port><path>` (a missing leading `/` is added).
    pub fn url(&self, path: &str) -> String {
        let slash = if path.starts_with('/') { "" } else { "/" };
        format!("http://{}{slash}{path}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<ReceivedWebhook> {
        self.shared.lock().requests.clone()
    }

    /// Requests whose path is `path`.
    pub fn requests_to(&self, path: &str) -> Vec<ReceivedWebhook> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.path() == path)
            .cloned()
            .collect()
    }

    /// Forgets recorded requests (the count used by [`WebhookSink::wait_for`]
    /// restarts at 0). The response queue is kept.
    pub fn clear(&self) {
        self.shared.lock().requests.clear();
        self.shared.count.send_replace(0);
    }

    /// Answers the next `times` requests with `status` and `headers`, after any
    /// responses already queued.
    pub fn respond_with(&self, times: usize, status: u16, headers: &[(&str, &str)]) {
        let response = headers
            .iter()
            .fold(MockResponse::status(status), |r, (name, value)| {
                r.header(name, value)
            });
        let mut inner = self.shared.lock();
        inner.queue.extend(std::iter::repeat_n(response, times));
    }

    /// Queues one scripted response.
    pub fn push_response(&self, response: MockResponse) {
        self.shared.lock().queue.push_back(response);
    }

    /// The status used once the queue is empty (initially 200).
    pub fn set_default(&self, status: u16) {
        self.set_default_response(MockResponse::status(status));
    }

    /// The response used once the queue is empty.
    pub fn set_default_response(&self, response: MockResponse) {
        self.shared.lock().default = response;
    }

    /// Waits until at least `n` requests were recorded and returns all of them.
    ///
    /// # Panics
    ///
    /// After `timeout`, listing what was received.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ReceivedWebhook> {
        let mut count = self.shared.count.subscribe();
        let start = Instant::now();
        let reached = tokio::time::timeout(timeout, count.wait_for(|c| *c >= n)).await;
        if !matches!(reached, Ok(Ok(_))) {
            let got: Vec<String> = self
                .requests()
                .iter()
                .map(|r| format!("{} {} -> {}", r.method, r.uri, r.answered))
                .collect();
            panic!(
                "webhook sink: expected {n} requests within {timeout:?}, got {} after {:?}: {got:#?}",
                got.len(),
                start.elapsed()
            );
        }
        self.requests()
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn record(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(body) => body,
        Err(e) => {
            let mut response = Response::new(Body::from(format!("cannot read body: {e}")));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return response;
        }
    };
    let answer = {
        let mut inner = shared.lock();
        let answer = inner
            .queue
            .pop_front()
            .unwrap_or_else(|| inner.default.clone());
        inner.requests.push(ReceivedWebhook {
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
            body,
            received_at: Instant::now(),
            answered: answer.status,
        });
        shared.count.send_replace(inner.requests.len());
        answer
    };
    if let Some(delay) = answer.delay {
        tokio::time::sleep(delay).await;
    }
    answer.to_response()
}
