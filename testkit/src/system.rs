//! The whole pipeline for tests: the real API in-process over a fresh database and a
//! topology of the test's own, and worker replicas as separate OS processes of the real
//! `worker` binary, which tests can stop (SIGTERM) or kill (SIGKILL) like an operator or a
//! crash would.

use std::process::Stdio;
use std::time::Duration;

use shared::store::invariants;
use tokio::process::{Child, Command};

use crate::app::{Answer, TestApp};

/// How long a test waits for everything it started to settle before it fails. Generous:
/// the assertion is that everything settles, not how fast.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// Reads `state` every 100 ms until it is `Ok`; fails the test with the last state read
/// after [`PATIENCE`].
async fn poll_until<F, Fut>(mut state: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let seen = state().await;
        let Err(seen) = seen else { return };
        assert!(tokio::time::Instant::now() < deadline, "{seen}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub struct System {
    pub app: TestApp,
    workers: std::sync::Mutex<Vec<Option<Child>>>,
    log_dir: std::path::PathBuf,
}

impl Drop for System {
    /// Workers die before the API's drop deletes the topology, so none of them re-declares
    /// its queues on the way out.
    fn drop(&mut self) {
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for mut child in workers.into_iter().flatten() {
            let pid = child.id();
            let _ = child.start_kill();
            if let Some(pid) = pid {
                wait_until_dead(pid);
            }
        }
    }
}

/// Waits (briefly, without a runtime) until a killed process is gone or a zombie.
fn wait_until_dead(pid: u32) {
    for _ in 0..200 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the parenthesised command name: "Z" is a zombie.
            Ok(stat)
                if !stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('Z')) =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => return,
        }
    }
}

impl System {
    /// The API plus `workers` worker processes.
    pub async fn start(workers: usize) -> Self {
        Self::start_with(workers, |_| {}).await
    }

    /// The API, configured by `adjust`, plus `workers` worker processes.
    pub async fn start_with(workers: usize, adjust: impl FnOnce(&mut api::ApiConfig)) -> Self {
        let app = crate::app::spawn_app_with(adjust).await;
        let log_dir = std::env::temp_dir().join("ecommerce-test-logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        let system = Self {
            app,
            workers: std::sync::Mutex::new(Vec::new()),
            log_dir,
        };
        for _ in 0..workers {
            system.spawn_worker().await;
        }
        system
    }

    /// Starts one more worker process; returns its index.
    pub async fn spawn_worker(&self) -> usize {
        self.spawn_worker_with(&[]).await
    }

    /// Starts one more worker process with some variables overridden; returns its index.
    pub async fn spawn_worker_with(&self, overrides: &[(&str, String)]) -> usize {
        let index = self.workers.lock().unwrap().len();
        let name = format!("{}w{index}", self.app.topology.prefix);
        let log = std::fs::File::create(self.log_dir.join(format!("{name}.log"))).unwrap();
        let topology = &self.app.topology;
        let child = Command::new(crate::binary("worker"))
            .env("DATABASE_URL", &self.app.database_url)
            .env("AMQP_PREFIX", &topology.prefix)
            .env("COMMAND_PARTITIONS", topology.partitions.to_string())
            .env("COMMAND_DELIVERY_LIMIT", topology.delivery_limit.to_string())
            .env(
                "COMMAND_QUEUE_EXPIRES_MS",
                topology.queue_expires_ms.unwrap_or(0).to_string(),
            )
            .env("WORKER_NAME", &name)
            .env("WORKER_METRICS_ADDR", "127.0.0.1:0")
            .env("WORKER_HEARTBEAT_MS", "200")
            .env("WORKER_REPLICA_TTL_MS", "1500")
            .env("WORKER_LEASE_TTL_MS", "2000")
            .env("WORKER_SWEEP_INTERVAL_MS", "300")
            .env("API_DEAD_AFTER_MS", "2000")
            .env("DATABASE_MAX_CONNECTIONS", "4")
            .env("RUST_LOG", "info,sqlx=warn,lapin=warn,amq_protocol=warn")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .envs(overrides.iter().map(|(k, v)| (*k, v.as_str())))
            .kill_on_drop(true)
            .spawn()
            .expect("the worker binary starts");
        self.workers.lock().unwrap().push(Some(child));
        index
    }

    /// What worker `index` has logged so far.
    pub fn worker_log(&self, index: usize) -> String {
        let name = format!("{}w{index}", self.app.topology.prefix);
        std::fs::read_to_string(self.log_dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// `GET /metrics` of worker `index`, at the address its "worker ready" line gives (it
    /// listens on a free port); waits for that line.
    pub async fn worker_metrics(&self, index: usize) -> String {
        let mut addr = None;
        poll_until(|| {
            addr = self
                .worker_log(index)
                .lines()
                .filter(|line| line.contains("worker ready"))
                .find_map(|line| {
                    let (_, after) = line.split_once("metrics_addr=")?;
                    after
                        .split_whitespace()
                        .next()?
                        .parse::<std::net::SocketAddr>()
                        .ok()
                });
            let found = addr.map(|_| ()).ok_or(format!("worker {index} is not ready"));
            async move { found }
        })
        .await;
        let addr = addr.unwrap();
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn worker_pid(&self, index: usize) -> u32 {
        self.workers.lock().unwrap()[index]
            .as_ref()
            .and_then(Child::id)
            .unwrap()
    }

    /// Runs `worker <args>` (an operator subcommand) against this system; its exit status
    /// and what it printed.
    pub async fn worker_command(&self, args: &[&str]) -> (std::process::ExitStatus, String) {
        let topology = &self.app.topology;
        let output = Command::new(crate::binary("worker"))
            .args(args)
            .env("DATABASE_URL", &self.app.database_url)
            .env("AMQP_PREFIX", &topology.prefix)
            .env("COMMAND_PARTITIONS", topology.partitions.to_string())
            .env("COMMAND_DELIVERY_LIMIT", topology.delivery_limit.to_string())
            .env("RUST_LOG", "warn")
            .output()
            .await
            .expect("the worker binary runs");
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        (output.status, text)
    }

    /// SIGKILL: no shutdown, no lease hand-over, unacked messages in flight.
    pub async fn kill_worker(&self, index: usize) {
        let mut child = self.take(index);
        child.kill().await.unwrap();
    }

    /// SIGTERM, then waits for the process to exit by itself.
    pub async fn stop_worker(&self, index: usize) {
        let mut child = self.take(index);
        let pid = child.id().unwrap();
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(PATIENCE, child.wait())
            .await
            .expect("the worker exits after SIGTERM")
            .unwrap();
        assert!(exit.success(), "the worker exited with {exit}");
    }

    fn take(&self, index: usize) -> Child {
        self.workers.lock().unwrap()[index]
            .take()
            .expect("the worker is running")
    }

    /// Live replicas, as the workers see each other.
    pub async fn live_replicas(&self) -> Vec<uuid::Uuid> {
        sqlx::query_scalar(
            "SELECT id FROM worker_replicas WHERE heartbeat_at > now() - interval '1.5 seconds' ORDER BY id",
        )
        .fetch_all(&self.app.db)
        .await
        .unwrap()
    }

    /// Waits until `replicas` replicas are live and every lease is held by the replica that
    /// rendezvous hashing gives it to: the load is spread as it will stay. With few
    /// partitions hashing may give one replica all of them (1 run in 128 with two replicas
    /// and 8 leases), so the number of distinct owners is what hashing says, not `replicas`.
    pub async fn wait_for_owners(&self, replicas: usize) {
        poll_until(|| async {
            let live = self.live_replicas().await;
            let held: Vec<(String, i32, uuid::Uuid)> = sqlx::query_as(
                "SELECT family, partition, owner FROM partition_leases
                 WHERE owner = ANY($1) AND expires_at > now()",
            )
            .bind(&live)
            .fetch_all(&self.app.db)
            .await
            .unwrap();
            let expected = self.leases();
            let where_hashing_says = held.iter().all(|(family, partition, owner)| {
                let partition = u16::try_from(*partition).unwrap();
                shared::domain::partition::rendezvous_owner(&live, family, partition) == Some(*owner)
            });
            (live.len() == replicas && held.len() as i64 == expected && where_hashing_says)
                .then_some(())
                .ok_or(format!(
                    "{} live replicas hold {} of {expected} leases, as hashing says: {where_hashing_says}",
                    live.len(),
                    held.len()
                ))
        })
        .await;
    }

    /// Waits until `replicas` replicas are live and every lease is held by one of them (with
    /// few partitions, rendezvous hashing may leave a replica without any).
    pub async fn wait_for_replicas(&self, replicas: usize) {
        poll_until(|| async {
            let live = self.live_replicas().await;
            let held: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM partition_leases WHERE owner = ANY($1) AND expires_at > now()",
            )
            .bind(&live)
            .fetch_one(&self.app.db)
            .await
            .unwrap();
            let expected = self.leases();
            (live.len() == replicas && held == expected)
                .then_some(())
                .ok_or(format!(
                    "{} live replicas hold {held} of {expected} leases",
                    live.len()
                ))
        })
        .await;
    }

    /// Waits until no request is PENDING; fails the test after [`PATIENCE`].
    pub async fn wait_until_settled(&self) {
        poll_until(|| async {
            let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM requests WHERE status = 'PENDING'")
                .fetch_one(&self.app.db)
                .await
                .unwrap();
            (pending == 0)
                .then_some(())
                .ok_or(format!("{pending} requests still pending"))
        })
        .await;
    }

    /// Leases of both command families.
    fn leases(&self) -> i64 {
        2 * i64::from(self.app.topology.partitions)
    }

    /// A coupon of `quantity`, valid for a day, for every product.
    pub async fn coupon(&self, quantity: i64) -> i64 {
        let expires = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
        self.app
            .create_coupon(serde_json::json!({
                "name": "Flash", "discountType": "FIXED", "discountValue": 1000,
                "totalQuantity": quantity, "expiresAt": expires,
            }))
            .await
    }

    /// Asks for `coupon` for `user` through the HTTP API.
    pub async fn issue(&self, coupon: i64, user: i64) -> Answer {
        self.app
            .command(
                &format!("/coupons/{coupon}/issue"),
                serde_json::json!({ "userId": user }),
            )
            .await
    }

    /// A product created through the admin API.
    pub async fn product(&self, price: i64, stock: i64) -> i64 {
        self.app.create_product("Item", price, stock).await
    }

    /// `POST /orders` for one user.
    pub async fn order(&self, user: i64, items: &[(i64, i64)]) -> Answer {
        let items: Vec<serde_json::Value> = items
            .iter()
            .map(|(product, quantity)| serde_json::json!({"productId": product, "quantity": quantity}))
            .collect();
        self.app
            .command("/orders", serde_json::json!({"userId": user, "items": items}))
            .await
    }

    /// `POST /orders/{id}/payment`.
    pub async fn pay(&self, order: &str, user: i64, coupon: Option<i64>) -> Answer {
        let mut body = serde_json::json!({"userId": user});
        if let Some(coupon) = coupon {
            body["couponId"] = serde_json::json!(coupon);
        }
        self.app.command(&format!("/orders/{order}/payment"), body).await
    }

    /// The terminal outcome of a request: `SUCCEEDED` or its error code.
    pub async fn outcome(&self, request_id: &str) -> String {
        let answer = self.app.settled(request_id, PATIENCE).await;
        match answer.body["status"].as_str() {
            Some("SUCCEEDED") => "SUCCEEDED".to_owned(),
            Some("FAILED") => answer.body["error"]["code"].as_str().unwrap_or("").to_owned(),
            other => panic!("request {request_id} is {other:?}"),
        }
    }

    /// Creates an order and waits until it is reserved; returns its id.
    pub async fn reserved_order(&self, user: i64, items: &[(i64, i64)]) -> String {
        let answer = self.order(user, items).await;
        assert_eq!(answer.status, reqwest::StatusCode::ACCEPTED, "{answer:?}");
        let outcome = self.outcome(answer.body["requestId"].as_str().unwrap()).await;
        assert_eq!(outcome, "SUCCEEDED");
        answer.body["orderId"].as_str().unwrap().to_owned()
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.app.db).await.unwrap()
    }

    /// Money invariants: no balance negative, every balance equal to its ledger, every paid
    /// order paid total minus discount with exactly one payment and one debit.
    pub async fn assert_money_invariants(&self) {
        assert_eq!(
            self.scalar("SELECT count(*) FROM balances WHERE amount < 0")
                .await,
            0
        );
        let mismatched = invariants::balances_off_ledger(&self.app.db, None).await.unwrap();
        assert_eq!(mismatched, 0, "a balance differs from its ledger");
        let wrong_paid = self
            .scalar(
                "SELECT count(*) FROM orders o
                 WHERE o.status = 'PAID' AND (
                   o.paid_amount <> o.total_amount - o.discount_amount
                   OR (SELECT count(*) FROM payments p WHERE p.order_id = o.id AND p.amount = o.paid_amount) <> 1
                   OR (SELECT COALESCE(sum(amount), 0) FROM balance_transactions t
                       WHERE t.order_id = o.id AND t.kind = 'PAYMENT') <> o.paid_amount)",
            )
            .await;
        assert_eq!(wrong_paid, 0, "a paid order's payment or debit is wrong");
        let unpaid_payments = self
            .scalar(
                "SELECT count(*) FROM payments p JOIN orders o ON o.id = p.order_id WHERE o.status <> 'PAID'",
            )
            .await;
        assert_eq!(unpaid_payments, 0);
        let coupon_misuse = self
            .scalar(
                "SELECT count(*) FROM user_coupons uc
                 WHERE (uc.used_at IS NOT NULL) <> EXISTS (SELECT 1 FROM payments p WHERE p.user_coupon_id = uc.id)",
            )
            .await;
        assert_eq!(coupon_misuse, 0, "a coupon's use and the payments disagree");
    }

    /// Stock invariants of one product: on hand + sold = `initial`, never oversold,
    /// reserved = units of RESERVED orders, sold = units of PAID orders.
    pub async fn assert_stock_reconciles(&self, product: i64, initial: i64) -> (i64, i64, i64) {
        let (stock, reserved, sold): (i64, i64, i64) =
            sqlx::query_as("SELECT stock, reserved, sold FROM products WHERE id = $1")
                .bind(product)
                .fetch_one(&self.app.db)
                .await
                .unwrap();
        assert_eq!(stock + sold, initial, "on hand + sold");
        let db = &self.app.db;
        let product = Some(&[product][..]);
        let out_of_bounds = invariants::products_out_of_bounds(db, product).await.unwrap();
        assert_eq!(
            out_of_bounds, 0,
            "stock out of bounds: {stock} on hand, {reserved} reserved"
        );
        let reserved_off = invariants::products_reserved_off_orders(db, product)
            .await
            .unwrap();
        assert_eq!(
            reserved_off, 0,
            "reserved units ({reserved}) differ from the RESERVED orders'"
        );
        let sold_off = invariants::products_sold_off_orders(db, product).await.unwrap();
        assert_eq!(sold_off, 0, "sold units ({sold}) differ from the PAID orders'");
        (stock, reserved, sold)
    }

    /// Asserts the coupon invariants in the database: never beyond the total, one per user,
    /// the issued count equal to the rows, a coupon held for each request that succeeded and
    /// for no other. Returns the number issued.
    pub async fn assert_coupon_invariants(&self, coupon: i64) -> i64 {
        let (issued, total): (i64, i64) =
            sqlx::query_as("SELECT issued_quantity, total_quantity FROM coupons WHERE id = $1")
                .bind(coupon)
                .fetch_one(&self.app.db)
                .await
                .unwrap();
        let db = &self.app.db;
        let coupon = Some(&[coupon][..]);
        let over_issued = invariants::coupons_over_issued(db, coupon).await.unwrap();
        assert_eq!(over_issued, 0, "issued {issued} of {total}");
        let off_held = invariants::coupons_issued_off_held(db, coupon).await.unwrap();
        assert_eq!(off_held, 0, "the issued count differs from the coupons held");
        let held_twice = invariants::coupons_held_twice(db, coupon).await.unwrap();
        assert_eq!(held_twice, 0, "a user holds the coupon twice");
        let requests_off = invariants::coupon_requests_off_held(db, coupon).await.unwrap();
        assert_eq!(requests_off, 0, "succeeded requests differ from coupons held");
        issued
    }
}

/// The value of `series` (a name with its labels, as rendered: `name{a="x",b="y"}`) in a
/// Prometheus text exposition; `None` when it is not there.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// A connection of the test's own to the broker.
pub async fn broker_connection() -> lapin::Connection {
    lapin::Connection::connect(
        &shared::config::BrokerSettings::from_env().unwrap().url,
        Default::default(),
    )
    .await
    .unwrap()
}

/// A connection of the test's own and a channel on it in confirm mode: what a test
/// publishes there is in its queue once the publish returns.
async fn confirmed_channel() -> (lapin::Connection, lapin::Channel) {
    let connection = broker_connection().await;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    (connection, channel)
}

/// A family's parked queue, on a connection of its own with confirmed publishes: what a
/// test parks is in the queue before the test goes on.
pub struct ParkedQueue {
    pub name: String,
    channel: lapin::Channel,
    _connection: lapin::Connection,
}

impl System {
    pub async fn parked_queue(&self, family: shared::domain::command::Family) -> ParkedQueue {
        let (connection, channel) = confirmed_channel().await;
        ParkedQueue {
            name: self.app.topology.parked_queue(family),
            channel,
            _connection: connection,
        }
    }
}

impl ParkedQueue {
    pub async fn depth(&self) -> u32 {
        shared::messaging::broker::queue_depth(&self.channel, &self.name)
            .await
            .unwrap()
    }

    /// Waits until the queue holds `depth` messages; fails the test after [`PATIENCE`].
    pub async fn wait_for_depth(&self, depth: u32) {
        poll_until(|| async move {
            let now = self.depth().await;
            if now == depth {
                Ok(())
            } else {
                Err(format!("{now} messages parked in {}, not {depth}", self.name))
            }
        })
        .await;
    }

    /// Takes the message at the head of the queue for good.
    pub async fn take(&self) -> Option<lapin::message::BasicGetMessage> {
        self.channel
            .basic_get(
                self.name.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
    }

    /// Parks a copy of the command of request `id`, as the dead-letter consumer would.
    pub async fn park(&self, id: uuid::Uuid, kind: shared::domain::command::RequestKind) {
        let body =
            serde_json::to_vec(&shared::domain::command::CommandMessage { request_id: id, kind }).unwrap();
        self.channel
            .basic_publish(
                "".into(),
                self.name.as_str().into(),
                Default::default(),
                &body,
                lapin::BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(id.to_string().into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

impl System {
    /// Leaves request `id` as an api that died before publishing it does: its one message
    /// taken out of the partition queue of `key` in `family` once the api's relay has put it
    /// there (no worker may run yet), and the request handed to an api process of
    /// `api_instances` that is dead (`swept: true`, so the sweeper publishes it at its next
    /// pass) or that looks alive for ever (`swept: false`: nobody sends it). Returns the
    /// partition.
    pub async fn lose_publish(
        &self,
        family: shared::domain::command::Family,
        key: i64,
        id: &str,
        swept: bool,
    ) -> u16 {
        self.wait_until_queued(family, key, 1).await;
        let topology = &self.app.topology;
        let partition = shared::domain::partition::partition_of(key, topology.partitions);
        let queue = topology.queue(family, partition);
        let connection = broker_connection().await;
        let channel = connection.create_channel().await.unwrap();
        let purged = channel
            .queue_purge(queue.as_str().into(), Default::default())
            .await
            .unwrap();
        assert_eq!(purged, 1, "the command's message was in {queue}");
        let heartbeat = if swept { "-infinity" } else { "infinity" };
        sqlx::query(
            "WITH api AS (
                INSERT INTO api_instances (id, name, heartbeat_at)
                VALUES (gen_random_uuid(), 'a test''s api', $2::timestamptz) RETURNING id)
             UPDATE requests SET accepted_by = (SELECT id FROM api) WHERE id = $1::uuid",
        )
        .bind(id)
        .bind(heartbeat)
        .execute(&self.app.db)
        .await
        .unwrap();
        let _ = connection.close(200, "done".into()).await;
        partition
    }

    /// Waits until the partition queue of `key` in `family` holds `count` messages: the
    /// api's relay publishes after the `202`, so a test that takes messages out of a queue
    /// (no worker running) waits for them first.
    pub async fn wait_until_queued(&self, family: shared::domain::command::Family, key: i64, count: u32) {
        let topology = &self.app.topology;
        let partition = shared::domain::partition::partition_of(key, topology.partitions);
        let queue = topology.queue(family, partition);
        let connection = broker_connection().await;
        let channel = connection.create_channel().await.unwrap();
        poll_until(|| async {
            match shared::messaging::broker::queue_depth(&channel, &queue).await {
                Ok(depth) if depth == count => Ok(()),
                depth => Err(format!("{queue} holds {depth:?} messages, not {count}")),
            }
        })
        .await;
        let _ = connection.close(200, "done".into()).await;
    }

    /// A worker replica's context inside the test process, on this system's database and
    /// topology, for driving one of its tasks (a sweep, say) step by step.
    pub fn worker_context(&self) -> worker::Context {
        let mut config = worker::WorkerConfig::from_env().unwrap();
        config.name = format!("{}in-test", self.app.topology.prefix);
        config.topology = self.app.topology.clone();
        worker::Context::new(config, self.app.db.clone())
    }

    /// When request `id` was settled (`NULL` while pending).
    pub async fn completed_at(&self, id: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        sqlx::query_scalar("SELECT completed_at FROM requests WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&self.app.db)
            .await
            .unwrap()
    }
}

impl System {
    /// Publishes `body` as it is to partition `partition` of `family`, confirmed, as a
    /// foreign or broken publisher would: no request stands behind it.
    pub async fn send_raw(&self, family: shared::domain::command::Family, partition: u16, body: &[u8]) {
        let (connection, channel) = confirmed_channel().await;
        let topology = &self.app.topology;
        let confirm = channel
            .basic_publish(
                topology.commands_exchange().as_str().into(),
                topology.queue(family, partition).as_str().into(),
                lapin::options::BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack() && confirm.take_message().is_none(), "not routed");
        let _ = connection.close(200, "done".into()).await;
    }
}
