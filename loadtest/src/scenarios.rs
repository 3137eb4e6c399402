//! The scenarios: each starts (or connects to) a stack, runs its load and its
//! baselines, and returns reports.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use comfy_sim::SimConfig;
use comfyq_shared::event::EventKind;
use futures::StreamExt;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::analysis::{self, DISPATCH, E2E_NATS, OUTPUTS, SUBMIT};
use crate::baseline::{self, DIRECT, RAW_GET, RAW_PUBLISH, RAW_PULLED, RAW_PUT, RAW_RATE};
use crate::driver::{self, LoadSpec};
use crate::hist::Latency;
use crate::procstat;
use crate::report::Report;
use crate::target::{LocalOptions, Target};
use crate::workload::{Mix, png_input};
use crate::{Options, Scenario};

const MIB: usize = 1024 * 1024;

pub(crate) async fn run(scenario: Scenario, o: &Options) -> anyhow::Result<Vec<Report>> {
    match scenario {
        Scenario::Latency => latency(o).await.map(|r| vec![r]),
        Scenario::Throughput => throughput(o).await.map(|r| vec![r]),
        Scenario::Fleet => fleet(o).await,
        Scenario::Media => media(o).await.map(|r| vec![r]),
        Scenario::Fanout => fanout(o).await.map(|r| vec![r]),
        Scenario::Priority => priority(o).await.map(|r| vec![r]),
        Scenario::Soak => soak(o).await.map(|r| vec![r]),
        Scenario::Baseline => baselines(o).await.map(|r| vec![r]),
        Scenario::Chaos => crate::chaos::chaos(o).await.map(|r| vec![r]),
    }
}

/// The simulator with no work per node: what is left is comfyq's and ComfyUI's overhead.
fn zero_work(o: &Options) -> SimConfig {
    SimConfig {
        step_delay_ms: 0,
        node_delay_ms: 0,
        previews: false,
        output_bytes: o.output_bytes.unwrap_or(0),
        temp_parent: sim_temp_parent(o),
        ..SimConfig::default()
    }
}

/// The simulators' files go to tmpfs (`/dev/shm`) unless `--sim-disk`: a
/// simulated ComfyUI stands in for a GPU machine of its own, whose file
/// writes production comfyq never pays for in its CPU.
fn sim_temp_parent(o: &Options) -> Option<std::path::PathBuf> {
    let shm = std::path::Path::new("/dev/shm");
    (!o.sim_disk && shm.is_dir()).then(|| shm.to_path_buf())
}

fn local(o: &Options, sims: usize, runners: usize, slots: usize, sim: SimConfig) -> LocalOptions {
    LocalOptions {
        sims: o.sims.unwrap_or(sims),
        runners: o.runners.unwrap_or(runners),
        slots: o.slots.unwrap_or(slots),
        sim,
        cluster: o.cluster.map(usize::from),
    }
}

fn parse_priorities(text: &str) -> anyhow::Result<Vec<(String, u32)>> {
    text.split(',')
        .map(|part| {
            let (name, weight) = part.split_once('=').unwrap_or((part, "1"));
            let weight = weight
                .trim()
                .parse()
                .with_context(|| format!("bad weight in --priorities {part:?}"))?;
            Ok((name.trim().to_owned(), weight))
        })
        .collect()
}

fn mix(o: &Options, priorities: &str, tenants: usize) -> anyhow::Result<Mix> {
    Ok(Mix {
        priorities: parse_priorities(o.priorities.as_deref().unwrap_or(priorities))?,
        tenants: o.tenants.unwrap_or(tenants),
        workflow_bytes: o.workflow_bytes,
        input: o.input_bytes.filter(|n| *n > 0).map(png_input),
        progress: None,
        webhook: None,
    })
}

async fn target(o: &Options, local: &LocalOptions, tenants: usize) -> anyhow::Result<Target> {
    match &o.url {
        Some(url) => Target::remote(
            url,
            o.nats_url.clone(),
            &o.api_key,
            &o.prefix,
            o.comfyui_url.clone(),
        ),
        None => Target::start_local(local, tenants).await,
    }
}

fn rate(o: &Options, default: Option<f64>) -> Option<f64> {
    match o.rate {
        Some(r) if r > 0.0 => Some(r),
        Some(_) => None,
        None => default,
    }
}

fn settings(o: &Options, local: &LocalOptions, mix: &Mix, spec: &LoadSpec) -> Value {
    json!({
        "stack": if o.url.is_some() { "remote" } else { "in-process" },
        "rate_per_s": spec.rate,
        "concurrency": spec.concurrency,
        "duration_s": spec.duration.map(|d| d.as_secs_f64()),
        "jobs": spec.jobs,
        "nats_nodes": o.replicas(),
        "sims": local.sims,
        "runners": local.runners,
        "slots": local.slots,
        "priorities": mix.priorities,
        "tenants": mix.tenants,
        "workflow_bytes": mix.workflow_bytes,
        "input_bytes": mix.input.as_ref().map(bytes::Bytes::len),
        "output_bytes": local.sim.output_bytes,
        "sim_node_delay_ms": local.sim.node_delay_ms,
        "sim_files": local.sim.temp_parent.as_ref().map_or("system temp dir".to_owned(), |p| p.display().to_string()),
    })
}

async fn nats_client(target: &Target) -> anyhow::Result<Option<async_nats::Client>> {
    target.nats().await
}

/// A short run first so connections and code paths are warm; not reported.
async fn warm_up(
    target: &Arc<Target>,
    tracker: &Arc<driver::Tracker>,
    mix: &Mix,
) -> anyhow::Result<()> {
    let spec = LoadSpec {
        rate: None,
        concurrency: 4,
        duration: None,
        jobs: Some(20),
        fetch_outputs: false,
        until_done: false,
        sse: false,
        drain: Duration::from_secs(30),
    };
    driver::run(target.clone(), tracker.clone(), mix, &spec).await?;
    Ok(())
}

/// Queues `jobs` zero-work jobs in pool `backlog`, where no runner is, and
/// waits until the scheduler holds them all: they stay pending for the run.
async fn queue_backlog(target: &Target, jobs: usize) -> anyhow::Result<usize> {
    let tenant = &target.tenants[0];
    let body = json!({"workflow": comfyq_tests::stack::invert_workflow(8), "pool": "backlog", "priority": "high"});
    let mut held = 0;
    for _ in 0..jobs {
        let response = tenant
            .http
            .post(format!("{}/v1/jobs", target.api))
            .json(&body)
            .send()
            .await?;
        if response.status() != reqwest::StatusCode::ACCEPTED {
            bail!("backlog submission answered {}", response.status());
        }
        held += 1;
    }
    let Some(nats) = nats_client(target).await? else {
        return Ok(held);
    };
    // Each waits on its pool's pending subjects (written with its record).
    let js = async_nats::jetstream::new(nats);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stream = js.get_stream(target.names.pending_stream()).await?;
        let mut subjects = stream
            .info_with_subjects(target.names.pending_filter())
            .await?;
        let mut pending = 0u64;
        while let Some(entry) = futures::StreamExt::next(&mut subjects).await {
            pending += entry?.1 as u64;
        }
        if pending >= held as u64 || Instant::now() > deadline {
            return Ok(pending as usize);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn latency(o: &Options) -> anyhow::Result<Report> {
    // 16 slots: 100 zero-work jobs/s keep ~3 busy, so jobs do not queue
    // for a slot and dispatch measures the queue, not a shortage of slots.
    let local = local(o, 2, 4, 4, zero_work(o));
    let mut mix = mix(o, "normal=1", 1)?;
    let target = target(o, &local, mix.tenants).await?;
    if let Some(stack) = &target.stack {
        mix.webhook = Some(stack.webhooks.url("/loadtest"));
    }
    let spec = LoadSpec {
        rate: rate(o, Some(100.0)),
        concurrency: o.concurrency.unwrap_or(1024),
        duration: o
            .duration
            .or(Some(Duration::from_secs(30)))
            .filter(|_| o.jobs.is_none()),
        jobs: o.jobs,
        fetch_outputs: true,
        until_done: false,
        sse: true,
        drain: Duration::from_secs(60),
    };
    let mut report = Report::new("latency", settings(o, &local, &mix, &spec));
    let target = Arc::new(target);
    let tracker = driver::listen(&target, spec.sse).await?;
    warm_up(&target, &tracker, &mix).await?;
    let held = queue_backlog(&target, o.backlog).await?;
    let before = analysis::nats_messages();
    let outcome = driver::run(target.clone(), tracker, &mix, &spec).await?;
    let messages = analysis::nats_messages();
    if o.backlog > 0 {
        report.value(
            "jobs held in pool `backlog` (no runners) while measuring",
            held as f64,
            "jobs",
        );
    }
    let client = nats_client(&target).await?;
    if let (Some(client), false) = (&client, o.no_baseline) {
        baseline::jetstream_latency(client, o.replicas(), 1000, &mut report).await?;
    }
    analysis::add_job_rows(&target, &outcome, &mut report, false);
    analysis::add_message_rows(&mut report, &before, &messages, outcome.accepted.len());
    report.compare(DISPATCH, RAW_PULLED);
    report.compare(SUBMIT, RAW_PUBLISH);
    match (&target.comfyui_url, o.no_baseline, mix.input.is_some()) {
        (Some(comfyui), false, false) => {
            let direct_mix = Mix {
                webhook: None,
                ..mix.clone()
            };
            let jobs = outcome.accepted.len() as u64;
            let direct = baseline::direct(comfyui, &direct_mix, jobs, spec.rate).await?;
            report.latency(DIRECT, &direct);
            report.compare(OUTPUTS, DIRECT);
            if let (Some(ours), Some(theirs)) = (report.summary(OUTPUTS), report.summary(DIRECT)) {
                report.value(
                    "overhead over direct, p50",
                    ours.p50_ms - theirs.p50_ms,
                    "ms",
                );
                report.value(
                    "overhead over direct, p99",
                    ours.p99_ms - theirs.p99_ms,
                    "ms",
                );
            }
            report.note("direct: same workflows, same rate, same simulator, one WebSocket, after the comfyq run; overhead = difference of percentiles");
        }
        (_, false, true) => report.note("direct baseline skipped: jobs with inputs"),
        (None, false, _) => report.note("direct baseline needs --comfyui-url with --url"),
        _ => {}
    }
    report.processes = target.processes();
    if let Ok(target) = Arc::try_unwrap(target) {
        target.stop().await;
    }
    Ok(report)
}

async fn throughput(o: &Options) -> anyhow::Result<Report> {
    let local = local(o, 4, 4, 4, zero_work(o));
    let mix = mix(o, "high=1,normal=8,low=1", 4)?;
    let target = Arc::new(target(o, &local, mix.tenants).await?);
    let spec = LoadSpec {
        rate: rate(o, None),
        concurrency: o.concurrency.unwrap_or(64),
        duration: o
            .duration
            .or(Some(Duration::from_secs(60)))
            .filter(|_| o.jobs.is_none()),
        jobs: o.jobs,
        fetch_outputs: false,
        until_done: true,
        sse: false,
        drain: Duration::from_secs(180),
    };
    let mut report = Report::new("throughput", settings(o, &local, &mix, &spec));
    let client = nats_client(&target).await?;
    if let (Some(client), false) = (&client, o.no_baseline) {
        baseline::jetstream_throughput(client, o.replicas(), 50_000, &mut report).await?;
    }
    let tracker = driver::listen(&target, false).await?;
    warm_up(&target, &tracker, &mix).await?;
    let before = analysis::nats_messages();
    let outcome = driver::run(target.clone(), tracker, &mix, &spec).await?;
    let messages = analysis::nats_messages();
    let derived = analysis::add_job_rows(&target, &outcome, &mut report, false);
    analysis::add_message_rows(&mut report, &before, &messages, outcome.accepted.len());
    report.value_vs(
        "sustained completed rate vs raw JetStream",
        derived.completed_per_s,
        "jobs/s",
        RAW_RATE,
    );
    report.processes = target.processes();
    if let Ok(target) = Arc::try_unwrap(target) {
        target.stop().await;
    }
    Ok(report)
}

async fn fleet(o: &Options) -> anyhow::Result<Vec<Report>> {
    if o.url.is_some() {
        bail!("fleet starts its own runners: run it without --url");
    }
    let large = o.runners.unwrap_or(1000);
    let mut reports = Vec::new();
    let mut summary = Report::new(
        "fleet",
        json!({"runners": [10, large], "slots": o.slots.unwrap_or(5), "sims": o.sims.unwrap_or(10)}),
    );
    for runners in [10, large] {
        let local = LocalOptions {
            runners,
            ..local(o, 10, runners, 5, zero_work(o))
        };
        let mix = mix(o, "normal=1", 1)?;
        let spec = LoadSpec {
            rate: rate(o, Some(100.0)),
            concurrency: o.concurrency.unwrap_or(1024),
            duration: o
                .duration
                .or(Some(Duration::from_secs(20)))
                .filter(|_| o.jobs.is_none()),
            jobs: o.jobs,
            fetch_outputs: false,
            until_done: false,
            sse: false,
            drain: Duration::from_secs(120),
        };
        let started = Instant::now();
        let target = Arc::new(target(o, &local, 1).await?);
        let start_up = started.elapsed();
        let mut report = Report::new(
            &format!("fleet: {runners} runners"),
            settings(o, &local, &mix, &spec),
        );
        report.value(
            "stack start-up (all runners registered)",
            start_up.as_secs_f64(),
            "s",
        );
        let tracker = driver::listen(&target, false).await?;
        warm_up(&target, &tracker, &mix).await?;
        let outcome = driver::run(target.clone(), tracker, &mix, &spec).await?;
        let derived = analysis::add_job_rows(&target, &outcome, &mut report, false);
        report.processes = target.processes();
        let small = format!("dispatch, 10 runners × {} slots", local.slots);
        if runners == 10 {
            summary.latency(&small, &derived.dispatch);
        } else {
            summary.latency_vs(
                &format!("dispatch, {runners} runners × {} slots", local.slots),
                &derived.dispatch,
                &small,
            );
        }
        reports.push(report);
        if let Ok(target) = Arc::try_unwrap(target) {
            target.stop().await;
        }
    }
    summary.note(format!(
        "every runner is a full in-process runner (own NATS connection, registration, \
         waiting pull request, WebSocket) against {} simulators, which run one prompt at a time each: \
         this measures the queue's cost of many runners and slots, not GPU parallelism",
        o.sims.unwrap_or(10)
    ));
    reports.push(summary);
    Ok(reports)
}

async fn media(o: &Options) -> anyhow::Result<Report> {
    let size = o.input_bytes.unwrap_or(64 * MIB);
    let out = o.output_bytes.unwrap_or(64 * MIB as u64);
    let sim = SimConfig {
        output_bytes: out,
        max_upload_size: (size as u64 + MIB as u64).max(104_857_600),
        ..zero_work(o)
    };
    let local = local(o, 1, 1, 1, sim);
    let mut mix = mix(o, "normal=1", 1)?;
    mix.input = Some(png_input(size));
    let target = Arc::new(target(o, &local, 1).await?);
    let spec = LoadSpec {
        rate: None,
        concurrency: 1,
        duration: None,
        jobs: Some(o.jobs.unwrap_or(3)),
        fetch_outputs: true,
        until_done: false,
        sse: false,
        drain: Duration::from_secs(120),
    };
    let mut report = Report::new("media", settings(o, &local, &mix, &spec));
    let tracker = driver::listen(&target, false).await?;
    let before = procstat::this("").map_or(0.0, |p| p.peak_rss_mib);
    let outcome = driver::run(target.clone(), tracker, &mix, &spec).await?;
    let after = procstat::this("").map_or(0.0, |p| p.peak_rss_mib);
    analysis::add_job_rows(&target, &outcome, &mut report, false);
    let client = nats_client(&target).await?;
    if let (Some(client), false) = (&client, o.no_baseline) {
        baseline::object_store(client, size, 3, &mut report).await?;
    }
    let submit = outcome.submit.summary();
    let upload_s = submit.mean_ms * submit.n as f64 / 1000.0;
    if upload_s > 0.0 {
        let mib = (size as f64 * submit.n as f64) / MIB as f64;
        report.value_vs(
            "upload (multipart POST → 202, stored)",
            mib / upload_s,
            "MiB/s",
            RAW_PUT,
        );
    }
    if outcome.download.as_secs_f64() > 0.0 {
        let mib = outcome.output_bytes as f64 / MIB as f64;
        report.value_vs(
            "download (GET …/outputs/{name})",
            mib / outcome.download.as_secs_f64(),
            "MiB/s",
            RAW_GET,
        );
    }
    if target.stack.is_some() {
        report.value(
            "peak RSS growth while moving the files (whole process)",
            after - before,
            "MiB",
        );
        report.note("in-process: ingress, scheduler, runner, notifier, simulator and client share one process, so the RSS growth bounds each service's");
    }
    report.note("end to end includes the runner's upload to ComfyUI, ComfyUI writing the padded output, /view into the object store");
    report.processes = target.processes();
    if let Ok(target) = Arc::try_unwrap(target) {
        target.stop().await;
    }
    Ok(report)
}

fn event_age(payload: &[u8], now: OffsetDateTime) -> Option<f64> {
    let event: Value = serde_json::from_slice(payload).ok()?;
    if event["type"] != "job.progress" {
        return None;
    }
    let at = driver::parse_time(&event["at"])?;
    Some((now - at).as_seconds_f64())
}

async fn fanout(o: &Options) -> anyhow::Result<Report> {
    let local = local(o, 1, 1, 1, zero_work(o));
    let mut mix = mix(o, "normal=1", 1)?;
    mix.progress = Some((100, 10));
    let target = Arc::new(target(o, &local, 1).await?);
    let receivers = 100;
    let spec = LoadSpec {
        rate: None,
        concurrency: 1,
        duration: None,
        jobs: Some(o.jobs.unwrap_or(5)),
        fetch_outputs: false,
        until_done: false,
        sse: false,
        drain: Duration::from_secs(60),
    };
    let mut report = Report::new("fanout", settings(o, &local, &mix, &spec));
    let nats_hist = Arc::new(Mutex::new(Latency::new()));
    let sse_hist = Arc::new(Mutex::new(Latency::new()));
    let Some(nats_url) = target.nats_url.clone() else {
        bail!("fanout needs NATS (--nats-url with --url)");
    };
    let filter = target.names.event_kind_filter(EventKind::Progress);
    let mut tasks = Vec::new();
    for _ in 0..receivers {
        let client = crate::target::connect_nats(&nats_url).await?;
        let mut subscription = client.subscribe(filter.clone()).await?;
        client.flush().await?;
        let hist = nats_hist.clone();
        tasks.push(tokio::spawn(async move {
            let _client = client;
            while let Some(message) = subscription.next().await {
                if let Some(age) = event_age(&message.payload, OffsetDateTime::now_utc()) {
                    hist.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .record_secs(age);
                }
            }
        }));
    }
    // The floor first, at the scenario's event rate (a progress step every 10 ms).
    let raw = if o.no_baseline {
        None
    } else {
        Some(
            baseline::fanout(
                &nats_url,
                receivers,
                500,
                Duration::from_millis(10),
                event_age,
            )
            .await?,
        )
    };
    let tenant = &target.tenants[0];
    for _ in 0..receivers {
        let response = tenant
            .http
            .get(format!("{}/v1/events", target.api))
            .send()
            .await?
            .error_for_status()?;
        let hist = sse_hist.clone();
        tasks.push(tokio::spawn(async move {
            let mut body = response.bytes_stream();
            let mut buffer = Vec::new();
            while let Some(Ok(chunk)) = body.next().await {
                let now = OffsetDateTime::now_utc();
                buffer.extend_from_slice(&chunk);
                while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    if let Some(data) = line.strip_prefix(b"data:")
                        && let Some(age) = event_age(data, now)
                    {
                        hist.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .record_secs(age);
                    }
                }
            }
        }));
    }
    let tracker = driver::listen(&target, false).await?;
    let outcome = driver::run(target.clone(), tracker, &mix, &spec).await?;
    // SSE clients read from per-client consumers and may trail the NATS ones.
    let expected = nats_hist
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .len();
    let deadline = Instant::now() + Duration::from_secs(15);
    while sse_hist
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .len()
        < expected
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for task in tasks {
        task.abort();
    }
    let nats = nats_hist
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let sse = sse_hist
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let to_nats = format!("progress → {receivers} NATS subscribers");
    let to_sse = format!("progress → {receivers} SSE clients");
    if let Some(raw) = &raw {
        report.latency(baseline::RAW_FANOUT, raw);
        report.latency_vs(&to_nats, &nats, baseline::RAW_FANOUT);
        report.latency_vs(&to_sse, &sse, baseline::RAW_FANOUT);
    } else {
        report.latency(&to_nats, &nats);
        report.latency(&to_sse, &sse);
    }
    report.value(
        "progress events received over NATS",
        nats.len() as f64,
        "events",
    );
    report.value(
        "progress events received over SSE",
        sse.len() as f64,
        "events",
    );
    analysis::add_job_rows(&target, &outcome, &mut report, false);
    report.note("latency = receive time − the event's `at` (the runner stamps it as it publishes what ComfyUI sent): it leaves out the ComfyUI → runner WebSocket hop");
    report.processes = target.processes();
    if let Ok(target) = Arc::try_unwrap(target) {
        target.stop().await;
    }
    Ok(report)
}

async fn priority(o: &Options) -> anyhow::Result<Report> {
    // 3 nodes × 10 ms: one runner slot does about 30 jobs/s.
    let sim = SimConfig {
        node_delay_ms: 10,
        ..zero_work(o)
    };
    let local = local(o, 1, 1, 1, sim);
    let mix = mix(o, "high=1,normal=1,low=1", 1)?;
    let target = Arc::new(target(o, &local, mix.tenants).await?);
    let spec = LoadSpec {
        rate: rate(o, Some(50.0)),
        concurrency: o.concurrency.unwrap_or(1024),
        duration: o
            .duration
            .or(Some(Duration::from_secs(20)))
            .filter(|_| o.jobs.is_none()),
        jobs: o.jobs,
        fetch_outputs: false,
        until_done: false,
        sse: false,
        drain: Duration::from_secs(300),
    };
    let mut report = Report::new("priority", settings(o, &local, &mix, &spec));
    let tracker = driver::listen(&target, false).await?;
    let outcome = driver::run(target.clone(), tracker, &mix, &spec).await?;
    analysis::add_job_rows(&target, &outcome, &mut report, true);
    report.note("submitted faster than the pool runs them, so a backlog builds; queue wait = accepted → running (record timestamps)");
    report.processes = target.processes();
    if let Ok(target) = Arc::try_unwrap(target) {
        target.stop().await;
    }
    Ok(report)
}

async fn soak(o: &Options) -> anyhow::Result<Report> {
    let local = local(o, 2, 4, 4, zero_work(o));
    let mix = mix(o, "high=1,normal=8,low=1", 2)?;
    let target = Arc::new(target(o, &local, mix.tenants).await?);
    let total = o.duration.unwrap_or(Duration::from_secs(30 * 60));
    let interval = o.interval.unwrap_or(Duration::from_secs(60)).min(total);
    let spec = LoadSpec {
        rate: rate(o, Some(100.0)),
        concurrency: o.concurrency.unwrap_or(1024),
        duration: Some(interval),
        jobs: None,
        fetch_outputs: false,
        until_done: false,
        sse: false,
        drain: Duration::from_secs(60),
    };
    let mut report = Report::new("soak", settings(o, &local, &mix, &spec));
    let tracker = driver::listen(&target, false).await?;
    warm_up(&target, &tracker, &mix).await?;
    let started = Instant::now();
    let (mut e2e, mut dispatch) = (Latency::new(), Latency::new());
    let (mut accepted, mut lost) = (0u64, 0u64);
    while started.elapsed() < total {
        let outcome = driver::run(target.clone(), tracker.clone(), &mix, &spec).await?;
        let mut part = Report::default();
        let derived = analysis::add_job_rows(&target, &outcome, &mut part, false);
        e2e.merge(&derived.e2e_nats);
        dispatch.merge(&derived.dispatch);
        accepted += outcome.accepted.len() as u64;
        lost += derived.lost;
        let e = derived.e2e_nats.summary();
        let d = derived.dispatch.summary();
        let processes = target.processes();
        let row = json!({
            "t_s": started.elapsed().as_secs(),
            "accepted": outcome.accepted.len(),
            "lost": derived.lost,
            "e2e_p50_ms": e.p50_ms,
            "e2e_p99_ms": e.p99_ms,
            "dispatch_p50_ms": d.p50_ms,
            "dispatch_p99_ms": d.p99_ms,
            "rss_mib": processes.iter().map(|p| (p.process.clone(), p.rss_mib)).collect::<Vec<_>>(),
        });
        // Each row as it comes, so a long run shows its trend (and leaves
        // it behind if it is stopped).
        eprintln!("soak: {row}");
        report.series.push(row);
        // The tracker only needs what later intervals can still see.
        driver::lock_jobs(&tracker).clear();
    }
    report.latency(E2E_NATS, &e2e);
    report.latency(DISPATCH, &dispatch);
    report.value("jobs accepted", accepted as f64, "jobs");
    report.value(
        "LOST (accepted, not terminal at the end)",
        lost as f64,
        "jobs",
    );
    report.processes = target.processes();
    if let Ok(target) = Arc::try_unwrap(target) {
        target.stop().await;
    }
    Ok(report)
}

async fn baselines(o: &Options) -> anyhow::Result<Report> {
    let local = local(o, 1, 0, 1, zero_work(o));
    let target = target(o, &local, 1).await?;
    let mut report = Report::new(
        "baseline",
        json!({"stack": if o.url.is_some() { "remote" } else { "in-process" }}),
    );
    let Some(client) = nats_client(&target).await? else {
        bail!("the baselines need NATS (--nats-url with --url)");
    };
    baseline::jetstream_latency(&client, o.replicas(), 1000, &mut report).await?;
    baseline::jetstream_throughput(&client, o.replicas(), 50_000, &mut report).await?;
    baseline::object_store(&client, 64 * MIB, 3, &mut report).await?;
    report.processes = target.processes();
    target.stop().await;
    Ok(report)
}
