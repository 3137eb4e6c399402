//! Decide-late dispatch. Jobs wait on the pending subjects of the events
//! stream (ingress writes each with its `queued` state event, atomically);
//! the one scheduler holding the dispatcher lease keeps a view of them
//! (rebuilt from the stream whenever it takes the lease) and moves a job to
//! its pool's DISPATCH subjects only when a runner slot is free, choosing by
//! [`policy::pick`]. Each pool's DISPATCH stays about as deep as its free
//! slots (plus `dispatch_window`), so priority, ageing and fairness are
//! decided when a slot frees, not when a job arrives.
//!
//! Dispatching costs no record read or write: the dispatch message carries
//! the `queued` revision (the pending message's place in the stream, right
//! after it), and the runner that pulls it writes `dispatched` and `running`.
//! Jobs in flight are counted in memory: each dispatch's stream sequence is
//! noted when its publish is acknowledged, and removed when a runner's
//! acknowledgement or termination of it passes on the consumer's ack
//! subjects (core NATS sees them). A new leader learns what is in flight
//! from DISPATCH itself, and every `reconcile_every` the counts are checked
//! against the stream's subject counts (exhausted messages the scheduler
//! deletes send no acknowledgement).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::{self, DeliverPolicy};
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::Stream as JsStream;
use comfyq_shared::capability::Needs;
use comfyq_shared::ids::{JobId, PoolName, TenantId};
use comfyq_shared::job::{ErrorKind, WAITING_FOR_CAPABILITY};
use comfyq_shared::machine::Input;
use comfyq_shared::messages::SubmitJob;
use comfyq_shared::priority::Priority;
use comfyq_shared::registry::{Fleet, LiveRunner};
use futures::StreamExt;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Unroutable;
use crate::lease::Lease;
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

enum Event {
    Pending(Box<async_nats::jetstream::Message>),
    /// A job's `queued` state event (written by ingress after its pending
    /// message, or by a change while it waits).
    Queued(Box<async_nats::jetstream::Message>),
    Load(Box<kv::Entry>),
    Capabilities(Box<kv::Entry>),
    /// A runner acknowledged (or terminated) the dispatch message at this
    /// stream sequence: its slot is free.
    Freed(PoolName, u64),
    /// A queued job was cancelled: it leaves the view.
    Cancelled(JobId),
    Tick,
    Ended(&'static str),
}

/// Payload bytes of pending messages the view keeps, so that dispatching a
/// job needs no read of its message: 64 MiB holds 1,000 jobs of 50 KB
/// workflows (beyond it, a job's message is read back when it is picked).
const PAYLOAD_BUDGET: usize = 64 * 1024 * 1024;

/// Jobs of one pass whose writes are in flight at once.
const DISPATCH_CONCURRENCY: usize = 32;

/// Jobs picked before their dispatches are sent (the pass picks again for
/// what is left of the capacity).
const MAX_BATCH: usize = 256;

/// Ticks between checks of the in-flight counts against DISPATCH.
const RECONCILE_TICKS: u32 = 10;

/// How long a waiting job that arrived while this dispatcher leads is held
/// for its `queued` state event (ingress writes it right after the pending
/// message) before it is dispatched without (its writer died in between).
const CONFIRM_WAIT: Duration = Duration::from_secs(1);

/// How long the dispatcher holds a waiting job before the server offers it
/// again (the view ignores a job it holds already).
const PENDING_ACK_WAIT: Duration = Duration::from_secs(6 * 3600);

/// Waiting jobs the dispatcher holds at most (the server delivers no more
/// until some are acknowledged).
const PENDING_MAX_HELD: i64 = 1_000_000;

/// `queued` records kept at most (about 1 KiB each): a job beyond is
/// dispatched without one, and its runner reads the record.
const QUEUED_KEPT: usize = 16_384;

/// How long a `queued` revision is kept for a job not (or no longer) waiting.
const QUEUED_KEEP: Duration = Duration::from_secs(60);

/// The dispatch messages of one pool not yet acknowledged: those this
/// leader dispatched, by stream sequence, and a count of the others (left
/// by an earlier leader, or whose sequence is unknown), per tenant.
#[derive(Debug, Default)]
struct InFlight {
    by_seq: HashMap<u64, TenantId>,
    per_tenant: HashMap<TenantId, usize>,
    untracked: HashMap<TenantId, usize>,
}

impl InFlight {
    fn add(&mut self, seq: u64, tenant: TenantId) {
        if self.by_seq.insert(seq, tenant.clone()).is_none() {
            *self.per_tenant.entry(tenant).or_insert(0) += 1;
        }
    }

    /// Forgets a freed message; `false` if its sequence was not tracked.
    fn remove(&mut self, seq: u64) -> bool {
        let Some(tenant) = self.by_seq.remove(&seq) else {
            return false;
        };
        if let Some(n) = self.per_tenant.get_mut(&tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_tenant.remove(&tenant);
            }
        }
        true
    }

    fn tracked(&self, tenant: &TenantId) -> usize {
        self.by_seq.values().filter(|t| *t == tenant).count()
    }

    /// Takes the stream's count per tenant as the truth: what it holds
    /// beyond the tracked messages is untracked.
    fn set_counts(&mut self, stored: &HashMap<TenantId, usize>) {
        let mut tracked: HashMap<TenantId, usize> = HashMap::new();
        for tenant in self.by_seq.values() {
            *tracked.entry(tenant.clone()).or_insert(0) += 1;
        }
        self.untracked = stored
            .iter()
            .filter_map(|(tenant, n)| {
                let extra = n.saturating_sub(tracked.get(tenant).copied().unwrap_or(0));
                (extra > 0).then(|| (tenant.clone(), extra))
            })
            .collect();
        self.per_tenant = tracked;
        for (tenant, n) in &self.untracked {
            *self.per_tenant.entry(tenant.clone()).or_insert(0) += n;
        }
    }

    fn has_untracked(&self) -> bool {
        !self.untracked.is_empty()
    }

    fn total(&self) -> usize {
        self.per_tenant.values().sum()
    }
}

#[derive(Default)]
struct View {
    /// Bytes of the payloads held in `pools` (at most `PAYLOAD_BUDGET`).
    payload_bytes: usize,
    pools: BTreeMap<PoolName, PoolQueue>,
    /// Where each waiting job is, to drop it on a cancel: its lane, its
    /// sequence, and where to acknowledge its pending message.
    jobs: HashMap<JobId, (PoolName, Priority, TenantId, u64, String)>,
    /// Waiting jobs per tenant (all pools), for `max_queued`.
    queued_per_tenant: HashMap<TenantId, usize>,
    fleet: Fleet,
    in_flight: HashMap<PoolName, InFlight>,
    /// Jobs marked `waiting_for_capability` in their record.
    marked: HashSet<JobId>,
    /// Each job's latest `queued` state event seen while leading: its
    /// revision and record, for the runner to claim it without a read.
    queued: HashMap<JobId, (u64, Box<comfyq_shared::job::JobRecord>, std::time::Instant)>,
    /// Waiting jobs that arrived while leading and whose `queued` event has
    /// not been seen yet, since when.
    unconfirmed: HashMap<JobId, std::time::Instant>,
    /// Jobs to check against their tenant's `max_queued`, with how many of
    /// the tenant's jobs waited when each arrived.
    quota_checks: Vec<(JobId, TenantId, usize)>,
    /// Round-robin state per pool (memory only: a new dispatcher starts it afresh).
    served: HashMap<PoolName, HashMap<TenantId, u64>>,
}

#[derive(Clone, Debug)]
pub struct Dispatcher {
    pub scheduler: Scheduler,
    pub runners: kv::Store,
    pub capabilities: kv::Store,
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
        let events = s.jobs.stream().clone();
        let dispatch =
            s.js.get_stream(s.names.dispatch_stream())
                .await
                .map_err(nats)?;
        let (tx, mut rx) = mpsc::channel::<Event>(4096);
        let mut sources = JoinSet::new();

        // Acknowledgements of dispatch messages pass on the consumers' ack
        // subjects; acks and terminations free a slot.
        let mut acks = s
            .client
            .subscribe(s.names.dispatch_acks_filter())
            .await
            .map_err(nats)?;
        let sender = tx.clone();
        let names = s.names.clone();
        sources.spawn(async move {
            while let Some(ack) = acks.next().await {
                let frees = matches!(ack.payload.as_ref(), b"" | b"+ACK" | b"+TERM")
                    || ack.payload.starts_with(b"+TERM ");
                if !frees {
                    continue;
                }
                if let Some((pool, seq)) = parse_ack_subject(&names, ack.subject.as_str())
                    && sender.send(Event::Freed(pool, seq)).await.is_err()
                {
                    return;
                }
            }
            let _ = sender.send(Event::Ended("ack subscription")).await;
        });

        // Cancellations of waiting jobs (core NATS; a missed one only means
        // the job is dispatched and its runner drops it).
        let mut cancels = s
            .client
            .subscribe(s.names.runner_cancel_filter())
            .await
            .map_err(nats)?;
        let sender = tx.clone();
        let names = s.names.clone();
        sources.spawn(async move {
            while let Some(nudge) = cancels.next().await {
                if let Some(job) = names.parse_runner_cancel_subject(nudge.subject.as_str())
                    && sender.send(Event::Cancelled(job)).await.is_err()
                {
                    return;
                }
            }
            let _ = sender.send(Event::Ended("cancel subscription")).await;
        });

        // Last value of every key first, then updates.
        for (bucket, capabilities) in [(&self.runners, false), (&self.capabilities, true)] {
            let mut watch = bucket.watch_with_history(">").await.map_err(nats)?;
            let sender = tx.clone();
            sources.spawn(async move {
                while let Some(Ok(entry)) = watch.next().await {
                    let entry = Box::new(entry);
                    let event = if capabilities {
                        Event::Capabilities(entry)
                    } else {
                        Event::Load(entry)
                    };
                    if sender.send(event).await.is_err() {
                        return;
                    }
                }
                let _ = sender.send(Event::Ended("registration watch")).await;
            });
        }

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

        let mut view = View::default();
        // What previous leaders dispatched and is still in flight (the ack
        // subscription is open already, so nothing freed now is missed).
        reconcile(s, &dispatch, &mut view).await?;

        // Every waiting job, oldest first: the view is rebuilt from them. The
        // consumer is made anew for each leadership, so it delivers every job
        // not yet acknowledged (dispatched, or failed while waiting), also
        // those an earlier leader had been delivered.
        let pending =
            s.js.get_stream(s.names.pending_stream())
                .await
                .map_err(nats)?;
        let reader = recreate_pending_consumer(s, &pending).await?;
        let mut caught_up = reader.cached_info().num_pending == 0;
        let mut messages = reader.messages().await.map_err(nats)?;
        // `queued` events from now on: what a job that arrives now waits for.
        let confirmations = events
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: s.names.event_kind_filter(comfyq_shared::EventKind::State(
                    comfyq_shared::JobStatus::Queued,
                )),
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(nats)?;
        let mut confirmations = confirmations.messages().await.map_err(nats)?;
        let sender = tx.clone();
        sources.spawn(async move {
            while let Some(message) = confirmations.next().await {
                let event = match message {
                    Ok(message) => Event::Queued(Box::new(message)),
                    Err(error) => {
                        tracing::warn!(%error, "queued events reader failed");
                        Event::Ended("queued events reader")
                    }
                };
                if sender.send(event).await.is_err() {
                    return;
                }
            }
            let _ = sender.send(Event::Ended("queued events reader")).await;
        });
        let sender = tx.clone();
        sources.spawn(async move {
            while let Some(message) = messages.next().await {
                let event = match message {
                    Ok(message) => Event::Pending(Box::new(message)),
                    Err(error) => {
                        tracing::warn!(%error, "pending reader failed");
                        Event::Ended("pending reader")
                    }
                };
                if sender.send(event).await.is_err() {
                    return;
                }
            }
            let _ = sender.send(Event::Ended("pending reader")).await;
        });
        drop(tx);

        let mut ticks = 0u32;
        loop {
            let first = tokio::select! {
                _ = lost.cancelled() => return Ok(()),
                _ = shutdown.cancelled() => return Ok(()),
                event = rx.recv() => event.ok_or(DispatchError::Ended("event sources"))?,
            };
            let mut sweep = false;
            let mut runners_changed = false;
            let mut recount = false;
            let mut arrived = Vec::new();
            // Take everything already waiting, then act once.
            let mut next = Some(first);
            while let Some(event) = next.take() {
                match event {
                    Event::Pending(message) => {
                        let live = caught_up;
                        if message.info().map(|i| i.pending == 0).unwrap_or(false) {
                            caught_up = true;
                        }
                        // Arrived while leading: dispatched once its record
                        // is queued (or after `CONFIRM_WAIT`), and checked
                        // against its tenant's quota (jobs already waiting
                        // when this dispatcher took over were checked).
                        if let Some(job) = view.add_pending(&s.names, &message)
                            && live
                        {
                            if !view.queued.contains_key(&job.0) {
                                view.unconfirmed.insert(job.0, std::time::Instant::now());
                            }
                            arrived.push(job);
                        }
                    }
                    Event::Queued(message) => view.confirm(&s.names, &message),
                    Event::Load(entry) => {
                        view.fleet.apply_load(&entry);
                        runners_changed = true;
                    }
                    Event::Capabilities(entry) => {
                        view.fleet.apply_capabilities(&entry);
                        runners_changed = true;
                    }
                    Event::Freed(pool, seq) => {
                        if let Some(in_flight) = view.in_flight.get_mut(&pool)
                            && !in_flight.remove(seq)
                            && in_flight.has_untracked()
                        {
                            recount = true;
                        }
                    }
                    Event::Cancelled(job) => {
                        if let Some(ack) = view.remove_job(&job) {
                            acknowledge_pending(s, &ack).await?;
                        }
                    }
                    Event::Tick => sweep = true,
                    Event::Ended(what) => return Err(DispatchError::Ended(what)),
                }
                next = rx.try_recv().ok();
            }
            if !caught_up {
                continue;
            }
            view.quota_checks.extend(arrived);
            if !view.quota_checks.is_empty() {
                self.enforce_max_queued(&mut view).await?;
            }
            if sweep {
                ticks += 1;
                recount |= ticks.is_multiple_of(RECONCILE_TICKS);
                let jobs = &view.jobs;
                view.queued
                    .retain(|job, (_, _, at)| jobs.contains_key(job) || at.elapsed() < QUEUED_KEEP);
            }
            if recount {
                reconcile(s, &dispatch, &mut view).await?;
            }
            self.pass(&mut view, &pending, sweep || runners_changed)
                .await?;
        }
    }

    /// Fails the newest waiting jobs of tenants over their `max_queued`.
    /// Fails jobs that arrived while their tenant had `max_queued` waiting,
    /// once their record exists (their `queued` event was seen, or after
    /// `CONFIRM_WAIT`): a record written after the failure would bring the
    /// job back as queued with nothing to dispatch it.
    async fn enforce_max_queued(&self, view: &mut View) -> Result<(), DispatchError> {
        let s = &self.scheduler;
        let checks = std::mem::take(&mut view.quota_checks);
        for (job, tenant, queued) in checks {
            if !view.jobs.contains_key(&job) {
                continue;
            }
            if view
                .unconfirmed
                .get(&job)
                .is_some_and(|since| since.elapsed() < CONFIRM_WAIT)
            {
                view.quota_checks.push((job, tenant, queued));
                continue;
            }
            let Some(limit) = s.config.limits(&tenant).max_queued else {
                continue;
            };
            if queued <= limit {
                continue;
            }
            metrics::counter!("comfyq_scheduler_rejected_total", "reason" => "max_queued")
                .increment(1);
            if s.transition(
                &tenant,
                &job,
                Input::FailQueued {
                    kind: ErrorKind::Rejected,
                    message: format!(
                        "tenant {tenant} already has {} jobs queued (limit {limit})",
                        queued - 1
                    ),
                },
            )
            .await?
            .is_none()
            {
                // No record even now (its ingress died before writing it):
                // the runner that pulls it writes it; no quota for it.
                continue;
            }
            if let Some(ack) = view.remove_job(&job) {
                acknowledge_pending(s, &ack).await?;
            }
        }
        Ok(())
    }

    /// Dispatches what the pools have room for; with `sweep`, also fails jobs
    /// queued too long and (un)marks jobs no runner can run.
    async fn pass(
        &self,
        view: &mut View,
        pending: &JsStream,
        sweep: bool,
    ) -> Result<(), DispatchError> {
        let s = &self.scheduler;
        let now = OffsetDateTime::now_utc();
        let policy = self.policy();
        let ttl = s.config.nats.runner_ttl;
        view.fleet.expire(ttl, now);
        let live = view.fleet.live(ttl, now);
        let pools: Vec<PoolName> = view.pools.keys().cloned().collect();
        // Jobs that arrived while leading wait for their `queued` event.
        let unconfirmed = std::mem::take(&mut view.unconfirmed);
        let confirmed = |e: &Pending| {
            unconfirmed
                .get(&e.job)
                .is_none_or(|since| since.elapsed() >= CONFIRM_WAIT)
        };
        for pool in pools {
            let runners: Vec<&LiveRunner> = live
                .iter()
                .filter(|r| r.load.pool == pool && r.load.ready)
                .collect();
            let capable = |e: &Pending| {
                runners.is_empty() || runners.iter().any(|r| r.offer.can_run(&e.needs))
            };
            if sweep {
                self.sweep(view, &pool, &capable, now).await?;
            }
            let in_flight = view.in_flight.entry(pool.clone()).or_default();
            for (tenant, count) in &in_flight.per_tenant {
                metrics::gauge!("comfyq_scheduler_running_jobs", "pool" => pool.to_string(), "tenant" => tenant.to_string())
                    .set(*count as f64);
            }
            let running = in_flight.per_tenant.clone();
            let running_total = in_flight.total();
            let Some(queue) = view.pools.get_mut(&pool) else {
                continue;
            };
            // Burst runners' slots count only while the pool's backlog could
            // keep DISPATCH at their `min_pending` (NATS overflow group):
            // then DISPATCH also holds that many unpulled jobs for them to see.
            let slots: usize = runners
                .iter()
                .filter(|r| r.load.burst_min_pending.is_none())
                .map(|r| r.load.slots)
                .sum();
            let burst_slots: usize = runners
                .iter()
                .filter(|r| r.load.burst_min_pending.is_some())
                .map(|r| r.load.slots)
                .sum();
            let threshold = runners
                .iter()
                .filter_map(|r| r.load.burst_min_pending)
                .max()
                .unwrap_or(0);
            let burst = if burst_slots > 0 && queue.len() >= threshold {
                burst_slots + threshold
            } else {
                0
            };
            let mut capacity =
                (slots + burst + s.config.dispatch_window).saturating_sub(running_total);
            let last_served = view.served.remove(&pool).unwrap_or_default();
            let mut tenants = Tenants::new(running, last_served);
            // A job only some runners can run goes out only while one of
            // those has a free slot: the pool's runners share one consumer,
            // and any of them may pull it (one that cannot hands it back).
            let mut taken: HashMap<&str, usize> = HashMap::new();
            let free_capable = |e: &Pending, taken: &HashMap<&str, usize>| {
                runners.iter().all(|r| r.offer.can_run(&e.needs))
                    || runners.iter().any(|r| {
                        r.offer.can_run(&e.needs)
                            && r.load.busy + taken.get(r.key.as_str()).copied().unwrap_or(0)
                                < r.load.slots
                    })
            };
            // Pick a batch as if every pick goes out, then send it: the
            // dispatches of one batch are published in pick order.
            while capacity > 0 {
                let mut batch: Vec<Pending> = Vec::new();
                while batch.len() < capacity.min(MAX_BATCH) {
                    let Some(next) = policy::pick(queue, now, &policy, &tenants, |e| {
                        confirmed(e) && capable(e) && free_capable(e, &taken)
                    })
                    .cloned() else {
                        break;
                    };
                    if let Some(removed) = queue.remove(next.priority, &next.tenant, next.seq) {
                        view.payload_bytes -= removed.payload.as_ref().map_or(0, |p| p.len());
                    }
                    view.jobs.remove(&next.job);
                    if let Some(n) = view.queued_per_tenant.get_mut(&next.tenant) {
                        *n = n.saturating_sub(1);
                    }
                    tenants.served(&next.tenant);
                    if !runners.iter().all(|r| r.offer.can_run(&next.needs))
                        && let Some(r) = runners.iter().find(|r| {
                            r.offer.can_run(&next.needs)
                                && r.load.busy + taken.get(r.key.as_str()).copied().unwrap_or(0)
                                    < r.load.slots
                        })
                    {
                        *taken.entry(r.key.as_str()).or_insert(0) += 1;
                    }
                    batch.push(next);
                }
                if batch.is_empty() {
                    break;
                }
                capacity -= batch.len();
                let known: Vec<Option<(u64, Box<comfyq_shared::job::JobRecord>)>> = batch
                    .iter()
                    .map(|e| view.queued.remove(&e.job).map(|(rev, rec, _)| (rev, rec)))
                    .collect();
                let sent = dispatch_batch(s, pending, &batch, known, now).await?;
                let in_flight = view.in_flight.entry(pool.clone()).or_default();
                for (entry, seq) in batch.iter().zip(sent) {
                    view.marked.remove(&entry.job);
                    match seq {
                        Some(seq) => in_flight.add(seq, entry.tenant.clone()),
                        // Its message was gone or unreadable: the slot is
                        // still free for the next batch.
                        None => {
                            capacity += 1;
                            if let Some(n) = tenants.running.get_mut(&entry.tenant) {
                                *n = n.saturating_sub(1);
                            }
                        }
                    }
                }
            }
            view.served.insert(pool.clone(), tenants.last_served);
            report_depth(&pool, queue, now);
        }
        view.pools.retain(|_, q| !q.is_empty());
        let jobs = &view.jobs;
        view.unconfirmed.extend(
            unconfirmed
                .into_iter()
                .filter(|(job, _)| jobs.contains_key(job)),
        );
        Ok(())
    }

    async fn sweep(
        &self,
        view: &mut View,
        pool: &PoolName,
        capable: &impl Fn(&Pending) -> bool,
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
                view.remove_job(&entry.job);
                acknowledge_pending(s, &entry.ack).await?;
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
        let now = OffsetDateTime::now_utc();
        view.fleet
            .live(self.scheduler.config.nats.runner_ttl, now)
            .into_iter()
            .find(|r| &r.load.pool == pool && r.load.ready)
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
    /// Adds a waiting job; returns it, with how many of its tenant's jobs
    /// now wait, if it is new to the view.
    fn add_pending(
        &mut self,
        names: &comfyq_shared::names::Names,
        message: &async_nats::jetstream::Message,
    ) -> Option<(JobId, TenantId, usize)> {
        let info = message.info().ok()?;
        let Some((pool, priority, tenant)) = names.parse_pending_subject(&message.subject) else {
            tracing::warn!(subject = %message.subject, "pending message on an unknown subject");
            return None;
        };
        let Ok(submit) = serde_json::from_slice::<SubmitJob>(&message.payload) else {
            tracing::warn!(seq = info.stream_sequence, "unreadable pending message");
            return None;
        };
        let job = submit.spec.id;
        let seq = info.stream_sequence;
        let entry = Pending {
            seq,
            job,
            tenant: tenant.clone(),
            priority,
            enqueued_at: submit.queued_since(),
            needs: std::sync::Arc::new(Needs::of(&submit.spec)),
            // A copy: the delivered payload may share a larger read buffer.
            payload: (self.payload_bytes + message.payload.len() <= PAYLOAD_BUDGET)
                .then(|| bytes::Bytes::copy_from_slice(&message.payload)),
            ack: message
                .reply
                .as_ref()
                .map(|r| r.to_string())
                .unwrap_or_default(),
        };
        let held = entry.payload.as_ref().map_or(0, |p| p.len());
        let entry_ack = entry.ack.clone();
        if !self.pools.entry(pool.clone()).or_default().push(entry) {
            return None;
        }
        self.payload_bytes += held;
        let ack = entry_ack;
        self.jobs
            .insert(job, (pool, priority, tenant.clone(), seq, ack));
        let waiting = self.queued_per_tenant.entry(tenant.clone()).or_insert(0);
        *waiting += 1;
        Some((job, tenant, *waiting))
    }

    /// Notes a `queued` state event: the job's revision to dispatch it at.
    fn confirm(
        &mut self,
        names: &comfyq_shared::names::Names,
        message: &async_nats::jetstream::Message,
    ) {
        let Ok(info) = message.info() else { return };
        let Some((tenant, job)) = names.parse_event_subject(&message.subject) else {
            return;
        };
        let key = names.job_state_filter(&tenant, &job);
        match comfyq_shared::job_store::decode(&key, &message.payload) {
            Ok(record) => {
                self.unconfirmed.remove(&job);
                if self.queued.len() >= QUEUED_KEPT && !self.queued.contains_key(&job) {
                    return;
                }
                self.queued.insert(
                    job,
                    (
                        info.stream_sequence,
                        Box::new(record),
                        std::time::Instant::now(),
                    ),
                );
            }
            Err(error) => tracing::warn!(%error, "unreadable queued event"),
        }
    }

    /// Takes a waiting job out of the view; where to acknowledge its
    /// pending message.
    fn remove_job(&mut self, job: &JobId) -> Option<String> {
        let (pool, priority, tenant, seq, ack) = self.jobs.remove(job)?;
        if let Some(queue) = self.pools.get_mut(&pool)
            && let Some(removed) = queue.remove(priority, &tenant, seq)
        {
            self.payload_bytes -= removed.payload.as_ref().map_or(0, |p| p.len());
        }
        if let Some(n) = self.queued_per_tenant.get_mut(&tenant) {
            *n = n.saturating_sub(1);
        }
        self.marked.remove(job);
        self.queued.remove(job);
        self.unconfirmed.remove(job);
        Some(ack)
    }
}

/// `(pool, stream sequence)` of an acknowledgement's subject:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.…`, or the newer
/// form with domain and account hash before the stream.
fn parse_ack_subject(
    names: &comfyq_shared::names::Names,
    subject: &str,
) -> Option<(PoolName, u64)> {
    let tokens: Vec<&str> = subject.split('.').collect();
    let stream = names.dispatch_stream();
    let at = tokens.iter().position(|t| *t == stream)?;
    let pool = PoolName::new(tokens.get(at + 1)?.strip_prefix("dispatch-")?).ok()?;
    let seq = tokens.get(at + 3)?.parse().ok()?;
    Some((pool, seq))
}

/// What DISPATCH holds per pool and tenant (its subject counts).
async fn stored_in_flight(
    s: &Scheduler,
    dispatch: &JsStream,
) -> Result<HashMap<PoolName, HashMap<TenantId, usize>>, DispatchError> {
    let mut subjects = dispatch
        .info_with_subjects(format!("{}.dispatch.>", s.names.prefix()))
        .await
        .map_err(nats)?;
    let mut stored: HashMap<PoolName, HashMap<TenantId, usize>> = HashMap::new();
    while let Some(item) = subjects.next().await {
        let (subject, count) = item.map_err(nats)?;
        if let Some((pool, _, tenant)) = s.names.parse_dispatch_subject(&subject) {
            *stored.entry(pool).or_default().entry(tenant).or_insert(0) += count;
        }
    }
    Ok(stored)
}

/// Counts what is in flight from DISPATCH: at the start of a leadership,
/// after an acknowledgement of a message this leader did not track, and
/// every `RECONCILE_TICKS` (a message the scheduler deleted as exhausted
/// sends no acknowledgement). A tracked message DISPATCH no longer holds is
/// found by reading it back (only when the counts disagree).
async fn reconcile(
    s: &Scheduler,
    dispatch: &JsStream,
    view: &mut View,
) -> Result<(), DispatchError> {
    let stored = stored_in_flight(s, dispatch).await?;
    let pools: HashSet<PoolName> = stored
        .keys()
        .chain(view.in_flight.keys())
        .cloned()
        .collect();
    let none = HashMap::new();
    for pool in pools {
        let counts = stored.get(&pool).unwrap_or(&none);
        let in_flight = view.in_flight.entry(pool).or_default();
        let over: Vec<TenantId> = in_flight
            .per_tenant
            .keys()
            .filter(|t| in_flight.tracked(t) > counts.get(*t).copied().unwrap_or(0))
            .cloned()
            .collect();
        if !over.is_empty() {
            let suspects: Vec<u64> = in_flight
                .by_seq
                .iter()
                .filter(|(_, t)| over.contains(t))
                .map(|(seq, _)| *seq)
                .collect();
            for seq in suspects {
                match dispatch.get_raw_message(seq).await {
                    Ok(_) => {}
                    Err(e)
                        if e.kind()
                            == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                    {
                        in_flight.remove(seq);
                    }
                    Err(e) => return Err(nats(e)),
                }
            }
        }
        in_flight.set_counts(counts);
    }
    Ok(())
}

/// The `SubmitJob` of a picked job: kept in the view, else read back.
async fn payload_of(
    pending: &JsStream,
    entry: &Pending,
) -> Result<Option<SubmitJob>, DispatchError> {
    let payload = match &entry.payload {
        Some(payload) => payload.clone(),
        None => match pending.get_raw_message(entry.seq).await {
            Ok(raw) => raw.payload,
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                return Ok(None);
            }
            Err(e) => return Err(nats(e)),
        },
    };
    Ok(serde_json::from_slice::<SubmitJob>(&payload).ok())
}

/// Moves picked jobs to DISPATCH; returns, per entry, the stream sequence
/// of its dispatch message (`None`: its pending message was gone or
/// unreadable). Each pending message is acknowledged once its dispatch is stored.
async fn dispatch_batch(
    s: &Scheduler,
    pending: &JsStream,
    entries: &[Pending],
    known: Vec<Option<(u64, Box<comfyq_shared::job::JobRecord>)>>,
    now: OffsetDateTime,
) -> Result<Vec<Option<u64>>, DispatchError> {
    use futures::TryStreamExt;
    // Sent in pick order without waiting for each ack: one connection keeps
    // the order, so DISPATCH holds them as picked.
    let mut started = Vec::with_capacity(entries.len());
    for (entry, known) in entries.iter().zip(known) {
        let Some(submit) = payload_of(pending, entry).await? else {
            started.push(None);
            continue;
        };
        let waited = (now - entry.enqueued_at).as_seconds_f64().max(0.0);
        metrics::histogram!("comfyq_scheduler_queue_wait_seconds", "priority" => entry.priority.as_str())
            .record(waited);
        let created_at = submit.spec.created_at;
        let ack = s.start_dispatch(submit, known).await?;
        started.push(Some((ack, created_at)));
    }
    let writes: Vec<_> = entries
        .iter()
        .zip(started)
        .map(|(entry, job)| {
            Box::pin(async move {
                let seq = match job {
                    Some((ack, created_at)) => {
                        let ack = ack.await.map_err(nats)?;
                        let latency = (OffsetDateTime::now_utc() - created_at)
                            .as_seconds_f64()
                            .max(0.0);
                        metrics::histogram!("comfyq_scheduler_dispatch_latency_seconds", "priority" => entry.priority.as_str())
                            .record(latency);
                        Some(ack.sequence)
                    }
                    None => None,
                };
                acknowledge_pending(s, &entry.ack).await?;
                Ok::<Option<u64>, DispatchError>(seq)
            })
        })
        .collect();
    futures::stream::iter(writes)
        .buffered(DISPATCH_CONCURRENCY)
        .try_collect()
        .await
}

/// Acknowledges a pending message: the work queue removes it. One message,
/// no reply: if it is lost (a reconnect), the next leader dispatches the job
/// again, which DISPATCH's deduplication and the runner's claim absorb.
async fn acknowledge_pending(s: &Scheduler, ack: &str) -> Result<(), DispatchError> {
    if ack.is_empty() {
        return Ok(());
    }
    s.client
        .publish(ack.to_owned(), "+ACK".into())
        .await
        .map_err(nats)
}

/// The dispatcher's consumer of the pending stream, made anew: it delivers
/// every job not yet acknowledged. Jobs wait as long as they must, so they
/// stay unacknowledged for long (a redelivery after `PENDING_ACK_WAIT` is
/// recognised by its sequence and ignored).
async fn recreate_pending_consumer(
    s: &Scheduler,
    pending: &JsStream,
) -> Result<consumer::PullConsumer, DispatchError> {
    let name = s.names.dispatcher_consumer();
    for attempt in 1u32..=20 {
        match pending.delete_consumer(&name).await {
            Ok(_) => {}
            Err(error)
                if matches!(
                    error.kind(),
                    async_nats::jetstream::stream::ConsumerErrorKind::JetStream(ref e)
                        if e.error_code() == ErrorCode::CONSUMER_NOT_FOUND
                ) => {}
            Err(error) => return Err(nats(error)),
        }
        let created = pending
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name.clone()),
                description: Some("comfyq dispatcher: jobs waiting for a slot".to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: PENDING_ACK_WAIT,
                max_ack_pending: PENDING_MAX_HELD,
                num_replicas: s.config.nats.replicas,
                ..Default::default()
            })
            .await
            .map_err(nats)?;
        // Creating a durable that exists with the same configuration
        // returns it as it is. On a cluster a node that just came back can
        // answer "not found" to the deletion of one that still exists: the
        // old consumer, with the jobs it delivered to an earlier leader held
        // for `PENDING_ACK_WAIT`, would come back and those jobs would not.
        let info = created.cached_info();
        if info.delivered.consumer_sequence == 0 && info.num_ack_pending == 0 {
            return Ok(created);
        }
        tracing::warn!(
            attempt,
            delivered = info.delivered.consumer_sequence,
            held = info.num_ack_pending,
            "the pending consumer of an earlier leadership survived its deletion; deleting it again"
        );
        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(10)))).await;
    }
    Err(nats(
        "the pending consumer of an earlier leadership keeps coming back after deletion",
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_subjects_of_both_forms_name_pool_and_sequence() {
        let names = comfyq_shared::names::Names::default();
        let pool = PoolName::new("gpu").expect("valid");
        assert_eq!(
            parse_ack_subject(
                &names,
                "$JS.ACK.COMFYQ_DISPATCH.dispatch-gpu.1.42.7.1700000000.0"
            ),
            Some((pool.clone(), 42))
        );
        assert_eq!(
            parse_ack_subject(
                &names,
                "$JS.ACK.hub.ACCHASH.COMFYQ_DISPATCH.dispatch-gpu.2.43.8.1700000000.0.token"
            ),
            Some((pool, 43))
        );
        assert_eq!(parse_ack_subject(&names, "$JS.ACK.OTHER.x.1.2.3.4.5"), None);
    }

    #[test]
    fn in_flight_counts_follow_adds_and_removals() {
        let mut in_flight = InFlight::default();
        let a = TenantId::new("a").expect("valid");
        let b = TenantId::new("b").expect("valid");
        in_flight.add(1, a.clone());
        in_flight.add(1, a.clone());
        in_flight.add(2, a.clone());
        assert_eq!(
            (in_flight.total(), in_flight.per_tenant.get(&a)),
            (2, Some(&2))
        );
        assert!(in_flight.remove(1));
        assert!(!in_flight.remove(1));
        // The stream holds one of a's (tracked) and three of b's (an
        // earlier leader's).
        in_flight.set_counts(&HashMap::from([(a.clone(), 1), (b.clone(), 3)]));
        assert!(in_flight.has_untracked());
        assert_eq!(in_flight.total(), 4);
        assert!(in_flight.remove(2));
        assert_eq!(in_flight.per_tenant.get(&a), None);
        in_flight.set_counts(&HashMap::new());
        assert!(in_flight.per_tenant.is_empty() && !in_flight.has_untracked());
    }
}
