//! The ComfyUI-compatible API: ComfyUI 0.3.64's own HTTP and WebSocket API
//! over the whole fleet, so a client written for ComfyUI works unchanged.
//! Served at the root of ingress's address, under `/api` (as ComfyUI does),
//! and under the configured `comfy_api_prefix`.
//!
//! - [`prompt`]: `POST /prompt` (a prompt becomes a job), `GET /prompt`.
//! - [`socket`]: `GET /ws?clientId=`: ComfyUI's message sequence for every
//!   prompt the client submitted, rebuilt from the job's events.
//! - [`history`]: `/history`, `/queue`, `/interrupt`.
//! - [`files`]: `/view`, `/upload/image`, `/upload/mask`.
//! - [`validation`]: ComfyUI's checks of a prompt against the pool's node
//!   definitions.
//! - [`info`]: `/features`, `/system_stats`, `/models`, `/embeddings`,
//!   `/extensions`, `/object_info`.
//!
//! A prompt is a job whose spec carries a [`ComfyPrompt`] (its prompt id,
//! client id and queue number). A prompt id the service chooses is the job
//! id; one the client chooses maps to a job id by a name-based UUID of the
//! tenant and the prompt id, so no lookup table is needed and two tenants'
//! prompt ids never meet. What ComfyUI's own records hold beyond the job's
//! record lives beside the job's media: the prompt as the client sent it
//! (written here) and ComfyUI's history entry of the attempt (written by the
//! runner). Output files are shown as `subfolder = <job id>/<ComfyUI's
//! subfolder>`, so names from different runners never collide and `/view`
//! finds the job from the name.

pub(crate) mod files;
pub(crate) mod history;
pub(crate) mod info;
pub(crate) mod prompt;
pub(crate) mod socket;
pub(crate) mod validation;

use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::routing::{get, post};
use comfyq_shared::ids::{JobId, TenantId};
use comfyq_shared::job::{ComfyPrompt, JobError, JobRecord};
use comfyq_shared::media::{COMFY_PROMPT_OBJECT, MediaError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use uuid::Uuid;

use crate::problem::Problem;
use crate::state::AppState;

/// Namespace of the job ids of client-chosen prompt ids.
const PROMPT_NAMESPACE: Uuid = Uuid::from_u128(0x2b9e_51c4_7d0a_4f63_9c1e_0a3d_c0f1_c0de);

/// Largest `prompt.json` or `history.json` read back.
const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// The API's routes, at `/`, `/api`, `<prefix>` and `<prefix>/api`.
pub(crate) fn routes(prefix: &str) -> axum::Router<AppState> {
    let api = || {
        axum::Router::new()
            .route("/prompt", post(prompt::post_prompt).get(prompt::queue_info))
            .route("/ws", get(socket::connect))
            .route("/history", get(history::list).post(history::change))
            .route("/history/{prompt_id}", get(history::one))
            .route("/queue", get(history::queue).post(history::change_queue))
            .route("/interrupt", post(history::interrupt))
            .route("/view", get(files::view))
            // Uploads enforce `max_input_bytes` themselves, which may
            // exceed the body limit of other requests.
            .route(
                "/upload/image",
                post(files::upload_image).layer(DefaultBodyLimit::disable()),
            )
            .route(
                "/upload/mask",
                post(files::upload_mask).layer(DefaultBodyLimit::disable()),
            )
            .route("/features", get(info::features))
            .route("/system_stats", get(info::system_stats))
            .route("/models", get(info::model_folders))
            .route("/models/{folder}", get(info::models))
            .route("/embeddings", get(info::embeddings))
            .route("/extensions", get(info::extensions))
            .route("/object_info", get(info::object_info))
            .route("/object_info/{class}", get(info::object_info_of))
    };
    let both = || api().nest("/api", api());
    let router = both();
    if prefix.is_empty() || prefix == "/" {
        router
    } else {
        router.nest(prefix, both())
    }
}

/// The tenant a ComfyUI API request acts for: the API key as a bearer
/// token, or as `?token=` for clients that cannot set headers (a browser's
/// WebSocket).
#[derive(Clone, Debug)]
pub(crate) struct ComfyTenant(pub TenantId);

impl FromRequestParts<AppState> for ComfyTenant {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let from_query = parts.uri.query().and_then(|query| {
            url::form_urlencoded::parse(query.as_bytes())
                .find(|(key, _)| key == "token")
                .map(|(_, token)| format!("Bearer {token}"))
        });
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or(from_query);
        Ok(Self(crate::auth::admit(state, header.as_deref())?))
    }
}

/// The job id of a prompt id the client chose.
pub(crate) fn job_id_for_client_prompt(tenant: &TenantId, prompt_id: &str) -> JobId {
    let name = format!("{tenant}\u{0}{prompt_id}");
    let id = Uuid::new_v5(&PROMPT_NAMESPACE, name.as_bytes());
    // A UUID's hyphenated form always parses back.
    id.hyphenated()
        .to_string()
        .parse()
        .unwrap_or_else(|_| JobId::new())
}

/// The tenant's job submitted with `prompt_id`, if any.
pub(crate) async fn find_prompt(
    state: &AppState,
    tenant: &TenantId,
    prompt_id: &str,
) -> Result<Option<JobRecord>, Problem> {
    let mut candidates = vec![job_id_for_client_prompt(tenant, prompt_id)];
    if let Ok(id) = prompt_id.parse::<JobId>() {
        candidates.push(id);
    }
    for id in candidates {
        if let Some(record) = crate::routes::find_record(state, tenant, &id).await?
            && record
                .comfy
                .as_ref()
                .is_some_and(|c| c.prompt_id == prompt_id)
        {
            return Ok(Some(record));
        }
    }
    Ok(None)
}

/// The prompt as its client sent it, kept for `/queue` and `/history`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct StoredPrompt {
    pub(crate) number: i64,
    pub(crate) prompt_id: String,
    pub(crate) prompt: Value,
    pub(crate) extra_data: Value,
    pub(crate) outputs_to_execute: Vec<String>,
}

impl StoredPrompt {
    /// ComfyUI's queue item: `[number, prompt_id, prompt, extra_data, outputs]`.
    pub(crate) fn queue_item(&self) -> Value {
        serde_json::json!([
            self.number,
            self.prompt_id,
            self.prompt,
            self.extra_data,
            self.outputs_to_execute
        ])
    }
}

/// Reads a small JSON object of the job's from the media store; `None`
/// when it is not there.
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    state: &AppState,
    key: &str,
) -> Result<Option<T>, Problem> {
    let (info, mut reader) = match state.media.get(key).await {
        Ok(found) => found,
        Err(MediaError::NotFound(_)) => return Ok(None),
        Err(other) => return Err(Problem::unavailable(&other)),
    };
    if info.size as usize > MAX_RECORD_BYTES {
        return Err(Problem::internal(&std::io::Error::other(format!(
            "{key} is {} bytes",
            info.size
        ))));
    }
    let mut bytes = Vec::with_capacity(info.size as usize);
    reader
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    // A stored object of another shape is treated as absent, not an error
    // for the client.
    Ok(serde_json::from_slice(&bytes).ok())
}

pub(crate) async fn stored_prompt(
    state: &AppState,
    record: &JobRecord,
) -> Result<Option<StoredPrompt>, Problem> {
    let key = state
        .media
        .comfy_key(&record.tenant, &record.id, COMFY_PROMPT_OBJECT);
    read_json(state, &key).await
}

/// The subfolder the API shows for a file ComfyUI put in `subfolder`.
pub(crate) fn shown_subfolder(job: &JobId, subfolder: &str) -> String {
    if subfolder.is_empty() {
        job.to_string()
    } else {
        format!("{job}/{subfolder}")
    }
}

/// The job and ComfyUI's own subfolder of a shown subfolder.
pub(crate) fn parse_shown_subfolder(shown: &str) -> Option<(JobId, &str)> {
    let (job, rest) = shown.split_once('/').unwrap_or((shown, ""));
    Some((job.parse().ok()?, rest))
}

/// Rewrites what a runner's ComfyUI said about its own prompt into what the
/// client knows: its prompt id instead of the attempt's, and file entries
/// (`{filename, subfolder, type}` anywhere) under the job's subfolder.
pub(crate) struct Rewrite<'a> {
    pub(crate) comfy_prompt_id: &'a str,
    pub(crate) prompt: &'a ComfyPrompt,
    pub(crate) job: JobId,
}

impl Rewrite<'_> {
    pub(crate) fn apply(&self, value: &mut Value) {
        match value {
            Value::String(text) if text == self.comfy_prompt_id => {
                *text = self.prompt.prompt_id.clone();
            }
            Value::Array(items) => items.iter_mut().for_each(|item| self.apply(item)),
            Value::Object(map) => {
                let is_file = map.get("filename").is_some_and(Value::is_string)
                    && map.get("type").is_some_and(Value::is_string);
                for (key, item) in map.iter_mut() {
                    if is_file && key == "subfolder" {
                        let own = item.as_str().unwrap_or_default();
                        *item = Value::String(shown_subfolder(&self.job, own));
                    } else {
                        self.apply(item);
                    }
                }
                if is_file && !map.contains_key("subfolder") {
                    map.insert(
                        "subfolder".to_owned(),
                        Value::String(shown_subfolder(&self.job, "")),
                    );
                }
            }
            _ => {}
        }
    }
}

/// The output nodes of a prompt as far as its shape tells: nodes no other
/// node takes input from (ComfyUI itself knows which classes are output
/// nodes; its history entry has its own list).
pub(crate) fn sink_nodes(prompt: &Value) -> Vec<String> {
    let Some(nodes) = prompt.as_object() else {
        return Vec::new();
    };
    let mut linked = std::collections::HashSet::new();
    for node in nodes.values() {
        if let Some(inputs) = node.get("inputs").and_then(Value::as_object) {
            for input in inputs.values() {
                if let Some([Value::String(from), Value::Number(_)]) =
                    input.as_array().map(Vec::as_slice)
                {
                    linked.insert(from.clone());
                }
            }
        }
    }
    nodes
        .keys()
        .filter(|id| !linked.contains(*id))
        .cloned()
        .collect()
}

/// ComfyUI's `execution_error` data for a job that failed where ComfyUI
/// said nothing of it (refused by its validation, or comfyq's own error).
pub(crate) fn execution_error<T: Serialize>(
    prompt_id: &str,
    error: Option<&JobError>,
    timestamp: T,
) -> Value {
    let exception_type = error
        .and_then(|e| e.exception_type.clone())
        .or_else(|| {
            error
                .and_then(|e| serde_json::to_value(e.kind).ok())
                .and_then(|v| v.as_str().map(str::to_owned))
        })
        .unwrap_or_default();
    serde_json::json!({
        "prompt_id": prompt_id,
        "node_id": error.and_then(|e| e.node_id.clone()).unwrap_or_default(),
        "node_type": error.and_then(|e| e.node_type.clone()).unwrap_or_default(),
        "executed": [],
        "exception_message": error.map(|e| e.message.clone()).unwrap_or_default(),
        "exception_type": exception_type,
        "traceback": error.map(|e| e.traceback.clone()).unwrap_or_default(),
        "current_inputs": {},
        "current_outputs": {},
        "timestamp": timestamp,
    })
}

/// ComfyUI's `execution_interrupted` data for a cancelled job whose
/// ComfyUI did not say it.
pub(crate) fn execution_interrupted<T: Serialize>(
    prompt_id: &str,
    node: &str,
    timestamp: T,
) -> Value {
    serde_json::json!({
        "prompt_id": prompt_id, "node_id": node, "node_type": "", "executed": [],
        "timestamp": timestamp,
    })
}

/// ComfyUI's queue count for a tenant: its unfinished jobs.
pub(crate) async fn queue_remaining(state: &AppState, tenant: &TenantId) -> u64 {
    crate::active::count(state, tenant).await.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn client_prompt_ids_map_per_tenant() {
        let a = TenantId::new("a").expect("valid");
        let b = TenantId::new("b").expect("valid");
        assert_eq!(
            job_id_for_client_prompt(&a, "p1"),
            job_id_for_client_prompt(&a, "p1")
        );
        assert_ne!(
            job_id_for_client_prompt(&a, "p1"),
            job_id_for_client_prompt(&b, "p1")
        );
    }

    #[test]
    fn rewrite_renames_the_prompt_and_files() {
        let job = JobId::new();
        let prompt = ComfyPrompt {
            prompt_id: "mine".to_owned(),
            client_id: None,
            number: 1,
        };
        let rewrite = Rewrite {
            comfy_prompt_id: "theirs",
            prompt: &prompt,
            job,
        };
        let mut message = json!({"type": "executed", "data": {"node": "3", "prompt_id": "theirs",
            "output": {"images": [{"filename": "a.png", "subfolder": "peer", "type": "output"}]}}});
        rewrite.apply(&mut message);
        assert_eq!(message["data"]["prompt_id"], "mine");
        let file = &message["data"]["output"]["images"][0];
        assert_eq!(file["subfolder"], format!("{job}/peer"));
        assert_eq!(
            parse_shown_subfolder(file["subfolder"].as_str().unwrap_or_default()),
            Some((job, "peer"))
        );
        assert_eq!(parse_shown_subfolder(&job.to_string()), Some((job, "")));
    }

    #[test]
    fn sinks_are_nodes_nothing_reads() {
        let prompt = json!({
            "1": {"class_type": "EmptyImage", "inputs": {}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}}
        });
        assert_eq!(sink_nodes(&prompt), vec!["3".to_owned()]);
    }
}
