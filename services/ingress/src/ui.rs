//! The web dashboard at `/ui`: the queue per pool and priority, runners,
//! recent jobs with filters and a submit form, a job's page (status timeline,
//! live progress over SSE, outputs and inputs as images, video and audio,
//! webhook deliveries, error details, cancel and retry), and dead letters
//! with retry.
//!
//! Why this shape: a static HTML shell and one small plain-JavaScript file
//! (no framework, no build step, no CDN), embedded in the binary with
//! `include_str!`, so the dashboard works offline, ships with every ingress
//! and cannot drift from it. The script only calls the public REST API, the
//! same one any client uses, so the dashboard needs no handler of its own and
//! shows nothing the API would not. The shell itself is public (it holds no
//! data); the API key a person enters is kept in the browser's localStorage
//! and sent as `Authorization: Bearer` on every API call, media and event
//! streams included (fetched with that header, since `<img src>` and
//! `EventSource` cannot send one). A strict Content-Security-Policy allows
//! scripts, styles and connections to this origin only.
//!
//! Previews are not shown: the API serves none (they are on NATS,
//! `EVENTS.md`). With S3 `presign_ttl`, output downloads redirect to S3, which
//! the policy's `connect-src 'self'` (and S3's CORS) refuse: the job page
//! then shows an error in place of each output (`comfyq outputs` still
//! downloads them).

use std::sync::LazyLock;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use crate::state::AppState;

const SHELL: &str = include_str!("../assets/ui/index.html");
const SCRIPT: &str = include_str!("../assets/ui/app.js");
const STYLE: &str = include_str!("../assets/ui/style.css");

const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; \
     connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// An embedded file with its ETag, computed once.
struct Asset {
    body: String,
    content_type: &'static str,
    etag: String,
}

impl Asset {
    fn new(body: String, content_type: &'static str) -> Self {
        let etag = format!(
            "\"{}\"",
            hex::encode(&Sha256::digest(body.as_bytes())[..12])
        );
        Self {
            body,
            content_type,
            etag,
        }
    }

    /// The body, or 304 when the browser has this version. `no-cache`: the
    /// browser revalidates each time, so a new ingress is seen at once.
    fn serve(&self, request: &HeaderMap) -> Response {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        if let Ok(etag) = HeaderValue::from_str(&self.etag) {
            headers.insert(header::ETAG, etag);
        }
        let fresh = request
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|tag| tag.trim() == self.etag));
        if fresh {
            return (StatusCode::NOT_MODIFIED, headers).into_response();
        }
        (headers, self.body.clone()).into_response()
    }
}

static SHELL_ASSET: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        SHELL.replace("{{version}}", env!("CARGO_PKG_VERSION")),
        "text/html; charset=utf-8",
    )
});
static SCRIPT_ASSET: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(SCRIPT.to_owned(), "text/javascript; charset=utf-8"));
static STYLE_ASSET: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(STYLE.to_owned(), "text/css; charset=utf-8"));

/// `/ui` and its two assets; none needs the API key.
pub(crate) fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/ui", get(shell))
        .route("/ui/", get(shell))
        .route("/ui/app.js", get(script))
        .route("/ui/style.css", get(style))
}

async fn shell(headers: HeaderMap) -> Response {
    SHELL_ASSET.serve(&headers)
}

async fn script(headers: HeaderMap) -> Response {
    SCRIPT_ASSET.serve(&headers)
}

async fn style(headers: HeaderMap) -> Response {
    STYLE_ASSET.serve(&headers)
}
