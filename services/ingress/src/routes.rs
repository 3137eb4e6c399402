//! `/v1` handlers and the router.

use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use comfyq_shared::ids::{JobId, TenantId};
use comfyq_shared::job::{InputFile, JobRecord, JobSpec, SCHEMA_VERSION};
use comfyq_shared::job_store::JobStoreError;
use comfyq_shared::machine::{self, Input, Transition};
use comfyq_shared::media::MediaError;
use comfyq_shared::messages::{CancelJob, SubmitJob};
use futures::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::io::AsyncReadExt;
use tokio_util::io::ReaderStream;
use tracing::Instrument;

use crate::api::{
    InputSource, JobPage, JobView, Limits, ListQuery, SubmitRequest, ValidSubmission, WaitQuery,
    check_file_name,
};
use crate::auth::Tenant;
use crate::idempotency::{self, Claim};
use crate::problem::{InvalidParam, Problem};
use crate::state::AppState;
use crate::streams::{self, Until};
use crate::{catalog, fetch, listing, live, openapi, upload};

pub fn router(state: AppState) -> axum::Router {
    let body_limit = state.config.max_body_bytes;
    axum::Router::new()
        // Submission enforces its own limits (JSON body, multipart parts).
        .route(
            "/v1/jobs",
            post(submit_job)
                .layer(DefaultBodyLimit::disable())
                .get(list_jobs),
        )
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/outputs/{name}", get(get_output))
        .route("/v1/jobs/{id}/inputs/{name}", get(get_input))
        .merge(crate::webhooks::routes())
        .merge(crate::dead_letters::routes())
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/jobs/{id}/ws", get(job_socket))
        .route("/v1/events", get(tenant_events))
        .route("/v1/runners", get(catalog::list_runners))
        .route("/v1/queue", get(catalog::queue))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::document))
        .merge(openapi::docs())
        .merge(crate::ui::routes())
        .merge(crate::comfy_api::routes(&state.config.comfy_api_prefix))
        .fallback(|| async { Problem::not_found("route") })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(record_request))
        .with_state(state)
}

/// Request count and latency per route pattern (never per job id).
async fn record_request(
    matched: Option<axum::extract::MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = matched
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("comfyq_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("comfyq_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

fn parse_job_id(raw: &str) -> Result<JobId, Problem> {
    // An unparseable id names no job: 404, like any unknown id.
    raw.parse().map_err(|_| Problem::not_found("job"))
}

pub(crate) fn limits(state: &AppState) -> Limits {
    Limits {
        default_timeout_s: state.config.default_timeout_s,
        max_timeout_s: state.config.max_timeout_s,
        max_inputs: state.config.max_inputs,
        max_nodes: state.config.max_nodes,
    }
}

/// A parsed submission body, before validation.
pub(crate) struct Received {
    pub(crate) request: SubmitRequest,
    /// What identifies the request for `Idempotency-Key`.
    pub(crate) fingerprint: String,
    /// Multipart files, already stored under the proposed job id's prefix.
    pub(crate) uploaded: Vec<InputFile>,
}

/// Submit a job: `application/json`, or `multipart/form-data` with a `job`
/// JSON part first and then one file part per input (the part's field name is
/// the input's name).
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
    params(WaitQuery, ("Idempotency-Key" = Option<String>, Header, description = "Same key and body within 24 h returns the same job")),
    request_body(content(
        (SubmitRequest = "application/json"),
        (SubmitRequest = "multipart/form-data"),
    )),
    responses(
        (status = 202, description = "Accepted (or still running after `wait`)", body = JobView,
            headers(("Location" = String, description = "The job's URL"))),
        (status = 200, description = "Finished within `wait` seconds", body = JobView),
        (status = 400, description = "Malformed body", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "Idempotency-Key reused with another body", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "Body or an input too large", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "Neither JSON nor multipart", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid job", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Rate or active-job limit", body = crate::problem::ProblemBody, content_type = "application/problem+json",
            headers(("Retry-After" = u64))),
        (status = 503, description = "Queue unreachable", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn submit_job(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Query(wait): Query<WaitQuery>,
    request: Request,
) -> Result<Response, Problem> {
    let idempotency_key = match request.headers().get(idempotency::HEADER) {
        Some(value) => Some(idempotency::check_key(value.as_bytes())?.to_owned()),
        None => None,
    };
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let proposed = JobId::new();
    let received = if content_type.starts_with("application/json") {
        receive_json(&state, request).await?
    } else if content_type.starts_with("multipart/form-data") {
        let multipart = Multipart::from_request(request, &state)
            .await
            .map_err(|e| Problem::bad_request(e.body_text()))?;
        upload::receive(&state, &tenant, proposed, multipart).await?
    } else {
        return Err(Problem::unsupported_media_type(
            "send application/json or multipart/form-data",
        ));
    };
    let Received {
        request,
        fingerprint,
        uploaded,
    } = received;
    let stored: Vec<String> = uploaded
        .iter()
        .map(|f| state.media.input_key(&tenant, &proposed, &f.name))
        .collect();
    let mut keep_uploads = false;
    let result = async {
        let claim = match &idempotency_key {
            Some(key) => idempotency::claim(&state, &tenant, key, proposed, &fingerprint).await?,
            None => Claim::New(proposed),
        };
        if let Claim::Replay(id) = claim {
            if let Some(record) = find_record(&state, &tenant, &id).await? {
                return respond(&state, record, &wait, true).await;
            }
            if !uploaded.is_empty() {
                // The first request is still storing its files.
                return Err(Problem::conflict(
                    "the first request with this Idempotency-Key is still in progress; retry",
                ));
            }
        }
        let valid = request
            .validate(&limits(&state), uploaded.clone())
            .map_err(Problem::validation)?;
        state
            .active
            .check(&state, &tenant, state.config.max_active_jobs)
            .await?;
        catalog::check_capability(&state, &valid).await?;
        if let Some(webhook) = &valid.webhook {
            fetch::check_webhook(&state, &webhook.url).await?;
        }
        let record = submit(&state, &tenant, claim.job_id(), valid).await?;
        keep_uploads = true;
        respond(&state, record, &wait, matches!(claim, Claim::Replay(_))).await
    }
    .await;
    if !keep_uploads {
        // Nothing of a refused (or replayed) request stays stored.
        for key in &stored {
            if let Err(error) = state.media.delete(key).await {
                tracing::warn!(%error, key, "upload of a refused request not deleted");
            }
        }
    }
    result
}

async fn receive_json(state: &AppState, request: Request) -> Result<Received, Problem> {
    let limit = state.config.max_body_bytes;
    let bytes = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| Problem::too_large(format!("the body exceeds {limit} bytes")))?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Problem::bad_request(format!("invalid JSON: {e}")))?;
    // serde_json's map is ordered by key, so the fingerprint ignores key order.
    let fingerprint = hex::encode(Sha256::digest(value.to_string().as_bytes()));
    let request = SubmitRequest::deserialize(value)
        .map_err(|e| Problem::bad_request(format!("invalid job: {e}")))?;
    Ok(Received {
        request,
        fingerprint,
        uploaded: Vec::new(),
    })
}

pub(crate) async fn find_record(
    state: &AppState,
    tenant: &TenantId,
    id: &JobId,
) -> Result<Option<JobRecord>, Problem> {
    match state.jobs.get(tenant, id).await {
        Ok(found) => Ok(found.map(|v| v.record)),
        Err(JobStoreError::Nats(e)) => Err(Problem::unavailable(&*e)),
        Err(e) => Err(Problem::internal(&e)),
    }
}

/// Stores inputs, queues the job, creates its record. Idempotent per job id.
pub(crate) async fn submit(
    state: &AppState,
    tenant: &TenantId,
    id: JobId,
    valid: ValidSubmission,
) -> Result<JobRecord, Problem> {
    let span = tracing::info_span!("submit", job_id = %id, tenant = %tenant);
    async move {
        let mut inputs = Vec::with_capacity(valid.inputs.len());
        let stored = store_inputs(state, tenant, id, valid.inputs, &mut inputs).await;
        if let Err(problem) = stored {
            // A refused job leaves nothing stored (uploads are the caller's).
            for file in &inputs {
                let _ = state
                    .media
                    .delete(&state.media.input_key(tenant, &id, &file.name))
                    .await;
            }
            return Err(problem);
        }
        let spec = JobSpec {
            id,
            tenant: tenant.clone(),
            priority: valid.priority,
            pool: valid.pool,
            workflow: valid.workflow,
            inputs,
            webhook: valid.webhook,
            metadata: valid.metadata,
            timeout_s: valid.timeout_s,
            // In the spec, so a record the scheduler creates keeps it too.
            inline_outputs: valid.inline_outputs,
            runner_labels: valid.runner_labels,
            every_progress_event: false,
            comfy: valid.comfy,
            created_at: OffsetDateTime::now_utc(),
        };
        // The pending message (which the dispatcher picks up) first, then the
        // `accepted` and `queued` state events (the record): a recorded job
        // always has its message; a message without a record (this process
        // died in between) gets its record from the runner that pulls it.
        let accepted = JobRecord::accepted(&spec);
        let queued = match machine::next(&accepted, &Input::Queue, spec.created_at) {
            Transition::Apply(queued) => *queued,
            _ => accepted.clone(),
        };
        let pending = SubmitJob {
            v: SCHEMA_VERSION,
            spec,
            attempt: 1,
            requeued_at: None,
        };
        let record = match state.jobs.create_queued(&accepted, &queued, &pending).await {
            Ok(_) => queued,
            // A concurrent identical request (same idempotency key) created
            // it first: theirs is the record.
            Err(JobStoreError::Conflict(_)) => {
                find_record(state, tenant, &id).await?.ok_or_else(|| {
                    Problem::conflict(
                        "the first request with this Idempotency-Key is still in progress; retry",
                    )
                })?
            }
            Err(JobStoreError::Nats(e)) => return Err(Problem::unavailable(&*e)),
            Err(e) => return Err(Problem::internal(&e)),
        };
        state.active.accepted(tenant);
        metrics::counter!("comfyq_jobs_submitted_total", "priority" => record.priority.as_str())
            .increment(1);
        tracing::info!("job accepted");
        Ok(record)
    }
    .instrument(span)
    .await
}

/// Stores byte and URL inputs; `inputs` gets each file as it is stored.
async fn store_inputs(
    state: &AppState,
    tenant: &TenantId,
    id: JobId,
    sources: Vec<(String, InputSource)>,
    inputs: &mut Vec<InputFile>,
) -> Result<(), Problem> {
    for (name, source) in sources {
        let key = state.media.input_key(tenant, &id, &name);
        // What the job already stores counts against its media limit.
        let used = inputs.iter().map(|f: &InputFile| f.size).sum();
        let file = match source {
            InputSource::Stored(file) => file,
            InputSource::Bytes(bytes) => {
                let stored = state
                    .media
                    .put(&key, &mut bytes.as_slice(), used, None)
                    .await
                    .map_err(|e| media_problem(&name, e))?;
                InputFile {
                    name,
                    content_type: stored.content_type,
                    size: stored.size,
                    sha256: stored.sha256,
                }
            }
            InputSource::Url(url) => fetch::fetch_input(state, &url, &name, &key, used).await?,
        };
        inputs.push(file);
    }
    Ok(())
}

/// 202 with the job and `Location`, or, with `?wait=N`, 200 once it ends
/// within N seconds.
async fn respond(
    state: &AppState,
    record: JobRecord,
    wait: &WaitQuery,
    replayed: bool,
) -> Result<Response, Problem> {
    let (status, record) = match wait.wait.filter(|w| *w > 0) {
        Some(seconds) => {
            let timeout = Duration::from_secs(seconds.min(state.config.max_wait_s));
            match live::wait_terminal(state, &record, timeout).await? {
                Some(done) => (StatusCode::OK, done),
                None => (
                    StatusCode::ACCEPTED,
                    find_record(state, &record.tenant, &record.id)
                        .await?
                        .unwrap_or(record),
                ),
            }
        }
        None => (StatusCode::ACCEPTED, record),
    };
    let location = format!("/v1/jobs/{}", record.id);
    // A job accepted just now has no progress, outputs or deliveries yet,
    // and its queue position would cost a scan of the queue on every
    // submission: `GET` it for that.
    let just_accepted = !replayed && wait.wait.is_none_or(|w| w == 0);
    let view = if just_accepted {
        JobView::from_record(record)
    } else {
        full_view(state, record).await
    };
    let mut response = (status, Json(view)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Largest output inlined as base64 in the job.
const MAX_INLINE_BYTES: u64 = 16 * 1024 * 1024;

/// The record plus what lives elsewhere: progress, queue position, inline
/// outputs.
async fn full_view(state: &AppState, record: JobRecord) -> JobView {
    let progress = live::progress(state, &record).await;
    let position = live::queue_position(state, &record).await;
    let inline = record.inline_outputs;
    let tenant = record.tenant.clone();
    let id = record.id;
    let mut view = JobView::from_record(record);
    view.progress = progress;
    view.queue_position = position;
    if view.webhook.is_some() {
        view.webhook_deliveries = crate::webhooks::summaries(state, &tenant, &id).await;
    }
    if inline {
        for output in &mut view.outputs {
            if output.file.size > MAX_INLINE_BYTES {
                continue;
            }
            let key = state.media.output_key(&tenant, &id, &output.file.name);
            if let Ok((_, mut object)) = state.media.get(&key).await {
                let mut bytes = Vec::with_capacity(output.file.size as usize);
                if object.read_to_end(&mut bytes).await.is_ok() {
                    output.data = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
                }
            }
        }
    }
    view
}

pub(crate) async fn load_job(
    state: &AppState,
    tenant: &Tenant,
    raw_id: &str,
) -> Result<JobRecord, Problem> {
    let id = parse_job_id(raw_id)?;
    find_record(state, &tenant.0, &id)
        .await?
        .ok_or_else(|| Problem::not_found("job"))
}

/// A job: status, timestamps, queue position, progress, outputs, error.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id"), WaitQuery),
    responses(
        (status = 200, description = "The job (finished, with `wait`)", body = JobView),
        (status = 202, description = "Not finished within `wait`", body = JobView),
        (status = 404, description = "No such job for this tenant", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_job(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    Query(wait): Query<WaitQuery>,
) -> Result<Response, Problem> {
    let record = load_job(&state, &tenant, &id).await?;
    if wait.wait.is_some_and(|w| w > 0) {
        return respond(&state, record, &wait, false).await;
    }
    Ok(Json(full_view(&state, record).await).into_response())
}

/// The tenant's jobs, newest first, with status and time filters.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    params(ListQuery),
    responses(
        (status = 200, description = "One page of jobs", body = JobPage),
        (status = 422, description = "Invalid filter", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_jobs(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobPage>, Problem> {
    let Query(query) = query.map_err(|e| Problem::bad_request(e.body_text()))?;
    Ok(Json(listing::list(&state, &tenant, &query).await?))
}

/// Cancel a job (idempotent): a queued job never runs, a running one is interrupted.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 202, description = "Cancellation requested", body = JobView),
        (status = 200, description = "Already finished", body = JobView),
        (status = 404, description = "No such job for this tenant", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn cancel_job(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let record = load_job(&state, &tenant, &id).await?;
    if record.status.is_terminal() {
        return Ok((StatusCode::OK, Json(JobView::from_record(record))).into_response());
    }
    request_cancel(&state, &record).await?;
    Ok((StatusCode::ACCEPTED, Json(JobView::from_record(record))).into_response())
}

/// Asks the scheduler to cancel the job (stored before this returns).
pub(crate) async fn request_cancel(state: &AppState, record: &JobRecord) -> Result<(), Problem> {
    let cancel = CancelJob {
        v: SCHEMA_VERSION,
        tenant: record.tenant.clone(),
        job_id: record.id,
        requested_at: OffsetDateTime::now_utc(),
    };
    let payload = serde_json::to_vec(&cancel).map_err(|e| Problem::internal(&e))?;
    state
        .js
        .publish(state.names.cancel_subject(), payload.into())
        .await
        .map_err(|e| Problem::unavailable(&e))?
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    Ok(())
}

/// Same as `POST /v1/jobs/{id}/cancel`.
#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 202, description = "Cancellation requested", body = JobView),
        (status = 200, description = "Already finished", body = JobView),
        (status = 404, description = "No such job for this tenant", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
#[allow(dead_code)] // documents the DELETE route, which `cancel_job` serves
pub(crate) async fn delete_job() {}

/// An output's bytes, with `ETag` and `Range`.
#[utoipa::path(get, path = "/v1/jobs/{id}/outputs/{name}", tag = "media",
    params(("id" = String, Path), ("name" = String, Path)),
    responses(
        (status = 200, description = "The bytes", content_type = "application/octet-stream"),
        (status = 206, description = "The requested range", content_type = "application/octet-stream"),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 404, description = "No such job or output", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 416, description = "Range not satisfiable"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_output(
    State(state): State<AppState>,
    tenant: Tenant,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let record = load_job(&state, &tenant, &id).await?;
    if !record.outputs.iter().any(|o| o.name == name) {
        return Err(Problem::not_found("output"));
    }
    let key = state.media.output_key(&record.tenant, &record.id, &name);
    // S3 with `media.presign_ttl`: the client fetches from S3 directly.
    if let Some(url) = state
        .media
        .presigned_url(&key)
        .await
        .map_err(|e| Problem::unavailable(&e))?
    {
        return Ok(axum::response::Redirect::temporary(url.as_str()).into_response());
    }
    stream_object(&state, &key, &headers).await
}

/// An input's bytes, with `ETag` and `Range`.
#[utoipa::path(get, path = "/v1/jobs/{id}/inputs/{name}", tag = "media",
    params(("id" = String, Path), ("name" = String, Path)),
    responses(
        (status = 200, description = "The bytes", content_type = "application/octet-stream"),
        (status = 206, description = "The requested range", content_type = "application/octet-stream"),
        (status = 404, description = "No such job or input", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_input(
    State(state): State<AppState>,
    tenant: Tenant,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let record = load_job(&state, &tenant, &id).await?;
    if check_file_name(&name).is_err() || !record.inputs.iter().any(|i| i.name == name) {
        return Err(Problem::not_found("input"));
    }
    stream_object(
        &state,
        &state.media.input_key(&record.tenant, &record.id, &name),
        &headers,
    )
    .await
}

/// `Range: bytes=a-b` (one range) → (start, end inclusive); `None` if absent
/// or not a single byte range; `Err` if unsatisfiable.
fn parse_range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(raw) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = raw.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None); // Multiple ranges: answer with the whole object.
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (start, end) = match (first.trim(), last.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        (start, "") => (start.parse().map_err(|_| ())?, size.saturating_sub(1)),
        (start, end) => {
            let start: u64 = start.parse().map_err(|_| ())?;
            let end: u64 = end.parse().map_err(|_| ())?;
            (start, end.min(size.saturating_sub(1)))
        }
    };
    if size == 0 || start > end || start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

pub(crate) async fn stream_object(
    state: &AppState,
    key: &str,
    request_headers: &HeaderMap,
) -> Result<Response, Problem> {
    let info = state.media.head(key).await.map_err(|e| match e {
        MediaError::NotFound(_) => Problem::not_found("object"),
        other => Problem::unavailable(&other),
    })?;
    let open = |range: std::ops::Range<u64>| async move {
        state
            .media
            .get_range(key, range)
            .await
            .map(|(_, reader)| reader)
            .map_err(|e| match e {
                MediaError::NotFound(_) => Problem::not_found("object"),
                other => Problem::unavailable(&other),
            })
    };
    let etag = format!("\"{}\"", info.sha256);
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&info.content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value.clone());
    }
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let not_modified = request_headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if not_modified {
        return Ok((StatusCode::NOT_MODIFIED, headers).into_response());
    }
    match parse_range(request_headers, info.size) {
        Ok(None) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size));
            let object = open(0..info.size).await?;
            Ok((headers, Body::from_stream(ReaderStream::new(object))).into_response())
        }
        Ok(Some((start, end))) => {
            let object = open(start..end + 1).await?;
            let length = end - start + 1;
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
            if let Ok(value) = HeaderValue::from_str(&format!("bytes {start}-{end}/{}", info.size))
            {
                headers.insert(header::CONTENT_RANGE, value);
            }
            let body = Body::from_stream(ReaderStream::new(object));
            Ok((StatusCode::PARTIAL_CONTENT, headers, body).into_response())
        }
        Err(()) => {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{}", info.size)) {
                headers.insert(header::CONTENT_RANGE, value);
            }
            Ok((StatusCode::RANGE_NOT_SATISFIABLE, headers).into_response())
        }
    }
}

fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, Problem> {
    match headers.get("last-event-id") {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| {
                Problem::bad_request("Last-Event-ID must be an event id from this stream")
            }),
    }
}

fn sse_response(events: futures::stream::BoxStream<'static, streams::StoredEvent>) -> Response {
    let events = events.map(|event| {
        Ok::<_, std::convert::Infallible>(
            SseEvent::default()
                .id(event.seq.to_string())
                .event(event.kind)
                .data(String::from_utf8_lossy(&event.payload)),
        )
    });
    Sse::new(events)
        .keep_alive(
            KeepAlive::new()
                .interval(streams::HEARTBEAT)
                .text("heartbeat"),
        )
        .into_response()
}

/// Server-Sent Events of one job: every event from the start (or after
/// `Last-Event-ID`), then live; the stream ends after the terminal event.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "events",
    params(("id" = String, Path), ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id")),
    responses(
        (status = 200, description = "`text/event-stream`: `id` = stream sequence, `event` = type, `data` = event JSON", content_type = "text/event-stream"),
        (status = 404, description = "No such job for this tenant", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn job_events(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let record = load_job(&state, &tenant, &id).await?;
    let after = last_event_id(&headers)?;
    let until = if record.status.is_terminal() {
        Until::CaughtUp
    } else {
        Until::Terminal
    };
    let filter = state.names.job_events_filter(&record.tenant, &record.id);
    let events = streams::open(&state, filter, streams::start_policy(after, true), until).await?;
    Ok(sse_response(events))
}

/// Server-Sent Events of all the tenant's jobs, live (or after `Last-Event-ID`).
#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id")),
    responses(
        (status = 200, description = "`text/event-stream` of every event of the tenant's jobs", content_type = "text/event-stream"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn tenant_events(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let after = last_event_id(&headers)?;
    let filter = state.names.tenant_events_filter(&tenant);
    let events = streams::open(
        &state,
        filter,
        streams::start_policy(after, false),
        Until::Forever,
    )
    .await?;
    Ok(sse_response(events))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct SocketQuery {
    /// Resume after this event id (like SSE's `Last-Event-ID`).
    after: Option<u64>,
}

/// The job's events over WebSocket: one text frame per event,
/// `{"id": <stream sequence>, "event": {…}}`; closed after the terminal event.
#[utoipa::path(get, path = "/v1/jobs/{id}/ws", tag = "events",
    params(("id" = String, Path), SocketQuery),
    responses(
        (status = 101, description = "WebSocket upgrade"),
        (status = 404, description = "No such job for this tenant", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn job_socket(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    Query(query): Query<SocketQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, Problem> {
    let record = load_job(&state, &tenant, &id).await?;
    let until = if record.status.is_terminal() {
        Until::CaughtUp
    } else {
        Until::Terminal
    };
    let filter = state.names.job_events_filter(&record.tenant, &record.id);
    let events = streams::open(
        &state,
        filter,
        streams::start_policy(query.after, true),
        until,
    )
    .await?;
    Ok(upgrade.on_upgrade(move |socket| forward_to_socket(socket, events)))
}

async fn forward_to_socket(
    mut socket: WebSocket,
    mut events: futures::stream::BoxStream<'static, streams::StoredEvent>,
) {
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { break };
                let event_json: serde_json::Value =
                    serde_json::from_slice(&event.payload).unwrap_or(serde_json::Value::Null);
                let frame = serde_json::json!({"id": event.seq, "event": event_json});
                if socket.send(WsMessage::Text(frame.to_string().into())).await.is_err() {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                // The client closed or went away; pings are answered by axum.
                None | Some(Err(_)) | Some(Ok(WsMessage::Close(_))) => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = socket.send(WsMessage::Close(None)).await;
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Result<&'static str, Problem> {
    for stream in [
        state.names.jobs_stream(),
        state.names.dispatch_stream(),
        state.names.events_stream(),
    ] {
        state
            .js
            .get_stream(stream)
            .await
            .map_err(|e| Problem::unavailable(&e))?;
    }
    Ok("ready")
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        comfyq_shared::telemetry::metrics().render(),
    )
}

pub(crate) fn validation_error(pointer: &str, message: impl Into<String>) -> Problem {
    Problem::validation(vec![InvalidParam {
        pointer: pointer.to_owned(),
        message: message.into(),
    }])
}

/// A media store error as the client sees it: its own mistakes are 4xx.
pub(crate) fn media_problem(name: &str, error: MediaError) -> Problem {
    match error {
        MediaError::ObjectTooLarge { limit, .. } => {
            Problem::too_large(format!("input {name:?} exceeds {limit} bytes"))
        }
        MediaError::JobTooLarge { limit, .. } => Problem::too_large(format!(
            "input {name:?} takes the job over its {limit}-byte media limit"
        )),
        MediaError::InvalidName(_) => {
            validation_error(&format!("/inputs/{name}"), error.to_string())
        }
        MediaError::Source(e) => Problem::bad_request(format!("reading input {name:?}: {e}")),
        other => Problem::unavailable(&other),
    }
}
