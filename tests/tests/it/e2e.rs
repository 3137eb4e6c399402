//! One job all the way through: REST → NATS → scheduler → runner → ComfyUI
//! (simulated) → object store → REST, with a signed webhook at the end.

use std::time::Duration;

use comfyq_tests::stack::{self, invert_workflow};
use comfyq_tests::{StackOptions, TestStack, eventually};
use serde_json::{Value, json};
use sha2::Digest;

/// Downloads a file straight from the simulator, as ComfyUI serves it.
async fn from_comfyui(stack: &TestStack, filename: &str, subfolder: &str) -> Vec<u8> {
    let url = format!(
        "{}/view?filename={filename}&subfolder={subfolder}&type=output",
        stack.sim.base_url()
    );
    let response = reqwest::get(url).await.expect("GET /view");
    assert!(
        response.status().is_success(),
        "/view answered {}",
        response.status()
    );
    response.bytes().await.expect("view body").to_vec()
}

fn verify_signature(webhook: &comfyq_tests::ReceivedWebhook) {
    let verifier = standardwebhooks::Webhook::new(stack::WEBHOOK_SECRET).expect("valid secret");
    verifier
        .verify(&webhook.body, &webhook.headers)
        .expect("webhook signature verifies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_goes_all_the_way_through() {
    let stack = TestStack::start().await;
    let job = stack
        .submit(json!({
            "workflow": invert_workflow(64),
            "webhook": {"url": stack.webhooks.url("/hooks/done")},
            "metadata": {"order": 42}
        }))
        .await;
    // The scheduler may handle the submission before ingress creates the
    // record (it then creates it itself): ingress answers with that record.
    assert!(
        matches!(job["status"].as_str(), Some("accepted" | "queued")),
        "{job:#}"
    );
    let id = job["id"].as_str().expect("job id").to_owned();

    let finished = stack.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(finished["status"], "completed", "{finished:#}");
    assert_eq!(finished["attempt"], 1);
    assert_eq!(finished["runner"], "runner-0");
    for stamp in ["created_at", "queued_at", "started_at", "finished_at"] {
        assert!(finished[stamp].is_string(), "{stamp} missing: {finished:#}");
    }
    let outputs = finished["outputs"].as_array().expect("outputs");
    assert_eq!(outputs.len(), 1, "{finished:#}");
    let output = &outputs[0];
    assert_eq!(output["node_id"], "3");
    assert_eq!(output["kind"], "images");
    assert_eq!(output["content_type"], "image/png");

    // The bytes through comfyq are the bytes ComfyUI produced.
    let name = output["name"].as_str().expect("name");
    let response = stack
        .http
        .get(format!(
            "{}{}",
            stack.api,
            output["url"].as_str().expect("url")
        ))
        .send()
        .await
        .expect("GET output");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    let ours = response.bytes().await.expect("output bytes");
    let original = from_comfyui(&stack, name, "comfyq").await;
    assert_eq!(ours.as_ref(), original.as_slice());
    assert_eq!(output["size"], original.len());
    assert_eq!(
        output["sha256"],
        hex::encode(sha2::Sha256::digest(&original))
    );

    // One signed webhook for the terminal event, carrying the outputs.
    let hooks = stack.webhooks.wait_for(1, Duration::from_secs(15)).await;
    let hook = &hooks[0];
    assert_eq!(hook.path(), "/hooks/done");
    verify_signature(hook);
    let body: Value = hook.json();
    assert_eq!(body["type"], "job.completed");
    assert_eq!(body["data"]["job"]["id"], id.as_str());
    assert_eq!(body["data"]["job"]["metadata"]["order"], 42);
    assert_eq!(body["data"]["job"]["outputs"][0]["name"], name);
    assert_eq!(hook.header("webhook-id"), body["id"].as_str());
    // The job shows where its webhook stands.
    let delivered = eventually(
        Duration::from_secs(10),
        "delivery in the job view",
        async || {
            let job = stack.job(&id).await;
            (job["webhook_deliveries"][0]["state"] == "delivered").then_some(job)
        },
    )
    .await;
    assert_eq!(delivered["webhook_deliveries"][0]["type"], "job.completed");
    assert_eq!(delivered["webhook_deliveries"][0]["attempts"], 1);

    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_are_uploaded_and_referenced_by_name() {
    let stack = TestStack::start().await;
    // A real PNG, made by the simulator itself in an earlier job.
    let seed = stack.submit(json!({"workflow": invert_workflow(16)})).await;
    let seed = stack
        .wait_finished(seed["id"].as_str().expect("id"), Duration::from_secs(30))
        .await;
    let png = from_comfyui(
        &stack,
        seed["outputs"][0]["name"].as_str().expect("name"),
        "comfyq",
    )
    .await;

    use base64::Engine as _;
    let job = stack
        .submit(json!({
            "workflow": {
                "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
                "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "comfyq/loaded"}}
            },
            "inputs": [{"name": "photo.png", "data": base64::engine::general_purpose::STANDARD.encode(&png)}]
        }))
        .await;
    assert_eq!(job["inputs"][0]["content_type"], "image/png");
    let id = job["id"].as_str().expect("id");
    let finished = stack.wait_finished(id, Duration::from_secs(30)).await;
    assert_eq!(finished["status"], "completed", "{finished:#}");
    // The input reached ComfyUI under the job's own subfolder.
    let inputs = stack.sim.files(comfy_sim::DirKind::Input);
    assert!(
        inputs
            .iter()
            .any(|f| f.contains(&format!("comfyq-{id}")) && f.ends_with("photo.png")),
        "{inputs:?}"
    );
    // And comfyq serves the input back.
    let stored = stack
        .http
        .get(format!("{}/v1/jobs/{id}/inputs/photo.png", stack.api))
        .send()
        .await
        .expect("GET input");
    assert_eq!(
        stored.bytes().await.expect("bytes").as_ref(),
        png.as_slice()
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_exception_fails_the_job_without_retry() {
    let stack = TestStack::start().await;
    stack.sim.inject(comfy_sim::Failure::exception(), 1);
    let job = stack
        .submit(
            json!({"workflow": invert_workflow(8), "webhook": {"url": stack.webhooks.url("/h")}}),
        )
        .await;
    let finished = stack
        .wait_finished(job["id"].as_str().expect("id"), Duration::from_secs(30))
        .await;
    assert_eq!(finished["status"], "failed", "{finished:#}");
    assert_eq!(finished["attempt"], 1, "user errors are not retried");
    assert_eq!(finished["error"]["kind"], "execution");
    assert!(finished["error"]["node_type"].is_string(), "{finished:#}");
    assert!(
        !finished["error"]["traceback"]
            .as_array()
            .expect("traceback")
            .is_empty()
    );
    let hooks = stack.webhooks.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(hooks[0].json()["type"], "job.failed");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfyui_validation_errors_are_user_errors() {
    let stack = TestStack::start().await;
    let job = stack
        .submit(json!({"workflow": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
        }}))
        .await;
    let finished = stack
        .wait_finished(job["id"].as_str().expect("id"), Duration::from_secs(30))
        .await;
    assert_eq!(finished["status"], "failed");
    assert_eq!(finished["error"]["kind"], "validation");
    assert!(
        finished["error"]["details"]["1"].is_object(),
        "{finished:#}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_memory_error_is_retried_and_completes() {
    let stack = TestStack::start().await;
    stack.sim.inject(comfy_sim::Failure::oom(), 1);
    let job = stack.submit(json!({"workflow": invert_workflow(8)})).await;
    let finished = stack
        .wait_finished(job["id"].as_str().expect("id"), Duration::from_secs(30))
        .await;
    assert_eq!(finished["status"], "completed", "{finished:#}");
    assert_eq!(finished["attempt"], 2);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_survives_a_nats_restart_while_running() {
    // Long enough to restart NATS while ComfyUI works: 20 steps × 100 ms.
    let sim = comfy_sim::SimConfig {
        step_delay_ms: 100,
        ..comfy_sim::SimConfig::default()
    };
    let mut stack = TestStack::start_with(StackOptions {
        sim,
        ..StackOptions::default()
    })
    .await;
    let job = stack
        .submit(json!({
            "workflow": {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                "2": {"class_type": "PeerSlowProgress", "inputs": {"image": ["1", 0], "steps": 20, "step_ms": 100, "send_previews": false, "preview_format": "PNG"}},
                "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "comfyq/slow"}}
            },
            "webhook": {"url": stack.webhooks.url("/after-restart")}
        }))
        .await;
    let id = job["id"].as_str().expect("id").to_owned();
    eventually(Duration::from_secs(15), "the job is running", async || {
        (stack.job(&id).await["status"] == "running").then_some(())
    })
    .await;

    stack.nats.stop();
    tokio::time::sleep(Duration::from_millis(700)).await; // an outage, not a wait for a condition
    stack.nats.restart().await;

    let finished = stack.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(finished["status"], "completed", "{finished:#}");
    assert_eq!(finished["outputs"].as_array().map(Vec::len), Some(1));
    let hooks = stack.webhooks.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(hooks[0].json()["type"], "job.completed");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_survives_a_nats_restart_before_dispatch() {
    let mut stack = TestStack::start().await;
    stack.nats.stop();
    stack.nats.restart().await;
    // The services reconnect by themselves; a job submitted now completes.
    let job = eventually(
        Duration::from_secs(20),
        "ingress accepts again",
        async || {
            let response = stack
                .http
                .post(format!("{}/v1/jobs", stack.api))
                .json(&json!({"workflow": invert_workflow(8)}))
                .send()
                .await
                .ok()?;
            (response.status() == 202).then_some(response.json::<Value>().await.ok()?)
        },
    )
    .await;
    let finished = stack
        .wait_finished(job["id"].as_str().expect("id"), Duration::from_secs(30))
        .await;
    assert_eq!(finished["status"], "completed", "{finished:#}");
    stack.stop().await;
}
