//! `Idempotency-Key` on the synchronous creating POSTs: replay, reuse with another body,
//! and a key whose first request is still in flight.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use testkit::spawn_app;

#[tokio::test]
async fn the_same_key_and_body_replays_the_first_answer_without_a_second_effect() {
    let app = spawn_app().await;
    let first = app
        .post_with_key("/users", json!({ "name": "Han" }), "signup-1")
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(first.headers.get("idempotent-replayed").is_none());

    let again = app
        .post_with_key("/users", json!({ "name": "Han" }), "signup-1")
        .await;
    assert_eq!(again.status, StatusCode::CREATED);
    // The same answer, less the token: it is shown once and never kept.
    let mut shown_once = first.body.clone();
    assert!(shown_once["token"].is_string());
    shown_once.as_object_mut().unwrap().remove("token");
    assert_eq!(again.body, shown_once);
    assert_eq!(again.headers.get("idempotent-replayed").unwrap(), "true");

    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(users, 1);
}

#[tokio::test]
async fn a_replayed_charge_is_applied_once() {
    let app = spawn_app().await;
    let user = app.create_user("Yoon").await;
    let path = format!("/users/{user}/balance/charge");
    let first = app
        .post_with_key(&path, json!({ "amount": 700 }), "charge-a")
        .await;
    let second = app
        .post_with_key(&path, json!({ "amount": 700 }), "charge-a")
        .await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.body, first.body);
    assert_eq!(second.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(app.balance(user).await, 700);
}

#[tokio::test]
async fn a_key_reused_with_another_body_is_refused() {
    let app = spawn_app().await;
    let user = app.create_user("Kang").await;
    let path = format!("/users/{user}/balance/charge");
    assert_eq!(
        app.post_with_key(&path, json!({ "amount": 100 }), "k")
            .await
            .status,
        StatusCode::OK
    );
    let reused = app.post_with_key(&path, json!({ "amount": 200 }), "k").await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.code(), "ERR_IDEMPOTENCY_KEY_REUSED");
    assert_eq!(app.balance(user).await, 100);
}

#[tokio::test]
async fn keys_of_different_users_do_not_collide() {
    let app = spawn_app().await;
    let a = app.create_user("A").await;
    let b = app.create_user("B").await;
    for (user, amount) in [(a, 10), (b, 20)] {
        let answer = app
            .post_with_key(
                &format!("/users/{user}/balance/charge"),
                json!({ "amount": amount }),
                "same-key",
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    assert_eq!(app.balance(a).await, 10);
    assert_eq!(app.balance(b).await, 20);
}

#[tokio::test]
async fn a_key_still_in_flight_answers_409_until_it_is_stale() {
    let app = spawn_app().await;
    // What a request that is being handled right now leaves in the table: a claim with no response.
    sqlx::query("INSERT INTO idempotency_keys (scope, key, request) VALUES ('POST /users', 'busy', $1)")
        .bind(json!({ "name": "Seo" }))
        .execute(&app.db)
        .await
        .unwrap();
    let busy = app
        .post_with_key("/users", json!({ "name": "Seo" }), "busy")
        .await;
    assert_eq!(busy.status, StatusCode::CONFLICT);
    assert_eq!(busy.code(), "ERR_IDEMPOTENCY_KEY_IN_USE");
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(users, 0);

    // A claim left by a process that crashed is taken over once stale.
    sqlx::query("UPDATE idempotency_keys SET locked_at = now() - interval '5 minutes'")
        .execute(&app.db)
        .await
        .unwrap();
    let retaken = app
        .post_with_key("/users", json!({ "name": "Seo" }), "busy")
        .await;
    assert_eq!(retaken.status, StatusCode::CREATED);
    let replay = app
        .post_with_key("/users", json!({ "name": "Seo" }), "busy")
        .await;
    assert_eq!(replay.body["userId"], retaken.body["userId"]);
    assert_eq!(replay.body["name"], retaken.body["name"]);
}

#[tokio::test]
async fn a_refused_request_is_replayed_as_refused() {
    let app = spawn_app().await;
    let user = app.create_user("Full").await;
    // At the cap, so that the charge is refused in its transaction (and the refusal saved).
    sqlx::query("UPDATE balances SET amount = 1000000000 WHERE user_id = $1")
        .bind(user)
        .execute(&app.db)
        .await
        .unwrap();
    let path = &format!("/users/{user}/balance/charge");
    let first = app.post_with_key(path, json!({ "amount": 5 }), "ghost").await;
    assert_eq!(first.code(), "ERR_BALANCE_INVALID_AMOUNT");
    let again = app.post_with_key(path, json!({ "amount": 5 }), "ghost").await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);
    assert_eq!(again.body, first.body);
    assert_eq!(again.headers.get("idempotent-replayed").unwrap(), "true");
}

#[tokio::test]
async fn concurrent_requests_with_one_key_apply_the_effect_once() {
    let app = spawn_app().await;
    let user = app.create_user("Lim").await;
    let path = format!("/users/{user}/balance/charge");
    let answers =
        futures::future::join_all((0..20).map(|_| app.post_with_key(&path, json!({ "amount": 50 }), "once")))
            .await;
    for answer in &answers {
        assert!(
            answer.status == StatusCode::OK || answer.code() == "ERR_IDEMPOTENCY_KEY_IN_USE",
            "{answer:?}"
        );
    }
    assert!(answers.iter().any(|a| a.status == StatusCode::OK));
    assert_eq!(app.balance(user).await, 50);
}

/// Found in review: a request slower than the stale-claim age had its claim taken over by
/// the client's retry, and both then committed: a charge applied twice. Now only the
/// request that holds the claim when it commits applies its effect; the slow one rolls back
/// and answers 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_whose_claim_was_taken_over_applies_nothing() {
    let app = spawn_app().await;
    let user = app.create_user("Kim").await;
    let path = format!("/users/{user}/balance/charge");
    let charge = || {
        let (client, url, token) = (
            reqwest::Client::new(),
            app.url(&path),
            app.token_of(user).unwrap(),
        );
        tokio::spawn(async move {
            let response = client
                .post(url)
                .bearer_auth(token)
                .header("Idempotency-Key", "slow")
                .json(&json!({ "amount": 1_000 }))
                .send()
                .await
                .unwrap();
            testkit::read(response).await
        })
    };
    let claim_age = || async {
        sqlx::query_scalar::<_, Option<f64>>(
            "SELECT extract(epoch FROM now() - locked_at)::float8 FROM idempotency_keys WHERE key = 'slow'",
        )
        .fetch_optional(&app.db)
        .await
        .unwrap()
        .flatten()
    };
    let wait_for_claim = || async {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while !claim_age().await.is_some_and(|age| age < 30.0) {
            assert!(tokio::time::Instant::now() < deadline, "no fresh claim");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };

    // The balance row is held, so the first charge claims its key and then waits...
    let mut blocker = app.db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM balances WHERE user_id = $1 FOR UPDATE")
        .bind(user)
        .execute(&mut *blocker)
        .await
        .unwrap();
    let first = charge();
    wait_for_claim().await;
    // ...longer than a claim may live: its claim looks abandoned, and the retry takes it.
    sqlx::query("UPDATE idempotency_keys SET locked_at = now() - interval '5 minutes' WHERE key = 'slow'")
        .execute(&app.db)
        .await
        .unwrap();
    let retry = charge();
    wait_for_claim().await;
    blocker.rollback().await.unwrap();

    let (first, retry) = (first.await.unwrap(), retry.await.unwrap());
    assert_eq!(first.status, StatusCode::CONFLICT, "{first:?}");
    assert_eq!(first.code(), "ERR_IDEMPOTENCY_KEY_IN_USE");
    assert_eq!(retry.status, StatusCode::OK, "{retry:?}");
    assert_eq!(app.balance(user).await, 1_000, "charged once");
    let ledger: i64 = sqlx::query_scalar("SELECT count(*) FROM balance_transactions WHERE user_id = $1")
        .bind(user)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(ledger, 1);
    let replay = app.post_with_key(&path, json!({ "amount": 1_000 }), "slow").await;
    assert_eq!(replay.body, retry.body);
}

/// Found in review: the asynchronous commands name their user in the body, and their keys
/// were scoped by the route alone, so a second user who happened to send the same key was
/// answered 422 `ERR_IDEMPOTENCY_KEY_REUSED` (and its command never taken). The contract
/// keys are "for the same user and route".
#[tokio::test]
async fn command_keys_of_different_users_do_not_collide() {
    let app = spawn_app().await;
    let [a, b] = [app.create_user("A").await, app.create_user("B").await];
    let coupon = app
        .create_coupon(json!({
            "name": "Shared", "discountType": "FIXED", "discountValue": 100,
            "totalQuantity": 10, "expiresAt": (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339(),
        }))
        .await;
    let product = app.create_product("Mug", 1_000, 10).await;

    // Each user's command under the same key is its own: accepted, a request of its own,
    // and replayed to its own sender.
    let accepted_once_each = async |path: &str, body: &dyn Fn(i64) -> serde_json::Value| {
        let mut answers = Vec::new();
        for user in [a, b] {
            let first = app.post_with_key(path, body(user), "shared-key").await;
            assert_eq!(first.status, StatusCode::ACCEPTED, "{path}: {first:?}");
            // Until the api has recorded the broker's confirm, a replay answers 409.
            let again = app
                .eventually(StatusCode::ACCEPTED, Duration::from_secs(30), || {
                    app.post_with_key(path, body(user), "shared-key")
                })
                .await;
            assert_eq!(again.body, first.body, "{path}");
            assert_eq!(again.headers["idempotent-replayed"], "true");
            answers.push(first);
        }
        assert_ne!(
            answers[0].body["requestId"], answers[1].body["requestId"],
            "{path}"
        );
        answers
    };
    accepted_once_each(
        &format!("/coupons/{coupon}/issue"),
        &|user| json!({ "userId": user }),
    )
    .await;
    let orders = accepted_once_each(
        "/orders",
        &|user| json!({ "userId": user, "items": [{ "productId": product, "quantity": 1 }] }),
    )
    .await;
    // Paying: each user's own order, under the same key and the same path shape.
    for (user, order) in [a, b].into_iter().zip(&orders) {
        let path = format!("/orders/{}/payment", order.body["orderId"].as_str().unwrap());
        let paid = app
            .post_with_key(&path, json!({ "userId": user }), "shared-pay-key")
            .await;
        assert_eq!(paid.status, StatusCode::ACCEPTED, "{paid:?}");
    }
    let requests: i64 = sqlx::query_scalar("SELECT count(*) FROM requests")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(requests, 6, "two issues, two orders, two payments");

    // A key is still one request per user: the same user with another body is refused.
    let reused = app
        .post_with_key(
            "/orders",
            json!({ "userId": a, "items": [{ "productId": product, "quantity": 2 }] }),
            "shared-key",
        )
        .await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY, "{reused:?}");
    assert_eq!(reused.code(), "ERR_IDEMPOTENCY_KEY_REUSED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_right_after_a_202_gets_that_202_on_this_replica_and_another() {
    let app = spawn_app().await;
    let user = app.create_user("Replayer").await;
    let coupon = app
        .create_coupon(json!({
            "name": "R", "discountType": "FIXED", "discountValue": 100, "totalQuantity": 10,
            "expiresAt": (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339(),
        }))
        .await;
    let path = format!("/coupons/{coupon}/issue");
    let body = json!({ "userId": user });
    let first = app.post_with_key(&path, body.clone(), "at-once").await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{first:?}");
    // As a client would: the same request again as soon as the answer is in.
    for attempt in 0..30 {
        let again = app.post_with_key(&path, body.clone(), "at-once").await;
        assert_eq!(again.status, StatusCode::ACCEPTED, "replay {attempt}: {again:?}");
        assert_eq!(again.body["requestId"], first.body["requestId"]);
        assert_eq!(again.headers["idempotent-replayed"], "true");
    }

    // The first answer of an order creation, replayed at once by another api process.
    let (mut replica, other) = app.second_replica(env!("CARGO_BIN_EXE_api")).await;
    let product = app.create_product("Pen", 1_000, 10).await;
    let order = json!({ "userId": user, "items": [{ "productId": product, "quantity": 1 }] });
    let created = app.post_with_key("/orders", order.clone(), "order-once").await;
    assert_eq!(created.status, StatusCode::ACCEPTED, "{created:?}");
    let token = app.token_of(user).unwrap();
    let elsewhere = reqwest::Client::new()
        .post(format!("http://{other}/orders"))
        .bearer_auth(token)
        .header("Idempotency-Key", "order-once")
        .json(&order)
        .send()
        .await
        .unwrap();
    let elsewhere = testkit::read(elsewhere).await;
    assert_eq!(elsewhere.status, StatusCode::ACCEPTED, "{elsewhere:?}");
    assert_eq!(elsewhere.body["requestId"], created.body["requestId"]);
    assert_eq!(elsewhere.body["orderId"], created.body["orderId"]);
    let requests: i64 = sqlx::query_scalar("SELECT count(*) FROM requests")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(requests, 2, "one issue and one order, each stored once");
    replica.kill().await.unwrap();
}
