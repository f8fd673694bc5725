//! The catalogue: public reads and the admin routes behind the bearer token.

use reqwest::{Method, StatusCode};
use serde_json::json;
use testkit::spawn_app;

#[tokio::test]
async fn an_admin_creates_a_product_that_everyone_can_read() {
    let app = spawn_app().await;
    let created = app
        .admin(
            Method::POST,
            "/admin/products",
            json!({ "name": "Keyboard", "price": 89_000, "stock": 30 }),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let id = created.body["productId"].as_i64().unwrap();
    assert_eq!(
        created.body,
        json!({ "productId": id, "name": "Keyboard", "price": 89_000, "stock": 30 })
    );

    let read = app.get(&format!("/products/{id}")).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.body, created.body);
}

#[tokio::test]
async fn products_list_in_pages() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.create_product(&format!("Item {i}"), 1_000 + i, 10).await);
    }
    let first = app.get("/products?limit=2").await;
    assert_eq!(first.status, StatusCode::OK);
    let page: Vec<i64> = first.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["productId"].as_i64().unwrap())
        .collect();
    assert_eq!(page, ids[..2]);
    let mut all = page;
    let mut cursor = first.body["nextCursor"].as_str().map(str::to_owned);
    while let Some(c) = cursor {
        let next = app.get(&format!("/products?limit=2&cursor={c}")).await;
        all.extend(
            next.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["productId"].as_i64().unwrap()),
        );
        cursor = next.body["nextCursor"].as_str().map(str::to_owned);
    }
    assert_eq!(all, ids);
}

#[tokio::test]
async fn an_unknown_product_is_404_and_a_malformed_id_400() {
    let app = spawn_app().await;
    let missing = app.get("/products/12345").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.code(), "ERR_PRODUCT_NOT_FOUND");
    let malformed = app.get("/products/twelve").await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert_eq!(malformed.code(), "ERR_INVALID_REQUEST");
}

#[tokio::test]
async fn a_patch_changes_price_and_orderable_stock_and_keeps_reservations() {
    let app = spawn_app().await;
    let id = app.create_product("Mouse", 20_000, 10).await;
    // Units held by an unpaid order.
    sqlx::query("UPDATE products SET reserved = 4 WHERE id = $1")
        .bind(id)
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(app.get(&format!("/products/{id}")).await.body["stock"], 6);

    let patched = app
        .admin(
            Method::PATCH,
            &format!("/admin/products/{id}"),
            json!({ "stock": 50 }),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK);
    assert_eq!(patched.body["stock"], 50);
    assert_eq!(patched.body["price"], 20_000);
    let (stock, reserved): (i64, i64) = sqlx::query_as("SELECT stock, reserved FROM products WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!((stock, reserved), (54, 4));

    let repriced = app
        .admin(
            Method::PATCH,
            &format!("/admin/products/{id}"),
            json!({ "price": 15_000 }),
        )
        .await;
    assert_eq!(repriced.body["price"], 15_000);
    assert_eq!(repriced.body["stock"], 50);

    let missing = app
        .admin(Method::PATCH, "/admin/products/999", json!({ "price": 1 }))
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.code(), "ERR_PRODUCT_NOT_FOUND");
}

#[tokio::test]
async fn admin_routes_need_the_admin_token() {
    let app = spawn_app().await;
    let body = json!({ "name": "Cable", "price": 5_000, "stock": 1 });
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("test-admin-token"),
        Some("Basic dGVzdA=="),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
        let answer = app
            .send(Method::POST, "/admin/products", Some(body.clone()), &headers)
            .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(answer.code(), "ERR_UNAUTHORIZED");
        let patch = app
            .send(
                Method::PATCH,
                "/admin/products/1",
                Some(json!({ "price": 1 })),
                &headers,
            )
            .await;
        assert_eq!(patch.status, StatusCode::UNAUTHORIZED, "{auth:?}");
    }
    let products: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(products, 0);
}

#[tokio::test]
async fn a_per_customer_limit_is_set_at_creation_changed_removed_and_shown_in_reads() {
    let app = spawn_app().await;
    let created = app
        .admin(
            Method::POST,
            "/admin/products",
            json!({ "name": "Sneakers", "price": 129_000, "stock": 100, "maxPerCustomer": 2 }),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let id = created.body["productId"].as_i64().unwrap();
    assert_eq!(created.body["maxPerCustomer"], 2);
    let read = app.get(&format!("/products/{id}")).await;
    assert_eq!(read.body, created.body);
    let listed = app.get("/products").await;
    assert_eq!(listed.body["items"][0]["maxPerCustomer"], 2);

    let path = format!("/admin/products/{id}");
    // Absent leaves the limit as it is.
    let repriced = app.admin(Method::PATCH, &path, json!({ "price": 99_000 })).await;
    assert_eq!(repriced.status, StatusCode::OK, "{repriced:?}");
    assert_eq!(repriced.body["maxPerCustomer"], 2);
    let raised = app
        .admin(Method::PATCH, &path, json!({ "maxPerCustomer": 5 }))
        .await;
    assert_eq!(raised.status, StatusCode::OK, "{raised:?}");
    assert_eq!(raised.body["maxPerCustomer"], 5);
    assert_eq!(raised.body["price"], 99_000);
    // Null removes it: the field is then absent, as for a product that never had one.
    let removed = app
        .admin(Method::PATCH, &path, json!({ "maxPerCustomer": null }))
        .await;
    assert_eq!(removed.status, StatusCode::OK, "{removed:?}");
    assert!(removed.body.get("maxPerCustomer").is_none(), "{removed:?}");
    let stored: Option<i64> = sqlx::query_scalar("SELECT max_per_customer FROM products WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, None);
    let read = app.get(&format!("/products/{id}")).await;
    assert!(read.body.get("maxPerCustomer").is_none(), "{read:?}");

    // A product created without one has none; null at creation is the same.
    let plain = app
        .admin(
            Method::POST,
            "/admin/products",
            json!({ "name": "Socks", "price": 9_000, "stock": 1, "maxPerCustomer": null }),
        )
        .await;
    assert_eq!(plain.status, StatusCode::CREATED, "{plain:?}");
    assert!(plain.body.get("maxPerCustomer").is_none(), "{plain:?}");
}

#[tokio::test]
async fn a_per_customer_limit_that_is_not_a_positive_whole_number_is_400_and_changes_nothing() {
    let app = spawn_app().await;
    let id = app.create_product("Watch", 300_000, 10).await;
    for bad in [
        json!(0),
        json!(-1),
        json!(1.5),
        json!("2"),
        json!(true),
        json!(1e12),
    ] {
        let created = app
            .admin(
                Method::POST,
                "/admin/products",
                json!({ "name": "Limited", "price": 1_000, "stock": 1, "maxPerCustomer": bad }),
            )
            .await;
        assert_eq!(created.status, StatusCode::BAD_REQUEST, "{bad}: {created:?}");
        assert_eq!(created.code(), "ERR_INVALID_REQUEST");
        let patched = app
            .admin(
                Method::PATCH,
                &format!("/admin/products/{id}"),
                json!({ "maxPerCustomer": bad, "price": 1 }),
            )
            .await;
        assert_eq!(patched.status, StatusCode::BAD_REQUEST, "{bad}: {patched:?}");
        assert_eq!(patched.code(), "ERR_INVALID_REQUEST");
    }
    let stored: (i64, i64, Option<i64>) =
        sqlx::query_as("SELECT count(*) OVER (), price, max_per_customer FROM products")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(stored, (1, 300_000, None));
}
