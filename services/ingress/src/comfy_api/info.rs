//! What the fleet offers, in ComfyUI's shapes: `/features`,
//! `/system_stats`, `/models`, `/models/{folder}`, `/embeddings`,
//! `/extensions`, from the live runners' registrations, and
//! `/object_info[/{class}]`, the union of what each runner's ComfyUI
//! answered (stored by the runner, read once per registration and kept
//! here); for the default pool, or the pool named by the `Comfyq-Pool`
//! header.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use comfyq_shared::ids::RunnerId;
use comfyq_shared::media::COMFY_OBJECT_INFO_OBJECT;
use comfyq_shared::registry::LiveRunner;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::prompt::POOL_HEADER;
use super::{ComfyTenant, read_json};
use crate::state::AppState;

/// ComfyUI's feature flags as this API offers them.
pub(crate) fn feature_flags(state: &AppState) -> Value {
    json!({"supports_preview_metadata": true, "max_upload_size": state.config.max_input_bytes})
}

fn pool_runners(state: &AppState, headers: &HeaderMap) -> Vec<LiveRunner> {
    let default = comfyq_shared::ids::PoolName::default();
    let pool = headers
        .get(POOL_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(default.as_str());
    runners_of(state, pool)
}

fn runners_of(state: &AppState, pool: &str) -> Vec<LiveRunner> {
    crate::catalog::registrations(state)
        .into_iter()
        .filter(|r| r.load.pool.as_str() == pool)
        .collect()
}

pub(crate) async fn features(State(state): State<AppState>, _tenant: ComfyTenant) -> Json<Value> {
    Json(feature_flags(&state))
}

/// `GET /system_stats`: one device per live runner of the pool.
pub(crate) async fn system_stats(
    State(state): State<AppState>,
    _tenant: ComfyTenant,
    headers: HeaderMap,
) -> Json<Value> {
    let runners = pool_runners(&state, &headers);
    let version = runners
        .iter()
        .filter_map(|r| r.capabilities.as_ref()?.comfyui_version.clone())
        .max()
        .unwrap_or_else(|| "0.3.64".to_owned());
    let devices: Vec<Value> = runners
        .iter()
        .enumerate()
        .map(|(index, r)| {
            json!({
                "name": r.load.runner.to_string(),
                "type": "comfyq-runner",
                "index": index,
                "vram_total": r.load.vram_free,
                "vram_free": r.load.vram_free,
                "torch_vram_total": r.load.vram_free,
                "torch_vram_free": r.load.vram_free,
            })
        })
        .collect();
    Json(json!({
        "system": {
            "os": "comfyq",
            "ram_total": 0,
            "ram_free": 0,
            "comfyui_version": version,
            "python_version": "",
            "pytorch_version": "",
            "embedded_python": false,
            "argv": [],
        },
        "devices": devices,
    }))
}

fn folders(runners: &[LiveRunner]) -> BTreeSet<String> {
    runners
        .iter()
        .filter_map(|r| r.capabilities.as_ref())
        .flat_map(|c| c.models.keys().cloned())
        .collect()
}

fn files_in(runners: &[LiveRunner], folder: &str) -> Option<BTreeSet<String>> {
    let mut found = None;
    for capabilities in runners.iter().filter_map(|r| r.capabilities.as_ref()) {
        if let Some(files) = capabilities.models.get(folder) {
            found
                .get_or_insert_with(BTreeSet::new)
                .extend(files.iter().cloned());
        }
    }
    found
}

/// `GET /models`: the model folders the pool's runners list.
pub(crate) async fn model_folders(
    State(state): State<AppState>,
    _tenant: ComfyTenant,
    headers: HeaderMap,
) -> Json<Vec<String>> {
    Json(
        folders(&pool_runners(&state, &headers))
            .into_iter()
            .collect(),
    )
}

/// `GET /models/{folder}`: the union of the runners' files; 404 for a
/// folder none lists.
pub(crate) async fn models(
    State(state): State<AppState>,
    _tenant: ComfyTenant,
    headers: HeaderMap,
    Path(folder): Path<String>,
) -> Response {
    match files_in(&pool_runners(&state, &headers), &folder) {
        Some(files) => Json(files.into_iter().collect::<Vec<_>>()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `GET /embeddings`: embedding names without their extension.
pub(crate) async fn embeddings(
    State(state): State<AppState>,
    _tenant: ComfyTenant,
    headers: HeaderMap,
) -> Json<Vec<String>> {
    let files = files_in(&pool_runners(&state, &headers), "embeddings").unwrap_or_default();
    Json(
        files
            .iter()
            .map(|f| {
                f.rsplit_once('.')
                    .map_or(f.as_str(), |(stem, _)| stem)
                    .to_owned()
            })
            .collect(),
    )
}

/// `GET /extensions`: the web extensions of ComfyUI's frontend, which this
/// API does not serve.
pub(crate) async fn extensions(_tenant: ComfyTenant) -> Json<Vec<String>> {
    Json(Vec::new())
}

/// Node definitions by class, as one ComfyUI answered `/object_info`.
pub(crate) type Definitions = BTreeMap<String, Value>;

/// Each runner's `object_info`, read once per registration (a runner whose
/// capabilities entry is rewritten is read again).
#[derive(Debug, Default)]
pub(crate) struct ObjectInfoCache {
    // A std mutex: held only to look up or insert, never across an await.
    by_runner: Mutex<HashMap<RunnerId, (OffsetDateTime, Arc<Definitions>)>>,
}

impl ObjectInfoCache {
    async fn of(&self, state: &AppState, runner: &LiveRunner) -> Option<Arc<Definitions>> {
        let registered = runner.capabilities.as_ref()?.updated_at;
        let id = &runner.load.runner;
        let cached = self
            .by_runner
            .lock()
            .ok()
            .and_then(|m| m.get(id).cloned())
            .filter(|(at, _)| *at == registered);
        if let Some((_, definitions)) = cached {
            return Some(definitions);
        }
        let key = state.media.runner_key(id, COMFY_OBJECT_INFO_OBJECT);
        let definitions: Arc<Definitions> = Arc::new(read_json(state, &key).await.ok().flatten()?);
        if let Ok(mut by_runner) = self.by_runner.lock() {
            by_runner.insert(id.clone(), (registered, definitions.clone()));
        }
        Some(definitions)
    }
}

/// The union of the pool's runners' node definitions (the first runner
/// that has a class describes it).
async fn definitions(state: &AppState, headers: &HeaderMap) -> Definitions {
    let mut union = Definitions::new();
    for runner in pool_runners(state, headers) {
        if let Some(definitions) = state.comfy_object_info.of(state, &runner).await {
            for (class, definition) in definitions.iter() {
                union
                    .entry(class.clone())
                    .or_insert_with(|| definition.clone());
            }
        }
    }
    union
}

/// Each of the pool's runners' node definitions (the cached ones, not
/// copies), when every live runner of the pool has stored them; `None`
/// otherwise (no runner, or one not yet described, whose classes would
/// wrongly count as unknown).
pub(crate) async fn pool_definitions(
    state: &AppState,
    pool: &str,
) -> Option<Vec<Arc<Definitions>>> {
    let runners = runners_of(state, pool);
    if runners.is_empty() {
        return None;
    }
    let mut all = Vec::with_capacity(runners.len());
    for runner in runners {
        all.push(state.comfy_object_info.of(state, &runner).await?);
    }
    Some(all)
}

/// `GET /object_info`.
pub(crate) async fn object_info(
    State(state): State<AppState>,
    _tenant: ComfyTenant,
    headers: HeaderMap,
) -> Json<Definitions> {
    Json(definitions(&state, &headers).await)
}

/// `GET /object_info/{class}`: `{class: definition}`, or `{}`.
pub(crate) async fn object_info_of(
    State(state): State<AppState>,
    _tenant: ComfyTenant,
    headers: HeaderMap,
    Path(class): Path<String>,
) -> Json<Definitions> {
    let mut all = definitions(&state, &headers).await;
    Json(all.remove_entry(&class).into_iter().collect())
}
