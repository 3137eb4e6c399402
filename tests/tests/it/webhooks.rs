//! Webhooks receivers can trust: retries with one `webhook-id`, no retry
//! where none can help, recorded attempts, redelivery, signatures checked by
//! the reference implementation, refused private destinations, and no loss
//! when the notifier dies mid-backlog.

use std::time::Duration;

use comfyq_tests::stack::{self, invert_workflow, notifier_config};
use comfyq_tests::{MockResponse, ReceivedWebhook, StackOptions, TestStack, eventually};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

async fn deliveries(stack: &TestStack, id: &str) -> Value {
    stack
        .http
        .get(format!("{}/v1/jobs/{id}/webhooks", stack.api))
        .send()
        .await
        .expect("GET webhooks")
        .json()
        .await
        .expect("deliveries JSON")
}

/// Waits until the job's (only) delivery is in `state`; returns it.
async fn delivery_in_state(stack: &TestStack, id: &str, state: &str) -> Value {
    eventually(
        Duration::from_secs(20),
        &format!("delivery {state}"),
        async || {
            let all = deliveries(stack, id).await;
            let delivery = all["deliveries"].as_array()?.first()?.clone();
            (delivery["state"] == state).then_some(delivery)
        },
    )
    .await
}

/// A notifier's durable consumer starts at new events: tests that run their
/// own notifier wait for it before submitting.
async fn notifier_consumer_ready(stack: &TestStack) {
    let js = async_nats::jetstream::new(stack.nats.client().await);
    eventually(
        Duration::from_secs(10),
        "the notifier's consumer exists",
        async || {
            let stream = js.get_stream("COMFYQ_EVENTS").await.ok()?;
            stream.consumer_info("notifier").await.ok().map(|_| ())
        },
    )
    .await;
}

async fn submit_with_webhook(stack: &TestStack, url: &str) -> String {
    let job = stack
        .submit(json!({"workflow": invert_workflow(8), "webhook": {"url": url}}))
        .await;
    job["id"].as_str().expect("job id").to_owned()
}

fn webhook_ids(requests: &[ReceivedWebhook]) -> Vec<String> {
    requests
        .iter()
        .map(|r| r.header("webhook-id").unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_under_one_webhook_id() {
    let stack = TestStack::start().await;
    stack.webhooks.respond_with(3, 500, &[]);
    let id = submit_with_webhook(&stack, &stack.webhooks.url("/flaky")).await;
    let requests = stack.webhooks.wait_for(4, Duration::from_secs(20)).await;
    let ids = webhook_ids(&requests);
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "one webhook-id for every attempt: {ids:?}"
    );
    let delivery = delivery_in_state(&stack, &id, "delivered").await;
    let statuses: Vec<_> = delivery["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .map(|a| a["status"].clone())
        .collect();
    assert_eq!(
        statuses,
        vec![json!(500), json!(500), json!(500), json!(200)]
    );
    assert_eq!(delivery["event_id"], ids[0].as_str());
    assert_eq!(delivery["type"], "job.completed");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_then_up_gets_every_webhook() {
    let stack = TestStack::start().await;
    // A receiver that is down: nothing listens on its port yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut ids = Vec::new();
    for i in 0..3 {
        let url = format!("http://127.0.0.1:{port}/down/{i}");
        ids.push(submit_with_webhook(&stack, &url).await);
    }
    for id in &ids {
        eventually(
            Duration::from_secs(20),
            "a failed attempt recorded",
            async || {
                let all = deliveries(&stack, id).await;
                let delivery = all["deliveries"].as_array()?.first()?.clone();
                (delivery["state"] == "retrying").then_some(())
            },
        )
        .await;
    }
    // It comes back on the same port.
    let receiver = comfyq_tests::WebhookSink::start_on(([127, 0, 0, 1], port).into()).await;
    for id in &ids {
        let delivery = delivery_in_state(&stack, id, "delivered").await;
        let attempts = delivery["attempts"].as_array().expect("attempts");
        assert!(attempts.len() >= 2, "{delivery:#}");
        assert!(attempts[0]["error"].is_string(), "{delivery:#}");
    }
    for i in 0..3 {
        let requests = receiver.requests_to(&format!("/down/{i}"));
        let ids = webhook_ids(&requests);
        assert!(
            !ids.is_empty() && ids.iter().all(|w| *w == ids[0]),
            "{ids:?}"
        );
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_is_not_retried_and_can_be_redelivered() {
    let stack = TestStack::start().await;
    stack.webhooks.respond_with(1, 410, &[]);
    let id = submit_with_webhook(&stack, &stack.webhooks.url("/gone")).await;
    let dead = delivery_in_state(&stack, &id, "dead").await;
    assert_eq!(dead["attempts"].as_array().map(Vec::len), Some(1));
    assert_eq!(dead["attempts"][0]["status"], 410);
    assert_eq!(stack.webhooks.requests().len(), 1);

    let response = stack
        .http
        .post(format!("{}/v1/jobs/{id}/webhooks/redeliver", stack.api))
        .send()
        .await
        .expect("POST redeliver");
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["redelivering"][0], dead["event_id"]);
    let requests = stack.webhooks.wait_for(2, Duration::from_secs(15)).await;
    let ids = webhook_ids(&requests);
    assert_eq!(ids[0], ids[1], "a redelivery keeps the webhook-id");
    let delivered = delivery_in_state(&stack, &id, "delivered").await;
    assert_eq!(delivered["attempts"].as_array().map(Vec::len), Some(2));

    // Another tenant sees neither the deliveries nor can redeliver them.
    let other = reqwest::Client::new()
        .get(format!("{}/v1/jobs/{id}/webhooks", stack.api))
        .bearer_auth(stack::OTHER_API_KEY)
        .send()
        .await
        .expect("GET as another tenant");
    assert_eq!(other.status(), 404);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let stack = TestStack::start().await;
    stack.webhooks.respond_with(1, 429, &[("retry-after", "2")]);
    submit_with_webhook(&stack, &stack.webhooks.url("/busy")).await;
    let requests = stack.webhooks.wait_for(2, Duration::from_secs(20)).await;
    let gap = requests[1].received_at - requests[0].received_at;
    // The notifier's own backoff here is 100-125 ms; Retry-After asks for 2 s.
    assert!(gap >= Duration::from_millis(1900), "retried after {gap:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_times_out_is_retried() {
    let stack = TestStack::start().await;
    // The stack's notifier gives each attempt 2 s.
    stack
        .webhooks
        .push_response(MockResponse::status(200).delay(Duration::from_secs(3)));
    let id = submit_with_webhook(&stack, &stack.webhooks.url("/slow")).await;
    let delivery = delivery_in_state(&stack, &id, "delivered").await;
    let attempts = delivery["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{delivery:#}");
    assert!(
        attempts[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out"),
        "{delivery:#}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_verify_with_the_reference_implementation() {
    let stack = TestStack::start().await;
    submit_with_webhook(&stack, &stack.webhooks.url("/signed")).await;
    let request = stack
        .webhooks
        .wait_for(1, Duration::from_secs(15))
        .await
        .remove(0);
    let headers: serde_json::Map<String, Value> = request
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                Value::String(v.to_str().unwrap_or_default().to_owned()),
            )
        })
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("request.json");
    std::fs::write(
        &path,
        json!({"headers": headers, "body": request.text()}).to_string(),
    )
    .expect("write request");
    let output = python(&[
        "deploy/examples/verify_webhook.py",
        stack::WEBHOOK_SECRET,
        path.to_str().expect("utf-8 path"),
    ]);
    assert!(
        output.status.success(),
        "reference verification failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "job.completed"
    );

    // A tampered body fails the same check.
    std::fs::write(
        &path,
        json!({"headers": headers, "body": request.text().replace("completed", "failed")})
            .to_string(),
    )
    .expect("write request");
    let output = python(&[
        "deploy/examples/verify_webhook.py",
        stack::WEBHOOK_SECRET,
        path.to_str().expect("utf-8 path"),
    ]);
    assert!(!output.status.success(), "a tampered body verified");
    stack.stop().await;
}

/// Runs a Python script from the repository with the packages that
/// `deploy/dev.sh setup` installs into `.tools/python`.
pub(crate) fn python(args: &[&str]) -> std::process::Output {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let packages = std::env::var("COMFYQ_TEST_PYTHONPATH")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join(".tools/python"));
    assert!(
        packages.join("standardwebhooks").exists() && packages.join("nats").exists(),
        "Python test packages missing in {}: run `bash deploy/dev.sh setup`",
        packages.display()
    );
    std::process::Command::new("python3")
        .args(args)
        .current_dir(&root)
        .env("PYTHONPATH", &packages)
        .output()
        .expect("python3 runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_destinations_are_refused_and_recorded() {
    let stack = TestStack::start_with(StackOptions {
        notifiers: 0,
        ..StackOptions::default()
    })
    .await;
    let guarded = comfyq_notifier::NotifierConfig {
        allow_private_destinations: false,
        ..notifier_config(&stack.nats_config())
    };
    let stop = CancellationToken::new();
    let notifier = tokio::spawn(comfyq_notifier::run(guarded, stop.clone()));
    notifier_consumer_ready(&stack).await;

    let port = stack.webhooks.addr().port();
    let targets = [
        format!("http://127.0.0.1:{port}/h"),
        format!("http://localhost:{port}/h"), // a name that resolves to loopback
        format!("http://[::1]:{port}/h"),
        format!("http://[::ffff:127.0.0.1]:{port}/h"),
        "http://10.1.2.3/h".to_owned(),
        // Metadata addresses do not get this far: submission refuses them
        // in every mode (`up::development_webhooks_…`, `guard` tests).
    ];
    let mut jobs = Vec::new();
    for target in &targets {
        jobs.push((target, submit_with_webhook(&stack, target).await));
    }
    for (target, id) in &jobs {
        let dead = delivery_in_state(&stack, id, "dead").await;
        let reason = dead["attempts"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(reason.contains("non-public"), "{target}: {reason}");
    }
    assert!(
        stack.webhooks.requests().is_empty(),
        "a private destination was contacted"
    );
    stop.cancel();
    notifier
        .await
        .expect("notifier task")
        .expect("notifier ran");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed() {
    let stack = TestStack::start().await;
    stack
        .webhooks
        .push_response(MockResponse::status(302).header("location", "http://169.254.169.254/"));
    let id = submit_with_webhook(&stack, &stack.webhooks.url("/moved")).await;
    let dead = delivery_in_state(&stack, &id, "dead").await;
    assert!(
        dead["attempts"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("redirect"),
        "{dead:#}"
    );
    assert_eq!(stack.webhooks.requests().len(), 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notifier_killed_mid_backlog_loses_nothing() {
    let stack = TestStack::start_with(StackOptions {
        notifiers: 0,
        ..StackOptions::default()
    })
    .await;
    let config = notifier_config(&stack.nats_config());
    // The first notifier creates the durable consumer, then dies mid-work.
    stack
        .webhooks
        .set_default_response(MockResponse::status(200).delay(Duration::from_millis(300)));
    let first = tokio::spawn(comfyq_notifier::run(
        config.clone(),
        CancellationToken::new(),
    ));
    // Its durable consumer starts at new events: wait for it before submitting.
    let js = async_nats::jetstream::new(stack.nats.client().await);
    let names = stack.nats_config().names().expect("names");
    eventually(
        Duration::from_secs(10),
        "the notifier's consumer exists",
        async || {
            let stream = js.get_stream(names.events_stream()).await.ok()?;
            stream
                .consumer_info(names.notifier_consumer())
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(submit_with_webhook(&stack, &stack.webhooks.url(&format!("/job/{i}"))).await);
    }
    eventually(
        Duration::from_secs(20),
        "some webhooks arrived",
        async || (!stack.webhooks.requests().is_empty()).then_some(()),
    )
    .await;
    first.abort(); // a crash: no graceful drain
    let _ = first.await;

    let stop = CancellationToken::new();
    let second = tokio::spawn(comfyq_notifier::run(config, stop.clone()));
    for (i, id) in ids.iter().enumerate() {
        // Delivered means a 2xx was recorded and acknowledged: the deliveries
        // the crash cut off were redelivered by the second notifier.
        delivery_in_state(&stack, id, "delivered").await;
        let requests = stack.webhooks.requests_to(&format!("/job/{i}"));
        let webhook_ids = webhook_ids(&requests);
        assert!(
            webhook_ids.iter().all(|w| *w == webhook_ids[0]),
            "job {id}: {webhook_ids:?}"
        );
    }
    stop.cancel();
    second.await.expect("notifier task").expect("notifier ran");
    stack.stop().await;
}
