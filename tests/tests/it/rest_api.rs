//! The REST API's normal paths against the running stack: listing, `?wait`,
//! idempotency, event streams (SSE with `Last-Event-ID`, WebSocket),
//! multipart upload with `Range`, runners and queue, OpenAPI, tenant
//! isolation.

use std::time::Duration;

use comfyq_tests::TestStack;
use comfyq_tests::stack::{self, invert_workflow, slow_workflow};
use futures::StreamExt;
use serde_json::{Value, json};

fn url(stack: &TestStack, path: &str) -> String {
    format!("{}{path}", stack.api)
}

/// Reads a whole SSE response: (id, event type, data) of each event.
async fn read_sse(response: reqwest::Response) -> Vec<(u64, String, Value)> {
    let text = tokio::time::timeout(Duration::from_secs(30), response.text())
        .await
        .expect("the SSE stream closes after the terminal event")
        .expect("SSE body");
    text.split("\n\n")
        .filter_map(|block| {
            let mut id = None;
            let mut kind = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    kind = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = serde_json::from_str(v.trim()).ok();
                }
            }
            Some((id?, kind?, data?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_list_idempotency_and_event_streams() {
    let stack = TestStack::start().await;

    // `?wait` answers 200 with the finished job as soon as it ends.
    let started = std::time::Instant::now();
    let response = stack
        .http
        .post(url(&stack, "/v1/jobs?wait=30"))
        .json(&json!({"workflow": invert_workflow(8), "outputs": {"inline": true}}))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 200);
    let done: Value = response.json().await.expect("job");
    assert_eq!(done["status"], "completed", "{done:#}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let inline = done["outputs"][0]["data"].as_str().expect("inline output");
    assert!(!inline.is_empty());
    let first = done["id"].as_str().expect("id").to_owned();

    // A job that cannot end within `wait` answers 202, with progress visible later.
    let response = stack
        .http
        .post(url(&stack, "/v1/jobs?wait=1"))
        .json(&json!({"workflow": slow_workflow(20, 100, "slow")}))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 202);
    assert!(response.headers().contains_key("location"));
    let slow: Value = response.json().await.expect("job");
    let slow_id = slow["id"].as_str().expect("id").to_owned();
    let progress = comfyq_tests::eventually(Duration::from_secs(20), "progress", async || {
        let job = stack.job(&slow_id).await;
        job["progress"]["max"].as_f64().map(|_| job)
    })
    .await;
    assert_eq!(progress["progress"]["node_id"], "2", "{progress:#}");
    let response = stack
        .http
        .get(url(&stack, &format!("/v1/jobs/{slow_id}?wait=30")))
        .send()
        .await
        .expect("GET wait");
    assert_eq!(response.status(), 200);

    // Idempotency: concurrent identical requests make one job; another body is a 409.
    let body = json!({"workflow": invert_workflow(16), "metadata": {"n": 1}});
    let send = |body: Value| {
        stack
            .http
            .post(url(&stack, "/v1/jobs"))
            .header("Idempotency-Key", "order-17")
            .json(&body)
            .send()
    };
    let (a, b) = tokio::join!(send(body.clone()), send(body.clone()));
    let (a, b) = (a.expect("POST a"), b.expect("POST b"));
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (202, 202));
    let (a, b): (Value, Value) = (a.json().await.expect("a"), b.json().await.expect("b"));
    assert_eq!(a["id"], b["id"]);
    let again = send(body.clone()).await.expect("POST again");
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.expect("again");
    assert_eq!(again["id"], a["id"]);
    let other = send(json!({"workflow": invert_workflow(32)}))
        .await
        .expect("POST other");
    assert_eq!(other.status(), 409);
    let idem_id = a["id"].as_str().expect("id").to_owned();
    stack.wait_finished(&idem_id, Duration::from_secs(30)).await;

    // Listing: newest first, filters, cursor pages.
    let list = |query: &str| {
        let request = stack.http.get(url(&stack, &format!("/v1/jobs{query}")));
        async move {
            let response = request.send().await.expect("GET list");
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.expect("page")
        }
    };
    let all = list("").await;
    let ids: Vec<&str> = all["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        vec![idem_id.as_str(), slow_id.as_str(), first.as_str()]
    );
    let page1 = list("?limit=2").await;
    assert_eq!(page1["jobs"].as_array().map(Vec::len), Some(2));
    let cursor = page1["next_cursor"].as_str().expect("cursor");
    let page2 = list(&format!("?limit=2&cursor={cursor}")).await;
    assert_eq!(page2["jobs"][0]["id"], first);
    assert!(page2["next_cursor"].is_null());
    assert_eq!(list("?status=failed,cancelled").await["jobs"], json!([]));
    assert_eq!(
        list("?status=completed").await["jobs"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    let future = "2999-01-01T00:00:00Z";
    assert_eq!(
        list(&format!("?created_after={future}")).await["jobs"],
        json!([])
    );
    assert_eq!(
        list(&format!("?created_before={future}&limit=1")).await["jobs"][0]["id"],
        idem_id
    );
    // Another tenant sees none of them.
    let other_tenant = stack
        .http
        .get(url(&stack, "/v1/jobs"))
        .bearer_auth(stack::OTHER_API_KEY)
        .send()
        .await
        .expect("GET");
    assert_eq!(
        other_tenant.json::<Value>().await.expect("page")["jobs"],
        json!([])
    );

    // SSE: the whole history of a finished job, then the stream closes.
    let events_url = url(&stack, &format!("/v1/jobs/{first}/events"));
    let all = read_sse(stack.http.get(&events_url).send().await.expect("SSE")).await;
    let kinds: Vec<&str> = all.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"job.accepted"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"job.completed"), "{kinds:?}");
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "ids increase");
    // Resume after the second event: exactly the rest.
    let resumed = read_sse(
        stack
            .http
            .get(&events_url)
            .header("Last-Event-ID", all[1].0.to_string())
            .send()
            .await
            .expect("SSE resume"),
    )
    .await;
    assert_eq!(
        resumed.iter().map(|e| e.0).collect::<Vec<_>>(),
        all[2..].iter().map(|e| e.0).collect::<Vec<_>>()
    );

    // SSE live: subscribe before the job ends, closes after `job.completed`.
    let live_job = stack
        .submit(json!({"workflow": slow_workflow(5, 100, "live")}))
        .await;
    let live_id = live_job["id"].as_str().expect("id");
    let tenant_stream = stack
        .http
        .get(url(&stack, "/v1/events"))
        .header("Last-Event-ID", all.last().map_or(0, |e| e.0).to_string())
        .send()
        .await
        .expect("tenant SSE");
    assert_eq!(tenant_stream.status(), 200);
    let live = read_sse(
        stack
            .http
            .get(url(&stack, &format!("/v1/jobs/{live_id}/events")))
            .send()
            .await
            .expect("SSE"),
    )
    .await;
    assert_eq!(live.last().map(|e| e.1.as_str()), Some("job.completed"));
    assert!(
        live.iter().any(|e| e.1 == "job.progress"),
        "progress events streamed"
    );
    // The tenant stream carries the live job's events too.
    let mut tenant_body = tenant_stream.bytes_stream();
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(chunk)) = tenant_body.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains(live_id) {
                break;
            }
        }
    })
    .await
    .expect("tenant stream shows the live job");

    // WebSocket: same events, closed after the terminal one.
    let ws_url = format!(
        "{}/v1/jobs/{live_id}/ws",
        stack.api.replacen("http://", "ws://", 1)
    );
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(ws_url)
            .expect("ws request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", stack::API_KEY)
            .parse()
            .expect("header"),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("WS connect");
    let mut frames = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(message)) = socket.next().await {
            if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
                frames.push(serde_json::from_str::<Value>(&text).expect("frame JSON"));
            }
        }
    })
    .await
    .expect("WebSocket closes after the terminal event");
    assert_eq!(frames.len(), live.len());
    assert_eq!(
        frames.last().map(|f| f["event"]["type"].clone()),
        Some(json!("job.completed"))
    );

    // Cross-tenant: job, events, outputs answer 404.
    for path in [
        format!("/v1/jobs/{first}"),
        format!("/v1/jobs/{first}/events"),
        format!(
            "/v1/jobs/{first}/outputs/{}",
            done["outputs"][0]["name"].as_str().unwrap_or("x")
        ),
    ] {
        let response = stack
            .http
            .get(url(&stack, &path))
            .bearer_auth(stack::OTHER_API_KEY)
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status(), 404, "{path}");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_url_inputs_ranges_runners_queue_and_openapi() {
    let stack = TestStack::start_with(comfyq_tests::StackOptions {
        configure_ingress: Some(private_input_urls),
        ..comfyq_tests::StackOptions::default()
    })
    .await;
    let png = {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, 4, 4);
        encoder.set_color(png::ColorType::Rgb);
        encoder
            .write_header()
            .and_then(|mut w| w.write_image_data(&[200u8; 48]))
            .expect("png");
        bytes
    };
    let job = json!({"workflow": {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "comfyq/mp"}}
    }});
    let form = reqwest::multipart::Form::new()
        .part("job", reqwest::multipart::Part::text(job.to_string()))
        .part(
            "photo.png",
            reqwest::multipart::Part::bytes(png.clone()).file_name("anything.png"),
        );
    let response = stack
        .http
        .post(url(&stack, "/v1/jobs?wait=30"))
        .multipart(form)
        .send()
        .await
        .expect("POST multipart");
    let status = response.status();
    let done: Value = response.json().await.expect("job");
    assert_eq!(status, 200, "{done:#}");
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(done["inputs"][0]["size"], png.len());
    let input_url = url(
        &stack,
        done["inputs"][0]["url"].as_str().expect("input url"),
    );

    // Range and ETag on the stored input.
    let response = stack
        .http
        .get(&input_url)
        .header("Range", "bytes=1-3")
        .send()
        .await
        .expect("GET range");
    assert_eq!(response.status(), 206);
    assert_eq!(
        response.headers()["content-range"],
        format!("bytes 1-3/{}", png.len()).as_str()
    );
    let etag = response.headers()["etag"].clone();
    assert_eq!(response.bytes().await.expect("bytes").as_ref(), &png[1..4]);
    let response = stack
        .http
        .get(&input_url)
        .header("If-None-Match", etag)
        .send()
        .await
        .expect("GET etag");
    assert_eq!(response.status(), 304);
    let response = stack
        .http
        .get(&input_url)
        .header("Range", "bytes=9999-")
        .send()
        .await
        .expect("GET bad range");
    assert_eq!(response.status(), 416);

    // Runners and queue.
    let runners: Value = stack
        .http
        .get(url(&stack, "/v1/runners"))
        .send()
        .await
        .expect("runners")
        .json()
        .await
        .expect("runners JSON");
    assert_eq!(runners["runners"][0]["runner"], "runner-0", "{runners:#}");
    assert!(
        runners["runners"][0]["node_types"]
            .as_array()
            .is_some_and(|n| !n.is_empty())
    );
    let queue: Value = stack
        .http
        .get(url(&stack, "/v1/queue"))
        .send()
        .await
        .expect("queue")
        .json()
        .await
        .expect("queue JSON");
    let levels = queue["levels"].as_array().expect("levels");
    assert_eq!(levels.len(), 3, "{queue:#}");
    assert!(
        levels
            .iter()
            .all(|l| l["depth"] == 0 && l["pool"] == "default")
    );

    // The OpenAPI document and the docs page.
    let doc: Value = reqwest::get(url(&stack, "/openapi.json"))
        .await
        .expect("openapi")
        .json()
        .await
        .expect("openapi JSON");
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/events",
        "/v1/queue",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    assert!(doc["components"]["schemas"]["Problem"].is_object());
    let docs = reqwest::get(url(&stack, "/docs")).await.expect("docs");
    assert_eq!(docs.status(), 200);
    stack.stop().await;
}

fn private_input_urls(config: &mut comfyq_ingress::IngressConfig) {
    config.allow_private_input_urls = true;
}

fn four_active_jobs(config: &mut comfyq_ingress::IngressConfig) {
    config.max_active_jobs = 4;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_position_depth_and_active_job_limit() {
    let stack = TestStack::start_with(comfyq_tests::StackOptions {
        configure_ingress: Some(four_active_jobs),
        ..comfyq_tests::StackOptions::default()
    })
    .await;
    // One slow job occupies the only runner slot; three wait behind it.
    let running = stack
        .submit(json!({"workflow": slow_workflow(100, 100, "hold")}))
        .await;
    let running_id = running["id"].as_str().expect("id").to_owned();
    comfyq_tests::eventually(Duration::from_secs(20), "first job running", async || {
        (stack.job(&running_id).await["status"] == "running").then_some(())
    })
    .await;
    let normal_1 = stack.submit(json!({"workflow": invert_workflow(8)})).await;
    let normal_2 = stack.submit(json!({"workflow": invert_workflow(8)})).await;
    let high = stack
        .submit(json!({"workflow": invert_workflow(8), "priority": "high"}))
        .await;
    let expected = [(&high, 0), (&normal_1, 1), (&normal_2, 2)];
    for (job, ahead) in expected {
        let id = job["id"].as_str().expect("id");
        comfyq_tests::eventually(Duration::from_secs(20), "queue position", async || {
            let job = stack.job(id).await;
            (job["queue_position"] == ahead).then_some(())
        })
        .await;
    }
    assert!(stack.job(&running_id).await["queue_position"].is_null());
    let queue: Value = stack
        .http
        .get(url(&stack, "/v1/queue"))
        .send()
        .await
        .expect("queue")
        .json()
        .await
        .expect("queue JSON");
    let depth = |priority: &str| {
        queue["levels"]
            .as_array()
            .and_then(|levels| levels.iter().find(|l| l["priority"] == priority))
            .map(|l| (l["depth"].clone(), l["oldest_wait_s"].is_number()))
    };
    assert_eq!(depth("high"), Some((json!(1), true)), "{queue:#}");
    assert_eq!(depth("normal"), Some((json!(2), true)), "{queue:#}");

    // Four unfinished jobs is the limit.
    let refused = stack
        .http
        .post(url(&stack, "/v1/jobs"))
        .json(&json!({"workflow": invert_workflow(8)}))
        .send()
        .await
        .expect("POST");
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let problem: Value = refused.json().await.expect("problem");
    assert_eq!(problem["type"], "https://comfyq.dev/problems/too-many-jobs");
    stack.cancel(&running_id).await;
    stack.stop().await;
}

/// Peak resident memory of this process (services run in it), in bytes.
fn peak_rss() -> u64 {
    let peak = comfyq_tests::memory::peak_rss_bytes();
    assert!(peak > 0, "VmHWM unreadable in /proc/self/status");
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mib_multipart_upload_is_streamed() {
    use sha2::Digest;
    const MIB: usize = 1024 * 1024;
    const SIZE: usize = 200 * MIB;
    let stack = TestStack::start().await;
    let chunk = bytes::Bytes::from((0..MIB).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    let mut expected = sha2::Sha256::new();
    for _ in 0..SIZE / MIB {
        expected.update(&chunk);
    }
    let expected = hex::encode(expected.finalize());
    // A pool without runners: the job only needs to be accepted.
    let job = json!({"pool": "bulk", "workflow": {
        "1": {"class_type": "LoadImage", "inputs": {"image": "big.bin"}}
    }});
    let body =
        futures::stream::iter((0..SIZE / MIB).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let form = reqwest::multipart::Form::new()
        .part("job", reqwest::multipart::Part::text(job.to_string()))
        .part(
            "big.bin",
            reqwest::multipart::Part::stream_with_length(
                reqwest::Body::wrap_stream(body),
                SIZE as u64,
            ),
        );
    // Reset the peak (Linux: 5 → clear VmHWM) so it measures this upload.
    std::fs::write("/proc/self/clear_refs", "5").expect("reset peak RSS");
    let before = peak_rss();
    let response = stack
        .http
        .post(url(&stack, "/v1/jobs"))
        .multipart(form)
        .send()
        .await
        .expect("POST 200 MiB");
    let status = response.status();
    let accepted: Value = response.json().await.expect("job");
    let growth = peak_rss().saturating_sub(before);
    assert_eq!(status, 202, "{accepted:#}");
    assert_eq!(accepted["inputs"][0]["size"], SIZE);
    assert_eq!(accepted["inputs"][0]["sha256"], expected);
    eprintln!(
        "peak RSS growth during a 200 MiB upload: {} MiB",
        growth / MIB as u64
    );
    assert!(
        growth < 48 * MIB as u64,
        "peak RSS grew {} MiB during a 200 MiB upload",
        growth / MIB as u64
    );
    stack.stop().await;
}
