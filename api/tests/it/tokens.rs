//! A user's tokens over their life: listed without secrets, revoked one by one or all at
//! once, capped in number, expiring, and their last use recorded without a write per request.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use testkit::{spawn_app, spawn_app_with, Answer, TestApp};

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn with_token(app: &TestApp, method: Method, path: &str, token: &str) -> Answer {
    app.send(method, path, None, &[("Authorization", &bearer(token))])
        .await
}

/// A new token of `user`, asked with `token`.
async fn issue(app: &TestApp, user: i64, token: &str) -> Answer {
    with_token(app, Method::POST, &format!("/users/{user}/tokens"), token).await
}

#[tokio::test]
async fn a_user_lists_its_live_tokens_without_secrets_and_sees_which_is_current() {
    let app = spawn_app().await;
    let registered = app.post("/users", json!({ "name": "Ann" })).await;
    assert_eq!(registered.status, StatusCode::CREATED);
    assert_eq!(registered.headers["cache-control"], "no-store");
    let user = registered.body["userId"].as_i64().unwrap();
    let first = registered.body["token"].as_str().unwrap().to_owned();
    let issued = issue(&app, user, &first).await;
    assert_eq!(issued.status, StatusCode::CREATED, "{issued:?}");
    assert_eq!(issued.headers["cache-control"], "no-store");
    let second = issued.body["token"].as_str().unwrap().to_owned();

    let listed = with_token(&app, Method::GET, &format!("/users/{user}/tokens"), &second).await;
    assert_eq!(listed.status, StatusCode::OK, "{listed:?}");
    let items = listed.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{listed:?}");
    // Newest first: the second token, the one this listing was sent with.
    assert_eq!(items[0]["current"], true);
    assert_eq!(items[1]["current"], false);
    for item in items {
        let fields: Vec<&str> = item.as_object().unwrap().keys().map(String::as_str).collect();
        for field in &fields {
            assert!(
                ["tokenId", "createdAt", "lastUsedAt", "expiresAt", "current"].contains(field),
                "{field} in {item}"
            );
        }
        // Neither token, nor anything of its hash, is shown.
        let text = item.to_string();
        assert!(
            !text.contains(&first[4..20]) && !text.contains(&second[4..20]),
            "{text}"
        );
        // 90 days by default.
        let created = chrono::DateTime::parse_from_rfc3339(item["createdAt"].as_str().unwrap()).unwrap();
        let expires = chrono::DateTime::parse_from_rfc3339(item["expiresAt"].as_str().unwrap()).unwrap();
        let lives = expires - created;
        assert!(
            lives > chrono::Duration::days(89) && lives < chrono::Duration::days(91),
            "{item}"
        );
    }
    // Both were used (registration's token to issue the second), seen by this replica.
    assert!(
        items[0]["lastUsedAt"].is_string() && items[1]["lastUsedAt"].is_string(),
        "{items:?}"
    );

    // Another user's tokens are not this token's business.
    let other = app.create_user("Bob").await;
    let forbidden = with_token(&app, Method::GET, &format!("/users/{other}/tokens"), &first).await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    assert_eq!(forbidden.code(), "ERR_FORBIDDEN");
    let anonymous = app
        .send_without_token(Method::GET, &format!("/users/{user}/tokens"), None, &[])
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn one_token_is_revoked_by_its_id_and_only_the_users_own() {
    let app = spawn_app().await;
    let user = app.create_user("Ann").await;
    let first = app.token_of(user).unwrap();
    let second = issue(&app, user, &first).await.body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = app.create_user("Bob").await;
    let listed = with_token(&app, Method::GET, &format!("/users/{user}/tokens"), &first).await;
    let second_id = listed.body["items"][0]["tokenId"].as_i64().unwrap();
    let others = app.get(&format!("/users/{other}/tokens")).await;
    let others_id = others.body["items"][0]["tokenId"].as_i64().unwrap();

    // Another user's token, named under one's own path: not found (nor revoked).
    let path = |id: i64| format!("/users/{user}/tokens/{id}");
    let foreign = with_token(&app, Method::DELETE, &path(others_id), &first).await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND, "{foreign:?}");
    assert_eq!(foreign.code(), "ERR_NOT_FOUND");
    assert_eq!(
        app.get(&format!("/users/{other}/balance")).await.status,
        StatusCode::OK
    );
    // Under the other user's path: forbidden.
    let trespass = with_token(
        &app,
        Method::DELETE,
        &format!("/users/{other}/tokens/{others_id}"),
        &first,
    )
    .await;
    assert_eq!(trespass.status, StatusCode::FORBIDDEN);
    let malformed = with_token(&app, Method::DELETE, &format!("/users/{user}/tokens/x1"), &first).await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert_eq!(malformed.code(), "ERR_INVALID_REQUEST");

    let revoked = with_token(&app, Method::DELETE, &path(second_id), &first).await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT, "{revoked:?}");
    // A retried DELETE succeeds again.
    let again = with_token(&app, Method::DELETE, &path(second_id), &first).await;
    assert_eq!(again.status, StatusCode::NO_CONTENT);
    let balance = format!("/users/{user}/balance");
    assert_eq!(
        with_token(&app, Method::GET, &balance, &second).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        with_token(&app, Method::GET, &balance, &first).await.status,
        StatusCode::OK
    );
    let listed = with_token(&app, Method::GET, &format!("/users/{user}/tokens"), &first).await;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 1, "{listed:?}");
}

#[tokio::test]
async fn revoking_every_token_includes_the_one_sent() {
    let app = spawn_app().await;
    let user = app.create_user("Ann").await;
    let first = app.token_of(user).unwrap();
    let second = issue(&app, user, &first).await.body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = app.create_user("Bob").await;
    let revoked = with_token(&app, Method::DELETE, &format!("/users/{user}/tokens"), &first).await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT, "{revoked:?}");
    let balance = format!("/users/{user}/balance");
    for token in [&first, &second] {
        let refused = with_token(&app, Method::GET, &balance, token).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    }
    // Nobody else's.
    assert_eq!(
        app.get(&format!("/users/{other}/balance")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_user_holds_at_most_the_configured_number_of_live_tokens_even_when_asked_at_once() {
    let app = spawn_app_with(|config| config.tokens.max_per_user = 4).await;
    let user = app.create_user("Ann").await;
    let first = app.token_of(user).unwrap();
    // Ten at once, with the registration's token already live: three more fit.
    let asked = futures::future::join_all((0..10).map(|_| issue(&app, user, &first))).await;
    let created = asked.iter().filter(|a| a.status == StatusCode::CREATED).count();
    assert_eq!(created, 3, "{asked:?}");
    for refused in asked.iter().filter(|a| a.status != StatusCode::CREATED) {
        assert_eq!(refused.status, StatusCode::CONFLICT, "{refused:?}");
        assert_eq!(refused.code(), "ERR_TOO_MANY_TOKENS");
    }
    // Revoking one makes room for one.
    let listed = with_token(&app, Method::GET, &format!("/users/{user}/tokens"), &first).await;
    let oldest_other = listed.body["items"][0]["tokenId"].as_i64().unwrap();
    let revoked = with_token(
        &app,
        Method::DELETE,
        &format!("/users/{user}/tokens/{oldest_other}"),
        &first,
    )
    .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    assert_eq!(issue(&app, user, &first).await.status, StatusCode::CREATED);
    assert_eq!(issue(&app, user, &first).await.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let app = spawn_app_with(|config| config.token_cache_ttl = Duration::from_millis(100)).await;
    let user = app.create_user("Ann").await;
    let token = app.token_of(user).unwrap();
    let balance = format!("/users/{user}/balance");
    assert_eq!(
        with_token(&app, Method::GET, &balance, &token).await.status,
        StatusCode::OK
    );
    sqlx::query("UPDATE user_tokens SET expires_at = now() - interval '1 second' WHERE user_id = $1")
        .bind(user)
        .execute(&app.db)
        .await
        .unwrap();
    let refused = app
        .eventually(StatusCode::UNAUTHORIZED, Duration::from_secs(30), || {
            with_token(&app, Method::GET, &balance, &token)
        })
        .await;
    assert_eq!(refused.code(), "ERR_UNAUTHORIZED");
    // Nor can it mint a successor.
    assert_eq!(issue(&app, user, &token).await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_last_use_of_a_token_is_written_in_bulk_not_per_request() {
    let app = spawn_app_with(|config| config.tokens.record_uses_every = Duration::from_millis(200)).await;
    let used = app.create_user("Ann").await;
    // Made without the api: never used.
    let unused = app.create_users(1).await[0];
    assert_eq!(
        app.get(&format!("/users/{used}/balance")).await.status,
        StatusCode::OK
    );
    let last_used = |user: i64| {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
                "SELECT max(last_used_at) FROM user_tokens WHERE user_id = $1",
            )
            .bind(user)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while last_used(used).await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the use was never written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(last_used(unused).await.is_none());
}
