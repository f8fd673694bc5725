//! Coupons through the API alone (no worker runs here): administration, reads, the
//! refusals the API gives at once, `202 Accepted` and its idempotency, and request status.

use chrono::{Duration, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use testkit::{spawn_app, TestApp};

fn in_a_day() -> String {
    (Utc::now() + Duration::days(1)).to_rfc3339()
}

async fn fixed_coupon(app: &TestApp, quantity: i64) -> i64 {
    app.create_coupon(json!({
        "name": "Welcome", "discountType": "FIXED", "discountValue": 3000,
        "totalQuantity": quantity, "expiresAt": in_a_day(),
    }))
    .await
}

#[tokio::test]
async fn an_admin_creates_coupons_that_everyone_can_read() {
    let app = spawn_app().await;
    let keyboard = app.create_product("Keyboard", 50_000, 5).await;
    let mouse = app.create_product("Mouse", 20_000, 5).await;
    let created = app
        .admin(
            Method::POST,
            "/admin/coupons",
            json!({
                "name": "Ten percent", "discountType": "PERCENT", "discountValue": 10,
                "totalQuantity": 50, "expiresAt": in_a_day(), "applicableProductIds": [mouse],
            }),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let id = created.body["couponId"].as_i64().unwrap();
    assert_eq!(created.body["discountType"], "PERCENT");
    assert_eq!(created.body["issuedQuantity"], 0);
    assert_eq!(created.body["applicableProductIds"], json!([mouse]));

    let read = app.get(&format!("/coupons/{id}")).await;
    assert_eq!(read.body, created.body);

    let applicable = app.get(&format!("/coupons/{id}/applicable-products")).await;
    let ids: Vec<i64> = applicable.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["productId"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![mouse]);

    let everything = fixed_coupon(&app, 5).await;
    let all = app
        .get(&format!("/coupons/{everything}/applicable-products"))
        .await;
    let ids: Vec<i64> = all.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["productId"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![keyboard, mouse]);
}

#[tokio::test]
async fn coupon_creation_refuses_bad_input_and_unknown_products() {
    let app = spawn_app().await;
    let past = (Utc::now() - Duration::hours(1)).to_rfc3339();
    let base = json!({"name": "C", "discountType": "FIXED", "discountValue": 100, "totalQuantity": 5, "expiresAt": in_a_day()});
    let with = |field: &str, value: Value| {
        let mut body = base.clone();
        body[field] = value;
        body
    };
    for (what, body) in [
        ("unknown type", with("discountType", json!("BOGO"))),
        (
            "percent over 100",
            with("discountType", json!("PERCENT"))
                .as_object()
                .map(|_| {
                    let mut b = with("discountType", json!("PERCENT"));
                    b["discountValue"] = json!(101);
                    b
                })
                .unwrap(),
        ),
        ("zero value", with("discountValue", json!(0))),
        ("zero quantity", with("totalQuantity", json!(0))),
        ("fractional quantity", with("totalQuantity", json!(1.5))),
        ("expired", with("expiresAt", json!(past))),
        ("not a timestamp", with("expiresAt", json!("tomorrow"))),
        ("empty product list", with("applicableProductIds", json!([]))),
        ("bad product id", with("applicableProductIds", json!([-1]))),
    ] {
        let answer = app.admin(Method::POST, "/admin/coupons", body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{what}: {answer:?}");
        assert_eq!(answer.code(), "ERR_INVALID_REQUEST", "{what}");
    }
    let unknown = app
        .admin(
            Method::POST,
            "/admin/coupons",
            with("applicableProductIds", json!([999])),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.code(), "ERR_PRODUCT_NOT_FOUND");
    let unauthorized = app.post("/admin/coupons", base.clone()).await;
    assert_eq!(unauthorized.code(), "ERR_UNAUTHORIZED");
    let coupons: i64 = sqlx::query_scalar("SELECT count(*) FROM coupons")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(coupons, 0);
}

#[tokio::test]
async fn an_issue_is_accepted_with_a_status_url_to_poll() {
    let app = spawn_app().await;
    let coupon = fixed_coupon(&app, 5).await;
    let user = app.create_user("Ann").await;
    let answer = app
        .command(&format!("/coupons/{coupon}/issue"), json!({ "userId": user }))
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    let id = answer.body["requestId"].as_str().unwrap();
    assert_eq!(answer.body["type"], "COUPON_ISSUE");
    assert_eq!(answer.body["status"], "PENDING");
    assert_eq!(answer.body["statusUrl"], format!("/requests/{id}"));
    assert_eq!(answer.headers["location"], format!("/requests/{id}").as_str());
    assert_eq!(answer.headers["retry-after"], "1");

    // No worker runs in this test: the request stays pending, and says when to poll again.
    let status = app.get(&format!("/requests/{id}")).await;
    assert_eq!(status.status, StatusCode::OK);
    assert_eq!(status.body["status"], "PENDING");
    assert_eq!(status.body["type"], "COUPON_ISSUE");
    assert!(status.body["createdAt"].as_str().is_some());
    assert!(status.body.get("completedAt").is_none());
    assert_eq!(status.headers["retry-after"], "1");
}

#[tokio::test]
async fn requests_that_do_not_exist_or_do_not_parse_are_refused() {
    let app = spawn_app().await;
    let user = app.create_user("Asker").await;
    let missing = app
        .get_as(user, &format!("/requests/{}", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.code(), "ERR_REQUEST_NOT_FOUND");
    let malformed = app.get_as(user, "/requests/not-a-uuid").await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert_eq!(malformed.code(), "ERR_INVALID_REQUEST");
}

#[tokio::test]
async fn what_the_api_already_knows_is_refused_at_once_without_queueing() {
    let app = spawn_app().await;
    let user = app.create_user("Bo").await;
    let open = fixed_coupon(&app, 5).await;
    let sold_out = fixed_coupon(&app, 1).await;
    let expired = fixed_coupon(&app, 5).await;
    let held = fixed_coupon(&app, 5).await;
    sqlx::query("UPDATE coupons SET issued_quantity = total_quantity WHERE id = $1")
        .bind(sold_out)
        .execute(&app.db)
        .await
        .unwrap();
    sqlx::query("UPDATE coupons SET expires_at = now() - interval '1 minute' WHERE id = $1")
        .bind(expired)
        .execute(&app.db)
        .await
        .unwrap();
    let request = uuid::Uuid::now_v7();
    sqlx::query("INSERT INTO requests (id, kind, partition_key, payload, status, result, completed_at) VALUES ($1, 'COUPON_ISSUE', $2, '{}', 'SUCCEEDED', '{}', now())")
        .bind(request)
        .bind(held)
        .execute(&app.db)
        .await
        .unwrap();
    sqlx::query("INSERT INTO user_coupons (id, coupon_id, user_id, request_id) VALUES ($1, $2, $3, $4)")
        .bind(uuid::Uuid::now_v7())
        .bind(held)
        .bind(user)
        .bind(request)
        .execute(&app.db)
        .await
        .unwrap();
    let counts_before = app.row_counts().await;

    for (what, path, body, status, code) in [
        (
            "another user, here one not registered",
            format!("/coupons/{open}/issue"),
            json!({"userId": 424242}),
            403,
            "ERR_FORBIDDEN",
        ),
        (
            "malformed user",
            format!("/coupons/{open}/issue"),
            json!({"userId": -4}),
            400,
            "ERR_BALANCE_INVALID_USER",
        ),
        (
            "user of the wrong type",
            format!("/coupons/{open}/issue"),
            json!({"userId": "7"}),
            400,
            "ERR_INVALID_REQUEST",
        ),
        (
            "malformed coupon",
            "/coupons/abc/issue".to_owned(),
            json!({"userId": user}),
            400,
            "ERR_INVALID_REQUEST",
        ),
        (
            "unknown coupon",
            "/coupons/999999/issue".to_owned(),
            json!({"userId": user}),
            404,
            "ERR_COUPON_NOT_FOUND",
        ),
        (
            "expired coupon",
            format!("/coupons/{expired}/issue"),
            json!({"userId": user}),
            410,
            "ERR_COUPON_EXPIRED",
        ),
        (
            "sold out",
            format!("/coupons/{sold_out}/issue"),
            json!({"userId": user}),
            410,
            "ERR_COUPON_OUT_OF_STOCK",
        ),
        (
            "already held",
            format!("/coupons/{held}/issue"),
            json!({"userId": user}),
            409,
            "ERR_COUPON_ALREADY_ACQUIRED",
        ),
    ] {
        let answer = app.post_as(user, &path, body).await;
        assert_eq!(answer.status.as_u16(), status, "{what}: {answer:?}");
        assert_eq!(answer.code(), code, "{what}");
    }
    assert_eq!(
        app.row_counts().await,
        counts_before,
        "a refused request stored something"
    );

    let missing = app.get("/coupons/999999").await;
    assert_eq!(missing.code(), "ERR_COUPON_NOT_FOUND");
    let expired_products = app.get(&format!("/coupons/{expired}/applicable-products")).await;
    assert_eq!(expired_products.status, StatusCode::GONE);
    assert_eq!(expired_products.code(), "ERR_COUPON_EXPIRED");
    let missing_products = app.get("/coupons/999999/applicable-products").await;
    assert_eq!(missing_products.code(), "ERR_COUPON_NOT_FOUND");
}

#[tokio::test]
async fn the_same_key_and_body_give_the_same_request_and_keys_belong_to_their_user_and_route() {
    let app = spawn_app().await;
    let coupon = fixed_coupon(&app, 5).await;
    let ann = app.create_user("Ann").await;
    let bo = app.create_user("Bo").await;
    let path = format!("/coupons/{coupon}/issue");
    let first = app
        .post_with_key(&path, json!({ "userId": ann }), "issue-1")
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    // Accepted for good once stored: a replay right after is the same 202.
    let again = app
        .post_with_key(&path, json!({ "userId": ann }), "issue-1")
        .await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{again:?}");
    assert_eq!(again.body, first.body);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.headers["location"], first.headers["location"]);

    let requests: i64 = sqlx::query_scalar("SELECT count(*) FROM requests")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(requests, 1);

    // The key belongs to its user: the same key from another user is that user's own.
    let bos = app.post_with_key(&path, json!({ "userId": bo }), "issue-1").await;
    assert_eq!(bos.status, StatusCode::ACCEPTED, "{bos:?}");
    assert_ne!(bos.body["requestId"], first.body["requestId"]);

    // The key belongs to its route: the same key on another coupon is another request.
    let other_coupon = fixed_coupon(&app, 5).await;
    let elsewhere = app
        .post_with_key(
            &format!("/coupons/{other_coupon}/issue"),
            json!({ "userId": ann }),
            "issue-1",
        )
        .await;
    assert_eq!(elsewhere.status, StatusCode::ACCEPTED);
    assert_ne!(elsewhere.body["requestId"], first.body["requestId"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_issues_with_one_key_store_one_request() {
    let app = spawn_app().await;
    let coupon = fixed_coupon(&app, 5).await;
    let ann = app.create_user("Ann").await;
    let path = format!("/coupons/{coupon}/issue");
    let answers = futures::future::join_all(
        (0..20).map(|_| app.post_with_key(&path, json!({ "userId": ann }), "burst")),
    )
    .await;
    let mut request_ids = std::collections::HashSet::new();
    for answer in &answers {
        match answer.status {
            StatusCode::ACCEPTED => {
                request_ids.insert(answer.body["requestId"].as_str().unwrap().to_owned());
            }
            // The first request's confirm was not recorded yet when this one arrived.
            StatusCode::CONFLICT => assert_eq!(answer.code(), "ERR_IDEMPOTENCY_KEY_IN_USE"),
            other => panic!("unexpected {other}: {answer:?}"),
        }
    }
    assert_eq!(request_ids.len(), 1, "{answers:?}");
    let stored: Vec<String> = sqlx::query_scalar("SELECT id::text FROM requests")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, request_ids.into_iter().collect::<Vec<_>>());

    // A refusal under a key is saved once too, and replayed.
    let unknown = "/coupons/999999/issue";
    let refusals = futures::future::join_all(
        (0..10).map(|_| app.post_with_key(unknown, json!({ "userId": ann }), "burst-2")),
    )
    .await;
    for answer in &refusals {
        assert_eq!(answer.code(), "ERR_COUPON_NOT_FOUND", "{answer:?}");
    }
    let replayed = refusals
        .iter()
        .filter(|a| a.headers.get("idempotent-replayed").is_some())
        .count();
    assert_eq!(replayed, refusals.len() - 1);
}

#[tokio::test]
async fn a_coupon_seen_sold_out_is_refused_from_memory_and_a_key_keeps_its_first_answer() {
    let app = spawn_app().await;
    let users = app.create_users(4).await;
    let (early, seer, later) = (users[0], users[1], users[2]);
    let coupon = fixed_coupon(&app, 1).await;
    let issue = |user: i64, key: &'static str| {
        let app = &app;
        async move {
            app.post_with_key(
                &format!("/coupons/{coupon}/issue"),
                json!({ "userId": user }),
                key,
            )
            .await
        }
    };
    let accepted = issue(early, "early").await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED);

    // Sold out, as a worker would have left it; the next issue reads it and remembers it.
    sqlx::query("UPDATE coupons SET issued_quantity = total_quantity WHERE id = $1")
        .bind(coupon)
        .execute(&app.db)
        .await
        .unwrap();
    let seen = issue(seer, "seer").await;
    assert_eq!(seen.status, StatusCode::GONE);
    assert_eq!(seen.code(), "ERR_COUPON_OUT_OF_STOCK");

    // Were the database asked, it would now let the command through: the 410 that follows
    // comes from memory.
    sqlx::query("UPDATE coupons SET issued_quantity = 0 WHERE id = $1")
        .bind(coupon)
        .execute(&app.db)
        .await
        .unwrap();
    let keys_before = app.row_counts().await;
    let refused = issue(later, "later").await;
    assert_eq!(refused.status, StatusCode::GONE, "{refused:?}");
    assert_eq!(refused.code(), "ERR_COUPON_OUT_OF_STOCK");
    assert_eq!(
        app.row_counts().await,
        keys_before,
        "a refusal from memory writes nothing"
    );
    let metrics = app.metrics().await.text().await.unwrap();
    let from_memory: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("api_commands_refused_from_memory_total{code=\"ERR_COUPON_OUT_OF_STOCK\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(from_memory >= 1.0, "{metrics}");

    // Keys keep their first answers: the accepted one its 202, the refused one its 410.
    let replayed = issue(early, "early").await;
    assert_eq!(replayed.status, StatusCode::ACCEPTED, "{replayed:?}");
    assert_eq!(replayed.body["requestId"], accepted.body["requestId"]);
    let again = issue(seer, "seer").await;
    assert_eq!(again.status, StatusCode::GONE);
    assert_eq!(again.headers["idempotent-replayed"], "true");
}
