//! `POST /admin/batch/consistency-audit/run` over the real pipeline: refused without the
//! admin token; a system that settled coupons, orders and payments (their events published
//! and gone from the outbox) is clean; drift planted with SQL is answered by check and id.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use testkit::{System, PATIENCE};
use uuid::Uuid;

const RUN: &str = "/admin/batch/consistency-audit/run";

/// The answer's violations as (check, detail).
fn violations(body: &Value) -> Vec<(String, String)> {
    body["violations"]
        .as_array()
        .unwrap_or_else(|| panic!("no violations list in {body}"))
        .iter()
        .map(|v| {
            let fields = v.as_object().unwrap();
            assert_eq!(fields.len(), 2, "{v}");
            (
                v["check"].as_str().unwrap().to_owned(),
                v["detail"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_finds_a_settled_system_clean_and_names_drift_planted_in_it() {
    let system = System::start(1).await;
    let app = &system.app;

    let refused = app.send_without_token(Method::POST, RUN, None, &[]).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{refused:?}");
    assert_eq!(refused.code(), "ERR_UNAUTHORIZED");
    let wrong = app
        .send_without_token(
            Method::POST,
            RUN,
            None,
            &[("Authorization", "Bearer not-the-admin-token")],
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{wrong:?}");

    // Everything the audit checks, done through the pipeline: a charge, a coupon issued, an
    // order paid with it (an event), an order left reserved.
    let user = app.create_user("Ann").await;
    assert!(app.charge(user, 50_000).await.status.is_success());
    let product = system.product(10_000, 10).await;
    let coupon = system.coupon(5).await;
    let issued = system.issue(coupon, user).await;
    assert_eq!(
        system.outcome(issued.body["requestId"].as_str().unwrap()).await,
        "SUCCEEDED"
    );
    let paid = system.reserved_order(user, &[(product, 2)]).await;
    let payment = system.pay(&paid, user, Some(coupon)).await;
    assert_eq!(
        system.outcome(payment.body["requestId"].as_str().unwrap()).await,
        "SUCCEEDED"
    );
    system.reserved_order(user, &[(product, 1)]).await;
    system.wait_until_settled().await;
    // The relay publishes the event and deletes its row: what is left of it is the order's.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while system.scalar("SELECT count(*) FROM outbox").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the outbox never emptied");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let paid_id = Uuid::parse_str(&paid).unwrap();
    let recorded: Option<Uuid> = sqlx::query_scalar("SELECT paid_event_id FROM orders WHERE id = $1")
        .bind(paid_id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(recorded.is_some(), "the payment recorded no event on its order");

    let clean = app.admin(Method::POST, RUN, json!({})).await;
    assert_eq!(clean.status, StatusCode::OK, "{clean:?}");
    let checked_at = clean.body["checkedAt"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(checked_at).is_ok(),
        "{checked_at}"
    );
    assert_eq!(violations(&clean.body), [], "{:?}", clean.body);

    // Drift: a balance off its ledger, a paid order whose event is no longer recorded.
    let balance = app.balance(user).await;
    sqlx::query("UPDATE balances SET amount = amount + 1 WHERE user_id = $1")
        .bind(user)
        .execute(&app.db)
        .await
        .unwrap();
    sqlx::query("UPDATE orders SET paid_event_id = NULL WHERE id = $1")
        .bind(paid_id)
        .execute(&app.db)
        .await
        .unwrap();
    let drifted = app.admin(Method::POST, RUN, json!({})).await;
    assert_eq!(drifted.status, StatusCode::OK, "{drifted:?}");
    assert_eq!(
        violations(&drifted.body),
        [
            (
                "balance_ledger".to_owned(),
                format!("user {user}: balance {}, ledger {balance}", balance + 1)
            ),
            (
                "order_paid_event".to_owned(),
                format!("order {paid} (PAID): 0 order.paid events [], expected 1")
            ),
        ],
        "{:?}",
        drifted.body
    );
}
