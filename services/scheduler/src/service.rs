//! The scheduler's message handlers: submissions, runner reports,
//! cancellations, exhausted deliveries (dead letters) and operators'
//! requeues, each turned into a state transition written with
//! compare-and-set and announced as an event.

use std::time::Duration;

use async_nats::jetstream::{self, Message};
use comfyq_shared::consume::{Outcome, acknowledge};
use comfyq_shared::dead_letter::DeadLetter;
use comfyq_shared::event::Event;
use comfyq_shared::job::{ErrorKind, JobRecord, JobSpec, JobStatus, SCHEMA_VERSION};
use comfyq_shared::job_store::{JobStore, JobStoreError, Versioned};
use comfyq_shared::messages::{
    AttemptOutcome, CancelJob, DispatchJob, RetryJob, RunnerReport, SubmitJob,
};
use comfyq_shared::names::Names;
use comfyq_shared::publisher::EventPublisher;
use comfyq_shared::{JobId, TenantId};
use futures::StreamExt;
use serde::Deserialize;
use time::OffsetDateTime;
use tracing::Instrument;

use crate::machine::{self, Input, Transition};

/// Retry delay after a transient NATS failure while handling a message.
const TRANSIENT_RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error(transparent)]
    Store(#[from] JobStoreError),
    #[error("NATS: {0}")]
    Nats(#[from] async_nats::Error),
}

/// Everything a handler needs; cheap to clone.
#[derive(Clone, Debug)]
pub struct Scheduler {
    pub(crate) js: jetstream::Context,
    pub(crate) client: async_nats::Client,
    pub(crate) names: Names,
    pub(crate) jobs: JobStore,
    pub(crate) events: EventPublisher,
    /// Jobs whose attempts ran out, with their specs (`comfyq_dead_letters`).
    pub(crate) dead_letters: jetstream::kv::Store,
    pub(crate) config: std::sync::Arc<crate::SchedulerConfig>,
    /// The records this scheduler wrote last (a read saved per input).
    pub(crate) recent: std::sync::Arc<crate::recent::RecentRecords>,
}

/// What applying an input left.
enum Applied {
    /// The record changed (or the change was already stored): its event is due.
    Changed(JobRecord),
    /// The input did not apply.
    Unchanged(JobRecord),
}

impl Scheduler {
    /// Applies `input` to the job's record until the write wins or the
    /// input no longer applies; publishes the resulting state's event.
    /// Returns the record as it now stands.
    pub async fn transition(
        &self,
        tenant: &TenantId,
        job: &JobId,
        input: Input<'_>,
    ) -> Result<Option<JobRecord>, HandleError> {
        let recent = self.recent.get(job);
        self.transition_from(tenant, job, input, recent).await
    }

    /// [`Self::transition`] starting from a record the caller has just read
    /// (saving a read); a stale one only costs a CAS conflict and a re-read.
    pub(crate) async fn transition_from(
        &self,
        tenant: &TenantId,
        job: &JobId,
        input: Input<'_>,
        known: Option<Versioned>,
    ) -> Result<Option<JobRecord>, HandleError> {
        match self.apply_from(tenant, job, input, known).await? {
            Some(Applied::Changed(record)) => {
                self.announce(&record).await?;
                Ok(Some(record))
            }
            Some(Applied::Unchanged(record)) => Ok(Some(record)),
            None => Ok(None),
        }
    }

    /// The write of [`Self::transition_from`] without its event, which the
    /// caller publishes ([`Self::announce`]), e.g. alongside its next write.
    async fn apply_from(
        &self,
        tenant: &TenantId,
        job: &JobId,
        input: Input<'_>,
        mut known: Option<Versioned>,
    ) -> Result<Option<Applied>, HandleError> {
        loop {
            // A record handed in may be stale: a write from it is checked
            // by its compare-and-set, but a decision not to write is only
            // taken from a fresh read.
            let (current, fresh) = match known.take() {
                Some(current) => (current, false),
                None => match self.jobs.get(tenant, job).await? {
                    Some(current) => (current, true),
                    None => {
                        tracing::warn!(%job, "no record for job; input dropped");
                        return Ok(None);
                    }
                },
            };
            match machine::next(&current.record, &input, OffsetDateTime::now_utc()) {
                Transition::Apply(new) => match self.jobs.update(&new, current.revision).await {
                    Ok(revision) => {
                        metrics::counter!("comfyq_scheduler_transitions_total", "status" => new.status.as_str())
                            .increment(1);
                        self.recent.remember(Versioned {
                            record: (*new).clone(),
                            revision,
                        });
                        return Ok(Some(Applied::Changed(*new)));
                    }
                    Err(JobStoreError::Conflict(_)) => {
                        self.recent.forget(job);
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                },
                _ if !fresh => self.recent.forget(job),
                // A crash may have come between the write and the event:
                // publish again (deduplicated by the event's derived id).
                Transition::AlreadyApplied => return Ok(Some(Applied::Changed(current.record))),
                Transition::Ignore(reason) => {
                    tracing::debug!(%job, reason, "input ignored");
                    return Ok(Some(Applied::Unchanged(current.record)));
                }
            }
        }
    }

    async fn announce(&self, record: &JobRecord) -> Result<(), HandleError> {
        self.events
            .publish(&Event::for_state(record))
            .await
            .map_err(|e| HandleError::Nats(e.into()))?;
        if record.cancel_requested
            && matches!(record.status, JobStatus::Running | JobStatus::Cancelled)
        {
            // Tell whichever runner holds it; the record stays the truth if
            // nobody hears this (the runner checks it while running).
            self.client
                .publish(
                    self.names.runner_cancel_subject(&record.id),
                    Default::default(),
                )
                .await
                .map_err(|e| HandleError::Nats(e.into()))?;
        }
        Ok(())
    }

    pub async fn on_submit(&self, message: Message) {
        let outcome = match parse::<SubmitJob>(&message) {
            Some(submit) => {
                let span = tracing::info_span!("submit", job_id = %submit.spec.id, tenant = %submit.spec.tenant);
                self.handle_submit(submit).instrument(span).await
            }
            None => Outcome::Reject,
        };
        acknowledge(&message, outcome).await;
    }

    async fn handle_submit(&self, submit: SubmitJob) -> Outcome {
        match self.submit(submit).await {
            Ok(()) => Outcome::Ack,
            Err(error) => {
                tracing::warn!(error = %error, "submission not handled yet; will retry");
                Outcome::Retry(Some(TRANSIENT_RETRY))
            }
        }
    }

    async fn submit(&self, submit: SubmitJob) -> Result<(), HandleError> {
        let spec = &submit.spec;
        // Ingress normally creates the record; create it here if it could not.
        let (before, mut known) = match self.jobs.get(&spec.tenant, &spec.id).await? {
            Some(current) => (current.record.clone(), Some(current)),
            None => {
                let record = JobRecord::accepted(spec);
                let known = match self.jobs.create(&record).await {
                    Ok(revision) => {
                        self.announce(&record).await?;
                        Some(Versioned {
                            record: record.clone(),
                            revision,
                        })
                    }
                    Err(JobStoreError::Conflict(_)) => None,
                    Err(e) => return Err(e.into()),
                };
                (record, known)
            }
        };
        if before.status == JobStatus::Accepted
            && let Some(limit) = self.config.limits(&spec.tenant).max_queued
        {
            let queued = self.tenant_pending(&spec.tenant).await?;
            if queued >= limit {
                metrics::counter!("comfyq_scheduler_rejected_total", "reason" => "max_queued")
                    .increment(1);
                self.transition_from(
                    &spec.tenant,
                    &spec.id,
                    Input::FailQueued {
                        kind: ErrorKind::Rejected,
                        message: format!(
                            "tenant {} already has {queued} jobs queued (limit {limit})",
                            spec.tenant
                        ),
                    },
                    known,
                )
                .await?;
                return Ok(());
            }
        }
        // The record just read (the usual case: ingress created it) saves
        // the transition a second read.
        let (record, changed) = match self
            .apply_from(&spec.tenant, &spec.id, Input::Queue, known.take())
            .await?
        {
            Some(Applied::Changed(record)) => (record, true),
            Some(Applied::Unchanged(record)) => (record, false),
            None => return Ok(()),
        };
        if record.status != JobStatus::Queued {
            if changed {
                self.announce(&record).await?;
            }
            return Ok(());
        }
        // Held back until the dispatcher gives it a slot. A redelivered
        // submission republishes it; the job id deduplicates that, and the
        // dispatcher skips a pending job whose record has moved on. The
        // `queued` event goes out at the same time: neither waits for the
        // other's acknowledgement.
        let hold = self.hold(&submit, spec.id.to_string());
        if changed {
            tokio::try_join!(self.announce(&record), hold)?;
            Ok(())
        } else {
            hold.await
        }
    }

    /// Puts a queued job in PENDING for the dispatcher (`message_id`
    /// deduplicates a republish).
    async fn hold(&self, submit: &SubmitJob, message_id: String) -> Result<(), HandleError> {
        let spec = &submit.spec;
        let subject = self
            .names
            .pending_subject(&spec.pool, spec.priority, &spec.tenant);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id.as_str());
        let payload = serde_json::to_vec(submit).map_err(|e| HandleError::Nats(e.into()))?;
        self.js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| HandleError::Nats(e.into()))?
            .await
            .map_err(|e| HandleError::Nats(e.into()))?;
        Ok(())
    }

    /// Jobs of `tenant` held in the pending stream, in any pool.
    async fn tenant_pending(&self, tenant: &TenantId) -> Result<usize, HandleError> {
        let stream = self
            .js
            .get_stream(self.names.pending_stream())
            .await
            .map_err(|e| HandleError::Nats(e.into()))?;
        let mut subjects = stream
            .info_with_subjects(self.names.tenant_pending_filter(tenant))
            .await
            .map_err(|e| HandleError::Nats(e.into()))?;
        let mut total = 0;
        while let Some(item) = subjects.next().await {
            let (_, count) = item.map_err(|e| HandleError::Nats(e.into()))?;
            total += count;
        }
        Ok(total)
    }

    /// Starts publishing a held job to its pool's runners, its next
    /// delivery being attempt `attempt` (1, or more after a requeue). The
    /// message id makes a second publish by another scheduler a no-op.
    /// Publishes queue on the connection in call order, so a batch started
    /// in pick order reaches DISPATCH in that order; await the returned ack,
    /// then [`Self::dispatched`].
    pub(crate) async fn start_dispatch(
        &self,
        spec: JobSpec,
        attempt: u32,
    ) -> Result<(DispatchJob, jetstream::context::PublishAckFuture), HandleError> {
        let dispatch = DispatchJob {
            v: SCHEMA_VERSION,
            attempt,
            spec,
        };
        let subject = self.names.dispatch_subject(
            &dispatch.spec.pool,
            dispatch.spec.priority,
            &dispatch.spec.tenant,
        );
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            dispatch.message_id().as_str(),
        );
        let payload = serde_json::to_vec(&dispatch).map_err(|e| HandleError::Nats(e.into()))?;
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| HandleError::Nats(e.into()))?;
        Ok((dispatch, ack))
    }

    /// The dispatch message is stored (runners with a free slot have a pull
    /// request waiting, so the server hands it to one): record `dispatched`
    /// (CAS, from `known` if given), then its event.
    pub(crate) async fn dispatched(
        &self,
        dispatch: &DispatchJob,
        known: Option<Versioned>,
    ) -> Result<(), HandleError> {
        self.transition_from(
            &dispatch.spec.tenant,
            &dispatch.spec.id,
            Input::Dispatch {
                attempt: dispatch.attempt,
            },
            known,
        )
        .await?;
        let wait = (OffsetDateTime::now_utc() - dispatch.spec.created_at)
            .as_seconds_f64()
            .max(0.0);
        metrics::histogram!("comfyq_scheduler_dispatch_latency_seconds", "priority" => dispatch.spec.priority.as_str())
            .record(wait);
        Ok(())
    }

    pub async fn on_report(&self, message: Message) {
        let outcome = match parse::<RunnerReport>(&message) {
            Some(report) => {
                let span = tracing::info_span!(
                    "report",
                    job_id = %report.job_id,
                    attempt = report.attempt,
                    outcome = report.outcome.token()
                );
                match self
                    .transition(&report.tenant, &report.job_id, Input::Report(&report))
                    .instrument(span)
                    .await
                {
                    Ok(_) => {
                        if let AttemptOutcome::Failed {
                            retrying: true,
                            error,
                        } = &report.outcome
                        {
                            metrics::counter!("comfyq_scheduler_retries_total", "kind" => error_kind(error.kind))
                                .increment(1);
                        }
                        Outcome::Ack
                    }
                    Err(error) => {
                        tracing::warn!(%error, "report not applied yet; will retry");
                        Outcome::Retry(Some(TRANSIENT_RETRY))
                    }
                }
            }
            None => Outcome::Reject,
        };
        acknowledge(&message, outcome).await;
    }

    pub async fn on_cancel(&self, message: Message) {
        let outcome = match parse::<CancelJob>(&message) {
            Some(cancel) => {
                let span = tracing::info_span!("cancel", job_id = %cancel.job_id);
                match self
                    .transition(&cancel.tenant, &cancel.job_id, Input::Cancel)
                    .instrument(span)
                    .await
                {
                    Ok(_) => Outcome::Ack,
                    Err(error) => {
                        tracing::warn!(%error, "cancel not applied yet; will retry");
                        Outcome::Retry(Some(TRANSIENT_RETRY))
                    }
                }
            }
            None => Outcome::Reject,
        };
        acknowledge(&message, outcome).await;
    }

    /// A dispatch message was delivered `max_deliver` times without an ack:
    /// the job fails, and the message leaves the work queue. Advisories are
    /// captured in a stream, so one that fired while no scheduler ran is
    /// handled when one starts.
    pub async fn on_max_deliveries(&self, message: Message) {
        let outcome = match parse::<Advisory>(&message) {
            Some(advisory) => match self.exhausted(&advisory).await {
                Ok(()) => Outcome::Ack,
                Err(error) => {
                    tracing::warn!(%error, "could not fail an exhausted job yet");
                    Outcome::Retry(Some(TRANSIENT_RETRY))
                }
            },
            None => Outcome::Reject,
        };
        acknowledge(&message, outcome).await;
    }

    async fn exhausted(&self, advisory: &Advisory) -> Result<(), HandleError> {
        if advisory.stream != self.names.dispatch_stream() {
            return Ok(());
        }
        let stream = self
            .js
            .get_stream(&advisory.stream)
            .await
            .map_err(|e| HandleError::Nats(e.into()))?;
        let raw = match stream.get_raw_message(advisory.stream_seq).await {
            Ok(raw) => raw,
            // Already gone: acked or terminated by a runner meanwhile.
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                return Ok(());
            }
            Err(e) => return Err(HandleError::Nats(e.into())),
        };
        let Ok(dispatch) = serde_json::from_slice::<DispatchJob>(&raw.payload) else {
            tracing::warn!(seq = advisory.stream_seq, "unreadable dispatch message");
            let _ = stream.delete_message(advisory.stream_seq).await;
            return Ok(());
        };
        let attempt = dispatch.attempt_of_delivery(advisory.deliveries);
        let span = tracing::info_span!("exhausted", job_id = %dispatch.spec.id, attempt);
        let record = self
            .transition(
                &dispatch.spec.tenant,
                &dispatch.spec.id,
                Input::Exhausted { attempt },
            )
            .instrument(span)
            .await?;
        // Failed now, or already by the runner's report of its last
        // (retryable) attempt: keep the spec for an operator's requeue.
        if let Some(record) = record
            && record.status == JobStatus::Failed
            && record
                .error
                .as_ref()
                .is_none_or(|e| e.kind.is_retryable() || e.kind == ErrorKind::AttemptsExhausted)
        {
            let letter = DeadLetter {
                v: SCHEMA_VERSION,
                attempts: record.attempt,
                error: record.error.clone(),
                runner: record.runner.clone(),
                requeues: record.requeues,
                failed_at: record.finished_at.unwrap_or(record.updated_at),
                spec: dispatch.spec,
            };
            let payload = serde_json::to_vec(&letter).map_err(|e| HandleError::Nats(e.into()))?;
            self.dead_letters
                .put(
                    self.names.job_key(&record.tenant, &record.id),
                    payload.into(),
                )
                .await
                .map_err(|e| HandleError::Nats(e.into()))?;
            metrics::counter!("comfyq_scheduler_dead_letters_total").increment(1);
        }
        stream
            .delete_message(advisory.stream_seq)
            .await
            .map_err(|e| HandleError::Nats(e.into()))?;
        Ok(())
    }
}

impl Scheduler {
    /// An operator asked to requeue a dead-lettered job: back to `queued`
    /// with a fresh delivery budget, its spec from the dead letter.
    pub async fn on_retry(&self, message: Message) {
        let outcome = match parse::<RetryJob>(&message) {
            Some(retry) => {
                let span = tracing::info_span!("retry", job_id = %retry.job_id);
                match self.requeue(&retry).instrument(span).await {
                    Ok(()) => Outcome::Ack,
                    Err(error) => {
                        tracing::warn!(%error, "requeue not applied yet; will retry");
                        Outcome::Retry(Some(TRANSIENT_RETRY))
                    }
                }
            }
            None => Outcome::Reject,
        };
        acknowledge(&message, outcome).await;
    }

    async fn requeue(&self, retry: &RetryJob) -> Result<(), HandleError> {
        let key = self.names.job_key(&retry.tenant, &retry.job_id);
        let letter = match self
            .dead_letters
            .get(&key)
            .await
            .map_err(|e| HandleError::Nats(e.into()))?
        {
            Some(bytes) => match serde_json::from_slice::<DeadLetter>(&bytes) {
                Ok(letter) if letter.requeues == retry.requeues => letter,
                Ok(_) => {
                    tracing::info!("the dead letter is of another failure; nothing to requeue");
                    return Ok(());
                }
                Err(error) => {
                    tracing::error!(%error, "unreadable dead letter");
                    return Ok(());
                }
            },
            // Requeued already (a redelivered request), or never dead-lettered.
            None => return Ok(()),
        };
        let Some(record) = self
            .transition(
                &retry.tenant,
                &retry.job_id,
                Input::Requeue {
                    from: retry.requeues,
                },
            )
            .await?
        else {
            return Ok(());
        };
        if record.status == JobStatus::Queued && record.requeues == retry.requeues + 1 {
            let submit = SubmitJob {
                v: SCHEMA_VERSION,
                spec: letter.spec,
                requeued_at: Some(OffsetDateTime::now_utc()),
            };
            self.hold(&submit, format!("{}:r{}", retry.job_id, record.requeues))
                .await?;
            metrics::counter!("comfyq_scheduler_requeues_total").increment(1);
        }
        if record.requeues > retry.requeues {
            self.dead_letters
                .delete(&key)
                .await
                .map_err(|e| HandleError::Nats(e.into()))?;
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct Advisory {
    stream: String,
    stream_seq: u64,
    deliveries: u32,
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

fn parse<T: for<'de> Deserialize<'de>>(message: &Message) -> Option<T> {
    match serde_json::from_slice::<T>(&message.payload) {
        Ok(value) => Some(value),
        Err(error) => {
            tracing::error!(subject = %message.subject, %error, "malformed message rejected");
            None
        }
    }
}
