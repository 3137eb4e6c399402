//! The scheduler's command handlers: cancellations, exhausted deliveries
//! (dead letters) and operators' requeues, each turned into a state change
//! of the job's record (compare-and-set, [`JobStore::apply`]). Submissions
//! and runners' reports do not come here: ingress and runners write the
//! record themselves.

use std::time::Duration;

use async_nats::jetstream::{self, Message};
use comfyq_shared::consume::{Outcome, acknowledge};
use comfyq_shared::dead_letter::DeadLetter;
use comfyq_shared::job::{ErrorKind, JobRecord, JobStatus, SCHEMA_VERSION};
use comfyq_shared::job_store::{Applied, JobStore, JobStoreError};
use comfyq_shared::machine::{self, Input, Transition};
use comfyq_shared::messages::{CancelJob, DispatchJob, RetryJob, SubmitJob};
use comfyq_shared::names::Names;
use comfyq_shared::{JobId, TenantId};
use serde::Deserialize;
use time::OffsetDateTime;
use tracing::Instrument;

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
    /// Jobs whose attempts ran out, with their specs (`comfyq_dead_letters`).
    pub(crate) dead_letters: jetstream::kv::Store,
    pub(crate) config: std::sync::Arc<crate::SchedulerConfig>,
}

impl Scheduler {
    /// Applies `input` to the job's record (reading it first); returns the
    /// record as it now stands, if the job exists. A change that leaves a
    /// cancel to carry out tells the runner holding the job, and the
    /// dispatcher holding it back.
    pub async fn transition(
        &self,
        tenant: &TenantId,
        job: &JobId,
        input: Input<'_>,
    ) -> Result<Option<JobRecord>, HandleError> {
        let applied = self.jobs.apply(tenant, job, &input, None).await?;
        match &applied {
            Applied::Changed(current) => self.nudge(&current.record).await?,
            // A redelivered command: the write is there, its webhook item
            // may not be (a repeat is deduplicated).
            Applied::Already(current) => self.jobs.hook(&current.record, current.revision).await?,
            Applied::Ignored(..) | Applied::Missing => {}
        }
        Ok(applied.current().map(|v| v.record.clone()))
    }

    async fn nudge(&self, record: &JobRecord) -> Result<(), HandleError> {
        if record.cancel_requested
            && matches!(record.status, JobStatus::Running | JobStatus::Cancelled)
        {
            // Tell whichever runner holds it (or the dispatcher, if it still
            // waits); the record stays the truth if nobody hears this (the
            // runner checks it while running, and before running).
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

    /// Starts publishing a held job to its pool's runners, its next
    /// delivery being attempt `attempt` (1, or more after a requeue). The
    /// message id makes a second publish by another scheduler a no-op.
    /// Publishes queue on the connection in call order, so a batch started
    /// in pick order reaches DISPATCH in that order; await the returned ack.
    pub(crate) async fn start_dispatch(
        &self,
        submit: SubmitJob,
        queued: Option<(u64, Box<JobRecord>)>,
    ) -> Result<jetstream::context::PublishAckFuture, HandleError> {
        let (queued_revision, queued) = queued.unzip();
        let dispatch = DispatchJob {
            v: SCHEMA_VERSION,
            attempt: submit.attempt,
            spec: submit.spec,
            queued_revision,
            queued,
            dispatched_at: Some(OffsetDateTime::now_utc()),
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
        self.js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| HandleError::Nats(e.into()))
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
            // Malformed: nothing to fail, and it must leave the work queue.
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
        // No record: on a cluster the node that answered may be behind.
        // Deleting the message now would leave the job unended for good;
        // only a job older than records live has truly none (expired).
        let age = time::OffsetDateTime::now_utc() - dispatch.spec.created_at;
        if record.is_none() && age.unsigned_abs() <= self.config.nats.jobs_max_age {
            return Err(HandleError::Nats(
                "the exhausted job's record is not readable yet".into(),
            ));
        }
        // Failed now, or already by the runner's own write of its last
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
        let input = Input::Requeue {
            from: retry.requeues,
        };
        // Its pending message first (named by the requeue, so a retried
        // request stores it once): a requeued job is never left queued with
        // nothing to dispatch it. A pending message whose requeue then does
        // not apply is dropped by the runner that pulls it.
        let requeued = loop {
            let Some(current) = self.jobs.get(&retry.tenant, &retry.job_id).await? else {
                return Ok(());
            };
            match machine::next(&current.record, &input, OffsetDateTime::now_utc()) {
                Transition::Apply(new) => {
                    let pending = SubmitJob {
                        v: SCHEMA_VERSION,
                        spec: letter.spec.clone(),
                        attempt: new.attempt + 1,
                        requeued_at: Some(OffsetDateTime::now_utc()),
                    };
                    self.jobs
                        .publish_pending(&pending, &format!("{}:r{}", retry.job_id, new.requeues))
                        .await?;
                    match self.jobs.update(&new, current.revision).await {
                        Ok(_) => {
                            metrics::counter!("comfyq_scheduler_requeues_total").increment(1);
                            break *new;
                        }
                        Err(JobStoreError::Conflict(_)) => continue,
                        Err(error) => return Err(error.into()),
                    }
                }
                Transition::AlreadyApplied | Transition::Ignore(_) => break current.record,
            }
        };
        if requeued.requeues > retry.requeues {
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

fn parse<T: for<'de> Deserialize<'de>>(message: &Message) -> Option<T> {
    match serde_json::from_slice::<T>(&message.payload) {
        Ok(value) => Some(value),
        Err(error) => {
            tracing::error!(subject = %message.subject, %error, "malformed message rejected");
            None
        }
    }
}
