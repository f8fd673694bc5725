//! How database errors are classified, on errors from the real PostgreSQL.

use sqlx::{Connection, Executor, PgConnection};

fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:15432/test".to_owned())
}

/// Found in review: "too many connections" (53300) was taken for a bad query, so a worker
/// spent a command's attempts on it and dead-lettered healthy commands whenever the
/// replicas' pools outnumbered `max_connections`, and the api answered 500. It is
/// unavailability, like a lost connection: workers wait it out, the api answers 503.
#[tokio::test]
async fn too_many_connections_is_unavailability() {
    let server = server_url();
    let mut admin = PgConnection::connect(&server).await.unwrap();
    let role = format!("t_full_{}", uuid::Uuid::now_v7().simple());
    // A role with no connection to spare: PostgreSQL refuses it as it refuses everyone past
    // `max_connections`, with SQLSTATE 53300.
    admin
        .execute(format!(r#"CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0"#).as_str())
        .await
        .unwrap();
    let (base, database) = server.rsplit_once('/').unwrap();
    let (scheme, host) = base.split_once("://").unwrap();
    let host = host.rsplit_once('@').map_or(host, |(_, host)| host);
    let refused = PgConnection::connect(&format!("{scheme}://{role}@{host}/{database}")).await;
    admin
        .execute(format!(r#"DROP ROLE "{role}""#).as_str())
        .await
        .unwrap();

    let error = refused.expect_err("a role with a connection limit of 0 cannot connect");
    let code = match &error {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    };
    assert_eq!(code.as_deref(), Some("53300"), "{error:?}");
    assert!(shared::store::db::is_unavailable(&error), "{error:?}");

    // And a query that is wrong is not.
    let wrong = admin.execute("SELECT * FROM no_such_table").await.unwrap_err();
    assert!(!shared::store::db::is_unavailable(&wrong), "{wrong:?}");
}

/// Every process records its pool at start; the budget adds up the live ones and says
/// when they ask for more than PostgreSQL allows. Lapsed rows (processes gone) do not count.
#[tokio::test]
async fn the_connection_budget_adds_up_live_pools_against_max_connections() {
    let server = server_url();
    let mut admin = PgConnection::connect(&server).await.unwrap();
    let name = format!("t_budget_{}", uuid::Uuid::now_v7().simple());
    admin
        .execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
        .await
        .unwrap();
    let (base, _) = server.rsplit_once('/').unwrap();
    let settings = shared::config::DatabaseSettings::new(format!("{base}/{name}"), 7);

    let db = shared::store::db::connect_and_migrate(&settings, "api")
        .await
        .unwrap();
    let alone = shared::store::connection_budget::read(&db).await.unwrap();
    assert_eq!((alone.processes, alone.claimed), (1, 7));
    assert!(alone.max_connections > 0 && alone.reserved >= 0);
    assert!(!alone.exceeded(), "{alone:?}");

    // A live process whose pool takes what is left and one more, and a dead one that would
    // take everything but has not been heard from for a minute.
    let rest = alone.allowed() - alone.claimed + 1;
    sqlx::query(
        "INSERT INTO process_pools (id, process, host, pid, pool_size, heartbeat_at)
         VALUES ($1, 'worker', 'elsewhere', 1, $2, now()),
                ($3, 'worker', 'elsewhere', 2, 10000, now() - interval '1 minute')",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(i32::try_from(rest).unwrap())
    .bind(uuid::Uuid::now_v7())
    .execute(&db)
    .await
    .unwrap();
    let over = shared::store::connection_budget::read(&db).await.unwrap();
    assert_eq!(over.processes, 2);
    assert_eq!(over.claimed, alone.allowed() + 1);
    assert!(over.exceeded(), "{over:?}");

    // The next process to start sees it too (and says so in its log).
    let next = shared::store::connection_budget::claim(&db, "worker", 3)
        .await
        .unwrap();
    assert_eq!(next.processes, 3);
    assert!(next.exceeded(), "{next:?}");

    db.close().await;
    admin
        .execute(format!(r#"DROP DATABASE "{name}" WITH (FORCE)"#).as_str())
        .await
        .unwrap();
}
