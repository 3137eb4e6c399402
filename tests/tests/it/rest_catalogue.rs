//! A catalogue of bad requests: each must answer its status and problem
//! `type` and leave nothing queued or stored. Plus the per-tenant rate limit.

use comfyq_tests::stack::{self, invert_workflow};
use comfyq_tests::{StackOptions, TestStack};
use serde_json::{Value, json};

/// What a case sends.
enum Body {
    None,
    Json(Value),
    Raw(&'static str, Vec<u8>),
    Multipart(reqwest::multipart::Form),
}

struct Case {
    name: &'static str,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Body,
    status: u16,
    kind: &'static str,
}

fn post(name: &'static str, body: Value, status: u16, kind: &'static str) -> Case {
    Case {
        name,
        method: "POST",
        path: "/v1/jobs".to_owned(),
        headers: Vec::new(),
        body: Body::Json(body),
        status,
        kind,
    }
}

fn get(name: &'static str, path: impl Into<String>, status: u16, kind: &'static str) -> Case {
    Case {
        name,
        method: "GET",
        path: path.into(),
        headers: Vec::new(),
        body: Body::None,
        status,
        kind,
    }
}

fn workflow_with(inputs: Value) -> Value {
    json!({"1": {"class_type": "LoadImage", "inputs": inputs}})
}

fn with_input(input: Value) -> Value {
    json!({"workflow": workflow_with(json!({"image": "a.png"})), "inputs": [input]})
}

fn cases() -> Vec<Case> {
    let wf = invert_workflow(8);
    let ok_png = "iVBORw0KGgo=";
    let mut many_nodes = serde_json::Map::new();
    for i in 0..60 {
        many_nodes.insert(
            i.to_string(),
            json!({"class_type": "EmptyImage", "inputs": {}}),
        );
    }
    let mut cases = vec![
        Case {
            headers: vec![("authorization", String::new())],
            ..post("no key", json!({"workflow": wf}), 401, "unauthorized")
        },
        Case {
            headers: vec![("authorization", "Bearer wrong-key-000000000".to_owned())],
            ..post("unknown key", json!({"workflow": wf}), 401, "unauthorized")
        },
        Case {
            body: Body::Raw("text/plain", b"hello".to_vec()),
            ..post("text body", json!(null), 415, "unsupported-media-type")
        },
        Case {
            body: Body::Raw("application/json", b"{".to_vec()),
            ..post("truncated JSON", json!(null), 400, "bad-request")
        },
        post("array body", json!([]), 400, "bad-request"),
        post("no workflow", json!({}), 400, "bad-request"),
        post(
            "unknown field",
            json!({"workflow": wf, "colour": 1}),
            400,
            "bad-request",
        ),
        post(
            "workflow is a list",
            json!({"workflow": []}),
            422,
            "validation",
        ),
        post("empty workflow", json!({"workflow": {}}), 422, "validation"),
        post(
            "node not an object",
            json!({"workflow": {"1": 5}}),
            422,
            "validation",
        ),
        post(
            "no class_type",
            json!({"workflow": {"1": {"inputs": {}}}}),
            422,
            "validation",
        ),
        post(
            "empty class_type",
            json!({"workflow": {"1": {"class_type": "", "inputs": {}}}}),
            422,
            "validation",
        ),
        post(
            "no inputs",
            json!({"workflow": {"1": {"class_type": "EmptyImage"}}}),
            422,
            "validation",
        ),
        post(
            "inputs not an object",
            json!({"workflow": {"1": {"class_type": "EmptyImage", "inputs": []}}}),
            422,
            "validation",
        ),
        post(
            "link to missing node",
            json!({"workflow": {"1": {"class_type": "ImageInvert", "inputs": {"image": ["9", 0]}}}}),
            422,
            "validation",
        ),
        post(
            "negative output index",
            json!({"workflow": {"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", -1]}}}}),
            422,
            "validation",
        ),
        post(
            "cycle",
            json!({"workflow": {"1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}}, "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}}}),
            422,
            "validation",
        ),
        post(
            "self link",
            json!({"workflow": {"1": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}}}),
            422,
            "validation",
        ),
        post(
            "too many nodes",
            json!({"workflow": many_nodes}),
            422,
            "validation",
        ),
        post(
            "unknown node type",
            json!({"workflow": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}),
            422,
            "validation",
        ),
        post(
            "model no runner has",
            json!({"workflow": {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "absent.safetensors"}}}}),
            422,
            "validation",
        ),
        post(
            "label no runner carries",
            json!({"workflow": wf.clone(), "runner_labels": {"gpu": "absent"}}),
            422,
            "validation",
        ),
        post(
            "input name with slash",
            with_input(json!({"name": "x/a.png", "data": ok_png})),
            422,
            "validation",
        ),
        post(
            "input name ..",
            with_input(json!({"name": "..", "data": ok_png})),
            422,
            "validation",
        ),
        post(
            "input name control char",
            with_input(json!({"name": "a\u{1}.png", "data": ok_png})),
            422,
            "validation",
        ),
        post(
            "empty input name",
            with_input(json!({"name": "", "data": ok_png})),
            422,
            "validation",
        ),
        post(
            "long input name",
            with_input(json!({"name": "a".repeat(300), "data": ok_png})),
            422,
            "validation",
        ),
        post(
            "duplicate input",
            json!({"workflow": workflow_with(json!({"image": "a.png"})), "inputs": [{"name": "a.png", "data": ok_png}, {"name": "a.png", "data": ok_png}]}),
            422,
            "validation",
        ),
        post(
            "bad base64",
            with_input(json!({"name": "a.png", "data": "!!!"})),
            422,
            "validation",
        ),
        post(
            "data URL not base64",
            with_input(json!({"name": "a.png", "data": "data:image/png,abc"})),
            422,
            "validation",
        ),
        post(
            "data and url",
            with_input(
                json!({"name": "a.png", "data": ok_png, "url": "https://example.com/a.png"}),
            ),
            422,
            "validation",
        ),
        post(
            "neither data nor url",
            with_input(json!({"name": "a.png"})),
            422,
            "validation",
        ),
        post(
            "unreferenced input",
            with_input(json!({"name": "b.png", "data": ok_png})),
            422,
            "validation",
        ),
        post(
            "input url not http",
            with_input(json!({"name": "a.png", "url": "ftp://example.com/a.png"})),
            422,
            "validation",
        ),
        post(
            "input url loopback",
            with_input(json!({"name": "a.png", "url": "http://127.0.0.1:9/a.png"})),
            422,
            "validation",
        ),
        post(
            "input url metadata",
            with_input(json!({"name": "a.png", "url": "http://169.254.169.254/latest/meta-data"})),
            422,
            "validation",
        ),
        post(
            "input field unknown",
            with_input(json!({"name": "a.png", "data": ok_png, "size": 3})),
            400,
            "bad-request",
        ),
        post(
            "priority unknown",
            json!({"workflow": wf, "priority": "urgent"}),
            422,
            "validation",
        ),
        post(
            "priority number",
            json!({"workflow": wf, "priority": 5}),
            400,
            "bad-request",
        ),
        post(
            "pool bad characters",
            json!({"workflow": wf, "pool": "gpu pool!"}),
            422,
            "validation",
        ),
        post(
            "timeout zero",
            json!({"workflow": wf, "timeout_s": 0}),
            422,
            "validation",
        ),
        post(
            "timeout too long",
            json!({"workflow": wf, "timeout_s": 10_000_000}),
            422,
            "validation",
        ),
        post(
            "timeout negative",
            json!({"workflow": wf, "timeout_s": -5}),
            400,
            "bad-request",
        ),
        post(
            "metadata too big",
            json!({"workflow": wf, "metadata": {"x": "y".repeat(20_000)}}),
            422,
            "validation",
        ),
        post(
            "webhook not http",
            json!({"workflow": wf, "webhook": {"url": "ftp://example.com/h"}}),
            422,
            "validation",
        ),
        post(
            "webhook not a URL",
            json!({"workflow": wf, "webhook": {"url": "not a url"}}),
            422,
            "validation",
        ),
        post(
            "webhook unknown event",
            json!({"workflow": wf, "webhook": {"url": "https://example.com/h", "events": ["job.exploded"]}}),
            422,
            "validation",
        ),
        post(
            "outputs unknown option",
            json!({"workflow": wf, "outputs": {"zip": true}}),
            400,
            "bad-request",
        ),
        Case {
            body: Body::Raw(
                "application/json",
                format!(
                    "{{\"workflow\": {wf}, \"metadata\": \"{}\"}}",
                    "z".repeat(1_100_000)
                )
                .into_bytes(),
            ),
            ..post("body too large", json!(null), 413, "too-large")
        },
        Case {
            headers: vec![("idempotency-key", "k".repeat(300))],
            ..post(
                "idempotency key too long",
                json!({"workflow": wf}),
                400,
                "bad-request",
            )
        },
        Case {
            body: Body::Multipart(
                reqwest::multipart::Form::new()
                    .part("a.png", reqwest::multipart::Part::bytes(vec![1, 2, 3])),
            ),
            ..post("multipart without job", json!(null), 400, "bad-request")
        },
        Case {
            body: Body::Multipart(reqwest::multipart::Form::new().text(
                "job",
                with_input(json!({"name": "a.png", "data": ok_png}))["workflow"].to_string(),
            )),
            ..post("multipart job not a job", json!(null), 400, "bad-request")
        },
        Case {
            body: Body::Multipart(
                reqwest::multipart::Form::new()
                    .text(
                        "job",
                        json!({"workflow": workflow_with(json!({"image": "a.png"}))}).to_string(),
                    )
                    .part("../a.png", reqwest::multipart::Part::bytes(vec![1, 2, 3])),
            ),
            ..post("multipart unsafe name", json!(null), 422, "validation")
        },
        Case {
            body: Body::Multipart(
                reqwest::multipart::Form::new()
                    .text(
                        "job",
                        json!({"workflow": workflow_with(json!({"image": "a.png"}))}).to_string(),
                    )
                    .part("b.png", reqwest::multipart::Part::bytes(vec![1, 2, 3])),
            ),
            ..post(
                "multipart unreferenced file",
                json!(null),
                422,
                "validation",
            )
        },
        Case {
            body: Body::Multipart(
                reqwest::multipart::Form::new()
                    .text(
                        "job",
                        json!({"workflow": workflow_with(json!({"image": "a.png"}))}).to_string(),
                    )
                    .part("a.png", reqwest::multipart::Part::bytes(vec![7; 300_000])),
            ),
            ..post("multipart file too large", json!(null), 413, "too-large")
        },
        get("list bad status", "/v1/jobs?status=done", 422, "validation"),
        get("list limit zero", "/v1/jobs?limit=0", 422, "validation"),
        get("list bad cursor", "/v1/jobs?cursor=xyz", 422, "validation"),
        get(
            "list bad time",
            "/v1/jobs?created_after=yesterday",
            422,
            "validation",
        ),
        get(
            "list unknown parameter",
            "/v1/jobs?colour=red",
            400,
            "bad-request",
        ),
        get("job id not a uuid", "/v1/jobs/not-a-uuid", 404, "not-found"),
        get(
            "unknown job",
            format!("/v1/jobs/{}", uuid::Uuid::now_v7()),
            404,
            "not-found",
        ),
        get(
            "events of unknown job",
            format!("/v1/jobs/{}/events", uuid::Uuid::now_v7()),
            404,
            "not-found",
        ),
        get(
            "output of unknown job",
            format!("/v1/jobs/{}/outputs/x.png", uuid::Uuid::now_v7()),
            404,
            "not-found",
        ),
        get("unknown route", "/v1/nope", 404, "not-found"),
        Case {
            method: "POST",
            ..get(
                "cancel unknown job",
                format!("/v1/jobs/{}/cancel", uuid::Uuid::now_v7()),
                404,
                "not-found",
            )
        },
        Case {
            method: "DELETE",
            ..get(
                "delete unknown job",
                format!("/v1/jobs/{}", uuid::Uuid::now_v7()),
                404,
                "not-found",
            )
        },
        Case {
            headers: vec![("last-event-id", "abc".to_owned())],
            ..get(
                "tenant events bad Last-Event-ID",
                "/v1/events",
                400,
                "bad-request",
            )
        },
    ];
    cases.retain(|c| !c.name.is_empty());
    cases
}

fn small_limits(config: &mut comfyq_ingress::IngressConfig) {
    config.max_body_bytes = 1024 * 1024;
    config.max_input_bytes = 256 * 1024;
    config.max_nodes = 50;
    // Generous for the catalogue's tenant; the rate test exhausts it for the other.
    config.rate_limit_per_s = 1;
    config.rate_limit_burst = 120;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_queue_and_store_nothing() {
    let stack = TestStack::start_with(StackOptions {
        configure_ingress: Some(small_limits),
        ..StackOptions::default()
    })
    .await;
    let plain = reqwest::Client::new();
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let before = stack.stored_state().await;
    for case in cases {
        let method = reqwest::Method::from_bytes(case.method.as_bytes()).expect("method");
        let mut request = plain.request(method, format!("{}{}", stack.api, case.path));
        let mut authorized = false;
        for (name, value) in &case.headers {
            authorized |= *name == "authorization";
            if !value.is_empty() {
                request = request.header(*name, value);
            }
        }
        if !authorized {
            request = request.bearer_auth(stack::API_KEY);
        }
        request = match case.body {
            Body::None => request,
            Body::Json(value) => request.json(&value),
            Body::Raw(content_type, bytes) => {
                request.header("content-type", content_type).body(bytes)
            }
            Body::Multipart(form) => request.multipart(form),
        };
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").cloned();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, case.status, "{}: {text}", case.name);
        assert_eq!(
            content_type.as_ref().and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{}",
            case.name
        );
        let problem: Value = serde_json::from_str(&text).expect("problem JSON");
        assert_eq!(
            problem["type"],
            format!("https://comfyq.dev/problems/{}", case.kind),
            "{}: {text}",
            case.name
        );
        assert_eq!(problem["status"], case.status, "{}", case.name);
        if case.kind == "validation" {
            assert!(
                problem["errors"][0]["pointer"].is_string(),
                "{}: {text}",
                case.name
            );
        }
        assert_eq!(
            stack.stored_state().await,
            before,
            "{} stored something",
            case.name
        );
    }

    // The other tenant's rate limit: its burst runs out, then 429 with Retry-After.
    let mut limited = None;
    for _ in 0..200 {
        let response = plain
            .get(format!("{}/v1/queue", stack.api))
            .bearer_auth(stack::OTHER_API_KEY)
            .send()
            .await
            .expect("GET");
        if response.status() == 429 {
            limited = Some(response);
            break;
        }
    }
    let limited = limited.expect("rate limited within 200 requests");
    assert!(limited.headers().contains_key("retry-after"));
    let problem: Value = limited.json().await.expect("problem");
    assert_eq!(problem["type"], "https://comfyq.dev/problems/rate-limited");
    stack.stop().await;
}
