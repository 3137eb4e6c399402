//! `GET /ws?clientId=…`: registration by client id, the initial `status` (and `executing`
//! on reconnect), the feature-flag handshake, and the writer fed by the executor.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::state::{Instance, Out, Socket};

pub(crate) async fn handler(
    State(inst): State<Arc<Instance>>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let sid = q
        .get("clientId")
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    ws.on_upgrade(move |socket| serve(inst, sid, socket))
}

async fn serve(inst: Arc<Instance>, sid: String, socket: WebSocket) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let conn = {
        let mut st = inst.lock();
        let conn = st.next_conn;
        st.next_conn += 1;
        st.sockets.insert(
            sid.clone(),
            Socket {
                conn,
                tx,
                preview_metadata: false,
                silent: false,
            },
        );
        let info = st.queue_info();
        st.send_json("status", json!({"status": info, "sid": sid}), Some(&sid));
        if st.client_id.as_deref() == Some(sid.as_str())
            && let Some(node) = st.last_node_id.clone()
        {
            st.send_json("executing", json!({"node": node}), Some(&sid));
        }
        conn
    };
    let (mut sink, mut stream) = socket.split();
    let mut first = true;
    let mut registered = true;
    loop {
        tokio::select! {
            () = inst.cancel.cancelled() => return,
            out = rx.recv(), if registered => match out {
                Some(Out::Msg(m)) => {
                    if sink.send(m).await.is_err() {
                        break;
                    }
                }
                Some(Out::Drop) => return,
                // Replaced by a newer socket with the same client id: it stays open
                // but nothing is routed to it any more, as in ComfyUI.
                None => registered = false,
            },
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if first {
                        feature_flags(&inst, &sid, conn, t.as_str());
                    }
                    first = false;
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => first = false,
            },
        }
    }
    let mut st = inst.lock();
    if st.sockets.get(&sid).is_some_and(|s| s.conn == conn) {
        st.sockets.remove(&sid);
    }
}

fn feature_flags(inst: &Instance, sid: &str, conn: u64, text: &str) {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return;
    };
    if v.get("type").and_then(Value::as_str) != Some("feature_flags") {
        return;
    }
    let wants = v
        .get("data")
        .and_then(|d| d.get("supports_preview_metadata"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let max = inst.core.config().max_upload_size;
    let mut st = inst.lock();
    if let Some(s) = st.sockets.get_mut(sid).filter(|s| s.conn == conn) {
        s.preview_metadata = wants;
    }
    st.send_json(
        "feature_flags",
        json!({"supports_preview_metadata": true, "max_upload_size": max}),
        Some(sid),
    );
}
