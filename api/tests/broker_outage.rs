//! RabbitMQ going down and coming back, as the API sees it: 503 with `Retry-After` while it
//! is down, nothing accepted that could later take effect, and recovery without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use reqwest::StatusCode;
use serde_json::json;
use testkit::{socket_of, spawn_app_with, Proxy, TestApp};

/// A user, and the issue path of a coupon they can request.
async fn user_and_coupon(app: &TestApp) -> (i64, String) {
    let user = app.create_user("Ann").await;
    let coupon = app
        .create_coupon(json!({
            "name": "C", "discountType": "FIXED", "discountValue": 100, "totalQuantity": 5,
            "expiresAt": (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339(),
        }))
        .await;
    (user, format!("/coupons/{coupon}/issue"))
}

/// A user and a coupon's issue path, once the api is ready and has accepted a first issue
/// through its broker connection.
async fn accepting(app: &TestApp) -> (i64, String) {
    let (user, path) = user_and_coupon(app).await;
    app.eventually(StatusCode::OK, PATIENCE, || app.get("/health/ready"))
        .await;
    app.eventually(StatusCode::ACCEPTED, PATIENCE, || {
        app.post(&path, json!({ "userId": user }))
    })
    .await;
    (user, path)
}

/// How long the api may take to reach the broker again.
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_down_commands_get_503_and_the_api_recovers_by_itself() {
    let broker_url = shared::config::BrokerSettings::from_env().unwrap().url;
    let proxy = Proxy::start(socket_of(&broker_url)).await;
    let proxied = proxy.url_for(&broker_url);
    let app = spawn_app_with(|config| config.broker.url = proxied).await;
    let (user, path) = accepting(&app).await;

    proxy.cut();
    let refused = app
        .post_with_key(&path, json!({ "userId": user }), "retry-me")
        .await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{refused:?}");
    assert_eq!(refused.code(), "ERR_UNAVAILABLE");
    assert!(refused.headers.get("retry-after").is_some());
    assert_eq!(app.get("/health/live").await.status, StatusCode::OK);
    // Readiness answers from a check at most a second old: it turns within that.
    app.eventually(StatusCode::SERVICE_UNAVAILABLE, PATIENCE, || {
        app.get("/health/ready")
    })
    .await;
    // Nothing was accepted: the stored request was withdrawn before any worker could see it.
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM requests WHERE status = 'PENDING'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(
        pending, 1,
        "only the request accepted before the outage is pending"
    );

    proxy.restore().await;
    // Recovery needs no restart: the API reconnects on the next request that needs RabbitMQ.
    // (Each 503 released the key, so the same key is a fresh request every time.)
    let accepted = app
        .eventually(StatusCode::ACCEPTED, PATIENCE, || {
            app.post_with_key(&path, json!({ "userId": user }), "retry-me")
        })
        .await;
    assert!(
        accepted.headers.get("idempotent-replayed").is_none(),
        "the 503 was not saved"
    );
    app.eventually(StatusCode::OK, PATIENCE, || app.get("/health/ready"))
        .await;
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM requests WHERE status = 'PENDING'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(
        pending, 2,
        "the two accepted requests, and nothing else, are pending"
    );
}

/// Found in review: a publish that failed while PostgreSQL could not be reached either left
/// the request stored and `PENDING` (the sweeper publishes it later, and its key keeps its
/// `202`) but answered 503, which tells the client that nothing was accepted: a client
/// without a key would then place it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_be_withdrawn_is_answered_202_since_it_will_take_effect() {
    let broker_url = shared::config::BrokerSettings::from_env().unwrap().url;
    let broker = Proxy::start(socket_of(&broker_url)).await;
    let server_url = shared::config::DatabaseSettings::from_env().unwrap().url;
    let pg = Proxy::start(socket_of(&server_url)).await;
    let app = {
        let (broker, pg) = (broker.url_for(&broker_url), std::sync::Arc::clone(&pg));
        spawn_app_with(move |config| {
            config.broker.url = broker;
            config.database.url = pg.url_for(&config.database.url);
        })
        .await
    };
    // The API's pool goes through the proxy; the test reads the database directly.
    let direct = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    let (user, path) = user_and_coupon(&app).await;

    // The broker takes the message but its confirm never comes; once the request is
    // stored, PostgreSQL goes away too, so it cannot be withdrawn.
    broker.mute();
    let sent = {
        let (client, url, token) = (
            reqwest::Client::new(),
            app.url(&path),
            app.token_of(user).unwrap(),
        );
        tokio::spawn(async move {
            let response = client
                .post(url)
                .bearer_auth(token)
                .header("Idempotency-Key", "kept")
                .json(&json!({ "userId": user }))
                .send()
                .await
                .unwrap();
            testkit::read(response).await
        })
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM requests")
            .fetch_one(&direct)
            .await
            .unwrap();
        if stored == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request was never stored"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    pg.cut();
    let answer = sent.await.unwrap();
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    let id = answer.body["requestId"].as_str().unwrap().to_owned();
    let status: String = sqlx::query_scalar("SELECT status FROM requests WHERE id = $1::uuid")
        .bind(&id)
        .fetch_one(&direct)
        .await
        .unwrap();
    assert_eq!(status, "PENDING", "stored, for the sweeper to publish");

    // Once both are back, the key still names that request: in flight (409) until the
    // sweeper has published it (a worker's job, played here by marking it published), then
    // its 202 again. Never a second request.
    pg.restore().await;
    broker.cut();
    broker.restore().await;
    let in_flight = app
        .eventually(StatusCode::CONFLICT, PATIENCE, || {
            app.post_with_key(&path, json!({ "userId": user }), "kept")
        })
        .await;
    assert_eq!(in_flight.code(), "ERR_IDEMPOTENCY_KEY_IN_USE");
    sqlx::query("UPDATE requests SET published = true WHERE id = $1::uuid")
        .bind(&id)
        .execute(&direct)
        .await
        .unwrap();
    let again = app.post_with_key(&path, json!({ "userId": user }), "kept").await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{again:?}");
    assert_eq!(again.body["requestId"], id.as_str(), "{again:?}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM requests")
        .fetch_one(&direct)
        .await
        .unwrap();
    assert_eq!(stored, 1);
}

/// With two nodes in `AMQP_URL`, the loss of the node the api is connected to costs at most
/// the commands in flight (503, withdrawn); the api moves to the other node by itself and
/// accepts again while the first stays down. Two proxies of the one broker play the nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_node_list_the_api_moves_to_another_node_when_its_node_goes_away() {
    let broker_url = shared::config::BrokerSettings::from_env().unwrap().url;
    let first = Proxy::start(socket_of(&broker_url)).await;
    let second = Proxy::start(socket_of(&broker_url)).await;
    let nodes = format!("{},{}", first.url_for(&broker_url), second.url_for(&broker_url));
    let app = spawn_app_with(|config| config.broker.url = nodes).await;
    let (user, path) = accepting(&app).await;

    // The first node answered, so the api is on it; now it goes away for good.
    first.cut();
    let mut answers = Vec::new();
    for attempt in 0..20 {
        let answer = app
            .post_with_key(&path, json!({ "userId": user }), "after-the-loss")
            .await;
        let status = answer.status;
        answers.push(status);
        if status == StatusCode::ACCEPTED {
            break;
        }
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "attempt {attempt}: {answer:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        answers.last(),
        Some(&StatusCode::ACCEPTED),
        "the api never reached the second node: {answers:?}"
    );
    assert_eq!(app.get("/health/ready").await.status, StatusCode::OK);
    // Every 503 was withdrawn, and each 202 is one pending request: nothing lost, nothing twice.
    let (pending, withdrawn): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'PENDING'),
                count(*) FILTER (WHERE status = 'FAILED' AND error->>'code' = 'ERR_UNAVAILABLE')
         FROM requests",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(pending, 2, "{answers:?}");
    assert_eq!(
        withdrawn,
        i64::try_from(answers.len() - 1).unwrap(),
        "{answers:?}"
    );
}
