//! The runner's one WebSocket to ComfyUI, shared by every job it holds:
//! reconnects with backoff and routes each message to the job whose prompt
//! it concerns. Messages without a prompt id (previews, the `executing`
//! replayed after a reconnect) belong to the prompt executing now.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::comfy::{
    Backoff, BinaryFrame, ServerMessage, SocketConfig, SocketEvent, connect_with_backoff,
};

/// What a job following its prompt receives.
#[derive(Debug)]
pub enum PromptEvent {
    Message(ServerMessage),
    Frame(BinaryFrame),
    /// The socket closed: events may be missed until it is back.
    SocketLost,
    /// The socket is back; whatever was missed must be reconciled.
    SocketRestored,
}

#[derive(Debug, Default)]
struct Routes {
    by_prompt: HashMap<String, mpsc::UnboundedSender<PromptEvent>>,
    executing: Option<String>,
}

#[derive(Debug)]
struct Shared {
    // A std mutex: held only to look up a sender, never across an await.
    routes: Mutex<Routes>,
    connected: AtomicBool,
    /// Wakes the socket task to drop the current socket and open a new one.
    reconnect: Notify,
}

#[derive(Clone, Debug)]
pub struct ComfyLink {
    shared: Arc<Shared>,
}

/// A job's subscription to its prompt's events; unsubscribes on drop.
#[derive(Debug)]
pub struct PromptEvents {
    pub receiver: mpsc::UnboundedReceiver<PromptEvent>,
    prompt_id: String,
    shared: Arc<Shared>,
}

impl Drop for PromptEvents {
    fn drop(&mut self) {
        if let Ok(mut routes) = self.shared.routes.lock() {
            routes.by_prompt.remove(&self.prompt_id);
        }
    }
}

impl ComfyLink {
    /// Starts the socket task; it runs until `shutdown`.
    pub fn start(
        base: Url,
        client_id: String,
        config: SocketConfig,
        shutdown: CancellationToken,
    ) -> Self {
        let shared = Arc::new(Shared {
            routes: Mutex::new(Routes::default()),
            connected: AtomicBool::new(false),
            reconnect: Notify::new(),
        });
        let link = Self { shared };
        let task_link = link.clone();
        tokio::spawn(async move { task_link.run(base, client_id, config, shutdown).await });
        link
    }

    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// Drops the current socket and opens a fresh one (every follower sees
    /// `SocketLost` then `SocketRestored`). For a socket that is open, even
    /// answering pings, but no longer delivers ComfyUI's messages: only a new
    /// connection can tell. A no-op while no socket is open.
    pub fn reconnect(&self) {
        self.shared.reconnect.notify_waiters();
    }

    /// Subscribes to `prompt_id`'s events. Subscribe before submitting the
    /// prompt, so no event can arrive unrouted.
    pub fn follow(&self, prompt_id: &str) -> PromptEvents {
        let (sender, receiver) = mpsc::unbounded_channel();
        if let Ok(mut routes) = self.shared.routes.lock() {
            routes.by_prompt.insert(prompt_id.to_owned(), sender);
        }
        PromptEvents {
            receiver,
            prompt_id: prompt_id.to_owned(),
            shared: self.shared.clone(),
        }
    }

    async fn run(
        &self,
        base: Url,
        client_id: String,
        config: SocketConfig,
        shutdown: CancellationToken,
    ) {
        let backoff = Backoff::default();
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                connected = connect_with_backoff(&base, &client_id, &config, &backoff) => connected,
            };
            let (socket, mut events) = match connected {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::error!(%error, "cannot open ComfyUI's WebSocket; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff.max) => continue,
                    }
                }
            };
            self.shared.connected.store(true, Ordering::Release);
            self.broadcast(|| PromptEvent::SocketRestored);
            tracing::info!("ComfyUI WebSocket connected");
            // Registered now, so a request made while a message is being
            // routed is not missed.
            let reconnect = self.shared.reconnect.notified();
            tokio::pin!(reconnect);
            reconnect.as_mut().enable();
            loop {
                let event = tokio::select! {
                    _ = shutdown.cancelled() => {
                        socket.close().await;
                        return;
                    }
                    _ = reconnect.as_mut() => {
                        tracing::warn!("replacing ComfyUI's WebSocket on request");
                        socket.close().await;
                        break;
                    }
                    event = events.recv() => event,
                };
                match event {
                    Some(SocketEvent::Message(message)) => self.route_message(message),
                    Some(SocketEvent::Frame(frame)) => self.route_frame(frame),
                    Some(SocketEvent::Closed(reason)) => {
                        tracing::warn!(?reason, "ComfyUI WebSocket closed; reconnecting");
                        break;
                    }
                    None => break,
                }
            }
            self.shared.connected.store(false, Ordering::Release);
            self.broadcast(|| PromptEvent::SocketLost);
        }
    }

    fn broadcast(&self, event: impl Fn() -> PromptEvent) {
        if let Ok(routes) = self.shared.routes.lock() {
            for sender in routes.by_prompt.values() {
                let _ = sender.send(event());
            }
        }
    }

    fn route_message(&self, message: ServerMessage) {
        let Ok(mut routes) = self.shared.routes.lock() else {
            return;
        };
        let prompt_id = match &message {
            ServerMessage::ExecutionStart(start) => {
                routes.executing = Some(start.prompt_id.clone());
                Some(start.prompt_id.clone())
            }
            ServerMessage::Status(_) | ServerMessage::FeatureFlags(_) => None,
            other => other
                .prompt_id()
                .map(str::to_owned)
                .or_else(|| routes.executing.clone()),
        };
        if let ServerMessage::Executing(executing) = &message
            && executing.node.is_none()
        {
            routes.executing = None;
        }
        if let Some(sender) = prompt_id.and_then(|id| routes.by_prompt.get(&id)) {
            let _ = sender.send(PromptEvent::Message(message));
        }
    }

    fn route_frame(&self, frame: BinaryFrame) {
        let Ok(routes) = self.shared.routes.lock() else {
            return;
        };
        let prompt_id = match &frame {
            BinaryFrame::PreviewWithMetadata { metadata, .. } => metadata
                .prompt_id
                .clone()
                .or_else(|| routes.executing.clone()),
            _ => routes.executing.clone(),
        };
        if let Some(sender) = prompt_id.and_then(|id| routes.by_prompt.get(&id)) {
            let _ = sender.send(PromptEvent::Frame(frame));
        }
    }
}
