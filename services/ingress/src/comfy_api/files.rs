//! `/view` (a job's outputs and the tenant's uploads, from the object
//! store, with `Range`) and `/upload/image` (kept per tenant; a prompt that
//! names an upload gets a copy among its job's inputs).

use axum::Json;
use axum::extract::{Multipart, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use comfyq_shared::media::MediaError;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{ComfyTenant, parse_shown_subfolder};
use crate::api::check_file_name;
use crate::problem::Problem;
use crate::state::AppState;

#[derive(Debug, Deserialize)]
pub(crate) struct ViewQuery {
    filename: Option<String>,
    #[serde(default)]
    subfolder: String,
    #[serde(rename = "type")]
    folder_type: Option<String>,
}

/// ComfyUI answers `/view` refusals with an empty body.
fn empty(status: StatusCode) -> Response {
    status.into_response()
}

/// `GET /view?filename=&subfolder=&type=`.
pub(crate) async fn view(
    State(state): State<AppState>,
    ComfyTenant(tenant): ComfyTenant,
    Query(query): Query<ViewQuery>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let Some(mut filename) = query.filename else {
        return Ok(empty(StatusCode::NOT_FOUND));
    };
    let mut folder_type = query.folder_type.unwrap_or_else(|| "output".to_owned());
    // ComfyUI's annotated names: `name.png [input]`.
    for annotation in ["input", "output", "temp"] {
        if let Some(name) = filename.strip_suffix(&format!(" [{annotation}]")) {
            filename = name.to_owned();
            folder_type = annotation.to_owned();
        }
    }
    if !matches!(folder_type.as_str(), "input" | "output" | "temp") {
        return Ok(empty(StatusCode::BAD_REQUEST));
    }
    if filename.starts_with('/') || filename.contains("..") {
        return Ok(empty(StatusCode::BAD_REQUEST));
    }
    if query.subfolder.contains("..") {
        return Ok(empty(StatusCode::FORBIDDEN));
    }
    let key = if folder_type == "input" {
        if !query.subfolder.is_empty() || check_file_name(&filename).is_err() {
            return Ok(empty(StatusCode::NOT_FOUND));
        }
        state.media.upload_key(&tenant, &filename)
    } else {
        let Some((job, own_subfolder)) = parse_shown_subfolder(&query.subfolder) else {
            return Ok(empty(StatusCode::NOT_FOUND));
        };
        let Some(record) = crate::routes::find_record(&state, &tenant, &job).await? else {
            return Ok(empty(StatusCode::NOT_FOUND));
        };
        let found = record.outputs.iter().find(|o| {
            o.comfy.as_ref().is_some_and(|c| {
                c.filename == filename
                    && c.subfolder == own_subfolder
                    && c.folder_type == folder_type
            })
        });
        let Some(output) = found else {
            return Ok(empty(StatusCode::NOT_FOUND));
        };
        state
            .media
            .output_key(&record.tenant, &record.id, &output.name)
    };
    let mut response = match crate::routes::stream_object(&state, &key, &headers).await {
        Ok(response) => response,
        Err(problem) if problem.status() == StatusCode::NOT_FOUND => {
            return Ok(empty(StatusCode::NOT_FOUND));
        }
        Err(problem) => return Err(problem),
    };
    if let Ok(value) = HeaderValue::from_str(&format!("filename=\"{filename}\"")) {
        response
            .headers_mut()
            .insert(header::CONTENT_DISPOSITION, value);
    }
    // ComfyUI names the type from the file name (Python's `mimetypes`);
    // the store judged it from the bytes.
    if response.status().is_success()
        && let Some(guessed) = mime_guess::from_path(&filename).first_raw()
    {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(guessed));
    }
    Ok(response)
}

/// `POST /upload/image` (multipart: `image`, `overwrite`, `subfolder`,
/// `type`) → `{name, subfolder, type}`. Uploads are the tenant's, in one
/// folder: the answer's `subfolder` is empty, so the name the client puts
/// in its prompt is the name alone.
pub(crate) async fn upload_image(
    State(state): State<AppState>,
    ComfyTenant(tenant): ComfyTenant,
    mut multipart: Multipart,
) -> Result<Response, Problem> {
    let malformed =
        |e: axum::extract::multipart::MultipartError| Problem::bad_request(e.body_text());
    let mut image: Option<(String, Vec<u8>)> = None;
    let mut overwrite = false;
    let limit = state.config.max_input_bytes;
    while let Some(field) = multipart.next_field().await.map_err(malformed)? {
        match field.name().unwrap_or_default() {
            "image" => {
                let name = field.file_name().unwrap_or_default().to_owned();
                // Fields may follow the file (`overwrite`), so it is read
                // whole before its name is chosen, within the input limit.
                let cap = usize::try_from(limit).unwrap_or(usize::MAX);
                let bytes = crate::upload::read_capped(field, cap, "the image").await?;
                image = Some((name, bytes));
            }
            "overwrite" => {
                let value = field.text().await.map_err(malformed)?;
                overwrite = matches!(value.as_str(), "true" | "1");
            }
            _ => {}
        }
    }
    let Some((name, bytes)) = image else {
        return Ok(empty(StatusCode::BAD_REQUEST));
    };
    let name = name
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or_default()
        .to_owned();
    if check_file_name(&name).is_err() {
        return Ok(empty(StatusCode::BAD_REQUEST));
    }
    let digest = hex::encode(Sha256::digest(&bytes));
    let chosen = if overwrite {
        name
    } else {
        free_name(&state, &tenant, &name, &digest).await?
    };
    let key = state.media.upload_key(&tenant, &chosen);
    state
        .media
        .put(&key, &mut bytes.as_slice(), 0, Some(limit))
        .await
        .map_err(|e| crate::routes::media_problem(&chosen, e))?;
    let answer: Value = json!({"name": chosen, "subfolder": "", "type": "input"});
    Ok(Json(answer).into_response())
}

/// ComfyUI's rule: the same bytes under the same name keep the name;
/// other bytes get `name (1).ext`, `name (2).ext`, …
async fn free_name(
    state: &AppState,
    tenant: &comfyq_shared::ids::TenantId,
    name: &str,
    digest: &str,
) -> Result<String, Problem> {
    let (stem, extension) = match name.rsplit_once('.') {
        Some((stem, extension)) if !stem.is_empty() => (stem, format!(".{extension}")),
        _ => (name, String::new()),
    };
    let mut candidate = name.to_owned();
    for n in 1..10_000 {
        match state
            .media
            .head(&state.media.upload_key(tenant, &candidate))
            .await
        {
            Err(MediaError::NotFound(_)) => return Ok(candidate),
            Ok(existing) if existing.sha256 == digest => return Ok(candidate),
            Ok(_) => candidate = format!("{stem} ({n}){extension}"),
            Err(other) => return Err(Problem::unavailable(&other)),
        }
    }
    Err(Problem::conflict("too many uploads with this name"))
}
