//! The OpenAPI document. Paths come from the `#[utoipa::path]` of each handler as it is
//! registered on the router, so the document cannot list a route that does not exist or
//! miss one that does.

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(title = "E-commerce order pipeline", description = "The HTTP contract of the `api` service."),
    modifiers(&AdminToken),
    components(schemas(ErrorSchema))
)]
pub struct ApiDoc;

struct AdminToken;

impl Modify for AdminToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "admin_token",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// The body of every error answer.
#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorSchema {
    /// A machine-readable `ERR_…` code.
    code: String,
    message: String,
}

/// The optional `Idempotency-Key` header of the creating POSTs.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKeyHeader {
    /// 1 to 255 printable ASCII characters; the same key and body replay the first answer.
    #[param(rename = "Idempotency-Key")]
    #[allow(dead_code)]
    idempotency_key: Option<String>,
}
