//! Identity and hardening: tokens issued, replayed and revoked (also on a second api
//! process), the admin token the api refuses to start with, slow clients, rate limits, the
//! cap on unpaid orders, and the pages of coupons.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use testkit::{spawn_app, spawn_app_with, Answer, TestApp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn balance_with(app: &TestApp, user: i64, token: &str) -> Answer {
    app.send(
        Method::GET,
        &format!("/users/{user}/balance"),
        None,
        &[("Authorization", &bearer(token))],
    )
    .await
}

#[tokio::test]
async fn a_registration_shows_its_token_once_and_keeps_only_its_hash() {
    let app = spawn_app().await;
    let first = app
        .post_with_key("/users", json!({ "name": "Ann" }), "signup-ann")
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let user = first.body["userId"].as_i64().unwrap();
    let token = first.body["token"].as_str().unwrap().to_owned();
    assert!(shared::domain::identity::is_well_formed(&token), "{token}");
    assert_eq!(balance_with(&app, user, &token).await.status, StatusCode::OK);

    // Stored as its SHA-256, nowhere in clear: not in the tokens, not in the saved answer.
    let stored: Vec<u8> = sqlx::query_scalar("SELECT token_hash FROM user_tokens WHERE user_id = $1")
        .bind(user)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, shared::domain::identity::hash_token(&token).to_vec());
    let saved: String =
        sqlx::query_scalar("SELECT response_body::text FROM idempotency_keys WHERE key = 'signup-ann'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(!saved.contains(&token[4..]), "{saved}");

    // The replay answers the same user without the token, which was never kept.
    let replay = app
        .post_with_key("/users", json!({ "name": "Ann" }), "signup-ann")
        .await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(replay.body["userId"], user);
    assert!(replay.body.get("token").is_none(), "{replay:?}");
}

#[tokio::test]
async fn a_revoked_token_is_refused_at_once_here_and_soon_by_another_replica() {
    let app = spawn_app().await;
    let user = app.create_user("Ann").await;
    let first = app.token_of(user).unwrap();
    let issued = app
        .send(
            Method::POST,
            &format!("/users/{user}/tokens"),
            None,
            &[("Authorization", &bearer(&first))],
        )
        .await;
    assert_eq!(issued.status, StatusCode::CREATED, "{issued:?}");
    let second = issued.body["token"].as_str().unwrap().to_owned();
    assert_ne!(first, second);

    let (mut replica, other) = app.second_replica(env!("CARGO_BIN_EXE_api")).await;
    let client = reqwest::Client::new();
    let on_other = |token: String| {
        let client = client.clone();
        async move {
            client
                .get(format!("http://{other}/users/{user}/balance"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    // The other replica has verified (and cached) the first token.
    assert_eq!(on_other(first.clone()).await, StatusCode::OK);

    let revoked = app
        .send(
            Method::DELETE,
            &format!("/users/{user}/tokens/current"),
            None,
            &[("Authorization", &bearer(&first))],
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT, "{revoked:?}");
    // Here at once; the other token of the same user is untouched.
    let refused = balance_with(&app, user, &first).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.code(), "ERR_UNAUTHORIZED");
    assert_eq!(balance_with(&app, user, &second).await.status, StatusCode::OK);

    // Where the revoked token is still believed (the other replica's cache), it cannot mint
    // a token that would outlive it: that is checked against the database.
    let minted = client
        .post(format!("http://{other}/users/{user}/tokens"))
        .bearer_auth(&first)
        .send()
        .await
        .unwrap();
    assert_eq!(minted.status(), StatusCode::UNAUTHORIZED);

    // The other replica refuses it once its cache entry (3 s by default) has expired; the
    // bound here is generous, the contract's 5 s is the configuration's (checked at start).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while on_other(first.clone()).await != StatusCode::UNAUTHORIZED {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other replica still accepts a revoked token"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(on_other(second.clone()).await, StatusCode::OK);
    replica.kill().await.unwrap();
}

/// Runs the api binary with `env` and no database (it must stop before needing one).
async fn start_refused(env: &[(&str, &str)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_api"));
    command
        .env_remove("ADMIN_TOKEN")
        .env_remove("DEVELOPMENT_MODE")
        // Nothing listens here: an api that got past its checks would fail differently.
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("API_METRICS_ADDR", "127.0.0.1:0");
    for (name, value) in env {
        command.env(name, value);
    }
    tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("the api exits at once")
        .unwrap()
}

#[tokio::test]
async fn the_api_refuses_to_start_with_a_weak_admin_token_outside_development_mode() {
    for (env, why) in [
        (vec![], "unset"),
        (vec![("ADMIN_TOKEN", "dev-admin-token")], "development default"),
        (vec![("ADMIN_TOKEN", "short-but-secret-token")], "shorter than 32"),
    ] {
        let output = start_refused(&env).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{why}: {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{why}: one clear line, got {stderr}"
        );
        assert!(stderr.contains("ADMIN_TOKEN"), "{why}: {stderr}");
        assert!(
            !stderr.contains("short-but-secret-token"),
            "the token itself is printed: {stderr}"
        );
    }
}

/// Reads from `stream` until it closes (or `patience` passes): what the server sent.
async fn read_until_closed(stream: &mut TcpStream, patience: Duration) -> Option<String> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(patience, async {
        let mut buffer = [0_u8; 1024];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    read.ok()
        .map(|()| String::from_utf8_lossy(&received).into_owned())
}

async fn slow_app() -> TestApp {
    spawn_app_with(|config| {
        config.http.header = Duration::from_millis(1_000);
        config.http.body = Duration::from_millis(1_000);
    })
    .await
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let app = slow_app().await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"POST /users HTTP/1.1\r\nHost: shop\r\nContent-Ty")
        .await
        .unwrap();
    // Closed by the server well before this generous bound (the timeout is 1 s).
    let received = read_until_closed(&mut stream, Duration::from_secs(20)).await;
    let received = received.expect("the connection is still open");
    assert!(
        received.is_empty() || received.starts_with("HTTP/1.1 408"),
        "{received}"
    );
}

#[tokio::test]
async fn a_body_sent_byte_by_byte_too_slowly_is_answered_408_and_disconnected() {
    let app = slow_app().await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let body = br#"{"name":"slow client"}"#;
    let head = format!(
        "POST /users HTTP/1.1\r\nHost: shop\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // One byte every 300 ms: each is prompt, the whole is not.
    let trickle = async {
        for byte in body {
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), trickle).await;
    let received = read_until_closed(&mut stream, Duration::from_secs(20)).await;
    let received = received.expect("the connection is still open");
    assert!(received.starts_with("HTTP/1.1 408"), "{received}");
    assert!(received.contains("ERR_REQUEST_TIMEOUT"), "{received}");
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(users, 0, "nothing was registered");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let app = slow_app().await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await
        .unwrap();
    let received = read_until_closed(&mut stream, Duration::from_secs(20)).await;
    let received = received.expect("the idle connection is still open");
    assert!(received.starts_with("HTTP/1.1 200"), "{received}");
}

#[tokio::test]
async fn a_burst_past_a_users_limit_is_answered_429_and_other_users_are_unaffected() {
    let app = spawn_app_with(|config| {
        config.limits.user_writes_per_sec = 1;
        config.limits.user_writes_burst = 3;
    })
    .await;
    let greedy = app.create_user("greedy").await;
    let other = app.create_user("other").await;
    let mut charged = 0;
    let mut limited = Vec::new();
    for _ in 0..10 {
        let answer = app.charge(greedy, 1_000).await;
        match answer.status {
            StatusCode::OK => charged += 1,
            StatusCode::TOO_MANY_REQUESTS => limited.push(answer),
            _ => panic!("{answer:?}"),
        }
    }
    assert!(!limited.is_empty(), "ten charges at once were all accepted");
    assert!(charged >= 3, "the burst of 3 was refused: {charged}");
    for answer in &limited {
        assert_eq!(answer.code(), "ERR_RATE_LIMITED");
        let retry: u64 = answer.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(retry >= 1, "{answer:?}");
    }
    // What was refused changed nothing.
    assert_eq!(app.balance(greedy).await, 1_000 * charged);
    // Someone else is served as usual.
    assert_eq!(app.charge(other, 1_000).await.status, StatusCode::OK);
}

#[tokio::test]
async fn registrations_and_invalid_tokens_are_limited_per_client_address() {
    let app = spawn_app_with(|config| {
        config.limits.signups_per_min = 1;
        config.limits.signups_burst = 2;
        config.limits.auth_failures_per_min = 1;
        config.limits.auth_failures_burst = 2;
        config.token_cache_ttl = Duration::from_millis(200);
    })
    .await;
    let user = app.create_user("one").await;
    app.create_user("two").await;
    let third = app.post("/users", json!({ "name": "three" })).await;
    assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS, "{third:?}");
    assert_eq!(third.code(), "ERR_RATE_LIMITED");
    assert!(third.headers.contains_key("retry-after"));

    let path = format!("/users/{user}/balance");
    // Verified before the address is blocked: it keeps working while its check is cached.
    assert_eq!(app.get(&path).await.status, StatusCode::OK);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let forged = shared::domain::identity::new_token().unwrap().token;
        let answer = app
            .send(Method::GET, &path, None, &[("Authorization", &bearer(&forged))])
            .await;
        statuses.push(answer.status);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    // The blocked address's known token still works, also once its check is no longer
    // cached; an unknown one is not even looked up.
    assert_eq!(app.get(&path).await.status, StatusCode::OK);
    // A fixed wait on purpose: the cached check has to expire.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(app.get(&path).await.status, StatusCode::OK);
    let stranger = app.create_users(1).await[0];
    let unverified = app.get(&format!("/users/{stranger}/balance")).await;
    assert_eq!(unverified.status, StatusCode::TOO_MANY_REQUESTS, "{unverified:?}");
}

#[tokio::test]
async fn wrong_admin_tokens_count_against_the_address_like_invalid_customer_tokens() {
    let app = spawn_app_with(|config| {
        config.limits.auth_failures_per_min = 1;
        config.limits.auth_failures_burst = 3;
    })
    .await;
    let admin_with = |token: String| {
        let app = &app;
        async move {
            app.send(
                Method::POST,
                "/admin/products",
                Some(json!({ "name": "Lamp", "price": 100, "stock": 1 })),
                &[("Authorization", &bearer(&token))],
            )
            .await
        }
    };
    let guess = || "x".repeat(testkit::ADMIN_TOKEN.len());
    assert_eq!(admin_with(guess()).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(admin_with(guess()).await.status, StatusCode::UNAUTHORIZED);
    // Customer and admin failures share the allowance of the address.
    let user = app.create_user("Ann").await;
    let forged = shared::domain::identity::new_token().unwrap().token;
    let customer = app
        .send(
            Method::GET,
            &format!("/users/{user}/balance"),
            None,
            &[("Authorization", &bearer(&forged))],
        )
        .await;
    assert_eq!(customer.status, StatusCode::UNAUTHORIZED);
    let blocked = admin_with(guess()).await;
    assert_eq!(blocked.status, StatusCode::TOO_MANY_REQUESTS, "{blocked:?}");
    assert_eq!(blocked.code(), "ERR_RATE_LIMITED");
    assert!(blocked.headers.contains_key("retry-after"));
    // While blocked, not even the right token is compared: a guess learns nothing.
    let right = admin_with(testkit::ADMIN_TOKEN.to_owned()).await;
    assert_eq!(right.status, StatusCode::TOO_MANY_REQUESTS, "{right:?}");
}

/// Registers a user from the test's address (127.0.0.1) with `X-Forwarded-For: forwarded`.
async fn register_forwarded(app: &TestApp, forwarded: &str) -> Answer {
    app.send(
        Method::POST,
        "/users",
        Some(json!({ "name": "someone" })),
        &[("X-Forwarded-For", forwarded)],
    )
    .await
}

#[tokio::test]
async fn a_forwarded_address_is_believed_only_from_trusted_proxies_and_only_as_far_as_them() {
    // The test's connections come from 127.0.0.1, a trusted proxy here, as is 10.0.0.0/8
    // (a second, inner hop). One registration per client address.
    let trusting = spawn_app_with(|config| {
        config.limits.signups_per_min = 1;
        config.limits.signups_burst = 1;
        config.limits.trusted_proxies =
            api::http::forwarded::parse_networks("127.0.0.0/8, 10.0.0.0/8").unwrap();
    })
    .await;
    // Two trusted hops (10.0.0.9 and the peer): each client is who the outer hop saw, and
    // what the client wrote itself before that (198.51.100.66) is not believed.
    for client in ["203.0.113.1", "203.0.113.2"] {
        let forwarded = format!("198.51.100.66, {client}, 10.0.0.9");
        let answer = register_forwarded(&trusting, &forwarded).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{client}: {answer:?}");
    }
    // The same client with a different made-up prefix is the same client.
    let again = register_forwarded(&trusting, "198.51.100.77, 203.0.113.1, 10.0.0.9").await;
    assert_eq!(again.status, StatusCode::TOO_MANY_REQUESTS, "{again:?}");

    // Trusting proxies elsewhere, the test's address is an ordinary client: its header is
    // its own word, ignored, and both registrations count against 127.0.0.1.
    let elsewhere = spawn_app_with(|config| {
        config.limits.signups_per_min = 1;
        config.limits.signups_burst = 1;
        config.limits.trusted_proxies = api::http::forwarded::parse_networks("10.0.0.0/8").unwrap();
    })
    .await;
    assert_eq!(
        register_forwarded(&elsewhere, "203.0.113.1").await.status,
        StatusCode::CREATED
    );
    let spoofed = register_forwarded(&elsewhere, "203.0.113.2").await;
    assert_eq!(spoofed.status, StatusCode::TOO_MANY_REQUESTS, "{spoofed:?}");

    // With no trusted proxy at all, a configured header is ignored as well.
    let direct = spawn_app_with(|config| {
        config.limits.signups_per_min = 1;
        config.limits.signups_burst = 1;
        config.limits.trusted_client_ip_header = Some("x-forwarded-for".parse().unwrap());
    })
    .await;
    assert_eq!(
        register_forwarded(&direct, "203.0.113.1").await.status,
        StatusCode::CREATED
    );
    let spoofed = register_forwarded(&direct, "203.0.113.2").await;
    assert_eq!(spoofed.status, StatusCode::TOO_MANY_REQUESTS, "{spoofed:?}");
}

#[tokio::test]
async fn a_user_holds_at_most_the_configured_number_of_unpaid_orders() {
    let app = spawn_app_with(|config| config.max_reserved_orders_per_user = 2).await;
    let user = app.create_user("hoarder").await;
    let product = app.create_product("Console", 100_000, 100).await;
    let order = json!({ "userId": user, "items": [{ "productId": product, "quantity": 1 }] });
    for _ in 0..2 {
        assert_eq!(
            app.command("/orders", order.clone()).await.status,
            StatusCode::ACCEPTED
        );
    }
    let third = app.command("/orders", order.clone()).await;
    assert_eq!(third.status, StatusCode::CONFLICT, "{third:?}");
    assert_eq!(third.code(), "ERR_ORDER_TOO_MANY_RESERVED");
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE user_id = $1")
        .bind(user)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(orders, 2);
    // Another user is not held back by this one's orders.
    let other = app.create_user("other").await;
    let theirs = json!({ "userId": other, "items": [{ "productId": product, "quantity": 1 }] });
    assert_eq!(app.command("/orders", theirs).await.status, StatusCode::ACCEPTED);
}

/// Every item of a paginated list, following `nextCursor` with pages of `limit`.
async fn every_page(app: &TestApp, path: &str, limit: usize, id: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page_path = match &cursor {
            Some(c) => format!("{path}?limit={limit}&cursor={c}"),
            None => format!("{path}?limit={limit}"),
        };
        let page = app.get(&page_path).await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        let items = page.body["items"].as_array().unwrap();
        assert!(items.len() <= limit);
        seen.extend(items.iter().map(|i| i[id].to_string()));
        match page.body["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return seen,
        }
    }
}

#[tokio::test]
async fn a_users_coupons_and_a_coupons_products_come_in_pages() {
    let app = spawn_app().await;
    let user = app.create_user("collector").await;
    let products: Vec<i64> = {
        let mut ids = Vec::new();
        for n in 0..5 {
            ids.push(app.create_product(&format!("P{n}"), 1_000, 10).await);
        }
        ids
    };
    let expires = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let mut coupons = Vec::new();
    for n in 0..5 {
        coupons.push(
            app.create_coupon(json!({
                "name": format!("C{n}"), "discountType": "FIXED", "discountValue": 100,
                "totalQuantity": 10, "expiresAt": expires, "applicableProductIds": products,
            }))
            .await,
        );
    }
    for coupon in &coupons {
        sqlx::query(
            "WITH issued AS (UPDATE coupons SET issued_quantity = issued_quantity + 1 WHERE id = $2)
             INSERT INTO user_coupons (id, coupon_id, user_id, request_id) VALUES ($1, $2, $3, $4)",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(coupon)
        .bind(user)
        .bind(uuid::Uuid::now_v7())
        .execute(&app.db)
        .await
        .unwrap();
    }
    let held = every_page(&app, &format!("/users/{user}/coupons"), 2, "couponId").await;
    let newest_first: Vec<String> = coupons.iter().rev().map(|c| c.to_string()).collect();
    assert_eq!(held, newest_first);

    let applicable = every_page(
        &app,
        &format!("/coupons/{}/applicable-products", coupons[0]),
        2,
        "productId",
    )
    .await;
    let by_id: Vec<String> = products.iter().map(|p| p.to_string()).collect();
    assert_eq!(applicable, by_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_first_requests_at_once_are_each_verified_as_their_own_user() {
    // Tokens not yet cached are looked up many per statement: none may get another's user.
    let app = spawn_app().await;
    let users = app.create_users(300).await;
    let forged: Vec<String> = (0..20)
        .map(|_| shared::domain::identity::new_token().unwrap().token)
        .collect();
    let app = &app;
    let first = users[0];
    let genuine = users.iter().map(|user| async move {
        let token = app.token_of(*user).unwrap();
        (Some(*user), balance_with(app, *user, &token).await)
    });
    let fakes = forged
        .iter()
        .map(|token| async move { balance_with(app, first, token).await });
    let (genuine, fakes) = tokio::join!(
        futures::future::join_all(genuine),
        futures::future::join_all(fakes)
    );
    for (user, answer) in genuine {
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        assert_eq!(answer.body["userId"].as_i64(), user);
    }
    for answer in fakes {
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{answer:?}");
    }
}
