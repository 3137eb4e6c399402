use std::time::{Duration, Instant};

use comfy_sim::{SimConfig, SimHandle, Simulator};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

pub const RECORDINGS: &str = "/work/shared/comfyui-0.3.64";

pub async fn sim() -> SimHandle {
    sim_with(SimConfig::default()).await
}

pub async fn sim_with(cfg: SimConfig) -> SimHandle {
    let h = Simulator::start(cfg).await.unwrap();
    assert!(h.wait_up(Duration::from_secs(5)).await);
    h
}

pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Ws {
    pub s: WsStream,
}

#[derive(Debug, Clone)]
pub enum Frame {
    Json(Value),
    Bin(Vec<u8>),
    Closed,
}

impl Frame {
    pub fn kind(&self) -> String {
        match self {
            Frame::Json(v) => v["type"].as_str().unwrap().to_owned(),
            Frame::Bin(b) => format!("binary{}", u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
            Frame::Closed => "closed".into(),
        }
    }
    pub fn json(&self) -> &Value {
        match self {
            Frame::Json(v) => v,
            _ => panic!("not json: {self:?}"),
        }
    }
}

impl Ws {
    pub async fn connect(h: &SimHandle, client_id: Option<&str>) -> Ws {
        let url = match client_id {
            Some(c) => h.ws_url(c),
            None => format!("ws://{}/ws", h.addr()),
        };
        let (s, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Ws { s }
    }

    pub async fn send_json(&mut self, v: Value) {
        self.s
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    /// Next frame, or `None` after `wait` without one.
    pub async fn next(&mut self, wait: Duration) -> Option<Frame> {
        loop {
            let m = tokio::time::timeout(wait, self.s.next()).await.ok()?;
            return Some(match m {
                Some(Ok(Message::Text(t))) => Frame::Json(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Binary(b))) => Frame::Bin(b.to_vec()),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Frame::Closed,
                Some(Ok(_)) => continue,
            });
        }
    }

    /// Frames until `executing {node: null, prompt_id}` (inclusive).
    pub async fn until_done(&mut self, prompt_id: &str) -> Vec<Frame> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = vec![];
        while Instant::now() < deadline {
            let Some(f) = self.next(Duration::from_secs(10)).await else {
                break;
            };
            let done = matches!(&f, Frame::Json(v) if v["type"] == "executing" && v["data"]["node"].is_null() && v["data"]["prompt_id"] == prompt_id);
            let closed = matches!(f, Frame::Closed);
            out.push(f);
            if done || closed {
                return out;
            }
        }
        panic!("prompt {prompt_id} did not finish: {:?}", kinds(&out));
    }
}

pub fn kinds(frames: &[Frame]) -> Vec<String> {
    frames.iter().map(Frame::kind).collect()
}

pub async fn post(h: &SimHandle, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", h.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

pub async fn get(h: &SimHandle, path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{}{path}", h.base_url()))
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

pub async fn submit(h: &SimHandle, prompt: Value, client_id: Option<&str>) -> String {
    let mut body = json!({"prompt": prompt});
    if let Some(c) = client_id {
        body["client_id"] = json!(c);
    }
    let (status, v) = post(h, "/prompt", body).await;
    assert_eq!(status, 200, "{v}");
    v["prompt_id"].as_str().unwrap().to_owned()
}

pub fn invert(prefix: &str, size: u32) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}
    })
}

pub fn slow(steps: u32, step_ms: u32) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PeerSlowProgress", "inputs": {"image": ["1", 0], "steps": steps, "step_ms": step_ms, "send_previews": true, "preview_format": "JPEG"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "peer/probe"}}
    })
}

/// Polls `f` until it returns `Some` or the deadline passes.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Message types of a recorded transcript (text and binary), from the first POST on.
pub fn recorded_kinds(name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("{RECORDINGS}/transcripts/{name}")).unwrap();
    let mut out = vec![];
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        match v["kind"].as_str().unwrap() {
            "text" => out.push(v["msg"]["type"].as_str().unwrap().to_owned()),
            "binary" => out.push(format!("binary{}", v["event"])),
            _ => {}
        }
    }
    out
}
