//! Decide-late dispatch. Submissions wait in the PENDING stream; the one
//! scheduler holding the dispatcher lease keeps a view of them (rebuilt from
//! the stream whenever it takes the lease) and moves a job to its pool's
//! DISPATCH subjects only when a runner slot is free, choosing by
//! [`policy::pick`]. Each pool's DISPATCH stays about as deep as its free
//! slots (plus `dispatch_window`), so priority, ageing and fairness are
//! decided when a slot frees, not when a job arrives.
//!
//! Capacity is read from NATS, never counted in memory: a pool's slots are
//! the sum over live registrations in `comfyq_runners`, its jobs in flight
//! the DISPATCH messages not yet acknowledged (subject counts, which carry
//! the tenant), so any scheduler can take over and see the same numbers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::{self, DeliverPolicy};
use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::response::Response;
use async_nats::jetstream::stream::Stream as JsStream;
use comfyq_shared::capability::{Needs, Offer};
use comfyq_shared::ids::{PoolName, TenantId};
use comfyq_shared::job::{ErrorKind, JobStatus, WAITING_FOR_CAPABILITY};
use comfyq_shared::job_store::Versioned;
use comfyq_shared::messages::SubmitJob;
use comfyq_shared::priority::Priority;
use futures::StreamExt;
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Unroutable;
use crate::lease::Lease;
use crate::machine::Input;
use crate::policy::{self, Pending, Policy, PoolQueue, Tenants};
use crate::service::{HandleError, Scheduler};

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Handle(#[from] HandleError),
    #[error("NATS: {0}")]
    Nats(async_nats::Error),
    #[error("{0} ended")]
    Ended(&'static str),
}

fn nats<E: Into<async_nats::Error>>(error: E) -> DispatchError {
    DispatchError::Nats(error.into())
}

/// What the dispatcher reads of a runner's registration (the runner writes more).
#[derive(Clone, Debug, Deserialize)]
struct RunnerView {
    pool: PoolName,
    slots: usize,
    #[serde(default)]
    node_types: Vec<String>,
    #[serde(default)]
    models: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default = "ready_default")]
    ready: bool,
    /// Jobs it holds (kept current by the runner on every change).
    #[serde(default)]
    busy: usize,
    /// A burst runner: pulls only while this many dispatch messages wait.
    #[serde(default)]
    burst_min_pending: Option<usize>,
}

fn ready_default() -> bool {
    true
}

#[derive(Clone, Debug)]
struct LiveRunner {
    key: String,
    view: RunnerView,
    offer: Offer,
    seen_at: OffsetDateTime,
}

impl LiveRunner {
    /// Whether this runner has every node type, model file and label the
    /// job needs (what it could not list is assumed present).
    fn can_run(&self, needs: &Needs) -> bool {
        self.offer.can_run(needs)
    }
}

enum Event {
    Pending(Box<async_nats::jetstream::Message>),
    Runner(Box<kv::Entry>),
    /// A dispatch message was acknowledged, terminated or handed back.
    Freed,
    Tick,
    Ended(&'static str),
}

/// Payload bytes of pending messages the view keeps, so that dispatching a
/// job needs no read of its message: 64 MiB holds 1,000 jobs of 50 KB
/// workflows (beyond it, a job's message is read back when it is picked).
const PAYLOAD_BUDGET: usize = 64 * 1024 * 1024;

/// Jobs of one pass whose reads and writes are in flight at once.
const DISPATCH_CONCURRENCY: usize = 32;

/// Jobs picked before their dispatches are sent (the pass picks again for
/// what is left of the capacity).
const MAX_BATCH: usize = 256;

#[derive(Default)]
struct View {
    /// Bytes of the payloads held in `pools` (at most `PAYLOAD_BUDGET`).
    payload_bytes: usize,
    pools: BTreeMap<PoolName, PoolQueue>,
    runners: HashMap<String, LiveRunner>,
    /// Jobs marked `waiting_for_capability` in their record.
    marked: HashSet<comfyq_shared::JobId>,
    /// Round-robin state per pool (memory only: a new dispatcher starts it afresh).
    served: HashMap<PoolName, HashMap<TenantId, u64>>,
}

#[derive(Clone, Debug)]
pub struct Dispatcher {
    pub scheduler: Scheduler,
    pub runners: kv::Store,
    pub lease: Lease,
}

impl Dispatcher {
    /// Competes for the lease until `shutdown`; dispatches while holding it.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let Some(revision) = self.lease.acquire(&shutdown).await else {
                break;
            };
            tracing::info!(holder = %self.lease.holder, "this scheduler dispatches now");
            metrics::gauge!("comfyq_scheduler_dispatcher_active").set(1.0);
            let lost = CancellationToken::new();
            let stop_keeping = CancellationToken::new();
            let keeper = {
                let (lease, lost, stop) = (self.lease.clone(), lost.clone(), stop_keeping.clone());
                tokio::spawn(async move { lease.keep(revision, lost, stop).await })
            };
            let result = self.lead(&lost, &shutdown).await;
            stop_keeping.cancel();
            let _ = keeper.await;
            metrics::gauge!("comfyq_scheduler_dispatcher_active").set(0.0);
            if shutdown.is_cancelled() {
                self.lease.release().await;
                break;
            }
            if let Err(error) = result {
                tracing::warn!(%error, "dispatcher stopped; rebuilding from NATS");
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.lease.release().await;
                    break;
                }
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    async fn lead(
        &self,
        lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<(), DispatchError> {
        let s = &self.scheduler;
        let pending =
            s.js.get_stream(s.names.pending_stream())
                .await
                .map_err(nats)?;
        let dispatch =
            s.js.get_stream(s.names.dispatch_stream())
                .await
                .map_err(nats)?;
        let (tx, mut rx) = mpsc::channel::<Event>(4096);
        let mut sources = JoinSet::new();

        // Every acknowledgement of a dispatch message passes on this subject
        // (core NATS sees it); all but in-progress ones may free a slot.
        let mut acks = s
            .client
            .subscribe(format!("$JS.ACK.{}.>", s.names.dispatch_stream()))
            .await
            .map_err(nats)?;
        let sender = tx.clone();
        sources.spawn(async move {
            while let Some(ack) = acks.next().await {
                if ack.payload.as_ref() != b"+WPI" && sender.send(Event::Freed).await.is_err() {
                    return;
                }
            }
            let _ = sender.send(Event::Ended("ack subscription")).await;
        });

        // Last value of every key first, then updates.
        let mut registrations = self.runners.watch_with_history(">").await.map_err(nats)?;
        let sender = tx.clone();
        sources.spawn(async move {
            while let Some(Ok(entry)) = registrations.next().await {
                if sender.send(Event::Runner(Box::new(entry))).await.is_err() {
                    return;
                }
            }
            let _ = sender.send(Event::Ended("registration watch")).await;
        });

        // The whole pending stream, oldest first: the view is rebuilt from it.
        let reader = pending
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(nats)?;
        let mut caught_up = reader.cached_info().num_pending == 0;
        let mut messages = reader.messages().await.map_err(nats)?;
        let sender = tx.clone();
        sources.spawn(async move {
            while let Some(message) = messages.next().await {
                let event = match message {
                    Ok(message) => Event::Pending(Box::new(message)),
                    Err(error) => {
                        tracing::warn!(%error, "pending stream reader failed");
                        Event::Ended("pending stream reader")
                    }
                };
                if sender.send(event).await.is_err() {
                    return;
                }
            }
            let _ = sender.send(Event::Ended("pending stream reader")).await;
        });

        let tick = s.config.tick;
        let sender = tx.clone();
        sources.spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                if sender.send(Event::Tick).await.is_err() {
                    return;
                }
            }
        });
        drop(tx);

        let mut view = View::default();
        loop {
            let first = tokio::select! {
                _ = lost.cancelled() => return Ok(()),
                _ = shutdown.cancelled() => return Ok(()),
                event = rx.recv() => event.ok_or(DispatchError::Ended("event sources"))?,
            };
            let mut sweep = false;
            let mut runners_changed = false;
            // Take everything already waiting, then act once.
            let mut next = Some(first);
            while let Some(event) = next.take() {
                match event {
                    Event::Pending(message) => {
                        if message.info().map(|i| i.pending == 0).unwrap_or(false) {
                            caught_up = true;
                        }
                        view.add_pending(&s.names, &message);
                    }
                    Event::Runner(entry) => {
                        view.update_runner(*entry);
                        runners_changed = true;
                    }
                    Event::Freed => {}
                    Event::Tick => sweep = true,
                    Event::Ended(what) => return Err(DispatchError::Ended(what)),
                }
                next = rx.try_recv().ok();
            }
            if !caught_up {
                continue;
            }
            self.pass(&mut view, &pending, &dispatch, sweep || runners_changed)
                .await?;
        }
    }

    /// Dispatches what the pools have room for; with `sweep`, also fails jobs
    /// queued too long and (un)marks jobs no runner can run.
    async fn pass(
        &self,
        view: &mut View,
        pending: &JsStream,
        dispatch: &JsStream,
        sweep: bool,
    ) -> Result<(), DispatchError> {
        let s = &self.scheduler;
        let now = OffsetDateTime::now_utc();
        let policy = self.policy();
        let ttl =
            time::Duration::try_from(s.config.nats.runner_ttl).unwrap_or(time::Duration::ZERO);
        view.runners.retain(|_, r| now - r.seen_at < ttl);
        let pools: Vec<PoolName> = view.pools.keys().cloned().collect();
        for pool in pools {
            let runners: Vec<LiveRunner> = view
                .runners
                .values()
                .filter(|r| r.view.pool == pool && r.view.ready)
                .cloned()
                .collect();
            let capable =
                |e: &Pending| runners.is_empty() || runners.iter().any(|r| r.can_run(&e.needs));
            if sweep {
                self.sweep(view, &pool, &capable, pending, now).await?;
            }
            let running =
                in_flight(dispatch, &s.names.dispatch_pool_filter(&pool), &s.names).await?;
            for (tenant, count) in &running {
                metrics::gauge!("comfyq_scheduler_running_jobs", "pool" => pool.to_string(), "tenant" => tenant.to_string())
                    .set(*count as f64);
            }
            let Some(queue) = view.pools.get_mut(&pool) else {
                continue;
            };
            // Burst runners' slots count only while the pool's backlog could
            // keep DISPATCH at their `min_pending` (NATS overflow group):
            // then DISPATCH also holds that many unpulled jobs for them to see.
            let slots: usize = runners
                .iter()
                .filter(|r| r.view.burst_min_pending.is_none())
                .map(|r| r.view.slots)
                .sum();
            let burst_slots: usize = runners
                .iter()
                .filter(|r| r.view.burst_min_pending.is_some())
                .map(|r| r.view.slots)
                .sum();
            let threshold = runners
                .iter()
                .filter_map(|r| r.view.burst_min_pending)
                .max()
                .unwrap_or(0);
            let burst = if burst_slots > 0 && queue.len() >= threshold {
                burst_slots + threshold
            } else {
                0
            };
            let mut capacity = (slots + burst + s.config.dispatch_window)
                .saturating_sub(running.values().sum::<usize>());
            let last_served = view.served.remove(&pool).unwrap_or_default();
            let mut tenants = Tenants::new(running, last_served);
            // A job only some runners can run goes out only while one of
            // those has a free slot: the pool's runners share one consumer,
            // and any of them may pull it (one that cannot hands it back).
            let mut taken: HashMap<&str, usize> = HashMap::new();
            let free_capable = |e: &Pending, taken: &HashMap<&str, usize>| {
                runners.iter().all(|r| r.can_run(&e.needs))
                    || runners.iter().any(|r| {
                        r.can_run(&e.needs)
                            && r.view.busy + taken.get(r.key.as_str()).copied().unwrap_or(0)
                                < r.view.slots
                    })
            };
            // Pick a batch as if every pick goes out, then send it: the
            // dispatches of one batch are published in pick order, their
            // records and events written concurrently. A pick whose record
            // had moved on (cancelled, dispatched by an earlier leader)
            // gives its slot back to the next batch.
            while capacity > 0 {
                let mut batch: Vec<(Pending, Option<&str>)> = Vec::new();
                while batch.len() < capacity.min(MAX_BATCH) {
                    let Some(next) = policy::pick(queue, now, &policy, &tenants, |e| {
                        capable(e) && free_capable(e, &taken)
                    })
                    .cloned() else {
                        break;
                    };
                    if let Some(removed) = queue.remove(next.priority, &next.tenant, next.seq) {
                        view.payload_bytes -= removed.payload.as_ref().map_or(0, |p| p.len());
                    }
                    tenants.served(&next.tenant);
                    let mut runner = None;
                    if !runners.iter().all(|r| r.can_run(&next.needs))
                        && let Some(r) = runners.iter().find(|r| {
                            r.can_run(&next.needs)
                                && r.view.busy + taken.get(r.key.as_str()).copied().unwrap_or(0)
                                    < r.view.slots
                        })
                    {
                        *taken.entry(r.key.as_str()).or_insert(0) += 1;
                        runner = Some(r.key.as_str());
                    }
                    batch.push((next, runner));
                }
                if batch.is_empty() {
                    break;
                }
                capacity -= batch.len();
                let entries: Vec<Pending> = batch.iter().map(|(e, _)| e.clone()).collect();
                let sent = dispatch_batch(s, pending, &entries, now).await?;
                for ((entry, runner), went) in batch.into_iter().zip(sent) {
                    view.marked.remove(&entry.job);
                    if went {
                        continue;
                    }
                    capacity += 1;
                    if let Some(n) = tenants.running.get_mut(&entry.tenant) {
                        *n = n.saturating_sub(1);
                    }
                    if let Some(n) = runner.and_then(|key| taken.get_mut(key)) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
            view.served.insert(pool.clone(), tenants.last_served);
            report_depth(&pool, queue, now);
        }
        view.pools.retain(|_, q| !q.is_empty());
        Ok(())
    }

    async fn sweep(
        &self,
        view: &mut View,
        pool: &PoolName,
        capable: &impl Fn(&Pending) -> bool,
        pending: &JsStream,
        now: OffsetDateTime,
    ) -> Result<(), DispatchError> {
        let s = &self.scheduler;
        let Some(queue) = view.pools.get(pool) else {
            return Ok(());
        };
        let max_wait =
            time::Duration::try_from(s.config.max_queue_time).unwrap_or(time::Duration::MAX);
        let entries: Vec<Pending> = queue.iter().cloned().collect();
        for entry in entries {
            let fail = if now - entry.enqueued_at > max_wait {
                Some((
                    ErrorKind::Timeout,
                    format!("queued longer than {:?}", s.config.max_queue_time),
                ))
            } else if !capable(&entry) && s.config.unroutable == Unroutable::Reject {
                let lacking = self
                    .first_missing(view, pool, &entry.needs)
                    .map(|m| format!(" (the first lacks {m})"))
                    .unwrap_or_default();
                Some((
                    ErrorKind::Rejected,
                    format!(
                        "no live runner of pool {pool} has every node type, model and label the job needs{lacking}"
                    ),
                ))
            } else {
                None
            };
            if let Some((kind, message)) = fail {
                s.transition(
                    &entry.tenant,
                    &entry.job,
                    Input::FailQueued { kind, message },
                )
                .await?;
                if let Some(queue) = view.pools.get_mut(pool)
                    && let Some(removed) = queue.remove(entry.priority, &entry.tenant, entry.seq)
                {
                    view.payload_bytes -= removed.payload.as_ref().map_or(0, |p| p.len());
                }
                view.marked.remove(&entry.job);
                delete_pending(&s.js, pending, entry.seq).await?;
                continue;
            }
            let waiting = !capable(&entry);
            if waiting != view.marked.contains(&entry.job) {
                let reason = waiting.then_some(WAITING_FOR_CAPABILITY);
                s.transition(&entry.tenant, &entry.job, Input::Wait { reason })
                    .await?;
                if waiting {
                    view.marked.insert(entry.job);
                } else {
                    view.marked.remove(&entry.job);
                }
            }
        }
        Ok(())
    }

    /// What the first live runner of `pool` lacks, to explain a rejection.
    fn first_missing(
        &self,
        view: &View,
        pool: &PoolName,
        needs: &Needs,
    ) -> Option<comfyq_shared::capability::Missing> {
        view.runners
            .values()
            .find(|r| &r.view.pool == pool && r.view.ready)
            .and_then(|r| r.offer.missing(needs))
    }

    fn policy(&self) -> Policy {
        let config = &self.scheduler.config;
        Policy {
            ageing: config.ageing,
            max_running: config
                .tenants
                .iter()
                .filter_map(|(tenant, limits)| {
                    Some((TenantId::new(tenant.clone()).ok()?, limits.max_running?))
                })
                .collect(),
            default_max_running: config.default_limits.max_running,
        }
    }
}

impl View {
    fn add_pending(
        &mut self,
        names: &comfyq_shared::names::Names,
        message: &async_nats::jetstream::Message,
    ) {
        let Ok(info) = message.info() else { return };
        let Some((pool, priority, tenant)) = names.parse_pending_subject(&message.subject) else {
            tracing::warn!(subject = %message.subject, "pending message on an unknown subject");
            return;
        };
        let Ok(submit) = serde_json::from_slice::<SubmitJob>(&message.payload) else {
            tracing::warn!(seq = info.stream_sequence, "unreadable pending message");
            return;
        };
        let entry = Pending {
            seq: info.stream_sequence,
            job: submit.spec.id,
            tenant,
            priority,
            enqueued_at: submit.queued_since(),
            needs: std::sync::Arc::new(Needs::of(&submit.spec)),
            // A copy: the delivered payload may share a larger read buffer.
            payload: (self.payload_bytes + message.payload.len() <= PAYLOAD_BUDGET)
                .then(|| bytes::Bytes::copy_from_slice(&message.payload)),
        };
        let held = entry.payload.as_ref().map_or(0, |p| p.len());
        if self.pools.entry(pool).or_default().push(entry) {
            self.payload_bytes += held;
        }
    }

    fn update_runner(&mut self, entry: kv::Entry) {
        if matches!(entry.operation, Operation::Delete | Operation::Purge) {
            self.runners.remove(&entry.key);
            return;
        }
        match serde_json::from_slice::<RunnerView>(&entry.value) {
            Ok(view) => {
                let offer = Offer::new(&view.node_types, &view.models, &view.labels);
                self.runners.insert(
                    entry.key.clone(),
                    LiveRunner {
                        key: entry.key,
                        view,
                        offer,
                        seen_at: entry.created,
                    },
                );
            }
            Err(error) => {
                tracing::warn!(key = %entry.key, %error, "unreadable runner registration")
            }
        }
    }
}

/// Jobs in flight per tenant: dispatch messages of the pool not yet acked.
async fn in_flight(
    dispatch: &JsStream,
    filter: &str,
    names: &comfyq_shared::names::Names,
) -> Result<HashMap<TenantId, usize>, DispatchError> {
    let mut subjects = dispatch.info_with_subjects(filter).await.map_err(nats)?;
    let mut running = HashMap::new();
    while let Some(item) = subjects.next().await {
        let (subject, count) = item.map_err(nats)?;
        if let Some((_, _, tenant)) = names.parse_dispatch_subject(&subject) {
            *running.entry(tenant).or_insert(0) += count;
        }
    }
    Ok(running)
}

/// What a picked job needs before its dispatch is sent.
enum Prepared {
    /// Its record still waits: dispatch it as attempt `attempt`.
    Dispatch {
        spec: Box<comfyq_shared::job::JobSpec>,
        attempt: u32,
        known: Box<Versioned>,
    },
    /// Gone, unreadable, or its record moved on: only delete the message.
    Skip,
}

/// Its payload (kept in the view, else read back) and its record.
async fn prepare(
    s: &Scheduler,
    pending: &JsStream,
    entry: &Pending,
    now: OffsetDateTime,
) -> Result<Prepared, DispatchError> {
    let payload = match &entry.payload {
        Some(payload) => payload.clone(),
        None => match pending.get_raw_message(entry.seq).await {
            Ok(raw) => raw.payload,
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                return Ok(Prepared::Skip);
            }
            Err(e) => return Err(nats(e)),
        },
    };
    let Ok(submit) = serde_json::from_slice::<SubmitJob>(&payload) else {
        return Ok(Prepared::Skip);
    };
    // Attempts keep counting after an operator's requeue.
    match s
        .jobs
        .get(&entry.tenant, &entry.job)
        .await
        .map_err(HandleError::from)?
    {
        Some(current)
            if matches!(
                current.record.status,
                JobStatus::Accepted | JobStatus::Queued
            ) =>
        {
            let waited = (now - entry.enqueued_at).as_seconds_f64().max(0.0);
            metrics::histogram!("comfyq_scheduler_queue_wait_seconds", "priority" => entry.priority.as_str())
                .record(waited);
            Ok(Prepared::Dispatch {
                attempt: current.record.attempt + 1,
                spec: Box::new(submit.spec),
                known: Box::new(current),
            })
        }
        _ => Ok(Prepared::Skip),
    }
}

/// Moves held jobs to DISPATCH if their records still wait; returns, per
/// entry, whether it took a slot. Each pending message goes either way,
/// after its dispatch is stored and recorded.
async fn dispatch_batch(
    s: &Scheduler,
    pending: &JsStream,
    entries: &[Pending],
    now: OffsetDateTime,
) -> Result<Vec<bool>, DispatchError> {
    use futures::TryStreamExt;
    // Futures collected first: a lazy `map` closure here trips the
    // compiler's `Send` inference for the spawned dispatcher task.
    let reads: Vec<_> = entries
        .iter()
        .map(|e| Box::pin(prepare(s, pending, e, now)))
        .collect();
    let prepared: Vec<Prepared> = futures::stream::iter(reads)
        .buffered(DISPATCH_CONCURRENCY)
        .try_collect()
        .await?;
    // Sent in pick order without waiting for each ack: one connection keeps
    // the order, so DISPATCH holds them as picked.
    let mut started = Vec::with_capacity(prepared.len());
    for job in prepared {
        started.push(match job {
            Prepared::Dispatch {
                spec,
                attempt,
                known,
            } => Some((s.start_dispatch(*spec, attempt).await?, *known)),
            Prepared::Skip => None,
        });
    }
    let writes: Vec<_> = entries
        .iter()
        .zip(started)
        .map(|(entry, job)| {
            Box::pin(async move {
                let went = match job {
                    Some(((dispatch, ack), known)) => {
                        ack.await.map_err(nats)?;
                        s.dispatched(&dispatch, Some(known)).await?;
                        true
                    }
                    None => false,
                };
                delete_pending(&s.js, pending, entry.seq).await?;
                Ok::<bool, DispatchError>(went)
            })
        })
        .collect();
    futures::stream::iter(writes)
        .buffered(DISPATCH_CONCURRENCY)
        .try_collect()
        .await
}

async fn delete_pending(
    js: &async_nats::jetstream::Context,
    pending: &JsStream,
    seq: u64,
) -> Result<(), DispatchError> {
    // async-nats' `delete_message` asks for the server's default secure erase,
    // which rewrites the message block on disk for every delete: in a profile of
    // the throughput load test it was the largest single cost of nats-server.
    // The pending message holds nothing secret, so a plain delete.
    let subject = format!("STREAM.MSG.DELETE.{}", pending.cached_info().config.name);
    let request = serde_json::json!({"seq": seq, "no_erase": true});
    let response: Response<serde_json::Value> =
        js.request(subject, &request).await.map_err(nats)?;
    match response {
        Response::Ok(_) => Ok(()),
        // Already deleted (by an earlier leader, or a retried pass).
        Response::Err { error } if error.error_code() == ErrorCode::NO_MESSAGE_FOUND => Ok(()),
        Response::Err { error } => Err(nats(error)),
    }
}

fn report_depth(pool: &PoolName, queue: &PoolQueue, now: OffsetDateTime) {
    let depth = queue.depth();
    for priority in Priority::ALL {
        let (count, oldest) = depth.get(&priority).copied().unwrap_or((0, None));
        let labels = [
            ("pool", pool.to_string()),
            ("priority", priority.as_str().to_owned()),
        ];
        metrics::gauge!("comfyq_scheduler_queue_depth", &labels).set(count as f64);
        let oldest = oldest.map_or(0.0, |o| (now - o).as_seconds_f64().max(0.0));
        metrics::gauge!("comfyq_scheduler_oldest_wait_seconds", &labels).set(oldest);
    }
}
