//! End-to-end latency of zero-work jobs through the whole stack, in one
//! process (real nats-server, the four services, the ComfyUI simulator with
//! no per-node delay): submit over HTTP → `job.completed` seen by a NATS
//! subscriber. Jobs go one at a time, so this is latency, not throughput.
//!
//! `cargo run --release -p comfyq-tests --example e2e_latency -- [jobs]`

use std::time::{Duration, Instant};

use comfyq_tests::stack::invert_workflow;
use comfyq_tests::{StackOptions, TestStack};
use futures::StreamExt;
use serde_json::json;

#[tokio::main]
async fn main() {
    let jobs: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let sim = comfy_sim::SimConfig {
        step_delay_ms: 0,
        node_delay_ms: 0,
        previews: false,
        ..comfy_sim::SimConfig::default()
    };
    let stack = TestStack::start_with(StackOptions {
        sim,
        ..StackOptions::default()
    })
    .await;
    let client = stack.nats.client().await;
    let mut completed = client
        .subscribe("comfyq.events.*.*.completed")
        .await
        .expect("subscribe to completions");

    let body = json!({"workflow": invert_workflow(8)});
    // Warm up connections and caches; not measured.
    for _ in 0..5 {
        stack.submit(body.clone()).await;
        completed.next().await;
    }
    let mut submit = Vec::with_capacity(jobs);
    let mut total = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let started = Instant::now();
        let job = stack.submit(body.clone()).await;
        submit.push(started.elapsed());
        let id = job["id"].as_str().expect("job id").to_owned();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), completed.next())
                .await
                .expect("job completes within 30 s")
                .expect("subscription open");
            if message.subject.as_str().contains(&id) {
                break;
            }
        }
        total.push(started.elapsed());
    }
    println!("{jobs} zero-work jobs, one at a time (submit → job.completed on NATS)");
    report("submit (POST /v1/jobs → 202)", &mut submit);
    report("end to end (POST → completed)", &mut total);
    stack.stop().await;
}

fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{what:<32} p50 {:>7.2} ms   p90 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms",
        at(0.5).as_secs_f64() * 1e3,
        at(0.9).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3,
    );
}
