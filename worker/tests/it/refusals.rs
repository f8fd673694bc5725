//! Every refusal a worker settles, through the HTTP API: out of stock, insufficient balance,
//! each kind of invalid coupon, and an order cancelled before its creation was settled.

use reqwest::StatusCode;
use serde_json::json;
use testkit::System;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_settled_by_workers_carry_their_codes_and_change_nothing() {
    let system = System::start(1).await;
    let expires = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let keyboard = system.product(10_000, 1).await;
    let mouse = system.product(4_000, 100).await;
    let users = system.app.create_users(3).await;
    let (ann, bo, cy) = (users[0], users[1], users[2]);

    // Out of stock: the second order for the last unit is rejected.
    let first = system.reserved_order(ann, &[(keyboard, 1)]).await;
    let second = system.order(bo, &[(keyboard, 1)]).await;
    assert_eq!(
        system.outcome(second.body["requestId"].as_str().unwrap()).await,
        "ERR_ORDER_OUT_OF_STOCK"
    );
    let read = system
        .app
        .get(&format!(
            "/users/{bo}/orders/{}",
            second.body["orderId"].as_str().unwrap()
        ))
        .await;
    assert_eq!(read.body["status"], "REJECTED");

    // Insufficient balance: the order stays reserved; after a charge the payment goes through.
    let poor = system.pay(&first, ann, None).await;
    assert_eq!(
        system.outcome(poor.body["requestId"].as_str().unwrap()).await,
        "ERR_PAYMENT_INSUFFICIENT_BALANCE"
    );
    assert_eq!(
        system.app.get(&format!("/users/{ann}/orders/{first}")).await.body["status"],
        "RESERVED"
    );
    assert_eq!(system.app.balance(ann).await, 0);
    system.app.charge(ann, 10_000).await;
    let paid = system.pay(&first, ann, None).await;
    assert_eq!(
        system.outcome(paid.body["requestId"].as_str().unwrap()).await,
        "SUCCEEDED"
    );
    assert_eq!(system.app.balance(ann).await, 0);

    // Invalid coupons: not held, not applicable, expired, already used.
    let on_keyboards = system
        .app
        .create_coupon(json!({"name": "kb", "discountType": "FIXED", "discountValue": 500, "totalQuantity": 10, "expiresAt": expires, "applicableProductIds": [keyboard]}))
        .await;
    let anything = system
        .app
        .create_coupon(json!({"name": "any", "discountType": "PERCENT", "discountValue": 10, "totalQuantity": 10, "expiresAt": expires}))
        .await;
    let short_lived = system
        .app
        .create_coupon(json!({"name": "soon", "discountType": "FIXED", "discountValue": 100, "totalQuantity": 10, "expiresAt": expires}))
        .await;
    for coupon in [on_keyboards, anything, short_lived] {
        let issued = system.issue(coupon, cy).await;
        assert_eq!(
            system.outcome(issued.body["requestId"].as_str().unwrap()).await,
            "SUCCEEDED"
        );
    }
    sqlx::query("UPDATE coupons SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(short_lived)
        .execute(&system.app.db)
        .await
        .unwrap();
    system.app.charge(cy, 100_000).await;
    let order = system.reserved_order(cy, &[(mouse, 1)]).await;
    let not_held = system.app.create_coupon(json!({"name": "x", "discountType": "FIXED", "discountValue": 1, "totalQuantity": 1, "expiresAt": expires})).await;
    for (coupon, why) in [
        (not_held, "not held"),
        (on_keyboards, "not applicable"),
        (short_lived, "expired"),
    ] {
        let attempt = system.pay(&order, cy, Some(coupon)).await;
        assert_eq!(attempt.status, StatusCode::ACCEPTED, "{why}");
        let outcome = system.outcome(attempt.body["requestId"].as_str().unwrap()).await;
        assert_eq!(outcome, "ERR_PAYMENT_INVALID_COUPON", "{why}");
    }
    assert_eq!(
        system.app.balance(cy).await,
        100_000,
        "refused payments debit nothing"
    );
    let used = system.pay(&order, cy, Some(anything)).await;
    assert_eq!(
        system.outcome(used.body["requestId"].as_str().unwrap()).await,
        "SUCCEEDED"
    );
    assert_eq!(system.app.balance(cy).await, 100_000 - 3_600);
    let another = system.reserved_order(cy, &[(mouse, 1)]).await;
    let reuse = system.pay(&another, cy, Some(anything)).await;
    assert_eq!(
        system.outcome(reuse.body["requestId"].as_str().unwrap()).await,
        "ERR_PAYMENT_INVALID_COUPON"
    );
    let held = system.app.get(&format!("/users/{cy}/coupons")).await;
    let held: Vec<i64> = held.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["couponId"].as_i64().unwrap())
        .collect();
    assert_eq!(
        held,
        vec![on_keyboards],
        "used and expired coupons are no longer listed"
    );
    system.assert_money_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_cancelled_before_its_creation_is_settled_reserves_nothing() {
    // No worker yet: the creation waits in its queue while the order is cancelled.
    let system = System::start(0).await;
    let product = system.product(1_000, 5).await;
    let user = system.app.create_users(1).await[0];
    let created = system.order(user, &[(product, 2)]).await;
    let order = created.body["orderId"].as_str().unwrap();
    let pending = system.app.get(&format!("/users/{user}/orders/{order}")).await;
    assert_eq!(pending.body["status"], "PENDING");
    let cancelled = system
        .app
        .post(&format!("/orders/{order}/cancel"), json!({"userId": user}))
        .await;
    assert_eq!(cancelled.status, StatusCode::OK, "{cancelled:?}");

    system.spawn_worker().await;
    let outcome = system.outcome(created.body["requestId"].as_str().unwrap()).await;
    assert_eq!(outcome, "ERR_ORDER_CONCURRENCY_CONFLICT");
    assert_eq!(
        system
            .app
            .get(&format!("/users/{user}/orders/{order}"))
            .await
            .body["status"],
        "CANCELLED"
    );
    assert_eq!(system.assert_stock_reconciles(product, 5).await, (5, 0, 0));
}
