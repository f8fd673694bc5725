//! What settling a batch costs on the wire: round trips to PostgreSQL, counted by a proxy
//! between the worker's pool and the server, so the count is what the network carries
//! and not what the code believes it sends.
//!
//! A round trip is a flight of client bytes sent after the server last answered: pipelined
//! messages count once, a statement that waits for its answer counts once. The pool's own
//! checks (an empty `Sync` when a connection is taken out and when it is given back) are
//! counted apart: they hold no lock and are not part of the settling transaction.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use shared::domain::command::Family;
use sqlx::postgres::PgPoolOptions;
use testkit::System;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;
use worker::partitions::leases::Lease;

/// An empty `Sync` message: how sqlx's pool checks a connection.
const PING: &[u8] = b"S\0\0\0\x04";

/// A TCP proxy that records what the client sends, flight by flight.
#[derive(Default)]
struct Wire {
    /// Client bytes per flight, oldest first.
    flights: Vec<Vec<u8>>,
    /// Whether the server spoke since the client's last bytes: the next bytes open a flight.
    answered: bool,
}

async fn start_wire(upstream: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<Mutex<Wire>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let wire = Arc::new(Mutex::new(Wire {
        answered: true,
        ..Wire::default()
    }));
    let shared = Arc::clone(&wire);
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let outbound = tokio::net::TcpStream::connect(upstream).await.unwrap();
            inbound.set_nodelay(true).unwrap();
            outbound.set_nodelay(true).unwrap();
            let (mut from_client, mut to_client) = inbound.into_split();
            let (mut from_server, mut to_server) = outbound.into_split();
            let requests = Arc::clone(&shared);
            tokio::spawn(async move {
                let mut buffer = vec![0_u8; 1 << 20];
                while let Ok(n) = from_client.read(&mut buffer).await {
                    if n == 0 {
                        return;
                    }
                    {
                        let mut wire = requests.lock().unwrap();
                        if std::mem::take(&mut wire.answered) {
                            wire.flights.push(Vec::new());
                        }
                        if let Some(flight) = wire.flights.last_mut() {
                            flight.extend_from_slice(&buffer[..n]);
                        }
                    }
                    if to_server.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
            });
            let answers = Arc::clone(&shared);
            tokio::spawn(async move {
                let mut buffer = vec![0_u8; 1 << 20];
                while let Ok(n) = from_server.read(&mut buffer).await {
                    if n == 0 {
                        return;
                    }
                    // Marked before the client can see the answer, so its next bytes,
                    // sent because of it, open a new flight.
                    answers.lock().unwrap().answered = true;
                    if to_client.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, wire)
}

/// The message types of a flight (`Q` simple query, `P` parse, `B` bind, `E` execute...).
fn message_types(flight: &[u8]) -> String {
    let mut types = String::new();
    let mut rest = flight;
    while rest.len() >= 5 {
        types.push(char::from(rest[0]));
        let length = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        rest = rest.get(1 + length..).unwrap_or_default();
    }
    types
}

/// What one batch cost on the wire.
#[derive(Debug)]
struct Cost {
    /// Round trips of the settlement itself.
    round_trips: usize,
    /// The pool's connection checks around it.
    pool_checks: usize,
    /// The message types of each round trip, for the record.
    flights: Vec<String>,
}

struct Bench {
    system: System,
    ctx: worker::Context,
    wire: Arc<Mutex<Wire>>,
}

impl Bench {
    async fn start() -> Self {
        let system = System::start(0).await;
        let upstream = testkit::socket_of(&system.app.database_url);
        let (addr, wire) = start_wire(upstream).await;
        let url = system
            .app
            .database_url
            .replace(&upstream.to_string(), &addr.to_string());
        // One connection: every statement of a batch goes through the proxy on it.
        let db = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        let mut ctx = system.worker_context();
        ctx.db = db;
        worker::partitions::leases::ensure_rows(&ctx.db, &system.app.topology)
            .await
            .unwrap();
        Self { system, ctx, wire }
    }

    async fn lease(&self, family: Family) -> Lease {
        worker::partitions::leases::acquire(
            &self.system.app.db,
            self.ctx.replica,
            family,
            0,
            Duration::from_secs(3_600),
        )
        .await
        .unwrap()
        .expect("a free lease")
    }

    /// Settles `ids` as one batch and returns what it cost on the wire.
    async fn settle(&self, lease: &Lease, ids: &[Uuid]) -> Cost {
        let before = self.wire.lock().unwrap().flights.len();
        worker::settling::settle::settle_batch(&self.ctx, lease, ids)
            .await
            .unwrap();
        // The pool checks a connection given back in a task of its own: wait until it is
        // idle again, so its check is not counted in the next batch.
        while self.ctx.db.num_idle() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let wire = self.wire.lock().unwrap();
        let flights = &wire.flights[before..];
        let pool_checks = flights.iter().filter(|f| f.as_slice() == PING).count();
        Cost {
            round_trips: flights.len() - pool_checks,
            pool_checks,
            flights: flights
                .iter()
                .filter(|f| f.as_slice() != PING)
                .map(|f| message_types(f))
                .collect(),
        }
    }

    fn request_id(answer: &testkit::Answer) -> Uuid {
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
        answer.body["requestId"].as_str().unwrap().parse().unwrap()
    }

    async fn status(&self, id: Uuid) -> String {
        sqlx::query_scalar("SELECT status FROM requests WHERE id = $1")
            .bind(id)
            .fetch_one(&self.system.app.db)
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coupon_batch_is_settled_in_three_round_trips() {
    let bench = Bench::start().await;
    let coupon = bench.system.coupon(100).await;
    let users = bench.system.app.create_users(8).await;
    let mut ids = Vec::new();
    for user in &users {
        ids.push(Bench::request_id(&bench.system.issue(coupon, *user).await));
    }
    // The same user again: refused in the batch, from what the batch itself issued.
    ids.push(Bench::request_id(&bench.system.issue(coupon, users[7]).await));
    let lease = bench.lease(Family::Coupon).await;

    let cold = bench.settle(&lease, &ids[..2]).await;
    let warm = bench.settle(&lease, &ids[2..]).await;
    println!("coupon batch, first on its connection: {cold:?}");
    println!("coupon batch of {}: {warm:?}", ids.len() - 2);
    for id in &ids[..8] {
        assert_eq!(bench.status(*id).await, "SUCCEEDED");
    }
    assert_eq!(bench.status(ids[8]).await, "FAILED");
    assert_eq!(warm.round_trips, 3, "{warm:?}");
    // BEGIN with the fence and the locks; the write; COMMIT. Outside the transaction, the
    // pool checks the connection when it is taken and when it is given back.
    assert_eq!(warm.flights, ["Q", "BECS", "Q"], "{warm:?}");
    assert_eq!(warm.pool_checks, 2, "{warm:?}");
    bench.system.assert_coupon_invariants(coupon).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_batch_is_settled_in_three_round_trips() {
    let bench = Bench::start().await;
    let users = bench.system.app.create_users(3).await;
    for user in &users {
        assert_eq!(
            bench.system.app.charge(*user, 1_000_000).await.status,
            StatusCode::OK
        );
    }
    let (a, b) = (
        bench.system.product(10_000, 100).await,
        bench.system.product(3_000, 100).await,
    );
    let coupon = bench.system.coupon(10).await;
    let coupon_lease = bench.lease(Family::Coupon).await;
    let mut issues = Vec::new();
    for user in &users {
        issues.push(Bench::request_id(&bench.system.issue(coupon, *user).await));
    }
    bench.settle(&coupon_lease, &issues).await;

    // Each batch: a creation, its payment with a coupon, another creation, its payment
    // without one.
    let batch = |user: i64| {
        let system = &bench.system;
        async move {
            let first = system.order(user, &[(a, 1), (b, 2)]).await;
            let first_order = first.body["orderId"].as_str().unwrap().to_owned();
            let second = system.order(user, &[(b, 1)]).await;
            let second_order = second.body["orderId"].as_str().unwrap().to_owned();
            vec![
                Bench::request_id(&first),
                Bench::request_id(&system.pay(&first_order, user, Some(coupon)).await),
                Bench::request_id(&second),
                Bench::request_id(&system.pay(&second_order, user, None).await),
            ]
        }
    };
    let warm_up = batch(users[0]).await;
    let measured = [batch(users[1]).await, batch(users[2]).await].concat();
    let lease = bench.lease(Family::Order).await;

    let cold = bench.settle(&lease, &warm_up).await;
    let warm = bench.settle(&lease, &measured).await;
    println!("order batch, first on its connection: {cold:?}");
    println!("order batch of {}: {warm:?}", measured.len());
    for id in warm_up.iter().chain(&measured) {
        assert_eq!(bench.status(*id).await, "SUCCEEDED", "{id}");
    }
    assert_eq!(warm.round_trips, 3, "{warm:?}");
    // BEGIN with the fence and the locks; the write; COMMIT. Outside the transaction, the
    // pool checks the connection when it is taken and when it is given back.
    assert_eq!(warm.flights, ["Q", "BECS", "Q"], "{warm:?}");
    assert_eq!(warm.pool_checks, 2, "{warm:?}");
    bench.system.assert_money_invariants().await;
    bench.system.assert_stock_reconciles(a, 100).await;
    bench.system.assert_stock_reconciles(b, 100).await;
}
