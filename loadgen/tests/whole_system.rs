//! The fault suite's whole-system checks can fail: over a small world settled by the real
//! api and a real worker they all pass, and each kind of damage the suite is there to catch,
//! written into the database by hand, makes the check named for it fail.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::Duration;

use loadgen::checks;
use loadgen::client::Api;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const ADMIN_TOKEN: &str = "checks-test-token";
const PATIENCE: Duration = Duration::from_secs(60);

/// The api and one worker over a fresh database and a topology of their own.
struct World {
    api: Api,
    db: PgPool,
    stop: CancellationToken,
    topology: shared::topology::Topology,
    amqp_url: String,
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.cancel();
        shared::testing::delete_topology_blocking(&self.topology, &self.amqp_url);
    }
}

async fn start() -> World {
    shared::testing::capture_logs();
    let database_url = shared::testing::fresh_database_url().await.unwrap();
    let topology = shared::testing::isolated_topology();
    let stop = CancellationToken::new();

    let mut config = api::ApiConfig::from_env().unwrap();
    config.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.database.url = database_url.clone();
    config.database.max_connections = 5;
    config.admin_token = ADMIN_TOKEN.to_owned();
    config.topology = topology.clone();
    let amqp_url = config.broker.url.clone();
    let app = api::Application::build(config).await.unwrap();
    let addr = app.local_addr().unwrap();
    let db = app.state().db.clone();
    tokio::spawn(app.run(stop.clone()));

    let mut worker = worker::WorkerConfig::from_env().unwrap();
    worker.name = format!("{}checks", topology.prefix);
    worker.metrics_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    worker.database.url = database_url;
    worker.database.max_connections = 5;
    worker.topology = topology.clone();
    tokio::spawn(worker::run(worker, stop.clone()));

    let api = Api::new(&format!("http://{addr}"), ADMIN_TOKEN, 4, Duration::from_secs(10)).unwrap();
    api.wait_until_ready(PATIENCE).await.unwrap();
    World {
        api,
        db,
        stop,
        topology,
        amqp_url,
    }
}

impl World {
    /// Runs one or more statements (no parameters).
    async fn execute(&self, sql: &str) {
        sqlx::raw_sql(sql).execute(&self.db).await.unwrap();
    }

    /// Waits until `request` is terminal through the API; its status.
    async fn settled(&self, request: &str) -> String {
        let id = Uuid::parse_str(request).unwrap();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let answer = self.api.request_status(id).await.unwrap();
            match answer.str_field("status") {
                Some(status @ ("SUCCEEDED" | "FAILED")) => return status.to_owned(),
                _ if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => panic!("request {request} is still {other:?}"),
            }
        }
    }

    /// The names of the whole-system checks that fail now.
    async fn violated(&self) -> Vec<String> {
        checks::whole_system(&self.db, &self.api)
            .await
            .unwrap()
            .into_vec()
            .into_iter()
            .filter(|c| !c.passed)
            .map(|c| c.name)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_whole_system_check_passes_on_a_sound_world_and_fails_on_its_damage() {
    let world = start().await;
    let api = &world.api;

    // Three users with money and a product; Ann pays her order with a coupon of 5,000, Bob
    // pays his entirely with a coupon of its whole price (so his payment debits nothing and
    // has no ledger entry), and Cat's order stays reserved.
    let mut users = Vec::new();
    for name in ["Ann", "Bob", "Cat"] {
        let user = api.create_user(name).await.unwrap();
        let charged = api.charge(user, 100_000).await.unwrap();
        assert_eq!(charged.status, 200, "{charged:?}");
        users.push(user);
    }
    let product = api.create_product("Lamp", 30_000, 10).await.unwrap();
    let some_off = api.create_coupon("Spring", 5_000, 10).await.unwrap();
    let all_off = api.create_coupon("Gift", 60_000, 10).await.unwrap();
    let mut orders = Vec::new();
    for (user, coupon) in [
        (users[0], Some(some_off)),
        (users[1], Some(all_off)),
        (users[2], None),
    ] {
        if let Some(coupon) = coupon {
            let issued = api
                .issue_coupon(coupon, user, &format!("issue-{user}"))
                .await
                .unwrap();
            assert_eq!(issued.status, 202, "{issued:?}");
            assert_eq!(
                world.settled(issued.str_field("requestId").unwrap()).await,
                "SUCCEEDED"
            );
        }
        let ordered = api
            .create_order(user, product, 2, &format!("order-{user}"))
            .await
            .unwrap();
        assert_eq!(ordered.status, 202, "{ordered:?}");
        assert_eq!(
            world.settled(ordered.str_field("requestId").unwrap()).await,
            "SUCCEEDED"
        );
        let order = Uuid::parse_str(ordered.str_field("orderId").unwrap()).unwrap();
        if coupon.is_some() {
            let paid = api
                .pay_order(order, user, coupon, &format!("pay-{user}"))
                .await
                .unwrap();
            assert_eq!(paid.status, 202, "{paid:?}");
            assert_eq!(
                world.settled(paid.str_field("requestId").unwrap()).await,
                "SUCCEEDED"
            );
        }
        orders.push(order);
    }
    let free: i64 = sqlx::query_scalar("SELECT paid_amount FROM orders WHERE id = $1")
        .bind(orders[1])
        .fetch_one(&world.db)
        .await
        .unwrap();
    assert_eq!(free, 0, "Bob's coupon paid it all");

    // The data platform's receiving end is a stand-in here: what the relay published is
    // what it received.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(&world.db)
        .await
        .unwrap()
        > 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox was never relayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    world
        .execute(
            "INSERT INTO received_events (event_id, routing_key, payload)
             SELECT (payload->>'eventId')::uuid, routing_key, payload FROM outbox",
        )
        .await;

    assert_eq!(world.violated().await, Vec::<String>::new(), "a sound world");

    // Each damage, the checks it must trip, and its repair. A request's status is changed
    // with what the schema asks of it (an error when FAILED, no completion when PENDING),
    // and put back from a copy.
    let set_status = |kind: &str, status: &str| {
        format!(
            "CREATE TABLE saved AS SELECT id, status, result, error, completed_at FROM requests WHERE kind = '{kind}';
             UPDATE requests SET status = '{status}', result = NULL,
               error = CASE WHEN '{status}' = 'FAILED' THEN '{{\"code\": \"ERR_DAMAGE\"}}'::jsonb END,
               completed_at = CASE WHEN '{status}' = 'PENDING' THEN NULL ELSE completed_at END
             WHERE kind = '{kind}';"
        )
    };
    let restore = "UPDATE requests r SET status = s.status, result = s.result, error = s.error,
                     completed_at = s.completed_at
                   FROM saved s WHERE r.id = s.id;
                   DROP TABLE saved;";
    let damages: Vec<(String, &[&str], String)> = vec![
        (
            "UPDATE balances SET amount = amount + 1 WHERE user_id = (SELECT min(user_id) FROM balances)".into(),
            &["balance = CHARGE + REFUND - PAYMENT of its ledger, every user"],
            "UPDATE balances SET amount = amount - 1 WHERE user_id = (SELECT min(user_id) FROM balances)".into(),
        ),
        (
            "UPDATE products SET stock = stock - 1, sold = sold + 1".into(),
            &["sold = units of PAID orders, every product"],
            "UPDATE products SET stock = stock + 1, sold = sold - 1".into(),
        ),
        (
            "UPDATE products SET reserved = reserved + 1".into(),
            &["reserved = units of RESERVED orders, every product"],
            "UPDATE products SET reserved = reserved - 1".into(),
        ),
        (
            set_status("COUPON_ISSUE", "FAILED"),
            &["a coupon is held if and only if a COUPON_ISSUE request SUCCEEDED in issuing it"],
            restore.into(),
        ),
        (
            "UPDATE coupons SET issued_quantity = issued_quantity + 1".into(),
            &["every coupon's issued count = the coupons held"],
            "UPDATE coupons SET issued_quantity = issued_quantity - 1".into(),
        ),
        (
            set_status("ORDER_PAY", "FAILED"),
            &["a payment exists if and only if an ORDER_PAY request SUCCEEDED in making it"],
            restore.into(),
        ),
        (
            "UPDATE balance_transactions SET amount = amount + 1 WHERE kind = 'PAYMENT'".into(),
            &[
                "balance = CHARGE + REFUND - PAYMENT of its ledger, every user",
                "a payment for every PAID order and no other; a ledger PAYMENT entry for every one that cost something",
            ],
            "UPDATE balance_transactions SET amount = amount - 1 WHERE kind = 'PAYMENT'".into(),
        ),
        (
            set_status("ORDER_CREATE", "PENDING"),
            &["every request terminal", "every order settled as its create request says"],
            restore.into(),
        ),
        (
            "DELETE FROM received_events".into(),
            &["the data platform received one order.paid per PAID order, none for others"],
            "INSERT INTO received_events (event_id, routing_key, payload)
             SELECT (payload->>'eventId')::uuid, routing_key, payload FROM outbox"
                .into(),
        ),
        (
            "UPDATE outbox SET published_at = NULL".into(),
            &["every event published"],
            "UPDATE outbox SET published_at = now()".into(),
        ),
    ];
    for (damage, tripped, repair) in &damages {
        world.execute(damage).await;
        let violated = world.violated().await;
        for check in tripped.iter() {
            assert!(
                violated.iter().any(|v| v == check),
                "after {damage:?}, {check:?} passed; violated: {violated:?}"
            );
        }
        world.execute(repair).await;
        assert_eq!(
            world.violated().await,
            Vec::<String>::new(),
            "after repairing {damage:?}"
        );
    }
}
