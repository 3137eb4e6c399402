//! The ComfyUI-compatible API against the recordings of a real ComfyUI
//! 0.3.64: a recorded client conversation replayed against ingress (the
//! simulator behind a runner) gets the same messages in the same order with
//! the same JSON shapes, and `/view` the same bytes the runner's ComfyUI
//! wrote. Plus tenant isolation, authentication, uploads, interrupts,
//! ComfyUI's validation answers and a Python client.

use std::time::Duration;

use comfyq_tests::stack::{self, StackOptions, TestStack};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const RECORDINGS: &str = "../../shared/comfyui-0.3.64";

fn recording(path: &str) -> String {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(RECORDINGS)
        .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// One frame as a client sees it, normalised for comparison.
#[derive(Debug, Clone, PartialEq)]
enum Heard {
    Text(Value),
    /// Event 1 (image type), 3 (node, text) or 4 (metadata), image bytes aside.
    Binary(Value),
}

/// Ids, times, file names, the fleet's queue count and upload limit, and a failed node's
/// Python state differ from run to run; everything else is compared as sent.
fn normalise(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                match key.as_str() {
                    "prompt_id" | "sid" => *item = json!("<id>"),
                    "timestamp" => *item = json!("<time>"),
                    "filename" | "subfolder" => *item = json!("<file>"),
                    "queue_remaining" | "max_upload_size" => *item = json!("<n>"),
                    // Python's reprs of tensors and a set's order.
                    "traceback" | "current_inputs" | "current_outputs" => {
                        *item = json!("<runtime>")
                    }
                    _ => normalise(item),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalise),
        // ComfyUI's floats (1.0) and ints (1) are both kept as they are,
        // except that serde_json tells them apart: compare by value.
        Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                *value = json!(f);
            }
        }
        _ => {}
    }
}

fn decode_binary(bytes: &[u8]) -> Value {
    let word = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(u32::MAX)
    };
    let mut decoded = match word(0) {
        1 => json!({"event": 1, "image_type": word(4)}),
        3 => {
            let len = word(4) as usize;
            let node = String::from_utf8_lossy(&bytes[8..8 + len]).into_owned();
            let text = String::from_utf8_lossy(&bytes[8 + len..]).into_owned();
            json!({"event": 3, "node_id": node, "text": text})
        }
        4 => {
            let len = word(4) as usize;
            let metadata: Value =
                serde_json::from_slice(&bytes[8..8 + len]).expect("preview metadata JSON");
            json!({"event": 4, "metadata": metadata})
        }
        other => json!({"event": other}),
    };
    normalise(&mut decoded);
    decoded
}

/// The recorded frames of a transcript, as a client heard them.
fn recorded_frames(name: &str) -> Vec<Heard> {
    recording(&format!("transcripts/{name}.jsonl"))
        .lines()
        .filter_map(|line| {
            let record: Value = serde_json::from_str(line).expect("transcript line");
            match record["kind"].as_str() {
                Some("text") => {
                    let mut message = record["msg"].clone();
                    normalise(&mut message);
                    Some(Heard::Text(message))
                }
                Some("binary") => {
                    let mut decoded = match record["event"].as_u64() {
                        Some(1) => json!({"event": 1, "image_type": record["image_type"]}),
                        Some(3) => {
                            json!({"event": 3, "node_id": record["node_id"], "text": record["text"]})
                        }
                        Some(4) => json!({"event": 4, "metadata": record["metadata"]}),
                        other => json!({"event": other}),
                    };
                    normalise(&mut decoded);
                    Some(Heard::Binary(decoded))
                }
                _ => None,
            }
        })
        .collect()
}

/// The recorded prompt (`GET /history` of the run keeps it).
fn recorded_prompt(name: &str) -> (Value, Value) {
    let history: Value =
        serde_json::from_str(&recording(&format!("history/{name}.json"))).expect("history JSON");
    let entry = history
        .as_object()
        .and_then(|m| m.values().next())
        .cloned()
        .expect("one entry");
    (entry["prompt"][2].clone(), entry)
}

fn ws_base(stack: &TestStack) -> String {
    stack.api.replacen("http://", "ws://", 1)
}

async fn open_socket(url: &str, bearer: Option<&str>) -> Socket {
    let mut request = url.into_client_request().expect("ws request");
    if let Some(key) = bearer {
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {key}").parse().expect("header"),
        );
    }
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("WS connect");
    socket
}

async fn next_frame(socket: &mut Socket) -> Option<(Heard, Value)> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("a frame within 20 s")?
            .expect("WS frame");
        match message {
            Message::Text(text) => {
                let raw: Value = serde_json::from_str(&text).expect("text frame JSON");
                let mut normalised = raw.clone();
                normalise(&mut normalised);
                return Some((Heard::Text(normalised), raw));
            }
            Message::Binary(bytes) => {
                return Some((Heard::Binary(decode_binary(&bytes)), Value::Null));
            }
            Message::Close(_) => return None,
            _ => {}
        }
    }
}

/// Frames until the prompt's `executing {node: null}` (inclusive).
async fn until_done(socket: &mut Socket, prompt_id: &str, heard: &mut Vec<(Heard, Value)>) {
    while let Some((frame, raw)) = next_frame(socket).await {
        let done = raw["type"] == "executing"
            && raw["data"]["node"].is_null()
            && raw["data"]["prompt_id"] == prompt_id;
        heard.push((frame, raw));
        if done {
            return;
        }
    }
    panic!("socket closed before {prompt_id} ended");
}

async fn post_prompt(http: &reqwest::Client, base: &str, body: Value) -> (u16, String) {
    let response = http
        .post(format!("{base}/prompt"))
        .json(&body)
        .send()
        .await
        .expect("POST /prompt");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// Runs one recorded conversation against the facade: the same frames in
/// the same order, the same history shape, the same output bytes.
async fn replay(stack: &TestStack, name: &str, handshake: bool) {
    let (prompt, recorded_history) = recorded_prompt(name);
    if name == "10_audio" {
        // The recorded client uploaded its sound first, as this one does.
        upload(stack, "peer_tone.wav", wav_tone()).await;
    }
    let client_id = format!("replay-{name}");
    let mut socket = open_socket(
        &format!("{}/ws?clientId={client_id}", ws_base(stack)),
        Some(stack::API_KEY),
    )
    .await;
    let mut heard = Vec::new();
    heard.extend(next_frame(&mut socket).await);
    if handshake {
        socket
            .send(Message::Text(
                json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}})
                    .to_string()
                    .into(),
            ))
            .await
            .expect("handshake");
        heard.extend(next_frame(&mut socket).await);
    }
    let (status, body) = post_prompt(
        &stack.http,
        &stack.api,
        json!({"prompt": prompt, "client_id": client_id}),
    )
    .await;
    assert_eq!(status, 200, "{name}: POST /prompt answered {body}");
    let answer: Value = serde_json::from_str(&body).expect("answer JSON");
    let prompt_id = answer["prompt_id"].as_str().expect("prompt_id").to_owned();
    assert!(answer["number"].is_number() && answer["node_errors"] == json!({}));
    until_done(&mut socket, &prompt_id, &mut heard).await;
    let frames: Vec<Heard> = heard.iter().map(|(frame, _)| frame.clone()).collect();
    let expected = recorded_frames(name);
    let kinds = |frames: &[Heard]| -> Vec<String> {
        frames
            .iter()
            .map(|f| match f {
                Heard::Text(v) => v["type"].as_str().unwrap_or_default().to_owned(),
                Heard::Binary(v) => format!("binary {}", v["event"]),
            })
            .collect()
    };
    assert_eq!(
        kinds(&frames),
        kinds(&expected),
        "{name}: the sequence of frames differs"
    );
    for (i, (got, want)) in frames.iter().zip(&expected).enumerate() {
        assert_eq!(got, want, "{name}: frame {i} differs");
    }
    // Every message of the prompt names the client's prompt id.
    for (_, raw) in &heard {
        if let Some(id) = raw["data"]["prompt_id"].as_str() {
            assert_eq!(id, prompt_id, "{name}: {raw}");
        }
    }

    // History: ComfyUI's record shape, the client's prompt, servable files.
    let history: Value = stack
        .http
        .get(format!("{}/history/{prompt_id}", stack.api))
        .send()
        .await
        .expect("GET /history")
        .json()
        .await
        .expect("history JSON");
    let entry = &history[&prompt_id];
    let mut got_shape = entry.clone();
    let mut want_shape = recorded_history.clone();
    normalise(&mut got_shape);
    normalise(&mut want_shape);
    assert_eq!(
        got_shape["status"], want_shape["status"],
        "{name}: history status"
    );
    assert_eq!(got_shape["outputs"], want_shape["outputs"], "{name}");
    assert_eq!(got_shape["meta"], want_shape["meta"], "{name}");
    assert_eq!(entry["prompt"][1], json!(prompt_id));
    assert_eq!(entry["prompt"][2], prompt, "{name}: the client's prompt");
    assert_eq!(entry["prompt"][3]["client_id"], json!(client_id));
    assert_eq!(entry["prompt"][4], recorded_history["prompt"][4]);
    for files in entry["outputs"]
        .as_object()
        .into_iter()
        .flat_map(|o| o.values())
    {
        for file in files
            .as_object()
            .into_iter()
            .flat_map(|o| o.values())
            .filter_map(Value::as_array)
            .flatten()
            .filter(|f| f["filename"].is_string())
        {
            let query = [
                ("filename", file["filename"].as_str().unwrap_or_default()),
                ("subfolder", file["subfolder"].as_str().unwrap_or_default()),
                ("type", file["type"].as_str().unwrap_or_default()),
            ];
            let served = stack
                .http
                .get(format!("{}/view", stack.api))
                .query(&query)
                .send()
                .await
                .expect("GET /view");
            assert_eq!(served.status(), 200, "{name}: /view {file}");
            let content_type = served
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let bytes = served.bytes().await.expect("view bytes");
            // The same bytes the runner's ComfyUI serves under its own name.
            let own_subfolder = query[1].1.split_once('/').map_or("", |(_, rest)| rest);
            let original = reqwest::Client::new()
                .get(format!("{}/view", stack.sim.base_url()))
                .query(&[query[0], ("subfolder", own_subfolder), query[2]])
                .send()
                .await
                .expect("simulator /view");
            let original_type = original
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            assert_eq!(
                bytes,
                original.bytes().await.expect("simulator bytes"),
                "{name}: {file}"
            );
            assert_eq!(
                content_type, original_type,
                "{name}: content type of {file}"
            );
        }
    }
}

/// A 10 ms, 8 kHz, 16-bit mono WAV.
fn wav_tone() -> Vec<u8> {
    let samples: Vec<u8> = (0..80u32)
        .flat_map(|i| (((i % 8) as i16 - 4) * 1000).to_le_bytes())
        .collect();
    let mut wav = Vec::new();
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + samples.len() as u32).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes());
    wav.extend_from_slice(&8000u32.to_le_bytes());
    wav.extend_from_slice(&16000u32.to_le_bytes());
    wav.extend_from_slice(&2u16.to_le_bytes());
    wav.extend_from_slice(&16u16.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&(samples.len() as u32).to_le_bytes());
    wav.extend_from_slice(&samples);
    wav
}

/// `POST /upload/image` of one file; returns ComfyUI's answer.
async fn upload(stack: &TestStack, name: &'static str, bytes: Vec<u8>) -> Value {
    let form = reqwest::multipart::Form::new().part(
        "image",
        reqwest::multipart::Part::bytes(bytes).file_name(name),
    );
    stack
        .http
        .post(format!("{}/upload/image", stack.api))
        .multipart(form)
        .send()
        .await
        .expect("POST /upload/image")
        .json()
        .await
        .expect("upload answer JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfy_facade_replays_recorded_conversations() {
    // The recorded ComfyUI sent no sampler previews. (04, the upscale, is
    // not replayed: the simulator runs its independent nodes in another
    // order than ComfyUI did.)
    let stack = TestStack::start_with(StackOptions {
        sim: comfy_sim::SimConfig {
            previews: false,
            ..comfy_sim::SimConfig::default()
        },
        ..StackOptions::default()
    })
    .await;
    for (name, handshake) in [
        ("01_empty_invert_save", false),
        // The same prompt again: ComfyUI serves it from its cache.
        ("01b_cached_rerun", false),
        ("06_exec_error", false),
        ("07_text_frame_preview_any", false),
        ("08_preview_image_temp", false),
        ("09_video_mp4", false),
        ("10_audio", false),
        ("03_animated_webp", false),
        ("15_animated_png", false),
        ("20_probe_previews_legacy", false),
        ("20_probe_previews_metadata", true),
    ] {
        replay(&stack, name, handshake).await;
    }
    stack.stop().await;
}

/// ComfyUI's own answers to refused prompts, as recorded: the request's
/// shape, unknown nodes, and (against the pool's object_info) the inputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfy_facade_refuses_prompts_as_comfyui_does() {
    let stack = TestStack::start().await;
    let recorded = |name: &str| -> (u16, String) {
        let text = recording(&format!("responses/{name}.response.txt"));
        let (body, status) = text.trim_end().rsplit_once("\nHTTP ").expect("status line");
        (status.trim().parse().expect("status"), body.to_owned())
    };
    let (status, body) = post_prompt(&stack.http, &stack.api, json!({"client_id": "x"})).await;
    let (want_status, want_body) = recorded("no_prompt_key");
    assert_eq!((status, parse(&body)), (want_status, parse(&want_body)));

    let (status, body) = post_prompt(
        &stack.http,
        &stack.api,
        json!({"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}),
    )
    .await;
    let (want_status, want_body) = recorded("13_unknown_node");
    assert_eq!((status, parse(&body)), (want_status, parse(&want_body)));

    let (status, body) = post_prompt(&stack.http, &stack.api, json!({"prompt": {}})).await;
    let (want_status, want_body) = recorded("14_no_outputs");
    assert_eq!((status, parse(&body)), (want_status, parse(&want_body)));

    let malformed = stack
        .http
        .post(format!("{}/prompt", stack.api))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("POST");
    let (want_status, want_body) = recorded("malformed_json");
    assert_eq!(malformed.status().as_u16(), want_status);
    assert_eq!(malformed.text().await.unwrap_or_default(), want_body);

    // Once the runner has stored its ComfyUI's object_info, the facade
    // validates inputs as ComfyUI does, before any job exists.
    comfyq_tests::eventually(Duration::from_secs(10), "object_info served", async || {
        let info: Value = stack
            .http
            .get(format!("{}/object_info/EmptyImage", stack.api))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        info.get("EmptyImage").map(|_| ())
    })
    .await;
    for (name, prompt) in [
        (
            "05_validation_fail",
            json!({
                "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}},
                "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "no-such-method", "width": 8, "height": 8, "crop": "disabled"}},
                "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}
            }),
        ),
        (
            "14_no_outputs",
            json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}),
        ),
        (
            "missing_input_file",
            json!({
                "1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
            }),
        ),
        (
            "mixed_validation",
            json!({
                "1": {"class_type": "EmptyImage", "inputs": {"width": "abc", "height": 8, "batch_size": 1}},
                "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "red"}},
                "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
                "4": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "y"}}
            }),
        ),
    ] {
        let (status, body) = post_prompt(&stack.http, &stack.api, json!({"prompt": prompt})).await;
        let (want_status, want_body) = recorded(name);
        assert_eq!(
            (status, errors_sorted(parse(&body))),
            (want_status, errors_sorted(parse(&want_body))),
            "{name}"
        );
    }
    // A refused prompt is no job.
    let jobs: Value = stack
        .http
        .get(format!("{}/v1/jobs", stack.api))
        .send()
        .await
        .expect("GET /v1/jobs")
        .json()
        .await
        .expect("jobs JSON");
    assert_eq!(jobs["jobs"], json!([]), "{jobs}");
    // A pool no runner has described yet: accepted, its runner's ComfyUI
    // validates it when it runs.
    let undescribed = stack
        .http
        .post(format!("{}/prompt", stack.api))
        .header("comfyq-pool", "undescribed")
        .json(&json!({"prompt": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
        }}))
        .send()
        .await
        .expect("POST /prompt");
    let status = undescribed.status().as_u16();
    let body = undescribed.text().await.unwrap_or_default();
    assert_eq!(
        (status, parse(&body)["node_errors"].clone()),
        (200, json!({})),
        "{body}"
    );

    // One valid and one invalid output (recording 12): accepted with the
    // invalid one's errors, and the valid one runs.
    let (prompt, recorded_history) = recorded_prompt("12_partial_invalid");
    let recorded_answer = recording("transcripts/12_partial_invalid.jsonl")
        .lines()
        .map(parse)
        .find(|line| line["kind"] == "http")
        .expect("the recorded POST /prompt");
    let (status, body) = post_prompt(
        &stack.http,
        &stack.api,
        json!({"prompt": prompt, "client_id": "partial"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let answer = parse(&body);
    assert_eq!(
        answer["node_errors"],
        recorded_answer["body"]["node_errors"]
    );
    let prompt_id = answer["prompt_id"].as_str().unwrap_or_default().to_owned();
    let history = comfyq_tests::eventually(Duration::from_secs(20), "history", async || {
        let history: Value = stack
            .http
            .get(format!("{}/history/{prompt_id}", stack.api))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let entry = history.get(&prompt_id)?.clone();
        entry["status"]["completed"].as_bool()?.then_some(entry)
    })
    .await;
    let output_nodes = |entry: &Value| -> Vec<String> {
        entry["outputs"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    assert_eq!(output_nodes(&history), output_nodes(&recorded_history));
    assert_eq!(history["status"]["status_str"], "success");
    assert_eq!(history["prompt"][4], recorded_history["prompt"][4]);

    // A file the tenant uploaded is present for LoadImage, though the
    // runner's ComfyUI does not list it.
    let png = {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, 2, 2);
        encoder.set_color(png::ColorType::Rgba);
        let mut writer = encoder.write_header().expect("PNG header");
        writer.write_image_data(&[90u8; 16]).expect("PNG data");
        drop(writer);
        bytes
    };
    upload(&stack, "validated_upload.png", png).await;
    let (status, body) = post_prompt(
        &stack.http,
        &stack.api,
        json!({"prompt": {
            "1": {"class_type": "LoadImage", "inputs": {"image": "validated_upload.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
        }}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(parse(&body)["node_errors"], json!({}));
    stack.stop().await;
}

/// Each node's errors sorted: ComfyUI checks a node's inputs in the order
/// of a Python set, which differs from run to run.
fn errors_sorted(mut answer: Value) -> Value {
    if let Some(nodes) = answer["node_errors"].as_object_mut() {
        for node in nodes.values_mut() {
            if let Some(errors) = node["errors"].as_array_mut() {
                errors.sort_by_key(|e| e["type"].to_string());
            }
        }
    }
    answer
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Two tenants never see each other's prompts, history or files; the key
/// works as a bearer token and as `?token=`; the API is also served under
/// its prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfy_facade_isolates_tenants_and_authenticates() {
    let stack = TestStack::start().await;
    let anonymous = reqwest::Client::new();
    let unauthorized = anonymous
        .get(format!("{}/history", stack.api))
        .send()
        .await
        .expect("GET");
    assert_eq!(unauthorized.status(), 401);
    let by_token = anonymous
        .get(format!(
            "{}/comfyui/api/prompt?token={}",
            stack.api,
            stack::API_KEY
        ))
        .send()
        .await
        .expect("GET");
    assert_eq!(by_token.status(), 200);
    assert_eq!(
        by_token.json::<Value>().await.expect("JSON")["exec_info"]["queue_remaining"],
        json!(0)
    );

    // The other tenant's socket listens while we run a prompt with the
    // same client id.
    let mut theirs = open_socket(
        &format!(
            "{}/ws?clientId=shared&token={}",
            ws_base(&stack),
            stack::OTHER_API_KEY
        ),
        None,
    )
    .await;
    let mut ours = open_socket(
        &format!(
            "{}/comfyui/ws?clientId=shared&token={}",
            ws_base(&stack),
            stack::API_KEY
        ),
        None,
    )
    .await;
    let mut heard = Vec::new();
    heard.extend(next_frame(&mut ours).await);
    let (status, body) = post_prompt(
        &stack.http,
        &stack.api,
        json!({"prompt": stack::invert_workflow(16), "client_id": "shared", "prompt_id": "my-own-id"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(parse(&body)["prompt_id"], "my-own-id");
    until_done(&mut ours, "my-own-id", &mut heard).await;
    // ComfyUI's last `status` counts the queue without the prompt that ended.
    let last_status = heard
        .iter()
        .rev()
        .find(|(_, raw)| raw["type"] == "status")
        .map(|(_, raw)| raw["data"]["status"]["exec_info"]["queue_remaining"].clone());
    assert_eq!(last_status, Some(json!(0)), "{heard:?}");
    let history = |client: &reqwest::Client| {
        let url = format!("{}/history/my-own-id", stack.api);
        let client = client.clone();
        async move {
            client
                .get(url)
                .send()
                .await
                .expect("GET")
                .json::<Value>()
                .await
                .expect("JSON")
        }
    };
    let entry = history(&stack.http).await;
    assert_eq!(entry["my-own-id"]["status"]["status_str"], "success");
    // The same prompt id again names the same job: nothing is run or replaced.
    let (status, again) = post_prompt(
        &stack.http,
        &stack.api,
        json!({"prompt": stack::invert_workflow(20), "prompt_id": "my-own-id"}),
    )
    .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(parse(&again)["number"], entry["my-own-id"]["prompt"][0]);
    assert_eq!(
        history(&stack.http).await["my-own-id"]["prompt"][2],
        stack::invert_workflow(16)
    );
    let other = TestStack::client_for(stack::OTHER_API_KEY);
    assert_eq!(history(&other).await, json!({}));
    let all: Value = other
        .get(format!("{}/history", stack.api))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(all, json!({}));
    let file = &entry["my-own-id"]["outputs"]["3"]["images"][0];
    let query = [
        ("filename", file["filename"].as_str().unwrap_or_default()),
        ("subfolder", file["subfolder"].as_str().unwrap_or_default()),
        ("type", "output"),
    ];
    let view = |client: &reqwest::Client| {
        client
            .get(format!("{}/view", stack.api))
            .query(&query)
            .send()
    };
    assert_eq!(view(&stack.http).await.expect("GET").status(), 200);
    assert_eq!(view(&other).await.expect("GET").status(), 404);
    let ranged = stack
        .http
        .get(format!("{}/view", stack.api))
        .query(&query)
        .header("range", "bytes=0-7")
        .send()
        .await
        .expect("GET");
    assert_eq!(ranged.status(), 206);
    assert_eq!(
        ranged.bytes().await.expect("bytes").as_ref(),
        b"\x89PNG\r\n\x1a\n"
    );
    // The other tenant's socket heard nothing of it: only its hello.
    let (hello, _) = next_frame(&mut theirs).await.expect("hello");
    assert!(matches!(hello, Heard::Text(ref v) if v["type"] == "status"));
    let quiet = tokio::time::timeout(Duration::from_millis(300), theirs.next()).await;
    assert!(quiet.is_err(), "the other tenant heard {quiet:?}");
    // History deletion takes the prompt out of `/history`.
    let deleted = stack
        .http
        .post(format!("{}/history", stack.api))
        .json(&json!({"delete": ["my-own-id"]}))
        .send()
        .await
        .expect("POST");
    assert_eq!(deleted.status(), 200);
    assert_eq!(history(&stack.http).await, json!({}));
    stack.stop().await;
}

/// An upload named by a prompt's LoadImage reaches the runner; a targeted
/// interrupt stops a running prompt with ComfyUI's ending; `/queue` shows
/// what runs and waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfy_facade_uploads_queues_and_interrupts() {
    let stack = TestStack::start_with(StackOptions {
        runner_slots: 1,
        ..StackOptions::default()
    })
    .await;
    let png = {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, 4, 2);
        encoder.set_color(png::ColorType::Rgba);
        let mut writer = encoder.write_header().expect("PNG header");
        writer.write_image_data(&[200u8; 32]).expect("PNG data");
        drop(writer);
        bytes
    };
    let answer = upload(&stack, "peer_upload.png", png.clone()).await;
    assert_eq!(
        answer,
        json!({"name": "peer_upload.png", "subfolder": "", "type": "input"})
    );
    // Other bytes under the same name get ComfyUI's `name (1).ext`.
    let mut other_png = png.clone();
    other_png.extend_from_slice(b"\0");
    let renamed = upload(&stack, "peer_upload.png", other_png).await;
    assert_eq!(renamed["name"], "peer_upload (1).png");
    let viewed = stack
        .http
        .get(format!(
            "{}/view?filename=peer_upload.png&type=input",
            stack.api
        ))
        .send()
        .await
        .expect("GET");
    assert_eq!(
        viewed.bytes().await.expect("bytes").as_ref(),
        png.as_slice()
    );

    // The mask editor's upload: the original with the mask's alpha.
    let mask = {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, 4, 2);
        encoder.set_color(png::ColorType::Rgba);
        let mut writer = encoder.write_header().expect("PNG header");
        writer
            .write_image_data(&[0u8, 0, 0, 7].repeat(8))
            .expect("PNG data");
        drop(writer);
        bytes
    };
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(mask).file_name("clipspace-mask.png"),
        )
        .text(
            "original_ref",
            json!({"filename": "peer_upload.png", "subfolder": "", "type": "input"}).to_string(),
        );
    let masked: Value = stack
        .http
        .post(format!("{}/upload/mask", stack.api))
        .multipart(form)
        .send()
        .await
        .expect("POST /upload/mask")
        .json()
        .await
        .expect("JSON");
    assert_eq!(masked["name"], "clipspace-mask.png", "{masked}");
    let bytes = stack
        .http
        .get(format!(
            "{}/view?filename=clipspace-mask.png&type=input",
            stack.api
        ))
        .send()
        .await
        .expect("GET")
        .bytes()
        .await
        .expect("bytes");
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()))
        .read_info()
        .expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size().expect("size")];
    reader.next_frame(&mut pixels).expect("frame");
    assert_eq!(pixels, [200u8, 200, 200, 7].repeat(8));

    let (prompt, _) = recorded_prompt("02_load_scale_save");
    let mut socket = open_socket(
        &format!("{}/ws?clientId=uploader", ws_base(&stack)),
        Some(stack::API_KEY),
    )
    .await;
    let mut heard = Vec::new();
    heard.extend(next_frame(&mut socket).await);
    let (status, body) = post_prompt(
        &stack.http,
        &stack.api,
        json!({"prompt": prompt, "client_id": "uploader"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let prompt_id = parse(&body)["prompt_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    until_done(&mut socket, &prompt_id, &mut heard).await;
    assert!(
        heard
            .iter()
            .any(|(_, raw)| raw["type"] == "execution_success"),
        "{heard:?}"
    );

    // A slow prompt runs; another waits behind it (one slot).
    let slow = stack::slow_workflow(200, 50, "slow");
    let (_, body) = post_prompt(
        &stack.http,
        &stack.api,
        json!({"prompt": slow, "client_id": "uploader", "prompt_id": "slow-one"}),
    )
    .await;
    assert_eq!(parse(&body)["prompt_id"], "slow-one", "{body}");
    let mut heard = Vec::new();
    while let Some((_, raw)) = next_frame(&mut socket).await {
        let progressing = raw["type"] == "progress";
        heard.push(raw);
        if progressing {
            break;
        }
    }
    let (_, body) = post_prompt(
        &stack.http,
        &stack.api,
        json!({"prompt": stack::slow_workflow(3, 10, "waiting"), "client_id": "uploader", "prompt_id": "waiting-one"}),
    )
    .await;
    assert_eq!(parse(&body)["prompt_id"], "waiting-one", "{body}");
    let queue: Value = stack
        .http
        .get(format!("{}/queue", stack.api))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(queue["queue_running"][0][1], "slow-one", "{queue}");
    assert_eq!(queue["queue_pending"][0][1], "waiting-one", "{queue}");
    // Deleting the waiting one from the queue cancels it.
    let removed = stack
        .http
        .post(format!("{}/queue", stack.api))
        .json(&json!({"delete": ["waiting-one"]}))
        .send()
        .await
        .expect("POST");
    assert_eq!(removed.status(), 200);
    let interrupted = stack
        .http
        .post(format!("{}/interrupt", stack.api))
        .json(&json!({"prompt_id": "slow-one"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(interrupted.status(), 200);
    let mut ending = Vec::new();
    until_done(&mut socket, "slow-one", &mut ending).await;
    let kinds: Vec<&str> = ending
        .iter()
        .filter_map(|(_, raw)| raw["type"].as_str())
        .filter(|t| !matches!(*t, "progress" | "progress_state"))
        .collect();
    // (`status` also comes for the waiting prompt's cancellation.)
    assert_eq!(
        kinds[kinds.len().saturating_sub(3)..],
        ["execution_interrupted", "status", "executing"],
        "{ending:?}"
    );
    assert!(
        kinds
            .iter()
            .all(|k| matches!(*k, "status" | "execution_interrupted" | "executing")),
        "{kinds:?}"
    );
    let entry: Value = stack
        .http
        .get(format!("{}/history/slow-one", stack.api))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        entry["slow-one"]["status"]["status_str"], "error",
        "{entry}"
    );
    comfyq_tests::eventually(
        Duration::from_secs(10),
        "the waiting prompt cancelled",
        async || {
            let queue: Value = stack
                .http
                .get(format!("{}/queue", stack.api))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (queue == json!({"queue_running": [], "queue_pending": []})).then_some(())
        },
    )
    .await;
    stack.stop().await;
}

/// A Python client in the style of ComfyUI's
/// `script_examples/websockets_api_example.py`, standard library only:
/// queue a prompt, read `/ws` until it ends, fetch `/history` and `/view`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfy_facade_serves_a_python_websocket_client() {
    let stack = TestStack::start().await;
    let address = stack.api.trim_start_matches("http://").to_owned();
    let output = tokio::task::spawn_blocking(move || {
        crate::webhooks::python(&[
            "deploy/examples/comfyui_client.py",
            &address,
            stack::API_KEY,
        ])
    })
    .await
    .expect("python runs");
    assert!(
        output.status.success(),
        "python client failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("png=True") && stdout.contains("ws execution_success"),
        "{stdout}"
    );
    stack.stop().await;
}

/// A client that reconnects with the same `clientId` hears the rest of its
/// running prompt; every socket hears the `progress_state` of a prompt
/// without a client id; `/object_info` and `/models` describe the pool's
/// runners as their ComfyUI does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfy_facade_resumes_sockets_and_describes_the_fleet() {
    let stack = TestStack::start().await;
    let sim = reqwest::Client::new();
    let from_sim = |path: &'static str| {
        let sim = sim.clone();
        let url = format!("{}{path}", stack.sim.base_url());
        async move {
            sim.get(url)
                .send()
                .await
                .expect("GET")
                .json::<Value>()
                .await
                .expect("JSON")
        }
    };
    let from_facade = |path: &'static str| {
        let url = format!("{}{path}", stack.api);
        let http = stack.http.clone();
        async move {
            let response = http.get(url).send().await.ok()?;
            response.json::<Value>().await.ok()
        }
    };
    // The runner stores its ComfyUI's object_info once it has started.
    let expected = from_sim("/object_info/EmptyImage").await;
    comfyq_tests::eventually(Duration::from_secs(10), "object_info served", async || {
        (from_facade("/object_info/EmptyImage").await? == expected).then_some(())
    })
    .await;
    assert_eq!(
        from_facade("/object_info/NoSuchNode").await,
        Some(json!({}))
    );
    let all = from_facade("/api/object_info").await.expect("object_info");
    assert_eq!(all, from_sim("/object_info").await);
    assert_eq!(
        from_facade("/models/upscale_models").await,
        Some(from_sim("/models/upscale_models").await)
    );
    let missing = stack
        .http
        .get(format!("{}/models/nope", stack.api))
        .send()
        .await
        .expect("GET");
    assert_eq!(missing.status(), 404);

    // A prompt without a client id: every socket hears its queue changes
    // and `progress_state`, as in the recorded probe.
    let probe: Value =
        serde_json::from_str(&recording("transcripts/ws_probe.json")).expect("probe");
    let mut listener = open_socket(
        &format!("{}/ws?clientId=bystander", ws_base(&stack)),
        Some(stack::API_KEY),
    )
    .await;
    next_frame(&mut listener).await.expect("hello");
    let (status, body) = post_prompt(
        &stack.http,
        &stack.api,
        json!({"prompt": stack::invert_workflow(24)}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut kinds = Vec::new();
    while let Ok(Some(Ok(frame))) =
        tokio::time::timeout(Duration::from_millis(1500), listener.next()).await
    {
        if let Message::Text(text) = frame {
            let message: Value = serde_json::from_str(&text).expect("JSON");
            kinds.push(message["type"].as_str().unwrap_or_default().to_owned());
        }
    }
    let mut expected: Vec<String> = probe["no_client_id_listener_saw"]
        .as_array()
        .expect("recorded kinds")
        .iter()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect();
    // (Whether the runner's `running` state or the first `progress_state`
    // is heard first is not fixed: compared as counts.)
    kinds.sort();
    expected.sort();
    assert_eq!(kinds, expected);

    // Reconnecting mid-prompt.
    let url = format!("{}/ws?clientId=roaming", ws_base(&stack));
    let mut first = open_socket(&url, Some(stack::API_KEY)).await;
    let mut heard = Vec::new();
    heard.extend(next_frame(&mut first).await);
    let (status, body) = post_prompt(
        &stack.http,
        &stack.api,
        json!({"prompt": stack::slow_workflow(20, 25, "roaming"), "client_id": "roaming"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let prompt_id = parse(&body)["prompt_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    while let Some((_, raw)) = next_frame(&mut first).await {
        if raw["type"] == "progress" {
            break;
        }
    }
    drop(first);
    let mut second = open_socket(&url, Some(stack::API_KEY)).await;
    let mut rest = Vec::new();
    until_done(&mut second, &prompt_id, &mut rest).await;
    assert_eq!(rest[0].1["data"]["sid"], "roaming");
    assert!(
        rest.iter().any(|(_, raw)| raw["type"] == "progress"),
        "the rest of the steps: {rest:?}"
    );
    assert!(
        rest.iter()
            .any(|(_, raw)| raw["type"] == "execution_success"),
        "{rest:?}"
    );
    stack.stop().await;
}
