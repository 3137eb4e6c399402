//! What the runners offer and what waits for them: `GET /v1/runners` (the
//! registry buckets), `GET /v1/queue` (pending and dispatch subjects), and the
//! node-type check of submissions against the target pool's runners.

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::State;
use comfyq_shared::capability::Needs;
use comfyq_shared::ids::PoolName;
use comfyq_shared::priority::Priority;
use comfyq_shared::registry::{Fleet, LiveRunner};
use comfyq_shared::workflow::escape_pointer;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::api::ValidSubmission;
use crate::auth::Tenant;
use crate::problem::{InvalidParam, Problem};
use crate::state::AppState;

/// A live runner: its load entry joined with its capability entry.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunnerView {
    #[schema(value_type = String)]
    pub runner: String,
    pub pool: PoolName,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub slots: usize,
    /// Jobs it holds as of its last load entry: exact when it is full,
    /// otherwise as of its last heartbeat (`runner_ttl / 3`).
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
    /// When its load entry was last written.
    #[schema(value_type = String, format = DateTime)]
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl RunnerView {
    fn of(live: &LiveRunner) -> Self {
        let capabilities = live.capabilities.as_deref();
        Self {
            runner: live.load.runner.to_string(),
            pool: live.load.pool.clone(),
            labels: capabilities.map(|c| c.labels.clone()).unwrap_or_default(),
            slots: live.load.slots,
            busy: live.load.busy,
            comfyui_version: capabilities.and_then(|c| c.comfyui_version.clone()),
            ready: live.load.ready,
            vram_free: live.load.vram_free,
            burst_min_pending: live.load.burst_min_pending,
            dispatch_priority: live.load.dispatch_priority,
            node_types: capabilities
                .map(|c| c.node_types.clone())
                .unwrap_or_default(),
            models: capabilities
                .and_then(|c| serde_json::to_value(&c.models).ok())
                .unwrap_or_else(|| Value::Object(Default::default())),
            updated_at: live.load.updated_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunnerList {
    pub runners: Vec<RunnerView>,
}

/// The fleet, kept from one watch on each registry bucket (reading the
/// buckets per request would open consumers per request). Load entries
/// change rarely (heartbeats, readiness, a runner filling up), so this
/// costs little.
#[derive(Debug, Default)]
pub struct RunnerDirectory {
    // A std mutex: held only to copy or update the fleet, never across an await.
    fleet: std::sync::Mutex<Fleet>,
}

impl RunnerDirectory {
    /// Keeps the view up to date until `shutdown`; re-watches after errors.
    pub async fn follow(
        &self,
        load: async_nats::jetstream::kv::Store,
        capabilities: async_nats::jetstream::kv::Store,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let loads = comfyq_shared::kv_view::follow(
            load,
            "runner load entries",
            shutdown.clone(),
            |entry| {
                if let Ok(mut fleet) = self.fleet.lock() {
                    fleet.apply_load(entry);
                }
            },
            || {},
        );
        let capabilities = comfyq_shared::kv_view::follow(
            capabilities,
            "runner capabilities",
            shutdown,
            |entry| {
                if let Ok(mut fleet) = self.fleet.lock() {
                    fleet.apply_capabilities(entry);
                }
            },
            || {},
        );
        futures::join!(loads, capabilities);
    }

    /// Runners whose load entry was written within `ttl`.
    pub fn live(&self, ttl: std::time::Duration) -> Vec<LiveRunner> {
        let now = OffsetDateTime::now_utc();
        self.fleet
            .lock()
            .map(|fleet| fleet.live(ttl, now))
            .unwrap_or_default()
    }
}

pub(crate) fn registrations(state: &AppState) -> Vec<LiveRunner> {
    state.runner_directory.live(state.config.nats.runner_ttl)
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
        runners: registrations(&state).iter().map(RunnerView::of).collect(),
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
    let runners: Vec<LiveRunner> = registrations(state)
        .into_iter()
        .filter(|r| r.load.pool == valid.pool)
        .collect();
    if runners.is_empty() {
        return Ok(()); // Nothing registered: nothing to check against.
    }
    let known: BTreeSet<&str> = runners
        .iter()
        .flat_map(|r| r.offer.node_types.iter().map(String::as_str))
        .collect();
    let mut errors = Vec::new();
    // A runner that could not list its node types (or whose capabilities
    // are not known yet) is assumed to have any.
    let node_types_listed = runners.iter().all(|r| !r.offer.node_types.is_empty());
    if node_types_listed {
        for (id, node) in valid.workflow.nodes() {
            let class = node.class_type.as_str();
            if !known.contains(class) {
                errors.push(InvalidParam {
                    pointer: format!("/workflow/{}/class_type", escape_pointer(id)),
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
        .map(|r| (r, r.offer.missing(&needs)))
        .map(|(r, missing)| missing.map(|m| format!("{} lacks {m}", r.load.runner)))
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
    let pending = &state.pending;
    let mut subjects = pending
        .info_with_subjects(state.names.pending_filter())
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
