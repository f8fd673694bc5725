//! The fault suite's whole-system checks can fail: over a small world settled by the real
//! api and a real worker they all pass (a world with an order paid entirely by a coupon,
//! one rejected for want of stock and one cancelled before it was settled, each of which an
//! over-strict check would flag), and each kind of damage the suite is there to catch,
//! written into the database by hand, makes the check named for it fail.

use std::net::SocketAddr;
use std::time::Duration;

use loadgen::checks::{self, CheckId, PublishedEvents};
use loadgen::client::{Answer, Api};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const ADMIN_TOKEN: &str = "checks-test-admin-token-of-32-characters-or-more";
const PATIENCE: Duration = Duration::from_secs(60);

/// The api over a fresh database and a topology of its own, and a worker the test starts
/// and stops.
struct World {
    api: Api,
    db: PgPool,
    database_url: String,
    stop: CancellationToken,
    worker: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    /// The data-platform stand-in: the relay deletes what it published, and the checks
    /// count what the stand-in received.
    data_platform: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    topology: shared::messaging::topology::Topology,
    amqp_url: String,
    /// Dropped with the world, so the database goes when the test ends.
    _database: testkit::database::TestDatabase,
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.cancel();
        for (stop, _) in self.worker.iter().chain(self.data_platform.iter()) {
            stop.cancel();
        }
        testkit::isolation::delete_topology_blocking(&self.topology, &self.amqp_url);
    }
}

impl World {
    async fn start() -> Self {
        testkit::isolation::capture_logs();
        let database = testkit::database::TestDatabase::create().await;
        let database_url = database.url().to_owned();
        let topology = testkit::isolation::isolated_topology();
        let stop = CancellationToken::new();
        let mut config = api::ApiConfig::from_env().unwrap();
        config.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.database.url = database_url.clone();
        config.database.max_connections = 5;
        config.admin_token = ADMIN_TOKEN.to_owned().into();
        config.metrics_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.topology = topology.clone();
        let amqp_url = config.broker.url.clone();
        let app = api::Application::build(config).await.unwrap();
        let addr = app.local_addr().unwrap();
        let db = app.state().db.clone();
        tokio::spawn(app.run(stop.clone()));
        let api = Api::new(&format!("http://{addr}"), ADMIN_TOKEN, 4, Duration::from_secs(10)).unwrap();
        api.wait_until_ready(PATIENCE).await.unwrap();
        World {
            api,
            db,
            database_url,
            stop,
            worker: None,
            data_platform: None,
            topology,
            amqp_url,
            _database: database,
        }
    }

    fn worker_config(&self) -> worker::WorkerConfig {
        let mut config = worker::WorkerConfig::from_env().unwrap();
        config.name = format!("{}checks", self.topology.prefix);
        config.metrics_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.database.url = self.database_url.clone();
        config.database.max_connections = 5;
        config.topology = self.topology.clone();
        config
    }

    fn start_worker(&mut self) {
        let stop = CancellationToken::new();
        let running = tokio::spawn(worker::run(self.worker_config(), stop.clone()));
        self.worker = Some((stop, running));
    }

    /// Starts the data-platform stand-in and waits until its queue is declared, so that
    /// nothing published afterwards passes it by.
    async fn start_data_platform(&mut self) {
        let config = self.worker_config();
        let queue = worker::dataplatform::queue_name(&config);
        let stop = CancellationToken::new();
        let running = tokio::spawn(worker::dataplatform::run(config, stop.clone()));
        self.data_platform = Some((stop, running));
        let connection = lapin::Connection::connect(&self.amqp_url, Default::default())
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            // A passive declare of a missing queue closes its channel: a new one each time.
            let channel = connection.create_channel().await.unwrap();
            if shared::messaging::broker::queue_depth(&channel, &queue)
                .await
                .is_ok()
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stand-in never declared its queue"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = connection.close(200, "done".into()).await;
    }

    /// Stops the stand-in and waits until it has.
    async fn stop_data_platform(&mut self) {
        let (stop, running) = self.data_platform.take().expect("a running stand-in");
        stop.cancel();
        running.await.unwrap().unwrap();
    }

    /// Stops the worker and waits until it has: nothing settles or relays after this.
    async fn stop_worker(&mut self) {
        let (stop, running) = self.worker.take().expect("a running worker");
        stop.cancel();
        running.await.unwrap().unwrap();
    }

    /// Runs one or more statements (no parameters).
    async fn execute(&self, sql: &str) {
        sqlx::raw_sql(sql).execute(&self.db).await.unwrap();
    }

    async fn accepted(&self, answer: anyhow::Result<Answer>) -> String {
        let answer = answer.unwrap();
        assert_eq!(answer.status, 202, "{answer:?}");
        answer.str_field("requestId").unwrap().to_owned()
    }

    /// Waits until `request` is terminal through the API; `SUCCEEDED` or its error code.
    async fn outcome(&self, request: &str) -> String {
        let id = Uuid::parse_str(request).unwrap();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let answer = self.api.request_status(id).await.unwrap();
            match answer.str_field("status") {
                Some("SUCCEEDED") => return "SUCCEEDED".to_owned(),
                Some("FAILED") => return answer.body["error"]["code"].as_str().unwrap().to_owned(),
                _ if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => panic!("request {request} is still {other:?}"),
            }
        }
    }

    async fn order_status(&self, order: Uuid) -> String {
        sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
            .bind(order)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// The whole-system checks that fail now.
    async fn violated(&self) -> Vec<CheckId> {
        checks::whole_system(&self.db, &self.api)
            .await
            .unwrap()
            .into_vec()
            .into_iter()
            .filter(|c| !c.passed)
            .map(|c| c.id)
            .collect()
    }
}

fn order_id(answer: &anyhow::Result<Answer>) -> Uuid {
    let answer = answer.as_ref().unwrap();
    Uuid::parse_str(answer.str_field("orderId").unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_whole_system_checks_pass_on_a_sound_world_and_each_fails_on_its_damage() {
    let mut world = World::start().await;
    let api = world.api.clone();

    let mut users = Vec::new();
    for name in ["Ann", "Bob", "Cat", "Dan", "Eve", "Fay"] {
        let user = api.create_user(name).await.unwrap();
        let charged = api.charge(user, 100_000, None).await.unwrap();
        assert_eq!(charged.status, 200, "{charged:?}");
        users.push(user);
    }
    let [ann, bob, cat, dan, eve, fay] = users[..] else {
        unreachable!()
    };
    let lamp = api.create_product("Lamp", 30_000, 10).await.unwrap();
    let last = api.create_product("Last one", 10_000, 1).await.unwrap();
    let some_off = api.create_coupon("Spring", 5_000, 10).await.unwrap();
    let all_off = api.create_coupon("Gift", 60_000, 10).await.unwrap();

    // Before any worker runs: Dan and Eve both get the last unit accepted, so one of them
    // is rejected when they settle; Fay cancels her order while it is still PENDING.
    let dan_order = api.create_order(dan, last, 1, "order-dan").await;
    let eve_order = api.create_order(eve, last, 1, "order-eve").await;
    let fay_order = api.create_order(fay, lamp, 1, "order-fay").await;
    let (dan_order_id, eve_order_id, fay_order_id) =
        (order_id(&dan_order), order_id(&eve_order), order_id(&fay_order));
    let dan_create = world.accepted(dan_order).await;
    let eve_create = world.accepted(eve_order).await;
    let fay_create = world.accepted(fay_order).await;
    let cancelled = api.cancel_order(fay_order_id, fay).await.unwrap();
    assert_eq!(cancelled.status, 200, "{cancelled:?}");
    world.start_data_platform().await;
    world.start_worker();
    // Dan and Eve are in partitions of their own, so either may settle first.
    let mut last_unit = vec![
        (
            world.outcome(&dan_create).await,
            world.order_status(dan_order_id).await,
        ),
        (
            world.outcome(&eve_create).await,
            world.order_status(eve_order_id).await,
        ),
    ];
    last_unit.sort();
    assert_eq!(
        last_unit,
        [
            ("ERR_ORDER_OUT_OF_STOCK".to_owned(), "REJECTED".to_owned()),
            ("SUCCEEDED".to_owned(), "RESERVED".to_owned())
        ]
    );
    assert_eq!(world.outcome(&fay_create).await, "ERR_ORDER_CONCURRENCY_CONFLICT");
    assert_eq!(world.order_status(fay_order_id).await, "CANCELLED");

    // Ann pays with a coupon of 5,000; Bob pays entirely with a coupon of his order's whole
    // price, so his payment debits nothing and has no ledger entry; Cat's order stays
    // reserved.
    let mut orders = Vec::new();
    for (user, coupon) in [(ann, Some(some_off)), (bob, Some(all_off)), (cat, None)] {
        if let Some(coupon) = coupon {
            let issued = world
                .accepted(api.issue_coupon(coupon, user, &format!("issue-{user}")).await)
                .await;
            assert_eq!(world.outcome(&issued).await, "SUCCEEDED");
        }
        let ordered = api.create_order(user, lamp, 2, &format!("order-{user}")).await;
        let order = order_id(&ordered);
        assert_eq!(world.outcome(&world.accepted(ordered).await).await, "SUCCEEDED");
        if let Some(coupon) = coupon {
            let paid = world
                .accepted(
                    api.pay_order(order, user, Some(coupon), &format!("pay-{user}"))
                        .await,
                )
                .await;
            assert_eq!(world.outcome(&paid).await, "SUCCEEDED");
        }
        orders.push(order);
    }
    let free: i64 = sqlx::query_scalar("SELECT paid_amount FROM orders WHERE id = $1")
        .bind(orders[1])
        .fetch_one(&world.db)
        .await
        .unwrap();
    assert_eq!(free, 0, "Bob's coupon paid it all");

    // Once the relay has published and deleted both events and the stand-in received
    // them, the worker and the stand-in stop, so nothing they do can repair a damage
    // before the checks look.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM outbox) OR (SELECT count(*) FROM received_events) < 2",
    )
    .fetch_one(&world.db)
    .await
    .unwrap()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox was never relayed to the stand-in"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    world.stop_worker().await;
    world.stop_data_platform().await;
    world
        .execute("CREATE TABLE saved_events AS SELECT * FROM received_events")
        .await;
    let received = "INSERT INTO received_events SELECT * FROM saved_events";

    assert_eq!(world.violated().await, Vec::<CheckId>::new(), "a sound world");

    // Each damage, the checks it must trip, and its repair. Requests are changed with what
    // the schema asks of them (an error when FAILED, no completion when PENDING) and put
    // back from a copy.
    let damage_requests = |kind: &str, set: &str, narrow: &str| {
        format!(
            "CREATE TABLE saved AS SELECT id, status, result, error, completed_at FROM requests WHERE kind = '{kind}';
             UPDATE requests SET {set} WHERE kind = '{kind}' {narrow};"
        )
    };
    let failed = "status = 'FAILED', result = NULL, error = '{\"code\": \"ERR_DAMAGE\"}'";
    let restore = "UPDATE requests r SET status = s.status, result = s.result, error = s.error,
                     completed_at = s.completed_at
                   FROM saved s WHERE r.id = s.id;
                   DROP TABLE saved;";
    let damages: Vec<(String, &[CheckId], String)> = vec![
        (
            format!("UPDATE balances SET amount = amount + 1 WHERE user_id = {ann}"),
            &[CheckId::WholeSystemBalanceIsLedger],
            format!("UPDATE balances SET amount = amount - 1 WHERE user_id = {ann}"),
        ),
        (
            format!("UPDATE products SET stock = stock - 1, sold = sold + 1 WHERE id = {lamp}"),
            &[CheckId::WholeSystemSoldIsOrders],
            format!("UPDATE products SET stock = stock + 1, sold = sold - 1 WHERE id = {lamp}"),
        ),
        (
            format!("UPDATE products SET reserved = reserved + 1 WHERE id = {lamp}"),
            &[CheckId::WholeSystemReservedIsOrders],
            format!("UPDATE products SET reserved = reserved - 1 WHERE id = {lamp}"),
        ),
        (
            damage_requests("COUPON_ISSUE", failed, ""),
            &[CheckId::WholeSystemCouponHeldIffIssued],
            restore.into(),
        ),
        (
            "UPDATE coupons SET issued_quantity = issued_quantity + 1".into(),
            &[CheckId::WholeSystemIssuedCountIsHeld],
            "UPDATE coupons SET issued_quantity = issued_quantity - 1".into(),
        ),
        (
            damage_requests("ORDER_PAY", failed, ""),
            &[CheckId::WholeSystemPaymentIffPaid],
            restore.into(),
        ),
        (
            "UPDATE balance_transactions SET amount = amount + 1 WHERE kind = 'PAYMENT'".into(),
            &[
                CheckId::WholeSystemBalanceIsLedger,
                CheckId::WholeSystemPaymentPerPaidOrder,
            ],
            "UPDATE balance_transactions SET amount = amount - 1 WHERE kind = 'PAYMENT'".into(),
        ),
        (
            damage_requests(
                "ORDER_CREATE",
                "status = 'PENDING', result = NULL, error = NULL, completed_at = NULL",
                "",
            ),
            &[
                CheckId::WholeSystemRequestsTerminal,
                CheckId::WholeSystemOrdersSettledAsCreated,
                CheckId::WholeSystemRequestsTerminalApi,
            ],
            restore.into(),
        ),
        (
            damage_requests(
                "ORDER_CREATE",
                "completed_at = completed_at + interval '1 hour'",
                "AND status = 'SUCCEEDED'",
            ),
            &[CheckId::WholeSystemPaymentAfterCreation],
            restore.into(),
        ),
        (
            // A cancelled order that had been reserved cannot go with a failed creation.
            format!("UPDATE orders SET reserved_until = now() WHERE id = '{fay_order_id}'"),
            &[CheckId::WholeSystemOrdersSettledAsCreated],
            format!("UPDATE orders SET reserved_until = NULL WHERE id = '{fay_order_id}'"),
        ),
        (
            damage_requests(
                "ORDER_CREATE",
                "error = jsonb_set(error, '{code}', '\"ERR_PROCESSING_FAILED\"')",
                "AND status = 'FAILED'",
            ),
            &[CheckId::WholeSystemNoProcessingFailed],
            restore.into(),
        ),
        (
            format!(
                "INSERT INTO dead_letters (request_id, family, kind, reason)
                 VALUES ('{fay_create}', 'order', 'ORDER_CREATE', 'rejected')"
            ),
            &[CheckId::WholeSystemNothingDeadLettered],
            "DELETE FROM dead_letters".into(),
        ),
        (
            // Events lost on the way: neither in the outbox nor received.
            "DELETE FROM received_events".into(),
            &[
                CheckId::WholeSystemEventsReceived,
                CheckId::WholeSystemEventPerPaidOrder,
            ],
            received.into(),
        ),
        (
            // An event left unpublished.
            "DELETE FROM received_events WHERE event_id = (SELECT min(event_id::text)::uuid FROM saved_events);
             INSERT INTO outbox (id, routing_key, payload)
             SELECT event_id, routing_key, payload FROM saved_events
             WHERE event_id = (SELECT min(event_id::text)::uuid FROM saved_events)"
                .into(),
            &[
                CheckId::WholeSystemEventsPublished,
                CheckId::WholeSystemEventsReceived,
            ],
            format!("DELETE FROM outbox; {received} ON CONFLICT DO NOTHING"),
        ),
        (
            // A second event for a paid order, still in the outbox.
            "INSERT INTO outbox (id, routing_key, payload)
             SELECT gen_random_uuid(), routing_key, payload FROM saved_events LIMIT 1"
                .into(),
            &[
                CheckId::WholeSystemEventsPublished,
                CheckId::WholeSystemEventPerPaidOrder,
            ],
            "DELETE FROM outbox".into(),
        ),
        (
            // A second event for a paid order, received.
            "INSERT INTO received_events (event_id, routing_key, payload)
             SELECT gen_random_uuid(), routing_key, payload FROM saved_events LIMIT 1"
                .into(),
            &[
                CheckId::WholeSystemEventPerPaidOrder,
                CheckId::WholeSystemEventsReceived,
            ],
            "DELETE FROM received_events WHERE event_id NOT IN (SELECT event_id FROM saved_events)".into(),
        ),
    ];
    for (damage, tripped, repair) in &damages {
        world.execute(damage).await;
        let violated = world.violated().await;
        for check in tripped.iter() {
            assert!(
                violated.contains(check),
                "after {damage:?}, {check:?} passed; violated: {violated:?}"
            );
        }
        world.execute(repair).await;
        assert_eq!(
            world.violated().await,
            Vec::<CheckId>::new(),
            "after repairing {damage:?}"
        );
    }

    // An event published and received but not yet deleted (a relay that crashed between
    // the confirm and the delete) is one event, not two: only the outbox is off.
    world
        .execute(
            "INSERT INTO outbox (id, routing_key, payload)
             SELECT event_id, routing_key, payload FROM saved_events LIMIT 1",
        )
        .await;
    assert_eq!(world.violated().await, vec![CheckId::WholeSystemEventsPublished]);
}

/// The checkout's charge check can fail: a charge sent again with its key is on the ledger
/// once and passes; a second copy of it, or a charge by a user who was not to send one,
/// fails it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkout_charge_check_counts_each_charge_once() {
    use loadgen::scenarios::checkout::CHARGE;
    let world = World::start().await;
    let api = world.api.clone();
    let (ann, bob) = (
        api.create_user("Ann").await.unwrap(),
        api.create_user("Bob").await.unwrap(),
    );
    for _ in 0..2 {
        let charged = api
            .charge(ann, CHARGE, Some("checkout-ann-charge"))
            .await
            .unwrap();
        assert_eq!(charged.status, 200, "{charged:?}");
    }
    let coupon = api.create_coupon("C", 1_000, 1).await.unwrap();
    let facts = checks::CheckoutFacts {
        users: vec![ann, bob],
        products: Vec::new(),
        coupon,
        charged: vec![ann],
        charge: CHARGE,
        paid: Vec::new(),
        expected_paid: 0,
        unexpected_answers: 0,
        failed_journeys: 0,
        settler: loadgen::scenarios::Settler::Pipeline,
        events: checks::PublishedEvents::NotPublished,
    };
    let holds = || async {
        checks::checkout(&world.db, &api, &facts)
            .await
            .unwrap()
            .into_vec()
            .into_iter()
            .find(|c| c.id == CheckId::CheckoutChargesAppliedOnce)
            .expect("the check runs")
            .passed
    };
    assert!(holds().await, "a charge retried with its key counts once");

    world
        .execute(&format!(
            "INSERT INTO balance_transactions (user_id, kind, amount, balance_after)
             VALUES ({ann}, 'CHARGE', {CHARGE}, {})",
            2 * CHARGE
        ))
        .await;
    assert!(!holds().await, "a charge applied twice");
    world
        .execute(&format!(
            "DELETE FROM balance_transactions WHERE id = (SELECT max(id) FROM balance_transactions WHERE user_id = {ann})"
        ))
        .await;
    assert!(holds().await);

    let charged = api.charge(bob, CHARGE, None).await.unwrap();
    assert_eq!(charged.status, 200, "{charged:?}");
    assert!(!holds().await, "a charge nobody sent");
}

/// The checkout's event check counts what the relay published through a tap of its own
/// (the relay deletes it from the outbox, and no stand-in runs in a benchmark): it passes on
/// one event per paid order, also when the event is both published and still in the
/// outbox, and fails on a second event or none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_checkout_event_check_counts_published_events_through_its_tap() {
    let mut world = World::start().await;
    let api = world.api.clone();
    let tap = loadgen::event_tap::EventTap::bind(&world.amqp_url, &world.topology.prefix)
        .await
        .unwrap();
    let ann = api.create_user("Ann").await.unwrap();
    let charged = api.charge(ann, 100_000, None).await.unwrap();
    assert_eq!(charged.status, 200, "{charged:?}");
    let lamp = api.create_product("Lamp", 30_000, 10).await.unwrap();
    let coupon = api.create_coupon("Unused", 1_000, 1).await.unwrap();
    world.start_worker();
    let ordered = api.create_order(ann, lamp, 1, "order-ann").await;
    let order = order_id(&ordered);
    assert_eq!(world.outcome(&world.accepted(ordered).await).await, "SUCCEEDED");
    let paid = api.pay_order(order, ann, None, "pay-ann").await;
    assert_eq!(world.outcome(&world.accepted(paid).await).await, "SUCCEEDED");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM outbox)")
        .fetch_one(&world.db)
        .await
        .unwrap()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox was never relayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    world.stop_worker().await;

    let mut facts = checks::CheckoutFacts {
        users: vec![ann],
        products: Vec::new(),
        coupon,
        charged: Vec::new(),
        charge: 0,
        paid: Vec::new(),
        expected_paid: 1,
        unexpected_answers: 0,
        failed_journeys: 0,
        settler: loadgen::scenarios::Settler::Pipeline,
        events: checks::PublishedEvents::Tap(Box::new(tap)),
    };
    async fn holds(world: &World, facts: &checks::CheckoutFacts) -> bool {
        checks::checkout(&world.db, &world.api, facts)
            .await
            .unwrap()
            .into_vec()
            .into_iter()
            .find(|c| c.id == CheckId::CheckoutEventPerPaidOrder)
            .expect("the check runs")
            .passed
    }
    assert!(
        holds(&world, &facts).await,
        "the published event, seen by the tap"
    );

    let event = Uuid::now_v7();
    let second = format!(
        "INSERT INTO outbox (id, routing_key, payload)
         VALUES ('{event}', 'order.paid', jsonb_build_object('eventId', '{event}', 'orderId', '{order}'))"
    );
    world.execute(&second).await;
    assert!(!holds(&world, &facts).await, "a second event for the order");
    world.execute("DELETE FROM outbox").await;
    assert!(holds(&world, &facts).await);

    // Published, and still in the outbox (a relay that died before its delete): one event.
    let PublishedEvents::Tap(tap) = &facts.events else {
        unreachable!()
    };
    let (published, _) = tap.seen().await.unwrap().into_iter().next().unwrap();
    world
        .execute(&format!(
            "INSERT INTO outbox (id, routing_key, payload)
             VALUES ('{published}', 'order.paid', jsonb_build_object('eventId', '{published}', 'orderId', '{order}'))"
        ))
        .await;
    assert!(
        holds(&world, &facts).await,
        "published and not yet deleted is one event"
    );
    world.execute("DELETE FROM outbox").await;

    // Without the tap the published event is nowhere: missing.
    if let PublishedEvents::Tap(tap) = std::mem::replace(&mut facts.events, PublishedEvents::NotPublished) {
        tap.close().await;
    }
    assert!(!holds(&world, &facts).await, "an order paid without an event");
}
