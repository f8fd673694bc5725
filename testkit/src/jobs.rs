//! Helpers of the batch's job tests: a database of the test's own, a configuration pointing
//! at it, and rows fabricated with SQL to stand for order history.

use std::net::SocketAddr;
use std::time::Duration;

use batch::config::Schedules;
use batch::cron::CronSchedule;
use batch::BatchConfig;
use chrono::{DateTime, NaiveDate, Utc};
use shared::config::DatabaseSettings;
use sqlx::PgPool;
use uuid::Uuid;

use crate::database::TestDatabase;

/// A cron that never fires while a test runs (midnight of January 1st), so that only what
/// the test does (or the catch-up at start) runs jobs.
pub const QUIET_CRON: &str = "0 0 0 1 1 *";

/// A fresh, migrated database (dropped when the returned guard goes), and a pool on it for
/// the test's own queries.
pub async fn fresh_database() -> (TestDatabase, PgPool) {
    let url = TestDatabase::create().await;
    let settings = DatabaseSettings::new(url.url(), 5);
    let db = shared::store::db::connect_and_migrate(&settings, "batch-test")
        .await
        .expect("migrated database");
    (url, db)
}

/// The batch's configuration for a test: its database, a free metrics port, every job on
/// the quiet cron.
pub fn config(database_url: &str, name: &str) -> BatchConfig {
    let quiet = CronSchedule::parse(QUIET_CRON).unwrap();
    BatchConfig {
        name: name.to_owned(),
        metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        schedules: Schedules {
            popular_products: quiet.clone(),
            reservation_expiry: quiet.clone(),
            housekeeping: quiet.clone(),
            consistency_audit: quiet,
        },
        catch_up_interval: Duration::from_secs(3600),
        idempotency_key_retention: Duration::from_secs(24 * 3600),
        request_retention: Duration::from_secs(7 * 86_400),
        audit_bounds: Default::default(),
        database: DatabaseSettings::new(database_url, 5),
        telemetry: Default::default(),
    }
}

/// The slot the quiet cron gives a run now.
pub fn quiet_slot() -> DateTime<Utc> {
    CronSchedule::parse(QUIET_CRON)
        .unwrap()
        .latest_slot(Utc::now())
        .unwrap()
}

/// Midnight UTC of `day`, plus `seconds`.
pub fn at(day: NaiveDate, seconds: i64) -> DateTime<Utc> {
    day.and_time(chrono::NaiveTime::MIN).and_utc() + chrono::Duration::seconds(seconds)
}

pub fn days_before(day: NaiveDate, n: u64) -> NaiveDate {
    day.checked_sub_days(chrono::Days::new(n)).unwrap()
}

pub async fn user(db: &PgPool) -> i64 {
    sqlx::query_scalar("INSERT INTO users (name) VALUES ('buyer') RETURNING id")
        .fetch_one(db)
        .await
        .unwrap()
}

pub async fn product(db: &PgPool, name: &str, price: i64, stock: i64) -> i64 {
    sqlx::query_scalar("INSERT INTO products (name, price, stock) VALUES ($1, $2, $3) RETURNING id")
        .bind(name)
        .bind(price)
        .bind(stock)
        .fetch_one(db)
        .await
        .unwrap()
}

/// An order of `lines` (product, quantity) in `status`, created at `when`. A `PAID` order
/// is paid at `when`; other statuses get `paid_at` too, a timestamp they never have in
/// practice, so that only their status keeps them out of the rollup. A `RESERVED` order is
/// held until `reserved_until`.
pub async fn order(
    db: &PgPool,
    user: i64,
    status: &str,
    when: DateTime<Utc>,
    reserved_until: Option<DateTime<Utc>>,
    lines: &[(i64, i64)],
) -> Uuid {
    let id = Uuid::now_v7();
    let mut tx = db.begin().await.unwrap();
    let prices: Vec<(i64, String, i64)> =
        sqlx::query_as("SELECT id, name, price FROM products WHERE id = ANY($1)")
            .bind(lines.iter().map(|(p, _)| *p).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    let price_of = |p: i64| prices.iter().find(|(id, _, _)| *id == p).unwrap().clone();
    let total: i64 = lines.iter().map(|(p, q)| price_of(*p).2 * q).sum();
    let closed = matches!(status, "CANCELLED" | "EXPIRED" | "REJECTED").then_some(when);
    sqlx::query(
        "INSERT INTO orders (id, user_id, status, create_request_id, total_amount, paid_amount,
                             created_at, reserved_until, paid_at, closed_at)
         VALUES ($1, $2, $3, $4, $5, CASE WHEN $3 = 'PAID' THEN $5 ELSE 0 END, $6, $7, $6, $8)",
    )
    .bind(id)
    .bind(user)
    .bind(status)
    .bind(Uuid::now_v7())
    .bind(total)
    .bind(when)
    .bind(reserved_until.or((status == "PAID").then_some(when)))
    .bind(closed)
    .execute(&mut *tx)
    .await
    .unwrap();
    for (p, q) in lines {
        let (_, name, price) = price_of(*p);
        sqlx::query(
            "INSERT INTO order_items (order_id, product_id, name, unit_price, quantity)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(p)
        .bind(name)
        .bind(price)
        .bind(q)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    id
}

pub async fn paid(db: &PgPool, user: i64, when: DateTime<Utc>, lines: &[(i64, i64)]) -> Uuid {
    order(db, user, "PAID", when, None, lines).await
}

/// `job_runs` rows of `job`: (trigger, outcome, period), oldest first.
pub async fn runs_of(db: &PgPool, job: &str) -> Vec<(String, String, DateTime<Utc>)> {
    sqlx::query_as("SELECT trigger, outcome, period FROM job_runs WHERE job = $1 ORDER BY id")
        .bind(job)
        .fetch_all(db)
        .await
        .unwrap()
}

/// The whole rollup: (day, product, quantity, computed_at).
pub async fn rollup(db: &PgPool) -> Vec<(NaiveDate, i64, i64, DateTime<Utc>)> {
    sqlx::query_as(
        "SELECT day, product_id, sold_quantity, computed_at FROM daily_product_sales
         ORDER BY day, product_id",
    )
    .fetch_all(db)
    .await
    .unwrap()
}

/// Snapshots with their items: (as_of, computed_at, [(rank, product, quantity)]).
pub async fn snapshots(db: &PgPool) -> Vec<(NaiveDate, DateTime<Utc>, Vec<(i32, i64, i64)>)> {
    let heads: Vec<(NaiveDate, DateTime<Utc>)> =
        sqlx::query_as("SELECT as_of, computed_at FROM popular_snapshots ORDER BY as_of")
            .fetch_all(db)
            .await
            .unwrap();
    let mut all = Vec::new();
    for (as_of, computed_at) in heads {
        let items = sqlx::query_as(
            "SELECT rank, product_id, sold_quantity FROM popular_snapshot_items
             WHERE as_of = $1 ORDER BY rank",
        )
        .bind(as_of)
        .fetch_all(db)
        .await
        .unwrap();
        all.push((as_of, computed_at, items));
    }
    all
}
