//! Least privilege: the api runs as a role that reads and writes rows and nothing else (the
//! grants of deploy/postgres/runtime-grants.sql); the schema's owner applies the migrations
//! (`MIGRATION_DATABASE_URL`).

use reqwest::StatusCode;
use sqlx::{Connection, PgConnection};
use testkit::spawn_app_with;

/// A role of the test server, made once and kept (roles belong to the whole server; it has
/// rights only in the test databases that granted them, which are dropped after each test).
const RUNTIME_ROLE: &str = "ecommerce_test_runtime";

/// `url` with `role` as its user (the test server trusts local connections).
fn as_role(url: &str, role: &str) -> String {
    let (_, rest) = url.split_once("://").unwrap();
    let host_and_database = rest.rsplit_once('@').map_or(rest, |(_, after)| after);
    format!("postgres://{role}@{host_and_database}")
}

/// What an operator does once: the role, and the grants file applied by the owner.
async fn grant_runtime_role(owner_url: String) {
    let mut owner = PgConnection::connect(&owner_url).await.unwrap();
    sqlx::raw_sql(&format!(
        "DO $$ BEGIN CREATE ROLE {RUNTIME_ROLE} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    ))
    .execute(&mut owner)
    .await
    .unwrap();
    // psql's variable, substituted as psql would.
    let grants = include_str!("../../../deploy/postgres/runtime-grants.sql")
        .replace(":\"runtime_role\"", &format!("\"{RUNTIME_ROLE}\""));
    sqlx::raw_sql(&grants).execute(&mut owner).await.unwrap();
    owner.close().await.unwrap();
}

#[tokio::test]
async fn the_runtime_role_reads_and_writes_rows_but_cannot_drop_a_table() {
    let app = spawn_app_with(|config| {
        let owner = config.database.url.clone();
        // The configuration is adjusted synchronously; the grants need a connection.
        let granting = owner.clone();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(grant_runtime_role(granting));
        })
        .join()
        .expect("the runtime role is granted");
        config.database.url = as_role(&owner, RUNTIME_ROLE);
        config.database.migration_url = Some(owner);
    })
    .await;

    // The api works as the runtime role: registration (identity columns), admin writes,
    // reads, revocations.
    let user = app.create_user("Ann").await;
    let product = app.create_product("Lamp", 1_000, 3).await;
    assert_eq!(
        app.get(&format!("/products/{product}")).await.status,
        StatusCode::OK
    );
    assert_eq!(app.charge(user, 5_000).await.status, StatusCode::OK);
    let current: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(current, RUNTIME_ROLE, "the api's pool is the runtime role");

    // But it can change no table, only rows.
    let mut runtime = PgConnection::connect(&as_role(&app.database_url, RUNTIME_ROLE))
        .await
        .unwrap();
    for statement in [
        "DROP TABLE orders",
        "TRUNCATE users CASCADE",
        "ALTER TABLE balances DROP CONSTRAINT balance_not_negative",
        "CREATE TABLE sneaky (id INT)",
    ] {
        let refused = sqlx::raw_sql(statement).execute(&mut runtime).await;
        let code = refused
            .as_ref()
            .err()
            .and_then(|e| e.as_database_error())
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{statement}: {refused:?}");
    }
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&mut runtime)
        .await
        .unwrap();
    assert_eq!(orders, 0);
}
