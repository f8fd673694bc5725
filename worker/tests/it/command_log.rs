//! PostgreSQL is the command log: a command is accepted once its request commits, and
//! publishing to RabbitMQ follows. Whatever happens to the broker or to the api after the
//! `202`, the command settles, once, and commands of one key settle first come first served.

use reqwest::StatusCode;
use serde_json::json;
use testkit::{socket_of, Proxy, System};

/// The users of `coupon` who hold it, in user order.
async fn holders(system: &System, coupon: i64) -> Vec<i64> {
    sqlx::query_scalar("SELECT user_id FROM user_coupons WHERE coupon_id = $1 ORDER BY user_id")
        .bind(coupon)
        .fetch_all(&system.app.db)
        .await
        .unwrap()
}

/// The issue's outcome codes of `requests`, in their order (`SUCCEEDED` or the error code).
async fn outcomes(system: &System, requests: &[String]) -> Vec<String> {
    let mut codes = Vec::new();
    for request in requests {
        let row: (String, Option<String>) =
            sqlx::query_as("SELECT status, error->>'code' FROM requests WHERE id = $1::uuid")
                .bind(request)
                .fetch_one(&system.app.db)
                .await
                .unwrap();
        codes.push(row.1.unwrap_or(row.0));
    }
    codes
}

/// RabbitMQ out of reach of the api and the workers: commands are still accepted (202, and
/// the api reports itself ready), a replay of one gets its 202, and once the broker is back
/// every accepted command settles, once, in the order it was accepted: the first three of six
/// users get a coupon of three; a user's order placed and paid during the outage is paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_rabbitmq_down_commands_are_accepted_and_settle_first_come_first_served_when_it_is_back() {
    let broker_url = shared::config::BrokerSettings::from_env().unwrap().url;
    let proxy = Proxy::start(socket_of(&broker_url)).await;
    let proxied = proxy.url_for(&broker_url);
    let system = {
        let proxied = proxied.clone();
        System::start_with(0, move |config| config.broker.url = proxied).await
    };
    system.spawn_worker_with(&[("AMQP_URL", proxied.clone())]).await;
    system.wait_for_owners(1).await;
    let coupon = system.coupon(3).await;
    let product = system.product(1_000, 5).await;
    let users = system.app.create_users(6).await;
    assert_eq!(system.app.charge(users[0], 5_000).await.status, StatusCode::OK);

    proxy.cut();
    let mut requests = Vec::new();
    for &user in &users {
        let answer = system
            .app
            .post_with_key(
                &format!("/coupons/{coupon}/issue"),
                json!({ "userId": user }),
                &format!("issue-{user}"),
            )
            .await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
        requests.push(answer.body["requestId"].as_str().unwrap().to_owned());
    }
    let replay = system
        .app
        .post_with_key(
            &format!("/coupons/{coupon}/issue"),
            json!({ "userId": users[0] }),
            &format!("issue-{}", users[0]),
        )
        .await;
    assert_eq!(replay.status, StatusCode::ACCEPTED, "{replay:?}");
    assert_eq!(replay.body["requestId"], requests[0].as_str());
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    let placed = system.order(users[0], &[(product, 2)]).await;
    assert_eq!(placed.status, StatusCode::ACCEPTED, "{placed:?}");
    let order = placed.body["orderId"].as_str().unwrap().to_owned();
    let paid = system.pay(&order, users[0], None).await;
    assert_eq!(paid.status, StatusCode::ACCEPTED, "{paid:?}");

    let ready = system.app.ready_with_broker_down().await;
    assert_eq!(ready.body["rabbitmq"], "DOWN", "{ready:?}");
    let pending = system
        .scalar("SELECT count(*) FROM requests WHERE status = 'PENDING'")
        .await;
    assert_eq!(pending, 8, "nothing settles while the broker is out of reach");

    proxy.restore().await;
    system.wait_until_settled().await;
    assert_eq!(holders(&system, coupon).await, users[..3].to_vec());
    assert_eq!(
        outcomes(&system, &requests).await,
        [
            "SUCCEEDED",
            "SUCCEEDED",
            "SUCCEEDED",
            "ERR_COUPON_OUT_OF_STOCK",
            "ERR_COUPON_OUT_OF_STOCK",
            "ERR_COUPON_OUT_OF_STOCK"
        ]
    );
    assert_eq!(
        system.outcome(paid.body["requestId"].as_str().unwrap()).await,
        "SUCCEEDED"
    );
    assert_eq!(system.assert_coupon_invariants(coupon).await, 3);
    assert_eq!(system.assert_stock_reconciles(product, 5).await, (3, 0, 2));
    system.assert_money_invariants().await;
}

/// An api killed (`kill -9`) with commands it stored but could not publish (its broker was
/// out of reach): a worker's sweeper publishes them once the api's heartbeat is old, in the
/// order they were accepted, and they settle once; the dead api's row is then gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_killed_before_publishing_has_its_commands_swept_first_come_first_served() {
    let broker_url = shared::config::BrokerSettings::from_env().unwrap().url;
    let proxy = Proxy::start(socket_of(&broker_url)).await;
    let system = System::start(0).await;
    let coupon = system.coupon(3).await;
    let users = system.app.create_users(6).await;
    let api_binary = std::path::Path::new(env!("CARGO_BIN_EXE_worker")).with_file_name("api");
    proxy.cut();
    let proxied = proxy.url_for(&broker_url);
    let (mut doomed, addr) = system
        .app
        .replica_with(api_binary.to_str().unwrap(), &[("AMQP_URL", &proxied)], None)
        .await;
    let client = reqwest::Client::new();
    let mut requests = Vec::new();
    for &user in &users {
        let answer = client
            .post(format!("http://{addr}/coupons/{coupon}/issue"))
            .bearer_auth(system.app.token_of(user).unwrap())
            .json(&json!({ "userId": user }))
            .send()
            .await
            .unwrap();
        let answer = testkit::read(answer).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
        requests.push(answer.body["requestId"].as_str().unwrap().to_owned());
    }
    let doomed_api = system
        .scalar(&format!(
            "SELECT count(DISTINCT accepted_by) FROM requests WHERE id IN ({})",
            requests
                .iter()
                .map(|r| format!("'{r}'::uuid"))
                .collect::<Vec<_>>()
                .join(",")
        ))
        .await;
    assert_eq!(doomed_api, 1, "one api process accepted them all");
    doomed.start_kill().unwrap();
    doomed.wait().await.unwrap();

    system.spawn_worker().await;
    system.wait_until_settled().await;
    assert_eq!(holders(&system, coupon).await, users[..3].to_vec());
    assert_eq!(system.assert_coupon_invariants(coupon).await, 3);
    let left = system
        .scalar(
            "SELECT count(*) FROM api_instances i
             WHERE EXISTS (SELECT 1 FROM requests r WHERE r.accepted_by = i.id)
               AND i.heartbeat_at < now() - interval '5 seconds'",
        )
        .await;
    assert_eq!(left, 0, "the dead api's row is removed once its commands are out");
}

/// The broker takes a command but its confirm never reaches the api: the api had answered
/// 202 already, publishes it again once the broker answers, and it settles once; the key
/// keeps naming that one order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_whose_confirm_is_lost_is_published_again_and_settles_once() {
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
    assert_eq!(first.status, StatusCode::ACCEPTED, "{first:?}");
    let request = first.body["requestId"].as_str().unwrap().to_owned();
    // The worker gets the message straight from RabbitMQ and settles it; the api never
    // hears the confirm, so it sends the message again when the broker answers.
    assert_eq!(system.outcome(&request).await, "SUCCEEDED");
    proxy.cut();
    proxy.restore().await;
    let again = system
        .app
        .post_with_key("/orders", body.clone(), "order-once")
        .await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{again:?}");
    assert_eq!(again.accepted(), first.accepted());

    let next = system.order(user, &[(product, 1)]).await;
    assert_eq!(next.status, StatusCode::ACCEPTED, "{next:?}");
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

/// The api died after storing a command and before publishing it: the sweeper publishes
/// it and it settles once; the client's retry with the same key gets the first `202`
/// before and after.
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
    // No worker yet: take the message out of its partition queue and leave the request as
    // a dead api's, stored and unpublished.
    system
        .lose_publish(shared::domain::command::Family::Coupon, coupon, &request, true)
        .await;
    let meanwhile = system
        .app
        .post_with_key(&path, json!({ "userId": user }), "issue-once")
        .await;
    assert_eq!(meanwhile.status, StatusCode::ACCEPTED, "{meanwhile:?}");
    assert_eq!(meanwhile.accepted(), first.accepted());

    system.spawn_worker().await;
    assert_eq!(system.outcome(&request).await, "SUCCEEDED");
    let again = system
        .app
        .post_with_key(&path, json!({ "userId": user }), "issue-once")
        .await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{again:?}");
    assert_eq!(again.accepted(), first.accepted());
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(system.assert_coupon_invariants(coupon).await, 1);
}

/// A sweep whose publish of one request is refused (its partition queue is gone, so the
/// broker cannot route it) fails, and keeps the dead api's row: a later pass publishes its
/// requests again, and each settles once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sweep_that_fails_part_way_is_done_again_by_a_later_pass() {
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
    let mut requests = Vec::new();
    for c in [refused_coupon, coupon] {
        let answer = system.issue(c, user).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
        let request = answer.body["requestId"].as_str().unwrap().to_owned();
        system.lose_publish(Family::Coupon, c, &request, true).await;
        requests.push(request);
    }
    // One dead api accepted both.
    sqlx::query(
        "UPDATE requests SET accepted_by = (SELECT accepted_by FROM requests WHERE id = $1::uuid)
         WHERE id = $2::uuid",
    )
    .bind(&requests[0])
    .bind(&requests[1])
    .execute(&system.app.db)
    .await
    .unwrap();
    let connection = testkit::broker_connection().await;
    let channel = connection.create_channel().await.unwrap();
    let gone = topology.queue(Family::Coupon, partition(refused_coupon));
    channel
        .queue_delete(gone.as_str().into(), Default::default())
        .await
        .unwrap();

    let ctx = system.worker_context();
    // Dead apis with no request left (the second request's first owner, and the one the
    // migration made for requests stored before the command log) may be swept first.
    let mut error = None;
    for _ in 0..5 {
        if let Err(e) = worker::relay::sweeper::sweep_once(&ctx).await {
            error = Some(format!("{e:#}"));
            break;
        }
    }
    let error = error.expect("the sweep of the dead api with the refused request failed");
    assert!(error.contains(&gone), "{error}");
    let dead = system
        .scalar(&format!(
            "SELECT count(*) FROM api_instances
             WHERE id = (SELECT accepted_by FROM requests WHERE id = '{}')",
            requests[0]
        ))
        .await;
    assert_eq!(dead, 1, "the api is kept for a later pass");

    // The queue back and the claim run out: the next pass publishes both, in order.
    ctx.declare_topology().await;
    sqlx::query("UPDATE api_instances SET swept_until = now()")
        .execute(&system.app.db)
        .await
        .unwrap();
    let mut published = 0;
    for _ in 0..5 {
        published += worker::relay::sweeper::sweep_once(&ctx).await.unwrap();
    }
    assert_eq!(published, 2, "both requests of the dead api, again");
    ctx.publisher.close().await;
    ctx.broker.close().await;

    system.spawn_worker().await;
    for request in &requests {
        assert_eq!(system.outcome(request).await, "SUCCEEDED");
    }
    system.wait_until_settled().await;
    for c in [refused_coupon, coupon] {
        assert_eq!(system.assert_coupon_invariants(c).await, 1);
    }
    let _ = connection.close(200, "done".into()).await;
}
