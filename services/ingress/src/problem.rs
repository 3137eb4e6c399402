//! The one error type of the HTTP API: RFC 9457 problem details. Internal
//! causes are logged, never sent to clients.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// One invalid part of a request: a JSON pointer into the body and why.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct InvalidParam {
    pub pointer: String,
    pub message: String,
}

#[derive(Debug)]
pub struct Problem {
    status: StatusCode,
    kind: &'static str,
    title: &'static str,
    detail: String,
    errors: Vec<InvalidParam>,
    retry_after: Option<u64>,
}

/// RFC 9457 problem details (`application/problem+json`). `type` is stable:
/// `https://comfyq.dev/problems/<kind>` with kind one of `bad-request`,
/// `validation`, `unauthorized`, `not-found`, `conflict`, `too-large`,
/// `unsupported-media-type`, `rate-limited`, `too-many-jobs`, `unavailable`,
/// `internal`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Problem)]
pub struct ProblemBody {
    #[serde(rename = "type")]
    kind: String,
    title: &'static str,
    status: u16,
    detail: String,
    /// For `validation`: each invalid part of the request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<InvalidParam>,
}

impl Problem {
    fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            title,
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
        }
    }

    /// The stable kind (last segment of `type`).
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// What the client is told: the detail, then each invalid part.
    pub fn client_message(&self) -> String {
        let mut message = self.detail.clone();
        for error in &self.errors {
            message.push_str(&format!("; {}: {}", error.pointer, error.message));
        }
        message
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", "Conflict", detail)
    }

    pub fn unsupported_media_type(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported content type",
            detail,
        )
    }

    /// Too many requests: `kind` is `rate-limited` or `too-many-jobs`.
    pub fn too_many(kind: &'static str, detail: impl Into<String>, retry_after_s: u64) -> Self {
        Self {
            retry_after: Some(retry_after_s.max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                kind,
                "Too many requests",
                detail,
            )
        }
    }

    pub fn validation(errors: Vec<InvalidParam>) -> Self {
        let detail = match errors.as_slice() {
            [only] => format!("{}: {}", only.pointer, only.message),
            many => format!("{} problems in the request", many.len()),
        };
        Self {
            errors,
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                "Invalid request",
                detail,
            )
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Malformed request",
            detail,
        )
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Missing or unknown API key",
            "send `Authorization: Bearer <api key>`",
        )
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            format!("{what} not found"),
        )
    }

    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            "Request too large",
            detail,
        )
    }

    pub fn unavailable(error: &dyn std::error::Error) -> Self {
        tracing::error!(error = %error, "dependency unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            "the job queue is unreachable; try again",
        )
    }

    pub fn internal(error: &dyn std::error::Error) -> Self {
        tracing::error!(error = %error, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "an unexpected error occurred",
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = ProblemBody {
            kind: format!("https://comfyq.dev/problems/{}", self.kind),
            title: self.title,
            status: self.status.as_u16(),
            detail: self.detail,
            errors: self.errors,
        };
        let mut response = (self.status, Json(&body)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        response
    }
}
