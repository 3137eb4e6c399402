//! What the ComfyUI API adds over talking to ComfyUI directly: the same
//! ComfyUI client steps (`POST /prompt`, `/ws` until the prompt's
//! `executing {node: null}`, then `/history/{id}` and `/view` of its image)
//! against the simulator itself and against ingress with the whole stack
//! behind it (one runner on that simulator, no per-node delay). Prompts go
//! one at a time, each with its own image size so none is served from
//! ComfyUI's cache.
//!
//! `cargo run --release -p comfyq-tests --example comfy_facade_latency -- [prompts]`

use std::time::{Duration, Instant};

use comfyq_tests::stack::{self, invert_workflow};
use comfyq_tests::{StackOptions, TestStack};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Times of one prompt: until `executing {node: null}`, and until the
/// image was fetched.
struct Run {
    done: Duration,
    fetched: Duration,
}

async fn one_prompt(http: &reqwest::Client, base: &str, ws: &str, width: u32) -> Run {
    let client_id = uuid::Uuid::new_v4().simple().to_string();
    let url = format!("{ws}/ws?clientId={client_id}");
    let mut request = url.into_client_request().expect("ws request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", stack::API_KEY)
            .parse()
            .expect("header"),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("WS connect");
    socket.next().await; // The hello `status`.
    let started = Instant::now();
    let answer: Value = http
        .post(format!("{base}/prompt"))
        .json(&json!({"prompt": invert_workflow(width), "client_id": client_id}))
        .send()
        .await
        .expect("POST /prompt")
        .json()
        .await
        .expect("answer JSON");
    let prompt_id = answer["prompt_id"].as_str().expect("prompt_id").to_owned();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("a frame within 30 s")
            .expect("socket open")
            .expect("frame");
        if let Message::Text(text) = frame {
            let message: Value = serde_json::from_str(&text).expect("JSON");
            if message["type"] == "executing"
                && message["data"]["node"].is_null()
                && message["data"]["prompt_id"] == prompt_id.as_str()
            {
                break;
            }
        }
    }
    let done = started.elapsed();
    let history: Value = http
        .get(format!("{base}/history/{prompt_id}"))
        .send()
        .await
        .expect("GET /history")
        .json()
        .await
        .expect("history JSON");
    let image = &history[&prompt_id]["outputs"]["3"]["images"][0];
    let bytes = http
        .get(format!("{base}/view"))
        .query(&[
            ("filename", image["filename"].as_str().unwrap_or_default()),
            ("subfolder", image["subfolder"].as_str().unwrap_or_default()),
            ("type", "output"),
        ])
        .send()
        .await
        .expect("GET /view")
        .bytes()
        .await
        .expect("image");
    assert!(
        bytes.starts_with(b"\x89PNG"),
        "{base}: not a PNG: {history}"
    );
    Run {
        done,
        fetched: started.elapsed(),
    }
}

fn report(label: &str, runs: &[Run]) -> (f64, f64) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut done: Vec<f64> = runs.iter().map(|r| ms(r.done)).collect();
    let mut fetched: Vec<f64> = runs.iter().map(|r| ms(r.fetched)).collect();
    done.sort_by(f64::total_cmp);
    fetched.sort_by(f64::total_cmp);
    let at = |v: &[f64], q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    println!(
        "{label:>8}: executing null p50 {:.1} ms, p95 {:.1} ms | + history and view p50 {:.1} ms, p95 {:.1} ms",
        at(&done, 0.5),
        at(&done, 0.95),
        at(&fetched, 0.5),
        at(&fetched, 0.95)
    );
    (at(&done, 0.5), at(&fetched, 0.5))
}

#[tokio::main]
async fn main() {
    let prompts: u32 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(50);
    let sim = comfy_sim::SimConfig {
        step_delay_ms: 0,
        node_delay_ms: 0,
        previews: false,
        ..comfy_sim::SimConfig::default()
    };
    let stack = TestStack::start_with(StackOptions {
        sim,
        // Four requests a prompt, back to back: above the default rate limit.
        configure_ingress: Some(|ingress| ingress.rate_limit_per_s = 0),
        ..StackOptions::default()
    })
    .await;
    let direct = (
        stack.sim.base_url(),
        stack.sim.base_url().replacen("http://", "ws://", 1),
    );
    let facade = (stack.api.clone(), stack.api.replacen("http://", "ws://", 1));
    // Warm up both paths; not measured.
    for i in 0..5 {
        one_prompt(&stack.http, &direct.0, &direct.1, 2000 + i).await;
        one_prompt(&stack.http, &facade.0, &facade.1, 3000 + i).await;
    }
    let (mut direct_runs, mut facade_runs) = (Vec::new(), Vec::new());
    for i in 0..prompts {
        // Interleaved, so both see the same machine load.
        direct_runs.push(one_prompt(&stack.http, &direct.0, &direct.1, 8 + 2 * i).await);
        facade_runs.push(one_prompt(&stack.http, &facade.0, &facade.1, 9 + 2 * i).await);
    }
    println!("{prompts} prompts each, one at a time");
    let (direct_done, direct_fetched) = report("direct", &direct_runs);
    let (facade_done, facade_fetched) = report("facade", &facade_runs);
    println!(
        "   added: {:.1} ms to executing null, {:.1} ms to the image (p50)",
        facade_done - direct_done,
        facade_fetched - direct_fetched
    );
    stack.stop().await;
}
