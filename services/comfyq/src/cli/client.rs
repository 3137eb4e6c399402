//! The HTTP client of the REST API: the base URL and API key of every request,
//! and what an answer means ([`CliError`] for anything but success).

use std::time::Duration;

use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::Value;

use super::ClientOptions;
use super::error::{CliError, ProblemDoc};

#[derive(Debug, Clone)]
pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

impl Api {
    pub(crate) fn new(options: &ClientOptions) -> Result<Self, CliError> {
        let base = options.url.trim_end_matches('/').to_owned();
        match url::Url::parse(&base) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => {}
            _ => {
                return Err(CliError::Usage(format!(
                    "--url {base:?} is not an http(s) URL (e.g. http://127.0.0.1:8080)"
                )));
            }
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("comfyq-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Local(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            base,
            api_key: options.api_key.clone().filter(|k| !k.is_empty()),
        })
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// `path` is absolute on the server (`/v1/…`), as the API's own URLs are.
    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    pub(crate) fn get(&self, path: &str) -> RequestBuilder {
        self.request(reqwest::Method::GET, path)
    }

    pub(crate) fn post(&self, path: &str) -> RequestBuilder {
        self.request(reqwest::Method::POST, path)
    }

    /// Sends; a 2xx answer is returned, anything else becomes the error it means.
    pub(crate) async fn send(&self, request: RequestBuilder) -> Result<Response, CliError> {
        let response = request.send().await.map_err(|e| self.transport(e))?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(error_of(response).await)
        }
    }

    /// Sends and reads a JSON answer: (status, body).
    pub(crate) async fn json(
        &self,
        request: RequestBuilder,
    ) -> Result<(StatusCode, Value), CliError> {
        let response = self.send(request).await?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| self.transport(e))?;
        let value = serde_json::from_slice(&body)
            .map_err(|e| CliError::Protocol(format!("not JSON ({e})")))?;
        Ok((status, value))
    }

    /// A request that got no HTTP answer.
    pub(crate) fn transport(&self, error: reqwest::Error) -> CliError {
        if error.is_connect() || error.is_timeout() || error.is_request() {
            CliError::Unreachable {
                url: self.base.clone(),
                cause: root_cause(&error),
            }
        } else {
            CliError::Protocol(root_cause(&error))
        }
    }
}

/// The innermost cause ("Connection refused (os error 111)"), which says more
/// to a person than reqwest's outer "error sending request".
fn root_cause(error: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

async fn error_of(response: Response) -> CliError {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.text().await.unwrap_or_default();
    let problem = serde_json::from_str::<ProblemDoc>(&body)
        .ok()
        .filter(|p| !p.title.is_empty() || !p.detail.is_empty())
        .map(Box::new);
    CliError::Api {
        status,
        problem,
        body,
        retry_after,
    }
}

/// A job id as a path segment: refused early when it could not be one, so a
/// typo is a usage error, not a confusing 404 on another route.
pub(crate) fn job_path(id: &str, rest: &str) -> Result<String, CliError> {
    let id = id.trim();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(CliError::Usage(format!(
            "{id:?} is not a job id (a UUID such as 0191…-…)"
        )));
    }
    Ok(format!("/v1/jobs/{id}{rest}"))
}
