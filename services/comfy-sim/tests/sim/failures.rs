use std::time::{Duration, Instant};

use comfy_sim::{Failure, SimConfig};
use serde_json::json;

use crate::helpers::*;

async fn history_status(h: &comfy_sim::SimHandle, id: &str) -> String {
    let id = id.to_owned();
    eventually("history", || {
        let id = id.clone();
        async move {
            let v = get(h, &format!("/history/{id}")).await.1;
            v.get(&id)
                .map(|e| e["status"]["status_str"].as_str().unwrap().to_owned())
        }
    })
    .await
}

#[tokio::test]
async fn node_exception_and_oom() {
    let h = sim().await;
    let mut ws = Ws::connect(&h, Some("e")).await;
    ws.next(Duration::from_secs(5)).await.unwrap();
    h.inject(Failure::exception(), 1);
    h.inject(Failure::oom(), 1);
    let id = submit(&h, invert("e/x", 8), Some("e")).await;
    let f = ws.until_done(&id).await;
    let k = kinds(&f);
    assert_eq!(
        &k[k.len() - 3..],
        ["execution_error", "status", "executing"]
    );
    let e = f[k.len() - 3].json()["data"].clone();
    assert_eq!(e["node_id"], "2");
    assert_eq!(e["node_type"], "ImageInvert");
    assert_eq!(e["exception_type"], "ValueError");
    assert_eq!(e["exception_message"], "sim induced failure\n");
    assert_eq!(e["executed"], json!(["1"]));
    assert!(e["traceback"].as_array().unwrap().len() >= 4);
    assert!(e["current_inputs"]["image"].is_array());
    assert!(e["timestamp"].is_u64());
    assert_eq!(history_status(&h, &id).await, "error");

    let id = submit(&h, invert("e/y", 8), Some("e")).await;
    let f = ws.until_done(&id).await;
    let e = f
        .iter()
        .find(|x| x.kind() == "execution_error")
        .unwrap()
        .json()["data"]
        .clone();
    assert_eq!(e["exception_type"], "torch.OutOfMemoryError");
    assert!(
        e["exception_message"]
            .as_str()
            .unwrap()
            .starts_with("Allocation on device")
    );

    // the recorded PeerFail node fails the same way as in 21_probe_fail (fresh process)
    let h = sim().await;
    let mut ws = Ws::connect(&h, Some("e")).await;
    ws.next(Duration::from_secs(5)).await.unwrap();
    let prompt = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PeerFail", "inputs": {"image": ["1", 0], "message": "peer induced failure"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "peer/never"}}
    });
    let id = submit(&h, prompt, Some("e")).await;
    let mut f = vec![Frame::Json(json!({"type": "status"}))];
    f.extend(ws.until_done(&id).await);
    assert_eq!(kinds(&f), recorded_kinds("21_probe_fail.jsonl"));
    let e = f
        .iter()
        .find(|x| x.kind() == "execution_error")
        .unwrap()
        .json()["data"]
        .clone();
    assert_eq!(e["exception_message"], "peer induced failure\n");
    assert_eq!(e["current_outputs"], json!(["1", "2", "3"]));
}

#[tokio::test]
async fn crash_mid_prompt_then_restart_loses_state() {
    let h = sim_with(SimConfig {
        startup_delay_ms: 300,
        ..SimConfig::default()
    })
    .await;
    let mut ws = Ws::connect(&h, Some("c")).await;
    ws.next(Duration::from_secs(5)).await.unwrap();
    let done = submit(&h, invert("c/a", 8), Some("c")).await;
    ws.until_done(&done).await;
    h.inject(Failure::CrashMidPrompt, 1);
    let id = submit(&h, slow(3, 1), Some("c")).await;
    let frames = ws.until_done(&id).await;
    assert_eq!(frames.last().unwrap().kind(), "closed");
    assert!(
        reqwest::get(format!("{}/prompt", h.base_url()))
            .await
            .is_err(),
        "HTTP refused while down"
    );
    assert!(h.wait_up(Duration::from_secs(5)).await);
    eventually("http back", || async {
        reqwest::get(format!("{}/prompt", h.base_url()))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    assert_eq!(get(&h, "/history").await.1, json!({}));
    assert_eq!(
        get(&h, "/queue").await.1,
        json!({"queue_running": [], "queue_pending": []})
    );
    assert_eq!(h.prompts_received().len(), 2);

    // manual crash and restart
    h.crash();
    eventually("down", || async {
        reqwest::get(format!("{}/prompt", h.base_url()))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    h.restart();
    eventually("up", || async {
        reqwest::get(format!("{}/prompt", h.base_url()))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn silent_and_dropped_websockets_still_complete() {
    let h = sim().await;
    let mut ws = Ws::connect(&h, Some("s")).await;
    ws.next(Duration::from_secs(5)).await.unwrap();
    h.inject(Failure::SilentWs, 1);
    let id = submit(&h, invert("s/a", 7), Some("s")).await;
    assert_eq!(history_status(&h, &id).await, "success");
    let mut k = vec![];
    while let Some(f) = ws.next(Duration::from_millis(200)).await {
        k.push(f.kind());
    }
    assert!(!k.contains(&"execution_success".to_owned()), "{k:?}");

    let mut ws = Ws::connect(&h, Some("d")).await;
    ws.next(Duration::from_secs(5)).await.unwrap();
    h.inject(Failure::DropWs, 1);
    let id = submit(&h, slow(100, 10), Some("d")).await;
    let frames = ws.until_done(&id).await;
    assert_eq!(frames.last().unwrap().kind(), "closed");
    let mut ws = Ws::connect(&h, Some("d")).await;
    let s = ws.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(s.kind(), "status", "{s:?}");
    let q = get(&h, "/queue").await.1;
    assert_eq!(q["queue_running"][0][1], id.as_str(), "{q}");
    ws.until_done(&id).await;
    assert_eq!(history_status(&h, &id).await, "success");
}

#[tokio::test]
async fn slow_view_and_startup_delay() {
    let h = comfy_sim::Simulator::start(SimConfig {
        startup_delay_ms: 300,
        slow_view_ms: 300,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    assert!(
        reqwest::get(format!("{}/prompt", h.base_url()))
            .await
            .is_err()
    );
    assert!(h.wait_up(Duration::from_secs(5)).await);
    let id = submit(&h, invert("v/a", 8), None).await;
    history_status(&h, &id).await;
    let t = Instant::now();
    let r = reqwest::get(format!(
        "{}/view?filename=a_00001_.png&subfolder=v&type=output",
        h.base_url()
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn big_outputs_are_padded_and_streamed() {
    let h = sim_with(SimConfig {
        output_bytes: 20 << 20,
        ..SimConfig::default()
    })
    .await;
    let prompt = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 2, "color": 0}},
        "2": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "big/anim", "fps": 4, "lossless": false, "quality": 80, "method": "default"}},
        "3": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 8}},
        "4": {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": "big/video", "format": "auto", "codec": "auto"}}
    });
    let id = submit(&h, prompt, None).await;
    assert_eq!(history_status(&h, &id).await, "success");
    let hist = get(&h, &format!("/history/{id}")).await.1;
    assert_eq!(hist[&id]["outputs"]["2"]["animated"], json!([true]));
    assert_eq!(
        hist[&id]["outputs"]["4"]["images"][0]["filename"],
        "video_00001_.mp4"
    );
    let r = reqwest::get(format!(
        "{}/view?filename=video_00001_.mp4&subfolder=big&type=output",
        h.base_url()
    ))
    .await
    .unwrap();
    assert_eq!(r.headers()["content-type"], "video/mp4");
    let b = r.bytes().await.unwrap();
    assert_eq!(b.len(), 20 << 20);
    assert_eq!(&b[4..8], b"ftyp");
}
