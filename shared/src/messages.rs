//! Messages between services: jobs waiting for a slot (pending, in the
//! events stream), dispatches to runners, commands on the JOBS stream. Each
//! carries the schema version so a mixed-version fleet can refuse what it
//! cannot read.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{JobId, RunnerId, TenantId};
use crate::job::{JobError, JobRecord, JobSpec, OutputFile};

/// A job waiting for a runner slot, on its pending subject: written by
/// ingress before the job's record (or by an operator's requeue, with it),
/// read and deleted by the dispatcher.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubmitJob {
    pub v: u32,
    pub spec: JobSpec,
    /// The attempt its dispatch starts at: 1, or more after a requeue
    /// (attempts keep counting).
    #[serde(default = "first_attempt")]
    pub attempt: u32,

    /// When an operator's requeue put the job back in line: its place in
    /// FIFO order and the start of its ageing, instead of `spec.created_at`
    /// (which would send a requeued job straight to the front).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub requeued_at: Option<OffsetDateTime>,
}

fn first_attempt() -> u32 {
    1
}

impl SubmitJob {
    /// Where the job stands in its queue: accepted, or requeued.
    pub fn queued_since(&self) -> OffsetDateTime {
        self.requeued_at.unwrap_or(self.spec.created_at)
    }
}

/// ingress → scheduler: stop a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CancelJob {
    pub v: u32,
    pub tenant: TenantId,
    pub job_id: JobId,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
}

/// ingress → scheduler: put a dead-lettered job back in the queue with a
/// fresh delivery budget (`Nats-Msg-Id` = `<job>:retry:<requeues>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetryJob {
    pub v: u32,
    pub tenant: TenantId,
    pub job_id: JobId,
    /// The record's `requeues` when the operator asked: a second request
    /// for the same failure is a no-op.
    pub requeues: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
}

impl RetryJob {
    pub fn message_id(&self) -> String {
        format!("{}:retry:{}", self.job_id, self.requeues)
    }
}

/// scheduler → runner: attempts of a job (`Nats-Msg-Id` = `<job>:<attempt>`).
/// Delivery `n` of the message is attempt `attempt + n - 1`: attempts keep
/// counting after an operator requeued the job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DispatchJob {
    pub v: u32,
    /// The attempt number of the message's first delivery.
    pub attempt: u32,
    pub spec: JobSpec,

    /// The revision of the job's `queued` state event as the dispatcher saw
    /// it, and that record: the runner claims the job from them without
    /// reading the record first (a stale one costs a failed
    /// compare-and-set and a read). `None`: read the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_revision: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<Box<JobRecord>>,
    /// When the dispatcher handed it to the pool (the `dispatched` event's time).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub dispatched_at: Option<OffsetDateTime>,
}

impl DispatchJob {
    pub fn message_id(&self) -> String {
        format!("{}:{}", self.spec.id, self.attempt)
    }

    /// The attempt number of delivery `delivered` (1-based) of this message.
    pub fn attempt_of_delivery(&self, delivered: u32) -> u32 {
        self.attempt.max(1) + delivered.max(1) - 1
    }
}

/// What a runner says became of an attempt: the input it applies to the
/// job's record itself ([`crate::machine::next`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunnerReport {
    pub v: u32,
    pub tenant: TenantId,
    pub job_id: JobId,
    pub attempt: u32,
    pub runner: RunnerId,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub outcome: AttemptOutcome,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// ComfyUI accepted the prompt and the runner follows it.
    Started,
    Completed {
        outputs: Vec<OutputFile>,
    },
    /// The attempt failed. `retrying` says whether the runner handed the job
    /// back for another attempt (a retryable error with attempts left).
    Failed {
        error: JobError,
        retrying: bool,
    },
    /// Stopped because a cancel was requested.
    Cancelled,
}

impl AttemptOutcome {
    pub fn token(&self) -> &'static str {
        match self {
            AttemptOutcome::Started => "started",
            AttemptOutcome::Completed { .. } => "completed",
            AttemptOutcome::Failed { .. } => "failed",
            AttemptOutcome::Cancelled => "cancelled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{PoolName, TenantId};
    use crate::priority::Priority;

    fn submit(requeued_at: Option<OffsetDateTime>) -> SubmitJob {
        SubmitJob {
            v: 1,
            spec: JobSpec {
                id: JobId::new(),
                tenant: TenantId::new("t").expect("valid"),
                priority: Priority::Normal,
                pool: PoolName::default(),
                workflow: Default::default(),
                inputs: vec![],
                webhook: None,
                metadata: None,
                inline_outputs: false,
                timeout_s: 60,
                runner_labels: Default::default(),
                every_progress_event: false,
                comfy: None,
                created_at: OffsetDateTime::UNIX_EPOCH,
            },
            attempt: 1,
            requeued_at,
        }
    }

    #[test]
    fn a_requeued_job_queues_from_its_requeue_and_a_new_one_from_acceptance() {
        let fresh = submit(None);
        let bytes = serde_json::to_vec(&fresh).expect("serialises");
        assert!(
            !String::from_utf8_lossy(&bytes).contains("requeued_at"),
            "a first submission's message stays as it was"
        );
        let read: SubmitJob = serde_json::from_slice(&bytes).expect("parses");
        assert_eq!(read.queued_since(), OffsetDateTime::UNIX_EPOCH);

        let later = OffsetDateTime::UNIX_EPOCH + time::Duration::hours(5);
        let requeued = submit(Some(later));
        let read: SubmitJob =
            serde_json::from_slice(&serde_json::to_vec(&requeued).expect("serialises"))
                .expect("parses");
        assert_eq!(read.queued_since(), later);
    }
}
