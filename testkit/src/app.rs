//! `spawn_app()`: the real API on port 0 over a database of the test's own, and typed
//! helpers to drive it.

use std::net::SocketAddr;

use api::{ApiConfig, Application};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Strong enough for the API to start outside development mode, as in production.
pub const ADMIN_TOKEN: &str = "test-admin-token-of-at-least-32-characters";

pub struct TestApp {
    pub addr: SocketAddr,
    /// The command topology this app publishes to (unique to the test).
    pub topology: shared::messaging::topology::Topology,
    pub client: reqwest::Client,
    /// A pool on the app's database, for asserting what was (not) stored.
    pub db: PgPool,
    pub database_url: String,
    /// Dropped with the app, so the database goes when the test ends.
    _database: crate::database::TestDatabase,
    /// Where the app serves `/metrics`.
    pub metrics_addr: SocketAddr,
    /// The broker itself (not a test proxy), for deleting the topology at the end.
    amqp_url: String,
    shutdown: CancellationToken,
    /// The token of each user this app created, so that helpers act as that user the way a
    /// logged-in client would.
    tokens: std::sync::Mutex<std::collections::HashMap<i64, String>>,
    /// Who sent each command this app was answered `202` for: `GET /requests/{id}` is
    /// sent with that user's token.
    request_owners: std::sync::Mutex<std::collections::HashMap<String, i64>>,
}

/// A response reduced to what tests assert on.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    /// The body of a `202` without where its command stands now (`queuePosition`,
    /// `estimatedWaitMs`): what a replay of it repeats whatever settled in between.
    pub fn accepted(&self) -> Value {
        let mut body = self.body.clone();
        if let Some(fields) = body.as_object_mut() {
            fields.remove("queuePosition");
            fields.remove("estimatedWaitMs");
        }
        body
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// The API over a fresh database, with commands on a topology of the test's own (a unique
/// name prefix), after `adjust` had its say on the configuration.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut ApiConfig)) -> TestApp {
    crate::isolation::capture_logs();
    let database = crate::database::TestDatabase::create().await;
    let database_url = database.url().to_owned();
    let mut config = ApiConfig::from_env().expect("configuration");
    config.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.database.url = database_url.clone();
    config.admin_token = ADMIN_TOKEN.to_owned().into();
    config.development_mode = false;
    config.metrics_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.topology = crate::isolation::isolated_topology();
    // Tests run side by side, each with an API and workers, on one PostgreSQL.
    config.database.max_connections = 10;
    // Tests play many users from one address, some with many commands each: the rate
    // limits are off unless a test of them turns them on.
    config.limits.user_writes_per_sec = 0;
    config.limits.signups_per_min = 0;
    config.limits.auth_failures_per_min = 0;
    // Likewise connections: a test may hold hundreds at once from 127.0.0.1 (the crowd test
    // starts a process of its own with the default bound).
    config.connections.max_per_client = 0;
    // And reads in flight: some tests send hundreds at once (the shedding test sets it).
    config.max_reads_in_flight = 100_000;
    let amqp_url = config.broker.url.clone();
    adjust(&mut config);
    let app = Application::build(config).await.expect("the api starts");
    let addr = app.local_addr().unwrap();
    let metrics_addr = app.metrics_addr().unwrap();
    let db = app.state().db.clone();
    let topology = app.state().config.topology.clone();
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run(shutdown.clone()));
    let app = TestApp {
        addr,
        topology,
        client: reqwest::Client::new(),
        db,
        database_url,
        _database: database,
        metrics_addr,
        amqp_url,
        shutdown,
        tokens: Default::default(),
        request_owners: Default::default(),
    };
    // Tests start from a ready API (its broker connection may still be opening).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while app.get("/health/ready").await.status != StatusCode::OK && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    app
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        crate::isolation::delete_topology_blocking(&self.topology, &self.amqp_url);
    }
}

impl TestApp {
    /// Sends `send` until it answers `status`, or fails the test after `patience`.
    pub async fn eventually<F, Fut>(
        &self,
        status: StatusCode,
        patience: std::time::Duration,
        send: F,
    ) -> Answer
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Answer>,
    {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let answer = send().await;
            if answer.status == status {
                return answer;
            }
            assert!(tokio::time::Instant::now() < deadline, "still {answer:?}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// `GET /metrics` on the app's metrics address.
    /// `/health/ready` once it reports RabbitMQ down (its check is at most a second old),
    /// asserting that the api stays ready meanwhile: commands are accepted into PostgreSQL
    /// while the broker is away.
    pub async fn ready_with_broker_down(&self) -> Answer {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let ready = self.get("/health/ready").await;
            assert_eq!(ready.status, StatusCode::OK, "{ready:?}");
            if ready.body["rabbitmq"] == "DOWN" || tokio::time::Instant::now() > deadline {
                return ready;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    pub async fn metrics(&self) -> reqwest::Response {
        self.client
            .get(format!("http://{}/metrics", self.metrics_addr))
            .send()
            .await
            .expect("metrics answered")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends a request and reads the answer; `body` is sent as JSON when given.
    ///
    /// Without an `Authorization` header of its own, the request carries the token of the
    /// user it acts for, as a logged-in client's would: the `userId` of the path or the
    /// body, or the sender of the command whose `/requests/{id}` it reads, when this app
    /// created that user. Tests of identity itself pass their own header.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let explicit = headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("authorization"));
        let acting = if explicit {
            None
        } else {
            match self.acting_user(path, body.as_ref()) {
                Some(user) => Some(user),
                None => self.sender_in_database(path).await,
            }
        };
        self.send_as(acting, method, path, body, headers).await
    }

    /// Sends a request with no `Authorization` header but those in `headers`.
    pub async fn send_without_token(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        self.send_as(None, method, path, body, headers).await
    }

    /// `POST` with `user`'s token, whatever user the body names.
    pub async fn post_as(&self, user: i64, path: &str, body: Value) -> Answer {
        self.send_as(Some(user), Method::POST, path, Some(body), &[])
            .await
    }

    /// `GET` with `user`'s token, whatever user the path names.
    pub async fn get_as(&self, user: i64, path: &str) -> Answer {
        self.send_as(Some(user), Method::GET, path, None, &[]).await
    }

    /// Sends a request with the token of `acting`, if any, and remembers who sent a command.
    pub async fn send_as(
        &self,
        acting: Option<i64>,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = self.client.request(method, self.url(path));
        if let Some(token) = acting.and_then(|user| self.token_of(user)) {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let answer = read(request.send().await.expect("request sent")).await;
        // A registration's token, as a client keeps it.
        if let (Some(user), Some(token)) = (answer.body["userId"].as_i64(), answer.body["token"].as_str()) {
            self.remember_token(user, token);
        }
        if let (Some(user), Some(request_id)) = (acting, answer.body["requestId"].as_str()) {
            self.request_owners
                .lock()
                .unwrap()
                .insert(request_id.to_owned(), user);
        }
        answer
    }

    /// The user a request acts for, as far as a client would know it.
    fn acting_user(&self, path: &str, body: Option<&Value>) -> Option<i64> {
        let path = path.split('?').next().unwrap_or(path);
        let mut segments = path.trim_start_matches('/').split('/');
        match (segments.next(), segments.next()) {
            (Some("users"), Some(id)) => return id.parse().ok(),
            (Some("requests"), Some(id)) => return self.request_owners.lock().unwrap().get(id).copied(),
            _ => {}
        }
        body.and_then(|b| b["userId"].as_i64())
    }

    /// Starts the `api` binary of this crate on this app's database and topology: a second
    /// replica, as another process. Killed when dropped.
    /// `binary` is the api's executable (`env!("CARGO_BIN_EXE_api")` in the api's tests).
    pub async fn second_replica(&self, binary: &str) -> (tokio::process::Child, SocketAddr) {
        self.replica_with(binary, &[], None).await
    }

    /// [`TestApp::second_replica`] with more environment, and started with a soft limit of
    /// `soft_open_files` descriptors (the hard limit untouched), as a default system would.
    pub async fn replica_with(
        &self,
        binary: &str,
        env: &[(&str, &str)],
        soft_open_files: Option<u64>,
    ) -> (tokio::process::Child, SocketAddr) {
        let addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let mut command = match soft_open_files {
            // The shell's `ulimit -S` lowers the soft limit only, then the api replaces it.
            Some(soft) => {
                let mut shell = tokio::process::Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!("ulimit -Sn {soft} && exec \"$0\""))
                    .arg(binary);
                shell
            }
            None => tokio::process::Command::new(binary),
        };
        command
            .env("DATABASE_URL", &self.database_url)
            .env("DATABASE_MAX_CONNECTIONS", "3")
            .env("HTTP_ADDR", addr.to_string())
            .env("API_METRICS_ADDR", "127.0.0.1:0")
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("AMQP_PREFIX", &self.topology.prefix)
            .env("COMMAND_PARTITIONS", self.topology.partitions.to_string())
            .env("COMMAND_DELIVERY_LIMIT", self.topology.delivery_limit.to_string())
            .env(
                "COMMAND_QUEUE_EXPIRES_MS",
                self.topology.queue_expires_ms.unwrap_or(0).to_string(),
            )
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .kill_on_drop(true);
        let child = command.spawn().expect("the api binary starts");
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let live = client.get(format!("http://{addr}/health/live")).send().await;
            if live.is_ok_and(|r| r.status() == StatusCode::OK) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the second api never answered"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        (child, addr)
    }

    /// The sender of the request `/requests/{id}` names, as stored: for requests a test
    /// wrote itself rather than through this app.
    async fn sender_in_database(&self, path: &str) -> Option<i64> {
        let id = path.strip_prefix("/requests/")?.split('?').next()?;
        let id = uuid::Uuid::parse_str(id).ok()?;
        sqlx::query_scalar("SELECT user_id FROM requests WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.db)
            .await
            .ok()
            .flatten()
            .flatten()
    }

    /// The token this app was given for `user`.
    pub fn token_of(&self, user: i64) -> Option<String> {
        self.tokens.lock().unwrap().get(&user).cloned()
    }

    /// Remembers `token` as `user`'s (a test that issued itself one).
    pub fn remember_token(&self, user: i64, token: &str) {
        self.tokens.lock().unwrap().insert(user, token.to_owned());
    }

    /// Sends raw bytes with the given headers, for malformed-input tests.
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = self.client.request(method, self.url(path)).body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        read(request.send().await.expect("request sent")).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(Method::POST, path, Some(body), &[]).await
    }

    /// Sends a command as a well-behaved client does: a 503 (the broker is briefly
    /// unreachable or overloaded, e.g. when the machine is busy) is retried after its
    /// `Retry-After`. Nothing was accepted by a 503, so retrying cannot apply anything twice.
    pub async fn command(&self, path: &str, body: Value) -> Answer {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let answer = self.post(path, body.clone()).await;
            if answer.status != StatusCode::SERVICE_UNAVAILABLE || tokio::time::Instant::now() >= deadline {
                return answer;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }

    pub async fn post_with_key(&self, path: &str, body: Value, key: &str) -> Answer {
        self.send(Method::POST, path, Some(body), &[("Idempotency-Key", key)])
            .await
    }

    pub async fn admin(&self, method: Method, path: &str, body: Value) -> Answer {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        self.send(method, path, Some(body), &[("Authorization", auth.as_str())])
            .await
    }

    pub async fn create_user(&self, name: &str) -> i64 {
        let answer = self.post("/users", json!({ "name": name })).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
        let user = answer.body["userId"].as_i64().unwrap();
        self.remember_token(user, answer.body["token"].as_str().expect("a token"));
        user
    }

    pub async fn charge(&self, user: i64, amount: i64) -> Answer {
        self.post(
            &format!("/users/{user}/balance/charge"),
            json!({ "amount": amount }),
        )
        .await
    }

    pub async fn balance(&self, user: i64) -> i64 {
        let answer = self.get(&format!("/users/{user}/balance")).await;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        answer.body["balance"].as_i64().unwrap()
    }

    /// A coupon kind, created through the admin API.
    pub async fn create_coupon(&self, body: Value) -> i64 {
        let answer = self.admin(Method::POST, "/admin/coupons", body).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
        answer.body["couponId"].as_i64().unwrap()
    }

    /// `count` users created in one statement (setup for load tests; registration itself is
    /// tested through the API elsewhere).
    pub async fn create_users(&self, count: i64) -> Vec<i64> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "WITH u AS (INSERT INTO users (name) SELECT 'user ' || g FROM generate_series(1, $1) g RETURNING id)
             INSERT INTO balances (user_id) SELECT id FROM u RETURNING user_id",
        )
        .bind(count)
        .fetch_all(&self.db)
        .await
        .unwrap();
        let mut ids = ids;
        ids.sort_unstable();
        // Each with a token, made and stored as the API does.
        let tokens: Vec<shared::domain::identity::NewToken> = ids
            .iter()
            .map(|_| shared::domain::identity::new_token().unwrap())
            .collect();
        let hashes: Vec<Vec<u8>> = tokens.iter().map(|t| t.hash.to_vec()).collect();
        sqlx::query(
            "INSERT INTO user_tokens (user_id, token_hash) SELECT * FROM UNNEST($1::bigint[], $2::bytea[])",
        )
        .bind(&ids)
        .bind(&hashes)
        .execute(&self.db)
        .await
        .unwrap();
        for (user, token) in ids.iter().zip(&tokens) {
            self.remember_token(*user, &token.token);
        }
        ids
    }

    /// Polls a request until it is no longer PENDING, or `patience` runs out.
    pub async fn settled(&self, request_id: &str, patience: std::time::Duration) -> Answer {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let answer = self.get(&format!("/requests/{request_id}")).await;
            if answer.body["status"] != "PENDING" || tokio::time::Instant::now() >= deadline {
                return answer;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub async fn create_product(&self, name: &str, price: i64, stock: i64) -> i64 {
        let answer = self
            .admin(
                Method::POST,
                "/admin/products",
                json!({ "name": name, "price": price, "stock": stock }),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
        answer.body["productId"].as_i64().unwrap()
    }

    /// Rows in each table that requests can write, to prove a rejected request wrote nothing.
    pub async fn row_counts(&self) -> Vec<(String, i64)> {
        let mut counts = Vec::new();
        for table in [
            "users",
            "balances",
            "balance_transactions",
            "products",
            "idempotency_keys",
            "requests",
            "orders",
            "order_items",
        ] {
            let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(&self.db)
                .await
                .unwrap();
            counts.push((table.to_owned(), n));
        }
        counts
    }

    /// Balances and product columns, to prove a rejected request changed nothing.
    pub async fn stored_values(&self) -> Vec<i64> {
        sqlx::query_scalar(
            "SELECT v FROM (
               SELECT amount AS v, 1 AS t, user_id AS id FROM balances
               UNION ALL SELECT price, 2, id FROM products
               UNION ALL SELECT stock, 3, id FROM products
               UNION ALL SELECT reserved, 4, id FROM products
               UNION ALL SELECT issued_quantity, 5, id FROM coupons) s ORDER BY t, id",
        )
        .fetch_all(&self.db)
        .await
        .unwrap()
    }
}

pub async fn read(response: reqwest::Response) -> Answer {
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body read");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Answer {
        status,
        headers,
        body,
    }
}
