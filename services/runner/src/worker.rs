//! The pull loop: take work when a slot is free, claim it in the job's
//! record (`dispatched` and `running`, compare-and-set, before ComfyUI sees
//! the prompt: exactly one execution per attempt), run it, write what
//! became of it to the record, and acknowledge the dispatch message exactly
//! once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use comfyq_shared::ids::{JobId, PoolName, RunnerId};
use comfyq_shared::job::{ErrorKind, JobError, JobRecord, JobStatus, SCHEMA_VERSION};
use comfyq_shared::job_store::{Applied, JobStore, JobStoreError, Versioned};
use comfyq_shared::machine::{self, Input, Transition};
use comfyq_shared::messages::{AttemptOutcome, DispatchJob, RunnerReport};
use comfyq_shared::names::Names;
use comfyq_shared::registry::RunnerLoad;
use futures::StreamExt;
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::RunnerConfig;
use crate::execute::{AttemptEnd, Executor};
use crate::pull::{DispatchPull, Pulled};

/// Jobs this runner holds, by id, with the token that cancels each.
#[derive(Clone, Debug, Default)]
pub struct HeldJobs(
    Arc<Mutex<HashMap<JobId, CancellationToken>>>,
    /// Signalled on every change, so the registration's `busy` follows
    /// promptly (the dispatcher routes restricted jobs by it).
    Arc<tokio::sync::Notify>,
);

impl HeldJobs {
    fn insert(&self, job: JobId, token: CancellationToken) {
        if let Ok(mut held) = self.0.lock() {
            held.insert(job, token);
        }
        self.1.notify_one();
    }
    fn remove(&self, job: &JobId) {
        if let Ok(mut held) = self.0.lock() {
            held.remove(job);
        }
        self.1.notify_one();
    }
    /// Resolves after the next change (or at once if one happened unseen).
    pub async fn changed(&self) {
        self.1.notified().await;
    }
    /// Cancels `job` if held here; returns whether it was.
    pub fn cancel(&self, job: &JobId) -> bool {
        let token = self.0.lock().ok().and_then(|held| held.get(job).cloned());
        token.map(|t| t.cancel()).is_some()
    }
    pub fn len(&self) -> usize {
        self.0.lock().map(|held| held.len()).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the worker does with a dispatch message once the attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Record the outcome, then ack.
    Done(AttemptOutcome),
    /// Record the outcome, then hand back for redelivery after the delay.
    Retry(AttemptOutcome, Duration),
    /// Record the outcome (if any), then terminate the message.
    Drop(Option<AttemptOutcome>),
    /// The last delivery failed retryably: record the failure, then hand
    /// the message back so the server's max-deliveries advisory makes it a
    /// dead letter (the scheduler keeps its spec for a requeue).
    Exhausted(AttemptOutcome),
}

/// Whether an attempt's end is this delivery's to acknowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Ours,
    /// A later attempt (a redelivery elsewhere) holds the job.
    Superseded,
}

/// What claiming a delivered job in its record came to.
#[derive(Debug)]
enum Claim {
    /// This runner runs the attempt: the record says so, at this revision.
    Run(Box<Versioned>),
    /// Not to be run: the job ended or was cancelled (its cancellation is
    /// recorded), or another runner holds this attempt.
    Drop(&'static str),
}

/// Maps an attempt's end to exactly one acknowledgement (exhaustively).
/// `delivery` counts this message's deliveries (the attempt budget is per
/// message, so an operator's requeue gets a fresh one).
pub fn disposition(
    end: AttemptEnd,
    delivery: u32,
    max_attempts: u32,
    backoff: Duration,
    handing_back: bool,
) -> Disposition {
    match end {
        AttemptEnd::Completed(outputs) => Disposition::Done(AttemptOutcome::Completed { outputs }),
        AttemptEnd::Cancelled if handing_back => Disposition::Retry(
            AttemptOutcome::Failed {
                error: JobError::new(
                    ErrorKind::Infrastructure,
                    "the runner shut down before the job finished",
                ),
                retrying: true,
            },
            Duration::ZERO,
        ),
        AttemptEnd::Cancelled => Disposition::Drop(Some(AttemptOutcome::Cancelled)),
        AttemptEnd::Failed(error) if error.kind.is_retryable() && delivery < max_attempts => {
            let exponent = delivery.saturating_sub(1).min(10);
            let delay = backoff.saturating_mul(1 << exponent);
            // Jitter spreads retries of a burst of failures.
            let jitter = rand::random_range(0.5..1.5);
            Disposition::Retry(
                AttemptOutcome::Failed {
                    error,
                    retrying: true,
                },
                delay.mul_f64(jitter),
            )
        }
        AttemptEnd::Failed(error) if error.kind.is_retryable() => {
            Disposition::Exhausted(AttemptOutcome::Failed {
                error,
                retrying: false,
            })
        }
        AttemptEnd::Failed(error) => Disposition::Drop(Some(AttemptOutcome::Failed {
            error,
            retrying: false,
        })),
    }
}

#[derive(Clone, Debug)]
pub struct Worker {
    pub executor: Executor,
    pub js: async_nats::jetstream::Context,
    pub jobs: JobStore,
    pub names: Names,
    pub pool: PoolName,
    pub runner: RunnerId,
    pub held: HeldJobs,
    /// Load entries of the fleet (to see whether another runner is free).
    pub runners: async_nats::jetstream::kv::Store,
    /// No pulling before this instant: set after a retryable failure here
    /// while another runner of the pool has a free slot, so the retry goes
    /// to that runner.
    pub pause_until: Arc<Mutex<Option<tokio::time::Instant>>>,
    /// What this runner can run (node types, models, labels).
    pub offer: Arc<comfyq_shared::capability::Offer>,
    pub config: Arc<RunnerConfig>,
}

impl Worker {
    /// Pulls work until `shutdown`; then lets held jobs finish until
    /// `hand_back` fires, when the rest are handed back for redelivery.
    pub async fn run(
        self,
        mut pull: DispatchPull,
        shutdown: CancellationToken,
        hand_back: CancellationToken,
    ) {
        let slots = Arc::new(Semaphore::new(self.config.slots));
        let tasks = TaskTracker::new();
        'pulling: loop {
            // A pull request waits only while a slot is free.
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            loop {
                // No pulling while a managed ComfyUI restarts (the job
                // would only fail or wait on it), nor while stepping aside.
                tokio::select! {
                    _ = shutdown.cancelled() => break 'pulling,
                    _ = self.executor.health.ready() => {}
                }
                if let Some(until) = self.paused_until() {
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'pulling,
                        _ = tokio::time::sleep_until(until) => continue,
                    }
                }
                match pull.next(&shutdown, || self.can_take()).await {
                    Pulled::Message(message) => {
                        let worker = self.clone();
                        let hand_back = hand_back.clone();
                        tasks
                            .spawn(async move { worker.handle(*message, permit, hand_back).await });
                        break;
                    }
                    Pulled::Blocked => continue,
                    Pulled::Stopped => break 'pulling,
                }
            }
        }
        tasks.close();
        tracing::info!(
            held = self.held.len(),
            "runner stopped pulling; waiting for held jobs"
        );
        tasks.wait().await;
    }

    /// Until when this runner stands aside, if it does now.
    fn paused_until(&self) -> Option<tokio::time::Instant> {
        self.pause_until
            .lock()
            .ok()
            .and_then(|until| *until)
            .filter(|until| *until > tokio::time::Instant::now())
    }

    /// Whether a message arriving now can be taken (a slot is already held).
    fn can_take(&self) -> bool {
        self.executor.health.state().ready && self.paused_until().is_none()
    }

    /// Handles one dispatch message end to end (the unit tests drive).
    pub async fn handle(
        &self,
        message: Message,
        _slot: OwnedSemaphorePermit,
        hand_back: CancellationToken,
    ) {
        let dispatch: DispatchJob = match serde_json::from_slice(&message.payload) {
            Ok(dispatch) => dispatch,
            Err(error) => {
                tracing::error!(%error, "malformed dispatch message terminated");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        // Where "pulled" is observed (the runner overhead benchmark reads it).
        tracing::debug!(job_id = %dispatch.spec.id, "job pulled");
        let delivery = message
            .info()
            .map(|info| info.delivered as u32)
            .unwrap_or(1)
            .max(1);
        let attempt = dispatch.attempt_of_delivery(delivery);
        let span = tracing::info_span!("job", job_id = %dispatch.spec.id, attempt, tenant = %dispatch.spec.tenant);
        self.handle_dispatch(message, dispatch, delivery, attempt, hand_back)
            .instrument(span)
            .await;
    }

    async fn handle_dispatch(
        &self,
        message: Message,
        dispatch: DispatchJob,
        delivery: u32,
        attempt: u32,
        hand_back: CancellationToken,
    ) {
        let spec = &dispatch.spec;
        // The pool's consumer is shared by all its runners; the scheduler
        // only checked that *some* runner can run this. Hand it back for a
        // capable one (this costs one delivery of its budget).
        if let Some(missing) = self
            .offer
            .missing(&comfyq_shared::capability::Needs::of(spec))
        {
            tracing::info!(%missing, "this runner cannot run the job; handing it back");
            metrics::counter!("comfyq_runner_declined_total").increment(1);
            let delay = Duration::from_millis(200);
            // Stand aside so a capable runner pulls it next, not this one again.
            if let Ok(mut pause) = self.pause_until.lock() {
                *pause = Some(tokio::time::Instant::now() + delay + self.config.decline_pause);
            }
            let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            return;
        }
        // Held before the record is claimed: a cancellation applied after
        // the claim is then announced to a job already held here and stops
        // it, instead of falling between the claim and the insert and being
        // missed (the job would run to its end although cancelled).
        let cancel = CancellationToken::new();
        self.held.insert(spec.id, cancel.clone());
        let claimed = match self
            .claim_while_nats_recovers(&message, &dispatch, delivery, attempt)
            .await
        {
            Ok(Claim::Run(claimed)) => *claimed,
            Ok(Claim::Drop(why)) => {
                tracing::info!(why, "not running the job");
                self.held.remove(&spec.id);
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot claim the job in its record; handing it back");
                self.held.remove(&spec.id);
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                return;
            }
        };

        let heartbeat = tokio::spawn(heartbeat(
            message.clone(),
            self.config.nats.dispatch_ack_wait / 3,
        ));
        let watch = tokio::spawn(watch_cancel(
            self.jobs.clone(),
            spec.tenant.clone(),
            spec.id,
            self.config.nats.dispatch_ack_wait / 3,
            cancel.clone(),
        ));
        let started = std::time::Instant::now();
        // `running` is recorded as soon as ComfyUI has the prompt, while it
        // runs (not on the way to ComfyUI).
        let (submitted, prompt_submitted) = tokio::sync::oneshot::channel();
        let claimed_before = claimed.clone();
        let running = {
            let (worker, spec) = (self.clone(), spec.clone());
            tokio::spawn(async move {
                match prompt_submitted.await {
                    Ok(()) => worker.record_running(&spec, attempt, claimed).await,
                    Err(_) => None,
                }
            })
        };

        let stop = CancellationToken::new();
        let end = {
            let stop_on = stop.clone();
            let (cancel, hand_back) = (cancel.clone(), hand_back.clone());
            let relay = tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = hand_back.cancelled() => {}
                }
                stop_on.cancel();
            });
            let end = self
                .executor
                .execute(spec, attempt, &stop, Some(submitted))
                .await;
            relay.abort();
            end
        };
        // The outcome is written from the record `running` left, if written.
        let claimed = running.await.ok().flatten().unwrap_or(claimed_before);
        watch.abort();
        self.held.remove(&spec.id);
        let handing_back = matches!(end, AttemptEnd::Cancelled) && !cancel.is_cancelled();
        let max_attempts = self.config.nats.dispatch_max_deliver.max(1) as u32;
        let disposition = disposition(
            end,
            delivery,
            max_attempts,
            self.config.retry_backoff,
            handing_back,
        );
        let outcome_label = match &disposition {
            Disposition::Done(o)
            | Disposition::Retry(o, _)
            | Disposition::Drop(Some(o))
            | Disposition::Exhausted(o) => o.token(),
            Disposition::Drop(None) => "dropped",
        };
        metrics::counter!("comfyq_runner_attempts_total", "outcome" => outcome_label).increment(1);
        metrics::histogram!("comfyq_runner_attempt_duration_seconds", "outcome" => outcome_label)
            .record(started.elapsed().as_secs_f64());
        tracing::info!(
            outcome = outcome_label,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "attempt ended"
        );

        // Recorded before acknowledging: if this process dies in between,
        // the message is redelivered and the record, already ended, makes
        // the next runner drop it.
        let (settled, ack) = match disposition {
            Disposition::Done(outcome) => {
                let settled = self.record(spec, attempt, outcome, claimed).await;
                (settled, AckKind::Ack)
            }
            Disposition::Retry(outcome, delay) => {
                if let AttemptOutcome::Failed { error, .. } = &outcome {
                    metrics::counter!("comfyq_job_retries_total", "kind" => error_kind(error.kind))
                        .increment(1);
                }
                let settled = self.record(spec, attempt, outcome, claimed).await;
                if !handing_back {
                    self.step_aside(delay).await;
                }
                (settled, AckKind::Nak(Some(delay)))
            }
            Disposition::Drop(outcome) => {
                let settled = match outcome {
                    Some(outcome) => self.record(spec, attempt, outcome, claimed).await,
                    None => Settled::Ours,
                };
                (settled, AckKind::Term)
            }
            Disposition::Exhausted(outcome) => {
                let settled = self.record(spec, attempt, outcome, claimed).await;
                (settled, AckKind::Nak(None))
            }
        };
        heartbeat.abort();
        if settled == Settled::Superseded {
            tracing::info!("a later attempt holds the job: its dispatch message is left to it");
            return;
        }
        let acked = message.ack_with(ack).await;
        if let Err(error) = acked {
            tracing::warn!(%error, "acknowledgement failed; the job may be redelivered");
        }
    }

    /// After a retryable failure here, leaves the retry (due in `delay`) to
    /// another runner of the pool if one has a free slot: this runner stops
    /// pulling until that runner has had time to take it (its pull request
    /// waits at the server; `step_aside_pause` is the margin). Otherwise it
    /// may well take the retry itself.
    async fn step_aside(&self, delay: Duration) {
        if !self.another_runner_is_free().await {
            return;
        }
        let pause = delay + self.config.step_aside_pause;
        let until = tokio::time::Instant::now() + pause;
        tracing::info!(
            pause_ms = pause.as_millis() as u64,
            "another runner is free: leaving the retry to it"
        );
        if let Ok(mut pause) = self.pause_until.lock() {
            *pause = Some(until);
        }
    }

    async fn another_runner_is_free(&self) -> bool {
        let Ok(keys) = self.runners.keys().await else {
            return false;
        };
        let keys: Vec<String> = keys.filter_map(|k| async { k.ok() }).collect().await;
        let ttl =
            time::Duration::try_from(self.config.nats.runner_ttl).unwrap_or(time::Duration::ZERO);
        let now = OffsetDateTime::now_utc();
        for key in keys {
            if key == self.runner.as_str() {
                continue;
            }
            let Ok(Some(value)) = self.runners.get(&key).await else {
                continue;
            };
            let Ok(other) = serde_json::from_slice::<RunnerLoad>(&value) else {
                continue;
            };
            if other.pool == self.pool && other.has_free_slot() && now - other.updated_at < ttl {
                return true;
            }
        }
        false
    }

    /// Claims attempt `attempt` in the job's record, one compare-and-set
    /// write from the record as read: `dispatched` on this runner (a dispatch
    /// message's first delivery), or `running` on this runner (a later
    /// delivery: the previous holder failed or died). Whoever loses a race
    /// for the same attempt finds it held by another runner and drops it.
    /// [`Self::claim`], retried while NATS cannot answer (a cluster electing
    /// leaders, a server restarting) for up to `dispatch_ack_wait`, the
    /// message kept with progress acks: handing it back at once would spend a
    /// delivery of its budget per failed try, and a fault of a few seconds
    /// would then exhaust it. The claim is idempotent (a retry after a lost
    /// acknowledgement finds the attempt already ours).
    async fn claim_while_nats_recovers(
        &self,
        message: &Message,
        dispatch: &DispatchJob,
        delivery: u32,
        attempt: u32,
    ) -> Result<Claim, JobStoreError> {
        let give_up = tokio::time::Instant::now() + self.config.nats.dispatch_ack_wait;
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.claim(dispatch, delivery, attempt).await {
                Err(error @ JobStoreError::Nats(_))
                    if tokio::time::Instant::now() + backoff < give_up =>
                {
                    tracing::warn!(%error, "cannot claim the job in its record yet; retrying");
                    let _ = message.ack_with(AckKind::Progress).await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                result => return result,
            }
        }
    }

    async fn claim(
        &self,
        dispatch: &DispatchJob,
        delivery: u32,
        attempt: u32,
    ) -> Result<Claim, JobStoreError> {
        let spec = &dispatch.spec;
        let first_delivery = delivery <= 1 && attempt == dispatch.attempt.max(1);
        let started = RunnerReport {
            v: SCHEMA_VERSION,
            tenant: spec.tenant.clone(),
            job_id: spec.id,
            attempt,
            runner: self.runner.clone(),
            at: OffsetDateTime::now_utc(),
            outcome: AttemptOutcome::Started,
        };
        let dispatched_at = dispatch
            .dispatched_at
            .unwrap_or_else(OffsetDateTime::now_utc);
        // The dispatcher saw the record the job was queued with: a claim
        // from it needs no read (a stale one fails its compare-and-set).
        let mut known = match (&dispatch.queued, dispatch.queued_revision) {
            (Some(record), Some(revision)) if first_delivery => Some(Versioned {
                record: (**record).clone(),
                revision,
            }),
            _ => None,
        };
        loop {
            let fresh = known.is_none();
            let read = match known.take() {
                Some(known) => Some(known),
                None => self.jobs.get(&spec.tenant, &spec.id).await?,
            };
            let Some(current) = read else {
                // Ingress died between the pending message and the record,
                // or (on a cluster) the node that answered is behind: the
                // record is written now (a rare, atomic batch) as a create,
                // which the stream leader refuses if the record exists; a
                // redelivery is dropped for a missing record only once the
                // job is older than records live (expired).
                let age = OffsetDateTime::now_utc() - spec.created_at;
                if !first_delivery && age.unsigned_abs() > self.config.nats.jobs_max_age {
                    return Ok(Claim::Drop("the job has no record (expired)"));
                }
                let mut records = vec![JobRecord::accepted(spec)];
                for input in [Input::Queue, Input::Dispatch { attempt }] {
                    let next = records
                        .last()
                        .map(|last| machine::next(last, &input, dispatched_at));
                    if let Some(Transition::Apply(next)) = next {
                        records.push(*next);
                    }
                }
                if let Some(dispatched) = records.last_mut() {
                    dispatched.runner = Some(self.runner.clone());
                }
                match self.jobs.commit(&records, 0).await {
                    Ok(written) => {
                        tracing::warn!("the job had no record: written from its dispatch");
                        let record = records.pop().unwrap_or_else(|| JobRecord::accepted(spec));
                        return Ok(Claim::Run(Box::new(Versioned {
                            record,
                            revision: written.revision(),
                        })));
                    }
                    Err(JobStoreError::Conflict(_)) => {
                        // The record exists; a replica still behind would
                        // answer "none" again at once.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(error) => return Err(error),
                }
            };
            let record = &current.record;
            if !fresh && (record.status.is_terminal() || record.cancel_requested) {
                continue;
            }
            if record.status.is_terminal() {
                // Its end is recorded; make sure its webhook item is too (the
                // writer may have died in between; a repeat is a no-op).
                self.jobs.hook(record, current.revision).await?;
                return Ok(Claim::Drop("the job already ended"));
            }
            if record.cancel_requested {
                let cancelled = RunnerReport {
                    outcome: AttemptOutcome::Cancelled,
                    ..started.clone()
                };
                self.jobs
                    .apply(
                        &spec.tenant,
                        &spec.id,
                        &Input::Report(&cancelled),
                        Some(current),
                    )
                    .await?;
                return Ok(Claim::Drop("the job was cancelled before it ran"));
            }
            let transition = if first_delivery {
                machine::next(record, &Input::Dispatch { attempt }, dispatched_at)
            } else {
                machine::next(record, &Input::Report(&started), OffsetDateTime::now_utc())
            };
            match transition {
                Transition::Apply(mut claimed) => {
                    claimed.runner = Some(self.runner.clone());
                    match self.jobs.advance(&current, &claimed).await {
                        Ok(revision) => {
                            return Ok(Claim::Run(Box::new(Versioned {
                                record: *claimed,
                                revision,
                            })));
                        }
                        Err(JobStoreError::Conflict(_)) => continue,
                        Err(error) => return Err(error),
                    }
                }
                _ if !fresh => continue,
                // Ours already (a claim whose acknowledgement was lost)?
                Transition::AlreadyApplied
                    if matches!(record.status, JobStatus::Dispatched | JobStatus::Running)
                        && record.attempt == attempt
                        && record.runner.as_ref() == Some(&self.runner) =>
                {
                    return Ok(Claim::Run(Box::new(current)));
                }
                Transition::AlreadyApplied => {
                    return Ok(Claim::Drop("another runner holds this attempt"));
                }
                Transition::Ignore(why) => return Ok(Claim::Drop(why)),
            }
        }
    }

    /// Records `running` once ComfyUI accepted the prompt (from the claim,
    /// while the prompt runs); the record as it then stands.
    async fn record_running(
        &self,
        spec: &comfyq_shared::job::JobSpec,
        attempt: u32,
        claimed: Versioned,
    ) -> Option<Versioned> {
        if claimed.record.status == JobStatus::Running {
            return Some(claimed);
        }
        let report = RunnerReport {
            v: SCHEMA_VERSION,
            tenant: spec.tenant.clone(),
            job_id: spec.id,
            attempt,
            runner: self.runner.clone(),
            at: OffsetDateTime::now_utc(),
            outcome: AttemptOutcome::Started,
        };
        match self
            .jobs
            .apply(
                &spec.tenant,
                &spec.id,
                &Input::Report(&report),
                Some(claimed),
            )
            .await
        {
            Ok(Applied::Changed(current) | Applied::Already(current)) => Some(current),
            Ok(Applied::Ignored(current, why)) => {
                tracing::debug!(why, "running not recorded");
                Some(current)
            }
            Ok(Applied::Missing) => None,
            Err(error) => {
                tracing::warn!(%error, "running not recorded");
                None
            }
        }
    }

    /// Writes what became of the attempt to the job's record, starting from
    /// the record this runner wrote when it claimed it; retries while NATS
    /// is unreachable.
    async fn record(
        &self,
        spec: &comfyq_shared::job::JobSpec,
        attempt: u32,
        outcome: AttemptOutcome,
        claimed: Versioned,
    ) -> Settled {
        let report = RunnerReport {
            v: SCHEMA_VERSION,
            tenant: spec.tenant.clone(),
            job_id: spec.id,
            attempt,
            runner: self.runner.clone(),
            at: OffsetDateTime::now_utc(),
            outcome,
        };
        let mut known = Some(claimed);
        let mut delay = Duration::from_millis(100);
        for _ in 0..20 {
            match self
                .jobs
                .apply(
                    &spec.tenant,
                    &spec.id,
                    &Input::Report(&report),
                    known.take(),
                )
                .await
            {
                Ok(Applied::Changed(_)) => return Settled::Ours,
                // Written before (its ack or its webhook item was lost).
                Ok(Applied::Already(current)) => {
                    if let Err(error) = self.jobs.hook(&current.record, current.revision).await {
                        tracing::warn!(%error, "webhook work item not published");
                    }
                    return Settled::Ours;
                }
                Ok(Applied::Ignored(current, why)) => {
                    tracing::info!(why, status = %current.record.status, outcome = report.outcome.token(), "outcome not recorded");
                    // A later attempt holds the job (this runner was cut off
                    // past `dispatch_ack_wait` and it was redelivered): the
                    // message is that attempt's now, and an ack from here
                    // would take it out of the work queue under it.
                    if !current.record.status.is_terminal() && current.record.attempt > attempt {
                        return Settled::Superseded;
                    }
                    return Settled::Ours;
                }
                Ok(Applied::Missing) => {
                    tracing::warn!("the job's record is gone; outcome not recorded");
                    return Settled::Ours;
                }
                Err(error) => {
                    tracing::warn!(%error, outcome = report.outcome.token(), "outcome not recorded yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        tracing::error!(
            outcome = report.outcome.token(),
            "outcome could not be recorded"
        );
        Settled::Ours
    }
}

fn error_kind(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Validation => "validation",
        ErrorKind::Execution => "execution",
        ErrorKind::OutOfMemory => "out_of_memory",
        ErrorKind::Infrastructure => "infrastructure",
        ErrorKind::Timeout => "timeout",
        ErrorKind::AttemptsExhausted => "attempts_exhausted",
        ErrorKind::Rejected => "rejected",
        ErrorKind::Internal => "internal",
    }
}

/// Re-reads a held job's record while it runs and cancels it once the
/// record asks for that. The scheduler's cancel nudge (core NATS, not stored)
/// is only the fast path: a runner that missed it, reconnecting for instance,
/// would otherwise run a cancelled job to its end.
async fn watch_cancel(
    jobs: JobStore,
    tenant: comfyq_shared::ids::TenantId,
    job: JobId,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut interval = tokio::time::interval(every.max(Duration::from_millis(100)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        match jobs.get(&tenant, &job).await {
            Ok(Some(current)) if current.record.cancel_requested => {
                if !cancel.is_cancelled() {
                    tracing::info!("cancel found in the job record; stopping the prompt");
                    cancel.cancel();
                }
                return;
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "cannot re-read the job record"),
        }
    }
}

/// Keeps a held message from being redelivered while its job runs.
async fn heartbeat(message: Message, every: Duration) {
    let mut interval = tokio::time::interval(every.max(Duration::from_millis(100)));
    interval.tick().await;
    loop {
        interval.tick().await;
        if let Err(error) = message.ack_with(AckKind::Progress).await {
            tracing::debug!(%error, "in-progress ack failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_end_maps_to_one_ack() {
        let backoff = Duration::from_secs(1);
        let done = disposition(AttemptEnd::Completed(vec![]), 1, 3, backoff, false);
        assert!(matches!(
            done,
            Disposition::Done(AttemptOutcome::Completed { .. })
        ));

        let infra = || AttemptEnd::Failed(JobError::new(ErrorKind::Infrastructure, "x"));
        assert!(matches!(
            disposition(infra(), 1, 3, backoff, false),
            Disposition::Retry(..)
        ));
        // The last attempt is not retried: it becomes a dead letter.
        assert!(matches!(
            disposition(infra(), 3, 3, backoff, false),
            Disposition::Exhausted(AttemptOutcome::Failed {
                retrying: false,
                ..
            })
        ));
        let user = AttemptEnd::Failed(JobError::new(ErrorKind::Execution, "x"));
        assert!(matches!(
            disposition(user, 1, 3, backoff, false),
            Disposition::Drop(Some(AttemptOutcome::Failed {
                retrying: false,
                ..
            }))
        ));
        assert_eq!(
            disposition(AttemptEnd::Cancelled, 1, 3, backoff, false),
            Disposition::Drop(Some(AttemptOutcome::Cancelled))
        );
        assert!(matches!(
            disposition(AttemptEnd::Cancelled, 1, 3, backoff, true),
            Disposition::Retry(AttemptOutcome::Failed { retrying: true, .. }, _)
        ));
    }

    const KINDS: [ErrorKind; 8] = [
        ErrorKind::Validation,
        ErrorKind::Execution,
        ErrorKind::OutOfMemory,
        ErrorKind::Infrastructure,
        ErrorKind::Timeout,
        ErrorKind::AttemptsExhausted,
        ErrorKind::Rejected,
        ErrorKind::Internal,
    ];

    proptest::proptest! {
        /// Retryable failures with deliveries left come back after
        /// `backoff · 2^(delivery-1)` (exponent capped at 10) times a jitter
        /// of 0.5–1.5; the last one is exhausted; user errors never retry.
        #[test]
        fn failures_retry_with_jittered_exponential_backoff_or_never(
            kind in 0..KINDS.len(),
            delivery in 1u32..20,
            max_attempts in 1u32..20,
            backoff_ms in 1u64..60_000,
        ) {
            let kind = KINDS[kind];
            let backoff = Duration::from_millis(backoff_ms);
            let end = AttemptEnd::Failed(JobError::new(kind, "x"));
            match disposition(end, delivery, max_attempts, backoff, false) {
                Disposition::Retry(AttemptOutcome::Failed { retrying: true, .. }, delay) => {
                    proptest::prop_assert!(kind.is_retryable() && delivery < max_attempts);
                    let base = backoff.as_secs_f64() * f64::from(1u32 << (delivery - 1).min(10));
                    let ratio = delay.as_secs_f64() / base;
                    proptest::prop_assert!((0.5 - 1e-9..=1.5 + 1e-9).contains(&ratio), "ratio {ratio}");
                }
                Disposition::Exhausted(AttemptOutcome::Failed { retrying: false, .. }) => {
                    proptest::prop_assert!(kind.is_retryable() && delivery >= max_attempts);
                }
                Disposition::Drop(Some(AttemptOutcome::Failed { retrying: false, error })) => {
                    proptest::prop_assert!(!kind.is_retryable());
                    proptest::prop_assert_eq!(error.kind, kind);
                }
                other => proptest::prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }

    #[test]
    fn backoff_grows_with_attempts() {
        let delay = |attempt| match disposition(
            AttemptEnd::Failed(JobError::new(ErrorKind::OutOfMemory, "x")),
            attempt,
            10,
            Duration::from_secs(1),
            false,
        ) {
            Disposition::Retry(_, delay) => delay,
            other => panic!("{other:?}"),
        };
        assert!(delay(1) <= Duration::from_millis(1500));
        assert!(delay(4) >= Duration::from_secs(4));
    }
}
