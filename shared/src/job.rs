//! The job record (one per job, in the jobs KV bucket) and the job
//! specification it was submitted with.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::ids::{JobId, PoolName, RunnerId, TenantId};
use crate::priority::Priority;

/// Version of the record and message schemas; bumped on incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// Where a job is in its life. Terminal states never change again.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Accepted,
    Queued,
    Dispatched,
    Running,
    Retrying,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 8] = [
        JobStatus::Accepted,
        JobStatus::Queued,
        JobStatus::Dispatched,
        JobStatus::Running,
        JobStatus::Retrying,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Accepted => "accepted",
            JobStatus::Queued => "queued",
            JobStatus::Dispatched => "dispatched",
            JobStatus::Running => "running",
            JobStatus::Retrying => "retrying",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// Position within one attempt; with the attempt number it orders every
    /// state a job passes through, so updates can only move a job forward.
    pub fn rank(self) -> u8 {
        match self {
            JobStatus::Accepted => 0,
            JobStatus::Queued => 1,
            JobStatus::Dispatched => 2,
            JobStatus::Running => 3,
            JobStatus::Retrying => 4,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled => 5,
        }
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A media file the job brought, already stored under its input prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
pub struct InputFile {
    /// The name the workflow refers to it by (a safe file name).
    pub name: String,
    pub content_type: String,
    pub size: u64,
    pub sha256: String,
}

/// A file the job produced, stored under its output prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
pub struct OutputFile {
    /// The ComfyUI node that produced it.
    pub node_id: String,
    /// Name under the job's outputs (unique within the job).
    pub name: String,
    /// ComfyUI's output list it came from: `images`, `gifs`, `audio`, …
    pub kind: String,
    pub content_type: String,
    pub size: u64,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub animated: bool,
    /// Where ComfyUI put it, for jobs submitted through the ComfyUI API
    /// (whose clients name outputs that way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comfy: Option<ComfyFileRef>,
}

/// A file as ComfyUI names it: `/view?filename=&subfolder=&type=`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
pub struct ComfyFileRef {
    pub filename: String,
    #[serde(default)]
    pub subfolder: String,
    /// `output`, `temp` or `input`.
    #[serde(rename = "type")]
    pub folder_type: String,
}

/// A job submitted through the ComfyUI-compatible API: what its clients
/// know it by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ComfyPrompt {
    /// ComfyUI's `prompt_id` (the client's own, or the job id).
    pub prompt_id: String,
    /// The `client_id` whose `/ws` sockets hear about the prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// ComfyUI's queue `number` (negative when submitted with `front`).
    pub number: i64,
}

/// What went wrong. The kind decides whether a retry can help.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// ComfyUI refused the workflow (`/prompt` validation).
    Validation,
    /// A node raised while executing: the workflow's fault.
    Execution,
    /// The GPU ran out of memory: another runner or a later try may succeed.
    OutOfMemory,
    /// The runner, ComfyUI or the link between them failed.
    Infrastructure,
    /// The job ran or waited longer than allowed.
    Timeout,
    /// Every allowed attempt was used up.
    AttemptsExhausted,
    /// The scheduler refused the job: a tenant quota, or no runner of the
    /// pool can run it (when configured to reject rather than wait).
    Rejected,
    /// A bug or an unexpected answer.
    Internal,
}

impl ErrorKind {
    /// Whether another attempt could succeed where this one failed.
    pub fn is_retryable(self) -> bool {
        match self {
            ErrorKind::OutOfMemory | ErrorKind::Infrastructure => true,
            ErrorKind::Validation
            | ErrorKind::Execution
            | ErrorKind::Timeout
            | ErrorKind::AttemptsExhausted
            | ErrorKind::Rejected
            | ErrorKind::Internal => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
pub struct JobError {
    pub kind: ErrorKind,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exception_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traceback: Vec<String>,
    /// ComfyUI's per-node validation errors, as it sent them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl JobError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            node_id: None,
            node_type: None,
            exception_type: None,
            traceback: Vec::new(),
            details: None,
        }
    }
}

/// Where and for which events a job's webhook is sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
pub struct WebhookSpec {
    pub url: String,
    /// Event types (`job.completed`, …); empty means the terminal ones.
    #[serde(default)]
    pub events: Vec<String>,
}

impl WebhookSpec {
    pub const DEFAULT_EVENTS: [&'static str; 3] = ["job.completed", "job.failed", "job.cancelled"];

    /// Every event type a webhook may subscribe to: the state changes, plus
    /// `job.progress` (throttled, best effort) and `job.started` (an alias of
    /// `job.running`, the name other queues use).
    pub const SUBSCRIBABLE: [&'static str; 10] = [
        "job.accepted",
        "job.queued",
        "job.dispatched",
        "job.running",
        "job.started",
        "job.retrying",
        "job.completed",
        "job.failed",
        "job.cancelled",
        "job.progress",
    ];

    pub fn wants(&self, event_type: &str) -> bool {
        if self.events.is_empty() {
            Self::DEFAULT_EVENTS.contains(&event_type)
        } else {
            self.events
                .iter()
                .any(|e| e == event_type || (e == "job.started" && event_type == "job.running"))
        }
    }
}

#[cfg(test)]
mod webhook_tests {
    use super::WebhookSpec;

    #[test]
    fn default_and_alias_subscriptions() {
        let default = WebhookSpec {
            url: "https://x".to_owned(),
            events: vec![],
        };
        assert!(default.wants("job.completed") && !default.wants("job.running"));
        let started = WebhookSpec {
            url: "https://x".to_owned(),
            events: vec!["job.started".to_owned()],
        };
        assert!(started.wants("job.running") && !started.wants("job.completed"));
    }
}

/// Everything needed to run a job, as ingress accepted it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub id: JobId,
    pub tenant: TenantId,
    pub priority: Priority,
    pub pool: PoolName,
    /// ComfyUI API-format workflow: node id → `{class_type, inputs}`.
    pub workflow: crate::workflow::Workflow,
    #[serde(default)]
    pub inputs: Vec<InputFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Execution time limit once running, in seconds.
    /// The client asked for outputs inline (base64) when it reads the job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inline_outputs: bool,
    pub timeout_s: u64,
    /// Labels the runner must carry (e.g. `gpu = a100`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub runner_labels: std::collections::BTreeMap<String, String>,
    /// Every node and step event of ComfyUI as it comes, instead of the
    /// newest one per `progress_interval` (clients that follow ComfyUI's own
    /// message sequence need each one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub every_progress_event: bool,
    /// Set for jobs submitted through the ComfyUI API: the runner then also
    /// publishes ComfyUI's own messages (`job.comfy` live events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comfy: Option<ComfyPrompt>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// The job record: the one durable truth about a job. Each change is a
/// state event in the events stream carrying the whole record, written with
/// compare-and-set on the job's last state event (its revision), so the
/// job's last state event is the record as it stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobRecord {
    pub v: u32,
    pub id: JobId,
    pub tenant: TenantId,
    pub status: JobStatus,
    pub priority: Priority,
    pub pool: PoolName,
    /// The attempt now running or last run (1-based; 0 before dispatch).
    pub attempt: u32,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub created_at: OffsetDateTime,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub queued_at: Option<OffsetDateTime>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub finished_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub updated_at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<RunnerId>,
    #[serde(default)]
    pub inputs: Vec<InputFile>,
    #[serde(default)]
    pub outputs: Vec<OutputFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    pub timeout_s: u64,
    /// Set when a cancel arrived; the job ends `cancelled` once the runner stops.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
    /// Why a queued job is not dispatched yet, when it is not just waiting
    /// for a slot (e.g. `waiting_for_capability`); cleared on dispatch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_reason: Option<String>,
    /// The client asked for outputs inline (base64) in the job it reads.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inline_outputs: bool,
    /// Times an operator put the failed job back in the queue
    /// (`POST /v1/jobs/{id}/retry`). Attempts keep counting across requeues.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub requeues: u32,
    /// Runners on which an attempt of this job failed or died, oldest first,
    /// so a retry can prefer another runner.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_runners: Vec<RunnerId>,
    /// Jobs submitted through the ComfyUI API: their prompt id and client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comfy: Option<ComfyPrompt>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// [`JobRecord::waiting_reason`] of a job no registered runner of its pool can run.
pub const WAITING_FOR_CAPABILITY: &str = "waiting_for_capability";

impl JobRecord {
    /// The record of a job that has just been accepted.
    pub fn accepted(spec: &JobSpec) -> Self {
        Self {
            v: SCHEMA_VERSION,
            id: spec.id,
            tenant: spec.tenant.clone(),
            status: JobStatus::Accepted,
            priority: spec.priority,
            pool: spec.pool.clone(),
            attempt: 0,
            created_at: spec.created_at,
            queued_at: None,
            started_at: None,
            finished_at: None,
            updated_at: spec.created_at,
            runner: None,
            inputs: spec.inputs.clone(),
            outputs: Vec::new(),
            error: None,
            webhook: spec.webhook.clone(),
            metadata: spec.metadata.clone(),
            timeout_s: spec.timeout_s,
            cancel_requested: false,
            waiting_reason: None,
            inline_outputs: spec.inline_outputs,
            requeues: 0,
            failed_runners: Vec::new(),
            comfy: spec.comfy.clone(),
        }
    }

    /// Where the job stands, in order: operator requeues, attempt, state
    /// rank. A requeue is the one move out of a terminal state, and it moves
    /// the job forward too.
    pub fn position(&self) -> (u32, u32, u8) {
        (self.requeues, self.attempt, self.status.rank())
    }
}
