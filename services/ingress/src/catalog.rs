//! What the runners offer and what waits for them: `GET /v1/runners` (the
//! `runners` KV bucket), `GET /v1/queue` (the dispatch consumers), and the
//! node-type check of submissions against the target pool's runners.

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::State;
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

#[derive(Debug, Serialize, ToSchema)]
pub struct RunnerList {
    pub runners: Vec<RunnerView>,
}

async fn registrations(state: &AppState) -> Result<Vec<RunnerView>, Problem> {
    let mut keys = state
        .runners
        .keys()
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    let mut runners = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| Problem::unavailable(&e))?;
        if let Ok(Some(value)) = state.runners.get(&key).await
            && let Ok(runner) = serde_json::from_slice::<RunnerView>(&value)
        {
            runners.push(runner);
        }
    }
    runners.sort_by(|a, b| a.runner.cmp(&b.runner));
    Ok(runners)
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

/// Rejects a workflow using node types that no runner of its pool has, when
/// the pool's runners have registered their node types.
pub async fn check_node_types(state: &AppState, valid: &ValidSubmission) -> Result<(), Problem> {
    let runners = registrations(state).await?;
    let known: BTreeSet<&str> = runners
        .iter()
        .filter(|r| r.pool == valid.pool)
        .flat_map(|r| r.node_types.iter().map(String::as_str))
        .collect();
    if known.is_empty() {
        return Ok(()); // Nothing registered: nothing to check against.
    }
    let mut errors = Vec::new();
    if let Some(nodes) = valid.workflow.as_object() {
        for (id, node) in nodes {
            let class = node["class_type"].as_str().unwrap_or_default();
            if !known.contains(class) {
                errors.push(InvalidParam {
                    pointer: format!(
                        "/workflow/{}/class_type",
                        id.replace('~', "~0").replace('/', "~1")
                    ),
                    message: format!(
                        "node type {class:?} is not available on any runner of pool {}",
                        valid.pool
                    ),
                });
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Problem::validation(errors))
    }
}

/// Work waiting for runners in one pool at one priority.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueLevel {
    pub pool: PoolName,
    pub priority: Priority,
    /// Jobs not yet taken by a runner.
    pub depth: u64,
    /// Jobs taken and running (or awaiting their acknowledgement).
    pub in_flight: u64,
    /// How long the oldest waiting job has waited, in seconds.
    pub oldest_wait_s: Option<f64>,
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
    let stream = state
        .js
        .get_stream(state.names.dispatch_stream())
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    let mut consumers = stream.consumers();
    let mut levels = Vec::new();
    let subject_prefix = format!("{}.dispatch.", state.names.prefix());
    while let Some(info) = consumers.next().await {
        let info = info.map_err(|e| Problem::unavailable(&e))?;
        let subject = info.config.filter_subject.clone();
        let Some((pool, priority)) = subject
            .strip_prefix(&subject_prefix)
            .and_then(|rest| rest.split_once('.'))
        else {
            continue;
        };
        let (Ok(pool), Ok(priority)) = (PoolName::new(pool), priority.parse::<Priority>()) else {
            continue;
        };
        let oldest_wait_s = if info.num_pending > 0 {
            stream
                .get_first_raw_message_by_subject(&subject, info.delivered.stream_sequence + 1)
                .await
                .ok()
                .map(|m| {
                    (OffsetDateTime::now_utc() - m.time)
                        .as_seconds_f64()
                        .max(0.0)
                })
        } else {
            None
        };
        levels.push(QueueLevel {
            pool,
            priority,
            depth: info.num_pending,
            in_flight: info.num_ack_pending as u64,
            oldest_wait_s,
        });
    }
    levels.sort_by(|a, b| (&a.pool, a.priority).cmp(&(&b.pool, b.priority)));
    Ok(Json(QueueView { levels }))
}
