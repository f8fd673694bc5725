//! The sales rollup and the popular-products ranking, computed by the batch's job from
//! order history fabricated over five days and more.

use testkit::jobs;

use batch::{Job, Outcome, Runner};
use chrono::{NaiveDate, Utc};
use shared::domain::popular::{Filter, Window};
use sqlx::PgPool;
use testkit::jobs::{at, days_before, order, paid, user};

/// Products of the fabricated history, in id order (so `p[0]` has the lowest id).
struct History {
    p: Vec<i64>,
}

/// Sales around `today` (D). The default window is D-3 ..= D-1.
///
/// | product | in the window (paid)            | outside or not paid                   |
/// |---------|---------------------------------|---------------------------------------|
/// | p0      | D-1: 5, D-3: 5 = 10             | D-4: 100                              |
/// | p1      | D-2: 10 = 10 (ties with p0)     |                                       |
/// | p2      | D-1: 3, D-1 23:59:59.999: 1 = 4 | cancelled, expired, rejected, reserved, pending: 50 each |
/// | p3      | nothing                         | D-5: 100, today (D 00:00:00): 100     |
/// | p4      | D-2: 7 (one order with p5)      |                                       |
/// | p5      | D-2: 3, D-3: 4 = 7 (ties p4)    |                                       |
/// | p6      | D-3 00:00:00: 2                 | D-4 23:59:59: 50                      |
async fn fabricate(db: &PgPool, today: NaiveDate) -> History {
    let mut p = Vec::new();
    for i in 0..7 {
        p.push(jobs::product(db, &format!("Product {i}"), 1_000 * (i + 1), 1_000).await);
    }
    let u = user(db).await;
    let d = |n| days_before(today, n);
    let noon = 12 * 3600;

    paid(db, u, at(d(1), noon), &[(p[0], 5)]).await;
    paid(db, u, at(d(3), noon), &[(p[0], 5)]).await;
    paid(db, u, at(d(4), noon), &[(p[0], 100)]).await;

    paid(db, u, at(d(2), noon), &[(p[1], 10)]).await;

    paid(db, u, at(d(1), 3600), &[(p[2], 3)]).await;
    let last_instant = at(today, 0) - chrono::Duration::microseconds(1);
    paid(db, u, last_instant, &[(p[2], 1)]).await;
    for status in ["CANCELLED", "EXPIRED", "REJECTED", "PENDING"] {
        order(db, u, status, at(d(1), noon), None, &[(p[2], 50)]).await;
    }
    let held = Some(Utc::now() + chrono::Duration::minutes(10));
    order(db, u, "RESERVED", at(d(2), noon), held, &[(p[2], 50)]).await;

    paid(db, u, at(d(5), noon), &[(p[3], 100)]).await;
    paid(db, u, at(today, 0), &[(p[3], 100)]).await;

    paid(db, u, at(d(2), noon), &[(p[4], 7), (p[5], 3)]).await;
    paid(db, u, at(d(3), noon), &[(p[5], 4)]).await;

    paid(db, u, at(d(3), 0), &[(p[6], 2)]).await;
    paid(db, u, at(d(3), -1), &[(p[6], 50)]).await;
    History { p }
}

async fn ranked(db: &PgPool, filter: Filter, today: NaiveDate) -> Vec<(i32, i64, i64)> {
    shared::store::popular::read(db, filter, today)
        .await
        .unwrap()
        .items
        .iter()
        .map(|i| (i.rank, i.product_id, i.sold_quantity))
        .collect()
}

#[tokio::test]
async fn the_ranking_counts_units_of_paid_orders_over_the_three_whole_days_before_today() {
    let (url, db) = jobs::fresh_database().await;
    let today = Utc::now().date_naive();
    let History { p } = fabricate(&db, today).await;
    let runner = Runner::new(db.clone(), jobs::config(&url, "test"));

    let slot = at(today, 5 * 60);
    let outcome = runner.run_scheduled(Job::PopularProducts, slot).await.unwrap();
    assert!(matches!(outcome, Outcome::Ran { .. }), "{outcome:?}");

    let ranking = shared::store::popular::read(&db, Filter::DEFAULT, today)
        .await
        .unwrap();
    assert_eq!(ranking.window, Window::before(today, 3));
    assert_eq!(
        (ranking.window.from, ranking.window.to),
        (days_before(today, 3), days_before(today, 1))
    );
    assert!(ranking.computed_at().is_some());
    let top: Vec<(i32, i64, i64)> = ranking
        .items
        .iter()
        .map(|i| (i.rank, i.product_id, i.sold_quantity))
        .collect();
    assert_eq!(
        top,
        vec![
            (1, p[0], 10),
            (2, p[1], 10),
            (3, p[4], 7),
            (4, p[5], 7),
            (5, p[2], 4)
        ],
        "ties go to the lower product id; unpaid orders and days outside the window do not count"
    );
    let first = &ranking.items[0];
    assert_eq!((first.name.as_str(), first.price), ("Product 0", 1_000));

    // The snapshot holds exactly the default ranking.
    let snapshots = jobs::snapshots(&db).await;
    assert_eq!(snapshots.len(), 1);
    assert_eq!(snapshots[0].0, today);
    assert_eq!(snapshots[0].2, top);

    // Other filters sum the daily rollup over their own window.
    assert_eq!(
        ranked(&db, Filter::new(3, 10).unwrap(), today).await,
        [top.clone(), vec![(6, p[6], 2)]].concat()
    );
    assert_eq!(
        ranked(&db, Filter::new(5, 5).unwrap(), today).await,
        vec![
            (1, p[0], 110),
            (2, p[3], 100),
            (3, p[6], 52),
            (4, p[1], 10),
            (5, p[4], 7)
        ]
    );
    assert_eq!(
        ranked(&db, Filter::new(1, 50).unwrap(), today).await,
        vec![(1, p[0], 5), (2, p[2], 4)]
    );

    // The rollup has one row per product and day with paid sales, none for today.
    let rows: Vec<(NaiveDate, i64, i64)> = jobs::rollup(&db)
        .await
        .into_iter()
        .map(|(d, p, q, _)| (d, p, q))
        .collect();
    let d = |n| days_before(today, n);
    let mut expected = vec![
        (d(1), p[0], 5),
        (d(1), p[2], 4),
        (d(2), p[1], 10),
        (d(2), p[4], 7),
        (d(2), p[5], 3),
        (d(3), p[0], 5),
        (d(3), p[5], 4),
        (d(3), p[6], 2),
        (d(4), p[0], 100),
        (d(4), p[6], 50),
        (d(5), p[3], 100),
    ];
    expected.sort();
    assert_eq!(rows, expected);

    let runs = jobs::runs_of(&db, "popular-products").await;
    assert_eq!(runs, vec![("SCHEDULE".into(), "SUCCEEDED".into(), slot)]);
}

#[tokio::test]
async fn running_the_same_slot_again_changes_nothing() {
    let (url, db) = jobs::fresh_database().await;
    let today = Utc::now().date_naive();
    fabricate(&db, today).await;
    let runner = Runner::new(db.clone(), jobs::config(&url, "test"));
    let slot = at(today, 5 * 60);

    let first = runner.run_scheduled(Job::PopularProducts, slot).await.unwrap();
    assert!(matches!(first, Outcome::Ran { .. }), "{first:?}");
    let rollup = jobs::rollup(&db).await;
    let snapshots = jobs::snapshots(&db).await;

    for job in Job::ALL {
        let again = runner.run_scheduled(job, slot).await.unwrap();
        if job == Job::PopularProducts {
            assert_eq!(again, Outcome::AlreadyDone);
        } else {
            assert!(matches!(again, Outcome::Ran { .. }), "{job}: {again:?}");
            assert_eq!(
                runner.run_scheduled(job, slot).await.unwrap(),
                Outcome::AlreadyDone
            );
        }
    }
    assert_eq!(jobs::rollup(&db).await, rollup, "not even computed_at moved");
    assert_eq!(jobs::snapshots(&db).await, snapshots);
    for job in Job::ALL {
        assert_eq!(jobs::runs_of(&db, job.name()).await.len(), 1, "{job}");
    }

    // Recomputing the same day on demand writes the same figures; only the time moves.
    let recomputed = shared::store::popular::refresh(&db, today).await.unwrap();
    let figures = |rows: &[(NaiveDate, i64, i64, chrono::DateTime<Utc>)]| {
        rows.iter().map(|(d, p, q, _)| (*d, *p, *q)).collect::<Vec<_>>()
    };
    assert_eq!(figures(&jobs::rollup(&db).await), figures(&rollup));
    let again = jobs::snapshots(&db).await;
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].0, &again[0].2), (snapshots[0].0, &snapshots[0].2));
    assert!(
        again[0].1 > snapshots[0].1,
        "computed_at tells the caches a new snapshot is there"
    );
    assert_eq!(recomputed.rollup_rows as usize, rollup.len());
}

#[tokio::test]
async fn a_run_left_unfinished_by_a_dead_process_is_abandoned_and_its_slot_run_again() {
    let (url, db) = jobs::fresh_database().await;
    let today = Utc::now().date_naive();
    fabricate(&db, today).await;
    let slot = at(today, 5 * 60);
    // What a batch killed in the middle of the run leaves behind: the claim, no outcome.
    sqlx::query(
        "INSERT INTO job_runs (job, period, trigger, runner) VALUES ('popular-products', $1, 'SCHEDULE', 'dead')",
    )
    .bind(slot)
    .execute(&db)
    .await
    .unwrap();

    let runner = Runner::new(db.clone(), jobs::config(&url, "alive"));
    let outcome = runner.run_scheduled(Job::PopularProducts, slot).await.unwrap();
    assert!(matches!(outcome, Outcome::Ran { .. }), "{outcome:?}");
    assert_eq!(
        jobs::runs_of(&db, "popular-products").await,
        vec![
            ("SCHEDULE".into(), "ABANDONED".into(), slot),
            ("SCHEDULE".into(), "SUCCEEDED".into(), slot)
        ]
    );
    assert_eq!(jobs::snapshots(&db).await.len(), 1);
}

#[tokio::test]
async fn a_failed_run_is_recorded_and_its_slot_stays_open_for_a_retry() {
    let (url, db) = jobs::fresh_database().await;
    let runner = Runner::new(db.clone(), jobs::config(&url, "test"));
    let slot = jobs::quiet_slot();
    // A schema the job cannot work with: the failure must be recorded, not swallowed.
    sqlx::query("ALTER TABLE daily_product_sales RENAME TO daily_product_sales_gone")
        .execute(&db)
        .await
        .unwrap();
    let failed = runner.run_scheduled(Job::PopularProducts, slot).await;
    assert!(failed.is_err());
    let error: Option<String> = sqlx::query_scalar(
        "SELECT error FROM job_runs WHERE job = 'popular-products' AND outcome = 'FAILED'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(error.unwrap_or_default().contains("daily_product_sales"));

    sqlx::query("ALTER TABLE daily_product_sales_gone RENAME TO daily_product_sales")
        .execute(&db)
        .await
        .unwrap();
    let retried = runner.run_scheduled(Job::PopularProducts, slot).await.unwrap();
    assert!(matches!(retried, Outcome::Ran { .. }), "{retried:?}");
    let outcomes: Vec<String> = jobs::runs_of(&db, "popular-products")
        .await
        .into_iter()
        .map(|(_, outcome, _)| outcome)
        .collect();
    assert_eq!(outcomes, vec!["FAILED", "SUCCEEDED"]);
}
