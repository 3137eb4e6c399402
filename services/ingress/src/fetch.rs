//! `{name, url}` inputs: fetched by the service behind the SSRF guard (the
//! host must resolve to public addresses unless configuration allows
//! private ones; the connection goes to exactly the checked addresses; no
//! redirects), with a time limit and a size cap, streamed to the store.

use comfyq_shared::guard::{self, Refusal};
use comfyq_shared::job::InputFile;
use comfyq_shared::media::MediaError;
use futures::TryStreamExt;
use tokio_util::io::StreamReader;

use crate::problem::Problem;
use crate::routes::validation_error;
use crate::state::AppState;

fn refused(pointer: &str, refusal: &Refusal) -> Problem {
    validation_error(pointer, refusal.to_string())
}

/// Refuses webhook URLs that resolve to non-public addresses (unless allowed).
pub async fn check_webhook(state: &AppState, url: &str) -> Result<(), Problem> {
    let Ok(url) = url::Url::parse(url) else {
        return Err(validation_error("/webhook/url", "not a URL"));
    };
    guard::check_destination(&url, state.config.allow_private_webhooks)
        .await
        .map(|_| ())
        .map_err(|r| refused("/webhook/url", &r))
}

pub async fn fetch_input(
    state: &AppState,
    url: &url::Url,
    name: &str,
    key: &str,
    job_bytes: u64,
) -> Result<InputFile, Problem> {
    let pointer = format!("/inputs/{name}/url");
    let addrs = guard::check_destination(url, state.config.allow_private_input_urls)
        .await
        .map_err(|r| refused(&pointer, &r))?;
    let host = url.host_str().unwrap_or_default().to_owned();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(state.config.input_fetch_timeout)
        .resolve_to_addrs(&host, &addrs)
        .build()
        .map_err(|e| Problem::internal(&e))?;
    let failed = |message: String| validation_error(&pointer, message);
    let response = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| failed(format!("fetching the input failed: {e}")))?;
    if !response.status().is_success() {
        return Err(failed(format!(
            "fetching the input answered HTTP {}",
            response.status().as_u16()
        )));
    }
    let limit = state.config.max_input_bytes;
    if response.content_length().is_some_and(|n| n > limit) {
        return Err(Problem::too_large(format!(
            "input {name:?} exceeds {limit} bytes"
        )));
    }
    let mut reader = StreamReader::new(response.bytes_stream().map_err(std::io::Error::other));
    let stored = state
        .media
        .put(key, &mut reader, job_bytes, Some(limit))
        .await
        .map_err(|e| match e {
            MediaError::Source(e) => failed(format!("reading the input failed: {e}")),
            other => crate::routes::media_problem(name, other),
        })?;
    Ok(InputFile {
        name: name.to_owned(),
        content_type: stored.content_type,
        size: stored.size,
        sha256: stored.sha256,
    })
}
