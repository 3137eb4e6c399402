use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

fn recorded(name: &str) -> (Value, u16) {
    let t = std::fs::read_to_string(format!("{RECORDINGS}/responses/{name}.response.txt")).unwrap();
    let (body, status) = t.trim_end().rsplit_once("\nHTTP ").unwrap();
    (
        serde_json::from_str(body).unwrap_or(Value::Null),
        status.parse().unwrap(),
    )
}

/// Sorts each node's error list so set-ordered Python output compares.
fn normalized(mut v: Value) -> Value {
    if let Some(ne) = v["node_errors"].as_object_mut() {
        for e in ne.values_mut() {
            if let Some(errs) = e["errors"].as_array_mut() {
                errs.sort_by_key(|x| x["type"].to_string());
            }
        }
    }
    v
}

#[tokio::test]
async fn validation_bodies_match_the_recordings() {
    let h = sim().await;
    let cases = [
        (
            "05_validation_fail",
            json!({
                "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}},
                "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "no-such-method", "width": 8, "height": 8, "crop": "disabled"}},
                "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}
            }),
        ),
        (
            "13_unknown_node",
            json!({"1": {"class_type": "NoSuchNode", "inputs": {}}}),
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
    ];
    for (name, prompt) in cases {
        let (want, want_status) = recorded(name);
        let (status, got) = post(&h, "/prompt", json!({"prompt": prompt})).await;
        assert_eq!(status, want_status, "{name}");
        assert_eq!(normalized(got), normalized(want), "{name}");
    }
    let (want, _) = recorded("no_prompt_key");
    let (status, got) = post(&h, "/api/prompt", json!({"client_id": "x"})).await;
    assert_eq!((status, got), (400, want));

    let r = reqwest::Client::new()
        .post(format!("{}/prompt", h.base_url()))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 500);
    assert_eq!(
        r.text().await.unwrap(),
        "500 Internal Server Error\n\nServer got itself in trouble"
    );
}

#[tokio::test]
async fn partially_invalid_prompt_runs_the_valid_output() {
    let h = sim().await;
    let prompt = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "peer/partial_ok"}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus", "width": 8, "height": 8, "crop": "disabled"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "peer/partial_bad"}}
    });
    let (status, v) = post(&h, "/prompt", json!({"prompt": prompt, "client_id": "pi"})).await;
    assert_eq!(status, 200);
    let t = std::fs::read_to_string(format!("{RECORDINGS}/transcripts/12_partial_invalid.jsonl"))
        .unwrap();
    let rec: Value = t
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["kind"] == "http")
        .unwrap();
    assert_eq!(v["node_errors"], rec["body"]["node_errors"]);
    let id = v["prompt_id"].as_str().unwrap().to_owned();
    let hist = eventually("history", || {
        let h = &h;
        let id = id.clone();
        async move { get(h, &format!("/history/{id}")).await.1.get(&id).cloned() }
    })
    .await;
    assert_eq!(hist["prompt"][4], json!(["2"]));
    assert_eq!(
        hist["outputs"]["2"]["images"][0]["filename"],
        "partial_ok_00001_.png"
    );
}

async fn upload(
    h: &comfy_sim::SimHandle,
    name: &str,
    data: &[u8],
    extra: &[(&str, &str)],
) -> (u16, Value) {
    let mut form = reqwest::multipart::Form::new().part(
        "image",
        reqwest::multipart::Part::bytes(data.to_vec()).file_name(name.to_owned()),
    );
    for (k, v) in extra {
        form = form.text((*k).to_owned(), (*v).to_owned());
    }
    let r = reqwest::Client::new()
        .post(format!("{}/upload/image", h.base_url()))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (
        s,
        serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn upload_rename_rule_and_view_refusals() {
    let h = sim().await;
    assert_eq!(
        upload(&h, "a.png", b"one", &[]).await,
        (
            200,
            json!({"name": "a.png", "subfolder": "", "type": "input"})
        )
    );
    assert_eq!(upload(&h, "a.png", b"one", &[]).await.1["name"], "a.png");
    assert_eq!(
        upload(&h, "a.png", b"two", &[]).await.1["name"],
        "a (1).png"
    );
    assert_eq!(
        upload(&h, "a.png", b"three", &[("overwrite", "true")])
            .await
            .1["name"],
        "a.png"
    );
    assert_eq!(
        upload(&h, "s.png", b"x", &[("subfolder", "sub")]).await.1,
        json!({"name": "s.png", "subfolder": "sub", "type": "input"})
    );
    assert_eq!(
        upload(&h, "s.png", b"x", &[("subfolder", "../..")]).await.0,
        400
    );
    assert_eq!(
        h.files(comfy_sim::DirKind::Input),
        ["a (1).png", "a.png", "sub/s.png"]
    );

    let status = |q: &'static str| {
        let url = format!("{}/view{q}", h.base_url());
        async move { reqwest::get(url).await.unwrap().status().as_u16() }
    };
    assert_eq!(status("?filename=a.png&type=input").await, 200);
    assert_eq!(status("?filename=a.png").await, 404);
    assert_eq!(status("?filename=a.png%20%5Binput%5D").await, 200);
    assert_eq!(status("?filename=../secret&type=output").await, 400);
    assert_eq!(
        status("?filename=x.png&subfolder=../../&type=output").await,
        403
    );
    assert_eq!(status("?filename=x.png&type=bogus").await, 400);
    assert_eq!(status("").await, 404);
    assert_eq!(status("?filename=/etc/passwd&type=input").await, 400);
}

#[tokio::test]
async fn queue_delete_and_targeted_interrupt() {
    let h = sim().await;
    let mut ws = Ws::connect(&h, Some("q")).await;
    ws.next(Duration::from_secs(5)).await.unwrap();
    let running = submit(&h, slow(200, 10), Some("q")).await;
    let a = submit(&h, invert("q/a", 8), Some("q")).await;
    let b = submit(&h, invert("q/b", 8), Some("q")).await;
    let q = get(&h, "/queue").await.1;
    assert_eq!(q["queue_running"][0][1], running.as_str());
    assert_eq!(q["queue_running"][0].as_array().unwrap().len(), 5);
    assert_eq!(q["queue_pending"].as_array().unwrap().len(), 2);
    assert_eq!(
        post(&h, "/queue", json!({"delete": [b, running]})).await.0,
        200
    );
    let q = get(&h, "/queue").await.1;
    let pending: Vec<&str> = q["queue_pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i[1].as_str().unwrap())
        .collect();
    assert_eq!(pending, [a.as_str()]);
    assert_eq!(q["queue_running"][0][1], running.as_str());

    // an interrupt for another id does nothing; for the running one it interrupts
    assert_eq!(post(&h, "/interrupt", json!({"prompt_id": a})).await.0, 200);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        get(&h, "/queue").await.1["queue_running"][0][1],
        running.as_str()
    );
    assert_eq!(
        post(&h, "/api/interrupt", json!({"prompt_id": running}))
            .await
            .0,
        200
    );
    let frames = ws.until_done(&running).await;
    let k = kinds(&frames);
    let i = k.iter().position(|x| x == "execution_interrupted").unwrap();
    assert_eq!(&k[i..], ["execution_interrupted", "status", "executing"]);
    let d = frames[i].json()["data"].clone();
    assert_eq!(d["node_id"], "2");
    assert_eq!(d["node_type"], "PeerSlowProgress");
    assert_eq!(d["executed"], json!(["1"]));
    let hist = get(&h, &format!("/history/{running}")).await.1;
    assert_eq!(hist[&running]["status"]["status_str"], "error");
    ws.until_done(&a).await;
}
