//! Job events: what happened to a job, published on
//! `<prefix>.events.<tenant>.<job>.<kind>` for SSE clients, webhooks and
//! NATS subscribers.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::ids::{JobId, RunnerId, TenantId};
use crate::job::{JobError, JobRecord, JobStatus, OutputFile, SCHEMA_VERSION};

/// Namespace of the name-based ids of state events.
const STATE_EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_0c1e_9b3d_4d7e_a2c4_55e1_0b7f_c0de);

/// The last subject token of an event: one per state, plus progress kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    State(JobStatus),
    Progress,
    Node,
    Output,
    Comfy,
}

impl EventKind {
    pub fn all() -> impl Iterator<Item = EventKind> {
        JobStatus::ALL.into_iter().map(EventKind::State).chain([
            EventKind::Progress,
            EventKind::Node,
            EventKind::Output,
            EventKind::Comfy,
        ])
    }

    pub fn token(self) -> &'static str {
        match self {
            EventKind::State(status) => status.as_str(),
            EventKind::Progress => "progress",
            EventKind::Node => "node",
            EventKind::Output => "output",
            EventKind::Comfy => "comfy",
        }
    }
}

/// One event, as it travels (JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    pub v: u32,
    /// Unique per event; webhooks use it as their `webhook-id`.
    pub id: Uuid,
    pub job_id: JobId,
    pub tenant: TenantId,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub at: OffsetDateTime,
    #[serde(flatten)]
    pub body: EventBody,
    /// On state events: the whole job record after the change. State events
    /// are the records (the job's last one is the job as it stands), so
    /// readers of the stream need no other lookup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Box<JobRecord>>,
}

impl Event {
    pub fn new(job_id: JobId, tenant: TenantId, body: EventBody) -> Self {
        Self {
            v: SCHEMA_VERSION,
            id: Uuid::now_v7(),
            job_id,
            tenant,
            at: OffsetDateTime::now_utc(),
            body,
            record: None,
        }
    }

    /// The event for a job record's current state. Its id is derived from
    /// (job, attempt, status), so re-publishing after a crash is deduplicated
    /// by the stream and a webhook for it keeps one `webhook-id`.
    pub fn for_state(record: &JobRecord) -> Self {
        // A requeued job passes through `queued` (and perhaps more) again at
        // the same attempt: its states get ids of their own.
        let name = match record.requeues {
            0 => format!("{}:{}:{}", record.id, record.attempt, record.status),
            n => format!("{}:r{n}:{}:{}", record.id, record.attempt, record.status),
        };
        Self {
            v: SCHEMA_VERSION,
            id: Uuid::new_v5(&STATE_EVENT_NAMESPACE, name.as_bytes()),
            job_id: record.id,
            tenant: record.tenant.clone(),
            at: record.updated_at,
            body: EventBody::state(StateChange {
                status: record.status,
                attempt: record.attempt,
                runner: record.runner.clone(),
                outputs: if record.status == JobStatus::Completed {
                    record.outputs.clone()
                } else {
                    Vec::new()
                },
                error: record.error.clone(),
            }),
            record: Some(Box::new(record.clone())),
        }
    }

    /// The record a state event carries.
    pub fn into_record(self) -> Option<JobRecord> {
        self.record.map(|r| *r)
    }

    pub fn kind(&self) -> EventKind {
        self.body.kind()
    }

    /// The public type name, such as `job.completed` or `job.progress`.
    pub fn type_name(&self) -> String {
        format!("job.{}", self.kind().token())
    }
}

/// A state change: the job record after it, in brief.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StateChange {
    pub status: JobStatus,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<RunnerId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<OutputFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProgressUpdate {
    pub node_id: String,
    pub value: f64,
    pub max: f64,
    /// Whole job, 0.0 to 1.0: finished nodes plus this node's share.
    pub fraction: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NodeUpdate {
    /// The node now executing; `cached` lists nodes ComfyUI served from cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cached: Vec<String>,
    pub fraction: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OutputProduced {
    pub node_id: String,
    /// File names as ComfyUI reported them (not yet stored).
    pub files: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub text: Vec<String>,
}

/// Header of a preview message (`…previews.<tenant>.<job>`) of a ComfyUI API
/// job: ComfyUI's preview metadata (event 4), JSON, when ComfyUI sent it.
pub const PREVIEW_METADATA_HEADER: &str = "Comfyq-Preview-Metadata";
/// Header of a preview message of a ComfyUI API job: how many `job.comfy`
/// events of the attempt came before it (ComfyUI's order, which the
/// previews' own subject does not keep against the events stream).
pub const PREVIEW_AFTER_HEADER: &str = "Comfyq-Comfy-After";

/// One message of ComfyUI about the job's prompt, as ComfyUI sent it (only
/// for jobs submitted through the ComfyUI API, which replays them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ComfyMessage {
    /// The prompt id the runner's ComfyUI gave the attempt (the message
    /// names it; the job's own prompt id is in its record).
    pub comfy_prompt_id: String,
    /// Its place among the attempt's messages, from 1.
    pub seq: u64,
    /// Previews of the attempt published before it (on the previews
    /// subject, which does not keep order with the events stream).
    #[serde(default)]
    pub previews: u64,
    /// A WebSocket text message: `{type, data}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<serde_json::Value>,
    /// A binary progress-text frame (event 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_text: Option<ProgressText>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProgressText {
    pub node_id: String,
    pub text: String,
}

/// The event's payload; `type` is `job.<token>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum EventBody {
    #[serde(rename = "job.accepted")]
    Accepted(StateChange),
    #[serde(rename = "job.queued")]
    Queued(StateChange),
    #[serde(rename = "job.dispatched")]
    Dispatched(StateChange),
    #[serde(rename = "job.running")]
    Running(StateChange),
    #[serde(rename = "job.retrying")]
    Retrying(StateChange),
    #[serde(rename = "job.completed")]
    Completed(StateChange),
    #[serde(rename = "job.failed")]
    Failed(StateChange),
    #[serde(rename = "job.cancelled")]
    Cancelled(StateChange),
    #[serde(rename = "job.progress")]
    Progress(ProgressUpdate),
    #[serde(rename = "job.node")]
    Node(NodeUpdate),
    #[serde(rename = "job.output")]
    Output(OutputProduced),
    #[serde(rename = "job.comfy")]
    Comfy(ComfyMessage),
}

impl EventBody {
    pub fn state(change: StateChange) -> Self {
        match change.status {
            JobStatus::Accepted => EventBody::Accepted(change),
            JobStatus::Queued => EventBody::Queued(change),
            JobStatus::Dispatched => EventBody::Dispatched(change),
            JobStatus::Running => EventBody::Running(change),
            JobStatus::Retrying => EventBody::Retrying(change),
            JobStatus::Completed => EventBody::Completed(change),
            JobStatus::Failed => EventBody::Failed(change),
            JobStatus::Cancelled => EventBody::Cancelled(change),
        }
    }

    pub fn kind(&self) -> EventKind {
        match self {
            EventBody::Accepted(c)
            | EventBody::Queued(c)
            | EventBody::Dispatched(c)
            | EventBody::Running(c)
            | EventBody::Retrying(c)
            | EventBody::Completed(c)
            | EventBody::Failed(c)
            | EventBody::Cancelled(c) => EventKind::State(c.status),
            EventBody::Progress(_) => EventKind::Progress,
            EventBody::Node(_) => EventKind::Node,
            EventBody::Output(_) => EventKind::Output,
            EventBody::Comfy(_) => EventKind::Comfy,
        }
    }

    pub fn state_change(&self) -> Option<&StateChange> {
        match self {
            EventBody::Accepted(c)
            | EventBody::Queued(c)
            | EventBody::Dispatched(c)
            | EventBody::Running(c)
            | EventBody::Retrying(c)
            | EventBody::Completed(c)
            | EventBody::Failed(c)
            | EventBody::Cancelled(c) => Some(c),
            EventBody::Progress(_)
            | EventBody::Node(_)
            | EventBody::Output(_)
            | EventBody::Comfy(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_events_carry_their_type_name() {
        let event = Event::new(
            JobId::new(),
            TenantId::new("t").expect("valid"),
            EventBody::state(StateChange {
                status: JobStatus::Completed,
                attempt: 1,
                runner: None,
                outputs: vec![],
                error: None,
            }),
        );
        let json = serde_json::to_value(&event).expect("serializes");
        assert_eq!(json["type"], "job.completed");
        assert_eq!(json["data"]["status"], "completed");
        assert_eq!(event.type_name(), "job.completed");
        let back: Event = serde_json::from_value(json).expect("parses");
        assert_eq!(back, event);
    }
}

#[cfg(test)]
mod schema_tests {
    use super::Event;

    /// The published schema (`shared/schemas/event.v1.json`) is the one the
    /// types produce. After a deliberate change of the event JSON, rewrite it
    /// with `COMFYQ_UPDATE_SCHEMAS=1 cargo test -p comfyq-shared schema`.
    #[test]
    fn published_event_schema_matches_the_types() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/event.v1.json");
        let generated = serde_json::to_string_pretty(&schemars::schema_for!(Event))
            .expect("schema serializes")
            + "\n";
        if std::env::var_os("COMFYQ_UPDATE_SCHEMAS").is_some() {
            std::fs::write(&path, &generated).expect("schema written");
        }
        let published = std::fs::read_to_string(&path).unwrap_or_default();
        // Compared as JSON values: key order depends on serde_json features.
        let parse = |text: &str| serde_json::from_str::<serde_json::Value>(text).ok();
        assert!(
            parse(&published).is_some() && parse(&published) == parse(&generated),
            "{} is out of date: run COMFYQ_UPDATE_SCHEMAS=1 cargo test -p comfyq-shared schema",
            path.display()
        );
    }
}
