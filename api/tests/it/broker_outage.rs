//! RabbitMQ going down and coming back, as the API sees it: commands are still accepted
//! (PostgreSQL is the command log), reach their queues in the order they were accepted once
//! the broker is back, and a 503 means only that PostgreSQL cannot be reached.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use shared::domain::command::{CommandMessage, Family};
use testkit::{socket_of, spawn_app_with, Proxy, TestApp};

/// Users, and the issue path of a coupon they can request.
async fn users_and_coupon(app: &TestApp, users: i64) -> (Vec<i64>, i64, String) {
    let users = app.create_users(users).await;
    let coupon = app
        .create_coupon(json!({
            "name": "C", "discountType": "FIXED", "discountValue": 100, "totalQuantity": 50,
            "expiresAt": (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339(),
        }))
        .await;
    (users, coupon, format!("/coupons/{coupon}/issue"))
}

/// How long the api may take to reach the broker again.
const PATIENCE: Duration = Duration::from_secs(60);

/// The request ids of the first `expected` commands in `coupon`'s partition queue, in
/// queue order (no worker runs in these tests), taken off the queue by a consumer of its
/// own (a single-active-consumer quorum queue allows no `basic.get`).
async fn queued_requests(app: &TestApp, coupon: i64, expected: usize) -> Vec<String> {
    use futures::StreamExt;

    let partition = shared::domain::partition::partition_of(coupon, app.topology.partitions);
    let queue = app.topology.queue(Family::Coupon, partition);
    let connection = testkit::broker_connection().await;
    let channel = connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "test".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    while ids.len() < expected {
        let delivery = tokio::time::timeout(PATIENCE, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("{queue} gave {} commands, not {expected}", ids.len()))
            .unwrap()
            .unwrap();
        let command: CommandMessage = serde_json::from_slice(&delivery.data).unwrap();
        ids.push(command.request_id.to_string());
    }
    // Nothing more, not even a second copy (a duplicate later than this goes unseen, but
    // none can fail the test wrongly).
    let more = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
    assert!(more.is_err(), "{queue} held more than {expected} commands");
    let _ = connection.close(200, "done".into()).await;
    ids
}

/// Waits until `coupon`'s partition queue holds `depth` messages (read by a passive declare
/// on a connection of the test's own, straight to RabbitMQ).
async fn wait_for_queue_depth(app: &TestApp, coupon: i64, depth: u32) {
    let partition = shared::domain::partition::partition_of(coupon, app.topology.partitions);
    let queue = app.topology.queue(Family::Coupon, partition);
    let connection = testkit::broker_connection().await;
    let channel = connection.create_channel().await.unwrap();
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let declared = channel
            .queue_declare(queue.as_str().into(), passive, Default::default())
            .await
            .unwrap();
        if declared.message_count() >= depth {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue} never held {depth} messages"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_down_commands_are_accepted_and_queued_in_order_when_it_is_back() {
    let broker_url = shared::config::BrokerSettings::from_env().unwrap().url;
    let proxy = Proxy::start(socket_of(&broker_url)).await;
    let proxied = proxy.url_for(&broker_url);
    let app = spawn_app_with(|config| config.broker.url = proxied).await;
    let (users, coupon, path) = users_and_coupon(&app, 6).await;
    let warm_up = app.post(&path, json!({ "userId": users[0] })).await;
    assert_eq!(warm_up.status, StatusCode::ACCEPTED, "{warm_up:?}");
    let mut accepted = vec![warm_up.body["requestId"].as_str().unwrap().to_owned()];
    // The 202 comes before the publish: cut only once the warm-up is in its queue, or its
    // confirm may be lost in the cut and the command rightly published again.
    wait_for_queue_depth(&app, coupon, 1).await;

    proxy.cut();
    for &user in &users[1..] {
        let answer = app.post_with_key(&path, json!({ "userId": user }), "once").await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
        accepted.push(answer.body["requestId"].as_str().unwrap().to_owned());
    }
    // A replay during the outage is the same 202, and stores nothing.
    let replay = app
        .post_with_key(&path, json!({ "userId": users[1] }), "once")
        .await;
    assert_eq!(replay.status, StatusCode::ACCEPTED, "{replay:?}");
    assert_eq!(replay.body["requestId"], accepted[1].as_str());
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    let ready = app.ready_with_broker_down().await;
    assert_eq!(ready.body["postgres"], "UP", "{ready:?}");
    assert_eq!(ready.body["rabbitmq"], "DOWN", "{ready:?}");

    proxy.restore().await;
    // Recovery needs no restart, and no new request: the relay publishes what it holds.
    let queued = queued_requests(&app, coupon, accepted.len()).await;
    assert_eq!(queued, accepted, "every command once, in acceptance order");
    app.eventually(StatusCode::OK, PATIENCE, || app.get("/health/ready"))
        .await;
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM requests WHERE status = 'PENDING'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(pending, 6, "the accepted requests, and nothing else, are pending");
}

/// A 503 means PostgreSQL could not be reached, and then nothing was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_down_a_command_is_answered_503_and_nothing_is_stored() {
    // The server the tests' databases are on, which the app's pool must reach through the proxy.
    let server_url = testkit::isolation::server_url();
    let pg = Proxy::start(socket_of(&server_url)).await;
    let app = {
        let pg = std::sync::Arc::clone(&pg);
        spawn_app_with(move |config| config.database.url = pg.url_for(&config.database.url)).await
    };
    // The API's pool goes through the proxy; the test reads the database directly.
    let direct = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    let (users, _, path) = users_and_coupon(&app, 1).await;
    let first = app.post(&path, json!({ "userId": users[0] })).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{first:?}");

    pg.cut();
    let refused = app
        .post_with_key(&path, json!({ "userId": users[0] }), "retry-me")
        .await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{refused:?}");
    assert_eq!(refused.code(), "ERR_UNAVAILABLE");
    assert!(refused.headers.get("retry-after").is_some());
    // Readiness answers from a check at most a second old: it turns within that.
    let ready = app
        .eventually(StatusCode::SERVICE_UNAVAILABLE, PATIENCE, || {
            app.get("/health/ready")
        })
        .await;
    // The contract's error body and Retry-After, like every other 503.
    assert_eq!(ready.code(), "ERR_UNAVAILABLE", "{ready:?}");
    assert_eq!(ready.body["postgres"], "DOWN", "{ready:?}");
    assert_eq!(ready.headers["retry-after"], "1");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM requests")
        .fetch_one(&direct)
        .await
        .unwrap();
    assert_eq!(stored, 1, "only the request accepted before the outage");

    pg.restore().await;
    let accepted = app
        .eventually(StatusCode::ACCEPTED, PATIENCE, || {
            app.post_with_key(&path, json!({ "userId": users[0] }), "retry-me")
        })
        .await;
    assert!(
        accepted.headers.get("idempotent-replayed").is_none(),
        "the 503 was not saved"
    );
}

/// With two nodes in `AMQP_URL`, the loss of the node the api is connected to costs no
/// answer: commands are accepted all along and published through the other node. Two
/// proxies of the one broker play the nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_node_list_the_api_moves_to_another_node_when_its_node_goes_away() {
    let broker_url = shared::config::BrokerSettings::from_env().unwrap().url;
    let first = Proxy::start(socket_of(&broker_url)).await;
    let second = Proxy::start(socket_of(&broker_url)).await;
    let nodes = format!("{},{}", first.url_for(&broker_url), second.url_for(&broker_url));
    let app = spawn_app_with(|config| config.broker.url = nodes).await;
    let (users, coupon, path) = users_and_coupon(&app, 20).await;
    let warm_up = app.post(&path, json!({ "userId": users[0] })).await;
    let mut accepted = vec![warm_up.body["requestId"].as_str().unwrap().to_owned()];
    // The first node answered, so the api is on it: once the warm-up is queued.
    assert_eq!(queued_requests(&app, coupon, 1).await, accepted);
    accepted.clear();

    first.cut();
    for &user in &users[1..] {
        let answer = app.post(&path, json!({ "userId": user })).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
        accepted.push(answer.body["requestId"].as_str().unwrap().to_owned());
    }
    let queued = queued_requests(&app, coupon, accepted.len()).await;
    assert_eq!(queued, accepted, "every command once, in acceptance order");
    assert_eq!(app.get("/health/ready").await.status, StatusCode::OK);
}
