//! `DELETE /requests/{requestId}`: a command its client cancels while it is `PENDING` never
//! takes effect, and one a worker settled first answers `409 ERR_REQUEST_ALREADY_SETTLED`,
//! whatever the race between the two.

use futures::future::join_all;
use reqwest::{Method, StatusCode};
use testkit::System;

async fn cancel(system: &System, user: i64, request: &str) -> testkit::Answer {
    system
        .app
        .send_as(
            Some(user),
            Method::DELETE,
            &format!("/requests/{request}"),
            None,
            &[],
        )
        .await
}

/// Whether `user` holds `coupon`.
async fn holds(system: &System, user: i64, coupon: i64) -> bool {
    system
        .scalar(&format!(
            "SELECT count(*) FROM user_coupons WHERE user_id = {user} AND coupon_id = {coupon}"
        ))
        .await
        == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pending_command_cancelled_never_takes_effect_and_a_settled_one_answers_409() {
    let system = System::start(0).await;
    let coupon = system.coupon(5).await;
    let product = system.product(1_000, 5).await;
    let users = system.app.create_users(3).await;
    let (ann, bob, cat) = (users[0], users[1], users[2]);
    let issued = system.issue(coupon, ann).await;
    assert_eq!(issued.status, StatusCode::ACCEPTED, "{issued:?}");
    let issue = issued.body["requestId"].as_str().unwrap().to_owned();
    let placed = system.order(ann, &[(product, 2)]).await;
    assert_eq!(placed.status, StatusCode::ACCEPTED, "{placed:?}");
    let create = placed.body["requestId"].as_str().unwrap().to_owned();
    let order = placed.body["orderId"].as_str().unwrap().to_owned();

    let cancelled = cancel(&system, ann, &issue).await;
    assert_eq!(cancelled.status, StatusCode::OK, "{cancelled:?}");
    assert_eq!(cancelled.body["status"], "FAILED");
    assert_eq!(cancelled.body["error"]["code"], "ERR_REQUEST_CANCELLED");
    let again = cancel(&system, ann, &issue).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{again:?}");
    assert_eq!(again.code(), "ERR_REQUEST_ALREADY_SETTLED");
    // Another user's request is not revealed.
    let foreign = cancel(&system, bob, &create).await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND, "{foreign:?}");
    assert_eq!(foreign.code(), "ERR_REQUEST_NOT_FOUND");
    let unknown = cancel(&system, ann, &uuid::Uuid::now_v7().to_string()).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{unknown:?}");
    let malformed = cancel(&system, ann, "not-a-uuid").await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST, "{malformed:?}");
    let anonymous = system
        .app
        .send_as(None, Method::DELETE, &format!("/requests/{create}"), None, &[])
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED, "{anonymous:?}");
    // The order a cancelled creation was making is rejected, and holds nothing.
    let cancelled = cancel(&system, ann, &create).await;
    assert_eq!(cancelled.status, StatusCode::OK, "{cancelled:?}");
    let read = system
        .app
        .get_as(ann, &format!("/users/{ann}/orders/{order}"))
        .await;
    assert_eq!(read.body["status"], "REJECTED", "{read:?}");

    // The workers get both messages and apply neither; a later command settles as usual.
    system.spawn_worker().await;
    let later = system.issue(coupon, cat).await;
    let later = later.body["requestId"].as_str().unwrap().to_owned();
    assert_eq!(system.outcome(&later).await, "SUCCEEDED");
    system.wait_until_settled().await;
    assert!(
        !holds(&system, ann, coupon).await,
        "a cancelled issue took effect"
    );
    assert!(holds(&system, cat, coupon).await);
    assert_eq!(system.assert_coupon_invariants(coupon).await, 1);
    assert_eq!(system.assert_stock_reconciles(product, 5).await, (5, 0, 0));
    let settled = cancel(&system, cat, &later).await;
    assert_eq!(settled.status, StatusCode::CONFLICT, "{settled:?}");
    assert_eq!(settled.code(), "ERR_REQUEST_ALREADY_SETTLED");
}

/// 200 issues while two workers settle them, half cancelled as soon as they are accepted:
/// each cancellation either wins (the request fails cancelled and the user holds nothing) or
/// loses to the worker (409, and the coupon was issued), never both and never neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancellations_racing_the_workers_are_each_all_or_nothing() {
    let system = System::start(2).await;
    system.wait_for_owners(2).await;
    let coupon = system.coupon(1_000).await;
    let users = system.app.create_users(200).await;
    let outcomes = join_all(users.iter().enumerate().map(|(i, &user)| {
        let system = &system;
        async move {
            let issued = system.issue(coupon, user).await;
            assert_eq!(issued.status, StatusCode::ACCEPTED, "{issued:?}");
            let request = issued.body["requestId"].as_str().unwrap().to_owned();
            let cancelled = if i % 2 == 0 {
                Some(cancel(system, user, &request).await.status)
            } else {
                None
            };
            (user, request, cancelled)
        }
    }))
    .await;
    system.wait_until_settled().await;

    let (mut won, mut lost) = (0, 0);
    for (user, request, cancelled) in &outcomes {
        let (status, code): (String, Option<String>) =
            sqlx::query_as("SELECT status, error->>'code' FROM requests WHERE id = $1::uuid")
                .bind(request)
                .fetch_one(&system.app.db)
                .await
                .unwrap();
        let held = holds(&system, *user, coupon).await;
        match cancelled {
            Some(StatusCode::OK) => {
                won += 1;
                assert_eq!(
                    (status.as_str(), code.as_deref(), held),
                    ("FAILED", Some("ERR_REQUEST_CANCELLED"), false)
                );
            }
            Some(StatusCode::CONFLICT) => {
                lost += 1;
                assert_eq!((status.as_str(), held), ("SUCCEEDED", true));
            }
            Some(other) => panic!("a cancellation answered {other}"),
            None => assert_eq!((status.as_str(), held), ("SUCCEEDED", true)),
        }
    }
    assert_eq!(won + lost, 100);
    eprintln!("cancellations: {won} before the worker, {lost} after it");
    let issued = system.assert_coupon_invariants(coupon).await;
    assert_eq!(issued, 200 - won);
}
