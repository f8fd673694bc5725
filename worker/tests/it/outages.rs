//! A worker whose RabbitMQ and PostgreSQL both go away and come back: it reconnects by
//! itself and settles everything that was accepted meanwhile, once.

use std::time::Duration;

use reqwest::StatusCode;
use testkit::{socket_of, Proxy, System};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_recovers_from_broker_and_database_outages() {
    let system = System::start(0).await;
    let broker_url = shared::config::BrokerSettings::from_env().unwrap().url;
    let broker = Proxy::start(socket_of(&broker_url)).await;
    let database = Proxy::start(socket_of(&system.app.database_url)).await;
    system
        .spawn_worker_with(&[
            ("AMQP_URL", broker.url_for(&broker_url)),
            ("DATABASE_URL", database.url_for(&system.app.database_url)),
        ])
        .await;
    system.wait_for_owners(1).await;
    let coupon = system.coupon(1_000).await;
    let users = system.app.create_users(60).await;

    for &user in &users[..20] {
        assert_eq!(system.issue(coupon, user).await.status, StatusCode::ACCEPTED);
    }
    system.wait_until_settled().await;

    // Both go down; the API (which reaches them directly) keeps accepting.
    broker.cut();
    database.cut();
    for &user in &users[20..40] {
        assert_eq!(system.issue(coupon, user).await.status, StatusCode::ACCEPTED);
    }
    // A fixed wait on purpose: what is asserted is that nothing happens over time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM requests WHERE status = 'PENDING'")
        .fetch_one(&system.app.db)
        .await
        .unwrap();
    assert_eq!(pending, 20, "nothing settles while the worker is cut off");

    // The database returns first, then the broker.
    database.restore().await;
    // A fixed wait on purpose: the worker has the database a while before the broker.
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.restore().await;
    for &user in &users[40..] {
        assert_eq!(system.issue(coupon, user).await.status, StatusCode::ACCEPTED);
    }
    system.wait_until_settled().await;
    assert_eq!(system.assert_coupon_invariants(coupon).await, 60);
}
