//! HTTP and WebSocket shapes that only a live peer exercises, against a tiny axum mock
//! (not a ComfyUI simulator: each route answers exactly what the real server recorded).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use url::Url;
use uuid::Uuid;

use crate::comfy::socket::{ComfySocket, SocketConfig, ws_url};
use crate::comfy::{
    BinaryFrame, ClientConfig, CloseReason, ComfyClient, ComfyError, OutputFile, ServerMessage,
    SocketEvent, SubmitError, UploadImage,
};

/// A multipart field: file name, content type, data.
type Field = (Option<String>, Option<String>, Vec<u8>);

#[derive(Default)]
struct Seen {
    uploads: Vec<BTreeMap<String, Field>>,
    upload_headers: Vec<HeaderMap>,
    prompts: Vec<Value>,
    posts: Vec<(String, Value)>,
    view_query: Vec<BTreeMap<String, String>>,
    ws_first: Vec<String>,
    ws_client_id: Vec<String>,
}

type Shared = Arc<Mutex<Seen>>;

const REJECTION: &str = r#"{"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}}, "node_errors": {"1": {"errors": [{"type": "value_smaller_than_min", "message": "Value 0 smaller than min of 1", "details": "width", "extra_info": {"input_name": "width"}}], "dependent_outputs": ["3"], "class_type": "EmptyImage"}}}"#;

async fn upload(State(seen): State<Shared>, headers: HeaderMap, mut form: Multipart) -> Response {
    let mut fields = BTreeMap::new();
    while let Some(field) = form.next_field().await.unwrap() {
        let name = field.name().unwrap().to_owned();
        let file_name = field.file_name().map(str::to_owned);
        let content_type = field.content_type().map(str::to_owned);
        let data = field.bytes().await.unwrap().to_vec();
        fields.insert(name, (file_name, content_type, data));
    }
    let name = fields["image"].0.clone().unwrap();
    let subfolder = String::from_utf8(fields["subfolder"].2.clone()).unwrap();
    let mut s = seen.lock().unwrap();
    s.uploads.push(fields);
    s.upload_headers.push(headers);
    axum::Json(json!({"name": name, "subfolder": subfolder, "type": "input"})).into_response()
}

async fn prompt(State(seen): State<Shared>, axum::Json(body): axum::Json<Value>) -> Response {
    seen.lock().unwrap().prompts.push(body.clone());
    if body["prompt"]["1"]["inputs"]["width"] == 0 {
        return (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "application/json")],
            REJECTION,
        )
            .into_response();
    }
    let id = body["prompt_id"].as_str().unwrap_or("generated").to_owned();
    axum::Json(json!({"prompt_id": id, "number": 4, "node_errors": {}})).into_response()
}

async fn history(Path(id): Path<String>) -> Response {
    let raw = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/comfyui-0.3.64/history/10_audio.json"),
    )
    .unwrap();
    if id == "5d1f8e23-0221-49e1-a62b-f63d35b0022c" {
        ([(header::CONTENT_TYPE, "application/json")], raw).into_response()
    } else {
        axum::Json(json!({})).into_response()
    }
}

async fn view(State(seen): State<Shared>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    seen.lock().unwrap().view_query.push(q.clone());
    if q.get("filename").map(String::as_str) == Some("stall.bin") {
        let first =
            futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"abc")) });
        let stall = futures::stream::once(async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(Bytes::new())
        });
        return Response::new(Body::from_stream(first.chain(stall)));
    }
    if q.get("filename").map(String::as_str) != Some("audio_00001_.flac") {
        return StatusCode::NOT_FOUND.into_response();
    }
    let chunks = (0..64u8).map(|i| Ok::<_, std::io::Error>(Bytes::from(vec![i; 1024])));
    Response::builder()
        .header(header::CONTENT_TYPE, "audio/flac")
        .header(header::CONTENT_LENGTH, 64 * 1024)
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .unwrap()
}

fn record_post(path: &'static str) -> axum::routing::MethodRouter<Shared> {
    post(move |State(seen): State<Shared>, body: Bytes| async move {
        let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
        seen.lock().unwrap().posts.push((path.to_owned(), v));
        StatusCode::OK
    })
}

async fn ws(
    State(seen): State<Shared>,
    Query(q): Query<BTreeMap<String, String>>,
    up: WebSocketUpgrade,
) -> Response {
    let client_id = q.get("clientId").cloned().unwrap_or_default();
    up.on_upgrade(move |socket| ws_session(socket, seen, client_id))
}

async fn ws_session(mut socket: WebSocket, seen: Shared, client_id: String) {
    let status = json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id}});
    socket
        .send(WsMessage::Text(status.to_string().into()))
        .await
        .unwrap();
    let first = match socket.recv().await {
        Some(Ok(WsMessage::Text(t))) => t.to_string(),
        other => format!("{other:?}"),
    };
    seen.lock().unwrap().ws_first.push(first);
    seen.lock().unwrap().ws_client_id.push(client_id.clone());
    if client_id == "silent" {
        // Never read again: pings go unanswered.
        tokio::time::sleep(Duration::from_secs(30)).await;
        return;
    }
    let msgs = [
        json!({"type": "feature_flags", "data": {"supports_preview_metadata": true, "max_upload_size": 104857600}}),
        json!({"type": "progress", "data": {"value": "not a number", "max": 1}}),
        json!({"type": "my.custom", "data": [1, 2]}),
        json!({"type": "executing", "data": {"node": null, "prompt_id": "p"}}),
    ];
    for m in msgs {
        socket
            .send(WsMessage::Text(m.to_string().into()))
            .await
            .unwrap();
    }
    socket
        .send(WsMessage::Text("{not json".into()))
        .await
        .unwrap();
    let mut text = 3u32.to_be_bytes().to_vec();
    text.extend(1u32.to_be_bytes());
    text.extend(b"7hello");
    socket.send(WsMessage::Binary(text.into())).await.unwrap();
    socket
        .send(WsMessage::Binary(vec![0, 0, 0, 4, 0, 0, 0, 50].into()))
        .await
        .unwrap();
    socket
        .send(WsMessage::Ping(Bytes::from_static(b"hi")))
        .await
        .unwrap();
    socket
        .send(WsMessage::Close(Some(axum::extract::ws::CloseFrame {
            code: 1001,
            reason: "bye".into(),
        })))
        .await
        .unwrap();
    // Drain until the client answers the close.
    while let Some(Ok(_)) = socket.recv().await {}
}

async fn start() -> (Url, Shared) {
    let seen = Shared::default();
    let app = Router::new()
        .route("/upload/image", post(upload))
        .route("/prompt", post(prompt))
        .route("/history/{id}", get(history))
        .route("/view", get(view))
        .route("/interrupt", record_post("/interrupt"))
        .route("/queue", record_post("/queue"))
        .route("/free", record_post("/free"))
        .route(
            "/system_stats",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
        )
        .route(
            "/object_info",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "{}"
            }),
        )
        .route("/features", get(|| async { "[1,2]" }))
        .route("/ws", any(ws))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (Url::parse(&format!("http://{addr}/")).unwrap(), seen)
}

fn client(base: Url) -> ComfyClient {
    let config = ClientConfig {
        request_timeout: Duration::from_millis(500),
        ..ClientConfig::default()
    };
    ComfyClient::new(base, config).unwrap()
}

#[tokio::test]
async fn upload_streams_multipart_fields() {
    let (base, seen) = start().await;
    let c = client(base);
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        (0..10u8).map(|i| Ok(Bytes::from(vec![i; 4096]))).collect();
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let up = UploadImage {
        name: "job 1.png".into(),
        subfolder: "comfyq/abc".into(),
        overwrite: true,
        content_type: "image/png".into(),
        content_length: None,
    };
    let got = c.upload_image(&up, body).await.unwrap();
    assert_eq!(got.name, "job 1.png");
    assert_eq!(got.subfolder, "comfyq/abc");
    assert_eq!(got.folder_type, "input");
    assert_eq!(got.input_reference(), "comfyq/abc/job 1.png");

    let s = seen.lock().unwrap();
    let f = &s.uploads[0];
    let (file_name, ctype, data) = &f["image"];
    assert_eq!(file_name.as_deref(), Some("job 1.png"));
    assert_eq!(ctype.as_deref(), Some("image/png"));
    assert_eq!(data.len(), 40960);
    assert_eq!(data[4096 * 3], 3);
    assert_eq!(f["type"].2, b"input");
    assert_eq!(f["subfolder"].2, b"comfyq/abc");
    assert_eq!(f["overwrite"].2, b"true");
    // A body of unknown length is sent chunked, not buffered into a Content-Length.
    let h = &s.upload_headers[0];
    assert!(h.get(header::CONTENT_LENGTH).is_none());
    assert_eq!(h.get(header::TRANSFER_ENCODING).unwrap(), "chunked");
}

#[tokio::test]
async fn upload_with_known_length_sets_content_length() {
    let (base, seen) = start().await;
    let c = client(base);
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![Ok(Bytes::from_static(b"png!"))];
    let up = UploadImage {
        name: "a.png".into(),
        subfolder: String::new(),
        overwrite: false,
        content_type: "image/png".into(),
        content_length: Some(4),
    };
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    c.upload_image(&up, body).await.unwrap();
    let s = seen.lock().unwrap();
    assert!(s.upload_headers[0].get(header::CONTENT_LENGTH).is_some());
    assert_eq!(s.uploads[0]["overwrite"].2, b"false");
    assert_eq!(s.uploads[0]["image"].2, b"png!");
}

#[tokio::test]
async fn submit_history_view_and_controls() {
    let (base, seen) = start().await;
    let c = client(base);
    let id = Uuid::new_v4();
    let ok = c
        .submit_prompt(
            &json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}}),
            "runner-1",
            id,
            Some(&json!({"extra_pnginfo": {"job": "j"}})),
        )
        .await
        .unwrap();
    assert_eq!(ok.prompt_id, id.to_string());
    assert_eq!(ok.number, 4.0);
    {
        let s = seen.lock().unwrap();
        let sent = &s.prompts[0];
        assert_eq!(sent["client_id"], "runner-1");
        assert_eq!(sent["prompt_id"], id.to_string());
        assert_eq!(sent["extra_data"]["extra_pnginfo"]["job"], "j");
        assert!(sent.get("front").is_none());
    }
    let err = c
        .submit_prompt(
            &json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 0}}}),
            "runner-1",
            Uuid::new_v4(),
            None,
        )
        .await
        .unwrap_err();
    let SubmitError::Rejected(r) = &err else {
        panic!("{err:?}")
    };
    assert!(!err.is_retryable());
    assert_eq!(r.node_errors["1"].class_type, "EmptyImage");

    assert!(c.history("unknown").await.unwrap().is_none());
    let h = c
        .history("5d1f8e23-0221-49e1-a62b-f63d35b0022c")
        .await
        .unwrap()
        .unwrap();
    let (_, file) = h.output_files().next().unwrap();
    let file: OutputFile = file.clone();
    let v = c.view(&file).await.unwrap();
    assert_eq!(v.content_length, Some(65536));
    assert_eq!(v.content_type.as_deref(), Some("audio/flac"));
    let mut total = 0;
    let mut chunks = 0;
    let mut stream = v.stream;
    while let Some(chunk) = stream.next().await {
        total += chunk.unwrap().len();
        chunks += 1;
    }
    assert_eq!(total, 65536);
    assert!(chunks > 1, "body arrived in one piece: not streamed");
    {
        let s = seen.lock().unwrap();
        let q = &s.view_query[0];
        assert_eq!(q["filename"], "audio_00001_.flac");
        assert_eq!(q["subfolder"], "peer");
        assert_eq!(q["type"], "output");
    }
    let missing = OutputFile {
        filename: "nope.png".into(),
        ..file
    };
    assert!(matches!(
        c.view(&missing).await,
        Err(ComfyError::NotFound(_))
    ));

    c.interrupt(Some("p1")).await.unwrap();
    c.interrupt(None).await.unwrap();
    c.delete_queued(&["a", "b"]).await.unwrap();
    c.free(true, false).await.unwrap();
    let s = seen.lock().unwrap();
    assert_eq!(
        s.posts,
        vec![
            ("/interrupt".to_owned(), json!({"prompt_id": "p1"})),
            ("/interrupt".to_owned(), json!({})),
            ("/queue".to_owned(), json!({"delete": ["a", "b"]})),
            (
                "/free".to_owned(),
                json!({"unload_models": true, "free_memory": false})
            ),
        ]
    );
}

#[tokio::test]
async fn errors_are_classified() {
    let (base, _) = start().await;
    let c = client(base.clone());
    let e = c.system_stats().await.unwrap_err();
    assert!(
        matches!(e, ComfyError::Server { .. }) && e.is_retryable(),
        "{e:?}"
    );
    let e = c.object_info().await.unwrap_err();
    assert!(
        matches!(e, ComfyError::Timeout(_)) && e.is_retryable(),
        "{e:?}"
    );
    let e = c.features().await.unwrap_err();
    assert!(
        matches!(e, ComfyError::Protocol(_)) && !e.is_retryable(),
        "{e:?}"
    );
    let e = c.models("nope").await.unwrap_err();
    assert!(
        matches!(e, ComfyError::NotFound(_)) && !e.is_retryable(),
        "{e:?}"
    );

    // Nothing listens on this port any more.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let dead = client(Url::parse(&format!("http://{addr}/")).unwrap());
    let e = dead.queue().await.unwrap_err();
    assert!(
        matches!(e, ComfyError::Unreachable(_)) && e.is_retryable(),
        "{e:?}"
    );
    let e = dead
        .submit_prompt(&json!({}), "c", Uuid::new_v4(), None)
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "{e:?}");

    assert!(ComfyClient::new(Url::parse("ftp://x/").unwrap(), ClientConfig::default()).is_err());
}

#[test]
fn urls_keep_prefix_and_encode() {
    let c = ComfyClient::new(
        Url::parse("http://h:8188/comfy/").unwrap(),
        ClientConfig::default(),
    )
    .unwrap();
    assert_eq!(
        c.endpoint(&["history", "a/b c"]).as_str(),
        "http://h:8188/comfy/history/a%2Fb%20c"
    );
    let c = ComfyClient::new(
        Url::parse("http://h:8188").unwrap(),
        ClientConfig::default(),
    )
    .unwrap();
    assert_eq!(c.endpoint(&["prompt"]).as_str(), "http://h:8188/prompt");
    assert_eq!(
        ws_url(&Url::parse("https://h/comfy").unwrap(), "r 1")
            .unwrap()
            .as_str(),
        "wss://h/comfy/ws?clientId=r+1"
    );
    assert_eq!(
        ws_url(&Url::parse("http://127.0.0.1:8188/").unwrap(), "abc")
            .unwrap()
            .as_str(),
        "ws://127.0.0.1:8188/ws?clientId=abc"
    );
}

#[tokio::test]
async fn socket_handshakes_parses_and_skips_bad_messages() {
    let (base, seen) = start().await;
    let (sock, mut rx) = ComfySocket::connect(&base, "runner-7", &SocketConfig::default())
        .await
        .unwrap();
    assert_eq!(sock.client_id(), "runner-7");
    let mut events = Vec::new();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
    {
        events.push(ev);
    }
    {
        let s = seen.lock().unwrap();
        assert_eq!(s.ws_client_id, vec!["runner-7".to_owned()]);
        let first: Value = serde_json::from_str(&s.ws_first[0]).unwrap();
        assert_eq!(
            first,
            json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}})
        );
    }
    let kinds: Vec<String> = events
        .iter()
        .map(|e| match e {
            SocketEvent::Message(m) => m.kind().to_owned(),
            SocketEvent::Frame(f) => format!("frame{}", f.event()),
            SocketEvent::Closed(r) => format!("closed {r:?}"),
        })
        .collect();
    // The bad `progress`, the non-JSON text and the truncated binary frame are skipped.
    assert_eq!(
        kinds,
        vec![
            "status",
            "feature_flags",
            "my.custom",
            "executing",
            "frame3",
            "closed ByServer { code: 1001, reason: \"bye\" }",
        ]
    );
    assert!(
        matches!(&events[0], SocketEvent::Message(ServerMessage::Status(s)) if s.sid.as_deref() == Some("runner-7"))
    );
    assert_eq!(
        events[4],
        SocketEvent::Frame(BinaryFrame::Text {
            node_id: "7".into(),
            text: "hello".into()
        })
    );
    assert!(
        sock.is_closed()
            || tokio::time::timeout(Duration::from_secs(1), async {
                while !sock.is_closed() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn socket_detects_a_silent_peer_and_closes_on_request() {
    let (base, _) = start().await;
    let config = SocketConfig {
        ping_interval: Some(Duration::from_millis(50)),
        idle_timeout: Duration::from_millis(200),
        ..SocketConfig::default()
    };
    let (_sock, mut rx) = ComfySocket::connect(&base, "silent", &config)
        .await
        .unwrap();
    let mut last = None;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
    {
        last = Some(ev);
    }
    assert!(
        matches!(last, Some(SocketEvent::Closed(CloseReason::Idle(_)))),
        "{last:?}"
    );

    // Client-side close.
    let (sock, mut rx) = ComfySocket::connect(&base, "silent", &SocketConfig::default())
        .await
        .unwrap();
    let first = rx.recv().await.unwrap();
    assert!(matches!(
        first,
        SocketEvent::Message(ServerMessage::Status(_))
    ));
    sock.close().await;
    assert_eq!(
        rx.recv().await,
        Some(SocketEvent::Closed(CloseReason::ByClient))
    );
    assert_eq!(rx.recv().await, None);
}

#[tokio::test]
async fn socket_connect_failures() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let base = Url::parse(&format!("http://{addr}/")).unwrap();
    let e = ComfySocket::connect(&base, "c", &SocketConfig::default())
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    let backoff = crate::comfy::Backoff {
        initial: Duration::from_millis(1),
        max: Duration::from_millis(4),
        max_attempts: Some(3),
    };
    assert_eq!(backoff.delay(0), Duration::ZERO);
    assert_eq!(backoff.delay(2), Duration::from_millis(2));
    assert_eq!(backoff.delay(30), Duration::from_millis(4));
    let e = crate::comfy::connect_with_backoff(&base, "c", &SocketConfig::default(), &backoff)
        .await
        .unwrap_err();
    assert!(e.is_retryable());
    // A server without /ws refuses the upgrade: not retryable.
    let (base, _) = start().await;
    let mut no_ws = base.clone();
    no_ws.set_path("/nowhere/");
    let e = ComfySocket::connect(&no_ws, "c", &SocketConfig::default())
        .await
        .unwrap_err();
    assert!(!e.is_retryable(), "{e:?}");
}
