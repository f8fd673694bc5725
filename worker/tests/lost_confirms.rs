//! A command the broker took and a worker settled, but whose publisher confirm never reached
//! the API: the client must not be told 503, or its retry would take effect a second time.
//! And a command the API stored but never published: the sweeper must send it, once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use reqwest::StatusCode;
use serde_json::json;
use testkit::{socket_of, Proxy, System};

/// Found by the fault suite (RabbitMQ restarted under a checkout): the API answered 503 and
/// released the key of an order a worker had already reserved, the client's retry with the
/// same key created a second order, and a payment answered 400 for an order already paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_settled_without_its_confirm_is_answered_202_once() {
    let broker_url = shared::config::BrokerSettings::from_env().unwrap().url;
    let proxy = Proxy::start(socket_of(&broker_url)).await;
    let proxied = proxy.url_for(&broker_url);
    // The API publishes through the proxy; the worker consumes from RabbitMQ directly.
    let system = System::start_with(1, |config| config.broker.url = proxied).await;
    system.wait_for_owners(1).await;
    let product = system.product(1_000, 10).await;
    let user = system.app.create_users(1).await[0];
    // A first order opens the API's publishing channel before the answers are lost.
    system.reserved_order(user, &[(product, 1)]).await;

    proxy.mute();
    let body = json!({ "userId": user, "items": [{ "productId": product, "quantity": 1 }] });
    let first = system
        .app
        .post_with_key("/orders", body.clone(), "order-once")
        .await;
    let settled_before_the_answer: i64 = system
        .scalar("SELECT count(*) FROM requests WHERE kind = 'ORDER_CREATE' AND status = 'SUCCEEDED'")
        .await;
    proxy.cut();
    proxy.restore().await;
    let again = system
        .app
        .eventually(StatusCode::ACCEPTED, testkit::PATIENCE, || {
            system.app.post_with_key("/orders", body.clone(), "order-once")
        })
        .await;

    // The worker settles within milliseconds and the API waits seconds for a confirm, so
    // the request is settled before the API gives up; should the worker ever be slower,
    // the API withdraws it and 503 is the true answer. Either way the key names one order.
    if settled_before_the_answer == 2 {
        assert_eq!(first.status, StatusCode::ACCEPTED, "{first:?}");
        assert_eq!(again.body["orderId"], first.body["orderId"], "{again:?}");
    } else {
        eprintln!("the worker was slower than the confirm timeout; the request was withdrawn");
        assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE, "{first:?}");
    }
    // And the API publishes again (a new connection replaces the one that went silent).
    let next = system
        .app
        .eventually(StatusCode::ACCEPTED, testkit::PATIENCE, || {
            system.app.post_with_key("/orders", body.clone(), "order-next")
        })
        .await;
    assert_ne!(next.body["orderId"], first.body["orderId"]);
    system.wait_until_settled().await;
    let live_orders = system
        .scalar(&format!(
            "SELECT count(*) FROM orders WHERE user_id = {user} AND status <> 'REJECTED'"
        ))
        .await;
    assert_eq!(live_orders, 3, "the warm-up order, one for the key and the next");
    let reserved: i64 = system
        .scalar(&format!("SELECT reserved FROM products WHERE id = {product}"))
        .await;
    assert_eq!(reserved, 3, "one unit per live order");
}

/// The api died after storing a command and before publishing it (a `kill -9` between the
/// commit and the publish): the sweeper publishes it, it settles once, and the client's
/// retry with the same key is answered `409` until then and the first `202` after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_stored_but_never_published_is_swept_and_settles_once() {
    let system = System::start(0).await;
    let coupon = system.coupon(5).await;
    let user = system.app.create_users(1).await[0];
    let path = format!("/coupons/{coupon}/issue");
    let first = system
        .app
        .post_with_key(&path, json!({ "userId": user }), "issue-once")
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{first:?}");

    let request = first.body["requestId"].as_str().unwrap().to_owned();
    system.wait_until_published(&request).await;

    // No worker yet: take the message out of its partition queue and leave the request as
    // the dead api did, stored and unpublished, due for the sweeper now.
    system
        .lose_publish(
            shared::domain::command::Family::Coupon,
            coupon,
            &request,
            "0 seconds",
        )
        .await;
    let meanwhile = system
        .app
        .post_with_key(&path, json!({ "userId": user }), "issue-once")
        .await;
    assert_eq!(meanwhile.status, StatusCode::CONFLICT, "{meanwhile:?}");
    assert_eq!(meanwhile.code(), "ERR_IDEMPOTENCY_KEY_IN_USE");

    system.spawn_worker().await;
    assert_eq!(system.outcome(&request).await, "SUCCEEDED");
    let again = system
        .app
        .post_with_key(&path, json!({ "userId": user }), "issue-once")
        .await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{again:?}");
    assert_eq!(again.body, first.body);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(system.assert_coupon_invariants(coupon).await, 1);
}

/// A sweep whose publish of one request fails (its partition queue is gone, so the broker
/// cannot route it) still publishes the others and records them published: otherwise each
/// later pass would send them again, and a broker that refuses one message would hold back
/// every request swept after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sweep_marks_what_it_published_when_another_publish_fails() {
    use shared::domain::command::Family;

    let system = System::start(0).await;
    let topology = system.app.topology.clone();
    let partition = |coupon| shared::domain::partition::partition_of(coupon, topology.partitions);
    let refused_coupon = system.coupon(5).await;
    let mut coupon = system.coupon(5).await;
    while partition(coupon) == partition(refused_coupon) {
        coupon = system.coupon(5).await;
    }
    let user = system.app.create_users(1).await[0];
    // Swept oldest first: the refused request comes before the other.
    let mut requests = Vec::new();
    for c in [refused_coupon, coupon] {
        let answer = system.issue(c, user).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
        let request = answer.body["requestId"].as_str().unwrap().to_owned();
        system.wait_until_published(&request).await;
        system
            .lose_publish(Family::Coupon, c, &request, "0 seconds")
            .await;
        requests.push(request);
    }
    let [refused, swept] = [&requests[0], &requests[1]];
    let connection = testkit::broker_connection().await;
    let channel = connection.create_channel().await.unwrap();
    let gone = topology.queue(Family::Coupon, partition(refused_coupon));
    channel
        .queue_delete(gone.as_str().into(), Default::default())
        .await
        .unwrap();

    let ctx = system.worker_context();
    let outcome = worker::sweeper::sweep_once(&ctx).await;
    let error = format!("{:#}", outcome.expect_err("one publish was refused"));
    assert!(error.contains("1 re-published"), "{error}");
    assert!(error.contains(&gone), "{error}");
    assert!(
        system.is_published(swept).await,
        "the confirmed publish is recorded"
    );
    assert!(
        !system.is_published(refused).await,
        "the refused one is left to the next pass"
    );
    let queue = topology.queue(Family::Coupon, partition(coupon));
    let depth = shared::messaging::broker::queue_depth(&channel, &queue)
        .await
        .unwrap();
    assert_eq!(depth, 1, "the other request's command is in {queue}");

    // The queue back, the refused request due again: the next pass sends it alone.
    ctx.declare_topology().await;
    sqlx::query("UPDATE requests SET publish_after = now() WHERE id = $1::uuid")
        .bind(refused)
        .execute(&system.app.db)
        .await
        .unwrap();
    assert_eq!(worker::sweeper::sweep_once(&ctx).await.unwrap(), 1);
    ctx.publisher.close().await;
    ctx.broker.close().await;

    system.spawn_worker().await;
    for request in [refused, swept] {
        assert_eq!(system.outcome(request).await, "SUCCEEDED");
    }
    system.wait_until_settled().await;
    for c in [refused_coupon, coupon] {
        assert_eq!(system.assert_coupon_invariants(c).await, 1);
    }
    let _ = connection.close(200, "done".into()).await;
}
