//! ComfyUI's `/ws?clientId=<id>` WebSocket, as a stream of typed events.
//!
//! [`ComfySocket::connect`] opens the socket, sends the `feature_flags` handshake first
//! (so previews come as event 4 frames naming their prompt), and spawns one task that
//! parses every text frame into a [`ServerMessage`] and every binary frame into a
//! [`BinaryFrame`], forwarding them as [`SocketEvent`]s on a bounded channel. A message
//! that fails to parse is logged and skipped. Pings are answered by tungstenite as frames
//! are read; optional client pings detect a dead connection. There is no reconnect inside:
//! the stream ends with one [`SocketEvent::Closed`] and the caller decides (see
//! [`connect_with_backoff`]). Remember that ComfyUI does not replay missed events: after a
//! reconnect, reconcile through `/history/<prompt_id>`.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::{debug, warn};
use url::Url;

use super::frames::BinaryFrame;
use super::protocol::{ServerMessage, feature_flags_handshake};

/// Options of a [`ComfySocket`].
#[derive(Debug, Clone)]
pub struct SocketConfig {
    /// Timeout of TCP connect plus WebSocket handshake.
    pub connect_timeout: Duration,
    /// Capacity of the event channel (reading pauses while it is full).
    pub channel_capacity: usize,
    /// Send a ping this often; `None` disables client pings and idle detection.
    pub ping_interval: Option<Duration>,
    /// Close with [`CloseReason::Idle`] when nothing (not even a pong) arrived for this
    /// long. Only checked when `ping_interval` is set.
    pub idle_timeout: Duration,
    /// Send the `feature_flags` handshake asking for event 4 preview frames.
    pub preview_metadata: bool,
}

impl Default for SocketConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            channel_capacity: 1024,
            ping_interval: Some(Duration::from_secs(15)),
            idle_timeout: Duration::from_secs(45),
            preview_metadata: true,
        }
    }
}

/// What the socket task forwards.
#[derive(Debug, Clone, PartialEq)]
pub enum SocketEvent {
    /// A JSON message.
    Message(ServerMessage),
    /// A binary frame.
    Frame(BinaryFrame),
    /// The socket is closed; the last event.
    Closed(CloseReason),
}

/// Why the socket closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The server sent a close frame.
    ByServer {
        /// Close code (1000 normal, 1001 going away...).
        code: u16,
        /// Reason text.
        reason: String,
    },
    /// The connection ended without a close frame.
    Eof,
    /// A read or write failed.
    Error(String),
    /// Nothing arrived for the configured idle timeout.
    Idle(Duration),
    /// [`ComfySocket::close`] was called.
    ByClient,
}

/// Failure to open the socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The base URL cannot be turned into a `ws(s)://` URL.
    #[error("invalid ComfyUI base URL {0}")]
    InvalidUrl(String),
    /// Connect or handshake took longer than the timeout. Retryable.
    #[error("WebSocket connect to {0} timed out")]
    Timeout(Url),
    /// Connect or handshake failed. Retryable unless the server refused the upgrade with
    /// a 4xx.
    #[error("WebSocket connect to {url} failed: {source}")]
    Connect {
        /// The URL.
        url: Url,
        /// The error.
        #[source]
        source: Box<tungstenite::Error>,
    },
}

impl SocketError {
    /// Whether connecting again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::InvalidUrl(_) => false,
            Self::Timeout(_) => true,
            Self::Connect { source, .. } => match source.as_ref() {
                tungstenite::Error::Http(resp) => !resp.status().is_client_error(),
                tungstenite::Error::Url(_) => false,
                _ => true,
            },
        }
    }
}

/// The `/ws?clientId=<id>` URL for a ComfyUI base URL (`http` → `ws`, `https` → `wss`,
/// path prefix kept).
pub fn ws_url(base: &Url, client_id: &str) -> Result<Url, SocketError> {
    let scheme = match base.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => return Err(SocketError::InvalidUrl(format!("{base}: scheme {other}"))),
    };
    let mut url = base.clone();
    url.set_scheme(scheme)
        .map_err(|()| SocketError::InvalidUrl(base.to_string()))?;
    url.set_fragment(None);
    url.path_segments_mut()
        .map_err(|()| SocketError::InvalidUrl(base.to_string()))?
        .pop_if_empty()
        .push("ws");
    url.set_query(None);
    url.query_pairs_mut().append_pair("clientId", client_id);
    Ok(url)
}

/// Handle of an open socket. Dropping it stops the socket task.
#[derive(Debug)]
pub struct ComfySocket {
    client_id: String,
    url: Url,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl ComfySocket {
    /// Connects to `/ws?clientId=<client_id>`, sends the feature-flag handshake and starts
    /// forwarding events. Cheap to call again after a close.
    pub async fn connect(
        base: &Url,
        client_id: &str,
        config: &SocketConfig,
    ) -> Result<(Self, mpsc::Receiver<SocketEvent>), SocketError> {
        let url = ws_url(base, client_id)?;
        let connect = tokio_tungstenite::connect_async(url.as_str());
        let (mut ws, _resp) = match tokio::time::timeout(config.connect_timeout, connect).await {
            Err(_) => return Err(SocketError::Timeout(url)),
            Ok(Err(e)) => {
                return Err(SocketError::Connect {
                    url,
                    source: Box::new(e),
                });
            }
            Ok(Ok(pair)) => pair,
        };
        if config.preview_metadata {
            let hello = feature_flags_handshake().to_string();
            if let Err(e) = ws.send(Message::text(hello)).await {
                return Err(SocketError::Connect {
                    url,
                    source: Box::new(e),
                });
            }
        }
        let (tx, rx) = mpsc::channel(config.channel_capacity.max(1));
        let (shutdown, shutdown_rx) = oneshot::channel();
        let task = tokio::spawn(run(ws, tx, shutdown_rx, config.clone()));
        debug!(%url, "ComfyUI socket connected");
        Ok((
            Self {
                client_id: client_id.to_owned(),
                url,
                shutdown: Some(shutdown),
                task,
            },
            rx,
        ))
    }

    /// The client id the socket was opened with.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The socket URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// Whether the socket task has ended.
    pub fn is_closed(&self) -> bool {
        self.task.is_finished()
    }

    /// Sends a close frame and waits for the task to end (the receiver gets
    /// [`CloseReason::ByClient`] if it still listens).
    pub async fn close(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = &mut self.task;
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

impl Drop for ComfySocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn run(
    mut ws: Ws,
    tx: mpsc::Sender<SocketEvent>,
    mut shutdown: oneshot::Receiver<()>,
    config: SocketConfig,
) {
    let period = config.ping_interval.unwrap_or(Duration::from_secs(3600));
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_seen = Instant::now();
    let reason = loop {
        tokio::select! {
            _ = &mut shutdown => {
                let _ = ws.close(None).await;
                break CloseReason::ByClient;
            }
            _ = ticker.tick(), if config.ping_interval.is_some() => {
                if last_seen.elapsed() >= config.idle_timeout {
                    break CloseReason::Idle(last_seen.elapsed());
                }
                if let Err(e) = ws.send(Message::Ping(Default::default())).await {
                    break CloseReason::Error(e.to_string());
                }
            }
            next = ws.next() => {
                let msg = match next {
                    None => break CloseReason::Eof,
                    Some(Err(e)) => break CloseReason::Error(e.to_string()),
                    Some(Ok(msg)) => msg,
                };
                last_seen = Instant::now();
                let event = match msg {
                    Message::Text(text) => match ServerMessage::from_json(text.as_str()) {
                        Ok(m) => SocketEvent::Message(m),
                        Err(e) => {
                            warn!(error = %e, message = %truncate(text.as_str(), 512), "skipping unparsable ComfyUI message");
                            continue;
                        }
                    },
                    Message::Binary(data) => {
                        let len = data.len();
                        match BinaryFrame::parse(data) {
                            Ok(f) => SocketEvent::Frame(f),
                            Err(e) => {
                                warn!(error = %e, len, "skipping unparsable ComfyUI binary frame");
                                continue;
                            }
                        }
                    }
                    Message::Close(frame) => {
                        let (code, reason) = frame
                            .map(|f| (u16::from(f.code), f.reason.as_str().to_owned()))
                            .unwrap_or((1005, String::new()));
                        break CloseReason::ByServer { code, reason };
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                };
                if tx.send(event).await.is_err() {
                    // Nobody listens any more.
                    let _ = ws.close(None).await;
                    return;
                }
            }
        }
    };
    debug!(?reason, "ComfyUI socket closed");
    let _ = tx.send(SocketEvent::Closed(reason)).await;
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Exponential backoff for [`connect_with_backoff`].
#[derive(Debug, Clone)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Give up after this many attempts (`None`: never).
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// Delay before attempt `attempt` (0-based; attempt 0 has none).
    pub fn delay(&self, attempt: u32) -> Duration {
        if attempt == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1).min(20))
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// Connects, retrying retryable failures with exponential backoff; returns the first
/// non-retryable error, or the last error once `max_attempts` is reached.
pub async fn connect_with_backoff(
    base: &Url,
    client_id: &str,
    config: &SocketConfig,
    backoff: &Backoff,
) -> Result<(ComfySocket, mpsc::Receiver<SocketEvent>), SocketError> {
    let mut attempt = 0u32;
    loop {
        tokio::time::sleep(backoff.delay(attempt)).await;
        attempt += 1;
        match ComfySocket::connect(base, client_id, config).await {
            Ok(pair) => return Ok(pair),
            Err(e) if !e.is_retryable() => return Err(e),
            Err(e) if backoff.max_attempts.is_some_and(|m| attempt >= m) => return Err(e),
            Err(e) => debug!(error = %e, attempt, "ComfyUI socket connect failed, retrying"),
        }
    }
}
