//! Who may do what, driven by the OpenAPI document: every operation is public (the
//! contract's list), administrative (`admin_token`) or acts for a user (`user_token`), and
//! every operation that acts for a user refuses anyone but that user. A new route that is
//! neither public nor guarded fails here, and so does a guarded one whose handler forgot
//! its `Caller`.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use testkit::{spawn_app_with, Answer, TestApp};

/// The contract's public operations ("Public, without credentials").
const PUBLIC: &[(&str, &str)] = &[
    ("get", "/products"),
    ("get", "/products/{productId}"),
    ("get", "/products/popular"),
    ("get", "/coupons/{couponId}"),
    ("get", "/coupons/{couponId}/applicable-products"),
    ("post", "/users"),
    ("get", "/health/live"),
    ("get", "/health/ready"),
];

/// What the victim owns, named by the path parameters that reach it.
struct Victim {
    user: i64,
    order: String,
    request: String,
    coupon: i64,
    product: i64,
    /// One of the victim's tokens, by its `tokenId`.
    token: i64,
}

/// The body an operation is sent with, acting as `user`; `None` for operations without one.
/// An operation that takes a body and is missing here fails the test: add it.
fn body_for(method: &str, path: &str, user: i64, victim: &Victim) -> Option<Value> {
    match (method, path) {
        ("post", "/users/{userId}/balance/charge") => Some(json!({ "amount": 1000 })),
        ("post", "/coupons/{couponId}/issue") => Some(json!({ "userId": user })),
        ("post", "/orders") => Some(json!({
            "userId": user, "items": [{ "productId": victim.product, "quantity": 1 }],
        })),
        ("post", "/orders/{orderId}/payment") | ("post", "/orders/{orderId}/cancel") => {
            Some(json!({ "userId": user }))
        }
        _ => None,
    }
}

/// `path` with its parameters filled: the user given, the victim's objects.
fn concrete(path: &str, user: i64, victim: &Victim) -> String {
    path.replace("{userId}", &user.to_string())
        .replace("{orderId}", &victim.order)
        .replace("{requestId}", &victim.request)
        .replace("{couponId}", &victim.coupon.to_string())
        .replace("{productId}", &victim.product.to_string())
        .replace("{tokenId}", &victim.token.to_string())
}

/// Everything of `user` that an attacker could change.
async fn holdings(app: &TestApp, user: i64) -> Value {
    let row: (i64, i64, i64, i64, i64, i64, String) = sqlx::query_as(
        "SELECT (SELECT amount FROM balances WHERE user_id = $1),
                (SELECT count(*) FROM balance_transactions WHERE user_id = $1),
                (SELECT count(*) FROM user_coupons WHERE user_id = $1),
                (SELECT count(*) FROM requests WHERE user_id = $1),
                (SELECT count(*) FROM user_tokens WHERE user_id = $1 AND revoked_at IS NULL),
                (SELECT count(*) FROM idempotency_keys),
                (SELECT coalesce(string_agg(id::text || ':' || status, ',' ORDER BY id), '')
                   FROM orders WHERE user_id = $1)",
    )
    .bind(user)
    .fetch_one(&app.db)
    .await
    .unwrap();
    json!(row)
}

fn auth(token: &str) -> String {
    format!("Bearer {token}")
}

async fn send(
    app: &TestApp,
    method: &str,
    path: &str,
    body: Option<Value>,
    authorization: Option<&str>,
) -> Answer {
    let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
    match authorization {
        Some(value) => app.send(method, path, body, &[("Authorization", value)]).await,
        None => app.send_without_token(method, path, body, &[]).await,
    }
}

#[tokio::test]
async fn every_operation_is_public_administrative_or_refuses_anyone_but_its_user() {
    // Limits off: this test sends many invalid tokens on purpose (the limits have tests of
    // their own).
    let app = spawn_app_with(|config| {
        config.limits.auth_failures_per_min = 0;
        config.limits.user_writes_per_sec = 0;
    })
    .await;
    let victim_id = app.create_user("victim").await;
    let attacker = app.create_user("attacker").await;
    assert_eq!(app.charge(victim_id, 50_000).await.status, StatusCode::OK);
    let product = app.create_product("Lamp", 10_000, 100).await;
    let coupon = app
        .create_coupon(json!({
            "name": "All", "discountType": "FIXED", "discountValue": 1000, "totalQuantity": 100,
            "expiresAt": (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339(),
        }))
        .await;
    let placed = app
        .command(
            "/orders",
            json!({ "userId": victim_id, "items": [{ "productId": product, "quantity": 1 }] }),
        )
        .await;
    assert_eq!(placed.status, StatusCode::ACCEPTED, "{placed:?}");
    let victim = Victim {
        user: victim_id,
        order: placed.body["orderId"].as_str().unwrap().to_owned(),
        request: placed.body["requestId"].as_str().unwrap().to_owned(),
        coupon,
        product,
        token: sqlx::query_scalar("SELECT id FROM user_tokens WHERE user_id = $1")
            .bind(victim_id)
            .fetch_one(&app.db)
            .await
            .unwrap(),
    };
    let victim_token = app.token_of(victim.user).unwrap();
    let attacker_token = app.token_of(attacker).unwrap();
    let forged = shared::domain::identity::new_token().unwrap().token;
    let before = holdings(&app, victim.user).await;

    let document = app.get("/openapi.json").await.body;
    let mut guarded = 0;
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let schemes: Vec<&str> = operation["security"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|requirement| requirement.as_object())
                .flat_map(|requirement| requirement.keys().map(String::as_str))
                .collect();
            let what = format!("{} {path}", method.to_uppercase());
            if schemes.contains(&"admin_token") {
                assert!(
                    path.starts_with("/admin/"),
                    "{what}: the admin token outside /admin"
                );
                let answer = send(&app, method, &concrete(path, victim.user, &victim), None, None).await;
                assert_eq!(
                    answer.status,
                    StatusCode::UNAUTHORIZED,
                    "{what} without a token: {answer:?}"
                );
                continue;
            }
            if !schemes.contains(&"user_token") {
                assert!(
                    PUBLIC.contains(&(method.as_str(), path.as_str())),
                    "{what} is neither public in the contract nor guarded by a token"
                );
                let body = body_for(method, path, victim.user, &victim);
                let answer = send(&app, method, &concrete(path, victim.user, &victim), body, None).await;
                assert_ne!(
                    answer.status,
                    StatusCode::UNAUTHORIZED,
                    "{what} is public: {answer:?}"
                );
                continue;
            }
            guarded += 1;
            let takes_body = operation.get("requestBody").is_some();
            let as_victim = concrete(path, victim.user, &victim);
            let victim_body = body_for(method, path, victim.user, &victim);
            assert_eq!(
                takes_body,
                victim_body.is_some(),
                "{what}: add its body to body_for"
            );

            // No credentials, or credentials that are not valid: 401 with the scheme.
            for authorization in [
                None,
                Some(auth(&forged)),
                Some("Bearer garbage".to_owned()),
                Some("Basic dXNlcjpwYXNz".to_owned()),
            ] {
                let answer = send(
                    &app,
                    method,
                    &as_victim,
                    victim_body.clone(),
                    authorization.as_deref(),
                )
                .await;
                assert_eq!(
                    answer.status,
                    StatusCode::UNAUTHORIZED,
                    "{what} with {authorization:?}: {answer:?}"
                );
                assert_eq!(answer.code(), "ERR_UNAUTHORIZED", "{what}");
                assert_eq!(answer.headers["www-authenticate"], "Bearer", "{what}");
            }

            // Another user's valid token, acting for the victim.
            let names_user =
                path.contains("{userId}") || victim_body.as_ref().is_some_and(|b| b.get("userId").is_some());
            let answer = send(
                &app,
                method,
                &as_victim,
                victim_body.clone(),
                Some(&auth(&attacker_token)),
            )
            .await;
            if names_user {
                assert_eq!(
                    answer.status,
                    StatusCode::FORBIDDEN,
                    "{what} for the victim: {answer:?}"
                );
                assert_eq!(answer.code(), "ERR_FORBIDDEN", "{what}");
            } else {
                assert!(
                    path.contains("{requestId}"),
                    "{what}: names no user and no request"
                );
                assert_eq!(answer.status, StatusCode::NOT_FOUND, "{what}: {answer:?}");
                assert_eq!(answer.code(), "ERR_REQUEST_NOT_FOUND", "{what}");
            }

            // The attacker as themself, on the victim's order or request.
            let expected = if path.contains("{orderId}") {
                Some((StatusCode::FORBIDDEN, "ERR_ORDER_UNAUTHORIZED"))
            } else if path.contains("{requestId}") {
                Some((StatusCode::NOT_FOUND, "ERR_REQUEST_NOT_FOUND"))
            } else {
                None
            };
            if let Some((status, code)) = expected {
                let as_attacker = concrete(path, attacker, &victim);
                let attacker_body = body_for(method, path, attacker, &victim);
                let auth = auth(&attacker_token);
                let answer = send(&app, method, &as_attacker, attacker_body, Some(&auth)).await;
                assert_eq!(answer.status, status, "{what} on the victim's object: {answer:?}");
                assert_eq!(answer.code(), code, "{what}");
            }
        }
    }
    // Balance, ledger, charge, coupons, orders (list, one, create, pay, cancel), issue,
    // requests (one, list), tokens (issue, list, revoke the current one, one, all).
    assert!(guarded >= 17, "only {guarded} operations act for a user");

    // Nothing of the victim changed, and the victim's own token still works.
    assert_eq!(holdings(&app, victim.user).await, before);
    let own = send(
        &app,
        "get",
        &format!("/users/{}/balance", victim.user),
        None,
        Some(&auth(&victim_token)),
    )
    .await;
    assert_eq!(own.status, StatusCode::OK, "{own:?}");
    assert_eq!(own.body["balance"], 50_000);
}
