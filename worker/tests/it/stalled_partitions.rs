//! A partition consumer that RabbitMQ keeps registered and feeds nothing is subscribed
//! again, and its commands settle; a consumer that is fed is never subscribed again.
//!
//! The starved consumer is played by a proxy between the worker process and RabbitMQ that
//! drops the broker's deliveries ([`StarvingProxy`]): the broker sees a healthy consumer
//! (its channel open, heartbeats answered) and the worker sees nothing arrive.

use std::time::Duration;

use futures::future::join_all;
use reqwest::StatusCode;
use testkit::{sample, socket_of, StarvingProxy, System, PATIENCE};

/// `STALLED_CONSUMER_AFTER_MS` in these tests: short, so that a stall is acted on quickly
/// and a false one would show within the test.
const BOUND_MS: u64 = 2_000;

const RESUBSCRIBED_LOG: &str = "subscribing again";

fn resubscribed(metrics: &str, family: &str) -> f64 {
    let series = format!(r#"worker_consumers_resubscribed_total{{family="{family}"}}"#);
    sample(metrics, &series).unwrap_or(0.0)
}

/// Every `worker_partition_stalled_seconds` series of a worker's metrics.
fn stalled_gauges(metrics: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter(|line| line.starts_with("worker_partition_stalled_seconds{"))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Reads worker 0's metrics until `holds` is true of them; fails the test after
/// [`PATIENCE`] with `what`.
async fn until_metrics(system: &System, what: &str, holds: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let metrics = system.worker_metrics(0).await;
        if holds(&metrics) {
            return metrics;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: never seen in {:?}",
            stalled_gauges(&metrics)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn issue_all(system: &System, issues: &[(i64, i64)]) {
    let answers = join_all(issues.iter().map(|&(coupon, user)| system.issue(coupon, user))).await;
    for answer in answers {
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_the_broker_feeds_nothing_is_subscribed_again_and_its_commands_settle() {
    // Every new subscription of a starved consumer returns the message the broker sent into
    // the void, which counts as a delivery: room for the many of the second part.
    let system = System::start_with(0, |config| config.topology.delivery_limit = 50).await;
    let broker_url = shared::config::BrokerSettings::from_env().unwrap().url;
    let proxy = StarvingProxy::start(socket_of(&broker_url)).await;
    system
        .spawn_worker_with(&[
            ("AMQP_URL", proxy.url_for(&broker_url)),
            ("STALLED_CONSUMER_AFTER_MS", BOUND_MS.to_string()),
            // One unacked message per consumer: what the broker sends into the void is that
            // one, and the partition's other commands wait in the queue as ready messages,
            // as they do behind a consumer the broker feeds nothing.
            ("WORKER_BATCH_SIZE", "1".to_owned()),
            ("WORKER_PREFETCH", "1".to_owned()),
        ])
        .await;
    system.wait_for_owners(1).await;
    let coupons = [
        system.coupon(1_000).await,
        system.coupon(1_000).await,
        system.coupon(1_000).await,
    ];
    let users = system.app.create_users(40).await;

    // Fed at first: each coupon's partition has its consumer.
    issue_all(
        &system,
        &[
            (coupons[0], users[0]),
            (coupons[1], users[1]),
            (coupons[2], users[2]),
        ],
    )
    .await;
    system.wait_until_settled().await;
    let metrics = system.worker_metrics(0).await;
    assert_eq!(resubscribed(&metrics, "coupon"), 0.0);

    // Every consumer of the worker is starved; the channels it opens from now on are fed.
    proxy.starve_current_consumers();
    let issues: Vec<(i64, i64)> = users[3..21]
        .iter()
        .enumerate()
        .map(|(i, &user)| (coupons[i % 3], user))
        .collect();
    issue_all(&system, &issues).await;
    system.wait_until_settled().await;
    assert!(proxy.deliveries_dropped() >= 1, "no delivery was dropped");
    let metrics = system.worker_metrics(0).await;
    let first = resubscribed(&metrics, "coupon");
    assert!(first >= 1.0, "settled without a new subscription?");
    let log = system.worker_log(0);
    assert!(log.contains(RESUBSCRIBED_LOG), "no warning in the log");

    // Starved whatever the channel: the gauge of the partition grows past the bound across
    // the new subscriptions, until deliveries pass again.
    proxy.starve_everyone();
    let partition = shared::domain::partition::partition_of(coupons[0], system.app.topology.partitions);
    let gauge = format!(r#"worker_partition_stalled_seconds{{family="coupon",partition="{partition}"}}"#);
    let issues: Vec<(i64, i64)> = users[21..27].iter().map(|&user| (coupons[0], user)).collect();
    issue_all(&system, &issues).await;
    let twice_the_bound = 2.0 * BOUND_MS as f64 / 1_000.0;
    let metrics = until_metrics(&system, "the stalled gauge past twice the bound", |m| {
        sample(m, &gauge).is_some_and(|seconds| seconds >= twice_the_bound)
    })
    .await;
    assert!(
        resubscribed(&metrics, "coupon") > first,
        "the starved partition was not subscribed again"
    );
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM requests WHERE status = 'PENDING'")
        .fetch_one(&system.app.db)
        .await
        .unwrap();
    assert_eq!(pending, 6, "nothing settles while every delivery is dropped");

    proxy.feed();
    system.wait_until_settled().await;
    until_metrics(&system, "every stalled gauge back to 0", |m| {
        let gauges = stalled_gauges(m);
        !gauges.is_empty() && gauges.iter().all(|(_, seconds)| *seconds == 0.0)
    })
    .await;
    let issued: i64 = join_all(coupons.map(|c| system.assert_coupon_invariants(c)))
        .await
        .into_iter()
        .sum();
    assert_eq!(issued, 27);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_that_is_fed_is_never_subscribed_again() {
    let system = System::start(0).await;
    system
        .spawn_worker_with(&[
            ("STALLED_CONSUMER_AFTER_MS", BOUND_MS.to_string()),
            // Small batches and prefetch: a busy partition's queue holds ready messages for
            // seconds while its consumer is fed one batch after another.
            ("WORKER_BATCH_SIZE", "5".to_owned()),
            ("WORKER_PREFETCH", "5".to_owned()),
        ])
        .await;
    system.wait_for_owners(1).await;
    let coupons = [system.coupon(10_000).await, system.coupon(10_000).await];
    let product = system.product(1_000, 10_000).await;
    let users = system.app.create_users(300).await;

    for wave in users.chunks(100) {
        let coupon_issues = join_all(
            wave.iter()
                .enumerate()
                .map(|(i, &user)| system.issue(coupons[i % 2], user)),
        );
        let line = [(product, 1)];
        let orders = join_all(wave[..20].iter().map(|&user| system.order(user, &line)));
        let (issued, ordered) = tokio::join!(coupon_issues, orders);
        for answer in issued.into_iter().chain(ordered) {
            assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
        }
        system.wait_until_settled().await;
    }
    // Idle for longer than the bound with empty queues: no stall either.
    tokio::time::sleep(Duration::from_millis(2 * BOUND_MS)).await;

    let metrics = system.worker_metrics(0).await;
    for family in ["coupon", "order"] {
        let series = format!(r#"worker_consumers_resubscribed_total{{family="{family}"}}"#);
        assert_eq!(
            sample(&metrics, &series),
            Some(0.0),
            "{family} consumers subscribed again"
        );
    }
    let gauges = stalled_gauges(&metrics);
    assert_eq!(gauges.len(), 2 * usize::from(system.app.topology.partitions));
    assert!(gauges.iter().all(|(_, seconds)| *seconds == 0.0), "{gauges:?}");
    assert!(!system.worker_log(0).contains(RESUBSCRIBED_LOG));
    assert_eq!(system.assert_coupon_invariants(coupons[0]).await, 150);
    system.assert_stock_reconciles(product, 10_000).await;
}
