//! Health, metrics, the OpenAPI document and its docs page, and start-up safety.

use reqwest::{Method, StatusCode};
use testkit::spawn_app;

#[tokio::test]
async fn liveness_and_readiness_answer_200_when_dependencies_are_up() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health/live").await.status, StatusCode::OK);
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status, StatusCode::OK, "{ready:?}");
    assert_eq!(ready.body["postgres"], "UP");
    assert_eq!(ready.body["rabbitmq"], "UP");
    assert!(ready.body.get("code").is_none(), "{ready:?}");
}

#[tokio::test]
async fn readiness_is_200_with_rabbitmq_unreachable_and_names_it_down() {
    let database = testkit::database::TestDatabase::create().await;
    let mut config = api::ApiConfig::from_env().unwrap();
    config.http_addr = ([127, 0, 0, 1], 0).into();
    config.database.url = database.url().to_owned();
    config.admin_token = testkit::ADMIN_TOKEN.to_owned().into();
    config.metrics_addr = ([127, 0, 0, 1], 0).into();
    // Nothing listens on port 1.
    config.broker.url = "amqp://guest:guest@127.0.0.1:1/%2f".to_owned();
    let app = api::Application::build(config)
        .await
        .expect("starts without RabbitMQ");
    let addr = app.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(app.run(shutdown.clone()));

    let live = reqwest::get(format!("http://{addr}/health/live")).await.unwrap();
    assert_eq!(live.status(), StatusCode::OK);
    // Commands are accepted into PostgreSQL while the broker is away, so the api is ready;
    // the body says what is down. (Readiness without PostgreSQL: tests/broker_outage.rs.)
    let ready = testkit::read(reqwest::get(format!("http://{addr}/health/ready")).await.unwrap()).await;
    assert_eq!(ready.status, StatusCode::OK, "{ready:?}");
    assert_eq!(ready.body["postgres"], "UP");
    assert_eq!(ready.body["rabbitmq"], "DOWN");
    assert!(ready.body.get("code").is_none(), "{ready:?}");
    shutdown.cancel();
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status_on_their_own_address_only() {
    let app = spawn_app().await;
    app.get("/products/424242").await;
    app.get("/health/live").await;
    // An invented method is counted under OTHER, so no client can grow the metric set.
    app.send(Method::from_bytes(b"BREW").unwrap(), "/products", None, &[])
        .await;
    let metrics = app.metrics().await;
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = metrics.text().await.unwrap();
    assert!(!text.contains(r#"method="BREW""#), "{text}");
    assert!(text.contains(r#"method="OTHER""#), "{text}");
    // Not on the public address.
    assert_eq!(app.get("/metrics").await.status, StatusCode::NOT_FOUND);
    let counter = text
        .lines()
        .find(|l| {
            l.starts_with("http_requests_total{")
                && l.contains(r#"route="/products/{productId}""#)
                && l.contains(r#"status="404""#)
        })
        .unwrap_or_else(|| panic!("no request counter for the 404 in:\n{text}"));
    assert!(counter.split_whitespace().last().unwrap().parse::<f64>().unwrap() >= 1.0);
    assert!(text.contains("http_request_duration_seconds_bucket{"), "{text}");
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_of_the_contract() {
    let app = spawn_app().await;
    let doc = app.get("/openapi.json").await;
    assert_eq!(doc.status, StatusCode::OK);
    assert!(doc.body["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc.body["paths"].as_object().unwrap();
    for (path, method) in [
        ("/users", "post"),
        ("/users/{userId}/balance", "get"),
        ("/users/{userId}/balance/charge", "post"),
        ("/users/{userId}/balance/transactions", "get"),
        ("/products", "get"),
        ("/products/{productId}", "get"),
        ("/admin/products", "post"),
        ("/admin/products/{productId}", "patch"),
        ("/health/live", "get"),
        ("/health/ready", "get"),
        ("/users/{userId}/tokens", "post"),
        ("/users/{userId}/tokens/current", "delete"),
        ("/users/{userId}/tokens", "get"),
        ("/users/{userId}/tokens", "delete"),
        ("/users/{userId}/tokens/{tokenId}", "delete"),
        ("/requests/{requestId}", "get"),
        ("/admin/coupons", "post"),
        ("/coupons/{couponId}", "get"),
        ("/coupons/{couponId}/issue", "post"),
        ("/users/{userId}/coupons", "get"),
        ("/coupons/{couponId}/applicable-products", "get"),
        ("/orders", "post"),
        ("/orders/{orderId}/payment", "post"),
        ("/orders/{orderId}/cancel", "post"),
        ("/users/{userId}/orders", "get"),
        ("/users/{userId}/orders/{orderId}", "get"),
        ("/products/popular", "get"),
        ("/admin/batch/popular-products/run", "post"),
        ("/users/{userId}/requests", "get"),
        ("/admin/partitions", "get"),
        ("/admin/batch/consistency-audit/run", "post"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
    // A pending request's place: an integer when known, absent (never null) otherwise.
    let schemas = &doc.body["components"]["schemas"];
    for schema in ["RequestStatus", "Accepted"] {
        for field in ["queuePosition", "estimatedWaitMs"] {
            let property = &schemas[schema]["properties"][field];
            assert_eq!(property["type"], "integer", "{schema}.{field}: {property}");
        }
    }
    let partition = &schemas["PartitionView"]["properties"];
    for field in [
        "family",
        "partition",
        "owner",
        "ready",
        "unacked",
        "pending",
        "oldestPendingAt",
        "settledPerSec",
        "lastSettledAt",
    ] {
        assert!(
            partition.get(field).is_some(),
            "PartitionView.{field} missing: {partition}"
        );
    }
    // And every documented route answers something other than "no such route".
    for path in paths.keys() {
        let concrete = path
            .replace("{userId}", "1")
            .replace("{productId}", "1")
            .replace("{couponId}", "1")
            .replace("{requestId}", "x")
            .replace("{orderId}", "x");
        let answer = app.get(&concrete).await;
        assert_ne!(
            answer.code(),
            "ERR_NOT_FOUND",
            "{path} is documented but not routed"
        );
    }

    // Answers every route of a kind can give are documented on all of them, and what a
    // response creates links to the operations that use it.
    let charge = &paths["/users/{userId}/balance/charge"]["post"]["responses"];
    for status in ["409", "413", "415", "422"] {
        assert!(charge.get(status).is_some(), "charge does not document {status}");
    }
    // A command's answers declare, as required, the headers the handlers always send.
    for (path, method) in [
        ("/coupons/{couponId}/issue", "post"),
        ("/orders", "post"),
        ("/orders/{orderId}/payment", "post"),
    ] {
        let responses = &paths[path][method]["responses"];
        for (status, header) in [
            ("202", "Location"),
            ("202", "Retry-After"),
            ("429", "Retry-After"),
            ("503", "Retry-After"),
        ] {
            assert_eq!(
                responses[status]["headers"][header]["required"], true,
                "{method} {path} does not declare {header} on {status}"
            );
        }
    }
    // A keyed operation's answers say that a replay is marked, optionally (a first answer
    // is not); a 413 is answered before the key is read, so never a replay.
    for (path, method, status) in [
        ("/users/{userId}/balance/charge", "post", "200"),
        ("/orders", "post", "202"),
    ] {
        let responses = &paths[path][method]["responses"];
        assert_eq!(
            responses[status]["headers"]["Idempotent-Replayed"]["required"], false,
            "{method} {path} does not declare Idempotent-Replayed on {status}"
        );
        assert!(responses["413"]["headers"].get("Idempotent-Replayed").is_none());
    }
    let link = &paths["/users"]["post"]["responses"]["201"]["links"]["GetBalance"];
    assert_eq!(link["operationId"], "get_balance");
    assert_eq!(link["parameters"]["userId"], "$response.body#/userId");
    let operation_ids: Vec<&str> = paths
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .filter_map(|op| op["operationId"].as_str())
        .collect();
    for item in paths.values() {
        for op in item.as_object().unwrap().values() {
            for response in op["responses"].as_object().into_iter().flat_map(|r| r.values()) {
                for link in response["links"].as_object().into_iter().flat_map(|l| l.values()) {
                    let target = link["operationId"].as_str().unwrap();
                    assert!(
                        operation_ids.contains(&target),
                        "a link to {target}, which does not exist"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn the_docs_page_serves_swagger_ui_over_the_openapi_document_from_the_api_itself() {
    let app = spawn_app().await;
    let page = app.client.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"data-openapi-url="/openapi.json""#), "{html}");

    // Every file the page loads comes from the api (no CDN), with its content type, and is
    // public like the page.
    let assets: Vec<&str> = ["src=\"", "href=\""]
        .iter()
        .flat_map(|attribute| html.split(attribute).skip(1))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert!(assets.len() >= 3, "{html}");
    for asset in assets {
        assert!(asset.starts_with("/docs/"), "{asset} is not served by the api");
        let expected = match asset.split('?').next().unwrap().rsplit('.').next().unwrap() {
            "js" => "text/javascript; charset=utf-8",
            "css" => "text/css; charset=utf-8",
            "png" => "image/png",
            other => panic!("{asset}: an asset of unexpected kind {other}"),
        };
        let answer = app.client.get(app.url(asset)).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK, "{asset}");
        assert_eq!(answer.headers()["content-type"], expected, "{asset}");
        assert!(
            answer.headers()["cache-control"]
                .to_str()
                .unwrap()
                .contains("max-age="),
            "{asset}"
        );
        assert!(!answer.bytes().await.unwrap().is_empty(), "{asset}");
    }

    // With a trailing slash, the browser is sent to the page; an unknown file is the
    // contract's 404.
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let slash = no_redirects.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(slash.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(slash.headers()["location"], "/docs");
    assert_eq!(app.get("/docs/nothing.js").await.code(), "ERR_NOT_FOUND");
}

#[tokio::test]
async fn migrations_are_safe_when_several_processes_start_at_once() {
    let database = testkit::database::TestDatabase::create().await;
    let settings = shared::config::DatabaseSettings::new(database.url(), 2);
    let starts = (0..4).map(|i| {
        let settings = settings.clone();
        tokio::spawn(async move {
            shared::store::db::connect_and_migrate(&settings, &format!("starter-{i}")).await
        })
    });
    let pools: Vec<_> = futures::future::join_all(starts).await;
    let mut pool = None;
    for started in pools {
        pool = Some(started.unwrap().expect("every process starts"));
    }
    let pool = pool.unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied, shared::store::db::MIGRATOR.iter().count() as i64);
    // A migration that failed half-way and was retried can leave an index that exists but
    // is not valid (an interrupted CREATE INDEX CONCURRENTLY); none may be.
    let invalid: Vec<String> =
        sqlx::query_scalar("SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(invalid.is_empty(), "invalid indexes: {invalid:?}");
}

/// During a rolling upgrade an api of the previous version inserts order commands without
/// `requests.order_id`; the workers of this version lock orders by that column, so it is
/// filled from the payload on insert, and only when missing.
#[tokio::test]
async fn an_order_command_stored_without_its_order_id_gets_it_from_its_payload() {
    let app = spawn_app().await;
    let user = app.create_user("Ann").await;
    let (order, other) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let (old_style, new_style, coupon) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    for (id, kind, order_id) in [
        (old_style, "ORDER_PAY", None),
        (new_style, "ORDER_PAY", Some(other)),
        (coupon, "COUPON_ISSUE", None),
    ] {
        sqlx::query(
            "INSERT INTO requests (id, kind, partition_key, payload, user_id, order_id)
             VALUES ($1, $2, $3, jsonb_build_object('orderId', $4::text, 'userId', $3), $3, $5)",
        )
        .bind(id)
        .bind(kind)
        .bind(user)
        .bind(order.to_string())
        .bind(order_id)
        .execute(&app.db)
        .await
        .unwrap();
    }
    let stored: Vec<(uuid::Uuid, Option<uuid::Uuid>)> =
        sqlx::query_as("SELECT id, order_id FROM requests WHERE id = ANY($1) ORDER BY id")
            .bind([old_style, new_style, coupon])
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(
        stored,
        [(old_style, Some(order)), (new_style, Some(other)), (coupon, None)],
        "filled from the payload when missing, left alone when written, only for order commands"
    );
}
