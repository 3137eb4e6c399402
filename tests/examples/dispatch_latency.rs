//! Dispatch latency: job accepted (the record's `created_at`, set by
//! ingress) → a runner has it (`started_at`, the runner's report right after
//! it pulled the job), both read from the job records.
//! - idle: one job at a time, an idle runner;
//! - backlog: 1,000 `low` jobs pending while one runner (one slot) works
//!   through them; a `high` job submitted meanwhile starts after at most the
//!   job in progress, because the scheduler decides at the last moment.
//!
//! `cargo run --release -p comfyq-tests --example dispatch_latency`

use std::time::Duration;

use comfyq_tests::stack::invert_workflow;
use comfyq_tests::{StackOptions, TestStack};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

fn dispatch_ms(job: &Value) -> f64 {
    let at =
        |field: &str| OffsetDateTime::parse(job[field].as_str().unwrap_or_default(), &Rfc3339).ok();
    match (at("created_at"), at("started_at")) {
        (Some(created), Some(started)) => (started - created).as_seconds_f64() * 1e3,
        _ => f64::NAN,
    }
}

fn report(what: &str, samples: &mut [f64]) {
    samples.sort_by(f64::total_cmp);
    let q = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    println!(
        "{what:<58} n={:<4} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        samples.len(),
        q(0.5),
        q(0.99),
        q(1.0)
    );
}

#[tokio::main]
async fn main() {
    let sim = comfy_sim::SimConfig {
        step_delay_ms: 0,
        node_delay_ms: 0,
        previews: false,
        ..comfy_sim::SimConfig::default()
    };
    let stack = TestStack::start_with(StackOptions {
        sim,
        configure_ingress: Some(|ingress| {
            ingress.rate_limit_per_s = 0;
            ingress.max_active_jobs = 0;
        }),
        ..StackOptions::default()
    })
    .await;
    let workflow = invert_workflow(8);

    // Idle runner, one job at a time (after a warm-up).
    let mut idle = Vec::new();
    for i in 0..105 {
        let job = stack.submit(json!({"workflow": workflow})).await;
        let done = stack
            .wait_finished(job["id"].as_str().expect("id"), Duration::from_secs(30))
            .await;
        if i >= 5 {
            idle.push(dispatch_ms(&done));
        }
    }
    report("idle runner: accepted → runner has it", &mut idle);

    // 1,000 low jobs pending; high jobs submitted while they drain.
    let mut low = Vec::new();
    for _ in 0..1000 {
        let job = stack
            .submit(json!({"workflow": workflow, "priority": "low"}))
            .await;
        low.push(job["id"].as_str().expect("id").to_owned());
    }
    let mut high = Vec::new();
    for _ in 0..50 {
        let job = stack
            .submit(json!({"workflow": workflow, "priority": "high"}))
            .await;
        let done = stack
            .wait_finished(job["id"].as_str().expect("id"), Duration::from_secs(60))
            .await;
        high.push(dispatch_ms(&done));
    }
    let last = stack
        .wait_finished(low.last().expect("low jobs"), Duration::from_secs(600))
        .await;
    let mut low_waits = Vec::new();
    for id in &low {
        low_waits.push(dispatch_ms(&stack.job(id).await));
    }
    report("backlog: high job while 1,000 low pending", &mut high);
    report(
        "backlog: the 1,000 low jobs (queue wait included)",
        &mut low_waits,
    );
    println!("last low job status: {}", last["status"]);
    stack.stop().await;
}
