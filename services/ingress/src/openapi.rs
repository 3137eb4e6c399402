//! The OpenAPI document, generated from the handlers' and bodies' types
//! (utoipa), served at `/openapi.json`, and an interactive page at `/docs`
//! (Scalar; its script loads in the reader's browser).

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_scalar::{Scalar, Servable};

use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "comfyq", description = "ComfyUI workflows as a production job API. Errors are RFC 9457 problem details (`application/problem+json`)."),
    paths(
        crate::routes::submit_job,
        crate::routes::list_jobs,
        crate::routes::get_job,
        crate::routes::cancel_job,
        crate::routes::delete_job,
        crate::routes::get_output,
        crate::routes::get_input,
        crate::routes::job_events,
        crate::routes::job_socket,
        crate::routes::tenant_events,
        crate::catalog::list_runners,
        crate::catalog::queue,
        crate::webhooks::list_deliveries,
        crate::webhooks::redeliver,
        crate::dead_letters::list_dead_letters,
        crate::dead_letters::retry_job,
    ),
    components(schemas(crate::problem::ProblemBody, crate::problem::InvalidParam)),
    modifiers(&BearerAuth),
    tags(
        (name = "jobs", description = "Submit, read, list and cancel jobs"),
        (name = "media", description = "Input and output files"),
        (name = "events", description = "Live and replayed job events"),
        (name = "runners", description = "Runners and queues"),
        (name = "webhooks", description = "Webhook deliveries and redelivery"),
        (name = "dead-letters", description = "Jobs whose attempts ran out, and their requeue"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub(crate) async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

pub(crate) fn docs() -> axum::Router<AppState> {
    axum::Router::new().merge(Scalar::with_url("/docs", ApiDoc::openapi()))
}
