//! Concurrent charges: none lost, none applied twice, and the ledger agrees with the balance.

use rand::Rng;
use reqwest::StatusCode;
use testkit::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_charges_of_one_user_all_count() {
    let app = spawn_app().await;
    let user = app.create_user("Busy").await;
    let amounts: Vec<i64> = {
        let mut rng = rand::rng();
        (0..200).map(|_| rng.random_range(1..=100_000)).collect()
    };
    let charges = amounts.iter().map(|&amount| app.charge(user, amount));
    for answer in futures::future::join_all(charges).await {
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    }

    let expected: i64 = amounts.iter().sum();
    assert_eq!(app.balance(user).await, expected);
    let (rows, ledger_sum): (i64, i64) = sqlx::query_as(
        "SELECT count(*), COALESCE(sum(amount), 0)::bigint FROM balance_transactions WHERE user_id = $1 AND kind = 'CHARGE'",
    )
    .bind(user)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(rows, 200);
    assert_eq!(ledger_sum, expected);
    // The ledger's running balance is consistent: each entry's balanceAfter is unique.
    let distinct_after: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT balance_after) FROM balance_transactions WHERE user_id = $1",
    )
    .bind(user)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(distinct_after, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_charges_over_twenty_users_each_add_up() {
    let app = spawn_app().await;
    let mut users = Vec::new();
    for i in 0..20 {
        users.push(app.create_user(&format!("user {i}")).await);
    }
    let charges: Vec<(i64, i64)> = {
        let mut rng = rand::rng();
        (0..400)
            .map(|_| {
                (
                    users[rng.random_range(0..users.len())],
                    rng.random_range(1..=50_000),
                )
            })
            .collect()
    };
    let answers =
        futures::future::join_all(charges.iter().map(|&(user, amount)| app.charge(user, amount))).await;
    for answer in answers {
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    }
    for &user in &users {
        let expected: i64 = charges.iter().filter(|(u, _)| *u == user).map(|(_, a)| a).sum();
        assert_eq!(app.balance(user).await, expected, "user {user}");
    }
    // Every balance equals its ledger.
    let mismatches = shared::store::invariants::balances_off_ledger(&app.db, None)
        .await
        .unwrap();
    assert_eq!(mismatches, 0);
}
