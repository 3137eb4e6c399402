//! HTTP request and response bodies of `/v1`, and the validation that turns
//! a request into a job specification before anything is queued.

use std::collections::{HashMap, HashSet};

use base64::Engine as _;
use comfyq_shared::ids::{JobId, PoolName, RunnerId, TenantId};
use comfyq_shared::job::{InputFile, JobError, JobRecord, JobStatus, OutputFile, WebhookSpec};
use comfyq_shared::priority::Priority;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::problem::InvalidParam;

/// `POST /v1/jobs` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub workflow: Value,
    #[serde(default)]
    pub inputs: Vec<InputRequest>,
    #[serde(default)]
    pub priority: Option<String>,
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default)]
    pub webhook: Option<WebhookRequest>,
    #[serde(default)]
    pub timeout_s: Option<u64>,
    #[serde(default)]
    pub metadata: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputRequest {
    pub name: String,
    /// Base64, or a `data:` URL.
    pub data: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    pub url: String,
    #[serde(default)]
    pub events: Vec<String>,
}

/// A request that passed validation.
#[derive(Debug)]
pub struct ValidSubmission {
    pub workflow: Value,
    pub inputs: Vec<(String, Vec<u8>)>,
    pub priority: Priority,
    pub pool: PoolName,
    pub webhook: Option<WebhookSpec>,
    pub timeout_s: u64,
    pub metadata: Option<Value>,
}

pub const MAX_METADATA_BYTES: usize = 16 * 1024;

impl SubmitRequest {
    pub fn validate(
        self,
        default_timeout_s: u64,
        max_timeout_s: u64,
    ) -> Result<ValidSubmission, Vec<InvalidParam>> {
        let mut errors = Vec::new();
        let mut fail = |pointer: &str, message: String| {
            errors.push(InvalidParam {
                pointer: pointer.to_owned(),
                message,
            })
        };

        validate_workflow(&self.workflow, &mut fail);

        let mut inputs = Vec::new();
        let mut seen = HashSet::new();
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
            match decode_data(&input.data) {
                Ok(bytes) => inputs.push((input.name, bytes)),
                Err(message) => fail(&format!("{pointer}/data"), message),
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
                match url::Url::parse(&webhook.url) {
                    Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                    }
                    Ok(_) => fail(
                        "/webhook/url",
                        "must be an http(s) URL with a host".to_owned(),
                    ),
                    Err(e) => fail("/webhook/url", format!("not a URL: {e}")),
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

        if errors.is_empty() {
            Ok(ValidSubmission {
                workflow: self.workflow,
                inputs,
                priority,
                pool,
                webhook,
                timeout_s,
                metadata: self.metadata,
            })
        } else {
            Err(errors)
        }
    }
}

/// Checks the shape of an API-format workflow: nodes with `class_type` and
/// `inputs`, links to existing nodes, and no cycles.
fn validate_workflow(workflow: &Value, fail: &mut impl FnMut(&str, String)) {
    let Some(nodes) = workflow.as_object() else {
        fail(
            "/workflow",
            "must be an object of node id → {class_type, inputs}".to_owned(),
        );
        return;
    };
    if nodes.is_empty() {
        fail("/workflow", "has no nodes".to_owned());
        return;
    }
    let mut edges: HashMap<&str, Vec<&str>> = HashMap::new();
    for (id, node) in nodes {
        let pointer = format!("/workflow/{}", escape_pointer(id));
        let Some(node) = node.as_object() else {
            fail(
                &pointer,
                "must be an object with class_type and inputs".to_owned(),
            );
            continue;
        };
        match node.get("class_type") {
            Some(Value::String(s)) if !s.is_empty() => {}
            _ => fail(
                &format!("{pointer}/class_type"),
                "must be a non-empty string".to_owned(),
            ),
        }
        let Some(inputs) = node.get("inputs").and_then(Value::as_object) else {
            fail(&format!("{pointer}/inputs"), "must be an object".to_owned());
            continue;
        };
        for (name, value) in inputs {
            // A link is `[node_id, output_index]`.
            if let Some([Value::String(target), index]) = value.as_array().map(Vec::as_slice) {
                let input_pointer = format!("{pointer}/inputs/{}", escape_pointer(name));
                if !nodes.contains_key(target) {
                    fail(
                        &input_pointer,
                        format!("links to node {target:?}, which does not exist"),
                    );
                } else if index.as_u64().is_none() {
                    fail(
                        &input_pointer,
                        "link output index must be a non-negative integer".to_owned(),
                    );
                } else {
                    edges.entry(id.as_str()).or_default().push(target.as_str());
                }
            }
        }
    }
    if let Some(node) = find_cycle(nodes.keys().map(String::as_str), &edges) {
        fail("/workflow", format!("has a cycle through node {node:?}"));
    }
}

fn find_cycle<'a>(
    nodes: impl Iterator<Item = &'a str>,
    edges: &HashMap<&'a str, Vec<&'a str>>,
) -> Option<&'a str> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Active,
        Done,
    }
    let mut marks: HashMap<&str, Mark> = HashMap::new();
    for start in nodes {
        if marks.contains_key(start) {
            continue;
        }
        // Iterative depth-first search: workflows can be deep.
        let mut stack: Vec<(&str, usize)> = vec![(start, 0)];
        marks.insert(start, Mark::Active);
        while let Some((node, next)) = stack.pop() {
            let targets = edges.get(node).map(Vec::as_slice).unwrap_or_default();
            if let Some(&target) = targets.get(next) {
                stack.push((node, next + 1));
                match marks.get(target) {
                    Some(Mark::Active) => return Some(target),
                    Some(Mark::Done) => {}
                    None => {
                        marks.insert(target, Mark::Active);
                        stack.push((target, 0));
                    }
                }
            } else {
                marks.insert(node, Mark::Done);
            }
        }
    }
    None
}

fn escape_pointer(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
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
#[derive(Debug, Serialize)]
pub struct JobView {
    pub id: JobId,
    pub status: JobStatus,
    pub priority: Priority,
    pub pool: PoolName,
    pub attempt: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub queued_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    pub runner: Option<RunnerId>,
    pub inputs: Vec<InputFile>,
    pub outputs: Vec<OutputView>,
    pub error: Option<JobError>,
    pub cancel_requested: bool,
    pub metadata: Option<Value>,
    pub tenant: TenantId,
}

#[derive(Debug, Serialize)]
pub struct OutputView {
    #[serde(flatten)]
    pub file: OutputFile,
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
            })
            .collect();
        Self {
            id: record.id,
            status: record.status,
            priority: record.priority,
            pool: record.pool,
            attempt: record.attempt,
            created_at: record.created_at,
            queued_at: record.queued_at,
            started_at: record.started_at,
            finished_at: record.finished_at,
            runner: record.runner,
            inputs: record.inputs,
            outputs,
            error: record.error,
            cancel_requested: record.cancel_requested,
            metadata: record.metadata,
            tenant: record.tenant,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errors_of(body: Value) -> Vec<InvalidParam> {
        let request: SubmitRequest = serde_json::from_value(body).expect("shape parses");
        request.validate(60, 3600).expect_err("should be invalid")
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
        let workflow = json!({"1": {"class_type": "A", "inputs": {}}});
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
        let valid = ok.validate(60, 3600).expect("valid");
        assert_eq!(valid.inputs[0].1, b"hi");
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
