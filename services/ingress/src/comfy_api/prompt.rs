//! `POST /prompt`: a ComfyUI prompt becomes a comfyq job; `GET /prompt`:
//! the queue count.

use std::collections::BTreeSet;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use comfyq_shared::comfy_validation::Invalid;
use comfyq_shared::ids::{JobId, TenantId};
use comfyq_shared::job::{ComfyPrompt, InputFile};
use comfyq_shared::media::{COMFY_PROMPT_OBJECT, MediaError};
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::validation::validate;
use super::{ComfyTenant, StoredPrompt, job_id_for_client_prompt, queue_remaining, sink_nodes};
use crate::api::{SubmitRequest, check_file_name};
use crate::problem::Problem;
use crate::state::AppState;

/// Headers that choose a prompt's priority and pool (`extra_data`'s
/// `priority` and `pool` do too; the header wins).
pub(crate) const PRIORITY_HEADER: &str = "comfyq-priority";
pub(crate) const POOL_HEADER: &str = "comfyq-pool";

/// ComfyUI's answer to a prompt it refuses: 400 with `error` and `node_errors`.
pub(crate) fn refusal(kind: &str, message: &str, details: &str, node_errors: Value) -> Response {
    let body = json!({
        "error": {"type": kind, "message": message, "details": details, "extra_info": {}},
        "node_errors": node_errors,
    });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

/// What aiohttp answers when a handler raises (ComfyUI on a body that is
/// not JSON).
fn server_trouble() -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "500 Internal Server Error\n\nServer got itself in trouble",
    )
        .into_response()
}

/// ComfyUI's refusal of a prompt (its `error` object).
struct Refusal {
    kind: &'static str,
    message: String,
    details: String,
}

/// An error before the job exists: ComfyUI's refusal, or comfyq's own
/// (authentication, limits, the queue unreachable).
enum Refused {
    Comfy(Refusal),
    /// Refused by ComfyUI's validation of the inputs, with its `node_errors`.
    Invalid(Box<Invalid>),
    Problem(Box<Problem>),
}

fn refused(kind: &'static str, message: impl Into<String>, details: impl Into<String>) -> Refused {
    Refused::Comfy(Refusal {
        kind,
        message: message.into(),
        details: details.into(),
    })
}

impl From<Problem> for Refused {
    fn from(problem: Problem) -> Self {
        Self::Problem(Box::new(problem))
    }
}

pub(crate) async fn post_prompt(
    State(state): State<AppState>,
    ComfyTenant(tenant): ComfyTenant,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return server_trouble();
    };
    match queue_prompt(&state, &tenant, &headers, request).await {
        Ok(answer) => Json(answer).into_response(),
        Err(Refused::Comfy(r)) => refusal(r.kind, &r.message, &r.details, json!({})),
        Err(Refused::Invalid(invalid)) => {
            tracing::debug!(
                error = %invalid.error["type"],
                nodes = invalid.node_errors.len(),
                "prompt refused by ComfyUI's validation"
            );
            let body = json!({"error": invalid.error, "node_errors": invalid.node_errors});
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
        Err(Refused::Problem(problem)) => problem.into_response(),
    }
}

async fn queue_prompt(
    state: &AppState,
    tenant: &TenantId,
    headers: &HeaderMap,
    request: Value,
) -> Result<Value, Refused> {
    let Some(prompt) = request.get("prompt").cloned() else {
        return Err(refused(
            "no_prompt",
            "No prompt provided",
            "No prompt provided",
        ));
    };
    let pool = pool_of(headers, &request);
    check_nodes(state, &prompt, &pool)?;
    let client_id = request
        .get("client_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut extra_data = match request.get("extra_data") {
        Some(Value::Object(map)) => map.clone(),
        _ => serde_json::Map::new(),
    };
    if let Some(client_id) = &client_id {
        extra_data.insert("client_id".to_owned(), Value::String(client_id.clone()));
    }
    let text_of = |header_name: &str, key: &str| {
        headers
            .get(header_name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| {
                extra_data
                    .get(key)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
    };
    let priority = text_of(PRIORITY_HEADER, "priority");
    let pool_choice = text_of(POOL_HEADER, "pool");
    let now = OffsetDateTime::now_utc();
    let number = match request.get("number").and_then(Value::as_i64) {
        Some(number) => number,
        // Milliseconds keep numbers increasing across several ingresses.
        None => {
            let ms = (now.unix_timestamp_nanos() / 1_000_000) as i64;
            if request.get("front").and_then(Value::as_bool) == Some(true) {
                -ms
            } else {
                ms
            }
        }
    };
    let (job_id, prompt_id) = match request.get("prompt_id").and_then(Value::as_str) {
        Some(own) => (job_id_for_client_prompt(tenant, own), own.to_owned()),
        None => {
            let id = JobId::new();
            (id, id.to_string())
        }
    };
    // A prompt id already used by this tenant names that job: answered as
    // it was, and nothing of it is overwritten.
    if let Some(existing) = crate::routes::find_record(state, tenant, &job_id).await?
        && let Some(known) = existing.comfy
    {
        return Ok(
            json!({"prompt_id": known.prompt_id, "number": known.number, "node_errors": {}}),
        );
    }
    let uploads = attach_uploads(state, tenant, job_id, &prompt).await?;
    let prompt_key = state.media.comfy_key(tenant, &job_id, COMFY_PROMPT_OBJECT);
    let mut kept = false;
    let mut node_errors = json!({});
    let result = async {
        // Without the pool's node definitions, the runner's ComfyUI
        // validates the prompt when it runs.
        let outputs_to_execute = match super::info::pool_definitions(state, &pool).await {
            Some(definitions) => {
                let uploaded = uploads.iter().map(|f| f.name.clone()).collect();
                // Every output is validated: the runner runs them all
                // (`partial_execution_targets` is not passed on).
                let valid =
                    validate(&prompt, None, &definitions, &uploaded).map_err(Refused::Invalid)?;
                node_errors = Value::Object(valid.node_errors);
                valid.outputs
            }
            None => sink_nodes(&prompt),
        };
        let stored = StoredPrompt {
            number,
            prompt_id: prompt_id.clone(),
            prompt: prompt.clone(),
            extra_data: Value::Object(extra_data),
            outputs_to_execute,
        };
        let json = serde_json::to_vec(&stored).map_err(|e| Problem::internal(&e))?;
        state
            .media
            .put(&prompt_key, &mut json.as_slice(), 0, None)
            .await
            .map_err(|e| Problem::unavailable(&e))?;
        let submission = SubmitRequest {
            workflow: prompt,
            inputs: Vec::new(),
            priority,
            pool: pool_choice,
            webhook: None,
            timeout_s: None,
            metadata: None,
            outputs: None,
            runner_labels: None,
        };
        let mut valid = submission
            .validate(&crate::routes::limits(state), uploads.clone())
            .map_err(|errors| {
                let first = errors.first();
                refused(
                    "invalid_prompt",
                    first.map(|e| e.message.clone()).unwrap_or_default(),
                    first.map(|e| e.pointer.clone()).unwrap_or_default(),
                )
            })?;
        valid.comfy = Some(ComfyPrompt {
            prompt_id: prompt_id.clone(),
            client_id,
            number,
        });
        state
            .active
            .check(state, tenant, state.config.max_active_jobs)
            .await?;
        crate::catalog::check_capability(state, &valid)
            .await
            .map_err(|problem| refused("invalid_prompt", problem.client_message(), ""))?;
        crate::routes::submit(state, tenant, job_id, valid).await?;
        kept = true;
        Ok::<_, Refused>(())
    }
    .await;
    if !kept {
        // Nothing of a refused prompt stays stored.
        let mut keys: Vec<String> = uploads
            .iter()
            .map(|f| state.media.input_key(tenant, &job_id, &f.name))
            .collect();
        keys.push(prompt_key);
        for key in keys {
            if let Err(error) = state.media.delete(&key).await {
                tracing::warn!(%error, key, "object of a refused prompt not deleted");
            }
        }
    }
    result?;
    Ok(json!({"prompt_id": prompt_id, "number": number, "node_errors": node_errors}))
}

/// The pool a prompt is for: the header, else `extra_data.pool`.
fn pool_of(headers: &HeaderMap, request: &Value) -> String {
    headers
        .get(POOL_HEADER)
        .and_then(|v| v.to_str().ok())
        .or_else(|| request["extra_data"]["pool"].as_str())
        .unwrap_or(comfyq_shared::ids::PoolName::default().as_str())
        .to_owned()
}

/// ComfyUI's first checks (`validate_prompt`): every node has a class that
/// some runner of the pool offers, and there is something to run. The
/// inputs are checked against the pool's node definitions
/// ([`validate`]) once the uploads they name are known.
fn check_nodes(state: &AppState, prompt: &Value, pool: &str) -> Result<(), Refused> {
    let refuse =
        |message: String, details: String| Err(refused("invalid_prompt", message, details));
    let Some(nodes) = prompt.as_object() else {
        return refuse(
            "Cannot execute because the prompt is not an object of nodes.".to_owned(),
            String::new(),
        );
    };
    let runners: Vec<_> = crate::catalog::registrations(state)
        .into_iter()
        .filter(|r| r.load.pool.as_str() == pool)
        .collect();
    // Runners that could not list their node types are assumed to have any.
    let known: Option<BTreeSet<String>> = (!runners.is_empty()
        && runners.iter().all(|r| !r.offer.node_types.is_empty()))
    .then(|| {
        runners
            .iter()
            .flat_map(|r| r.offer.node_types.iter().cloned())
            .collect()
    });
    for (id, node) in nodes {
        let Some(class) = node.get("class_type").and_then(Value::as_str) else {
            return refuse(
                "Cannot execute because a node is missing the class_type property.".to_owned(),
                format!("Node ID '#{id}'"),
            );
        };
        if known.as_ref().is_some_and(|known| !known.contains(class)) {
            return refuse(
                format!("Cannot execute because node {class} does not exist."),
                format!("Node ID '#{id}'"),
            );
        }
    }
    if nodes.is_empty() {
        return Err(refused("prompt_no_outputs", "Prompt has no outputs", ""));
    }
    Ok(())
}

/// Copies the tenant's uploads the prompt names (a literal input equal to
/// an uploaded file's name) into the job's inputs, where runners find them.
async fn attach_uploads(
    state: &AppState,
    tenant: &TenantId,
    job: JobId,
    prompt: &Value,
) -> Result<Vec<InputFile>, Refused> {
    let mut names = BTreeSet::new();
    if let Some(nodes) = prompt.as_object() {
        for node in nodes.values() {
            if let Some(inputs) = node.get("inputs").and_then(Value::as_object) {
                for value in inputs.values() {
                    if let Some(text) = value.as_str()
                        && check_file_name(text).is_ok()
                    {
                        names.insert(text.to_owned());
                    }
                }
            }
        }
    }
    let mut attached = Vec::new();
    for name in names {
        if attached.len() >= state.config.max_inputs {
            break;
        }
        let source = state.media.upload_key(tenant, &name);
        let (_, mut reader) = match state.media.get(&source).await {
            Ok(found) => found,
            Err(MediaError::NotFound(_)) => continue,
            Err(other) => return Err(Problem::unavailable(&other).into()),
        };
        let used = attached.iter().map(|f: &InputFile| f.size).sum();
        let key = state.media.input_key(tenant, &job, &name);
        match state.media.put(&key, &mut reader, used, None).await {
            Ok(stored) => attached.push(InputFile {
                name,
                content_type: stored.content_type,
                size: stored.size,
                sha256: stored.sha256,
            }),
            Err(error) => {
                for file in &attached {
                    let key = state.media.input_key(tenant, &job, &file.name);
                    if let Err(error) = state.media.delete(&key).await {
                        tracing::warn!(%error, key, "input of a refused prompt not deleted");
                    }
                }
                return Err(crate::routes::media_problem(&name, error).into());
            }
        }
    }
    Ok(attached)
}

/// `GET /prompt`: `{"exec_info": {"queue_remaining": n}}`.
pub(crate) async fn queue_info(
    State(state): State<AppState>,
    ComfyTenant(tenant): ComfyTenant,
) -> Json<Value> {
    let remaining = queue_remaining(&state, &tenant).await;
    Json(json!({"exec_info": {"queue_remaining": remaining}}))
}
