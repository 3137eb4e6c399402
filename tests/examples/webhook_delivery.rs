//! Webhook delivery, measured on the notifier alone (real nats-server, a
//! local receiver answering 200 at once):
//! - latency: a `job.completed` event stored → the receiver has the POST,
//!   one event at a time;
//! - throughput: 10,000 deliveries queued while the notifier is down, then
//!   drained by one notifier to one receiver.
//!
//! `cargo run --release -p comfyq-tests --example webhook_delivery -- [backlog]`

use std::time::{Duration, Instant};

use comfyq_shared::job::{JobRecord, JobSpec, JobStatus, WebhookSpec};
use comfyq_shared::job_store::JobStore;
use comfyq_shared::{JobId, Names, PoolName, Priority, TenantId};
use comfyq_tests::stack::{TENANT, nats_config, notifier_config};
use comfyq_tests::{NatsServer, WebhookSink};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let backlog: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let nats = NatsServer::start().await;
    let sink = WebhookSink::start().await;
    let config = nats_config(&nats.url());
    let names = Names::default();
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let shared = comfyq_shared::provision::provision(&js, &names, &config)
        .await
        .expect("provision");
    let jobs = JobStore::new(js.clone(), client.clone(), shared.events, names.clone());
    let tenant = TenantId::new(TENANT).expect("tenant");

    // One completed job record with a webhook per delivery: writing it
    // writes its webhook work item with it.
    let make_record = |i: usize| {
        let spec = JobSpec {
            id: JobId::new(),
            tenant: tenant.clone(),
            priority: Priority::Normal,
            pool: PoolName::default(),
            workflow: Default::default(),
            inputs: vec![],
            webhook: Some(WebhookSpec {
                url: sink.url(&format!("/w/{i}")),
                events: vec![],
            }),
            metadata: None,
            timeout_s: 60,
            inline_outputs: false,
            runner_labels: Default::default(),
            every_progress_event: false,
            comfy: None,
            created_at: time::OffsetDateTime::now_utc(),
        };
        let mut record = JobRecord::accepted(&spec);
        record.status = JobStatus::Completed;
        record.attempt = 1;
        record
    };
    let publish = async |record: &JobRecord| {
        jobs.update(record, 0)
            .await
            .expect("record and webhook work stored");
    };

    let notifier = |stop: CancellationToken| {
        tokio::spawn(comfyq_notifier::run(notifier_config(&config), stop))
    };
    let stop = CancellationToken::new();
    let running = notifier(stop.clone());
    // Its durable consumer starts at new events: wait until it exists.
    let stream = js
        .get_stream(names.events_stream())
        .await
        .expect("events stream");
    comfyq_tests::eventually(Duration::from_secs(10), "notifier consumer", async || {
        stream
            .consumer_info(names.notifier_consumer())
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    // Latency, one at a time.
    let mut latencies = Vec::new();
    for i in 0..(200 + 20) {
        let record = make_record(i);
        let before = sink.requests().len();
        let started = Instant::now();
        publish(&record).await;
        let received = sink.wait_for(before + 1, Duration::from_secs(10)).await;
        let at = received.last().expect("a request").received_at;
        if i >= 20 {
            latencies.push(at.duration_since(started)); // the first 20 warm up
        }
    }
    latencies.sort();
    let q =
        |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    println!(
        "delivery latency (event stored → POST received), {} events: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        latencies.len(),
        q(0.5),
        q(0.99),
        q(1.0)
    );

    // Throughput: a backlog built while the notifier is down.
    stop.cancel();
    running.await.expect("task").expect("notifier");
    sink.clear();
    for i in 0..backlog {
        publish(&make_record(100_000 + i)).await;
    }
    let started = Instant::now();
    let running = notifier(CancellationToken::new());
    sink.wait_for(backlog, Duration::from_secs(600)).await;
    let elapsed = started.elapsed();
    println!(
        "backlog of {backlog} deliveries drained in {:.2} s: {:.0} webhooks/s (one notifier, one receiver)",
        elapsed.as_secs_f64(),
        backlog as f64 / elapsed.as_secs_f64()
    );
    running.abort();
}
