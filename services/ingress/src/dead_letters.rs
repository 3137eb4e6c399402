//! `GET /v1/dead-letters`: the tenant's jobs whose attempts ran out;
//! `POST /v1/jobs/{id}/retry`: put one back in the queue.
//!
//! The scheduler writes the dead letters (KV `comfyq_dead_letters`, key
//! `<tenant>.<job>`, with the job's spec) and stays the one writer of job
//! records: a retry here only sends `RetryJob` on `comfyq.jobs.retry`.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use comfyq_shared::dead_letter::DeadLetter;
use comfyq_shared::ids::{JobId, PoolName, RunnerId};
use comfyq_shared::job::{JobError, JobStatus, SCHEMA_VERSION};
use comfyq_shared::messages::RetryJob;
use comfyq_shared::priority::Priority;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use crate::api::JobView;
use crate::auth::Tenant;
use crate::problem::{InvalidParam, Problem};
use crate::routes::load_job;
use crate::state::AppState;

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 200;
/// Entries read concurrently while filling a page.
const READ_AHEAD: usize = 16;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/dead-letters", get(list_dead_letters))
        .route("/v1/jobs/{id}/retry", post(retry_job))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterQuery {
    /// Page size, 1 to 200 (default 50).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A job whose attempts ran out.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterView {
    pub job_id: JobId,
    pub pool: PoolName,
    pub priority: Priority,
    /// The last attempt made.
    pub attempts: u32,
    /// Times an operator requeued the job before this failure.
    pub requeues: u32,
    pub error: Option<JobError>,
    /// The runner of the last attempt, if one reported.
    pub runner: Option<RunnerId>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub failed_at: OffsetDateTime,
    /// `POST` here to requeue it.
    pub retry_url: String,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(letter: DeadLetter) -> Self {
        Self {
            retry_url: format!("/v1/jobs/{}/retry", letter.spec.id),
            job_id: letter.spec.id,
            pool: letter.spec.pool,
            priority: letter.spec.priority,
            attempts: letter.attempts,
            requeues: letter.requeues,
            error: letter.error,
            runner: letter.runner,
            created_at: letter.spec.created_at,
            failed_at: letter.failed_at,
        }
    }
}

/// One page of dead letters, newest job first.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetterView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// The tenant's dead letters: jobs that failed because every delivery or
/// attempt was used up (a runner kept dying, or kept failing retryably).
#[utoipa::path(get, path = "/v1/dead-letters", tag = "dead-letters",
    params(DeadLetterQuery),
    responses(
        (status = 200, description = "One page of dead letters", body = DeadLetterPage),
        (status = 400, description = "Unknown query parameter", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid limit or cursor", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_dead_letters(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    query: Result<Query<DeadLetterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeadLetterPage>, Problem> {
    let Query(query) = query.map_err(|e| Problem::bad_request(e.body_text()))?;
    let mut errors = Vec::new();
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        errors.push(InvalidParam {
            pointer: "/limit".to_owned(),
            message: format!("must be 1 to {MAX_LIMIT}"),
        });
    }
    let cursor = match query.cursor.as_deref().map(str::parse::<JobId>) {
        None => None,
        Some(Ok(cursor)) => Some(cursor),
        Some(Err(_)) => {
            errors.push(InvalidParam {
                pointer: "/cursor".to_owned(),
                message: "not a cursor from a previous page".to_owned(),
            });
            None
        }
    };
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }

    let filter = state.names.tenant_dead_letters_kv_subjects(&tenant);
    let mut ids =
        crate::listing::job_ids_in_bucket(&state, &state.names.dead_letters_kv_stream(), filter)
            .await?;
    ids.sort_unstable_by(|a, b| b.cmp(a));
    let candidates: Vec<JobId> = ids
        .into_iter()
        .filter(|id| cursor.is_none_or(|cursor| *id < cursor))
        .collect();
    let remaining = candidates.len();
    let mut entries = futures::stream::iter(candidates)
        .map(|id| {
            let key = state.names.job_key(&tenant, &id);
            let store = state.dead_letters.clone();
            async move { store.get(key).await }
        })
        .buffered(READ_AHEAD);
    let mut page = Vec::new();
    let mut read = 0;
    while let Some(entry) = entries.next().await {
        read += 1;
        let bytes = match entry {
            Ok(Some(bytes)) => bytes,
            // Requeued since the keys were read.
            Ok(None) => continue,
            Err(e) => return Err(Problem::unavailable(&e)),
        };
        match serde_json::from_slice::<DeadLetter>(&bytes) {
            Ok(letter) => page.push(DeadLetterView::from(letter)),
            Err(error) => tracing::warn!(%error, "unreadable dead letter skipped"),
        }
        if page.len() == limit {
            break;
        }
    }
    let next_cursor = (page.len() == limit && read < remaining)
        .then(|| page.last().map(|letter| letter.job_id.to_string()))
        .flatten();
    Ok(Json(DeadLetterPage {
        dead_letters: page,
        next_cursor,
    }))
}

/// Requeues a dead-lettered job with a fresh attempt budget. Attempt numbers
/// keep counting; the job runs again from its original workflow and inputs.
#[utoipa::path(post, path = "/v1/jobs/{id}/retry", tag = "dead-letters",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 202, description = "Requeue requested; the job turns `queued` shortly", body = JobView),
        (status = 404, description = "No such job for this tenant", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "The job is not failed, or failed for a reason a retry cannot fix (not a dead letter)", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn retry_job(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<JobView>), Problem> {
    let record = load_job(&state, &tenant, &id).await?;
    if record.status != JobStatus::Failed {
        return Err(Problem::conflict(format!(
            "the job is {}; only a failed job can be retried",
            record.status
        )));
    }
    let key = state.names.job_key(&record.tenant, &record.id);
    let letter = match state.dead_letters.get(&key).await {
        Ok(Some(bytes)) => {
            serde_json::from_slice::<DeadLetter>(&bytes).map_err(|e| Problem::internal(&e))?
        }
        Ok(None) => {
            let kind = record
                .error
                .as_ref()
                .and_then(|e| serde_json::to_value(e.kind).ok())
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "unknown".to_owned());
            return Err(Problem::conflict(format!(
                "the job failed with kind {kind}, which another attempt cannot fix; \
                 only dead letters (attempts used up) are retried: submit a corrected job"
            )));
        }
        Err(e) => return Err(Problem::unavailable(&e)),
    };
    if letter.requeues != record.requeues {
        return Err(Problem::conflict(
            "the job is being requeued already".to_owned(),
        ));
    }
    let retry = RetryJob {
        v: SCHEMA_VERSION,
        tenant: record.tenant.clone(),
        job_id: record.id,
        requeues: record.requeues,
        requested_at: OffsetDateTime::now_utc(),
    };
    let payload = serde_json::to_vec(&retry).map_err(|e| Problem::internal(&e))?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        retry.message_id().as_str(),
    );
    state
        .js
        .publish_with_headers(state.names.retry_subject(), headers, payload.into())
        .await
        .map_err(|e| Problem::unavailable(&e))?
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    Ok((StatusCode::ACCEPTED, Json(JobView::from_record(record))))
}
