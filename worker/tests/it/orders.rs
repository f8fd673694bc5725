//! Orders and payments through the whole pipeline: reservation without overselling,
//! money that always adds up, one payment per order, per-user order of commands, and
//! expiry racing payment.

use std::collections::HashMap;

use futures::future::join_all;
use rand::Rng;
use reqwest::StatusCode;
use serde_json::json;
use testkit::System;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_units_two_hundred_buyers_nothing_oversold_and_stock_reconciles() {
    let system = System::start(2).await;
    system.wait_for_owners(2).await;
    let product = system.product(1_000, 50).await;
    let users = system.app.create_users(200).await;

    let line = [(product, 1)];
    let answers = join_all(users.iter().map(|&user| system.order(user, &line))).await;
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    }
    system.wait_until_settled().await;
    assert_eq!(
        system
            .scalar("SELECT count(*) FROM orders WHERE status = 'RESERVED'")
            .await,
        50
    );
    assert_eq!(
        system
            .scalar("SELECT count(*) FROM orders WHERE status = 'REJECTED'")
            .await,
        150
    );
    let rejected_other = system
        .scalar("SELECT count(*) FROM requests WHERE status = 'FAILED' AND error->>'code' <> 'ERR_ORDER_OUT_OF_STOCK'")
        .await;
    assert_eq!(rejected_other, 0);
    system.assert_stock_reconciles(product, 50).await;

    // Pay 20, cancel 10, let the other 20 expire.
    let reserved: Vec<(String, i64)> =
        sqlx::query_as("SELECT id::text, user_id FROM orders WHERE status = 'RESERVED' ORDER BY id")
            .fetch_all(&system.app.db)
            .await
            .unwrap();
    let mut payments = Vec::new();
    for (order, user) in &reserved[..20] {
        assert_eq!(system.app.charge(*user, 5_000).await.status, StatusCode::OK);
        let paid = system.pay(order, *user, None).await;
        assert_eq!(paid.status, StatusCode::ACCEPTED, "{paid:?}");
        payments.push(paid.body["requestId"].as_str().unwrap().to_owned());
    }
    for (order, user) in &reserved[20..30] {
        let cancelled = system
            .app
            .post(&format!("/orders/{order}/cancel"), json!({"userId": user}))
            .await;
        assert_eq!(cancelled.status, StatusCode::OK, "{cancelled:?}");
        assert_eq!(cancelled.body["status"], "CANCELLED");
    }
    for request in &payments {
        assert_eq!(system.outcome(request).await, "SUCCEEDED");
    }
    sqlx::query("UPDATE orders SET reserved_until = now() - interval '1 second' WHERE status = 'RESERVED'")
        .execute(&system.app.db)
        .await
        .unwrap();
    assert_eq!(
        shared::store::reservations::expire_overdue(&system.app.db)
            .await
            .unwrap(),
        20
    );

    let (stock, reserved_units, sold) = system.assert_stock_reconciles(product, 50).await;
    assert_eq!((stock, reserved_units, sold), (30, 0, 20));
    assert_eq!(
        system
            .scalar("SELECT count(*) FROM orders WHERE status = 'PAID'")
            .await,
        20
    );
    assert_eq!(
        system
            .scalar("SELECT count(*) FROM orders WHERE status = 'CANCELLED'")
            .await,
        10
    );
    assert_eq!(
        system
            .scalar("SELECT count(*) FROM orders WHERE status = 'EXPIRED'")
            .await,
        20
    );
    let listed = system.app.get(&format!("/products/{product}")).await;
    assert_eq!(listed.body["stock"], 30);
    system.assert_money_invariants().await;
}

/// A buyer's plan: the user, the lines `(product, quantity)`, the coupon to pay with.
type Plan = (i64, Vec<(i64, i64)>, Option<i64>);

/// What the test expects a coupon to take off an order, from the contract's rules.
fn expected_discount(kind: &str, value: i64, base: i64) -> i64 {
    match kind {
        "FIXED" => value.min(base),
        _ => base * value / 100,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_buyers_with_random_balances_and_coupons_and_the_money_adds_up() {
    let system = System::start(2).await;
    let mut rng = rand::rng();
    let mut products = Vec::new();
    for _ in 0..5 {
        products.push(system.product(rng.random_range(1_000..20_000), 10_000).await);
    }
    let expires = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let coupons = [
        system.app.create_coupon(json!({"name": "3000 off", "discountType": "FIXED", "discountValue": 3000, "totalQuantity": 60, "expiresAt": expires})).await,
        system.app.create_coupon(json!({"name": "15%", "discountType": "PERCENT", "discountValue": 15, "totalQuantity": 60, "expiresAt": expires})).await,
        system.app.create_coupon(json!({"name": "half on one", "discountType": "PERCENT", "discountValue": 50, "totalQuantity": 60, "expiresAt": expires, "applicableProductIds": [products[0]]})).await,
    ];
    let users = system.app.create_users(100).await;
    for (i, &user) in users.iter().enumerate() {
        // Every other user can afford any order (3 lines of 3 at most 20,000 each), so the
        // run always has payments that succeed; the others get a random balance.
        let amount: i64 = if i % 2 == 0 {
            200_000
        } else {
            rng.random_range(0..60_000)
        };
        if amount > 0 {
            assert_eq!(system.app.charge(user, amount).await.status, StatusCode::OK);
        }
        // Most users get a coupon; some ask for one and may be refused.
        let coupon = coupons[rng.random_range(0..coupons.len())];
        if rng.random_bool(0.8) {
            system.issue(coupon, user).await;
        }
    }
    system.wait_until_settled().await;

    // Each user orders 1 to 3 lines and pays at once, with a random coupon (held or not).
    let plans: Vec<Plan> = users
        .iter()
        .enumerate()
        .map(|(i, &user)| {
            let lines = rng.random_range(1..=3);
            let mut items: Vec<(i64, i64)> = Vec::new();
            while items.len() < lines {
                let product = products[rng.random_range(0..products.len())];
                if !items.iter().any(|(p, _)| *p == product) {
                    items.push((product, rng.random_range(1..=3)));
                }
            }
            // The well-off half pays without a coupon and must succeed.
            let coupon =
                (i % 2 == 1 && rng.random_bool(0.7)).then(|| coupons[rng.random_range(0..coupons.len())]);
            (user, items, coupon)
        })
        .collect();
    let runs = join_all(plans.iter().map(|(user, items, coupon)| async {
        let created = system.order(*user, items).await;
        assert_eq!(created.status, StatusCode::ACCEPTED, "{created:?}");
        let order = created.body["orderId"].as_str().unwrap().to_owned();
        let paid = system.pay(&order, *user, *coupon).await;
        assert_eq!(paid.status, StatusCode::ACCEPTED, "{paid:?}");
        (order, paid.body["requestId"].as_str().unwrap().to_owned())
    }))
    .await;
    system.wait_until_settled().await;

    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for (_, request) in &runs {
        *outcomes.entry(system.outcome(request).await).or_default() += 1;
    }
    for code in outcomes.keys() {
        assert!(
            [
                "SUCCEEDED",
                "ERR_PAYMENT_INSUFFICIENT_BALANCE",
                "ERR_PAYMENT_INVALID_COUPON"
            ]
            .contains(&code.as_str()),
            "unexpected outcome {code} in {outcomes:?}"
        );
    }
    assert!(
        outcomes.get("SUCCEEDED").copied().unwrap_or(0) >= users.len() / 2,
        "{outcomes:?}"
    );
    system.assert_money_invariants().await;

    // Every discount is the coupon's, computed on the lines it applies to.
    let paid: Vec<(String, i64, i64, Option<i64>)> = sqlx::query_as(
        "SELECT id::text, total_amount, discount_amount, coupon_id FROM orders WHERE status = 'PAID'",
    )
    .fetch_all(&system.app.db)
    .await
    .unwrap();
    for (order, total, discount, coupon) in paid {
        let expected = match coupon {
            None => 0,
            Some(coupon) => {
                let (kind, value, all): (String, i64, bool) = sqlx::query_as(
                    "SELECT discount_type, discount_value, all_products FROM coupons WHERE id = $1",
                )
                .bind(coupon)
                .fetch_one(&system.app.db)
                .await
                .unwrap();
                let base: i64 = if all {
                    total
                } else {
                    sqlx::query_scalar(
                        "SELECT COALESCE(sum(unit_price * quantity), 0)::bigint FROM order_items
                         WHERE order_id = $1::uuid AND product_id IN (SELECT product_id FROM coupon_products WHERE coupon_id = $2)",
                    )
                    .bind(&order)
                    .bind(coupon)
                    .fetch_one(&system.app.db)
                    .await
                    .unwrap()
                };
                expected_discount(&kind, value, base)
            }
        };
        assert_eq!(discount, expected, "order {order}");
    }
    // A payment refused for the balance left its order reserved, to be paid later.
    let refused_then_paid = system
        .scalar(
            "SELECT count(*) FROM requests r JOIN orders o ON o.id = (r.payload->>'orderId')::uuid
             WHERE r.kind = 'ORDER_PAY' AND r.error->>'code' = 'ERR_PAYMENT_INSUFFICIENT_BALANCE' AND o.status <> 'RESERVED'",
        )
        .await;
    assert_eq!(refused_then_paid, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_order_paid_twice_at_once_is_paid_once() {
    let system = System::start(2).await;
    let product = system.product(7_000, 10).await;
    let user = system.app.create_users(1).await[0];
    system.app.charge(user, 100_000).await;
    let order = system.reserved_order(user, &[(product, 2)]).await;

    let path = format!("/orders/{order}/payment");
    let (a, b) = tokio::join!(
        system.app.post_with_key(&path, json!({"userId": user}), "pay-a"),
        system.app.post_with_key(&path, json!({"userId": user}), "pay-b"),
    );
    let mut outcomes = Vec::new();
    for answer in [a, b] {
        if answer.status == StatusCode::ACCEPTED {
            outcomes.push(system.outcome(answer.body["requestId"].as_str().unwrap()).await);
        } else {
            // The first payment was already settled when the second arrived.
            outcomes.push(answer.code().to_owned());
        }
    }
    outcomes.sort();
    assert_eq!(outcomes, vec!["ERR_PAYMENT_INVALID_ORDER_STATUS", "SUCCEEDED"]);
    assert_eq!(system.scalar("SELECT count(*) FROM payments").await, 1);
    assert_eq!(system.app.balance(user).await, 100_000 - 14_000);
    system.assert_money_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_users_create_and_pay_sent_back_to_back_are_settled_in_that_order() {
    let system = System::start(2).await;
    let product = system.product(2_000, 1_000).await;
    let users = system.app.create_users(30).await;
    for &user in &users {
        system.app.charge(user, 10_000).await;
    }
    // Each pay is sent right after its create, before the order is reserved: it can only
    // succeed if the worker settles the create first.
    let system = &system;
    let runs = join_all(users.iter().map(|&user| async move {
        let created = system.order(user, &[(product, 1)]).await;
        let order = created.body["orderId"].as_str().unwrap().to_owned();
        let paid = system.pay(&order, user, None).await;
        assert_eq!(paid.status, StatusCode::ACCEPTED, "{paid:?}");
        (
            created.body["requestId"].as_str().unwrap().to_owned(),
            paid.body["requestId"].as_str().unwrap().to_owned(),
        )
    }))
    .await;
    for (create, pay) in &runs {
        assert_eq!(system.outcome(create).await, "SUCCEEDED");
        assert_eq!(system.outcome(pay).await, "SUCCEEDED");
        let order: (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
            "SELECT c.completed_at, p.completed_at FROM requests c, requests p WHERE c.id = $1::uuid AND p.id = $2::uuid",
        )
        .bind(create)
        .bind(pay)
        .fetch_one(&system.app.db)
        .await
        .unwrap();
        assert!(order.0 <= order.1, "the payment settled before its order");
    }
    assert_eq!(
        system
            .scalar("SELECT count(*) FROM orders WHERE status = 'PAID'")
            .await,
        30
    );
}

/// A creation whose message comes after its payment's (its publish was not confirmed and
/// the sweeper sends it late) is settled first, in the payment's transaction; its late
/// message then changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_whose_orders_creation_comes_later_settles_the_creation_first() {
    let system = System::start(0).await;
    let product = system.product(2_000, 5).await;
    let user = system.app.create_users(1).await[0];
    assert_eq!(system.app.charge(user, 10_000).await.status, StatusCode::OK);
    let created = system.order(user, &[(product, 2)]).await;
    assert_eq!(created.status, StatusCode::ACCEPTED, "{created:?}");
    let create = created.body["requestId"].as_str().unwrap().to_owned();
    let order = created.body["orderId"].as_str().unwrap().to_owned();

    // No worker yet: the creation's message is still in its partition queue. Take it out,
    // and leave its request as if its api had not published it yet (and the sweeper will
    // not send it).
    let partition = system
        .lose_publish(shared::domain::command::Family::Order, user, &create, false)
        .await;

    let paid = system.pay(&order, user, None).await;
    assert_eq!(paid.status, StatusCode::ACCEPTED, "{paid:?}");
    let pay = paid.body["requestId"].as_str().unwrap().to_owned();
    system.spawn_worker().await;
    assert_eq!(system.outcome(&pay).await, "SUCCEEDED");
    assert_eq!(system.outcome(&create).await, "SUCCEEDED");
    let creation_settled = system.completed_at(&create).await;
    assert!(creation_settled.is_some());

    // The creation's message arrives at last, then another order of the same user's: once
    // that one is settled, the partition has been through the late message.
    let late = serde_json::to_vec(&shared::domain::command::CommandMessage {
        request_id: create.parse().unwrap(),
        kind: shared::domain::command::RequestKind::OrderCreate,
    })
    .unwrap();
    system
        .send_raw(shared::domain::command::Family::Order, partition, &late)
        .await;
    let next = system.order(user, &[(product, 1)]).await;
    assert_eq!(
        system.outcome(next.body["requestId"].as_str().unwrap()).await,
        "SUCCEEDED"
    );

    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1::uuid")
        .bind(&order)
        .fetch_one(&system.app.db)
        .await
        .unwrap();
    assert_eq!(status, "PAID");
    let settled_again = system.completed_at(&create).await;
    assert_eq!(
        settled_again, creation_settled,
        "the late message settled the creation again"
    );
    // 3 on hand (1 of them reserved by the next order), 2 sold: nothing reserved twice.
    assert_eq!(system.assert_stock_reconciles(product, 5).await, (3, 1, 2));
    system.assert_money_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiry_racing_payment_lets_exactly_one_win_per_order() {
    let system = System::start(2).await;
    let system = &system;
    let product = system.product(1_000, 100).await;
    let users = system.app.create_users(40).await;
    let mut orders = Vec::new();
    for &user in &users {
        system.app.charge(user, 10_000).await;
        orders.push((system.reserved_order(user, &[(product, 2)]).await, user));
    }
    // Deadlines fall due one after another over 400 ms while payments arrive at random
    // moments in the same span and expiry runs every few milliseconds: some orders are paid
    // first, some expire first, and some are claimed by both at the same moment.
    sqlx::query(
        "UPDATE orders o SET reserved_until = now() + (r.n * interval '10 milliseconds')
         FROM (SELECT id, row_number() OVER (ORDER BY random()) AS n FROM orders) r WHERE r.id = o.id",
    )
    .execute(&system.app.db)
    .await
    .unwrap();
    let delays: Vec<u64> = orders.iter().map(|_| rand::rng().random_range(0..400)).collect();
    let paying = join_all(
        orders
            .iter()
            .zip(&delays)
            .map(|((order, user), delay)| async move {
                tokio::time::sleep(std::time::Duration::from_millis(*delay)).await;
                system.pay(order, *user, None).await
            }),
    );
    let expiring = async {
        for _ in 0..100 {
            shared::store::reservations::expire_overdue(&system.app.db)
                .await
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    let (answers, ()) = tokio::join!(paying, expiring);
    system.wait_until_settled().await;
    shared::store::reservations::expire_overdue(&system.app.db)
        .await
        .unwrap();

    for ((order, _), answer) in orders.iter().zip(&answers) {
        let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1::uuid")
            .bind(order)
            .fetch_one(&system.app.db)
            .await
            .unwrap();
        let payment = if answer.status == StatusCode::ACCEPTED {
            system.outcome(answer.body["requestId"].as_str().unwrap()).await
        } else {
            answer.code().to_owned()
        };
        match status.as_str() {
            "PAID" => assert_eq!(payment, "SUCCEEDED"),
            "EXPIRED" => assert_eq!(payment, "ERR_PAYMENT_INVALID_ORDER_STATUS"),
            other => panic!("order {order} ended {other}"),
        }
    }
    let paid = system
        .scalar("SELECT count(*) FROM orders WHERE status = 'PAID'")
        .await;
    let expired = system
        .scalar("SELECT count(*) FROM orders WHERE status = 'EXPIRED'")
        .await;
    assert_eq!(paid + expired, 40);
    eprintln!("{paid} paid, {expired} expired");
    let (stock, reserved, sold) = system.assert_stock_reconciles(product, 100).await;
    assert_eq!((reserved, sold, stock), (0, 2 * paid, 100 - 2 * paid));
    system.assert_money_invariants().await;
}

/// Prices are taken at reservation: a product repriced between the api's quote and the
/// reservation is written to the order's line at its new price, and a line whose quote still
/// holds is not written again (a row update less per line, for nearly every order).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_line_is_written_again_at_reservation_only_when_its_product_was_repriced() {
    let system = System::start(0).await;
    let kept = system.product(1_000, 5).await;
    let repriced = system.product(2_000, 5).await;
    let user = system.app.create_users(1).await[0];
    let placed = system.order(user, &[(kept, 1), (repriced, 1)]).await;
    assert_eq!(placed.status, StatusCode::ACCEPTED, "{placed:?}");
    let order: uuid::Uuid = placed.body["orderId"].as_str().unwrap().parse().unwrap();
    let lines = || async {
        sqlx::query_as::<_, (i64, String, i64)>(
            "SELECT product_id, xmin::text, unit_price FROM order_items
             WHERE order_id = $1 ORDER BY product_id",
        )
        .bind(order)
        .fetch_all(&system.app.db)
        .await
        .unwrap()
    };
    let quoted = lines().await;
    let patched = system
        .app
        .admin(
            reqwest::Method::PATCH,
            &format!("/admin/products/{repriced}"),
            serde_json::json!({ "price": 2_500 }),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{patched:?}");

    system.spawn_worker().await;
    assert_eq!(
        system.outcome(placed.body["requestId"].as_str().unwrap()).await,
        "SUCCEEDED"
    );
    let reserved = lines().await;
    assert_eq!(
        reserved[0], quoted[0],
        "the kept line is the api's row, untouched"
    );
    assert_eq!(reserved[1].0, repriced);
    assert_ne!(reserved[1].1, quoted[1].1, "the repriced line was written again");
    assert_eq!(reserved[1].2, 2_500);
    let total: i64 = system
        .scalar(&format!("SELECT total_amount FROM orders WHERE id = '{order}'"))
        .await;
    assert_eq!(total, 3_500);
}
