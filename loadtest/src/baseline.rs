//! Baselines measured in the same run as comfyq: raw JetStream (publish →
//! work-queue pull → ack; pipelined throughput), the raw object store, and
//! `direct`: the same workflow through ComfyUI's own API by a careful client.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;
use futures::{SinkExt, StreamExt, stream::FuturesUnordered};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::hist::Latency;
use crate::report::Report;
use crate::workload::Mix;

pub(crate) const RAW_PUBLISH: &str = "raw JetStream: awaited publish";
pub(crate) const RAW_PULLED: &str = "raw JetStream: publish → work-queue pull";
pub(crate) const RAW_ACKED: &str = "raw JetStream: publish → pull → acked (double ack)";
pub(crate) const RAW_RATE: &str = "raw JetStream: pipelined publish → pull → ack";
pub(crate) const RAW_PUT: &str = "raw object store put";
pub(crate) const RAW_GET: &str = "raw object store get";
pub(crate) const RAW_FANOUT: &str = "raw NATS: publish → 100 subscribers";
pub(crate) const DIRECT: &str = "direct ComfyUI (POST /prompt, WS, /history, /view)";

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A work-queue stream and a pull consumer of its own, deleted at the end.
async fn raw_stream(
    js: &jetstream::Context,
    replicas: usize,
) -> anyhow::Result<(String, String, jetstream::consumer::Consumer<pull::Config>)> {
    let name = unique("LOADTEST_RAW_");
    let subject = format!("loadtest.raw.{name}");
    let stream = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            num_replicas: replicas,
            ..stream::Config::default()
        })
        .await?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("raw".to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..pull::Config::default()
        })
        .await?;
    Ok((name, subject, consumer))
}

/// Core NATS fan-out with the receivers in this process, as the `fanout`
/// scenario has them: `messages` progress-shaped events (stamped `at` when
/// published) every `interval` to `receivers` subscribers on their own
/// connections, each parsing every message. The floor for comfyq's fan-out
/// on this machine, in this process.
pub(crate) async fn fanout(
    nats_url: &str,
    receivers: usize,
    messages: usize,
    interval: Duration,
    age: fn(&[u8], time::OffsetDateTime) -> Option<f64>,
) -> anyhow::Result<Latency> {
    let subject = unique("raw.fanout.");
    let received = Arc::new(Mutex::new(Latency::new()));
    let mut tasks = Vec::new();
    for _ in 0..receivers {
        let client = crate::target::connect_nats(nats_url).await?;
        let mut subscription = client.subscribe(subject.clone()).await?;
        client.flush().await?;
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            let _client = client;
            while let Some(message) = subscription.next().await {
                if let Some(age) = age(&message.payload, time::OffsetDateTime::now_utc()) {
                    received
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .record_secs(age);
                }
            }
        }));
    }
    let publisher = crate::target::connect_nats(nats_url).await?;
    let job = uuid::Uuid::now_v7();
    let mut ticks = tokio::time::interval(interval);
    for step in 0..messages {
        ticks.tick().await;
        let at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)?;
        let event = json!({
            "v": 1,
            "id": uuid::Uuid::new_v4(),
            "type": "job.progress",
            "at": at,
            "tenant": "loadtest",
            "job_id": job,
            "data": {"node": "3", "value": step % 100 + 1, "max": 100},
        });
        publisher
            .publish(subject.clone(), serde_json::to_vec(&event)?.into())
            .await?;
    }
    publisher.flush().await?;
    let expected = (messages * receivers) as u64;
    let deadline = Instant::now() + Duration::from_secs(15);
    while received
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .len()
        < expected
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for task in tasks {
        task.abort();
    }
    let received = received
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    Ok(received)
}

/// One message at a time: the latency floor of a JetStream work queue here.
pub(crate) async fn jetstream_latency(
    client: &async_nats::Client,
    replicas: usize,
    messages: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    let js = jetstream::new(client.clone());
    let (name, subject, consumer) = raw_stream(&js, replicas).await?;
    let mut pulled = consumer.messages().await?;
    let payload = Bytes::from(vec![b'x'; 512]);
    let (mut publish, mut received, mut acked) = (Latency::new(), Latency::new(), Latency::new());
    for i in 0..messages + 50 {
        let started = Instant::now();
        let ack = js.publish(subject.clone(), payload.clone()).await?;
        let (ack, message) = tokio::join!(
            async {
                let result = ack.await;
                (result, started.elapsed())
            },
            async {
                let message = pulled.next().await;
                (message, started.elapsed())
            }
        );
        ack.0?;
        let pulled_after = message.1;
        let message = message
            .0
            .context("pull ended")?
            .map_err(anyhow::Error::msg)?;
        message.double_ack().await.map_err(anyhow::Error::msg)?;
        if i >= 50 {
            publish.record(ack.1);
            received.record(pulled_after);
            acked.record(started.elapsed());
        }
    }
    js.delete_stream(&name).await?;
    report.latency(RAW_PUBLISH, &publish);
    report.latency(RAW_PULLED, &received);
    report.latency(RAW_ACKED, &acked);
    Ok(())
}

/// `messages` published pipelined (up to 4,096 acks outstanding) while a pull
/// consumer acks them: messages per second from the first publish to the last ack.
pub(crate) async fn jetstream_throughput(
    client: &async_nats::Client,
    replicas: usize,
    messages: u64,
    report: &mut Report,
) -> anyhow::Result<f64> {
    let js = jetstream::new(client.clone());
    let (name, subject, consumer) = raw_stream(&js, replicas).await?;
    let mut pulled = consumer.messages().await?;
    let payload = Bytes::from(vec![b'x'; 512]);
    let started = Instant::now();
    let drain = tokio::spawn(async move {
        let mut n = 0;
        while n < messages {
            match pulled.next().await {
                Some(Ok(message)) => {
                    n += 1;
                    // Plain acks: the consumer's acks pipeline like the publishes.
                    let _ = message.ack().await;
                }
                Some(Err(error)) => bail!("pull: {error}"),
                None => bail!("pull ended"),
            }
        }
        Ok(())
    });
    let mut acks = FuturesUnordered::new();
    for _ in 0..messages {
        if acks.len() >= 4096
            && let Some(ack) = acks.next().await
        {
            let _: jetstream::publish::PublishAck = ack?;
        }
        acks.push(
            js.publish(subject.clone(), payload.clone())
                .await?
                .into_future(),
        );
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    drain.await??;
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    js.delete_stream(&name).await?;
    report.value(RAW_RATE, rate, "msgs/s");
    Ok(rate)
}

/// Puts and gets `count` objects of `size` bytes in a fresh object store bucket.
pub(crate) async fn object_store(
    client: &async_nats::Client,
    size: usize,
    count: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    let js = jetstream::new(client.clone());
    let bucket = unique("loadtest_raw_");
    let store = js
        .create_object_store(jetstream::object_store::Config {
            bucket: bucket.clone(),
            ..jetstream::object_store::Config::default()
        })
        .await?;
    let data = vec![7u8; size];
    let (mut put, mut get) = (Duration::ZERO, Duration::ZERO);
    for i in 0..count {
        let started = Instant::now();
        store
            .put(format!("object-{i}").as_str(), &mut data.as_slice())
            .await?;
        put += started.elapsed();
        let started = Instant::now();
        let mut object = store.get(format!("object-{i}")).await?;
        let read = tokio::io::copy(&mut object, &mut tokio::io::sink()).await?;
        get += started.elapsed();
        if read != size as u64 {
            bail!("object store returned {read} of {size} bytes");
        }
    }
    js.delete_object_store(&bucket).await?;
    let mib = (size * count) as f64 / (1024.0 * 1024.0);
    report.value(RAW_PUT, mib / put.as_secs_f64(), "MiB/s");
    report.value(RAW_GET, mib / get.as_secs_f64(), "MiB/s");
    Ok(())
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<bool>>>>;

/// The same jobs straight to ComfyUI: one WebSocket for the client, each job
/// `POST /prompt` with its own prompt id, wait for `executing {node: null}`,
/// `GET /history/{id}`, then every output through `GET /view`. Open loop at
/// `rate` (or one at a time with `None`), `jobs` jobs. Returns submit → outputs in hand.
pub(crate) async fn direct(
    comfyui: &str,
    mix: &Mix,
    jobs: u64,
    rate: Option<f64>,
) -> anyhow::Result<Latency> {
    let client_id = uuid::Uuid::new_v4().to_string();
    let ws_url = format!(
        "{}/ws?clientId={client_id}",
        comfyui.replacen("http", "ws", 1)
    );
    let (socket, _) = tokio_tungstenite::connect_async(ws_url.as_str()).await?;
    let (mut sink, mut stream) = socket.split();
    let waiters: Waiters = Arc::default();
    let reader = {
        let waiters = waiters.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let Ok(value) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                let data = &value["data"];
                let done = match value["type"].as_str() {
                    Some("executing") if data["node"].is_null() => Some(true),
                    Some("execution_error" | "execution_interrupted") => Some(false),
                    _ => None,
                };
                if let (Some(ok), Some(id)) = (done, data["prompt_id"].as_str())
                    && let Some(waiter) = waiters
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(id)
                {
                    let _ = waiter.send(ok);
                }
            }
            let _ = sink.close().await;
        })
    };
    let http = reqwest::Client::new();
    let latencies = Arc::new(Mutex::new(Latency::new()));
    let errors = Arc::new(Mutex::new(0u64));
    let permits = Arc::new(Semaphore::new(if rate.is_some() { 256 } else { 1 }));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..jobs {
        let planned = match rate {
            Some(rate) => {
                let due = started + Duration::from_secs_f64(index as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                due
            }
            None => Instant::now(),
        };
        let permit = permits.clone().acquire_owned().await?;
        let workflow = mix.plan(index).body["workflow"].clone();
        let (http, waiters, latencies, errors) = (
            http.clone(),
            waiters.clone(),
            latencies.clone(),
            errors.clone(),
        );
        let (base, client_id) = (comfyui.to_owned(), client_id.clone());
        tasks.spawn(async move {
            match direct_job(&http, &base, &client_id, &waiters, workflow).await {
                Ok(()) => latencies
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .record(planned.elapsed()),
                Err(_) => {
                    *errors
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
                }
            }
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    reader.abort();
    let errors = *errors
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if errors > 0 {
        bail!("{errors} direct ComfyUI jobs failed");
    }
    let latency = latencies
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    Ok(latency)
}

async fn direct_job(
    http: &reqwest::Client,
    base: &str,
    client_id: &str,
    waiters: &Waiters,
    workflow: Value,
) -> anyhow::Result<()> {
    let prompt_id = uuid::Uuid::new_v4().to_string();
    let (tx, rx) = oneshot::channel();
    waiters
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(prompt_id.clone(), tx);
    http.post(format!("{base}/prompt"))
        .json(&json!({"prompt": workflow, "client_id": client_id, "prompt_id": prompt_id}))
        .send()
        .await?
        .error_for_status()?;
    if !tokio::time::timeout(Duration::from_secs(60), rx).await?? {
        bail!("prompt failed");
    }
    let history: Value = http
        .get(format!("{base}/history/{prompt_id}"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let outputs = &history[&prompt_id]["outputs"];
    for node in outputs.as_object().into_iter().flat_map(|o| o.values()) {
        for file in node["images"].as_array().into_iter().flatten() {
            let response = http
                .get(format!("{base}/view"))
                .query(&[
                    ("filename", file["filename"].as_str().unwrap_or_default()),
                    ("subfolder", file["subfolder"].as_str().unwrap_or_default()),
                    ("type", file["type"].as_str().unwrap_or("output")),
                ])
                .send()
                .await?
                .error_for_status()?;
            let mut body = response.bytes_stream();
            while let Some(chunk) = body.next().await {
                chunk?;
            }
        }
    }
    Ok(())
}
