//! Every recording of a real ComfyUI 0.3.64 in `shared/comfyui-0.3.64` must parse.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use reqwest::StatusCode;
use serde_json::Value;

use crate::comfy::client::{parse_history_response, parse_submit_response};
use crate::comfy::frames::{BinaryFrame, ImageFormat};
use crate::comfy::protocol::{
    Features, HistoryEntry, ObjectInfo, PromptAccepted, QueueItem, QueueStatus, ServerMessage,
    SystemStats,
};
use crate::comfy::{ComfyError, SubmitError};

const KNOWN_TYPES: &[&str] = &[
    "status",
    "execution_start",
    "execution_cached",
    "executing",
    "progress",
    "progress_state",
    "executed",
    "execution_success",
    "execution_error",
    "execution_interrupted",
    "feature_flags",
];

fn recordings() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/comfyui-0.3.64");
    assert!(
        dir.join("README.md").is_file(),
        "ComfyUI recordings not found at {}: the repository's `shared/` folder must sit \
         beside the checkout (…/shared/comfyui-0.3.64)",
        dir.display()
    );
    dir
}

fn files(sub: &str, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(recordings().join(sub))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no {suffix} files in {sub}");
    out
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn check_message(raw: &Value, ctx: &str) -> ServerMessage {
    let kind = raw["type"].as_str().unwrap();
    let msg: ServerMessage = serde_json::from_value(raw.clone())
        .unwrap_or_else(|e| panic!("{ctx}: {kind} did not parse: {e}\n{raw}"));
    assert_eq!(msg.kind(), kind, "{ctx}");
    if KNOWN_TYPES.contains(&kind) {
        assert!(
            !matches!(msg, ServerMessage::Unknown { .. }),
            "{ctx}: known type {kind} fell to Unknown"
        );
    }
    // Serializing gives back a message that parses to the same value.
    let again: ServerMessage = serde_json::from_value(serde_json::to_value(&msg).unwrap()).unwrap();
    assert_eq!(again, msg, "{ctx}: round trip");
    msg
}

/// Builds a binary frame from a transcript's decoded description, as ComfyUI would.
fn frame_from_transcript(line: &Value) -> Vec<u8> {
    let event = u32::try_from(line["event"].as_u64().unwrap()).unwrap();
    let image = |len: &Value, magic: &Value| {
        let mut img = hex_decode(magic.as_str().unwrap());
        img.resize(usize::try_from(len.as_u64().unwrap()).unwrap(), 0xab);
        img
    };
    let mut out = event.to_be_bytes().to_vec();
    match event {
        1 => {
            let fmt = u32::try_from(line["image_type"].as_u64().unwrap()).unwrap();
            out.extend(fmt.to_be_bytes());
            out.extend(image(&line["image_len"], &line["image_magic"]));
        }
        3 => {
            let node = line["node_id"].as_str().unwrap().as_bytes();
            out.extend(u32::try_from(node.len()).unwrap().to_be_bytes());
            out.extend(node);
            out.extend(line["text"].as_str().unwrap().as_bytes());
        }
        4 => {
            // Python's json.dumps separators, as ComfyUI writes it.
            let meta = python_json(&line["metadata"]);
            out.extend(u32::try_from(meta.len()).unwrap().to_be_bytes());
            out.extend(meta.as_bytes());
            out.extend(image(&line["image_len"], &line["image_magic"]));
        }
        other => panic!("no recorded frame of event {other}"),
    }
    out
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// `json.dumps(obj)` of a flat object: `{"k": v, "k2": v2}` in the recorded key order.
fn python_json(v: &Value) -> String {
    const ORDER: &[&str] = &[
        "node_id",
        "prompt_id",
        "display_node_id",
        "parent_node_id",
        "real_node_id",
        "image_type",
    ];
    let obj = v.as_object().unwrap();
    let parts: Vec<String> = ORDER
        .iter()
        .filter_map(|k| obj.get(*k).map(|v| format!("\"{k}\": {v}")))
        .collect();
    assert_eq!(parts.len(), obj.len(), "unexpected metadata keys: {v}");
    format!("{{{}}}", parts.join(", "))
}

#[test]
fn every_transcript_line_parses() {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut frames = 0;
    for path in files("transcripts", ".jsonl") {
        let file = name(&path);
        let text = fs::read_to_string(&path).unwrap();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let ctx = format!("{file}:{}", n + 1);
            let line: Value = serde_json::from_str(line).unwrap();
            match line["kind"].as_str().unwrap() {
                "text" => {
                    let msg = check_message(&line["msg"], &ctx);
                    *counts.entry(msg.kind().to_owned()).or_default() += 1;
                }
                "binary" => {
                    let raw = frame_from_transcript(&line);
                    assert_eq!(
                        raw.len() as u64,
                        line["len"].as_u64().unwrap(),
                        "{ctx}: length"
                    );
                    let frame = BinaryFrame::parse(Bytes::from(raw)).unwrap();
                    match (&frame, line["event"].as_u64().unwrap()) {
                        (BinaryFrame::Preview { format, image }, 1) => {
                            assert_eq!(format.code() as u64, line["image_type"].as_u64().unwrap());
                            assert_ne!(*format, ImageFormat::Other(0));
                            assert_eq!(image.len() as u64, line["image_len"].as_u64().unwrap());
                        }
                        (BinaryFrame::Text { node_id, text }, 3) => {
                            assert_eq!(node_id, line["node_id"].as_str().unwrap());
                            assert_eq!(text, line["text"].as_str().unwrap());
                        }
                        (BinaryFrame::PreviewWithMetadata { metadata, image }, 4) => {
                            let m = &line["metadata"];
                            assert_eq!(metadata.node_id.as_deref(), m["node_id"].as_str());
                            assert_eq!(metadata.prompt_id.as_deref(), m["prompt_id"].as_str());
                            assert_eq!(metadata.image_type.as_deref(), m["image_type"].as_str());
                            assert_eq!(image.len() as u64, line["image_len"].as_u64().unwrap());
                            assert_eq!(
                                &image[..8],
                                &hex_decode(line["image_magic"].as_str().unwrap())[..]
                            );
                        }
                        (f, e) => panic!("{ctx}: event {e} parsed as {f:?}"),
                    }
                    frames += 1;
                }
                "http" => {
                    let status = StatusCode::from_u16(
                        u16::try_from(line["status"].as_u64().unwrap()).unwrap(),
                    )
                    .unwrap();
                    let body = serde_json::to_vec(&line["body"]).unwrap();
                    if line["request"] == "POST /prompt" {
                        let ok = parse_submit_response(status, &body).unwrap();
                        // 12: one output is invalid, the other runs; a 200 still.
                        let partial = file.starts_with("12_");
                        assert_eq!(ok.node_errors.is_empty(), !partial, "{ctx}");
                        if partial {
                            let (node, errs) = ok.node_errors.iter().next().unwrap();
                            assert!(!errs.errors.is_empty(), "{ctx}: node {node}");
                            assert!(!errs.dependent_outputs.is_empty(), "{ctx}");
                        }
                    }
                }
                "local" => {}
                other => panic!("{ctx}: unknown line kind {other}"),
            }
        }
    }
    for kind in KNOWN_TYPES {
        assert!(
            counts.contains_key(*kind),
            "no {kind} message in the transcripts"
        );
    }
    assert_eq!(frames, 11);
}

#[test]
fn transcript_details() {
    let read = |f: &str| -> Vec<ServerMessage> {
        fs::read_to_string(recordings().join("transcripts").join(f))
            .unwrap()
            .lines()
            .filter_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                (v["kind"] == "text").then(|| serde_json::from_value(v["msg"].clone()).unwrap())
            })
            .collect()
    };
    // The last message of a successful run is `executing {node: null}` for the prompt.
    let run = read("07_text_frame_preview_any.jsonl");
    let ServerMessage::Executing(done) = run.last().unwrap() else {
        panic!("last is not executing")
    };
    assert!(done.is_done());
    assert_eq!(
        done.prompt_id.as_deref(),
        Some("37bc664f-5569-4fa3-938c-0ce7199d156a")
    );
    let text_out = run
        .iter()
        .find_map(|m| match m {
            ServerMessage::Executed(e) => e.node_output(),
            _ => None,
        })
        .unwrap();
    assert_eq!(text_out.text, vec!["40".to_owned()]);

    let run = read("06_exec_error.jsonl");
    let err = run
        .iter()
        .find_map(|m| match m {
            ServerMessage::ExecutionError(e) => Some(e),
            _ => None,
        })
        .unwrap();
    assert_eq!(err.node_id, "2");
    assert_eq!(err.node_type, "ImageScaleBy");
    assert_eq!(err.exception_type, "RuntimeError");
    assert_eq!(err.executed, vec!["1".to_owned()]);
    assert!(!err.traceback.is_empty());
    assert!(!err.is_out_of_memory());

    let run = read("22_probe_interrupt_midnode.jsonl");
    assert!(run.iter().any(|m| matches!(m,
        ServerMessage::ExecutionInterrupted(i) if i.node_type == "PeerSlowProgress" && i.executed.is_empty())));

    let run = read("04_upscale_progress.jsonl");
    let steps: Vec<(f64, f64)> = run
        .iter()
        .filter_map(|m| match m {
            ServerMessage::Progress(p) => Some((p.value, p.max)),
            _ => None,
        })
        .collect();
    assert!(steps.contains(&(1.0, 9.0)), "{steps:?}");

    let run = read("01_empty_invert_save.jsonl");
    let ServerMessage::Status(first) = &run[0] else {
        panic!("first is not status")
    };
    assert_eq!(first.queue_remaining(), Some(0));
    assert!(first.sid.is_some());
}

#[test]
fn ws_and_queue_probes_parse() {
    let dir = recordings().join("transcripts");
    let ws: Value = serde_json::from_slice(&fs::read(dir.join("ws_probe.json")).unwrap()).unwrap();
    let mut msgs: Vec<&Value> = Vec::new();
    msgs.extend(ws["feature_flags_handshake"].as_array().unwrap());
    msgs.extend(ws["reconnect_first_msgs"].as_array().unwrap());
    msgs.push(&ws["api_ws_first_msg"]);
    msgs.push(&ws["ws_without_clientId_first_msg"]);
    let parsed: Vec<ServerMessage> = msgs
        .iter()
        .map(|m| check_message(m, "ws_probe.json"))
        .collect();
    let ServerMessage::FeatureFlags(f) = &parsed[1] else {
        panic!("no feature_flags answer")
    };
    assert_eq!(f.supports_preview_metadata, Some(true));
    assert_eq!(f.max_upload_size, Some(104_857_600));
    // Replayed to a reconnecting socket: `executing` without a prompt id.
    let ServerMessage::Executing(e) = &parsed[3] else {
        panic!("no executing")
    };
    assert_eq!(
        (e.node.as_deref(), e.prompt_id.as_deref()),
        (Some("3"), None)
    );
    let body = serde_json::to_vec(&ws["no_client_id_submit"]["body"]).unwrap();
    parse_submit_response(StatusCode::OK, &body).unwrap();

    let q: Value =
        serde_json::from_slice(&fs::read(dir.join("queue_probe.json")).unwrap()).unwrap();
    for entry in q["log"].as_array().unwrap() {
        match entry["kind"].as_str().unwrap() {
            "submit" => {
                let body = serde_json::to_vec(&entry["body"]).unwrap();
                let ok = parse_submit_response(StatusCode::OK, &body).unwrap();
                assert_eq!(ok.prompt_id, entry["body"]["prompt_id"].as_str().unwrap());
                assert_eq!(ok.number, entry["body"]["number"].as_f64().unwrap());
            }
            "get_queue" | "get_queue_after_delete" => {
                for key in ["running", "pending_raw_order", "pending_sorted"] {
                    let Some(items) = entry.get(key) else {
                        continue;
                    };
                    let items: Vec<QueueItem> = serde_json::from_value(items.clone()).unwrap();
                    assert!(!items.is_empty());
                }
            }
            "get_prompt" => {
                let s: QueueStatus = serde_json::from_value(entry["body"].clone()).unwrap();
                assert_eq!(s.queue_remaining(), 7);
            }
            "interrupted" => {
                let m = ServerMessage::from_parts("execution_interrupted", entry["data"].clone())
                    .unwrap();
                assert!(matches!(m, ServerMessage::ExecutionInterrupted(_)));
            }
            _ => {}
        }
    }
    // A full 5-element queue item with float number.
    let item: QueueItem = serde_json::from_value(serde_json::json!(
        [-100.0, "p", {"1": {}}, {"client_id": "c"}, ["2"]]
    ))
    .unwrap();
    assert_eq!(item.number, -100.0);
    assert_eq!(item.client_id(), Some("c"));
    assert_eq!(item.outputs_to_execute, vec!["2".to_owned()]);
}

fn load_history(path: &Path) -> (String, HistoryEntry) {
    let raw = fs::read(path).unwrap();
    let map: serde_json::Map<String, Value> = serde_json::from_slice(&raw).unwrap();
    assert_eq!(map.len(), 1, "{}", name(path));
    let id = map.keys().next().unwrap().clone();
    let entry = parse_history_response(&id, &raw)
        .unwrap_or_else(|e| panic!("{}: {e}", name(path)))
        .unwrap();
    (id, entry)
}

#[test]
fn every_history_entry_parses() {
    let mut by_name = BTreeMap::new();
    for path in files("history", ".json") {
        let (id, entry) = load_history(&path);
        let prompt = entry.prompt.as_ref().unwrap();
        assert_eq!(prompt.prompt_id, id);
        assert!(prompt.prompt.is_object());
        assert!(prompt.client_id().is_some());
        let status = entry.status.as_ref().unwrap();
        assert_eq!(status.completed, status.status_str == "success");
        // Every status message parses, to a known type.
        assert_eq!(status.parsed_messages().count(), status.messages.len());
        for (kind, data) in &status.messages {
            let m = ServerMessage::from_parts(kind, data.clone()).unwrap();
            assert!(!matches!(m, ServerMessage::Unknown { .. }), "{kind}");
        }
        by_name.insert(name(&path), entry);
    }

    let files_of = |n: &str| -> Vec<(String, String, String, bool)> {
        by_name[n]
            .output_files()
            .map(|(_, f)| {
                (
                    f.kind_key.clone(),
                    f.filename.clone(),
                    f.folder_type.clone(),
                    f.animated,
                )
            })
            .collect()
    };
    assert_eq!(
        files_of("01_empty_invert_save.json"),
        vec![(
            "images".into(),
            "invert_00001_.png".into(),
            "output".into(),
            false
        )]
    );
    assert_eq!(
        files_of("09_video_mp4.json"),
        vec![(
            "images".into(),
            "video_00001_.mp4".into(),
            "output".into(),
            true
        )]
    );
    assert_eq!(
        files_of("03_animated_webp.json"),
        vec![(
            "images".into(),
            "anim_00001_.webp".into(),
            "output".into(),
            true
        )]
    );
    assert_eq!(
        files_of("15_animated_png.json"),
        vec![(
            "images".into(),
            "apng_00001_.png".into(),
            "output".into(),
            true
        )]
    );
    assert_eq!(
        files_of("10_audio.json"),
        vec![(
            "audio".into(),
            "audio_00001_.flac".into(),
            "output".into(),
            false
        )]
    );
    let temp = files_of("08_preview_image_temp.json");
    assert_eq!(temp.len(), 2);
    assert!(temp.iter().all(|f| f.2 == "temp" && !f.3));
    let text = &by_name["07_text_frame_preview_any.json"];
    assert_eq!(text.outputs["3"].text, vec!["40".to_owned()]);
    assert!(text.outputs["3"].files.is_empty());
    let sub = &by_name["01_empty_invert_save.json"].outputs["3"].files[0];
    assert_eq!(sub.subfolder, "peer");

    for n in ["06_exec_error.json", "21_probe_fail.json"] {
        let e = &by_name[n];
        assert!(!e.is_success());
        assert!(e.outputs.is_empty());
        let err = e.status.as_ref().unwrap().execution_error().unwrap();
        assert_eq!(err.node_id, "2");
    }
    for n in [
        "11_interrupt_targeted.json",
        "22_probe_interrupt_midnode.json",
    ] {
        let e = &by_name[n];
        assert!(!e.is_success());
        assert!(e.status.as_ref().unwrap().execution_interrupted().is_some());
        assert!(e.status.as_ref().unwrap().execution_error().is_none());
    }
    let ok = &by_name["12_partial_invalid.json"];
    assert!(ok.is_success());
    assert_eq!(ok.meta["2"].node_id.as_deref(), Some("2"));
    let cached = &by_name["01b_cached_rerun.json"];
    assert!(
        cached
            .status
            .as_ref()
            .unwrap()
            .parsed_messages()
            .any(|m| matches!(m,
        ServerMessage::ExecutionCached(c) if c.nodes.len() == 3))
    );
}

#[test]
fn odd_history_parts_do_not_hide_outputs() {
    let body = br#"{"p": {
        "prompt": "not an array",
        "outputs": {"9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}, "10": "weird"},
        "status": {"status_str": "success", "completed": true, "messages": [["execution_start", {"prompt_id": "p"}], "junk", [1]]},
        "meta": ["junk"]
    }}"#;
    let e = parse_history_response("p", body).unwrap().unwrap();
    assert!(e.prompt.is_none());
    assert!(e.meta.is_empty());
    assert!(e.is_success());
    assert_eq!(e.status.as_ref().unwrap().messages.len(), 1);
    assert_eq!(e.output_files().count(), 1);
    assert!(e.outputs["10"].files.is_empty());
}

#[test]
fn unknown_or_unfinished_history_is_none() {
    assert!(parse_history_response("x", b"{}").unwrap().is_none());
    assert!(matches!(
        parse_history_response("x", b"{\"y\": {}}"),
        Err(ComfyError::Protocol(_))
    ));
    assert!(matches!(
        parse_history_response("x", b"not json"),
        Err(ComfyError::Protocol(_))
    ));
}

/// `responses/NAME.response.txt`: the body, then a last line `HTTP <status>`.
fn load_response(path: &Path) -> (StatusCode, String) {
    let text = fs::read_to_string(path).unwrap();
    let text = text.trim_end();
    let (body, status) = text.rsplit_once('\n').unwrap();
    let code = status
        .trim()
        .strip_prefix("HTTP ")
        .unwrap()
        .parse::<u16>()
        .unwrap();
    (
        StatusCode::from_u16(code).unwrap(),
        body.trim_end().to_owned(),
    )
}

#[test]
fn every_error_response_classifies() {
    for path in files("responses", ".response.txt") {
        let file = name(&path);
        let (status, body) = load_response(&path);
        let outcome = parse_submit_response(status, body.as_bytes());
        match file.as_str() {
            "malformed_json.response.txt" => {
                let Err(SubmitError::Comfy(e @ ComfyError::Server { .. })) = &outcome else {
                    panic!("{file}: {outcome:?}")
                };
                assert!(e.is_retryable());
            }
            _ => {
                let Err(err @ SubmitError::Rejected(r)) = &outcome else {
                    panic!("{file}: {outcome:?}")
                };
                assert!(!err.is_retryable(), "{file}");
                assert!(!r.error.kind.is_empty(), "{file}");
                assert!(!r.error.message.is_empty(), "{file}");
                let expected = match file.as_str() {
                    "13_unknown_node.response.txt" => "invalid_prompt",
                    "14_no_outputs.response.txt" => "prompt_no_outputs",
                    "no_prompt_key.response.txt" => "no_prompt",
                    _ => "prompt_outputs_failed_validation",
                };
                assert_eq!(r.error.kind, expected, "{file}");
                assert!(!r.to_string().is_empty());
            }
        }
    }
    let (status, body) =
        load_response(&recordings().join("responses/05_validation_fail.response.txt"));
    let Err(SubmitError::Rejected(r)) = parse_submit_response(status, body.as_bytes()) else {
        panic!()
    };
    assert_eq!(r.node_errors.len(), 2);
    let e1 = &r.node_errors["1"];
    assert_eq!(e1.class_type, "EmptyImage");
    assert_eq!(e1.dependent_outputs, vec!["3".to_owned()]);
    assert_eq!(e1.errors[0].kind, "value_smaller_than_min");
    assert_eq!(e1.errors[0].extra_info["input_name"], "width");

    let (status, body) =
        load_response(&recordings().join("responses/mixed_validation.response.txt"));
    let Err(SubmitError::Rejected(r)) = parse_submit_response(status, body.as_bytes()) else {
        panic!()
    };
    assert_eq!(r.node_errors["1"].errors.len(), 2);
    assert_eq!(r.node_errors["3"].errors[0].kind, "return_type_mismatch");
}

#[test]
fn odd_prompt_answers() {
    // Old servers: `error` as a string, `node_errors` as an empty list.
    let Err(SubmitError::Rejected(r)) = parse_submit_response(
        StatusCode::BAD_REQUEST,
        br#"{"error": "no prompt", "node_errors": []}"#,
    ) else {
        panic!()
    };
    assert_eq!(r.error.message, "no prompt");
    // A 400 that is not JSON at all.
    let e = parse_submit_response(StatusCode::BAD_REQUEST, b"Bad Request").unwrap_err();
    assert!(matches!(e, SubmitError::BadRequest { .. }) && !e.is_retryable());
    // A 200 carrying node errors for the outputs that will not run.
    let ok = parse_submit_response(
        StatusCode::OK,
        br#"{"prompt_id": "p", "number": 3, "node_errors": {"4": {"errors": [{"type": "x", "message": "m", "details": "", "extra_info": {}}], "dependent_outputs": ["4"], "class_type": "SaveImage"}}}"#,
    )
    .unwrap();
    assert_eq!(ok.node_errors["4"].class_type, "SaveImage");
    // 200 of the wrong shape, 502, 404.
    assert!(matches!(
        parse_submit_response(StatusCode::OK, b"[]"),
        Err(SubmitError::Comfy(ComfyError::Protocol(_)))
    ));
    assert!(
        parse_submit_response(StatusCode::BAD_GATEWAY, b"")
            .unwrap_err()
            .is_retryable()
    );
    assert!(
        !parse_submit_response(StatusCode::NOT_FOUND, b"")
            .unwrap_err()
            .is_retryable()
    );
}

/// `http_probe.txt`: `METHOD PATH [body] -> STATUS [TYPE] LEN`, then one body line (cut
/// at 120 characters for long bodies). Parse every complete JSON body of the typed routes.
#[test]
fn http_probe_bodies_parse() {
    let text = fs::read_to_string(recordings().join("responses/http_probe.txt")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut parsed = 0;
    for pair in lines.chunks(2) {
        let [head, body] = pair else {
            panic!("odd line count")
        };
        let (request, answer) = head.split_once(" -> ").unwrap();
        let path = request.split_whitespace().nth(1).unwrap();
        let path = path.strip_prefix("/api").unwrap_or(path);
        let status: u16 = answer.split_whitespace().next().unwrap().parse().unwrap();
        let Ok(json) = serde_json::from_str::<Value>(body) else {
            continue;
        };
        if status != 200 {
            continue;
        }
        let route = path.split('?').next().unwrap();
        match route {
            "/system_stats" => {
                let _ = serde_json::from_value::<SystemStats>(json).unwrap();
            }
            "/prompt" => {
                let _ = serde_json::from_value::<QueueStatus>(json).unwrap();
            }
            "/features" => {
                let f: Features = serde_json::from_value(json).unwrap();
                assert_eq!(f.supports_preview_metadata, Some(true));
            }
            r if r.starts_with("/models") || r == "/embeddings" => {
                {
                    let _ = serde_json::from_value::<Vec<String>>(json).unwrap();
                };
            }
            r if r.starts_with("/object_info") => {
                let info: ObjectInfo = serde_json::from_value(json).unwrap();
                if r.ends_with("EmptyImage") {
                    assert_eq!(info.class_names().collect::<Vec<_>>(), vec!["EmptyImage"]);
                    assert!(info.combo_inputs("EmptyImage").is_empty());
                }
            }
            r if r.starts_with("/history/") => {
                let id = r.trim_start_matches("/history/");
                assert!(
                    parse_history_response(id, body.as_bytes())
                        .unwrap()
                        .is_none()
                );
            }
            _ => continue,
        }
        parsed += 1;
    }
    assert!(parsed >= 10, "parsed {parsed}");
}

#[test]
fn object_info_model_inputs() {
    let info: ObjectInfo = serde_json::from_value(serde_json::json!({
        "CheckpointLoaderSimple": {"input": {"required": {
            "ckpt_name": [["sd15.safetensors", "xl.ckpt"], {"tooltip": "x"}]
        }}},
        "LoraLoader": {"input": {"required": {
            "lora_name": ["COMBO", {"options": []}],
            "strength_model": ["FLOAT", {"default": 1.0}]
        }}},
        "KSampler": {"input": {"required": {
            "sampler_name": [["euler", "dpmpp_2m"], {}],
            "seed": ["INT", {}]
        }, "optional": {"weights": [["custom.gguf"]]}}},
        "Broken": {"input": "nonsense"}
    }))
    .unwrap();
    assert_eq!(info.class_names().count(), 4);
    assert!(info.has_class("KSampler"));
    assert_eq!(info.combo_inputs("KSampler").len(), 2);
    assert!(info.combo_inputs("Broken").is_empty());
    let models = info.model_inputs();
    let names: Vec<(&str, &str)> = models
        .iter()
        .map(|m| (m.class_type.as_str(), m.input_name.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("CheckpointLoaderSimple", "ckpt_name"),
            ("KSampler", "weights"),
            ("LoraLoader", "lora_name"),
        ]
    );
    assert_eq!(models[0].choices, vec!["sd15.safetensors", "xl.ckpt"]);
}

#[test]
fn custom_output_keys_are_carried() {
    let out: crate::comfy::NodeOutput = serde_json::from_value(serde_json::json!({
        "gifs": [{"filename": "a.mp4", "subfolder": "", "type": "output", "format": "video/h264-mp4", "frame_rate": 8.0}],
        "3d": [{"filename": "m.glb", "subfolder": "mesh", "type": "output"}],
        "images": [
            {"filename": "x.webp", "subfolder": "", "type": "output"},
            {"filename": "y.png", "subfolder": "", "type": "output"}
        ],
        "animated": [true, false],
        "text": ["hello", 3],
        "scores": [0.5, 0.7],
        "empty": [],
        "custom_string": "s"
    }))
    .unwrap();
    // Key order depends on serde_json's `preserve_order` feature: compare sorted.
    let mut files: Vec<(&str, &str, bool)> = out
        .files
        .iter()
        .map(|f| (f.kind_key.as_str(), f.filename.as_str(), f.animated))
        .collect();
    files.sort();
    assert_eq!(
        files,
        vec![
            ("3d", "m.glb", false),
            ("gifs", "a.mp4", false),
            ("images", "x.webp", true),
            ("images", "y.png", false),
        ]
    );
    let gif = out.files.iter().find(|f| f.kind_key == "gifs").unwrap();
    assert_eq!(gif.extra["format"], "video/h264-mp4");
    assert_eq!(out.text, vec!["hello".to_owned(), "3".to_owned()]);
    assert!(out.other.contains_key("scores"));
    assert!(out.other.contains_key("animated"));
    assert!(out.other.contains_key("empty"));

    // Unknown and custom message types never fail.
    let m =
        ServerMessage::from_json(r#"{"type": "crystools.monitor", "data": {"cpu": 3}}"#).unwrap();
    assert!(matches!(m, ServerMessage::Unknown { ref kind, .. } if kind == "crystools.monitor"));
    let m = ServerMessage::from_json(r#"{"type": "executing", "data": {"node": null}}"#).unwrap();
    assert!(matches!(m, ServerMessage::Executing(ref e) if e.is_done()));
    assert!(ServerMessage::from_json(r#"{"type": "progress", "data": {"value": "x"}}"#).is_err());
    let _: PromptAccepted = serde_json::from_str(r#"{"prompt_id": "p", "number": 1}"#).unwrap();
}
