//! Answers without polling: a command sent with `Prefer: respond-async, wait=N` is answered
//! `200` with its settled request, and `GET /requests/{id}?wait=N` returns once the request
//! settles, woken by the workers' notice (also on another api process), never by polling.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use testkit::System;

const PREFER: (&str, &str) = ("Prefer", "respond-async, wait=20");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_that_waits_is_answered_with_its_settled_request() {
    let system = System::start(1).await;
    system.wait_for_owners(1).await;
    let user = system.app.create_users(1).await[0];
    assert_eq!(system.app.charge(user, 100_000).await.status, StatusCode::OK);
    let product = system.product(10_000, 5).await;
    let coupon = system.coupon(5).await;

    let issued = system
        .app
        .send(
            Method::POST,
            &format!("/coupons/{coupon}/issue"),
            Some(json!({ "userId": user })),
            &[PREFER],
        )
        .await;
    assert_eq!(issued.status, StatusCode::OK, "{issued:?}");
    assert_eq!(issued.headers["preference-applied"], "wait=20");
    assert_eq!(issued.body["status"], "SUCCEEDED");
    assert_eq!(issued.body["result"]["couponId"], coupon);

    let order = json!({ "userId": user, "items": [{ "productId": product, "quantity": 2 }] });
    let created = system
        .app
        .send(Method::POST, "/orders", Some(order), &[PREFER])
        .await;
    assert_eq!(created.status, StatusCode::OK, "{created:?}");
    assert_eq!(created.body["type"], "ORDER_CREATE");
    assert_eq!(created.body["result"]["status"], "RESERVED");
    let order_id = created.body["orderId"].as_str().unwrap().to_owned();
    assert_eq!(created.body["result"]["orderId"], order_id.as_str());

    let paid = system
        .app
        .send(
            Method::POST,
            &format!("/orders/{order_id}/payment"),
            Some(json!({ "userId": user, "couponId": coupon })),
            &[PREFER],
        )
        .await;
    assert_eq!(paid.status, StatusCode::OK, "{paid:?}");
    assert_eq!(paid.body["status"], "SUCCEEDED");
    assert_eq!(paid.body["result"]["orderId"], order_id.as_str());

    // A refusal settled by the worker is an answer too: out of stock.
    let too_many = json!({ "userId": user, "items": [{ "productId": product, "quantity": 4 }] });
    let refused = system
        .app
        .send(Method::POST, "/orders", Some(too_many), &[PREFER])
        .await;
    assert_eq!(refused.status, StatusCode::OK, "{refused:?}");
    assert_eq!(refused.body["status"], "FAILED");
    assert_eq!(refused.body["error"]["code"], "ERR_ORDER_OUT_OF_STOCK");
    system.assert_money_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiting_client_is_woken_when_its_request_settles_on_this_replica_and_another() {
    // Waiters read again only once a minute without a notice: a prompt answer is a wake-up.
    let system = System::start_with(0, |config| config.request_wait_poll = Duration::from_secs(60)).await;
    let user = system.app.create_users(1).await[0];
    let coupon = system.coupon(5).await;
    let accepted = system.issue(coupon, user).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{accepted:?}");
    let request = accepted.body["requestId"].as_str().unwrap().to_owned();

    // Nobody settles it yet: a short wait answers it still PENDING.
    let pending = system.app.get(&format!("/requests/{request}?wait=1")).await;
    assert_eq!(pending.status, StatusCode::OK);
    assert_eq!(pending.body["status"], "PENDING");
    assert!(pending.headers.contains_key("retry-after"));

    // Two waiters: one on this api, one on another api process (the api binary, built by
    // the workspace's tests next to the worker's).
    let api_binary = std::path::Path::new(env!("CARGO_BIN_EXE_worker")).with_file_name("api");
    assert!(
        api_binary.exists(),
        "build the api binary first: {}",
        api_binary.display()
    );
    let (mut replica, other) = system.app.second_replica(api_binary.to_str().unwrap()).await;
    let token = system.app.token_of(user).unwrap();
    let waiting_path = format!("/requests/{request}?wait=30");
    let here = system.app.get(&waiting_path);
    let elsewhere = async {
        let answer = reqwest::Client::new()
            .get(format!("http://{other}/requests/{request}?wait=30"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        testkit::read(answer).await
    };
    let settle = async {
        // Both are waiting by now (generously); then a worker comes and settles it. A fixed
        // wait: neither wait can be seen from here (the other replica's metrics port is its
        // own pick, and this process's gauge is shared with the binary's other tests).
        tokio::time::sleep(Duration::from_secs(2)).await;
        system.spawn_worker().await
    };
    let (here, elsewhere, _) = tokio::join!(here, elsewhere, settle);
    // Settled well within the 30 s asked for, and without the 60 s poll: only a wake-up
    // answers SUCCEEDED here.
    for answer in [&here, &elsewhere] {
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        assert_eq!(answer.body["status"], "SUCCEEDED", "{answer:?}");
    }
    replica.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wait_outside_one_to_thirty_seconds_is_refused() {
    let system = System::start(0).await;
    let user = system.app.create_users(1).await[0];
    let coupon = system.coupon(5).await;
    let accepted = system.issue(coupon, user).await;
    let request = accepted.body["requestId"].as_str().unwrap().to_owned();
    for wait in ["0", "31", "soon", "-1"] {
        let answer = system.app.get(&format!("/requests/{request}?wait={wait}")).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{wait}: {answer:?}");
        assert_eq!(answer.code(), "ERR_INVALID_REQUEST");
    }
    // A command that waits and is not settled in time gets its 202, and stays accepted.
    let other = system.app.create_users(1).await[0];
    let answer = system
        .app
        .send(
            Method::POST,
            &format!("/coupons/{coupon}/issue"),
            Some(json!({ "userId": other })),
            &[("Prefer", "respond-async, wait=1")],
        )
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    assert!(answer.headers.get("preference-applied").is_none());
}
