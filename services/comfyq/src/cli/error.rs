//! What can go wrong in a client command, rendered for a person, and the exit
//! code each maps to (listed in `comfyq --help`).

use std::fmt::Write as _;

use serde::Deserialize;

/// The process exit code of a client command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Success = 0,
    /// The job ended failed or cancelled.
    JobNotCompleted = 1,
    /// Bad arguments or a local problem (files).
    Usage = 2,
    /// The API refused the request (4xx other than 404).
    Refused = 3,
    NotFound = 4,
    /// Unreachable server, 5xx, or an answer this client does not understand.
    Server = 5,
    /// Ctrl-C while following a job (which goes on).
    Interrupted = 130,
}

impl ExitStatus {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// An RFC 9457 problem document as the API sends it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ProblemDoc {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) title: String,
    pub(crate) status: u16,
    pub(crate) detail: String,
    pub(crate) errors: Vec<InvalidParam>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct InvalidParam {
    pub(crate) pointer: String,
    pub(crate) message: String,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// Bad arguments or input files: the user's to fix before retrying.
    #[error("{0}")]
    Usage(String),
    /// Nothing answered at the URL (refused, DNS, timeout).
    #[error("cannot reach the comfyq API at {url}: {cause}")]
    Unreachable { url: String, cause: String },
    /// The API answered with an error status.
    #[error("the API answered {status}")]
    Api {
        status: u16,
        problem: Option<Box<ProblemDoc>>,
        /// The body when it was not a problem document.
        body: String,
        retry_after: Option<String>,
    },
    /// An answer this client does not understand.
    #[error("unexpected answer from the API: {0}")]
    Protocol(String),
    /// Writing outputs or reading local files failed.
    #[error("{0}")]
    Local(String),
    /// Ctrl-C while following a job: only the following stops.
    #[error("stopped following job {job}; it goes on (`{resume}` follows it again)")]
    Interrupted { job: String, resume: String },
}

impl CliError {
    pub(crate) fn exit_status(&self) -> ExitStatus {
        match self {
            Self::Usage(_) | Self::Local(_) => ExitStatus::Usage,
            Self::Unreachable { .. } | Self::Protocol(_) => ExitStatus::Server,
            Self::Api { status: 404, .. } => ExitStatus::NotFound,
            Self::Api { status, .. } if *status >= 500 => ExitStatus::Server,
            Self::Api { .. } => ExitStatus::Refused,
            Self::Interrupted { .. } => ExitStatus::Interrupted,
        }
    }

    /// The message for a person, with a hint where one helps.
    pub(crate) fn render(&self) -> String {
        match self {
            Self::Unreachable { url, cause } => format!(
                "error: cannot reach the comfyq API at {url}: {cause}\n  \
                 Is it running? `comfyq up --sim` starts one here; \
                 --url or COMFYQ_URL points elsewhere."
            ),
            Self::Api {
                status,
                problem: Some(problem),
                retry_after,
                ..
            } => render_problem(*status, problem, retry_after.as_deref()),
            Self::Api { status, body, .. } => {
                let body = body.trim();
                if body.is_empty() {
                    format!("error: the API answered HTTP {status}")
                } else {
                    format!("error: the API answered HTTP {status}: {body}")
                }
            }
            other => format!("error: {other}"),
        }
    }
}

fn render_problem(status: u16, problem: &ProblemDoc, retry_after: Option<&str>) -> String {
    let title = if problem.title.is_empty() {
        "request refused"
    } else {
        problem.title.as_str()
    };
    let mut text = format!("error: {title} (HTTP {status})");
    let kind = problem.kind.rsplit('/').next().unwrap_or_default();
    if problem.errors.is_empty() {
        if !problem.detail.is_empty() {
            let _ = write!(text, ": {}", problem.detail);
        }
    } else {
        for error in &problem.errors {
            let _ = write!(
                text,
                "\n  {}: {}",
                pointer_or_body(&error.pointer),
                error.message
            );
        }
    }
    let hint = match kind {
        "unauthorized" => Some("pass --api-key or set COMFYQ_API_KEY".to_owned()),
        "rate-limited" | "too-many-jobs" => {
            Some(format!("retry after {} s", retry_after.unwrap_or("a few")))
        }
        "unavailable" => Some("the server cannot reach its queue; try again shortly".to_owned()),
        _ => None,
    };
    if let Some(hint) = hint {
        let _ = write!(text, "\n  hint: {hint}");
    }
    text
}

fn pointer_or_body(pointer: &str) -> &str {
    if pointer.is_empty() {
        "(body)"
    } else {
        pointer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_problems_list_every_pointer() {
        let problem: ProblemDoc = serde_json::from_value(serde_json::json!({
            "type": "https://comfyq.dev/problems/validation",
            "title": "Invalid request",
            "status": 422,
            "detail": "2 problems in the request",
            "errors": [
                {"pointer": "/priority", "message": "unknown priority"},
                {"pointer": "/workflow/1/class_type", "message": "must be a non-empty string"}
            ]
        }))
        .expect("problem parses");
        let error = CliError::Api {
            status: 422,
            problem: Some(Box::new(problem)),
            body: String::new(),
            retry_after: None,
        };
        assert_eq!(
            error.render(),
            "error: Invalid request (HTTP 422)\n  /priority: unknown priority\n  \
             /workflow/1/class_type: must be a non-empty string"
        );
        assert_eq!(error.exit_status(), ExitStatus::Refused);
    }

    #[test]
    fn exit_statuses_follow_the_answer() {
        let api = |status| CliError::Api {
            status,
            problem: None,
            body: String::new(),
            retry_after: None,
        };
        assert_eq!(api(404).exit_status(), ExitStatus::NotFound);
        assert_eq!(api(503).exit_status(), ExitStatus::Server);
        assert_eq!(api(409).exit_status(), ExitStatus::Refused);
        let unreachable = CliError::Unreachable {
            url: "http://x".to_owned(),
            cause: "refused".to_owned(),
        };
        assert_eq!(unreachable.exit_status(), ExitStatus::Server);
        assert!(unreachable.render().contains("comfyq up --sim"));
    }
}
