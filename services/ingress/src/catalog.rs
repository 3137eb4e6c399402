//! What the runners offer and what waits for them: `GET /v1/runners` (the
//! `runners` KV bucket), `GET /v1/queue` (the dispatch consumers), and the
//! node-type check of submissions against the target pool's runners.

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::State;
use comfyq_shared::capability::{Needs, Offer};
use comfyq_shared::ids::PoolName;
use comfyq_shared::priority::Priority;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::api::ValidSubmission;
use crate::auth::Tenant;
use crate::problem::{InvalidParam, Problem};
use crate::state::AppState;

/// A runner's registration, as runners write it (unknown fields ignored).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunnerView {
    #[schema(value_type = String)]
    pub runner: String,
    pub pool: PoolName,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub slots: usize,
    #[serde(default)]
    pub busy: usize,
    #[serde(default)]
    pub comfyui_version: Option<String>,
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub vram_free: Option<u64>,
    /// A burst runner: it takes work only while this many jobs wait unpulled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_min_pending: Option<usize>,
    /// Its rank under the `prioritized` policy (0 is served first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch_priority: Option<u8>,
    /// ComfyUI node types it can run.
    #[serde(default)]
    pub node_types: Vec<String>,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub models: Value,
    #[schema(value_type = String, format = DateTime)]
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl RunnerView {
    /// What this runner can run. Model folders come as registered
    /// (`{folder: [file, …]}`); anything else there is left unchecked.
    fn offer(&self) -> Offer {
        let models: BTreeMap<String, Vec<String>> =
            serde_json::from_value(self.models.clone()).unwrap_or_default();
        Offer::new(&self.node_types, &models, &self.labels)
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunnerList {
    pub runners: Vec<RunnerView>,
}

/// Live runner registrations, kept from one watch on the runners bucket
/// (reading the bucket per request would open a consumer per request).
#[derive(Debug, Default)]
pub struct RunnerDirectory {
    // A std mutex: held only to copy or update the map, never across an await.
    by_key: std::sync::Mutex<BTreeMap<String, (RunnerView, OffsetDateTime)>>,
}

impl RunnerDirectory {
    /// Keeps the view up to date until `shutdown`; re-watches after errors.
    pub async fn follow(
        &self,
        runners: async_nats::jetstream::kv::Store,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        use async_nats::jetstream::kv::Operation;
        let apply = |entry: &async_nats::jetstream::kv::Entry| {
            let Ok(mut by_key) = self.by_key.lock() else {
                return;
            };
            match (
                entry.operation,
                serde_json::from_slice::<RunnerView>(&entry.value),
            ) {
                (Operation::Put, Ok(view)) => {
                    by_key.insert(entry.key.clone(), (view, entry.created));
                }
                _ => {
                    by_key.remove(&entry.key);
                }
            }
        };
        comfyq_shared::kv_view::follow(runners, "runner registrations", shutdown, apply, || {})
            .await;
    }

    /// Registrations refreshed within `ttl` (the bucket's age limit expires
    /// entries without telling watchers, so staleness is judged here).
    pub fn live(&self, ttl: std::time::Duration) -> Vec<RunnerView> {
        let now = OffsetDateTime::now_utc();
        let mut runners: Vec<RunnerView> = self
            .by_key
            .lock()
            .map(|by_key| {
                by_key
                    .values()
                    .filter(|(_, written)| (now - *written).unsigned_abs() <= ttl)
                    .map(|(view, _)| view.clone())
                    .collect()
            })
            .unwrap_or_default();
        runners.sort_by(|a, b| a.runner.cmp(&b.runner));
        runners
    }
}

async fn registrations(state: &AppState) -> Result<Vec<RunnerView>, Problem> {
    Ok(state.runner_directory.live(state.config.nats.runner_ttl))
}

/// Registered runners (entries expire without a heartbeat).
#[utoipa::path(get, path = "/v1/runners", tag = "runners",
    responses((status = 200, body = RunnerList)),
    security(("bearer" = []))
)]
pub(crate) async fn list_runners(
    State(state): State<AppState>,
    _tenant: Tenant,
) -> Result<Json<RunnerList>, Problem> {
    Ok(Json(RunnerList {
        runners: registrations(&state).await?,
    }))
}

/// Rejects a job that no registered runner of its pool can run (unless
/// configured to let the scheduler hold such jobs as
/// `waiting_for_capability`): node types no runner has are named one by
/// one; otherwise, when every runner lacks something (a model file its
/// loaders name, a required label, or the combination of node types), the
/// answer says what each lacks. A pool without registrations is not checked.
pub async fn check_capability(state: &AppState, valid: &ValidSubmission) -> Result<(), Problem> {
    if !state.config.reject_unrunnable {
        return Ok(());
    }
    let runners: Vec<RunnerView> = registrations(state)
        .await?
        .into_iter()
        .filter(|r| r.pool == valid.pool)
        .collect();
    if runners.is_empty() {
        return Ok(()); // Nothing registered: nothing to check against.
    }
    let known: BTreeSet<&str> = runners
        .iter()
        .flat_map(|r| r.node_types.iter().map(String::as_str))
        .collect();
    let mut errors = Vec::new();
    // A runner that could not list its node types is assumed to have any.
    let node_types_listed = runners.iter().all(|r| !r.node_types.is_empty());
    if node_types_listed && let Some(nodes) = valid.workflow.as_object() {
        for (id, node) in nodes {
            let class = node["class_type"].as_str().unwrap_or_default();
            if !known.contains(class) {
                errors.push(InvalidParam {
                    pointer: format!("/workflow/{}/class_type", json_pointer_token(id)),
                    message: format!(
                        "node type {class:?} is not available on any runner of pool {}",
                        valid.pool
                    ),
                });
            }
        }
    }
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    let needs = Needs::of_workflow(&valid.workflow, &valid.runner_labels);
    let lacking: Vec<String> = runners
        .iter()
        .map(|r| (r, r.offer().missing(&needs)))
        .map(|(r, missing)| missing.map(|m| format!("{} lacks {m}", r.runner)))
        .collect::<Option<Vec<_>>>()
        .unwrap_or_default();
    if lacking.is_empty() {
        return Ok(());
    }
    const SHOWN: usize = 3;
    let mut message = format!(
        "no runner of pool {} can run this job: {}",
        valid.pool,
        lacking[..lacking.len().min(SHOWN)].join("; ")
    );
    if lacking.len() > SHOWN {
        message.push_str(&format!("; and {} more", lacking.len() - SHOWN));
    }
    let pointer = if needs.labels.is_empty() {
        "/workflow"
    } else {
        "/runner_labels"
    };
    Err(Problem::validation(vec![InvalidParam {
        pointer: pointer.to_owned(),
        message,
    }]))
}

/// RFC 6901 escaping of one reference token.
fn json_pointer_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// Work waiting for runners in one pool at one priority.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueLevel {
    pub pool: PoolName,
    pub priority: Priority,
    /// Jobs held by the scheduler until a slot frees.
    pub depth: u64,
    /// Jobs handed to the pool's runners: running, backing off before a
    /// retry, or stored for the next free runner to pull.
    pub in_flight: u64,
    /// How long the oldest waiting job has waited, in seconds.
    pub oldest_wait_s: Option<f64>,
}

impl QueueLevel {
    fn empty(pool: PoolName, priority: Priority) -> Self {
        Self {
            pool,
            priority,
            depth: 0,
            in_flight: 0,
            oldest_wait_s: None,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueView {
    pub levels: Vec<QueueLevel>,
}

/// Queue depth per pool and priority, from the dispatch consumers.
#[utoipa::path(get, path = "/v1/queue", tag = "runners",
    responses((status = 200, body = QueueView)),
    security(("bearer" = []))
)]
pub(crate) async fn queue(
    State(state): State<AppState>,
    _tenant: Tenant,
) -> Result<Json<QueueView>, Problem> {
    use std::collections::BTreeMap;
    let unavailable = |e: &dyn std::error::Error| Problem::unavailable(e);
    // Jobs wait in PENDING until the scheduler dispatches them; once in
    // DISPATCH they wait for a runner to pull them.
    let mut levels: BTreeMap<(PoolName, Priority), QueueLevel> = BTreeMap::new();
    let pending = state
        .js
        .get_stream(state.names.pending_stream())
        .await
        .map_err(|e| unavailable(&e))?;
    let mut subjects = pending
        .info_with_subjects(format!("{}.pending.>", state.names.prefix()))
        .await
        .map_err(|e| unavailable(&e))?;
    while let Some(entry) = subjects.next().await {
        let (subject, count) = entry.map_err(|e| unavailable(&e))?;
        if let Some((pool, priority, _tenant)) = state.names.parse_pending_subject(&subject) {
            let level = levels
                .entry((pool.clone(), priority))
                .or_insert_with(|| QueueLevel::empty(pool, priority));
            level.depth += count as u64;
        }
    }
    let now = OffsetDateTime::now_utc();
    let age = |time: OffsetDateTime| (now - time).as_seconds_f64().max(0.0);
    for ((pool, priority), level) in levels.iter_mut() {
        let filter = state.names.pending_priority_filter(pool, *priority);
        level.oldest_wait_s = pending
            .get_first_raw_message_by_subject(&filter, 1)
            .await
            .ok()
            .map(|m| age(m.time));
    }

    let dispatch = state
        .js
        .get_stream(state.names.dispatch_stream())
        .await
        .map_err(|e| unavailable(&e))?;
    // One dispatch consumer per pool: every pool with one shows all levels.
    let mut consumers = dispatch.consumers();
    while let Some(info) = consumers.next().await {
        let info = info.map_err(|e| unavailable(&e))?;
        if let Some(pool) = state
            .names
            .parse_dispatch_pool_filter(&info.config.filter_subject)
        {
            for priority in Priority::ALL {
                levels
                    .entry((pool.clone(), priority))
                    .or_insert_with(|| QueueLevel::empty(pool.clone(), priority));
            }
        }
    }
    // DISPATCH is about the free slots deep: what is there is running, or
    // stored for the next runner's waiting pull.
    let mut subjects = dispatch
        .info_with_subjects(format!("{}.dispatch.>", state.names.prefix()))
        .await
        .map_err(|e| unavailable(&e))?;
    while let Some(entry) = subjects.next().await {
        let (subject, count) = entry.map_err(|e| unavailable(&e))?;
        if let Some((pool, priority, _tenant)) = state.names.parse_dispatch_subject(&subject) {
            levels
                .entry((pool.clone(), priority))
                .or_insert_with(|| QueueLevel::empty(pool, priority))
                .in_flight += count as u64;
        }
    }
    let levels = levels.into_values().collect();
    Ok(Json(QueueView { levels }))
}
