//! `multipart/form-data` submissions: a `job` JSON part first, then one file
//! part per input, each streamed chunk by chunk into the object store (never
//! held whole in memory) under a size cap.

use axum::extract::Multipart;
use axum::extract::multipart::Field;
use comfyq_shared::ids::{JobId, TenantId};
use comfyq_shared::job::InputFile;
use futures::TryStreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio_util::io::StreamReader;

use crate::api::{SubmitRequest, check_file_name};
use crate::problem::Problem;
use crate::routes::{Received, validation_error};
use crate::state::AppState;

/// Reads the parts; on any error, deletes what it stored.
pub(crate) async fn receive(
    state: &AppState,
    tenant: &TenantId,
    job: JobId,
    multipart: Multipart,
) -> Result<Received, Problem> {
    let mut stored = Vec::new();
    let result = receive_parts(state, tenant, job, multipart, &mut stored).await;
    if result.is_err() {
        for file in &stored {
            let key = state.media.input_key(tenant, &job, &file.name);
            if let Err(error) = state.media.delete(&key).await {
                tracing::warn!(%error, key, "partial upload not deleted");
            }
        }
    }
    result
}

async fn receive_parts(
    state: &AppState,
    tenant: &TenantId,
    job: JobId,
    mut multipart: Multipart,
    stored: &mut Vec<InputFile>,
) -> Result<Received, Problem> {
    let malformed =
        |e: axum::extract::multipart::MultipartError| Problem::bad_request(e.body_text());
    let first = multipart
        .next_field()
        .await
        .map_err(malformed)?
        .ok_or_else(|| Problem::bad_request("multipart body has no `job` part"))?;
    if first.name() != Some("job") {
        return Err(Problem::bad_request(
            "the first part must be `job` (the job JSON)",
        ));
    }
    let job_bytes = read_capped(first, state.config.max_body_bytes, "the `job` part").await?;
    let value: serde_json::Value = serde_json::from_slice(&job_bytes)
        .map_err(|e| Problem::bad_request(format!("`job` part is not JSON: {e}")))?;
    let request = SubmitRequest::deserialize(value.clone())
        .map_err(|e| Problem::bad_request(format!("invalid job: {e}")))?;

    let mut fingerprint = Sha256::new();
    fingerprint.update(value.to_string().as_bytes());
    while let Some(field) = multipart.next_field().await.map_err(malformed)? {
        let name = field.name().unwrap_or_default().to_owned();
        let pointer = format!("/inputs/{name}");
        if let Err(message) = check_file_name(&name) {
            return Err(validation_error(&pointer, message));
        }
        if stored.iter().any(|f| f.name == name) || request.inputs.iter().any(|i| i.name == name) {
            return Err(validation_error(
                &pointer,
                format!("duplicate input name {name:?}"),
            ));
        }
        if stored.len() + request.inputs.len() >= state.config.max_inputs {
            return Err(validation_error(
                "/inputs",
                format!("at most {} inputs allowed", state.config.max_inputs),
            ));
        }
        let used = stored.iter().map(|f| f.size).sum();
        let key = state.media.input_key(tenant, &job, &name);
        let file = store_part(state, &key, &name, field, used).await?;
        fingerprint.update(format!("\n{}:{}", file.name, file.sha256).as_bytes());
        stored.push(file);
    }
    Ok(Received {
        request,
        fingerprint: hex::encode(fingerprint.finalize()),
        uploaded: stored.clone(),
    })
}

/// A whole part in memory, refused (413) past `limit` bytes; `what` names
/// it in the answer.
pub(crate) async fn read_capped(
    field: Field<'_>,
    limit: usize,
    what: &str,
) -> Result<Vec<u8>, Problem> {
    let mut bytes = Vec::new();
    let mut field = field;
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| Problem::bad_request(e.body_text()))?
    {
        if bytes.len() + chunk.len() > limit {
            return Err(Problem::too_large(format!("{what} exceeds {limit} bytes")));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Streams one file part into the store, which judges the content type
/// from the bytes; a part over `max_input_bytes` (or the job's media limit)
/// is cut off with a 413 and nothing of it stays stored.
pub(crate) async fn store_part(
    state: &AppState,
    key: &str,
    name: &str,
    field: Field<'_>,
    job_bytes: u64,
) -> Result<InputFile, Problem> {
    let limit = state.config.max_input_bytes;
    let chunks = field.map_err(std::io::Error::other);
    let mut reader = StreamReader::new(chunks);
    let stored = state
        .media
        .put(key, &mut reader, job_bytes, Some(limit))
        .await
        .map_err(|e| crate::routes::media_problem(name, e))?;
    Ok(InputFile {
        name: name.to_owned(),
        content_type: stored.content_type,
        size: stored.size,
        sha256: stored.sha256,
    })
}
