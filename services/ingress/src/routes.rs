//! `/v1` handlers and the router.

use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use comfyq_shared::event::Event;
use comfyq_shared::ids::JobId;
use comfyq_shared::job::{InputFile, JobRecord, JobSpec, SCHEMA_VERSION};
use comfyq_shared::job_store::JobStoreError;
use comfyq_shared::media::{MediaError, sniff_content_type};
use comfyq_shared::messages::{CancelJob, SubmitJob};
use time::OffsetDateTime;
use tokio_util::io::ReaderStream;
use tracing::Instrument;

use crate::api::{JobView, SubmitRequest, check_file_name};
use crate::auth::Tenant;
use crate::problem::Problem;
use crate::state::AppState;

pub fn router(state: AppState) -> axum::Router {
    let body_limit = state.config.max_body_bytes;
    axum::Router::new()
        .route("/v1/jobs", post(submit_job))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/outputs/{name}", get(get_output))
        .route("/v1/jobs/{id}/inputs/{name}", get(get_input))
        .merge(crate::webhooks::routes())
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
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

async fn submit_job(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    body: Result<Json<SubmitRequest>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(request) = body.map_err(|rejection| match rejection {
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Problem::too_large(format!(
                "the body exceeds {} bytes",
                state.config.max_body_bytes
            ))
        }
        other => Problem::bad_request(other.body_text()),
    })?;
    let valid = request
        .validate(state.config.default_timeout_s, state.config.max_timeout_s)
        .map_err(Problem::validation)?;

    let id = JobId::new();
    let span = tracing::info_span!("submit", job_id = %id, tenant = %tenant);
    async move {
        let mut inputs = Vec::with_capacity(valid.inputs.len());
        for (name, bytes) in &valid.inputs {
            let content_type = sniff_content_type(bytes, name);
            let key = state.media.input_key(&tenant, &id, name);
            let stored = state
                .media
                .put(&key, &content_type, &mut bytes.as_slice())
                .await
                .map_err(|e| Problem::unavailable(&e))?;
            inputs.push(InputFile {
                name: name.clone(),
                content_type,
                size: stored.size,
                sha256: stored.sha256,
            });
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
            created_at: OffsetDateTime::now_utc(),
        };
        let record = JobRecord::accepted(&spec);

        // Queue first: once the submission is in the stream the job cannot be
        // lost. The record is created after; the scheduler creates it itself
        // if this process dies in between.
        let submit = SubmitJob {
            v: SCHEMA_VERSION,
            spec,
        };
        let payload = serde_json::to_vec(&submit).map_err(|e| Problem::internal(&e))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.to_string().as_str());
        state
            .js
            .publish_with_headers(state.names.submit_subject(), headers, payload.into())
            .await
            .map_err(|e| Problem::unavailable(&e))?
            .await
            .map_err(|e| Problem::unavailable(&e))?;
        match state.jobs.create(&record).await {
            Ok(_) => {
                if let Err(error) = state.events.publish(&Event::for_state(&record)).await {
                    tracing::warn!(%error, "accepted event not published");
                }
            }
            Err(JobStoreError::Conflict(_)) => {}
            Err(error) => {
                tracing::warn!(%error, "record not created; the scheduler will create it")
            }
        }
        metrics::counter!("comfyq_jobs_submitted_total", "priority" => record.priority.as_str())
            .increment(1);
        tracing::info!("job accepted");

        let location = format!("/v1/jobs/{id}");
        let mut response =
            (StatusCode::ACCEPTED, Json(JobView::from_record(record))).into_response();
        if let Ok(value) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, value);
        }
        Ok(response)
    }
    .instrument(span)
    .await
}

pub(crate) async fn load_job(
    state: &AppState,
    tenant: &Tenant,
    raw_id: &str,
) -> Result<JobRecord, Problem> {
    let id = parse_job_id(raw_id)?;
    match state.jobs.get(&tenant.0, &id).await {
        Ok(Some(versioned)) => Ok(versioned.record),
        Ok(None) => Err(Problem::not_found("job")),
        Err(JobStoreError::Nats(e)) => Err(Problem::unavailable(&*e)),
        Err(e) => Err(Problem::internal(&e)),
    }
}

async fn get_job(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<JobView>, Problem> {
    Ok(Json(JobView::from_record(
        load_job(&state, &tenant, &id).await?,
    )))
}

async fn cancel_job(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let record = load_job(&state, &tenant, &id).await?;
    if record.status.is_terminal() {
        return Ok((StatusCode::OK, Json(JobView::from_record(record))).into_response());
    }
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
    Ok((StatusCode::ACCEPTED, Json(JobView::from_record(record))).into_response())
}

async fn get_output(
    State(state): State<AppState>,
    tenant: Tenant,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let record = load_job(&state, &tenant, &id).await?;
    if !record.outputs.iter().any(|o| o.name == name) {
        return Err(Problem::not_found("output"));
    }
    stream_object(
        &state,
        &state.media.output_key(&record.tenant, &record.id, &name),
    )
    .await
}

async fn get_input(
    State(state): State<AppState>,
    tenant: Tenant,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let record = load_job(&state, &tenant, &id).await?;
    if check_file_name(&name).is_err() || !record.inputs.iter().any(|i| i.name == name) {
        return Err(Problem::not_found("input"));
    }
    stream_object(
        &state,
        &state.media.input_key(&record.tenant, &record.id, &name),
    )
    .await
}

async fn stream_object(state: &AppState, key: &str) -> Result<Response, Problem> {
    let (info, object) = state.media.get(key).await.map_err(|e| match e {
        MediaError::NotFound(_) => Problem::not_found("object"),
        other => Problem::unavailable(&other),
    })?;
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&info.content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size));
    if let Ok(value) = HeaderValue::from_str(&format!("\"{}\"", info.sha256)) {
        headers.insert(header::ETAG, value);
    }
    Ok((headers, Body::from_stream(ReaderStream::new(object))).into_response())
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Result<&'static str, Problem> {
    state
        .js
        .get_stream(state.names.jobs_stream())
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    Ok("ready")
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        comfyq_shared::telemetry::metrics().render(),
    )
}
