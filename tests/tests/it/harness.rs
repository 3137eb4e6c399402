//! Tests of the test harness itself.

use std::time::Duration;

use async_nats::jetstream;
use comfyq_tests::{MockResponse, NatsServer, WebhookSink, assert_eventually, eventually};

const TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn nats_server_keeps_jetstream_data_across_restart() {
    let mut server = NatsServer::start().await;
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    let port = server.port();

    let js = jetstream::new(server.client().await);
    js.create_stream(jetstream::stream::Config {
        name: "HARNESS".to_owned(),
        subjects: vec!["harness.>".to_owned()],
        ..Default::default()
    })
    .await
    .expect("create stream");
    js.publish("harness.one", "hello".into())
        .await
        .expect("publish")
        .await
        .expect("publish ack");

    server.restart().await;
    assert_eq!(server.port(), port, "restart keeps the port");

    let js = jetstream::new(server.client().await);
    let mut stream = js.get_stream("HARNESS").await.expect("stream survives");
    assert_eq!(stream.info().await.expect("info").state.messages, 1);
    let message = stream.get_raw_message(1).await.expect("message survives");
    assert_eq!(message.subject.as_str(), "harness.one");
    assert_eq!(&message.payload[..], b"hello");
}

#[tokio::test]
async fn stopped_nats_server_refuses_connections() {
    let mut server = NatsServer::start().await;
    assert!(server.is_running());
    server.stop();
    assert!(!server.is_running());
    assert!(
        async_nats::connect(server.url()).await.is_err(),
        "connecting to a stopped server must fail"
    );
}

#[tokio::test]
async fn client_reconnects_after_restart() {
    let mut server = NatsServer::start().await;
    let client = server.client().await;
    server.stop();
    assert_eventually!(
        TIMEOUT,
        client.connection_state() != async_nats::connection::State::Connected,
        "client notices the outage"
    );
    server.restart().await;
    assert_eventually!(
        TIMEOUT,
        client.connection_state() == async_nats::connection::State::Connected,
        "client reconnects"
    );
    client.flush().await.expect("flush after reconnect");
}

#[tokio::test]
async fn servers_run_side_by_side() {
    let a = NatsServer::start().await;
    let b = NatsServer::start().await;
    assert_ne!(a.port(), b.port());
    assert_ne!(a.store_dir(), b.store_dir());
}

#[tokio::test]
async fn max_payload_matches_dev_config() {
    let server = NatsServer::start().await;
    let client = server.client().await;
    assert_eq!(client.server_info().max_payload, 8 * 1024 * 1024);
}

#[tokio::test]
async fn webhook_sink_records_a_post() {
    let sink = WebhookSink::start().await;
    let response = reqwest::Client::new()
        .post(sink.url("/hooks/done?x=1"))
        .header("x-comfyq-signature", "abc")
        .json(&serde_json::json!({ "job": 7 }))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 200);

    let requests = sink.wait_for(1, TIMEOUT).await;
    assert_eq!(requests.len(), 1);
    let hook = &requests[0];
    assert_eq!(hook.method, http::Method::POST);
    assert_eq!(hook.path(), "/hooks/done");
    assert_eq!(hook.uri.query(), Some("x=1"));
    assert_eq!(hook.header("x-comfyq-signature"), Some("abc"));
    assert_eq!(hook.json(), serde_json::json!({ "job": 7 }));
    assert_eq!(sink.requests_to("/hooks/done").len(), 1);
}

#[tokio::test]
async fn webhook_sink_follows_its_script() {
    let sink = WebhookSink::start().await;
    sink.respond_with(2, 503, &[("retry-after", "1")]);
    sink.push_response(MockResponse::status(201).body("made"));
    sink.set_default(410);

    let client = reqwest::Client::new();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let response = client.post(sink.url("hook")).send().await.expect("post");
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().expect("ascii").to_owned());
        seen.push((response.status().as_u16(), retry_after));
    }
    assert_eq!(
        seen,
        vec![
            (503, Some("1".to_owned())),
            (503, Some("1".to_owned())),
            (201, None),
            (410, None),
        ]
    );
    let answered: Vec<u16> = sink
        .requests()
        .iter()
        .map(|r| r.answered.as_u16())
        .collect();
    assert_eq!(answered, [503, 503, 201, 410]);

    sink.clear();
    assert!(sink.requests().is_empty());
}

#[tokio::test]
async fn webhook_sink_stops_on_drop() {
    let sink = WebhookSink::start().await;
    let url = sink.url("/gone");
    drop(sink);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    assert_eventually!(TIMEOUT, client.post(&url).send().await.is_err());
}

#[tokio::test]
async fn eventually_returns_the_value() {
    let mut calls = 0;
    let value = eventually(TIMEOUT, "third call", async || {
        calls += 1;
        (calls == 3).then_some(calls)
    })
    .await;
    assert_eq!(value, 3);
}

#[tokio::test]
#[should_panic(expected = "timed out waiting for never")]
async fn eventually_panics_with_what() {
    eventually(Duration::from_millis(100), "never", async || None::<()>).await;
}

#[tokio::test]
#[should_panic(expected = "nats-server did not start: process exited")]
async fn nats_server_start_failure_reports_the_log() {
    NatsServer::start_with_config("this is { not valid").await;
}
