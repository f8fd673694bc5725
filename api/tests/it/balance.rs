//! Users, balances and the ledger, through the HTTP API over a real PostgreSQL.

use reqwest::{Method, StatusCode};
use serde_json::json;
use testkit::spawn_app;

#[tokio::test]
async fn a_new_user_has_a_zero_balance() {
    let app = spawn_app().await;
    let answer = app.post("/users", json!({ "name": "  Kim Minji " })).await;
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(answer.body["name"], "Kim Minji");
    let user = answer.body["userId"].as_i64().unwrap();
    assert!(user > 0);

    let balance = app.get(&format!("/users/{user}/balance")).await;
    assert_eq!(balance.status, StatusCode::OK);
    assert_eq!(balance.body, json!({ "userId": user, "balance": 0 }));
}

#[tokio::test]
async fn a_charge_adds_to_the_balance_and_writes_one_ledger_entry() {
    let app = spawn_app().await;
    let user = app.create_user("Lee").await;

    let first = app.charge(user, 5_000).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body["userId"], user);
    assert_eq!(first.body["balance"], 5_000);
    assert_eq!(first.body["chargedAmount"], 5_000);
    assert!(first.body["transactionId"].as_i64().is_some());

    let second = app.charge(user, 2_500).await;
    assert_eq!(second.body["balance"], 7_500);
    assert_eq!(app.balance(user).await, 7_500);

    let ledger = app.get(&format!("/users/{user}/balance/transactions")).await;
    assert_eq!(ledger.status, StatusCode::OK);
    let items = ledger.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    // Newest first.
    assert_eq!(items[0]["amount"], 2_500);
    assert_eq!(items[0]["balanceAfter"], 7_500);
    assert_eq!(items[0]["type"], "CHARGE");
    assert_eq!(items[0]["transactionId"], second.body["transactionId"]);
    assert_eq!(items[1]["amount"], 5_000);
    assert!(items[0]["createdAt"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert!(ledger.body.get("nextCursor").is_none());
}

#[tokio::test]
async fn the_ledger_pages_with_a_cursor_without_gaps_or_repeats() {
    let app = spawn_app().await;
    let user = app.create_user("Park").await;
    for amount in 1..=7 {
        assert_eq!(app.charge(user, amount).await.status, StatusCode::OK);
    }
    let mut seen = Vec::new();
    let mut path = format!("/users/{user}/balance/transactions?limit=3");
    loop {
        let page = app.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        let items = page.body["items"].as_array().unwrap();
        assert!(items.len() <= 3);
        seen.extend(items.iter().map(|i| i["amount"].as_i64().unwrap()));
        match page.body["nextCursor"].as_str() {
            Some(cursor) => path = format!("/users/{user}/balance/transactions?limit=3&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, vec![7, 6, 5, 4, 3, 2, 1]);
}

#[tokio::test]
async fn a_charge_that_would_pass_the_balance_cap_is_refused_and_changes_nothing() {
    let app = spawn_app().await;
    let user = app.create_user("Choi").await;
    for _ in 0..100 {
        assert_eq!(app.charge(user, 10_000_000).await.status, StatusCode::OK);
    }
    assert_eq!(app.balance(user).await, 1_000_000_000);
    let over = app.charge(user, 1).await;
    assert_eq!(over.status, StatusCode::BAD_REQUEST);
    assert_eq!(over.code(), "ERR_BALANCE_INVALID_AMOUNT");
    assert_eq!(app.balance(user).await, 1_000_000_000);
}

#[tokio::test]
async fn balance_routes_refuse_malformed_users_and_other_users() {
    let app = spawn_app().await;
    let user = app.create_user("Owner").await;
    let token = format!("Bearer {}", app.token_of(user).unwrap());
    let auth = [("Authorization", token.as_str())];
    let counts_before = app.row_counts().await;
    // Malformed: the input's shape comes before who acts for whom.
    for other in ["0", "-3", "abc", "1.5", "99999999999999999999"] {
        let balance = app
            .send(Method::GET, &format!("/users/{other}/balance"), None, &auth)
            .await;
        assert_eq!(balance.status, StatusCode::BAD_REQUEST, "{other}");
        assert_eq!(balance.code(), "ERR_BALANCE_INVALID_USER", "{other}");

        let charge = app
            .send(
                Method::POST,
                &format!("/users/{other}/balance/charge"),
                Some(json!({ "amount": 10 })),
                &auth,
            )
            .await;
        assert_eq!(charge.status, StatusCode::BAD_REQUEST, "{other}");
        assert_eq!(charge.code(), "ERR_BALANCE_INVALID_USER", "{other}");

        let ledger = app
            .send(
                Method::GET,
                &format!("/users/{other}/balance/transactions"),
                None,
                &auth,
            )
            .await;
        assert_eq!(ledger.code(), "ERR_BALANCE_INVALID_USER", "{other}");
    }
    // Well formed but not the token's user, registered or not: 403.
    for other in [user + 1, 999_999] {
        for (method, path, body) in [
            (Method::GET, format!("/users/{other}/balance"), None),
            (
                Method::POST,
                format!("/users/{other}/balance/charge"),
                Some(json!({ "amount": 10 })),
            ),
            (Method::GET, format!("/users/{other}/balance/transactions"), None),
        ] {
            let answer = app.send(method, &path, body, &auth).await;
            assert_eq!(answer.status, StatusCode::FORBIDDEN, "{path}: {answer:?}");
            assert_eq!(answer.code(), "ERR_FORBIDDEN", "{path}");
        }
    }
    assert_eq!(app.row_counts().await, counts_before);
}

#[tokio::test]
async fn the_ledger_refuses_a_bad_limit_or_cursor() {
    let app = spawn_app().await;
    let user = app.create_user("Jung").await;
    for query in ["limit=0", "limit=101", "limit=abc", "cursor=xyz", "cursor=-1"] {
        let answer = app
            .get(&format!("/users/{user}/balance/transactions?{query}"))
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(answer.code(), "ERR_INVALID_REQUEST", "{query}");
    }
}
