//! Events for NATS subscribers: the example subscribers (Rust and Python)
//! follow a real job from the stream, and every event matches its schema.

use std::time::Duration;

use comfyq_shared::{JobId, Names, TenantId};
use comfyq_tests::TestStack;
use comfyq_tests::stack::{self, slow_workflow};
use serde_json::json;

#[path = "../../examples/subscribe_job.rs"]
#[allow(dead_code)]
mod subscribe_job;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_subscribers_follow_a_job() {
    let stack = TestStack::start().await;
    let job = stack
        .submit(json!({"workflow": slow_workflow(3, 20, "comfyq/events")}))
        .await;
    let id: JobId = job["id"].as_str().expect("id").parse().expect("job id");
    stack
        .wait_finished(&id.to_string(), Duration::from_secs(30))
        .await;
    let tenant = TenantId::new(stack::TENANT).expect("tenant");

    // Rust: replayed from the stream after the job ended, in order.
    let client = stack.nats.client().await;
    let events = subscribe_job::follow_job(client, &Names::default(), &tenant, &id)
        .await
        .expect("subscriber follows the job");
    let types: Vec<String> = events.iter().map(|(_, e)| e.type_name()).collect();
    for expected in [
        "job.accepted",
        "job.queued",
        "job.dispatched",
        "job.running",
        "job.node",
        "job.progress",
        "job.output",
        "job.completed",
    ] {
        assert!(
            types.iter().any(|t| t == expected),
            "{expected} missing from {types:?}"
        );
    }
    assert_eq!(types.last().map(String::as_str), Some("job.completed"));
    let sequences: Vec<u64> = events.iter().map(|(s, _)| *s).collect();
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "out of order: {sequences:?}"
    );

    // Python (nats-py): the same events, same order.
    let output = crate::webhooks::python(&[
        "deploy/examples/subscriber.py",
        &stack.nats.url(),
        stack::TENANT,
        &id.to_string(),
    ]);
    assert!(
        output.status.success(),
        "python subscriber failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let python_types: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(
        python_types,
        types.iter().map(String::as_str).collect::<Vec<_>>()
    );
    stack.stop().await;
}
