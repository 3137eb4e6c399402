//! Runner overhead per job, from real observation points in one process:
//! - pulled → `/prompt`: the runner's `job pulled` trace event (its
//!   `comfyq_runner::worker` target, caught by a tracing layer here) → the
//!   simulator's record of the `POST /prompt` request reaching it;
//! - `execution_success` → completed: the simulator's record of sending
//!   `execution_success` → the runner's `completed` record write (its
//!   `job.completed` state event) seen on `comfyq.events.*.*.completed` (a
//!   core subscription here).
//!
//! The second span covers ComfyUI's own `executing {node: null}` after
//! success, `/history`, streaming every output from `/view` into the object
//! store (SHA-256 included), the history delete, the disk clean-up (the
//! runner is given the simulator's directory, as in managed mode) and the
//! report. Jobs run one at a time on one runner with one slot; the simulator
//! has no node delay. Cases: a tiny PNG, and a 64 MiB video (`SaveVideo`).
//! Then the process's peak resident memory growth (`VmHWM` after resetting
//! it through `/proc/self/clear_refs`) while the 64 MiB videos and one 1 GiB
//! video stream through: an upper bound of the runner's, since the whole
//! stack and the simulator share the process. It fails above 64 MiB.
//!
//! `cargo run --release -p comfyq-tests --example runner_overhead -- [tiny_jobs] [video_jobs]`
//! (defaults 200 and 20, after 5 warm-up jobs each).

use comfyq_tests::memory::proc_status_bytes;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use comfyq_shared::event::EventKind;
use comfyq_shared::job::JobStatus;
use comfyq_shared::names::Names;
use comfyq_tests::stack::invert_workflow;
use comfyq_tests::{RunnerTweak, StackOptions, TestStack};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// When the runner said it pulled each job, by job id.
static PULLED: LazyLock<Mutex<HashMap<String, Instant>>> = LazyLock::new(Default::default);

/// Records the instant of the runner's `job pulled` events.
struct PulledLayer;

#[derive(Default)]
struct Fields {
    message: Option<String>,
    job_id: Option<String>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        match field.name() {
            "message" => self.message = Some(format!("{value:?}")),
            "job_id" => self.job_id = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for PulledLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let at = Instant::now();
        let mut fields = Fields::default();
        event.record(&mut fields);
        if fields.message.as_deref() == Some("job pulled")
            && let Some(job) = fields.job_id
            && let Ok(mut pulled) = PULLED.lock()
        {
            pulled.insert(job, at);
        }
    }
}

/// What the NATS subscriptions saw, per job.
enum Seen {
    Completed(String, Instant),
}

fn video_workflow() -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 8, "color": 0}},
        "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 8.0}},
        "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "comfyq/video", "format": "auto", "codec": "auto"}}
    })
}

#[derive(Default)]
struct Samples {
    pulled_to_prompt: Vec<f64>,
    success_to_event: Vec<f64>,
}

fn ms(from: Instant, to: Instant) -> f64 {
    to.checked_duration_since(from)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

fn report(what: &str, samples: &mut [f64]) {
    samples.sort_by(f64::total_cmp);
    let q = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    println!(
        "{what:<52} n={:<4} p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
        samples.len(),
        q(0.5),
        q(0.99),
        q(1.0)
    );
}

/// Resets the peak (`VmHWM`) to the current resident size; returns it.
fn reset_peak() -> u64 {
    if let Err(error) = std::fs::write("/proc/self/clear_refs", "5") {
        panic!("cannot reset the peak resident size: {error}");
    }
    proc_status_bytes("VmRSS:")
}

struct Bench {
    stack: TestStack,
    seen: mpsc::UnboundedReceiver<Seen>,
    jobs: u32,
}

impl Bench {
    /// Runs one job to its `job.completed` event; returns its samples.
    async fn run(&mut self, workflow: &Value, samples: &mut Samples) {
        // Each job differs (as real ones do by seed): ComfyUI would answer an
        // identical prompt from its cache, without running anything.
        self.jobs += 1;
        let mut workflow = workflow.clone();
        workflow["1"]["inputs"]["color"] = json!(self.jobs);
        let job = self.stack.submit(json!({"workflow": workflow})).await;
        let id = job["id"].as_str().expect("job id").to_owned();
        let completed = loop {
            let Ok(seen) = tokio::time::timeout(Duration::from_secs(60), self.seen.recv()).await
            else {
                panic!("not completed in time: {:#}", self.stack.job(&id).await);
            };
            let seen = seen.expect("subscriptions open");
            match seen {
                Seen::Completed(job, at) if job == id => break at,
                _ => {}
            }
        };
        let pulled = PULLED
            .lock()
            .ok()
            .and_then(|p| p.get(&id).copied())
            .expect("the runner traced the pull");
        let prompt = self
            .stack
            .sim
            .prompts_received()
            .pop()
            .expect("prompt received");
        let success = self.stack.sim.successes_sent().pop().expect("success sent");
        assert_eq!(prompt.prompt_id, success.prompt_id, "one job at a time");
        samples
            .pulled_to_prompt
            .push(ms(pulled, prompt.received_at));
        samples
            .success_to_event
            .push(ms(success.sent_at, completed));
    }

    async fn case(&mut self, name: &str, workflow: &Value, jobs: usize) {
        let mut warm_up = Samples::default();
        for _ in 0..5 {
            self.run(workflow, &mut warm_up).await;
        }
        let mut samples = Samples::default();
        for _ in 0..jobs {
            self.run(workflow, &mut samples).await;
        }
        report(
            &format!("{name}: pulled → /prompt received"),
            &mut samples.pulled_to_prompt,
        );
        report(
            &format!("{name}: execution_success → job.completed recorded"),
            &mut samples.success_to_event,
        );
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::registry()
        .with(PulledLayer.with_filter(
            Targets::new().with_target("comfyq_runner::worker", tracing::Level::DEBUG),
        ))
        .with(fmt::layer().with_filter(EnvFilter::new("warn")))
        .init();
    let mut args = std::env::args().skip(1);
    let tiny_jobs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let video_jobs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);

    let disk = tempfile::tempdir().expect("temp dir");
    let root = disk.path().to_path_buf();
    let stack = TestStack::start_with(StackOptions {
        sim: comfy_sim::SimConfig {
            step_delay_ms: 0,
            node_delay_ms: 0,
            previews: false,
            data_dir: Some(root.clone()),
            ..comfy_sim::SimConfig::default()
        },
        runner_tweak: Some(RunnerTweak::new(move |config| {
            config.comfyui_dir = Some(root.clone());
        })),
        configure_ingress: Some(|ingress| {
            ingress.rate_limit_per_s = 0;
            ingress.max_active_jobs = 0;
        }),
        ..StackOptions::default()
    })
    .await;

    let names = Names::new("comfyq").expect("names");
    let client = stack.nats.client().await;
    let mut events = client
        .subscribe(names.event_kind_filter(EventKind::State(JobStatus::Completed)))
        .await
        .expect("subscribe to events");
    client.flush().await.expect("flush");
    let (sender, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let seen = tokio::select! {
                Some(message) = events.next() => {
                    let at = Instant::now();
                    // comfyq.events.<tenant>.<job>.completed
                    let job = message.subject.split('.').nth(3).unwrap_or_default().to_owned();
                    Seen::Completed(job, at)
                }
                else => break,
            };
            if sender.send(seen).is_err() {
                break;
            }
        }
    });
    let mut bench = Bench {
        stack,
        seen,
        jobs: 0,
    };

    bench.case("tiny PNG", &invert_workflow(8), tiny_jobs).await;

    bench.stack.sim.update(|c| c.output_bytes = 64 << 20);
    let before = reset_peak();
    bench
        .case("64 MiB video", &video_workflow(), video_jobs)
        .await;
    let growth_64 = proc_status_bytes("VmHWM:").saturating_sub(before);

    bench.stack.sim.update(|c| c.output_bytes = 1 << 30);
    let before = reset_peak();
    let mut one = Samples::default();
    let started = Instant::now();
    bench.run(&video_workflow(), &mut one).await;
    let took = started.elapsed();
    let growth_1g = proc_status_bytes("VmHWM:").saturating_sub(before);

    println!(
        "peak resident growth, {} jobs of 64 MiB video: {:.1} MiB",
        video_jobs + 5,
        growth_64 as f64 / (1 << 20) as f64
    );
    println!(
        "peak resident growth, one 1 GiB video: {:.1} MiB (execution_success → completed {:.0} ms, whole job {:.1} s)",
        growth_1g as f64 / (1 << 20) as f64,
        one.success_to_event[0],
        took.as_secs_f64()
    );
    bench.stack.stop().await;
    assert!(
        growth_1g < 64 << 20 && growth_64 < 64 << 20,
        "resident memory grew too much"
    );
}
