//! `/view` (a job's outputs and the tenant's uploads, from the object
//! store, with `Range`), `/upload/image` (kept per tenant; a prompt that
//! names an upload gets a copy among its job's inputs) and `/upload/mask`.

use axum::Json;
use axum::extract::{Multipart, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use comfyq_shared::ids::TenantId;
use comfyq_shared::media::MediaError;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

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
    let Some(key) = stored_key(&state, &tenant, &filename, &query.subfolder, &folder_type).await?
    else {
        return Ok(empty(StatusCode::NOT_FOUND));
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

/// Where a file named ComfyUI's way (`filename`, `subfolder`, `type`) is
/// stored: the tenant's uploads (`input`) or a job's outputs.
async fn stored_key(
    state: &AppState,
    tenant: &TenantId,
    filename: &str,
    subfolder: &str,
    folder_type: &str,
) -> Result<Option<String>, Problem> {
    if folder_type == "input" {
        if !subfolder.is_empty() || check_file_name(filename).is_err() {
            return Ok(None);
        }
        return Ok(Some(state.media.upload_key(tenant, filename)));
    }
    let Some((job, own_subfolder)) = parse_shown_subfolder(subfolder) else {
        return Ok(None);
    };
    let Some(record) = crate::routes::find_record(state, tenant, &job).await? else {
        return Ok(None);
    };
    let found = record.outputs.iter().find(|o| {
        o.comfy.as_ref().is_some_and(|c| {
            c.filename == filename && c.subfolder == own_subfolder && c.folder_type == folder_type
        })
    });
    Ok(found.map(|output| {
        state
            .media
            .output_key(&record.tenant, &record.id, &output.name)
    }))
}

/// `POST /upload/image` (multipart: `image`, `overwrite`, `subfolder`,
/// `type`) → `{name, subfolder, type}`. Uploads are the tenant's, in one
/// folder: the answer's `subfolder` is empty, so the name the client puts
/// in its prompt is the name alone.
pub(crate) async fn upload_image(
    State(state): State<AppState>,
    ComfyTenant(tenant): ComfyTenant,
    multipart: Multipart,
) -> Result<Response, Problem> {
    let form = read_form(&state, multipart).await?;
    store_upload(&state, &tenant, form).await
}

/// `POST /upload/mask`: as `/upload/image`, but what is stored is the
/// image `original_ref` names (an upload or an output) with the mask's
/// alpha channel, as ComfyUI's mask editor expects. PNG only.
pub(crate) async fn upload_mask(
    State(state): State<AppState>,
    ComfyTenant(tenant): ComfyTenant,
    multipart: Multipart,
) -> Result<Response, Problem> {
    let mut form = read_form(&state, multipart).await?;
    let Some(original) = form
        .original_ref
        .as_deref()
        .and_then(|raw| serde_json::from_str::<Value>(raw).ok())
    else {
        return Ok(empty(StatusCode::BAD_REQUEST));
    };
    let filename = original["filename"].as_str().unwrap_or_default();
    if filename.is_empty() || filename.starts_with('/') || filename.contains("..") {
        return Ok(empty(StatusCode::BAD_REQUEST));
    }
    let subfolder = original["subfolder"].as_str().unwrap_or_default();
    let folder_type = original["type"].as_str().unwrap_or("output");
    let Some(key) = stored_key(&state, &tenant, filename, subfolder, folder_type).await? else {
        return Ok(empty(StatusCode::NOT_FOUND));
    };
    let limit = usize::try_from(state.config.max_input_bytes).unwrap_or(usize::MAX);
    let original = match state.media.get(&key).await {
        Ok((_, mut reader)) => {
            let mut bytes = Vec::new();
            reader
                .read_to_end(&mut bytes)
                .await
                .map_err(|e| Problem::unavailable(&e))?;
            bytes
        }
        Err(MediaError::NotFound(_)) => return Ok(empty(StatusCode::NOT_FOUND)),
        Err(other) => return Err(Problem::unavailable(&other)),
    };
    let Some((name, mask)) = form.image.take() else {
        return Ok(empty(StatusCode::BAD_REQUEST));
    };
    let Some(masked) = apply_mask(&original, &mask, limit) else {
        return Ok(empty(StatusCode::BAD_REQUEST));
    };
    form.image = Some((name, masked));
    store_upload(&state, &tenant, form).await
}

/// The parts of an upload form this API reads.
struct UploadForm {
    image: Option<(String, Vec<u8>)>,
    overwrite: bool,
    original_ref: Option<String>,
}

async fn read_form(state: &AppState, mut multipart: Multipart) -> Result<UploadForm, Problem> {
    let malformed =
        |e: axum::extract::multipart::MultipartError| Problem::bad_request(e.body_text());
    let mut form = UploadForm {
        image: None,
        overwrite: false,
        original_ref: None,
    };
    let cap = usize::try_from(state.config.max_input_bytes).unwrap_or(usize::MAX);
    while let Some(field) = multipart.next_field().await.map_err(malformed)? {
        match field.name().unwrap_or_default() {
            "image" => {
                let name = field.file_name().unwrap_or_default().to_owned();
                // Fields may follow the file (`overwrite`), so it is read
                // whole before its name is chosen, within the input limit.
                let bytes = crate::upload::read_capped(field, cap, "the image").await?;
                form.image = Some((name, bytes));
            }
            "overwrite" => {
                let value = field.text().await.map_err(malformed)?;
                form.overwrite = matches!(value.as_str(), "true" | "1");
            }
            "original_ref" => form.original_ref = Some(field.text().await.map_err(malformed)?),
            _ => {}
        }
    }
    Ok(form)
}

/// Stores an upload under its name, or ComfyUI's next free one.
async fn store_upload(
    state: &AppState,
    tenant: &TenantId,
    form: UploadForm,
) -> Result<Response, Problem> {
    let Some((name, bytes)) = form.image else {
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
    let chosen = if form.overwrite {
        name
    } else {
        free_name(state, tenant, &name, &digest).await?
    };
    let key = state.media.upload_key(tenant, &chosen);
    state
        .media
        .put(
            &key,
            &mut bytes.as_slice(),
            0,
            Some(state.config.max_input_bytes),
        )
        .await
        .map_err(|e| crate::routes::media_problem(&chosen, e))?;
    let answer: Value = json!({"name": chosen, "subfolder": "", "type": "input"});
    Ok(Json(answer).into_response())
}

/// ComfyUI's rule: the same bytes under the same name keep the name;
/// other bytes get `name (1).ext`, `name (2).ext`, …
async fn free_name(
    state: &AppState,
    tenant: &TenantId,
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

/// An 8-bit RGBA image decoded from PNG bytes (any PNG colour type).
fn rgba(bytes: &[u8], limit: usize) -> Option<(u32, u32, Vec<u8>)> {
    let mut decoder =
        png::Decoder::new_with_limits(std::io::Cursor::new(bytes), png::Limits { bytes: limit });
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().ok()?;
    let mut buffer = vec![0; reader.output_buffer_size()?];
    let info = reader.next_frame(&mut buffer).ok()?;
    let pixels = &buffer[..info.buffer_size()];
    let rgba = match info.color_type {
        png::ColorType::Rgba => pixels.to_vec(),
        png::ColorType::Rgb => pixels
            .chunks(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect(),
        png::ColorType::GrayscaleAlpha => pixels
            .chunks(2)
            .flat_map(|p| [p[0], p[0], p[0], p[1]])
            .collect(),
        png::ColorType::Grayscale => pixels.iter().flat_map(|&g| [g, g, g, 255]).collect(),
        // Expanded by the transformations; never returned.
        png::ColorType::Indexed => return None,
    };
    Some((info.width, info.height, rgba))
}

/// The original image with the mask's alpha (both PNG, the same size), as
/// PNG: ComfyUI's `putalpha` for the mask editor's upload.
fn apply_mask(original: &[u8], mask: &[u8], limit: usize) -> Option<Vec<u8>> {
    let (width, height, mut pixels) = rgba(original, limit)?;
    let (mask_width, mask_height, mask) = rgba(mask, limit)?;
    if (width, height) != (mask_width, mask_height) {
        return None;
    }
    for (pixel, mask) in pixels.chunks_mut(4).zip(mask.chunks(4)) {
        pixel[3] = mask[3];
    }
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().ok()?;
    writer.write_image_data(&pixels).ok()?;
    writer.finish().ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_of(width: u32, height: u32, color: png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(color);
        let mut writer = encoder.write_header().expect("header");
        writer.write_image_data(data).expect("data");
        writer.finish().expect("finish");
        out
    }

    #[test]
    fn a_mask_sets_the_originals_alpha() {
        let original = png_of(2, 1, png::ColorType::Rgb, &[10, 20, 30, 40, 50, 60]);
        let mask = png_of(2, 1, png::ColorType::Rgba, &[0, 0, 0, 0, 9, 9, 9, 200]);
        let masked = apply_mask(&original, &mask, 1 << 20).expect("masked");
        let (w, h, pixels) = rgba(&masked, 1 << 20).expect("PNG");
        assert_eq!((w, h), (2, 1));
        assert_eq!(pixels, [10, 20, 30, 0, 40, 50, 60, 200]);
        let small = png_of(1, 1, png::ColorType::Rgba, &[0, 0, 0, 0]);
        assert_eq!(apply_mask(&original, &small, 1 << 20), None);
    }
}
