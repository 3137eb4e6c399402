//! Steady load for fault tests, and the checks every fault test ends with.
//!
//! [`FaultLoad`] submits short jobs at a fixed rate through the REST API,
//! mixed priorities and two tenants, each with a webhook to the stack's sink.
//! A submission that fails (the API unreachable, a 5xx while NATS elects a
//! leader) is retried with the same `Idempotency-Key`, as a careful client
//! would (against the next ingress, when the stack has several), so a fault
//! shows as a stall, never as a job the client gave up on.
//! [`FaultLoad::finish`] stops it; [`examine`] then checks what the fault
//! suite promises: every accepted job terminal and completed, none lost, no
//! attempt executed twice, one `webhook-id` per event, events replayable;
//! [`verify`] panics with the evidence when one is broken. [`recovery`]
//! measures how quickly jobs flowed again after each fault.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::TestStack;
use crate::stack::{API_KEY, OTHER_API_KEY, OTHER_TENANT, TENANT, invert_workflow};

/// How long one submission keeps retrying before the load counts it as
/// refused (a fault that outlasts this is a failed test, see [`verify`]).
const SUBMIT_GIVE_UP: Duration = Duration::from_secs(90);

const PRIORITIES: [&str; 3] = ["high", "normal", "low"];

/// Refused submissions whose last answer is kept as evidence.
pub const REFUSALS_KEPT: usize = 20;

/// One job the API accepted.
#[derive(Clone, Debug)]
pub struct AcceptedJob {
    pub id: String,
    pub tenant: &'static str,
    pub api_key: &'static str,
    /// The submission's first try.
    pub submitted_at: Instant,
}

/// What the load saw.
#[derive(Debug, Default)]
pub struct LoadOutcome {
    pub accepted: Vec<AcceptedJob>,
    /// Submissions given up after [`SUBMIT_GIVE_UP`].
    pub refused: usize,
    /// What the last try of each refused submission got (the first
    /// [`REFUSALS_KEPT`]): a status and body, or a transport error.
    pub refusals: Vec<String>,
    /// Submissions that needed more than one try.
    pub retried: usize,
    /// The longest time from a submission's first try to its 202.
    pub longest_submit_stall: Duration,
    /// When the stall happened, since the load started.
    pub longest_stall_at: Duration,
}

/// A running load; see the module docs.
#[derive(Debug)]
pub struct FaultLoad {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<LoadOutcome>,
    started: Instant,
}

impl FaultLoad {
    /// Submits `rate_per_s` jobs per second to `stack`'s API until
    /// [`FaultLoad::finish`].
    pub fn start(stack: &TestStack, rate_per_s: u32) -> FaultLoad {
        let stop = CancellationToken::new();
        let started = Instant::now();
        let apis = stack.apis.clone();
        let hook = stack.webhooks.url("/fault-load");
        let clients = [
            (TENANT, API_KEY, TestStack::client_for(API_KEY)),
            (
                OTHER_TENANT,
                OTHER_API_KEY,
                TestStack::client_for(OTHER_API_KEY),
            ),
        ];
        let outcome = Arc::new(Mutex::new(LoadOutcome::default()));
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut ticker =
                tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate_per_s.max(1))));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut submissions = JoinSet::new();
            let mut n: usize = 0;
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                let (tenant, api_key, client) = clients[n % 2].clone();
                let body = json!({
                    "workflow": invert_workflow(8),
                    "priority": PRIORITIES[n % PRIORITIES.len()],
                    "webhook": {"url": hook},
                });
                let key = format!("fault-load-{}", uuid::Uuid::new_v4());
                let apis = apis.clone();
                let outcome = outcome.clone();
                submissions.spawn(async move {
                    let first_try = Instant::now();
                    let mut tries = 0;
                    let mut last_failure = String::new();
                    let id = loop {
                        // Round-robin, and each retry to the next ingress.
                        let api = &apis[(n + tries) % apis.len()];
                        tries += 1;
                        let response = client
                            .post(format!("{api}/v1/jobs"))
                            .header("idempotency-key", &key)
                            .timeout(Duration::from_secs(10))
                            .json(&body)
                            .send()
                            .await;
                        match response {
                            Ok(response) if response.status().as_u16() == 202 => {
                                if let Ok(job) = response.json::<Value>().await
                                    && let Some(id) = job["id"].as_str()
                                {
                                    break Some(id.to_owned());
                                }
                                last_failure = format!("{api}: 202 without a job id");
                            }
                            Ok(response) => {
                                let status = response.status();
                                let body = response.text().await.unwrap_or_default();
                                last_failure = format!(
                                    "{api}: {status} {}",
                                    body.chars().take(300).collect::<String>()
                                );
                            }
                            Err(error) => last_failure = format!("{api}: {}", with_causes(&error)),
                        }
                        if first_try.elapsed() > SUBMIT_GIVE_UP {
                            break None;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    };
                    let stall = first_try.elapsed();
                    let mut outcome = outcome.lock().unwrap_or_else(|p| p.into_inner());
                    match id {
                        Some(id) => outcome.accepted.push(AcceptedJob {
                            id,
                            tenant,
                            api_key,
                            submitted_at: first_try,
                        }),
                        None => {
                            outcome.refused += 1;
                            if outcome.refusals.len() < REFUSALS_KEPT {
                                outcome.refusals.push(last_failure);
                            }
                        }
                    }
                    if tries > 1 {
                        outcome.retried += 1;
                    }
                    if stall > outcome.longest_submit_stall {
                        outcome.longest_submit_stall = stall;
                        outcome.longest_stall_at = first_try.duration_since(started);
                    }
                });
                n += 1;
            }
            while submissions.join_next().await.is_some() {}
            std::mem::take(&mut *outcome.lock().unwrap_or_else(|p| p.into_inner()))
        });
        FaultLoad {
            stop,
            task,
            started,
        }
    }

    /// Time since the load started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops submitting and waits for the submissions in flight.
    pub async fn finish(self) -> LoadOutcome {
        self.stop.cancel();
        self.task
            .await
            .unwrap_or_else(|e| panic!("the load task failed: {e}"))
    }
}

/// An error and its causes, `: `-separated (reqwest's own message hides
/// whether a connection was refused or timed out).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// What [`examine`] found.
#[derive(Debug, Default)]
pub struct Verdict {
    pub accepted: usize,
    pub completed: usize,
    /// Submissions the load gave up on.
    pub refused: usize,
    /// Accepted jobs not completed (failed, cancelled or never finished),
    /// each with its record.
    pub lost: Vec<String>,
    /// Accepted jobs not terminal by the deadline, with their events (also
    /// counted in `lost`).
    pub stuck: Vec<String>,
    /// What the queues held when jobs were stuck.
    pub queues: Vec<String>,
    /// Jobs ComfyUI executed more often than they have attempts.
    pub duplicated: Vec<String>,
    /// Completed jobs whose `job.completed` webhook never arrived.
    pub webhooks_missing: Vec<String>,
    /// Events sent under more than one `webhook-id`.
    pub webhook_ids_split: Vec<String>,
    /// Jobs whose state history does not replay from `accepted` to `completed`.
    pub not_replayable: Vec<String>,
    /// Jobs that needed more than one attempt (a fault may cost one).
    pub retried: usize,
    /// Time from the end of the load until every job was terminal.
    pub drained_in: Duration,
}

impl Verdict {
    /// Whether every promise held.
    pub fn is_clean(&self) -> bool {
        self.refused == 0
            && self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.webhooks_missing.is_empty()
            && self.webhook_ids_split.is_empty()
            && self.not_replayable.is_empty()
    }
}

/// [`examine`], panicking with the evidence unless every promise held.
pub async fn verify(stack: &TestStack, outcome: &LoadOutcome, timeout: Duration) -> Verdict {
    let verdict = examine(stack, outcome, timeout).await;
    assert_eq!(verdict.refused, 0, "submissions given up: {outcome:?}");
    assert!(
        verdict.stuck.is_empty(),
        "{} of {} accepted jobs not terminal after {timeout:?}: {:#?}\nqueues: {:#?}",
        verdict.stuck.len(),
        verdict.accepted,
        verdict.stuck,
        verdict.queues
    );
    assert!(
        verdict.lost.is_empty(),
        "accepted jobs not completed: {:#?}",
        verdict.lost
    );
    assert!(
        verdict.duplicated.is_empty(),
        "attempts executed twice: {:#?}",
        verdict.duplicated
    );
    assert!(
        verdict.webhooks_missing.is_empty(),
        "job.completed webhooks missing: {:#?}",
        verdict.webhooks_missing
    );
    assert!(
        verdict.webhook_ids_split.is_empty(),
        "events sent under several webhook-ids: {:#?}",
        verdict.webhook_ids_split
    );
    assert!(
        verdict.not_replayable.is_empty(),
        "state histories that do not replay: {:#?}",
        verdict.not_replayable
    );
    verdict
}

/// Waits (up to `timeout`) until every accepted job is terminal, then checks
/// the promises of the fault suite (see the module docs) and returns what
/// broke, with the evidence.
pub async fn examine(stack: &TestStack, outcome: &LoadOutcome, timeout: Duration) -> Verdict {
    let drain_started = Instant::now();
    let deadline = drain_started + timeout;
    let mut records: BTreeMap<String, Value> = BTreeMap::new();
    let mut waiting: Vec<&AcceptedJob> = outcome.accepted.iter().collect();
    // Polls every unfinished job until all are terminal or the deadline
    // passes, so a failure lists every stuck job with its last record.
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for job in waiting {
            let client = TestStack::client_for(job.api_key);
            let url = format!("{}/v1/jobs/{}", stack.api, job.id);
            let record = match client.get(&url).send().await {
                Ok(response) => response.json::<Value>().await.ok(),
                Err(_) => None,
            };
            let terminal = record.as_ref().is_some_and(|record| {
                matches!(
                    record["status"].as_str(),
                    Some("completed" | "failed" | "cancelled")
                )
            });
            if let Some(record) = record {
                records.insert(job.id.clone(), record);
            }
            if !terminal {
                still.push(job);
            }
        }
        waiting = still;
        if waiting.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(crate::eventually::POLL_INTERVAL * 10).await;
    }
    let mut verdict = Verdict {
        accepted: outcome.accepted.len(),
        refused: outcome.refused,
        drained_in: drain_started.elapsed(),
        ..Verdict::default()
    };
    for job in &waiting {
        let events = stack.state_events_of(job.tenant, &job.id).await;
        let types: Vec<String> = events
            .iter()
            .filter_map(|e| e["type"].as_str().map(str::to_owned))
            .collect();
        verdict.stuck.push(format!(
            "{}: record {} events {types:?}",
            job.id,
            records.get(&job.id).cloned().unwrap_or(Value::Null)
        ));
    }
    if !waiting.is_empty() {
        verdict.queues = queue_state(stack).await;
    }

    let mut executions: BTreeMap<String, u64> = BTreeMap::new();
    for sim in std::iter::once(&stack.sim).chain(&stack.more_sims) {
        for prompt in sim.prompts_received() {
            if let Some(job) = prompt.extra_data["comfyq_job_id"].as_str() {
                *executions.entry(job.to_owned()).or_default() += 1;
            }
        }
    }
    for job in &outcome.accepted {
        let Some(record) = records.get(&job.id) else {
            verdict.lost.push(format!("{}: never readable", job.id));
            continue;
        };
        if record["status"] == "completed" {
            verdict.completed += 1;
        } else {
            verdict.lost.push(format!("{}: {record}", job.id));
        }
        let attempts = record["attempt"].as_u64().unwrap_or(1);
        if attempts > 1 {
            verdict.retried += 1;
        }
        let ran = executions.get(&job.id).copied().unwrap_or(0);
        if ran > attempts {
            verdict.duplicated.push(format!(
                "{}: {ran} executions in {attempts} attempts",
                job.id
            ));
        }
    }
    if verdict.stuck.is_empty() {
        let completed: Vec<&AcceptedJob> = outcome
            .accepted
            .iter()
            .filter(|job| {
                records
                    .get(&job.id)
                    .is_some_and(|r| r["status"] == "completed")
            })
            .collect();
        let (missing, split) = check_webhooks(stack, &completed, timeout).await;
        verdict.webhooks_missing = missing;
        verdict.webhook_ids_split = split;
        verdict.not_replayable = check_replayable(stack, &completed).await;
    }
    verdict
}

/// The `job.completed` webhooks of the fault load: job id → when it arrived
/// (the first time).
fn completed_webhooks(stack: &TestStack) -> BTreeMap<String, Instant> {
    let mut seen: BTreeMap<String, Instant> = BTreeMap::new();
    for request in stack.webhooks.requests_to("/fault-load") {
        let body = request.json();
        if body["type"] != "job.completed" {
            continue;
        }
        if let Some(id) = body["data"]["job"]["id"].as_str() {
            seen.entry(id.to_owned())
                .and_modify(|at| *at = (*at).min(request.received_at))
                .or_insert(request.received_at);
        }
    }
    seen
}

/// Every completed job's `job.completed` webhook arrived (waiting up to
/// `timeout`), and every event was sent under exactly one `webhook-id`
/// (retries and re-publications reuse it). Returns (missing, split).
async fn check_webhooks(
    stack: &TestStack,
    completed: &[&AcceptedJob],
    timeout: Duration,
) -> (Vec<String>, Vec<String>) {
    let deadline = Instant::now() + timeout;
    let missing = loop {
        let seen = completed_webhooks(stack);
        let missing: Vec<String> = completed
            .iter()
            .filter(|job| !seen.contains_key(&job.id))
            .map(|job| job.id.clone())
            .collect();
        if missing.is_empty() || Instant::now() >= deadline {
            break missing;
        }
        tokio::time::sleep(crate::eventually::POLL_INTERVAL * 10).await;
    };
    // An event is a job's state at one attempt (EVENTS.md: state event ids
    // derive from job, attempt and status).
    let mut ids_per_event: BTreeMap<(String, String, u64), BTreeSet<String>> = BTreeMap::new();
    for request in stack.webhooks.requests_to("/fault-load") {
        let body = request.json();
        let job = &body["data"]["job"];
        let (Some(id), Some(kind)) = (job["id"].as_str(), body["type"].as_str()) else {
            continue;
        };
        let attempt = job["attempt"].as_u64().unwrap_or(0);
        let webhook_id = request.header("webhook-id").unwrap_or("").to_owned();
        ids_per_event
            .entry((id.to_owned(), kind.to_owned(), attempt))
            .or_default()
            .insert(webhook_id);
    }
    let split = ids_per_event
        .iter()
        .filter(|(_, ids)| ids.len() != 1)
        .map(|((job, kind, attempt), ids)| format!("{job} {kind} attempt {attempt}: {ids:?}"))
        .collect();
    (missing, split)
}

/// Every job's state history replays from the events stream, from
/// `accepted` to `completed`, in order. Returns the jobs whose does not.
async fn check_replayable(stack: &TestStack, jobs: &[&AcceptedJob]) -> Vec<String> {
    let mut by_tenant: BTreeMap<&str, BTreeMap<String, Vec<Value>>> = BTreeMap::new();
    let mut broken = Vec::new();
    for job in jobs {
        if !by_tenant.contains_key(job.tenant) {
            let events = stack.state_events_by_job(job.tenant).await;
            by_tenant.insert(job.tenant, events);
        }
        let events = by_tenant[job.tenant]
            .get(&job.id)
            .cloned()
            .unwrap_or_default();
        let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
        if types.first().copied() != Some("job.accepted")
            || types.last().copied() != Some("job.completed")
        {
            broken.push(format!("{}: {types:?}", job.id));
        }
    }
    broken
}

/// How quickly jobs flowed again after faults, from the `job.completed`
/// webhooks' arrival times (the whole path: ingress to notifier).
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Per fault (in the order given): from the fault until the first job
    /// submitted after it had completed. `None`: no such job completed.
    pub after_fault: Vec<Option<Duration>>,
    /// The longest time without any `job.completed` webhook while the load
    /// ran (from its start to its last accepted job).
    pub longest_completion_gap: Duration,
    /// The longest time from a job's first submission try to its
    /// `job.completed` webhook.
    pub longest_job_latency: Duration,
}

/// [`Recovery`] of the load `outcome` after faults at `faults`.
pub fn recovery(stack: &TestStack, outcome: &LoadOutcome, faults: &[Instant]) -> Recovery {
    let completed = completed_webhooks(stack);
    let mut jobs: Vec<(Instant, Option<Instant>)> = outcome
        .accepted
        .iter()
        .map(|job| (job.submitted_at, completed.get(&job.id).copied()))
        .collect();
    jobs.sort_by_key(|(submitted, _)| *submitted);
    let after_fault = faults
        .iter()
        .map(|fault| {
            jobs.iter()
                .filter(|(submitted, _)| submitted >= fault)
                .filter_map(|(_, done)| *done)
                .min()
                .map(|done| done.duration_since(*fault))
        })
        .collect();
    let longest_job_latency = jobs
        .iter()
        .filter_map(|(submitted, done)| done.map(|done| done.duration_since(*submitted)))
        .max()
        .unwrap_or_default();
    let mut longest_completion_gap = Duration::ZERO;
    if let (Some(first), Some(last)) = (jobs.first(), jobs.last()) {
        let mut times: Vec<Instant> = completed
            .values()
            .copied()
            .filter(|at| *at >= first.0 && *at <= last.0)
            .collect();
        times.push(first.0);
        times.push(last.0);
        times.sort();
        longest_completion_gap = times
            .windows(2)
            .map(|pair| pair[1].duration_since(pair[0]))
            .max()
            .unwrap_or_default();
    }
    Recovery {
        after_fault,
        longest_completion_gap,
        longest_job_latency,
    }
}

/// What the pending and dispatch streams and their consumers hold: the
/// evidence for a job that never finished.
async fn queue_state(stack: &TestStack) -> Vec<String> {
    let names = stack.nats_config().names().expect("valid prefix");
    let js = async_nats::jetstream::new(stack.nats.client().await);
    let mut lines = Vec::new();
    for name in [names.pending_stream(), names.dispatch_stream()] {
        let Ok(mut stream) = js.get_stream(&name).await else {
            lines.push(format!("{name}: not readable"));
            continue;
        };
        match stream.info().await {
            Ok(info) => lines.push(format!(
                "{name}: {} messages, first {} last {}",
                info.state.messages, info.state.first_sequence, info.state.last_sequence
            )),
            Err(error) => lines.push(format!("{name}: {error}")),
        }
        let mut consumers = stream.consumers();
        use futures::StreamExt;
        while let Some(Ok(info)) = consumers.next().await {
            lines.push(format!(
                "  consumer {}: pending {} ack pending {} redelivered {} waiting {} delivered {:?} ack floor {:?}",
                info.name,
                info.num_pending,
                info.num_ack_pending,
                info.num_redelivered,
                info.num_waiting,
                info.delivered,
                info.ack_floor
            ));
        }
    }
    lines
}
