//! `GET /docs`: an interactive reference of the contract, Swagger UI over `/openapi.json`.
//!
//! The UI's files are vendored from the npm package `swagger-ui-dist`
//! (`api/assets/swagger-ui/README.md` says which version and how to update it) and built
//! into the binary, so the page loads nothing from a CDN and works on a machine without
//! internet. Like `/openapi.json`, these routes are public and not part of the OpenAPI
//! document.

use std::hash::{DefaultHasher, Hasher};
use std::sync::LazyLock;

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

/// Where the page is served.
pub const PATH: &str = "/docs";

/// One file of the page, served at `/docs/{name}`.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

/// The page's own script: Swagger UI over the document the page names. The spec
/// validator's badge is off, as it would send the document's address to another host.
const INITIALIZER: &str = r#"// Swagger UI over the api's own OpenAPI document, named by the page.
"use strict";
(function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    domNode: root,
    deepLinking: true,
    validatorUrl: null,
  });
})();
"#;

static ASSETS: [Asset; 4] = [
    Asset {
        name: "swagger-ui-bundle.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../assets/swagger-ui/swagger-ui-bundle.js"),
    },
    Asset {
        name: "swagger-ui.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../../assets/swagger-ui/swagger-ui.css"),
    },
    Asset {
        name: "favicon-32x32.png",
        content_type: "image/png",
        bytes: include_bytes!("../../assets/swagger-ui/favicon-32x32.png"),
    },
    Asset {
        name: "swagger-initializer.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: INITIALIZER.as_bytes(),
    },
];

/// The page. Its asset addresses carry a fingerprint of the assets' contents, so that
/// the assets can be cached for a year and a new build is still loaded at once; the page
/// itself is revalidated on every visit.
static PAGE: LazyLock<String> = LazyLock::new(|| {
    let mut fingerprint = DefaultHasher::new();
    for asset in &ASSETS {
        fingerprint.write(asset.bytes);
    }
    let v = format!("{:016x}", fingerprint.finish());
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>E-commerce order pipeline: API reference</title>
<link rel="icon" type="image/png" href="{PATH}/favicon-32x32.png?v={v}">
<link rel="stylesheet" href="{PATH}/swagger-ui.css?v={v}">
</head>
<body>
<div id="swagger-ui" data-openapi-url="/openapi.json"></div>
<script src="{PATH}/swagger-ui-bundle.js?v={v}"></script>
<script src="{PATH}/swagger-initializer.js?v={v}"></script>
</body>
</html>
"#
    )
});

/// Scripts, styles and requests from the api's own origin only; inline styles are allowed
/// because Swagger UI sets some, inline scripts are not.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; \
    connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `/docs`, `/docs/` (a redirect to `/docs`) and the page's files.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new()
        .route(PATH, get(page))
        .route(&format!("{PATH}/"), get(|| async { Redirect::permanent(PATH) }));
    for asset in &ASSETS {
        router = router.route(
            &format!("{PATH}/{}", asset.name),
            get(move || async move { asset_response(asset) }),
        );
    }
    router
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE.as_str(),
    )
        .into_response()
}

fn asset_response(asset: &'static Asset) -> Response {
    let headers: [(HeaderName, HeaderValue); 3] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type)),
        (
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=31536000, immutable"),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
    ];
    (headers, asset.bytes).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_links_every_asset_with_its_fingerprint() {
        for asset in &ASSETS {
            assert!(
                PAGE.contains(&format!("\"{PATH}/{}?v=", asset.name)),
                "{} is not linked from the page",
                asset.name
            );
        }
    }
}
