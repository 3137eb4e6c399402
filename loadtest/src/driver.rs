//! The load generator: submits jobs at a fixed rate (open loop, latencies
//! measured from the planned send time, so a stalled client does not hide
//! queueing) or as fast as `concurrency` requests in flight allow, and follows
//! every accepted job to its end through a NATS subscriber and SSE clients.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comfyq_shared::event::EventKind;
use comfyq_shared::job::JobStatus;
use futures::StreamExt;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;

use crate::hist::Latency;
use crate::target::Target;
use crate::workload::{INPUT_NAME, JobPlan, Mix};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How much load, how fast.
#[derive(Debug, Clone)]
pub(crate) struct LoadSpec {
    /// Jobs per second; `None` = as fast as `concurrency` allows.
    pub(crate) rate: Option<f64>,
    pub(crate) concurrency: usize,
    pub(crate) duration: Option<Duration>,
    pub(crate) jobs: Option<u64>,
    /// After completion, read the job and download its outputs ("outputs in hand").
    pub(crate) fetch_outputs: bool,
    /// A request's slot in `concurrency` is held until the job ends (seen on
    /// NATS), so at most `concurrency` jobs are in the system: the rate is what
    /// comfyq sustains, not a backlog that grows.
    pub(crate) until_done: bool,
    /// Follow completions over SSE too (one `/v1/events` stream per tenant).
    pub(crate) sse: bool,
    /// How long to wait after the last submission for every job to end.
    pub(crate) drain: Duration,
}

/// What is known about one job, from whichever source saw it first.
#[derive(Debug, Default)]
pub(crate) struct Track {
    pub(crate) tenant: usize,
    pub(crate) priority: String,
    pub(crate) planned: Option<Instant>,
    pub(crate) created_at: Option<OffsetDateTime>,
    pub(crate) nats_done: Option<Instant>,
    pub(crate) nats_terminal_events: u32,
    pub(crate) sse_done: Option<Instant>,
    waiter: Option<oneshot::Sender<()>>,
}

/// Completion sightings by job id.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    pub(crate) jobs: Mutex<HashMap<String, Track>>,
}

impl Tracker {
    fn nats_terminal(&self, id: &str, at: Instant) {
        let mut jobs = lock(&self.jobs);
        let track = jobs.entry(id.to_owned()).or_default();
        track.nats_terminal_events += 1;
        if track.nats_done.is_none() {
            track.nats_done = Some(at);
        }
        if let Some(waiter) = track.waiter.take() {
            let _ = waiter.send(());
        }
    }

    fn sse_terminal(&self, id: &str, at: Instant) {
        let mut jobs = lock(&self.jobs);
        let track = jobs.entry(id.to_owned()).or_default();
        if track.sse_done.is_none() {
            track.sse_done = Some(at);
        }
    }

    /// Resolves once the job's terminal event was seen on NATS.
    fn done(&self, id: &str) -> Option<oneshot::Receiver<()>> {
        let mut jobs = lock(&self.jobs);
        let track = jobs.entry(id.to_owned()).or_default();
        if track.nats_done.is_some() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        track.waiter = Some(tx);
        Some(rx)
    }
}

/// The tracked jobs, locked.
pub(crate) fn lock_jobs(tracker: &Tracker) -> std::sync::MutexGuard<'_, HashMap<String, Track>> {
    lock(&tracker.jobs)
}

/// A job's record at the end of the run.
#[derive(Debug, Clone)]
pub(crate) struct Final {
    pub(crate) id: String,
    pub(crate) priority: String,
    pub(crate) status: Option<String>,
    pub(crate) created_at: Option<OffsetDateTime>,
    pub(crate) started_at: Option<OffsetDateTime>,
}

/// Everything a run observed.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) submit: Latency,
    pub(crate) outputs_in_hand: Latency,
    pub(crate) output_bytes: u64,
    /// Time spent streaming outputs (`GET …/outputs/{name}`), summed.
    pub(crate) download: Duration,
    pub(crate) submitted: u64,
    pub(crate) accepted: Vec<String>,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) started: Instant,
    /// Start → last submission answered.
    pub(crate) submit_phase: Duration,
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) finals: Vec<Final>,
}

pub(crate) fn parse_time(value: &Value) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(value.as_str()?, &Rfc3339).ok()
}

/// Starts the completion listeners: a NATS subscriber on the terminal state
/// subjects and (with `sse`) one SSE stream per tenant. Returns once all are
/// subscribed.
pub(crate) async fn listen(target: &Target, sse: bool) -> anyhow::Result<Arc<Tracker>> {
    let tracker = Arc::new(Tracker::default());
    if let Some(client) = target.nats().await? {
        let mut subscriptions = Vec::new();
        for status in [
            JobStatus::Completed,
            JobStatus::Failed,
            JobStatus::Cancelled,
        ] {
            let filter = target.names.event_kind_filter(EventKind::State(status));
            subscriptions.push(client.subscribe(filter).await?);
        }
        client.flush().await?;
        let tracker = tracker.clone();
        tokio::spawn(async move {
            // The client must outlive its subscriptions.
            let _client = client;
            let mut all = futures::stream::select_all(subscriptions);
            while let Some(message) = all.next().await {
                let at = Instant::now();
                // `<prefix>.events.<tenant>.<job>.<kind>`
                let mut tokens = message.subject.as_str().rsplit('.');
                if let Some(job) = tokens.nth(1) {
                    tracker.nats_terminal(job, at);
                }
            }
        });
    }
    if sse {
        for tenant in &target.tenants {
            let response = tenant
                .http
                .get(format!("{}/v1/events", target.api))
                .send()
                .await?
                .error_for_status()?;
            let tracker = tracker.clone();
            tokio::spawn(async move {
                let mut body = response.bytes_stream();
                let mut buffer = Vec::new();
                while let Some(Ok(chunk)) = body.next().await {
                    let at = Instant::now();
                    buffer.extend_from_slice(&chunk);
                    while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buffer.drain(..=end).collect();
                        let Some(data) = line.strip_prefix(b"data:") else {
                            continue;
                        };
                        let Ok(event) = serde_json::from_slice::<Value>(data) else {
                            continue;
                        };
                        let terminal = matches!(
                            event["type"].as_str(),
                            Some("job.completed" | "job.failed" | "job.cancelled")
                        );
                        if let (true, Some(job)) = (terminal, event["job_id"].as_str()) {
                            tracker.sse_terminal(job, at);
                        }
                    }
                }
            });
        }
    }
    Ok(tracker)
}

#[derive(Debug, Default)]
struct Shared {
    submit: Latency,
    outputs_in_hand: Latency,
    output_bytes: u64,
    download: Duration,
    accepted: Vec<String>,
    errors: BTreeMap<String, u64>,
    last_answer: Option<Instant>,
}

/// Runs the load, waits for every accepted job to end (or `drain` to pass) and
/// reads every accepted job's record.
pub(crate) async fn run(
    target: Arc<Target>,
    tracker: Arc<Tracker>,
    mix: &Mix,
    spec: &LoadSpec,
) -> anyhow::Result<Outcome> {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let permits = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    let mut index: u64 = 0;
    loop {
        if spec.jobs.is_some_and(|n| index >= n)
            || spec.duration.is_some_and(|d| started.elapsed() >= d)
        {
            break;
        }
        let planned = match spec.rate {
            Some(rate) => {
                let due = started + Duration::from_secs_f64(index as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                due
            }
            None => Instant::now(),
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let plan = mix.plan(index);
        index += 1;
        let (target, tracker, shared) = (target.clone(), tracker.clone(), shared.clone());
        let fetch = spec.fetch_outputs;
        let until_done = spec.until_done;
        tasks.spawn(async move {
            let id = one_job(&target, &tracker, &shared, plan, planned, fetch).await;
            if let (true, Some(id)) = (until_done && !fetch, id)
                && let Some(done) = tracker.done(&id)
            {
                let _ = tokio::time::timeout(Duration::from_secs(120), done).await;
            }
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut shared = std::mem::take(&mut *lock(&shared));
    let submit_phase = shared
        .last_answer
        .map_or(Duration::ZERO, |at| at.duration_since(started));

    // Every accepted job must end; wait for the NATS sightings first (cheap),
    // then read each record.
    let deadline = Instant::now() + spec.drain;
    if target.nats_url.is_some() {
        while Instant::now() < deadline {
            let open = {
                let jobs = lock(&tracker.jobs);
                shared
                    .accepted
                    .iter()
                    .filter(|id| jobs.get(*id).is_none_or(|t| t.nats_done.is_none()))
                    .count()
            };
            if open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let finals = read_finals(&target, &tracker, &shared.accepted, deadline).await;
    Ok(Outcome {
        submit: std::mem::take(&mut shared.submit),
        outputs_in_hand: std::mem::take(&mut shared.outputs_in_hand),
        output_bytes: shared.output_bytes,
        download: shared.download,
        submitted: index,
        accepted: std::mem::take(&mut shared.accepted),
        errors: std::mem::take(&mut shared.errors),
        started,
        submit_phase,
        tracker,
        finals,
    })
}

async fn one_job(
    target: &Target,
    tracker: &Tracker,
    shared: &Mutex<Shared>,
    plan: JobPlan,
    planned: Instant,
    fetch_outputs: bool,
) -> Option<String> {
    let tenant = &target.tenants[plan.tenant];
    let url = format!("{}/v1/jobs", target.api);
    let request = match &plan.input {
        None => tenant.http.post(&url).json(&plan.body),
        Some(data) => {
            let form = reqwest::multipart::Form::new()
                .part(
                    "job",
                    reqwest::multipart::Part::text(plan.body.to_string())
                        .mime_str("application/json")
                        .unwrap_or_else(|_| reqwest::multipart::Part::text(plan.body.to_string())),
                )
                .part(
                    INPUT_NAME,
                    reqwest::multipart::Part::stream(reqwest::Body::from(data.clone()))
                        .file_name(INPUT_NAME),
                );
            tenant.http.post(&url).multipart(form)
        }
    };
    let answer = match request.send().await {
        Ok(response) => {
            let status = response.status();
            match response.bytes().await {
                Ok(body) if status == reqwest::StatusCode::ACCEPTED => {
                    serde_json::from_slice::<Value>(&body)
                        .map_err(|_| "202 without JSON".to_owned())
                }
                Ok(_) => Err(format!("HTTP {}", status.as_u16())),
                Err(error) => Err(format!("reading the answer: {error}")),
            }
        }
        Err(error) => Err(format!("transport: {}", error_kind(&error))),
    };
    let answered = Instant::now();
    let job = match answer {
        Ok(job) => job,
        Err(error) => {
            let mut shared = lock(shared);
            *shared.errors.entry(error).or_default() += 1;
            shared.last_answer = Some(answered);
            return None;
        }
    };
    let Some(id) = job["id"].as_str().map(str::to_owned) else {
        *lock(shared)
            .errors
            .entry("202 without id".to_owned())
            .or_default() += 1;
        return None;
    };
    {
        let mut jobs = lock(&tracker.jobs);
        let track = jobs.entry(id.clone()).or_default();
        track.tenant = plan.tenant;
        track.priority = plan.priority.clone();
        track.planned = Some(planned);
        track.created_at = parse_time(&job["created_at"]);
    }
    {
        let mut shared = lock(shared);
        shared.submit.record(answered.duration_since(planned));
        shared.accepted.push(id.clone());
        shared.last_answer = Some(answered);
    }
    if !fetch_outputs {
        return Some(id);
    }
    if let Some(done) = tracker.done(&id)
        && tokio::time::timeout(Duration::from_secs(120), done)
            .await
            .is_err()
    {
        *lock(shared)
            .errors
            .entry("no completion within 120 s".to_owned())
            .or_default() += 1;
        return Some(id);
    }
    match fetch(target, plan.tenant, &id).await {
        Ok((bytes, took)) => {
            let mut shared = lock(shared);
            shared.outputs_in_hand.record(planned.elapsed());
            shared.output_bytes += bytes;
            shared.download += took;
        }
        Err(error) => *lock(shared).errors.entry(error).or_default() += 1,
    }
    Some(id)
}

/// Reads the job and streams each output (counting bytes, keeping none).
async fn fetch(target: &Target, tenant: usize, id: &str) -> Result<(u64, Duration), String> {
    let http = &target.tenants[tenant].http;
    let job: Value = http
        .get(format!("{}/v1/jobs/{id}", target.api))
        .send()
        .await
        .map_err(|e| format!("GET job: {}", error_kind(&e)))?
        .json()
        .await
        .map_err(|_| "GET job: not JSON".to_owned())?;
    let mut total = 0;
    let mut took = Duration::ZERO;
    for output in job["outputs"].as_array().into_iter().flatten() {
        let Some(url) = output["url"].as_str() else {
            continue;
        };
        let url = if url.starts_with("http") {
            url.to_owned()
        } else {
            format!("{}{url}", target.api)
        };
        let started = Instant::now();
        let response = http
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("GET output: {}", error_kind(&e)))?;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            total += chunk
                .map_err(|e| format!("GET output: {}", error_kind(&e)))?
                .len() as u64;
        }
        took += started.elapsed();
    }
    Ok((total, took))
}

fn error_kind(error: &reqwest::Error) -> String {
    use std::error::Error as _;
    if let Some(source) = error.source() {
        // The cause (connection reset, body error…) is what tells them apart.
        let mut text = source.to_string();
        text.truncate(80);
        return text;
    }
    if error.is_timeout() {
        "timeout".to_owned()
    } else if error.is_connect() {
        "connect".to_owned()
    } else if let Some(status) = error.status() {
        format!("HTTP {}", status.as_u16())
    } else {
        "request".to_owned()
    }
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

/// Reads every accepted job by id, re-reading the unfinished ones until `deadline`.
async fn read_finals(
    target: &Target,
    tracker: &Tracker,
    accepted: &[String],
    deadline: Instant,
) -> Vec<Final> {
    let meta: HashMap<String, (usize, String)> = {
        let jobs = lock(&tracker.jobs);
        accepted
            .iter()
            .map(|id| {
                let t = jobs.get(id);
                (
                    id.clone(),
                    (
                        t.map_or(0, |t| t.tenant),
                        t.map(|t| t.priority.clone()).unwrap_or_default(),
                    ),
                )
            })
            .collect()
    };
    futures::stream::iter(accepted.iter().cloned())
        .map(|id| {
            let (tenant, priority) = meta.get(&id).cloned().unwrap_or_default();
            async move {
                let http = &target.tenants[tenant].http;
                let url = format!("{}/v1/jobs/{id}", target.api);
                loop {
                    let job: Option<Value> = match http.get(&url).send().await {
                        Ok(response) if response.status().is_success() => {
                            response.json().await.ok()
                        }
                        _ => None,
                    };
                    let status = job
                        .as_ref()
                        .and_then(|j| j["status"].as_str())
                        .map(str::to_owned);
                    let done = status.as_deref().is_some_and(is_terminal);
                    if done || Instant::now() >= deadline {
                        let job = job.unwrap_or(Value::Null);
                        return Final {
                            id,
                            priority,
                            status,
                            created_at: parse_time(&job["created_at"]),
                            started_at: parse_time(&job["started_at"]),
                        };
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await
}
