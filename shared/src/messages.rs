//! Messages between services on the JOBS and DISPATCH streams. Each carries
//! the schema version so a mixed-version fleet can refuse what it cannot read.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{JobId, RunnerId, TenantId};
use crate::job::{JobError, JobSpec, OutputFile};

/// ingress → scheduler: a new job (`Nats-Msg-Id` = job id).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubmitJob {
    pub v: u32,
    pub spec: JobSpec,
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

/// runner → scheduler: what became of an attempt.
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

impl RunnerReport {
    /// Deduplicates a report the runner sent twice (e.g. after a reconnect).
    pub fn message_id(&self) -> String {
        format!("{}:{}:{}", self.job_id, self.attempt, self.outcome.token())
    }
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
