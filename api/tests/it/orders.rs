//! Orders through the API alone (no worker runs here): what is refused at once, what is
//! readable at once, cancel, and the reads with their 403 and 404.

use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::{spawn_app, TestApp};

async fn order(app: &TestApp, body: Value) -> testkit::Answer {
    app.command("/orders", body).await
}

/// Sets an order's status directly, as a worker or the batch would have.
async fn set_status(app: &TestApp, order: &str, status: &str) {
    sqlx::query(
        "UPDATE orders SET status = $2, reserved_until = now() + interval '1 hour',
                paid_at = CASE WHEN $2 = 'PAID' THEN now() END, paid_amount = CASE WHEN $2 = 'PAID' THEN total_amount ELSE 0 END
         WHERE id = $1::uuid",
    )
    .bind(order)
    .bind(status)
    .execute(&app.db)
    .await
    .unwrap();
}

#[tokio::test]
async fn an_order_is_accepted_and_readable_at_once_as_pending() {
    let app = spawn_app().await;
    let user = app.create_user("Ann").await;
    let pen = app.create_product("Pen", 1_500, 10).await;
    let ink = app.create_product("Ink", 700, 10).await;
    let answer = order(&app, json!({"userId": user, "items": [{"productId": pen, "quantity": 2}, {"productId": ink, "quantity": 1}]})).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    assert_eq!(answer.body["type"], "ORDER_CREATE");
    let id = answer.body["orderId"].as_str().unwrap();

    let read = app.get(&format!("/users/{user}/orders/{id}")).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.body["status"], "PENDING");
    assert_eq!(read.body["userId"], user);
    assert_eq!(read.body["totalAmount"], 3_700);
    assert_eq!(read.body["items"].as_array().unwrap().len(), 2);
    assert_eq!(
        read.body["items"][0],
        json!({"productId": pen, "name": "Pen", "unitPrice": 1_500, "quantity": 2})
    );

    let listed = app.get(&format!("/users/{user}/orders")).await;
    assert_eq!(listed.body["items"][0]["orderId"], id);
}

#[tokio::test]
async fn order_creation_refuses_bad_users_items_and_products_and_stores_nothing() {
    let app = spawn_app().await;
    let user = app.create_user("Bo").await;
    let pen = app.create_product("Pen", 1_500, 10).await;
    let line = |product: i64, quantity: i64| json!({"productId": product, "quantity": quantity});
    let many: Vec<Value> = (1..=51).map(|p| line(p, 1)).collect();
    let before = app.row_counts().await;
    for (what, body, status, code) in [
        (
            "another user, here one not registered",
            json!({"userId": 999_999, "items": [line(pen, 1)]}),
            403,
            "ERR_FORBIDDEN",
        ),
        (
            "malformed user",
            json!({"userId": 0, "items": [line(pen, 1)]}),
            400,
            "ERR_ORDER_INVALID_USER",
        ),
        (
            "no items",
            json!({"userId": user, "items": []}),
            400,
            "ERR_ORDER_INVALID_ITEMS",
        ),
        (
            "zero quantity",
            json!({"userId": user, "items": [line(pen, 0)]}),
            400,
            "ERR_ORDER_INVALID_ITEMS",
        ),
        (
            "negative quantity",
            json!({"userId": user, "items": [line(pen, -2)]}),
            400,
            "ERR_ORDER_INVALID_ITEMS",
        ),
        (
            "huge quantity",
            json!({"userId": user, "items": [line(pen, 1_000_000)]}),
            400,
            "ERR_ORDER_INVALID_ITEMS",
        ),
        (
            "51 lines",
            json!({"userId": user, "items": many}),
            400,
            "ERR_ORDER_INVALID_ITEMS",
        ),
        (
            "duplicate product",
            json!({"userId": user, "items": [line(pen, 1), line(pen, 2)]}),
            400,
            "ERR_ORDER_INVALID_ITEMS",
        ),
        (
            "malformed product",
            json!({"userId": user, "items": [line(-1, 1)]}),
            400,
            "ERR_ORDER_INVALID_ITEMS",
        ),
        (
            "items of the wrong type",
            json!({"userId": user, "items": "pen"}),
            400,
            "ERR_INVALID_REQUEST",
        ),
        (
            "unknown product",
            json!({"userId": user, "items": [line(pen, 1), line(424_242, 1)]}),
            404,
            "ERR_PRODUCT_NOT_FOUND",
        ),
    ] {
        let answer = app.post_as(user, "/orders", body).await;
        assert_eq!(answer.status.as_u16(), status, "{what}: {answer:?}");
        assert_eq!(answer.code(), code, "{what}");
    }
    assert_eq!(app.row_counts().await, before, "a refused order stored something");
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(orders, 0);
}

#[tokio::test]
async fn payment_refuses_at_once_what_the_api_knows() {
    let app = spawn_app().await;
    let owner = app.create_user("Owner").await;
    let other = app.create_user("Other").await;
    let pen = app.create_product("Pen", 1_500, 10).await;
    let created = order(
        &app,
        json!({"userId": owner, "items": [{"productId": pen, "quantity": 1}]}),
    )
    .await;
    let id = created.body["orderId"].as_str().unwrap().to_owned();
    let pay = |user: i64, coupon: Option<i64>, order: &str| {
        let mut body = json!({"userId": user});
        if let Some(c) = coupon {
            body["couponId"] = json!(c);
        }
        let path = format!("/orders/{order}/payment");
        let app = &app;
        async move { app.command(&path, body).await }
    };
    let missing = pay(owner, None, &uuid::Uuid::now_v7().to_string()).await;
    assert_eq!(
        (missing.status.as_u16(), missing.code()),
        (404, "ERR_PAYMENT_ORDER_NOT_FOUND")
    );
    let stranger = pay(other, None, &id).await;
    assert_eq!(
        (stranger.status.as_u16(), stranger.code()),
        (403, "ERR_ORDER_UNAUTHORIZED")
    );
    let bad_coupon = pay(owner, Some(-5), &id).await;
    assert_eq!(
        (bad_coupon.status.as_u16(), bad_coupon.code()),
        (400, "ERR_PAYMENT_INVALID_COUPON")
    );
    let malformed = app
        .post("/orders/not-a-uuid/payment", json!({"userId": owner}))
        .await;
    assert_eq!(
        (malformed.status.as_u16(), malformed.code()),
        (400, "ERR_INVALID_REQUEST")
    );
    // A pending order is accepted: its creation is settled first.
    assert_eq!(pay(owner, None, &id).await.status, StatusCode::ACCEPTED);
    for status in ["PAID", "REJECTED", "CANCELLED", "EXPIRED"] {
        set_status(&app, &id, status).await;
        let refused = pay(owner, None, &id).await;
        assert_eq!(
            (refused.status.as_u16(), refused.code()),
            (400, "ERR_PAYMENT_INVALID_ORDER_STATUS"),
            "{status}"
        );
    }
}

#[tokio::test]
async fn cancel_releases_reserved_stock_once_and_only_for_the_owner() {
    let app = spawn_app().await;
    let owner = app.create_user("Owner").await;
    let other = app.create_user("Other").await;
    let pen = app.create_product("Pen", 1_500, 10).await;
    let created = order(
        &app,
        json!({"userId": owner, "items": [{"productId": pen, "quantity": 3}]}),
    )
    .await;
    let id = created.body["orderId"].as_str().unwrap().to_owned();
    // As a worker would have reserved it.
    set_status(&app, &id, "RESERVED").await;
    sqlx::query("UPDATE products SET reserved = 3 WHERE id = $1")
        .bind(pen)
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(app.get(&format!("/products/{pen}")).await.body["stock"], 7);

    let path = format!("/orders/{id}/cancel");
    let stranger = app.post(&path, json!({"userId": other})).await;
    assert_eq!(
        (stranger.status.as_u16(), stranger.code()),
        (403, "ERR_ORDER_UNAUTHORIZED")
    );
    let missing = app
        .post(
            &format!("/orders/{}/cancel", uuid::Uuid::now_v7()),
            json!({"userId": owner}),
        )
        .await;
    assert_eq!(
        (missing.status.as_u16(), missing.code()),
        (404, "ERR_ORDER_NOT_FOUND")
    );

    let cancelled = app.post(&path, json!({"userId": owner})).await;
    assert_eq!(cancelled.status, StatusCode::OK, "{cancelled:?}");
    assert_eq!(cancelled.body["status"], "CANCELLED");
    assert_eq!(app.get(&format!("/products/{pen}")).await.body["stock"], 10);
    let again = app.post(&path, json!({"userId": owner})).await;
    assert_eq!(
        (again.status.as_u16(), again.code()),
        (409, "ERR_ORDER_INVALID_STATUS")
    );
    assert_eq!(
        app.get(&format!("/products/{pen}")).await.body["stock"],
        10,
        "released once"
    );
}

#[tokio::test]
async fn order_reads_page_newest_first_and_guard_other_users_orders() {
    let app = spawn_app().await;
    let owner = app.create_user("Owner").await;
    let other = app.create_user("Other").await;
    let pen = app.create_product("Pen", 100, 100).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let created = order(
            &app,
            json!({"userId": owner, "items": [{"productId": pen, "quantity": 1}]}),
        )
        .await;
        ids.push(created.body["orderId"].as_str().unwrap().to_owned());
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut path = format!("/users/{owner}/orders?limit=2");
    loop {
        let page = app.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        seen.extend(
            page.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["orderId"].as_str().unwrap().to_owned()),
        );
        match page.body["nextCursor"].as_str() {
            Some(cursor) => path = format!("/users/{owner}/orders?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ids);

    let theirs = app.get(&format!("/users/{other}/orders/{}", ids[0])).await;
    assert_eq!(
        (theirs.status.as_u16(), theirs.code()),
        (403, "ERR_ORDER_UNAUTHORIZED")
    );
    let missing = app
        .get(&format!("/users/{owner}/orders/{}", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(
        (missing.status.as_u16(), missing.code()),
        (404, "ERR_ORDER_NOT_FOUND")
    );
    let no_user = app.get_as(owner, "/users/999999/orders").await;
    assert_eq!((no_user.status.as_u16(), no_user.code()), (403, "ERR_FORBIDDEN"));
    let malformed_user = app.get_as(owner, "/users/zero/orders").await;
    assert_eq!(
        (malformed_user.status.as_u16(), malformed_user.code()),
        (400, "ERR_ORDER_INVALID_USER")
    );
    let bad_cursor = app.get(&format!("/users/{owner}/orders?cursor=zzz")).await;
    assert_eq!(bad_cursor.code(), "ERR_INVALID_REQUEST");
    assert!(app.get(&format!("/users/{other}/orders")).await.body["items"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn an_order_past_a_products_per_customer_limit_is_refused_at_once() {
    let app = spawn_app().await;
    let user = app.create_user("Flash").await;
    let other = app.create_user("Other").await;
    let sneakers = app
        .admin(
            reqwest::Method::POST,
            "/admin/products",
            json!({"name": "Sneakers", "price": 100_000, "stock": 100, "maxPerCustomer": 2}),
        )
        .await;
    let sneakers = sneakers.body["productId"].as_i64().unwrap();
    let socks = app.create_product("Socks", 5_000, 100).await;
    let line = |product: i64, quantity: i64| json!({"productId": product, "quantity": quantity});
    let refused = |answer: &testkit::Answer| {
        assert_eq!(answer.status, StatusCode::CONFLICT, "{answer:?}");
        assert_eq!(answer.code(), "ERR_ORDER_LIMIT_EXCEEDED", "{answer:?}");
    };

    // The order alone passes the limit: refused whatever the user holds, storing nothing.
    let before = app.row_counts().await;
    refused(
        &order(
            &app,
            json!({"userId": user, "items": [line(socks, 1), line(sneakers, 3)]}),
        )
        .await,
    );
    assert_eq!(app.row_counts().await, before, "a refused order stored something");

    // Up to the limit is accepted; an unlimited product takes any quantity.
    let first = order(
        &app,
        json!({"userId": user, "items": [line(socks, 50), line(sneakers, 2)]}),
    )
    .await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{first:?}");
    let first = first.body["orderId"].as_str().unwrap().to_owned();

    // Held units count once the order is reserved, and still once it is paid.
    set_status(&app, &first, "RESERVED").await;
    refused(&order(&app, json!({"userId": user, "items": [line(sneakers, 1)]})).await);
    set_status(&app, &first, "PAID").await;
    refused(&order(&app, json!({"userId": user, "items": [line(sneakers, 1)]})).await);
    // The limit is per customer.
    let theirs = order(&app, json!({"userId": other, "items": [line(sneakers, 2)]})).await;
    assert_eq!(theirs.status, StatusCode::ACCEPTED, "{theirs:?}");

    // Units of a cancelled (or expired, or rejected) order are free again.
    for freed in ["CANCELLED", "EXPIRED", "REJECTED"] {
        set_status(&app, &first, freed).await;
        let again = order(&app, json!({"userId": user, "items": [line(sneakers, 2)]})).await;
        assert_eq!(again.status, StatusCode::ACCEPTED, "{freed}: {again:?}");
        // Still PENDING, so it holds nothing yet: withdraw it for the next round.
        set_status(&app, again.body["orderId"].as_str().unwrap(), "REJECTED").await;
    }
}
