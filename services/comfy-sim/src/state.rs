//! What one simulated ComfyUI process holds in memory (all lost on a crash): the queue,
//! the running prompt, history, the output cache and the WebSocket registry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Message;
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::queue::{Heap, QueueItem};
use crate::server::Core;

/// What the socket writer task is told.
#[derive(Debug)]
pub(crate) enum Out {
    Msg(Message),
    /// Drop the connection without a closing handshake.
    Drop,
}

#[derive(Debug)]
pub(crate) struct Socket {
    pub conn: u64,
    pub tx: mpsc::UnboundedSender<Out>,
    pub preview_metadata: bool,
    pub silent: bool,
}

/// Cached result of a node: its ui output, if any.
#[derive(Debug, Clone)]
pub(crate) struct Cached {
    pub ui: Option<Value>,
    pub outputs: Vec<crate::executor::Val>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub pending: Heap,
    pub running: Option<QueueItem>,
    pub history: Vec<(String, Value)>,
    pub number: i64,
    pub interrupt: bool,
    pub client_id: Option<String>,
    pub last_node_id: Option<String>,
    pub cache: HashMap<String, Cached>,
    pub sockets: HashMap<String, Socket>,
    pub next_conn: u64,
}

/// One process lifetime of the simulated server.
#[derive(Debug)]
pub(crate) struct Instance {
    pub core: Arc<Core>,
    pub cancel: CancellationToken,
    pub wake: Notify,
    state: Mutex<State>,
}

impl Instance {
    pub(crate) fn new(core: Arc<Core>, cancel: CancellationToken) -> Self {
        Self {
            core,
            cancel,
            wake: Notify::new(),
            state: Mutex::new(State::default()),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl State {
    pub(crate) fn queue_remaining(&self) -> usize {
        self.pending.len() + usize::from(self.running.is_some())
    }

    pub(crate) fn queue_info(&self) -> Value {
        json!({"exec_info": {"queue_remaining": self.queue_remaining()}})
    }

    fn deliver(&mut self, sid: Option<&str>, make: impl Fn(&Socket) -> Option<Message>) {
        match sid {
            Some(sid) => {
                if let Some(s) = self.sockets.get(sid)
                    && !s.silent
                    && let Some(m) = make(s)
                {
                    let _ = s.tx.send(Out::Msg(m));
                }
            }
            None => {
                for s in self.sockets.values() {
                    if !s.silent
                        && let Some(m) = make(s)
                    {
                        let _ = s.tx.send(Out::Msg(m));
                    }
                }
            }
        }
    }

    /// `send_sync(event, data, sid)`: to one socket, or to all when `sid` is `None`.
    pub(crate) fn send_json(&mut self, event: &str, data: Value, sid: Option<&str>) {
        let mut m = Map::new();
        m.insert("type".into(), json!(event));
        m.insert("data".into(), data);
        let text = crate::pyfmt::dumps(&Value::Object(m));
        self.deliver(sid, |_| Some(Message::Text(text.clone().into())));
    }

    /// A binary frame to one socket or all.
    pub(crate) fn send_bytes(&mut self, bytes: Vec<u8>, sid: Option<&str>) {
        let b = bytes::Bytes::from(bytes);
        self.deliver(sid, |_| Some(Message::Binary(b.clone())));
    }

    /// A preview: event 4 to a client that did the feature-flag handshake, else event 1.
    pub(crate) fn send_preview(&mut self, sid: Option<&str>, legacy: Vec<u8>, meta: Vec<u8>) {
        let legacy = bytes::Bytes::from(legacy);
        let meta = bytes::Bytes::from(meta);
        self.deliver(sid, |s| {
            Some(Message::Binary(if s.preview_metadata {
                meta.clone()
            } else {
                legacy.clone()
            }))
        });
    }

    /// Whether the socket of `sid` asked for preview metadata.
    pub(crate) fn supports_metadata(&self, sid: Option<&str>) -> bool {
        sid.and_then(|s| self.sockets.get(s))
            .is_some_and(|s| s.preview_metadata)
    }

    /// `server.queue_updated()`: a status to everyone.
    pub(crate) fn queue_updated(&mut self) {
        let info = self.queue_info();
        self.send_json("status", json!({"status": info}), None);
    }

    pub(crate) fn history_get(&self, id: &str) -> Option<&Value> {
        self.history.iter().find(|(k, _)| k == id).map(|(_, v)| v)
    }
}
