//! HTTP request and response bodies of `/v1`, and the validation that turns
//! a request into a job specification before anything is queued.

use std::collections::HashSet;

use base64::Engine as _;
use comfyq_shared::ids::{JobId, PoolName, RunnerId, TenantId};
use comfyq_shared::job::{InputFile, JobError, JobRecord, JobStatus, OutputFile, WebhookSpec};
use comfyq_shared::priority::Priority;
use comfyq_shared::workflow::{Workflow, escape_pointer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use crate::problem::InvalidParam;

/// `POST /v1/jobs` body. Unknown fields are rejected (400), so a misspelt
/// option never goes silently unused.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// ComfyUI API format: node id → `{class_type, inputs}`; a link is
    /// `[node_id, output_index]`.
    #[schema(value_type = Object)]
    pub workflow: Value,
    /// Files the workflow refers to by name (in a loader node's file-name input).
    #[serde(default)]
    pub inputs: Vec<InputRequest>,
    /// `high`, `normal` (default) or `low`.
    #[serde(default)]
    #[schema(value_type = Option<Priority>)]
    pub priority: Option<String>,
    /// Runner pool; `default` when absent.
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default)]
    pub webhook: Option<WebhookRequest>,
    /// Execution time limit once running, in seconds.
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Client data kept with the job (JSON, at most 16 KiB).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub outputs: Option<OutputsRequest>,
    /// Labels the runner must carry, e.g. `{"gpu": "a100"}` (at most 16;
    /// keys and values 1 to 64 characters). A job no live runner of its pool
    /// matches waits (`waiting_reason = waiting_for_capability`) or is
    /// rejected, as the scheduler is configured.
    #[serde(default)]
    pub runner_labels: Option<std::collections::BTreeMap<String, String>>,
}

/// One input file: exactly one of `data` (base64 or a `data:` URL) and `url`
/// (http(s), fetched by the service).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InputRequest {
    /// A safe file name: no path separators, `..` or control characters.
    pub name: String,
    /// Base64, or a `data:<type>;base64,<data>` URL.
    #[serde(default)]
    pub data: Option<String>,
    /// An http(s) URL the service downloads (public addresses only).
    #[serde(default)]
    pub url: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    pub url: String,
    /// `job.accepted` … `job.cancelled`; default the terminal ones.
    #[serde(default)]
    pub events: Vec<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputsRequest {
    /// Also return outputs base64-encoded in the job.
    #[serde(default)]
    pub inline: bool,
}

/// Where an input's bytes come from, once validated.
#[derive(Debug)]
pub enum InputSource {
    Bytes(Vec<u8>),
    Url(url::Url),
    /// Already streamed to the object store (multipart upload).
    Stored(InputFile),
}

/// A request that passed validation.
#[derive(Debug)]
pub struct ValidSubmission {
    pub workflow: Workflow,
    pub inputs: Vec<(String, InputSource)>,
    pub priority: Priority,
    pub pool: PoolName,
    pub webhook: Option<WebhookSpec>,
    pub timeout_s: u64,
    pub metadata: Option<Value>,
    pub inline_outputs: bool,
    pub runner_labels: std::collections::BTreeMap<String, String>,
    /// Set by the ComfyUI API for the prompts it submits.
    pub comfy: Option<comfyq_shared::job::ComfyPrompt>,
}

/// Limits validation checks against (from configuration).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub default_timeout_s: u64,
    pub max_timeout_s: u64,
    pub max_inputs: usize,
    pub max_nodes: usize,
}

pub const MAX_METADATA_BYTES: usize = 16 * 1024;
pub const MAX_RUNNER_LABELS: usize = 16;

impl SubmitRequest {
    /// Checks everything that can be checked without I/O. `uploaded` are
    /// inputs that arrived as multipart file parts (already stored).
    pub fn validate(
        self,
        limits: &Limits,
        uploaded: Vec<InputFile>,
    ) -> Result<ValidSubmission, Vec<InvalidParam>> {
        let Limits {
            default_timeout_s,
            max_timeout_s,
            ..
        } = *limits;
        let mut errors = Vec::new();
        let mut fail = |pointer: &str, message: String| {
            errors.push(InvalidParam {
                pointer: pointer.to_owned(),
                message,
            })
        };

        let workflow = match Workflow::parse(self.workflow, limits.max_nodes) {
            Ok(workflow) => Some(workflow),
            Err(problems) => {
                for problem in problems {
                    fail(&problem.pointer, problem.message);
                }
                None
            }
        };
        let referenced = workflow
            .as_ref()
            .map(Workflow::literal_strings)
            .unwrap_or_default();

        let mut inputs = Vec::new();
        let mut seen = HashSet::new();
        if self.inputs.len() + uploaded.len() > limits.max_inputs {
            fail(
                "/inputs",
                format!("at most {} inputs allowed", limits.max_inputs),
            );
        }
        for file in uploaded {
            seen.insert(file.name.clone());
            if !referenced.contains(file.name.as_str()) {
                fail(
                    &format!("/inputs/{}", escape_pointer(&file.name)),
                    format!("input {:?} is not referenced by the workflow", file.name),
                );
            }
            inputs.push((file.name.clone(), InputSource::Stored(file)));
        }
        for (i, input) in self.inputs.into_iter().enumerate() {
            let pointer = format!("/inputs/{i}");
            if let Err(message) = check_file_name(&input.name) {
                fail(&format!("{pointer}/name"), message);
                continue;
            }
            if !seen.insert(input.name.clone()) {
                fail(
                    &format!("{pointer}/name"),
                    format!("duplicate input name {:?}", input.name),
                );
                continue;
            }
            // An input no node refers to is almost always a typo in the name.
            if !referenced.contains(input.name.as_str()) {
                fail(
                    &format!("{pointer}/name"),
                    format!("input {:?} is not referenced by the workflow", input.name),
                );
            }
            match (input.data, input.url) {
                (Some(data), None) => match decode_data(&data) {
                    Ok(bytes) => inputs.push((input.name, InputSource::Bytes(bytes))),
                    Err(message) => fail(&format!("{pointer}/data"), message),
                },
                (None, Some(url)) => match parse_http_url(&url) {
                    Ok(url) => inputs.push((input.name, InputSource::Url(url))),
                    Err(message) => fail(&format!("{pointer}/url"), message),
                },
                _ => fail(&pointer, "needs exactly one of data and url".to_owned()),
            }
        }

        let priority = match self.priority.as_deref().map(str::parse::<Priority>) {
            None => Priority::Normal,
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                fail("/priority", e.to_string());
                Priority::Normal
            }
        };
        let pool = match self.pool.map(PoolName::new) {
            None => PoolName::default(),
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                fail("/pool", e.to_string());
                PoolName::default()
            }
        };
        let webhook = match self.webhook {
            None => None,
            Some(webhook) => {
                if let Err(message) = parse_http_url(&webhook.url) {
                    fail("/webhook/url", message);
                }
                for (i, event) in webhook.events.iter().enumerate() {
                    if !WebhookSpec::SUBSCRIBABLE.contains(&event.as_str()) {
                        fail(
                            &format!("/webhook/events/{i}"),
                            format!(
                                "unknown event {event:?}; known: {}",
                                WebhookSpec::SUBSCRIBABLE.join(", ")
                            ),
                        );
                    }
                }
                Some(WebhookSpec {
                    url: webhook.url,
                    events: webhook.events,
                })
            }
        };
        let timeout_s = match self.timeout_s {
            None => default_timeout_s,
            Some(t) if (1..=max_timeout_s).contains(&t) => t,
            Some(t) => {
                fail(
                    "/timeout_s",
                    format!("must be 1 to {max_timeout_s} (got {t})"),
                );
                default_timeout_s
            }
        };
        if let Some(metadata) = &self.metadata {
            let size = serde_json::to_vec(metadata)
                .map(|v| v.len())
                .unwrap_or(usize::MAX);
            if size > MAX_METADATA_BYTES {
                fail(
                    "/metadata",
                    format!("is {size} bytes; at most {MAX_METADATA_BYTES} allowed"),
                );
            }
        }

        let runner_labels = self.runner_labels.unwrap_or_default();
        if runner_labels.len() > MAX_RUNNER_LABELS {
            fail(
                "/runner_labels",
                format!("at most {MAX_RUNNER_LABELS} labels"),
            );
        }
        for (key, value) in &runner_labels {
            let fits = |s: &str| (1..=64).contains(&s.len()) && !s.chars().any(char::is_control);
            if !fits(key) || !fits(value) {
                fail(
                    &format!("/runner_labels/{key}"),
                    "keys and values must be 1 to 64 characters, no control characters".to_owned(),
                );
            }
        }

        match workflow {
            Some(workflow) if errors.is_empty() => Ok(ValidSubmission {
                workflow,
                inputs,
                priority,
                pool,
                webhook,
                timeout_s,
                metadata: self.metadata,
                inline_outputs: self.outputs.unwrap_or_default().inline,
                runner_labels,
                comfy: None,
            }),
            _ => Err(errors),
        }
    }
}

/// An absolute http(s) URL with a host.
pub fn parse_http_url(raw: &str) -> Result<url::Url, String> {
    match url::Url::parse(raw) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(url),
        Ok(_) => Err("must be an http(s) URL with a host".to_owned()),
        Err(e) => Err(format!("not a URL: {e}")),
    }
}

/// A name that is safe as a file name on any runner's disk.
pub fn check_file_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err("must be 1 to 255 bytes".to_owned());
    }
    if name == "." || name == ".." || name.contains("..") {
        return Err("must not contain '..'".to_owned());
    }
    if name
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return Err("must not contain path separators or control characters".to_owned());
    }
    Ok(())
}

fn decode_data(data: &str) -> Result<Vec<u8>, String> {
    let encoded = match data.strip_prefix("data:") {
        Some(rest) => match rest.split_once(',') {
            Some((meta, payload)) if meta.ends_with(";base64") => payload,
            _ => return Err("data URL must be base64 (data:<type>;base64,<data>)".to_owned()),
        },
        None => data,
    };
    base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| format!("not valid base64: {e}"))
}

/// The job as clients see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: JobId,
    pub tenant: TenantId,
    pub status: JobStatus,
    pub priority: Priority,
    pub pool: PoolName,
    /// The attempt now running or last run (1-based; 0 before dispatch).
    pub attempt: u32,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub queued_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<OffsetDateTime>,
    /// Jobs ahead of this one in its pool (all priorities at or above its
    /// own), while it waits for a runner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// The latest progress while running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressView>,
    pub runner: Option<RunnerId>,
    pub inputs: Vec<InputView>,
    pub outputs: Vec<OutputView>,
    pub error: Option<JobError>,
    pub cancel_requested: bool,
    /// Why a queued job is not dispatched yet when it is not only waiting
    /// for a free slot: `waiting_for_capability` (no live runner of its pool
    /// has every node type the workflow uses). Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_reason: Option<String>,
    /// Times an operator requeued the failed job (`POST /v1/jobs/{id}/retry`).
    #[serde(skip_serializing_if = "is_zero")]
    pub requeues: u32,
    pub webhook: Option<WebhookSpec>,
    /// Where each webhook delivery of this job stands (details and every
    /// attempt: `GET /v1/jobs/{id}/webhooks`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub webhook_deliveries: Vec<WebhookDeliverySummary>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    pub timeout_s: u64,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookDeliverySummary {
    /// The event's type, such as `job.completed`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// `retrying`, `delivered` or `dead`.
    pub state: String,
    pub attempts: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct ProgressView {
    /// The node executing now.
    pub node_id: Option<String>,
    pub node_type: Option<String>,
    /// The current node's step counter (e.g. sampler steps).
    pub value: Option<f64>,
    pub max: Option<f64>,
    /// Whole job, 0.0 to 1.0.
    pub fraction: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OutputView {
    #[serde(flatten)]
    pub file: OutputFile,
    pub url: String,
    /// Base64 of the bytes, when the job asked for inline outputs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InputView {
    #[serde(flatten)]
    pub file: InputFile,
    pub url: String,
}

impl JobView {
    pub fn from_record(record: JobRecord) -> Self {
        let outputs = record
            .outputs
            .into_iter()
            .map(|file| OutputView {
                url: format!("/v1/jobs/{}/outputs/{}", record.id, file.name),
                file,
                data: None,
            })
            .collect();
        let inputs = record
            .inputs
            .into_iter()
            .map(|file| InputView {
                url: format!("/v1/jobs/{}/inputs/{}", record.id, file.name),
                file,
            })
            .collect();
        Self {
            id: record.id,
            tenant: record.tenant,
            status: record.status,
            priority: record.priority,
            pool: record.pool,
            attempt: record.attempt,
            created_at: record.created_at,
            queued_at: record.queued_at,
            started_at: record.started_at,
            finished_at: record.finished_at,
            queue_position: None,
            progress: None,
            runner: record.runner,
            inputs,
            outputs,
            error: record.error,
            cancel_requested: record.cancel_requested,
            waiting_reason: record.waiting_reason,
            requeues: record.requeues,
            webhook: record.webhook,
            webhook_deliveries: Vec::new(),
            metadata: record.metadata,
            timeout_s: record.timeout_s,
        }
    }
}

/// `GET /v1/jobs` query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs in these states (comma separated).
    pub status: Option<String>,
    /// Only jobs created at or after this time (RFC 3339).
    pub created_after: Option<String>,
    /// Only jobs created before this time (RFC 3339).
    pub created_before: Option<String>,
    /// Page size, 1 to 200 (default 50).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One page of jobs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobPage {
    pub jobs: Vec<JobView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// `?wait=N` on `POST /v1/jobs` and `GET /v1/jobs/{id}`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Seconds to wait for the job to end (capped by configuration); 200
    /// with the finished job if it ends in time, else 202.
    pub wait: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: Limits = Limits {
        default_timeout_s: 60,
        max_timeout_s: 3600,
        max_inputs: 16,
        max_nodes: 1000,
    };

    fn errors_of(body: Value) -> Vec<InvalidParam> {
        let request: SubmitRequest = serde_json::from_value(body).expect("shape parses");
        request
            .validate(&LIMITS, Vec::new())
            .expect_err("should be invalid")
    }

    #[test]
    fn workflow_shape_links_and_cycles() {
        let errors = errors_of(json!({"workflow": {}}));
        assert_eq!(errors[0].pointer, "/workflow");
        let errors =
            errors_of(json!({"workflow": {"1": {"class_type": "A", "inputs": {"x": ["9", 0]}}}}));
        assert_eq!(errors[0].pointer, "/workflow/1/inputs/x");
        let errors = errors_of(json!({"workflow": {
            "1": {"class_type": "A", "inputs": {"x": ["2", 0]}},
            "2": {"class_type": "B", "inputs": {"y": ["1", 0]}}
        }}));
        assert!(errors[0].message.contains("cycle"), "{errors:?}");
        let errors = errors_of(json!({"workflow": {"1": {"inputs": {}}}}));
        assert_eq!(errors[0].pointer, "/workflow/1/class_type");
    }

    #[test]
    fn inputs_names_and_data() {
        let workflow = json!({"1": {"class_type": "A", "inputs": {"image": "x.png"}}});
        let errors = errors_of(
            json!({"workflow": workflow, "inputs": [{"name": "../x.png", "data": "aGk="}]}),
        );
        assert_eq!(errors[0].pointer, "/inputs/0/name");
        let errors =
            errors_of(json!({"workflow": workflow, "inputs": [{"name": "x.png", "data": "!!"}]}));
        assert_eq!(errors[0].pointer, "/inputs/0/data");
        let ok: SubmitRequest = serde_json::from_value(json!({
            "workflow": workflow,
            "inputs": [{"name": "x.png", "data": "data:image/png;base64,aGk="}],
            "priority": "high"
        }))
        .expect("parses");
        let valid = ok.validate(&LIMITS, Vec::new()).expect("valid");
        assert!(matches!(&valid.inputs[0].1, InputSource::Bytes(b) if b == b"hi"));
        let errors =
            errors_of(json!({"workflow": workflow, "inputs": [{"name": "y.png", "data": "aGk="}]}));
        assert!(errors[0].message.contains("not referenced"), "{errors:?}");
        assert_eq!(valid.priority, Priority::High);
    }

    #[test]
    fn bounds() {
        let workflow = json!({"1": {"class_type": "A", "inputs": {}}});
        assert_eq!(
            errors_of(json!({"workflow": workflow, "timeout_s": 0}))[0].pointer,
            "/timeout_s"
        );
        assert_eq!(
            errors_of(json!({"workflow": workflow, "priority": "urgent"}))[0].pointer,
            "/priority"
        );
        assert_eq!(
            errors_of(json!({"workflow": workflow, "webhook": {"url": "ftp://x"}}))[0].pointer,
            "/webhook/url"
        );
    }
}
