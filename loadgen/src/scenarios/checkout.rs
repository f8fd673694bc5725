//! `checkout`: every user (a share of them after charging their balance, with an
//! `Idempotency-Key`) places an order (`POST /orders`), polls until it is `RESERVED`,
//! pays (`POST /orders/{id}/payment`, a share of them with a coupon they hold), and polls
//! until the payment is settled. A journey is one job: closed loop, `--concurrency` users
//! shop at once; open loop, journeys start at `--rate` per second.
//!
//! Users are spread over the products in turn and each product has exactly the stock its
//! share of users will buy, so a single unit sold twice would leave someone's order
//! rejected (and fail a check).
//!
//! Figures ([`CheckoutFigures`]):
//! - `paid_per_sec`: orders paid / (last payment − start of the load), end to end, DB clock.
//! - `journeys_per_sec`: journeys that ended paid per second of load, as the client saw them.
//! - latencies `POST /orders` and `POST /orders/{id}/payment` (accept latency), `poll`,
//!   `journey (client)`, and `accept to paid (DB)`: order accepted to order paid.
//!
//! Against the synchronous peer (`--commands-url`) the order and the payment go to the peer,
//! whose `200` is final (the order `RESERVED`, then `PAID`); a refusal there is the
//! contract's error code at once. Charges, setup and reads stay with the api.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tokio::time::Instant;
use uuid::Uuid;

use super::{base_params, db_latency, dispatch_lag, Harness, Outcomes, Settler};
use crate::checks::{self, CheckoutFacts, PublishedEvents};
use crate::cli::{CheckoutArgs, EventsSeenBy};
use crate::client::{Answer, Api};
use crate::event_tap::EventTap;
use crate::figures::{CheckoutFigures, Figures};
use crate::histogram::Recorder;
use crate::results::ScenarioResult;
use crate::schedule;
use crate::setup;

/// Balance of every user: more than any order costs.
const BALANCE: i64 = 1_000_000;
/// Discount of the coupon some users pay with.
const DISCOUNT: i64 = 1_000;
/// What a charging user adds to their balance: unlike the seeded balance, so that the
/// checks can count the charges made through the API.
pub const CHARGE: i64 = 10_000;

/// One user's purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journey {
    pub user: i64,
    pub product: i64,
    pub coupon: Option<i64>,
    /// Whether the user charges [`CHARGE`] first.
    pub charge: bool,
}

/// Users in random order, each buying one unit of the product after the last one's, the
/// first `holders` of them paying with `coupon`, the last `chargers` charging first.
pub fn plan_journeys(
    users: &[i64],
    products: &[i64],
    coupon: i64,
    holders: usize,
    chargers: usize,
    seed: u64,
) -> Vec<Journey> {
    let first_charger = users.len().saturating_sub(chargers);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order = users.to_vec();
    order.shuffle(&mut rng);
    order
        .iter()
        .enumerate()
        .filter_map(|(i, &user)| {
            Some(Journey {
                user,
                product: *products.get(i % products.len().max(1))?,
                coupon: (i < holders).then_some(coupon),
                charge: i >= first_charger,
            })
        })
        .collect()
}

/// What the journeys share while they run.
struct Shop {
    /// The api: charges.
    api: Api,
    /// Where orders and payments go: the api (waiting for the settlement), or the peer.
    commands: Api,
    settler: Settler,
    recorder: Recorder,
    outcomes: Outcomes,
    paid: Mutex<Vec<(i64, Uuid)>>,
    failed: AtomicU64,
    polls: AtomicU64,
    patience: Duration,
}

/// How a journey can go wrong.
enum Stop {
    /// An answer the contract does not allow here, or no answer.
    Unexpected(String),
    /// A command that settled as failed.
    Refused(String),
}

impl Shop {
    async fn journey(&self, journey: Journey, intended: Instant) {
        match self.shop(&journey, intended).await {
            Ok(order) => {
                self.recorder.record("journey (client)", intended.elapsed());
                self.paid
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((journey.user, order));
            }
            Err(Stop::Unexpected(outcome)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.outcomes.count(&outcome, false);
            }
            Err(Stop::Refused(outcome)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.outcomes.count(&outcome, true);
            }
        }
    }

    /// Records an accept answer: `202`, or `200` with the settled request when the command
    /// waited for it (the peer: always); the answer, or why not. The peer refuses with the
    /// contract's code at once, which is a correct answer that ends the journey.
    fn accepted(
        &self,
        label: &str,
        answer: anyhow::Result<Answer>,
        latency: Duration,
    ) -> Result<Answer, Stop> {
        let status = match (&answer, self.settler) {
            (Ok(a), Settler::Peer) if (400..500).contains(&a.status) && a.code.is_some() => {
                self.recorder.record(label, latency);
                return Err(Stop::Refused(format!("{label} {}", a.outcome())));
            }
            (Ok(a), _) if a.status == 200 => 200,
            (_, Settler::Peer) => 200,
            _ => 202,
        };
        self.answered(label, answer, latency, status)
    }

    /// Records an answer that should be `status`; the answer, or why not.
    fn answered(
        &self,
        label: &str,
        answer: anyhow::Result<Answer>,
        latency: Duration,
        status: u16,
    ) -> Result<Answer, Stop> {
        self.recorder.record(label, latency);
        let answer = answer.map_err(|e| Stop::Unexpected(format!("{label}: transport error: {e}")))?;
        let outcome = format!("{label} {}", answer.outcome());
        if answer.status != status {
            return Err(Stop::Unexpected(outcome));
        }
        self.outcomes.count(&outcome, true);
        Ok(answer)
    }

    async fn shop(&self, journey: &Journey, intended: Instant) -> Result<Uuid, Stop> {
        let user = journey.user;
        if journey.charge {
            let sent = Instant::now();
            let charged = self
                .api
                .charge(user, CHARGE, Some(&format!("checkout-{user}-charge")))
                .await;
            self.answered("POST /users/{id}/balance/charge", charged, sent.elapsed(), 200)?;
        }
        let created = self
            .commands
            .create_order(user, journey.product, 1, &format!("checkout-{user}-order"))
            .await;
        let created = self.accepted("POST /orders", created, intended.elapsed())?;
        let (Some(order), Some(request)) = (created.uuid_field("orderId"), created.request_id()) else {
            return Err(Stop::Unexpected(
                "POST /orders: answer without orderId".to_owned(),
            ));
        };
        self.settled("order", request, &created).await?;

        let sent = Instant::now();
        let paying = self
            .commands
            .pay_order(order, user, journey.coupon, &format!("checkout-{user}-payment"))
            .await;
        let paying = self.accepted("POST /orders/{id}/payment", paying, sent.elapsed())?;
        let Some(request) = paying.request_id() else {
            return Err(Stop::Unexpected("payment: answer without requestId".to_owned()));
        };
        self.settled("payment", request, &paying).await?;
        Ok(order)
    }

    /// Waits until the request an accept answered is terminal: at once when the command
    /// waited and came back settled (`200`), else with `GET /requests/{id}?wait=` (woken
    /// when the request settles, never polling in a loop); an error unless it `SUCCEEDED`.
    async fn settled(&self, what: &str, request: Uuid, accepted: &Answer) -> Result<(), Stop> {
        let deadline = Instant::now() + self.patience;
        let mut answer = accepted.clone();
        loop {
            match answer.str_field("status") {
                Some("SUCCEEDED") => return Ok(()),
                Some("FAILED") => {
                    let code = answer
                        .body
                        .pointer("/error/code")
                        .and_then(|c| c.as_str())
                        .unwrap_or("?");
                    return Err(Stop::Refused(format!("{what} FAILED {code}")));
                }
                _ if Instant::now() >= deadline => {
                    return Err(Stop::Unexpected(format!(
                        "{what} still PENDING after the drain timeout"
                    )));
                }
                _ => {}
            }
            let sent = Instant::now();
            let read = self.commands.request_status_waiting(request, WAIT_SECS).await;
            self.recorder
                .record("GET /requests/{id}?wait (poll)", sent.elapsed());
            self.polls.fetch_add(1, Ordering::Relaxed);
            answer = read.map_err(|e| Stop::Unexpected(format!("poll: transport error: {e}")))?;
            if answer.status != 200 {
                return Err(Stop::Unexpected(format!("poll {}", answer.outcome())));
            }
        }
    }
}

/// Seconds a command, or a read of its request, waits for the request to settle.
const WAIT_SECS: u64 = 10;

/// Users, products with exactly the stock those users will buy, a coupon handed out to a
/// share of them, and the journeys.
struct Fixture {
    users: Vec<i64>,
    products: Vec<i64>,
    stock: i64,
    coupon: i64,
    holders: usize,
    plan: Vec<Journey>,
}

async fn fixture(
    harness: &Harness,
    args: &CheckoutArgs,
    prefix: &str,
    users: usize,
    seed: u64,
) -> anyhow::Result<Fixture> {
    let users = setup::create_users(&harness.db, &harness.api, prefix, users, BALANCE).await?;
    let count = args.products.max(1);
    // Each product is bought by every count-th user: exactly its share, rounded up.
    let stock = i64::try_from(users.len().div_ceil(count))
        .unwrap_or(i64::MAX)
        .max(1);
    let products: Vec<i64> = setup::create_products(&harness.api, prefix, count, stock)
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let holders =
        ((args.coupon_share.clamp(0.0, 1.0) * users.len() as f64).round() as usize).min(users.len());
    let coupon = harness
        .api
        .create_coupon(
            &format!("{prefix}coupon"),
            DISCOUNT,
            i64::try_from(holders.max(1)).unwrap_or(1),
        )
        .await?;
    let chargers =
        ((args.charge_share.clamp(0.0, 1.0) * users.len() as f64).round() as usize).min(users.len());
    let plan = plan_journeys(&users, &products, coupon, holders, chargers, seed);
    let holder_ids: Vec<i64> = plan
        .iter()
        .filter(|j| j.coupon.is_some())
        .map(|j| j.user)
        .collect();
    setup::hand_out_coupon(&harness.db, coupon, &holder_ids).await?;
    Ok(Fixture {
        users,
        products,
        stock,
        coupon,
        holders,
        plan,
    })
}

impl Shop {
    fn new(harness: &Harness, args: &CheckoutArgs) -> Self {
        let commands = match harness.settler {
            // Commands wait for their answer: no polling loop.
            Settler::Pipeline => harness.commands.clone().waiting(WAIT_SECS),
            // The peer's answer is final.
            Settler::Peer => harness.commands.clone(),
        };
        Self {
            api: harness.api.clone(),
            commands,
            settler: harness.settler,
            recorder: Recorder::tapped(args.common.latency_tap.clone()),
            outcomes: Outcomes::default(),
            paid: Mutex::new(Vec::new()),
            failed: AtomicU64::new(0),
            polls: AtomicU64::new(0),
            patience: args.common.drain_timeout(),
        }
    }
}

/// Journeys of their own before the measured ones, then ANALYZE (see `--warmup`).
async fn warm_up(harness: &Harness, args: &CheckoutArgs, prefix: &str) -> anyhow::Result<()> {
    if args.common.warmup == 0 {
        return Ok(());
    }
    // Two commands a journey.
    let journeys = (args.common.warmup / 2).max(1);
    let warm = fixture(
        harness,
        args,
        &format!("{prefix}warmup-"),
        journeys,
        args.common.seed + 1,
    )
    .await?;
    let shop = Arc::new(Shop::new(harness, args));
    schedule::drive(
        warm.plan.into_iter(),
        harness.warmup_pace(),
        None,
        move |journey, intended| {
            let shop = Arc::clone(&shop);
            async move { shop.journey(journey, intended).await }
        },
    )
    .await;
    harness
        .wait_until_settled(
            "SELECT count(*) FROM requests
             WHERE kind IN ('ORDER_CREATE', 'ORDER_PAY') AND partition_key = ANY($1) AND status = 'PENDING'",
            warm.users,
        )
        .await?;
    harness.analyze().await
}

pub async fn run(args: &CheckoutArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let harness = Harness::connect(common).await?;
    let prefix = setup::run_prefix("checkout");
    let Fixture {
        users,
        products: product_ids,
        stock,
        coupon,
        holders,
        plan,
    } = fixture(&harness, args, &prefix, args.users, common.seed).await?;
    warm_up(&harness, args, &prefix).await?;
    println!(
        "checkout: {} users, {} products of {stock} units, {holders} paying with coupon {coupon}, {}",
        users.len(),
        product_ids.len(),
        common.pace().describe()
    );

    let charged: Vec<i64> = plan.iter().filter(|j| j.charge).map(|j| j.user).collect();
    let events = match (harness.settler, args.events_seen_by) {
        (Settler::Peer, _) => PublishedEvents::NotPublished,
        (Settler::Pipeline, EventsSeenBy::DataPlatform) => PublishedEvents::ReceivedByDataPlatform,
        // Bound before the first of the run's orders exists, so no event of theirs passes
        // it by.
        (Settler::Pipeline, EventsSeenBy::Tap) => {
            PublishedEvents::Tap(Box::new(EventTap::bind(&args.amqp_url, &args.amqp_prefix).await?))
        }
    };
    let shop = Arc::new(Shop::new(&harness, args));
    let window = harness.begin().await;
    let load = Arc::clone(&shop);
    let timing = schedule::drive(plan.into_iter(), common.pace(), None, move |journey, intended| {
        let shop = Arc::clone(&load);
        async move { shop.journey(journey, intended).await }
    })
    .await;
    let drained = harness
        .wait_until_settled(
            "SELECT count(*) FROM requests
             WHERE kind IN ('ORDER_CREATE', 'ORDER_PAY') AND partition_key = ANY($1) AND status = 'PENDING'",
            users.clone(),
        )
        .await?;
    let measured = harness.end(window).await;

    let load_seconds = timing.elapsed().as_secs_f64();
    let (paid, last_paid): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM max(paid_at))::float8 FROM orders
         WHERE user_id = ANY($1) AND status = 'PAID'",
    )
    .bind(&users)
    .fetch_one(&harness.db)
    .await?;
    let started = timing.started_at.timestamp_micros() as f64 / 1e6;
    let paid_seen = shop.paid.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let paid_in = last_paid.map(|last| last - started);
    let figures = Figures::Checkout(CheckoutFigures {
        journeys: timing.dispatched,
        paid: u64::try_from(paid).unwrap_or_default(),
        load_seconds,
        journeys_per_sec: paid_seen.len() as f64 / load_seconds,
        polls_per_journey: shop.polls.load(Ordering::Relaxed) as f64 / (timing.dispatched.max(1)) as f64,
        paid_per_sec: paid_in.map(|seconds| paid as f64 / seconds),
        last_payment_after_start_seconds: paid_in,
        dispatch: dispatch_lag(common, &timing),
        db: measured.db_activity(paid as f64),
    });
    let mut latencies = shop.recorder.summaries();
    for (label, sql) in [
        (
            "accept to paid (DB)",
            "SELECT extract(epoch FROM paid_at - created_at)::float8 * 1000 AS ms
             FROM orders WHERE user_id = ANY($1) AND status = 'PAID'",
        ),
        (
            "order create: accept to settled (DB)",
            "SELECT extract(epoch FROM completed_at - created_at)::float8 * 1000 AS ms
             FROM requests WHERE kind = 'ORDER_CREATE' AND partition_key = ANY($1) AND status <> 'PENDING'",
        ),
        (
            "payment: accept to settled (DB)",
            "SELECT extract(epoch FROM completed_at - created_at)::float8 * 1000 AS ms
             FROM requests WHERE kind = 'ORDER_PAY' AND partition_key = ANY($1) AND status <> 'PENDING'",
        ),
    ] {
        if let Some(l) = db_latency(&harness.db, sql, users.clone()).await? {
            latencies.insert(label.to_owned(), l);
        }
    }

    let facts = CheckoutFacts {
        users: users.clone(),
        products: product_ids.iter().map(|id| (*id, stock)).collect(),
        coupon,
        charged,
        charge: CHARGE,
        paid: paid_seen,
        expected_paid: users.len() as i64,
        unexpected_answers: shop.outcomes.unexpected(),
        failed_journeys: shop.failed.load(Ordering::Relaxed),
        settler: harness.settler,
        events,
    };
    let checks = checks::checkout(&harness.db, &harness.api, &facts).await?;
    if let PublishedEvents::Tap(tap) = facts.events {
        tap.close().await;
    }
    let mut notes = Vec::new();
    if drained.is_none() {
        notes.push(format!(
            "requests were still pending {} s after the load",
            common.drain_timeout_secs
        ));
    }
    let mut params = base_params(common);
    params.insert("users".to_owned(), users.len().to_string());
    params.insert("products".to_owned(), product_ids.len().to_string());
    params.insert("coupon_holders".to_owned(), holders.to_string());
    let violations = checks.violations();
    harness.finish(ScenarioResult {
        label: common.label.clone(),
        pace: common.pace().describe(),
        params,
        started_at: timing.started_at,
        figures,
        latencies,
        outcomes: shop.outcomes.snapshot(),
        checks: checks.into_vec(),
        violations,
        stages: measured.stages,
        cpu: measured.cpu,
        memory: Vec::new(),
        db_waits: measured.db_waits,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_spread_evenly_over_the_products_and_holders_pay_with_the_coupon() {
        let users: Vec<i64> = (1..=10).collect();
        let plan = plan_journeys(&users, &[100, 200, 300], 9, 4, 2, 3);
        assert_eq!(plan.len(), 10);
        let per_product = |p: i64| plan.iter().filter(|j| j.product == p).count();
        assert_eq!((per_product(100), per_product(200), per_product(300)), (4, 3, 3));
        assert_eq!(plan.iter().filter(|j| j.coupon == Some(9)).count(), 4);
        assert_eq!(plan.iter().filter(|j| j.charge).count(), 2);
        let mut seen: Vec<i64> = plan.iter().map(|j| j.user).collect();
        seen.sort_unstable();
        assert_eq!(seen, users, "every user once");
    }
}
