//! `/history`, `/queue` and `/interrupt` over the tenant's ComfyUI API jobs.
//!
//! A history entry is ComfyUI's own (the runner stores what its ComfyUI
//! wrote) with the client's prompt, prompt id and file names put back; a job
//! whose ComfyUI wrote none (refused by ComfyUI's validation, cancelled
//! before it ran) gets one made from its record. `POST /history` deletes
//! what the API keeps of a finished job, which takes it out of `/history`;
//! the job's record stays (comfyq does not delete jobs).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use comfyq_shared::ids::TenantId;
use comfyq_shared::job::{JobRecord, JobStatus};
use comfyq_shared::job_store::JobStoreError;
use comfyq_shared::media::{COMFY_HISTORY_OBJECT, COMFY_PROMPT_OBJECT, MediaError};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{ComfyTenant, Rewrite, StoredPrompt, find_prompt, read_json, stored_prompt};
use crate::problem::Problem;
use crate::state::AppState;

/// Records read concurrently.
const READ_AHEAD: usize = 16;

/// The tenant's ComfyUI API jobs, oldest first.
async fn prompts(state: &AppState, tenant: &TenantId) -> Result<Vec<JobRecord>, Problem> {
    let ids = crate::listing::tenant_job_ids(state, tenant).await?;
    let mut records = futures::stream::iter(ids)
        .map(|id| async move { state.jobs.get(tenant, &id).await })
        .buffer_unordered(READ_AHEAD);
    let mut found = Vec::new();
    while let Some(result) = records.next().await {
        match result {
            Ok(Some(versioned)) if versioned.record.comfy.is_some() => found.push(versioned.record),
            Ok(_) => {}
            Err(JobStoreError::Nats(e)) => return Err(Problem::unavailable(&*e)),
            Err(e) => return Err(Problem::internal(&e)),
        }
    }
    found.sort_by_key(|r| (r.created_at, r.id));
    Ok(found)
}

/// The job's history entry, if it is finished and not deleted.
async fn entry(state: &AppState, record: &JobRecord) -> Result<Option<Value>, Problem> {
    let Some(prompt) = record.comfy.as_ref() else {
        return Ok(None);
    };
    if !record.status.is_terminal() {
        return Ok(None);
    }
    let Some(stored) = stored_prompt(state, record).await? else {
        return Ok(None);
    };
    let key = state
        .media
        .comfy_key(&record.tenant, &record.id, COMFY_HISTORY_OBJECT);
    let own: Option<Value> = read_json(state, &key).await?;
    let mut entry = match own {
        Some(mut own) => {
            let comfy_prompt_id = own["prompt"][1].as_str().unwrap_or_default().to_owned();
            Rewrite {
                comfy_prompt_id: &comfy_prompt_id,
                prompt,
                job: record.id,
            }
            .apply(&mut own);
            own
        }
        None => made_from_record(record),
    };
    let outputs = entry["prompt"][4].clone();
    let mut item = stored.queue_item();
    if outputs.is_array() {
        item[4] = outputs;
    }
    entry["prompt"] = item;
    Ok(Some(entry))
}

/// ComfyUI's entry for a prompt that ended without one of ComfyUI's own.
fn made_from_record(record: &JobRecord) -> Value {
    let prompt_id = record
        .comfy
        .as_ref()
        .map(|c| c.prompt_id.clone())
        .unwrap_or_default();
    let ms =
        |t: Option<time::OffsetDateTime>| t.map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64);
    let mut messages = vec![
        json!(["execution_start", {"prompt_id": prompt_id, "timestamp": ms(record.started_at.or(Some(record.created_at)))}]),
    ];
    let finished = ms(record.finished_at);
    match record.status {
        JobStatus::Failed => messages.push(json!([
            "execution_error",
            super::execution_error(&prompt_id, record.error.as_ref(), finished)
        ])),
        JobStatus::Cancelled => messages.push(json!([
            "execution_interrupted",
            super::execution_interrupted(&prompt_id, "", finished)
        ])),
        _ => messages
            .push(json!(["execution_success", {"prompt_id": prompt_id, "timestamp": finished}])),
    }
    let success = record.status == JobStatus::Completed;
    json!({
        "prompt": [],
        "outputs": {},
        "status": {"status_str": if success { "success" } else { "error" }, "completed": success, "messages": messages},
        "meta": {},
    })
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct HistoryQuery {
    max_items: Option<usize>,
    offset: Option<i64>,
}

/// `GET /history`: every finished prompt, oldest first; with `max_items`
/// (and no `offset`) the newest that many, as ComfyUI's `get_history`.
pub(crate) async fn list(
    State(state): State<AppState>,
    ComfyTenant(tenant): ComfyTenant,
    Query(query): Query<HistoryQuery>,
) -> Result<Json<Map<String, Value>>, Problem> {
    let mut entries = Vec::new();
    for record in prompts(&state, &tenant).await? {
        if let Some(entry) = entry(&state, &record).await?
            && let Some(prompt) = &record.comfy
        {
            entries.push((prompt.prompt_id.clone(), entry));
        }
    }
    let offset = query.offset.unwrap_or(-1);
    let start = match (offset, query.max_items) {
        (offset, Some(max)) if offset < 0 => entries.len().saturating_sub(max),
        (offset, _) if offset < 0 => 0,
        (offset, _) => usize::try_from(offset).unwrap_or(usize::MAX),
    };
    let take = query.max_items.unwrap_or(usize::MAX);
    Ok(Json(entries.into_iter().skip(start).take(take).collect()))
}

/// `GET /history/{prompt_id}`: `{prompt_id: entry}`, or `{}`.
pub(crate) async fn one(
    State(state): State<AppState>,
    ComfyTenant(tenant): ComfyTenant,
    Path(prompt_id): Path<String>,
) -> Result<Json<Map<String, Value>>, Problem> {
    let mut answer = Map::new();
    if let Some(record) = find_prompt(&state, &tenant, &prompt_id).await?
        && let Some(entry) = entry(&state, &record).await?
    {
        answer.insert(prompt_id, entry);
    }
    Ok(Json(answer))
}

#[derive(Debug, Default, Deserialize)]
struct Change {
    #[serde(default)]
    clear: bool,
    #[serde(default)]
    delete: Vec<String>,
}

/// ComfyUI reads these bodies leniently: what is not understood is ignored.
fn change_of(body: &Bytes) -> Change {
    serde_json::from_slice(body).unwrap_or_default()
}

/// The prompts a `POST /history` or `POST /queue` body names: all of the
/// tenant's for `clear`, else those in `delete`.
async fn targets_of(
    state: &AppState,
    tenant: &TenantId,
    change: &Change,
) -> Result<Vec<JobRecord>, Problem> {
    if change.clear {
        return prompts(state, tenant).await;
    }
    let mut found = Vec::new();
    for prompt_id in &change.delete {
        found.extend(find_prompt(state, tenant, prompt_id).await?);
    }
    Ok(found)
}

/// `POST /history`: `{"clear": true}` or `{"delete": [prompt ids]}`.
pub(crate) async fn change(
    State(state): State<AppState>,
    ComfyTenant(tenant): ComfyTenant,
    body: Bytes,
) -> Result<Response, Problem> {
    let targets = targets_of(&state, &tenant, &change_of(&body)).await?;
    for record in targets.iter().filter(|r| r.status.is_terminal()) {
        for name in [COMFY_HISTORY_OBJECT, COMFY_PROMPT_OBJECT] {
            let key = state.media.comfy_key(&record.tenant, &record.id, name);
            match state.media.delete(&key).await {
                Ok(()) | Err(MediaError::NotFound(_)) => {}
                Err(other) => return Err(Problem::unavailable(&other)),
            }
        }
    }
    Ok(StatusCode::OK.into_response())
}

/// `GET /queue`: the tenant's unfinished prompts, running (handed to a
/// runner) and pending.
pub(crate) async fn queue(
    State(state): State<AppState>,
    ComfyTenant(tenant): ComfyTenant,
) -> Result<Json<Value>, Problem> {
    let mut running = Vec::new();
    let mut pending: Vec<StoredPrompt> = Vec::new();
    for record in prompts(&state, &tenant).await? {
        if record.status.is_terminal() {
            continue;
        }
        let Some(stored) = stored_prompt(&state, &record).await? else {
            continue;
        };
        if is_running(&record) {
            running.push(stored.queue_item());
        } else {
            pending.push(stored);
        }
    }
    pending.sort_by_key(|p| p.number);
    let pending: Vec<Value> = pending.iter().map(StoredPrompt::queue_item).collect();
    Ok(Json(
        json!({"queue_running": running, "queue_pending": pending}),
    ))
}

fn is_running(record: &JobRecord) -> bool {
    matches!(record.status, JobStatus::Dispatched | JobStatus::Running)
}

/// `POST /queue`: `{"delete": [prompt ids]}` or `{"clear": true}` cancel
/// pending prompts (a running one is left to `/interrupt`, as in ComfyUI).
pub(crate) async fn change_queue(
    State(state): State<AppState>,
    ComfyTenant(tenant): ComfyTenant,
    body: Bytes,
) -> Result<Response, Problem> {
    let targets = targets_of(&state, &tenant, &change_of(&body)).await?;
    for record in targets
        .iter()
        .filter(|r| !r.status.is_terminal() && !is_running(r))
    {
        crate::routes::request_cancel(&state, record).await?;
    }
    Ok(StatusCode::OK.into_response())
}

/// `POST /interrupt`, optionally `{"prompt_id": …}`: stops that prompt if
/// it runs, or every running prompt of the tenant.
pub(crate) async fn interrupt(
    State(state): State<AppState>,
    ComfyTenant(tenant): ComfyTenant,
    body: Bytes,
) -> Result<Response, Problem> {
    let target = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["prompt_id"].as_str().map(str::to_owned));
    let running: Vec<JobRecord> = match target {
        Some(prompt_id) => find_prompt(&state, &tenant, &prompt_id)
            .await?
            .into_iter()
            .collect(),
        None => prompts(&state, &tenant).await?,
    };
    for record in running.iter().filter(|r| is_running(r)) {
        crate::routes::request_cancel(&state, record).await?;
    }
    Ok(StatusCode::OK.into_response())
}
