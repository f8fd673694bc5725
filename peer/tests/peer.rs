//! The synchronous peer under real concurrency, on a fresh database migrated with the
//! project's migrations: a coupon is never issued beyond its quantity nor twice to a user,
//! stock is never oversold, an order paid twice at once is charged once, and bad input is
//! answered with the contract's 4xx, never a 5xx.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::Duration;

use futures::future::join_all;
use loadgen::client::{Answer, Api};
use peer::PeerServer;
use serde_json::{json, Value};
use shared::config::DatabaseSettings;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A peer serving a database of its own, stopped when dropped.
struct TestPeer {
    api: Api,
    http: reqwest::Client,
    base: String,
    db: PgPool,
    stop: CancellationToken,
    /// Dropped with the peer, so the database goes when the test ends.
    _database: testkit::database::TestDatabase,
}

impl Drop for TestPeer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TestPeer {
    async fn start() -> Self {
        testkit::isolation::capture_logs();
        let database = testkit::database::TestDatabase::create().await;
        // Enough connections that concurrent requests really meet in PostgreSQL.
        let settings = DatabaseSettings::new(database.url(), 16);
        let server = PeerServer::build(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &settings,
            Duration::from_secs(600),
        )
        .await
        .unwrap();
        let base = format!("http://{}", server.local_addr().unwrap());
        let db = server.db().clone();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(server.run(async move { stopped.cancelled().await }));
        let api = Api::new(&base, "unused", 64, Duration::from_secs(30)).unwrap();
        api.wait_until_ready(Duration::from_secs(30)).await.unwrap();
        TestPeer {
            api,
            http: reqwest::Client::new(),
            base,
            db,
            stop,
            _database: database,
        }
    }

    /// `count` users with `balance` won each (and the ledger entry that explains it).
    async fn users(&self, count: usize, balance: i64) -> Vec<i64> {
        loadgen::setup::create_users(&self.db, &self.api, "peer-test-", count, balance)
            .await
            .unwrap()
    }

    async fn product(&self, price: i64, stock: i64) -> i64 {
        sqlx::query_scalar("INSERT INTO products (name, price, stock) VALUES ('p', $1, $2) RETURNING id")
            .bind(price)
            .bind(stock)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// A `FIXED` coupon for every product, expiring in a day.
    async fn coupon(&self, discount: i64, quantity: i64) -> i64 {
        sqlx::query_scalar(
            "INSERT INTO coupons (name, discount_type, discount_value, total_quantity, expires_at, all_products)
             VALUES ('c', 'FIXED', $1, $2, now() + interval '1 day', true) RETURNING id",
        )
        .bind(discount)
        .bind(quantity)
        .fetch_one(&self.db)
        .await
        .unwrap()
    }

    async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.db).await.unwrap()
    }

    /// `method path` with a raw body, as a hostile client sends it.
    async fn raw(&self, method: reqwest::Method, path: &str, body: &str) -> (u16, Value) {
        let response = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    async fn order(&self, user: i64, product: i64, quantity: i64) -> Answer {
        self.api
            .create_order(user, product, quantity, "unused")
            .await
            .unwrap()
    }
}

fn order_id(answer: &Answer) -> Uuid {
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.uuid_field("orderId").unwrap()
}

#[tokio::test]
async fn many_concurrent_issues_of_a_small_coupon_issue_exactly_its_quantity_once_per_user() {
    let peer = TestPeer::start().await;
    let users = peer.users(60, 0).await;
    let coupon = peer.coupon(1_000, 7).await;

    // Every user asks twice at once: a user's second request races their first.
    let answers = join_all(
        users
            .iter()
            .chain(users.iter())
            .map(|user| peer.api.issue_coupon(coupon, *user, "unused")),
    )
    .await;

    let mut issued = Vec::new();
    for answer in answers {
        let answer = answer.unwrap();
        match (answer.status, answer.code.as_deref()) {
            (200, None) => {
                assert_eq!(answer.str_field("status"), Some("SUCCEEDED"), "{}", answer.body);
                assert_eq!(answer.body["result"]["couponId"], json!(coupon));
                issued.push(answer.body["result"]["userCouponId"].as_str().unwrap().to_owned());
            }
            (410, Some("ERR_COUPON_OUT_OF_STOCK")) | (409, Some("ERR_COUPON_ALREADY_ACQUIRED")) => {}
            other => panic!("not an answer the contract allows: {other:?} {}", answer.body),
        }
    }
    assert_eq!(issued.len(), 7, "exactly the quantity answered issued");
    let (issued_quantity, rows, holders): (i64, i64, i64) = sqlx::query_as(
        "SELECT c.issued_quantity, count(uc.id), count(DISTINCT uc.user_id)
         FROM coupons c LEFT JOIN user_coupons uc ON uc.coupon_id = c.id WHERE c.id = $1
         GROUP BY c.issued_quantity",
    )
    .bind(coupon)
    .fetch_one(&peer.db)
    .await
    .unwrap();
    assert_eq!(
        (issued_quantity, rows, holders),
        (7, 7, 7),
        "issued once each, never beyond"
    );
    let named: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_coupons WHERE coupon_id = $1 AND id::text = ANY($2)")
            .bind(coupon)
            .bind(&issued)
            .fetch_one(&peer.db)
            .await
            .unwrap();
    assert_eq!(named, 7, "every 200 names a coupon that was issued");

    // Sold out now, also for whoever asks later.
    let late = peer.api.issue_coupon(coupon, users[0], "unused").await.unwrap();
    assert_eq!(late.outcome(), "410 ERR_COUPON_OUT_OF_STOCK");
}

#[tokio::test]
async fn concurrent_orders_on_a_product_with_little_stock_never_oversell() {
    let peer = TestPeer::start().await;
    let users = peer.users(30, 100_000).await;
    let scarce = peer.product(10_000, 4).await;
    let plenty = peer.product(12_000, 1_000).await;

    // Two lines each, named in opposite orders by alternate users: locks taken in id order
    // never deadlock, and an order short on one line reserves neither.
    let peer = &peer;
    let answers = join_all(users.iter().enumerate().map(|(i, user)| {
        let items = if i % 2 == 0 {
            json!([{ "productId": scarce, "quantity": 1 }, { "productId": plenty, "quantity": 2 }])
        } else {
            json!([{ "productId": plenty, "quantity": 2 }, { "productId": scarce, "quantity": 1 }])
        };
        let body = json!({ "userId": user, "items": items }).to_string();
        async move { peer.raw(reqwest::Method::POST, "/orders", &body).await }
    }))
    .await;

    let mut reserved = 0;
    for (status, body) in &answers {
        match (*status, body["code"].as_str()) {
            (200, None) => {
                assert_eq!(body["result"]["status"], "RESERVED", "{body}");
                assert_eq!(body["result"]["totalAmount"], 34_000, "{body}");
                reserved += 1;
            }
            (409, Some("ERR_ORDER_OUT_OF_STOCK")) => {}
            other => panic!("not an answer the contract allows: {other:?} {body}"),
        }
    }
    assert_eq!(reserved, 4, "every unit reserved, none twice");
    let (stock, held) = (
        peer.scalar(&format!("SELECT reserved FROM products WHERE id = {scarce}"))
            .await,
        peer.scalar(&format!("SELECT reserved FROM products WHERE id = {plenty}"))
            .await,
    );
    assert_eq!(
        (stock, held),
        (4, 8),
        "reserved = the lines of the reserved orders"
    );
    assert_eq!(
        peer.scalar("SELECT count(*) FROM orders WHERE status = 'RESERVED' AND reserved_until > now()")
            .await,
        4
    );
    assert_eq!(
        peer.scalar("SELECT count(*) FROM orders").await,
        4,
        "a refusal writes nothing"
    );
    assert_eq!(peer.scalar("SELECT count(*) FROM order_items").await, 8);
}

#[tokio::test]
async fn an_order_paid_twice_at_once_is_charged_once_and_writes_what_a_worker_writes() {
    let peer = TestPeer::start().await;
    let users = peer.users(1, 40_000).await;
    let user = users[0];
    let product = peer.product(10_000, 5).await;
    let coupon = peer.coupon(1_500, 10).await;
    loadgen::setup::hand_out_coupon(&peer.db, coupon, &[user])
        .await
        .unwrap();
    let order = order_id(&peer.order(user, product, 2).await);

    let (first, second) = tokio::join!(
        peer.api.pay_order(order, user, Some(coupon), "unused"),
        peer.api.pay_order(order, user, Some(coupon), "unused"),
    );
    let mut outcomes = [first.unwrap(), second.unwrap()];
    outcomes.sort_by_key(|a| a.status);
    let [paid, refused] = &outcomes;
    assert_eq!(paid.status, 200, "{}", paid.body);
    assert_eq!(paid.body["result"]["paidAmount"], 18_500);
    assert_eq!(paid.body["result"]["discountAmount"], 1_500);
    assert_eq!(
        refused.outcome(),
        "400 ERR_PAYMENT_INVALID_ORDER_STATUS",
        "{}",
        refused.body
    );

    assert_eq!(
        peer.scalar(&format!("SELECT amount FROM balances WHERE user_id = {user}"))
            .await,
        21_500,
        "debited once"
    );
    let checks = [
        ("SELECT count(*) FROM payments", 1),
        ("SELECT count(*) FROM balance_transactions WHERE kind = 'PAYMENT' AND amount = 18500", 1),
        ("SELECT count(*) FROM orders WHERE status = 'PAID' AND paid_amount = 18500 AND discount_amount = 1500", 1),
        ("SELECT count(*) FROM user_coupons WHERE used_at IS NOT NULL AND order_id IS NOT NULL", 1),
        ("SELECT count(*) FROM outbox WHERE routing_key = 'order.paid' AND (payload->>'paidAmount')::bigint = 18500", 1),
        ("SELECT stock * 100 + reserved * 10 + sold FROM products", 302),
    ];
    for (sql, expected) in checks {
        assert_eq!(peer.scalar(sql).await, expected, "{sql}");
    }

    // The coupon is spent, and a balance that does not cover an order pays nothing.
    let other = order_id(&peer.order(user, product, 3).await);
    let again = peer
        .api
        .pay_order(other, user, Some(coupon), "unused")
        .await
        .unwrap();
    assert_eq!(again.outcome(), "400 ERR_PAYMENT_INVALID_COUPON");
    let poor = peer.api.pay_order(other, user, None, "unused").await.unwrap();
    assert_eq!(poor.outcome(), "402 ERR_PAYMENT_INSUFFICIENT_BALANCE");
    assert_eq!(peer.scalar("SELECT count(*) FROM payments").await, 1);
    assert_eq!(
        peer.scalar(&format!(
            "SELECT count(*) FROM orders WHERE id = '{other}' AND status = 'RESERVED'"
        ))
        .await,
        1,
        "a failed payment leaves the order RESERVED"
    );
}

#[tokio::test]
async fn bad_input_is_answered_with_the_contract_s_4xx_never_a_5xx() {
    let peer = TestPeer::start().await;
    let users = peer.users(2, 10_000).await;
    let product = peer.product(10_000, 5).await;
    let coupon = peer.coupon(1_000, 5).await;
    let order = order_id(&peer.order(users[0], product, 1).await);
    let unknown_order = Uuid::now_v7();
    use reqwest::Method;
    let cases: [(Method, String, String, u16, &str); 22] = [
        (
            Method::POST,
            format!("/coupons/{coupon}/issue"),
            "not json".into(),
            400,
            "ERR_INVALID_REQUEST",
        ),
        (
            Method::POST,
            format!("/coupons/{coupon}/issue"),
            "[1]".into(),
            400,
            "ERR_INVALID_REQUEST",
        ),
        (
            Method::POST,
            format!("/coupons/{coupon}/issue"),
            "{}".into(),
            400,
            "ERR_INVALID_REQUEST",
        ),
        (
            Method::POST,
            format!("/coupons/{coupon}/issue"),
            r#"{"userId":"1"}"#.into(),
            400,
            "ERR_INVALID_REQUEST",
        ),
        (
            Method::POST,
            format!("/coupons/{coupon}/issue"),
            r#"{"userId":-3}"#.into(),
            400,
            "ERR_BALANCE_INVALID_USER",
        ),
        (
            Method::POST,
            format!("/coupons/{coupon}/issue"),
            r#"{"userId":999999}"#.into(),
            400,
            "ERR_BALANCE_INVALID_USER",
        ),
        (
            Method::POST,
            "/coupons/abc/issue".into(),
            r#"{"userId":1}"#.into(),
            400,
            "ERR_INVALID_REQUEST",
        ),
        (
            Method::POST,
            "/coupons/999999/issue".into(),
            format!(r#"{{"userId":{}}}"#, users[0]),
            404,
            "ERR_COUPON_NOT_FOUND",
        ),
        (
            Method::GET,
            format!("/coupons/{coupon}/issue"),
            String::new(),
            405,
            "ERR_METHOD_NOT_ALLOWED",
        ),
        (Method::POST, "/nowhere".into(), "{}".into(), 404, "ERR_NOT_FOUND"),
        (
            Method::POST,
            "/orders".into(),
            format!(r#"{{"userId":{},"items":[]}}"#, users[0]),
            400,
            "ERR_ORDER_INVALID_ITEMS",
        ),
        (
            Method::POST,
            "/orders".into(),
            format!(
                r#"{{"userId":{},"items":[{{"productId":{product},"quantity":0}}]}}"#,
                users[0]
            ),
            400,
            "ERR_ORDER_INVALID_ITEMS",
        ),
        (
            Method::POST,
            "/orders".into(),
            format!(
                r#"{{"userId":{},"items":[{{"productId":{product},"quantity":1}},{{"productId":{product},"quantity":1}}]}}"#,
                users[0]
            ),
            400,
            "ERR_ORDER_INVALID_ITEMS",
        ),
        (
            Method::POST,
            "/orders".into(),
            format!(r#"{{"userId":999999,"items":[{{"productId":{product},"quantity":1}}]}}"#),
            400,
            "ERR_ORDER_INVALID_USER",
        ),
        (
            Method::POST,
            "/orders".into(),
            format!(
                r#"{{"userId":{},"items":[{{"productId":999999,"quantity":1}}]}}"#,
                users[0]
            ),
            404,
            "ERR_PRODUCT_NOT_FOUND",
        ),
        (
            Method::POST,
            "/orders".into(),
            format!(
                r#"{{"userId":{},"items":[{{"productId":{product},"quantity":9}}]}}"#,
                users[0]
            ),
            409,
            "ERR_ORDER_OUT_OF_STOCK",
        ),
        (
            Method::POST,
            "/orders".into(),
            r#"{"userId":1,"items":"many"}"#.into(),
            400,
            "ERR_INVALID_REQUEST",
        ),
        (
            Method::POST,
            "/orders/not-a-uuid/payment".into(),
            format!(r#"{{"userId":{}}}"#, users[0]),
            400,
            "ERR_INVALID_REQUEST",
        ),
        (
            Method::POST,
            format!("/orders/{unknown_order}/payment"),
            format!(r#"{{"userId":{}}}"#, users[0]),
            404,
            "ERR_PAYMENT_ORDER_NOT_FOUND",
        ),
        (
            Method::POST,
            format!("/orders/{order}/payment"),
            format!(r#"{{"userId":{}}}"#, users[1]),
            403,
            "ERR_ORDER_UNAUTHORIZED",
        ),
        (
            Method::POST,
            format!("/orders/{order}/payment"),
            format!(r#"{{"userId":{},"couponId":0}}"#, users[0]),
            400,
            "ERR_PAYMENT_INVALID_COUPON",
        ),
        (
            Method::POST,
            format!("/orders/{order}/payment"),
            format!(r#"{{"userId":{},"couponId":{coupon}}}"#, users[0]),
            400,
            "ERR_PAYMENT_INVALID_COUPON",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let (got, answer) = peer.raw(method.clone(), &path, &body).await;
        assert_eq!(
            (got, answer["code"].as_str()),
            (status, Some(code)),
            "{method} {path} {body}: {answer}"
        );
    }
    // Nothing of the above wrote anything.
    assert_eq!(peer.scalar("SELECT count(*) FROM payments").await, 0);
    assert_eq!(peer.scalar("SELECT count(*) FROM user_coupons").await, 0);
}
