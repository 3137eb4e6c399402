//! `POST /v1/jobs` throughput and latency with a ~50 KB workflow, from
//! concurrent HTTP clients against the in-process stack (real nats-server;
//! no runner, so only submission is measured: the jobs queue up).
//!
//! `cargo run --release -p comfyq-tests --example submit_load -- [seconds] [clients]`

use std::time::{Duration, Instant};

use comfyq_tests::{StackOptions, TestStack};
use serde_json::{Value, json};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let clients: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(16);
    let stack = TestStack::start_with(StackOptions {
        runners: 0,
        configure_ingress: Some(|ingress| {
            ingress.rate_limit_per_s = 0;
            ingress.max_active_jobs = 0;
        }),
        ..StackOptions::default()
    })
    .await;
    let body = workflow_of_size(50 * 1024);
    let size = serde_json::to_vec(&body).map(|b| b.len()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, body) = (
            stack.http.clone(),
            format!("{}/v1/jobs", stack.api),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let started = Instant::now();
                match http.post(&url).json(&body).send().await {
                    Ok(r) if r.status() == 202 => latencies.push(started.elapsed()),
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await.expect("client task");
        latencies.extend(l);
        errors += e;
    }
    latencies.sort();
    let q =
        |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    println!(
        "POST /v1/jobs, {size} B workflow, {clients} clients, {seconds} s: {} accepted ({:.0}/s), {errors} errors; latency p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        latencies.len(),
        latencies.len() as f64 / seconds as f64,
        q(0.5),
        q(0.99),
        q(1.0)
    );
    stack.stop().await;
}

/// A valid API-format workflow padded to about `bytes` with prompt text, as
/// big SD/Flux workflows are.
fn workflow_of_size(bytes: usize) -> Value {
    let mut workflow = serde_json::Map::new();
    let mut i = 1;
    let chunk = "a detailed photograph of a mountain lake at dawn, ".repeat(20);
    while serde_json::to_vec(&workflow).map(|b| b.len()).unwrap_or(0) < bytes {
        workflow.insert(
            i.to_string(),
            json!({"class_type": "CLIPTextEncode", "inputs": {"text": chunk, "clip": ["0", 1]}}),
        );
        i += 1;
    }
    workflow.insert(
        "0".to_owned(),
        json!({"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sim.safetensors"}}),
    );
    json!({ "workflow": Value::Object(workflow) })
}
