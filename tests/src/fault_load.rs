//! Steady load for fault tests, and the checks every fault test ends with.
//!
//! [`FaultLoad`] submits short jobs at a fixed rate through the REST API,
//! mixed priorities and two tenants, each with a webhook to the stack's sink.
//! A submission that fails (the API unreachable, a 5xx while NATS elects a
//! leader) is retried with the same `Idempotency-Key`, as a careful client
//! would, so a fault shows as a stall, never as a job the client gave up on.
//! [`FaultLoad::finish`] stops it; [`verify`] then checks what the fault
//! suite promises: every accepted job terminal and completed, none lost, no
//! attempt executed twice, one `webhook-id` per event, events replayable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::stack::{API_KEY, OTHER_API_KEY, OTHER_TENANT, TENANT, invert_workflow};
use crate::{TestStack, eventually};

/// How long one submission keeps retrying before the load counts it as
/// refused (a fault that outlasts this is a failed test, see [`verify`]).
const SUBMIT_GIVE_UP: Duration = Duration::from_secs(90);

const PRIORITIES: [&str; 3] = ["high", "normal", "low"];

/// One job the API accepted.
#[derive(Clone, Debug)]
pub struct AcceptedJob {
    pub id: String,
    pub tenant: &'static str,
    pub api_key: &'static str,
}

/// What the load saw.
#[derive(Debug, Default)]
pub struct LoadOutcome {
    pub accepted: Vec<AcceptedJob>,
    /// Submissions given up after [`SUBMIT_GIVE_UP`].
    pub refused: usize,
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
        let api = stack.api.clone();
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
                let url = format!("{api}/v1/jobs");
                let outcome = outcome.clone();
                submissions.spawn(async move {
                    let first_try = Instant::now();
                    let mut tries = 0;
                    let id = loop {
                        tries += 1;
                        let response = client
                            .post(&url)
                            .header("idempotency-key", &key)
                            .timeout(Duration::from_secs(10))
                            .json(&body)
                            .send()
                            .await;
                        if let Ok(response) = response
                            && response.status().as_u16() == 202
                            && let Ok(job) = response.json::<Value>().await
                            && let Some(id) = job["id"].as_str()
                        {
                            break Some(id.to_owned());
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
                        }),
                        None => outcome.refused += 1,
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

/// What [`verify`] found.
#[derive(Debug)]
pub struct Verdict {
    pub accepted: usize,
    pub completed: usize,
    /// Accepted jobs not completed (failed, cancelled or never finished).
    pub lost: Vec<String>,
    /// Jobs ComfyUI executed more often than they have attempts.
    pub duplicated: Vec<String>,
    /// Jobs that needed more than one attempt (a fault may cost one).
    pub retried: usize,
    /// Time from the end of the load until every job was terminal.
    pub drained_in: Duration,
}

/// Waits until every accepted job is terminal and checks the promises of the
/// fault suite (see the module docs). Returns the figures; panics with the
/// evidence when a promise is broken.
pub async fn verify(stack: &TestStack, outcome: &LoadOutcome, timeout: Duration) -> Verdict {
    assert_eq!(outcome.refused, 0, "submissions given up: {outcome:?}");
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
    if !waiting.is_empty() {
        let mut stuck = Vec::new();
        for job in &waiting {
            let events = stack.state_events_of(job.tenant, &job.id).await;
            let types: Vec<String> = events
                .iter()
                .filter_map(|e| e["type"].as_str().map(str::to_owned))
                .collect();
            stuck.push(format!(
                "{}: record {} events {types:?}",
                job.id,
                records.get(&job.id).cloned().unwrap_or(Value::Null)
            ));
        }
        let streams = queue_state(stack).await;
        panic!(
            "{} of {} accepted jobs not terminal after {timeout:?}: {stuck:#?}\nqueues: {streams:#?}",
            waiting.len(),
            outcome.accepted.len()
        );
    }
    let drained_in = drain_started.elapsed();

    let mut executions: BTreeMap<String, u64> = BTreeMap::new();
    for sim in std::iter::once(&stack.sim).chain(&stack.more_sims) {
        for prompt in sim.prompts_received() {
            if let Some(job) = prompt.extra_data["comfyq_job_id"].as_str() {
                *executions.entry(job.to_owned()).or_default() += 1;
            }
        }
    }
    let mut lost = Vec::new();
    let mut duplicated = Vec::new();
    let mut retried = 0;
    for (id, record) in &records {
        if record["status"] != "completed" {
            lost.push(format!("{id}: {record}"));
        }
        let attempts = record["attempt"].as_u64().unwrap_or(1);
        if attempts > 1 {
            retried += 1;
        }
        let ran = executions.get(id).copied().unwrap_or(0);
        if ran > attempts {
            duplicated.push(format!("{id}: {ran} executions in {attempts} attempts"));
        }
    }
    assert!(lost.is_empty(), "accepted jobs not completed: {lost:#?}");
    assert!(
        duplicated.is_empty(),
        "attempts executed twice: {duplicated:#?}"
    );

    check_webhooks(stack, outcome, timeout).await;
    check_replayable(stack, outcome).await;
    Verdict {
        accepted: outcome.accepted.len(),
        completed: records.len() - lost.len(),
        lost,
        duplicated,
        retried,
        drained_in,
    }
}

/// Every job's `job.completed` webhook arrived, and every event was sent
/// under exactly one `webhook-id` (retries and re-publications reuse it).
async fn check_webhooks(stack: &TestStack, outcome: &LoadOutcome, timeout: Duration) {
    let wanted: BTreeSet<&str> = outcome.accepted.iter().map(|job| job.id.as_str()).collect();
    let completed_hooks = |requests: &[crate::ReceivedWebhook]| -> BTreeSet<String> {
        requests
            .iter()
            .filter_map(|request| {
                let body = request.json();
                (body["type"] == "job.completed")
                    .then(|| body["data"]["job"]["id"].as_str().map(str::to_owned))
                    .flatten()
            })
            .collect()
    };
    eventually(timeout, "every job.completed webhook", async || {
        let seen = completed_hooks(&stack.webhooks.requests_to("/fault-load"));
        wanted.iter().all(|id| seen.contains(*id)).then_some(())
    })
    .await;
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
    let split: Vec<_> = ids_per_event
        .iter()
        .filter(|(_, ids)| ids.len() != 1)
        .collect();
    assert!(
        split.is_empty(),
        "events sent under several webhook-ids: {split:#?}"
    );
}

/// Every job's state history replays from the events stream, from
/// `accepted` to `completed`, in order.
async fn check_replayable(stack: &TestStack, outcome: &LoadOutcome) {
    let mut by_tenant: BTreeMap<&str, BTreeMap<String, Vec<Value>>> = BTreeMap::new();
    for job in &outcome.accepted {
        if !by_tenant.contains_key(job.tenant) {
            let events = stack.state_events_by_job(job.tenant).await;
            by_tenant.insert(job.tenant, events);
        }
        let events = by_tenant[job.tenant]
            .get(&job.id)
            .cloned()
            .unwrap_or_default();
        let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(
            types.first().copied(),
            Some("job.accepted"),
            "job {}: {types:?}",
            job.id
        );
        assert_eq!(
            types.last().copied(),
            Some("job.completed"),
            "job {}: {types:?}",
            job.id
        );
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
