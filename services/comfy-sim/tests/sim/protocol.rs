use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn successful_prompt_matches_the_recorded_order_and_cached_rerun() {
    let h = sim().await;
    let mut ws = Ws::connect(&h, Some("c1")).await;
    let first = ws.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.json()["data"]["sid"], "c1");
    let id = submit(&h, invert("peer/invert", 64), Some("c1")).await;
    let mut got = vec![first];
    got.extend(ws.until_done(&id).await);
    assert_eq!(kinds(&got), recorded_kinds("01a_first_run.jsonl"));
    let executed = got
        .iter()
        .find(|f| f.kind() == "executed")
        .unwrap()
        .json()
        .clone();
    assert_eq!(
        executed["data"]["output"],
        json!({"images": [{"filename": "invert_00001_.png", "subfolder": "peer", "type": "output"}]})
    );
    let hist = get(&h, &format!("/history/{id}")).await.1;
    let e = &hist[&id];
    assert_eq!(e["status"]["status_str"], "success");
    assert_eq!(e["prompt"][0], json!(0));
    assert_eq!(e["prompt"][4], json!(["3"]));
    assert_eq!(e["meta"]["3"]["real_node_id"], "3");
    let msgs: Vec<&str> = e["status"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[0].as_str().unwrap())
        .collect();
    assert_eq!(
        msgs,
        ["execution_start", "execution_cached", "execution_success"]
    );

    // the same prompt again is served from cache (01b)
    let id2 = submit(&h, invert("peer/invert", 64), Some("c1")).await;
    let mut got = vec![Frame::Json(json!({"type": "status"}))];
    got.extend(ws.until_done(&id2).await);
    assert_eq!(kinds(&got), recorded_kinds("01b_cached_rerun.jsonl"));
    let cached = got.iter().find(|f| f.kind() == "execution_cached").unwrap();
    assert_eq!(cached.json()["data"]["nodes"], json!(["1", "2", "3"]));
    let executed2 = got
        .iter()
        .find(|f| f.kind() == "executed")
        .unwrap()
        .json()
        .clone();
    assert_eq!(executed2["data"]["output"], executed["data"]["output"]);

    // the file is real and served by /view
    let r = reqwest::get(format!(
        "{}/view?filename=invert_00001_.png&subfolder=peer&type=output",
        h.base_url()
    ))
    .await
    .unwrap();
    assert_eq!(r.headers()["content-type"], "image/png");
    let b = r.bytes().await.unwrap();
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
}

#[tokio::test]
async fn routing_by_client_id_and_without_one() {
    let h = sim().await;
    let mut a = Ws::connect(&h, Some("alice")).await;
    let mut b = Ws::connect(&h, Some("bob")).await;
    let mut anon = Ws::connect(&h, None).await;
    for ws in [&mut a, &mut b, &mut anon] {
        ws.next(Duration::from_secs(5)).await.unwrap();
    }
    let id = submit(&h, invert("r/x", 8), Some("alice")).await;
    a.until_done(&id).await;
    let mut seen = vec![];
    while let Some(f) = b.next(Duration::from_millis(200)).await {
        seen.push(f.kind());
    }
    assert_eq!(seen, ["status", "status", "status"]);
    while anon.next(Duration::from_millis(50)).await.is_some() {}

    // without client_id: progress_state goes to everyone, nothing else but status
    let (_, v) = post(&h, "/prompt", json!({"prompt": invert("r/y", 9)})).await;
    let id = v["prompt_id"].as_str().unwrap().to_owned();
    eventually("history", || {
        let h = &h;
        let id = id.clone();
        async move {
            get(h, &format!("/history/{id}"))
                .await
                .1
                .get(&id)
                .map(|_| ())
        }
    })
    .await;
    let mut seen = vec![];
    while let Some(f) = anon.next(Duration::from_millis(200)).await {
        seen.push(f.kind());
    }
    let mut want = vec!["status", "status"];
    want.extend(["progress_state"; 6]);
    want.push("status");
    assert_eq!(seen, want);
}

#[tokio::test]
async fn preview_frames_legacy_and_with_metadata() {
    let h = sim().await;
    let mut ws = Ws::connect(&h, Some("p1")).await;
    ws.next(Duration::from_secs(5)).await.unwrap();
    let id = submit(&h, slow(5, 1), Some("p1")).await;
    let mut got = vec![Frame::Json(json!({"type": "status"}))];
    got.extend(ws.until_done(&id).await);
    assert_eq!(
        kinds(&got),
        recorded_kinds("20_probe_previews_legacy.jsonl")
    );
    let Frame::Bin(b) = got.iter().find(|f| f.kind() == "binary1").unwrap() else {
        unreachable!()
    };
    assert_eq!(&b[4..8], &1u32.to_be_bytes());
    assert_eq!(&b[8..10], &[0xff, 0xd8]);

    let mut ws = Ws::connect(&h, Some("p2")).await;
    ws.next(Duration::from_secs(5)).await.unwrap();
    ws.send_json(json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}}))
        .await;
    let ff = ws.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        ff.json(),
        &json!({"type": "feature_flags", "data": {"supports_preview_metadata": true, "max_upload_size": 104857600}})
    );
    let id = submit(&h, slow(5, 1), Some("p2")).await;
    let mut got = vec![Frame::Json(json!({"type": "status"})), ff];
    got.extend(ws.until_done(&id).await);
    assert_eq!(
        kinds(&got),
        recorded_kinds("20_probe_previews_metadata.jsonl")
    );
    let Frame::Bin(b) = got.iter().find(|f| f.kind() == "binary4").unwrap() else {
        unreachable!()
    };
    let len = u32::from_be_bytes([b[4], b[5], b[6], b[7]]) as usize;
    let meta: serde_json::Value = serde_json::from_slice(&b[8..8 + len]).unwrap();
    assert_eq!(
        meta,
        json!({"node_id": "2", "prompt_id": id, "display_node_id": "2", "parent_node_id": null, "real_node_id": "2", "image_type": "image/jpeg"})
    );
    assert_eq!(&b[8 + len..8 + len + 2], &[0xff, 0xd8]);
}

#[tokio::test]
async fn text_frame_from_get_image_size() {
    let h = sim().await;
    let mut ws = Ws::connect(&h, Some("t")).await;
    ws.next(Duration::from_secs(5)).await.unwrap();
    let prompt = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 30, "batch_size": 2, "color": 0}},
        "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}
    });
    let id = submit(&h, prompt, Some("t")).await;
    let mut got = vec![Frame::Json(json!({"type": "status"}))];
    got.extend(ws.until_done(&id).await);
    assert_eq!(
        kinds(&got),
        recorded_kinds("07_text_frame_preview_any.jsonl")
    );
    let Frame::Bin(b) = got.iter().find(|f| f.kind() == "binary3").unwrap() else {
        unreachable!()
    };
    assert_eq!(&b[4..8], &1u32.to_be_bytes());
    assert_eq!(&b[8..9], b"2");
    assert_eq!(
        std::str::from_utf8(&b[9..]).unwrap(),
        "width: 40, height: 30\n batch size: 2"
    );
    let ex = got.iter().find(|f| f.kind() == "executed").unwrap();
    assert_eq!(ex.json()["data"]["output"], json!({"text": ["40"]}));
}

#[tokio::test]
async fn history_is_empty_until_done_and_reconnect_gets_current_node() {
    let h = sim().await;
    let mut ws = Ws::connect(&h, Some("rc")).await;
    ws.next(Duration::from_secs(5)).await.unwrap();
    let id = submit(&h, slow(40, 10), Some("rc")).await;
    loop {
        let f = ws.next(Duration::from_secs(5)).await.unwrap();
        if f.kind() == "progress" {
            break;
        }
    }
    assert_eq!(get(&h, &format!("/history/{id}")).await.1, json!({}));
    drop(ws);
    let mut ws = Ws::connect(&h, Some("rc")).await;
    let s = ws.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(s.json()["data"]["sid"], "rc");
    assert_eq!(
        s.json()["data"]["status"]["exec_info"]["queue_remaining"],
        1
    );
    let e = ws.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        e.json(),
        &json!({"type": "executing", "data": {"node": "2"}})
    );
    let rest = ws.until_done(&id).await;
    let k = kinds(&rest);
    let success = k.iter().position(|x| x == "execution_success").unwrap();
    assert_eq!(&k[success..], ["execution_success", "status", "executing"]);
    assert_eq!(
        get(&h, &format!("/history/{id}")).await.1[&id]["status"]["status_str"],
        "success"
    );
}
