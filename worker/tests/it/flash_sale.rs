//! The first-come coupon flash sale through the whole pipeline: the HTTP API, RabbitMQ,
//! several worker processes, PostgreSQL.

use std::collections::HashMap;

use reqwest::StatusCode;
use testkit::System;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_users_race_for_a_hundred_coupons() {
    let system = System::start(2).await;
    system.wait_for_owners(2).await;
    let coupon = system.coupon(100).await;
    let users = system.app.create_users(1_000).await;

    let answers = futures::future::join_all(users.iter().map(|&user| system.issue(coupon, user))).await;
    for answer in &answers {
        // Accepted, or refused at once because the sale was already over.
        assert!(
            answer.status == StatusCode::ACCEPTED || answer.code() == "ERR_COUPON_OUT_OF_STOCK",
            "{answer:?}"
        );
    }
    system.wait_until_settled().await;

    assert_eq!(system.assert_coupon_invariants(coupon).await, 100);
    let outcomes: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT status, error->>'code' FROM requests WHERE kind = 'COUPON_ISSUE'")
            .fetch_all(&system.app.db)
            .await
            .unwrap();
    let accepted = answers
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .count();
    assert_eq!(outcomes.len(), accepted, "every 202 has its request");
    for (status, code) in &outcomes {
        match status.as_str() {
            "SUCCEEDED" => {}
            "FAILED" => assert_eq!(code.as_deref(), Some("ERR_COUPON_OUT_OF_STOCK")),
            other => panic!("request left {other}"),
        }
    }
    // Every accepted request reads terminal through the API too, with its result.
    for answer in answers
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .take(50)
    {
        let url = answer.headers["location"].to_str().unwrap();
        let status = system.app.get(url).await;
        assert_ne!(status.body["status"], "PENDING");
        if status.body["status"] == "SUCCEEDED" {
            assert_eq!(status.body["result"]["couponId"], coupon);
            assert!(status.body["result"]["userCouponId"].as_str().is_some());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_user_asking_twenty_times_at_once_gets_one_coupon() {
    let system = System::start(2).await;
    let coupon = system.coupon(10).await;
    let user = system.app.create_users(1).await[0];

    let answers = futures::future::join_all((0..20).map(|_| system.issue(coupon, user))).await;
    let mut request_ids = Vec::new();
    for answer in &answers {
        match answer.status {
            StatusCode::ACCEPTED => request_ids.push(answer.body["requestId"].as_str().unwrap().to_owned()),
            _ => assert_eq!(answer.code(), "ERR_COUPON_ALREADY_ACQUIRED", "{answer:?}"),
        }
    }
    system.wait_until_settled().await;

    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for id in &request_ids {
        let answer = system.app.get(&format!("/requests/{id}")).await;
        let outcome = match answer.body["status"].as_str().unwrap() {
            "SUCCEEDED" => "SUCCEEDED".to_owned(),
            _ => answer.body["error"]["code"].as_str().unwrap().to_owned(),
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    assert_eq!(outcomes.remove("SUCCEEDED"), Some(1), "{outcomes:?}");
    assert!(
        outcomes.keys().all(|code| code == "ERR_COUPON_ALREADY_ACQUIRED"),
        "{outcomes:?}"
    );
    assert_eq!(system.assert_coupon_invariants(coupon).await, 1);
    let held = system.app.get(&format!("/users/{user}/coupons")).await;
    assert_eq!(held.body["items"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coupons_go_to_the_first_requests_in_the_order_the_broker_accepted_them() {
    let system = System::start(2).await;
    let coupon = system.coupon(10).await;
    let users = system.app.create_users(30).await;
    // One after another: each 202 means the broker confirmed it before the next was sent.
    let mut accepted = Vec::new();
    for &user in &users {
        let answer = system.issue(coupon, user).await;
        if answer.status == StatusCode::ACCEPTED {
            accepted.push(user);
        } else {
            assert_eq!(answer.code(), "ERR_COUPON_OUT_OF_STOCK", "{answer:?}");
        }
    }
    system.wait_until_settled().await;
    let winners: Vec<i64> =
        sqlx::query_scalar("SELECT user_id FROM user_coupons WHERE coupon_id = $1 ORDER BY user_id")
            .bind(coupon)
            .fetch_all(&system.app.db)
            .await
            .unwrap();
    assert_eq!(winners, users[..10].to_vec());
}
