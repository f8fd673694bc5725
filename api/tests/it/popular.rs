//! `GET /products/popular` and `POST /admin/batch/popular-products/run`: filters, errors,
//! the admin token, and answers served from the batch's rollup and snapshot.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use testkit::{spawn_app, Answer, TestApp};
use uuid::Uuid;

fn days_before(day: NaiveDate, n: u64) -> NaiveDate {
    day.checked_sub_days(chrono::Days::new(n)).unwrap()
}

fn noon(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(12, 0, 0).unwrap().and_utc()
}

async fn product(app: &TestApp, name: &str, price: i64) -> i64 {
    sqlx::query_scalar("INSERT INTO products (name, price, stock) VALUES ($1, $2, 1000) RETURNING id")
        .bind(name)
        .bind(price)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// An order of one line, in `status`, created (and, when `PAID`, paid) at `when`.
async fn order(app: &TestApp, status: &str, when: DateTime<Utc>, product: i64, quantity: i64) {
    let user: i64 = sqlx::query_scalar("INSERT INTO users (name) VALUES ('buyer') RETURNING id")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let (name, price): (String, i64) = sqlx::query_as("SELECT name, price FROM products WHERE id = $1")
        .bind(product)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let id = Uuid::now_v7();
    let paid = status == "PAID";
    sqlx::query(
        "INSERT INTO orders (id, user_id, status, create_request_id, total_amount, paid_amount,
                             created_at, reserved_until, paid_at, closed_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(id)
    .bind(user)
    .bind(status)
    .bind(Uuid::now_v7())
    .bind(price * quantity)
    .bind(if paid { price * quantity } else { 0 })
    .bind(when)
    .bind((status == "RESERVED").then(|| Utc::now() + chrono::Duration::minutes(10)))
    .bind(paid.then_some(when))
    .bind(matches!(status, "CANCELLED" | "EXPIRED").then_some(when))
    .execute(&app.db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO order_items (order_id, product_id, name, unit_price, quantity) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(product)
    .bind(name)
    .bind(price)
    .bind(quantity)
    .execute(&app.db)
    .await
    .unwrap();
}

/// Products a..f and their sales around `today` (D):
/// a: D-1 4, D-3 4 = 8 · b: D-2 8 (ties a) · c: D-1 6, cancelled 90, expired 90, reserved 90
/// · d: D-5 50, today 50 · e: D-2 1 · f: D-4 3.
async fn fabricate(app: &TestApp, today: NaiveDate) -> Vec<i64> {
    let mut ids = Vec::new();
    for (i, name) in ["a", "b", "c", "d", "e", "f"].iter().enumerate() {
        ids.push(product(app, name, 1_000 * (i as i64 + 1)).await);
    }
    let d = |n| noon(days_before(today, n));
    order(app, "PAID", d(1), ids[0], 4).await;
    order(app, "PAID", d(3), ids[0], 4).await;
    order(app, "PAID", d(2), ids[1], 8).await;
    order(app, "PAID", d(1), ids[2], 6).await;
    order(app, "CANCELLED", d(1), ids[2], 90).await;
    order(app, "EXPIRED", d(2), ids[2], 90).await;
    order(app, "RESERVED", d(1), ids[2], 90).await;
    order(app, "PAID", d(5), ids[3], 50).await;
    order(
        app,
        "PAID",
        today.and_hms_opt(0, 0, 0).unwrap().and_utc(),
        ids[3],
        50,
    )
    .await;
    order(app, "PAID", d(2), ids[4], 1).await;
    order(app, "PAID", d(4), ids[5], 3).await;
    ids
}

/// (rank, productId, soldQuantity) of an answer's items.
fn items(answer: &Answer) -> Vec<(i64, i64, i64)> {
    answer.body["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {answer:?}"))
        .iter()
        .map(|i| {
            (
                i["rank"].as_i64().unwrap(),
                i["productId"].as_i64().unwrap(),
                i["soldQuantity"].as_i64().unwrap(),
            )
        })
        .collect()
}

async fn run_now(app: &TestApp) -> Answer {
    app.admin(Method::POST, "/admin/batch/popular-products/run", json!({}))
        .await
}

#[tokio::test]
async fn before_any_run_the_ranking_is_an_empty_list_over_the_days_before_today() {
    let app = spawn_app().await;
    let today = Utc::now().date_naive();
    let answer = app.get("/products/popular").await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(
        answer.body,
        json!({
            "from": days_before(today, 3).to_string(),
            "to": days_before(today, 1).to_string(),
            "computedAt": null,
            "items": []
        })
    );
    let week = app.get("/products/popular?days=7&limit=50").await;
    assert_eq!(week.status, StatusCode::OK);
    assert_eq!(week.body["from"], json!(days_before(today, 7).to_string()));
    assert_eq!(week.body["items"], json!([]));
}

#[tokio::test]
async fn filters_out_of_range_or_not_numbers_are_refused() {
    let app = spawn_app().await;
    for query in [
        "days=0",
        "days=31",
        "days=-1",
        "days=abc",
        "days=",
        "days=2.5",
        "days=99999999999999999999",
        "limit=0",
        "limit=51",
        "limit=ten",
        "limit=",
        "days=3&days=4",
        "days=3&limit=0",
    ] {
        let answer = app.get(&format!("/products/popular?{query}")).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{query}: {answer:?}");
        assert_eq!(answer.code(), "ERR_POPULAR_INVALID_FILTER", "{query}");
        assert!(answer.body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

#[tokio::test]
async fn filters_at_the_edges_of_their_ranges_are_accepted() {
    let app = spawn_app().await;
    for query in [
        "days=1",
        "days=30",
        "limit=1",
        "limit=50",
        "days=30&limit=50",
        "unknown=1",
    ] {
        let answer = app.get(&format!("/products/popular?{query}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{query}: {answer:?}");
    }
}

#[tokio::test]
async fn the_admin_run_needs_the_admin_token() {
    let app = spawn_app().await;
    let anonymous = app
        .send(Method::POST, "/admin/batch/popular-products/run", None, &[])
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(anonymous.code(), "ERR_UNAUTHORIZED");
    let wrong = app
        .send(
            Method::POST,
            "/admin/batch/popular-products/run",
            None,
            &[("Authorization", "Bearer not-the-token")],
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM job_runs")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(runs, 0, "nothing ran");
}

#[tokio::test]
async fn the_admin_run_returns_the_ranking_that_the_endpoint_then_serves() {
    let app = spawn_app().await;
    let today = Utc::now().date_naive();
    let p = fabricate(&app, today).await;
    // Read (and cached) before the run: empty.
    assert_eq!(items(&app.get("/products/popular").await), vec![]);

    let run = run_now(&app).await;
    assert_eq!(run.status, StatusCode::OK, "{run:?}");
    assert_eq!(
        items(&run),
        vec![(1, p[0], 8), (2, p[1], 8), (3, p[2], 6), (4, p[4], 1)],
        "paid units over D-3..D-1, ties to the lower id; cancelled, expired, reserved and other days left out"
    );
    assert_eq!(run.body["from"], json!(days_before(today, 3).to_string()));
    assert_eq!(run.body["to"], json!(days_before(today, 1).to_string()));
    assert!(run.body["computedAt"].is_string(), "{run:?}");
    assert_eq!(
        run.body["items"][0],
        json!({"rank": 1, "productId": p[0], "name": "a", "price": 1000, "soldQuantity": 8})
    );

    // The cached empty answer gives way to the new snapshot within the cache's check interval.
    let served = app
        .eventually(StatusCode::OK, Duration::from_secs(10), || async {
            let answer = app.get("/products/popular?days=3&limit=5").await;
            if answer.body["computedAt"] == run.body["computedAt"] {
                answer
            } else {
                Answer {
                    status: StatusCode::ACCEPTED,
                    ..answer
                }
            }
        })
        .await;
    assert_eq!(served.body, run.body);

    let runs: Vec<(String, String)> =
        sqlx::query_as("SELECT trigger, outcome FROM job_runs WHERE job = 'popular-products'")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(runs, vec![("ADMIN".to_owned(), "SUCCEEDED".to_owned())]);
}

#[tokio::test]
async fn other_filters_are_summed_from_the_rollup_over_their_own_window() {
    let app = spawn_app().await;
    let today = Utc::now().date_naive();
    let p = fabricate(&app, today).await;
    assert_eq!(run_now(&app).await.status, StatusCode::OK);

    let five = app.get("/products/popular?days=5&limit=3").await;
    assert_eq!(five.status, StatusCode::OK, "{five:?}");
    assert_eq!(five.body["from"], json!(days_before(today, 5).to_string()));
    assert_eq!(five.body["to"], json!(days_before(today, 1).to_string()));
    assert_eq!(items(&five), vec![(1, p[3], 50), (2, p[0], 8), (3, p[1], 8)]);

    let one = app.get("/products/popular?days=1&limit=50").await;
    assert_eq!(items(&one), vec![(1, p[2], 6), (2, p[0], 4)]);
    assert_eq!(one.body["from"], one.body["to"]);
}

#[tokio::test]
async fn answers_come_from_the_batch_s_figures_not_from_orders() {
    let app = spawn_app().await;
    let today = Utc::now().date_naive();
    let p = fabricate(&app, today).await;
    assert_eq!(run_now(&app).await.status, StatusCode::OK);
    // Paid after the run: not counted until the next run, even by a filter never asked before.
    order(&app, "PAID", noon(days_before(today, 1)), p[5], 1_000).await;
    let before = app.get("/products/popular?days=2&limit=5").await;
    assert_eq!(
        items(&before),
        vec![(1, p[1], 8), (2, p[2], 6), (3, p[0], 4), (4, p[4], 1)]
    );

    assert_eq!(run_now(&app).await.status, StatusCode::OK);
    let after = app
        .eventually(StatusCode::OK, Duration::from_secs(10), || async {
            let answer = app.get("/products/popular?days=2&limit=5").await;
            if answer.body["items"][0]["productId"] == json!(p[5]) {
                answer
            } else {
                Answer {
                    status: StatusCode::ACCEPTED,
                    ..answer
                }
            }
        })
        .await;
    assert_eq!(items(&after)[0], (1, p[5], 1_000));
}

#[tokio::test]
async fn the_openapi_document_lists_the_popular_routes() {
    let app = spawn_app().await;
    let document = app.get("/openapi.json").await;
    let paths: &Value = &document.body["paths"];
    assert!(paths["/products/popular"]["get"].is_object(), "{paths}");
    assert!(
        paths["/admin/batch/popular-products/run"]["post"].is_object(),
        "{paths}"
    );
}
