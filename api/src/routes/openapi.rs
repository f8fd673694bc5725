//! The OpenAPI document. Paths come from the `#[utoipa::path]` of each handler as it is
//! registered on the router, so the document cannot list a route that does not exist or
//! miss one that does.

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(title = "E-commerce order pipeline", description = "The HTTP contract of the `api` service."),
    modifiers(&BearerTokens),
    components(schemas(ErrorSchema))
)]
pub struct ApiDoc;

/// The two bearer schemes: `user_token` (a customer's token, from `POST /users`) on every
/// route that acts for a user, and `admin_token` on `/admin`.
struct BearerTokens;

/// The security scheme of the routes that act for a user.
pub const USER_TOKEN: &str = "user_token";

impl Modify for BearerTokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "admin_token",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
            components.add_security_scheme(
                USER_TOKEN,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some("the token answered by POST /users"))
                        .build(),
                ),
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

/// The optional `Prefer` header of the commands (RFC 7240).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct PreferHeader {
    /// `respond-async, wait=N` (N seconds, 1 to 30): hold the answer until the command is
    /// settled (then `200` with the request, and `Preference-Applied`) or N seconds pass
    /// (then the usual `202`).
    #[param(rename = "Prefer")]
    #[allow(dead_code)]
    prefer: Option<String>,
}

/// Documents the answers that every route of a kind can give, whatever its handler says:
/// 413 and 415 wherever a body is read (the extractor answers them before the handler
/// runs), 429 and 503 wherever a command is accepted, 409 and 422 wherever an
/// `Idempotency-Key` is accepted, and 401, 403 and 429 wherever a customer's token is
/// required (the [`crate::http::auth::Caller`] extractor answers them). Applied to the merged
/// document, so no route can forget them.
pub fn document_shared_errors(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};

    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Error")))
                    .build(),
            )
            .build()
    };
    for item in api.paths.paths.values_mut() {
        let operations = [
            item.get.as_mut(),
            item.put.as_mut(),
            item.post.as_mut(),
            item.delete.as_mut(),
            item.patch.as_mut(),
        ];
        for operation in operations.into_iter().flatten() {
            let mut shared = Vec::new();
            let guarded = operation.security.iter().flatten().any(|requirement| {
                serde_json::to_value(requirement).is_ok_and(|r| r.get(USER_TOKEN).is_some())
            });
            if guarded {
                shared.push((
                    "401",
                    "ERR_UNAUTHORIZED: no token, or one that is not valid (with WWW-Authenticate: Bearer)",
                ));
                shared.push((
                    "403",
                    "ERR_FORBIDDEN: the token's user is not the userId of the path or the body",
                ));
                shared.push(("429", "ERR_RATE_LIMITED, with Retry-After"));
            }
            if operation.request_body.is_some() {
                shared.push(("413", "ERR_PAYLOAD_TOO_LARGE"));
                shared.push(("415", "ERR_UNSUPPORTED_MEDIA_TYPE: the body must be JSON"));
            }
            // A command (answered 202) is refused while its backlog is too deep (queues, or
            // commands waiting for RabbitMQ), and when PostgreSQL cannot be reached.
            if operation.responses.responses.contains_key("202") {
                shared.push(("429", "ERR_OVERLOADED or ERR_RATE_LIMITED, with Retry-After"));
                shared.push(("503", "ERR_UNAVAILABLE, with Retry-After"));
            }
            let keyed = operation
                .parameters
                .iter()
                .flatten()
                .any(|p| p.name == "Idempotency-Key");
            if keyed {
                shared.push(("409", "ERR_IDEMPOTENCY_KEY_IN_USE"));
                shared.push(("422", "ERR_IDEMPOTENCY_KEY_REUSED"));
            }
            for (status, description) in shared {
                operation
                    .responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| error(description).into());
            }
        }
    }
}

/// Declares the headers of a command's answers, exactly as the handlers send them: a `202`
/// carries `Location` (its status URL) and `Retry-After` (when to poll;
/// `crate::commands::accept::accepted_response`, and the replay of a saved `202`), and a `429` or
/// `503` carries `Retry-After` (`crate::error`). Each is marked required, so that a
/// header-conformance check (schemathesis) fails an answer that leaves one out.
///
/// Written into the JSON document because utoipa's `Header` (5.5) has no `required`. Run
/// after [`document_shared_errors`], which adds the `429` and `503` of every command.
pub fn document_command_headers(document: &mut serde_json::Value) {
    use serde_json::json;

    let retry_after = |description: &str| {
        json!({
            "description": description,
            "required": true,
            "schema": { "type": "integer", "minimum": 0 },
        })
    };
    let location = json!({
        "description": "the status URL of the request: `/requests/{requestId}`",
        "required": true,
        "schema": { "type": "string", "pattern": "^/requests/[0-9a-f-]+$" },
    });
    let headers_by_status = [
        (
            "202",
            vec![
                ("Location", location),
                (
                    "Retry-After",
                    retry_after("seconds to wait before polling the status URL"),
                ),
            ],
        ),
        (
            "429",
            vec![(
                "Retry-After",
                retry_after("seconds to wait before sending the command again"),
            )],
        ),
        (
            "503",
            vec![(
                "Retry-After",
                retry_after("seconds to wait before sending the command again"),
            )],
        ),
    ];

    // A command sent with `Prefer: respond-async, wait=N` and settled in time.
    let settled = json!({
        "description": "settled within the Prefer header's wait: the request (as GET /requests/{requestId} reads it; orderId added for an order creation)",
        "headers": {
            "Preference-Applied": {
                "description": "the preference honoured: `wait=N`",
                "required": true,
                "schema": { "type": "string", "pattern": "^wait=[0-9]+$" },
            },
        },
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/RequestStatus" } } },
    });
    for operation in operations_mut(document) {
        let Some(responses) = operation.get_mut("responses").and_then(|r| r.as_object_mut()) else {
            continue;
        };
        // Only commands answer 202, and only their 429 and 503 come from the command path.
        if !responses.contains_key("202") {
            continue;
        }
        responses.entry("200").or_insert_with(|| settled.clone());
        for (status, headers) in &headers_by_status {
            let Some(response) = responses.get_mut(*status).and_then(|r| r.as_object_mut()) else {
                continue;
            };
            let declared = response.entry("headers").or_insert_with(|| json!({}));
            for (name, header) in headers {
                declared[*name] = header.clone();
            }
        }
    }
}

/// Declares the headers that the answers of identity and limits carry on every operation
/// that gives them: `WWW-Authenticate: Bearer` on a `401` (RFC 6750) and `Retry-After` on a
/// `429` (`crate::error`), both required. Run after [`document_shared_errors`].
pub fn document_auth_headers(document: &mut serde_json::Value) {
    use serde_json::json;

    let headers_by_status = [
        (
            "401",
            "WWW-Authenticate",
            json!({
                "description": "the scheme to authenticate with: `Bearer`",
                "required": true,
                "schema": { "type": "string" },
            }),
        ),
        (
            "429",
            "Retry-After",
            json!({
                "description": "seconds to wait before sending the request again",
                "required": true,
                "schema": { "type": "integer", "minimum": 0 },
            }),
        ),
    ];
    for operation in operations_mut(document) {
        let Some(responses) = operation.get_mut("responses").and_then(|r| r.as_object_mut()) else {
            continue;
        };
        for (status, name, header) in &headers_by_status {
            if let Some(response) = responses.get_mut(*status).and_then(|r| r.as_object_mut()) {
                let declared = response.entry("headers").or_insert_with(|| json!({}));
                declared[*name] = header.clone();
            }
        }
    }
}

/// Declares `Idempotent-Replayed` on the answers of every operation that takes an
/// `Idempotency-Key`: present (`true`) when the answer is the saved one of an earlier
/// request with the same key (`crate::commands::idempotency`; refusals are saved too, a `409
/// ERR_COUPON_ALREADY_ACQUIRED` for one). Optional, as a first answer has none; not on
/// `413`, `415` (answered before the key is read) and `5xx` (never saved).
pub fn document_replay_header(document: &mut serde_json::Value) {
    use serde_json::json;

    let header = json!({
        "description": "`true` when this is the saved answer of an earlier request with the same Idempotency-Key",
        "required": false,
        "schema": { "type": "string", "enum": ["true"] },
    });
    for operation in operations_mut(document) {
        let keyed = operation
            .get("parameters")
            .and_then(|p| p.as_array())
            .is_some_and(|ps| ps.iter().any(|p| p["name"] == "Idempotency-Key"));
        if !keyed {
            continue;
        }
        let Some(responses) = operation.get_mut("responses").and_then(|r| r.as_object_mut()) else {
            continue;
        };
        for (status, response) in responses.iter_mut() {
            let saved = !matches!(status.as_str(), "413" | "415") && !status.starts_with('5');
            let Some(response) = response.as_object_mut().filter(|_| saved) else {
                continue;
            };
            let declared = response.entry("headers").or_insert_with(|| json!({}));
            declared["Idempotent-Replayed"] = header.clone();
        }
    }
}

/// Links from what a response creates to the operations that use it (OpenAPI `links`), so
/// that clients and stateful testers (schemathesis) can follow a user, a product, a coupon,
/// an order or a request from the answer that made it.
///
/// Written into the JSON document rather than through utoipa's `Link`, which (in 5.5)
/// serializes `operationId` as `operation_id`.
pub fn link_operations(document: &mut serde_json::Value) {
    // What an operation's answer creates (its status, and the field that names the thing,
    // also the target's path parameter), and the operations that take it: (link, target).
    /// (link name, target operation)
    type Targets = &'static [(&'static str, &'static str)];
    const LINKS: &[(&str, &str, &str, Targets)] = &[
        (
            "create_user",
            "201",
            "userId",
            &[
                ("GetBalance", "get_balance"),
                ("ChargeBalance", "charge_balance"),
                ("ListTransactions", "list_transactions"),
                ("UserCoupons", "user_coupons"),
                ("ListOrders", "list_orders"),
                ("ListRequests", "list_requests"),
            ],
        ),
        (
            "create_product",
            "201",
            "productId",
            &[("GetProduct", "get_product"), ("UpdateProduct", "update_product")],
        ),
        (
            "create_coupon",
            "201",
            "couponId",
            &[
                ("GetCoupon", "get_coupon"),
                ("ApplicableProducts", "applicable_products"),
                ("IssueCoupon", "issue_coupon"),
            ],
        ),
        (
            "create_order",
            "202",
            "orderId",
            &[("PayOrder", "pay_order"), ("CancelOrder", "cancel_order")],
        ),
        (
            "create_order",
            "202",
            "requestId",
            &[("GetRequest", "get_request")],
        ),
        (
            "issue_coupon",
            "202",
            "requestId",
            &[("GetRequest", "get_request")],
        ),
        ("pay_order", "202", "requestId", &[("GetRequest", "get_request")]),
    ];
    for operation in operations_mut(document) {
        let Some(id) = operation
            .get("operationId")
            .and_then(|i| i.as_str())
            .map(str::to_owned)
        else {
            continue;
        };
        for (from, status, field, targets) in LINKS {
            if *from != id {
                continue;
            }
            let response = operation
                .get_mut("responses")
                .and_then(|r| r.get_mut(*status))
                .and_then(|r| r.as_object_mut());
            if let Some(response) = response {
                let links = response.entry("links").or_insert_with(|| serde_json::json!({}));
                for (name, to) in *targets {
                    links[*name] = serde_json::json!({
                        "operationId": to,
                        "parameters": { *field: format!("$response.body#/{field}") },
                    });
                }
            }
        }
    }
}

/// Every operation object under the document's `paths`.
fn operations_mut(
    document: &mut serde_json::Value,
) -> impl Iterator<Item = &mut serde_json::Map<String, serde_json::Value>> {
    document
        .get_mut("paths")
        .and_then(|p| p.as_object_mut())
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(|item| item.as_object_mut())
        .flat_map(|item| item.values_mut())
        .filter_map(|operation| operation.as_object_mut())
}
