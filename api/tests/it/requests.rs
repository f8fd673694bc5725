//! A user's requests: `GET /users/{userId}/requests`, newest first, filtered by status and
//! type, in pages; only the caller's own.

use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::{spawn_app, TestApp};

/// The request ids of every page of `path` (which has its filters), `limit` per page.
async fn every_page(app: &TestApp, user: i64, path: &str, limit: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let separator = if path.contains('?') { '&' } else { '?' };
        let page_path = match &cursor {
            Some(c) => format!("{path}{separator}limit={limit}&cursor={c}"),
            None => format!("{path}{separator}limit={limit}"),
        };
        let page = app.get_as(user, &page_path).await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        let items = page.body["items"].as_array().unwrap();
        assert!(items.len() <= limit);
        seen.extend(items.iter().map(|i| i["requestId"].as_str().unwrap().to_owned()));
        match page.body["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return seen,
        }
    }
}

fn request_id(answer: &testkit::Answer) -> String {
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    answer.body["requestId"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_user_lists_their_requests_newest_first_by_status_and_type() {
    let app = spawn_app().await;
    let user = app.create_user("Ann").await;
    let other = app.create_user("Bo").await;
    let product = app.create_product("Pen", 1_000, 10).await;
    let expires = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let mut issued = Vec::new();
    for n in 0..3 {
        let coupon = app
            .create_coupon(json!({
                "name": format!("C{n}"), "discountType": "FIXED", "discountValue": 100,
                "totalQuantity": 10, "expiresAt": expires,
            }))
            .await;
        let answer = app
            .command(&format!("/coupons/{coupon}/issue"), json!({ "userId": user }))
            .await;
        issued.push(request_id(&answer));
    }
    let order = app
        .command(
            "/orders",
            json!({ "userId": user, "items": [{ "productId": product, "quantity": 1 }] }),
        )
        .await;
    let created = request_id(&order);
    let theirs = app
        .command(
            "/orders",
            json!({ "userId": other, "items": [{ "productId": product, "quantity": 1 }] }),
        )
        .await;
    let theirs = request_id(&theirs);
    // As a worker would have settled one of them.
    sqlx::query(
        "UPDATE requests SET status = 'SUCCEEDED', result = '{}', completed_at = now() WHERE id = $1::uuid",
    )
    .bind(&issued[1])
    .execute(&app.db)
    .await
    .unwrap();

    let mut newest_first = issued.clone();
    newest_first.push(created.clone());
    newest_first.reverse();
    let path = format!("/users/{user}/requests");
    assert_eq!(every_page(&app, user, &path, 2).await, newest_first);
    assert!(!newest_first.contains(&theirs));

    let coupons = every_page(&app, user, &format!("{path}?type=COUPON_ISSUE"), 10).await;
    assert_eq!(coupons, issued.iter().rev().cloned().collect::<Vec<_>>());
    let succeeded = every_page(&app, user, &format!("{path}?status=SUCCEEDED"), 10).await;
    assert_eq!(succeeded, vec![issued[1].clone()]);
    let pending_orders = every_page(
        &app,
        user,
        &format!("{path}?status=PENDING&type=ORDER_CREATE"),
        10,
    )
    .await;
    assert_eq!(pending_orders, vec![created.clone()]);

    // Each item is the request resource of GET /requests/{id}.
    let first = app.get_as(user, &format!("{path}?limit=1")).await;
    let one = app.get_as(user, &format!("/requests/{created}")).await;
    let mut listed: Value = first.body["items"][0].clone();
    assert_eq!(listed["requestId"], created.as_str());
    assert_eq!(
        listed.as_object_mut().unwrap().remove("status"),
        Some(json!("PENDING"))
    );
    let mut single = one.body.clone();
    single.as_object_mut().unwrap().remove("status");
    assert_eq!(listed, single);

    // Someone else's list, and bad filters.
    let forbidden = app.get_as(user, &format!("/users/{other}/requests")).await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    assert_eq!(forbidden.code(), "ERR_FORBIDDEN");
    for query in ["status=DONE", "type=REFUND", "limit=0", "cursor=nope"] {
        let bad = app.get_as(user, &format!("{path}?{query}")).await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{query}: {bad:?}");
        assert_eq!(bad.code(), "ERR_INVALID_REQUEST", "{query}");
    }
}
