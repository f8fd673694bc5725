//! `flash-sale`: one coupon of quantity Q and U users who all want it at once.
//!
//! Each user asks once with their own `Idempotency-Key`; a share of those requests is sent
//! again with the same key (a client that timed out and retries), and a share of users asks a
//! second time with a new key. Every answer the contract allows counts as correct: `202`
//! (fresh or replayed), `410 ERR_COUPON_OUT_OF_STOCK` (the API knows at once once sold out),
//! `409 ERR_COUPON_ALREADY_ACQUIRED` (the user holds it), and for a key sent twice,
//! `409 ERR_IDEMPOTENCY_KEY_IN_USE` while its first request is still being handled.
//!
//! Against the synchronous peer (`--commands-url`) the answer is final: `200` with the
//! issued coupon, or the same refusals; the peer keeps no keys, so a retry is a new request
//! (answered `409 ERR_COUPON_ALREADY_ACQUIRED` once the first was issued).
//!
//! Figures ([`FlashSaleFigures`]):
//! - `coupons_issued_per_sec`: coupons issued / (last coupon issued − start of the load):
//!   what a flash sale is about, end to end, with PostgreSQL's clock (the same machine's).
//! - `answered_per_sec`, `accepted_per_sec`: HTTP answers, and `202`s (peer: `200`s, each a
//!   coupon issued), per second of load.
//! - `accept_to_settled_seconds`: first accepted request to last settled one (DB).
//! - latency `answer (all)`: every answer, from the (scheduled) send to the response.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use uuid::Uuid;

use super::{base_params, db_latency, dispatch_lag, Harness, Outcomes, Settler};
use crate::checks::{self, FlashSaleFacts};
use crate::cli::FlashSaleArgs;
use crate::client::{transport_outcome, Answer, Api};
use crate::figures::{Figures, FlashSaleFigures};
use crate::histogram::Recorder;
use crate::results::ScenarioResult;
use crate::schedule;
use crate::setup;

/// Why a request is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptKind {
    /// The user's request.
    First,
    /// The same request again, same key: a client retry.
    Retry,
    /// The user asks again with a new key.
    Second,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub user: i64,
    pub key: String,
    pub kind: AttemptKind,
}

/// The order of all requests: every user once, in random order; a retry `1..=spread`
/// requests after its first, a second attempt `spread..=10 * spread` after (with `spread`
/// the concurrency, so a retry often overlaps its first request and a second attempt
/// comes once the first was answered).
pub fn plan_attempts(
    users: &[i64],
    retry_share: f64,
    second_share: f64,
    spread: usize,
    seed: u64,
) -> Vec<Attempt> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order = users.to_vec();
    order.shuffle(&mut rng);
    let spread = spread.max(1);
    let share = |s: f64| ((s.clamp(0.0, 1.0) * order.len() as f64).round() as usize).min(order.len());
    let mut planned: Vec<(f64, Attempt)> = order
        .iter()
        .enumerate()
        .map(|(i, &user)| {
            let attempt = Attempt {
                user,
                key: format!("flash-{user}-1"),
                kind: AttemptKind::First,
            };
            (i as f64, attempt)
        })
        .collect();
    let mut indices: Vec<usize> = (0..order.len()).collect();
    indices.shuffle(&mut rng);
    for &i in indices.iter().take(share(retry_share)) {
        let at = (i + rng.random_range(1..=spread)) as f64 + 0.5;
        planned.push((
            at,
            Attempt {
                user: order[i],
                key: format!("flash-{}-1", order[i]),
                kind: AttemptKind::Retry,
            },
        ));
    }
    indices.shuffle(&mut rng);
    for &i in indices.iter().take(share(second_share)) {
        let at = (i + rng.random_range(spread..=10 * spread)) as f64 + 0.25;
        planned.push((
            at,
            Attempt {
                user: order[i],
                key: format!("flash-{}-2", order[i]),
                kind: AttemptKind::Second,
            },
        ));
    }
    planned.sort_by(|a, b| a.0.total_cmp(&b.0));
    planned.into_iter().map(|(_, a)| a).collect()
}

/// Whether the contract allows this answer to this attempt, from who settles it.
pub fn is_allowed(kind: AttemptKind, answer: &Answer, settler: Settler) -> bool {
    match (settler, answer.status, answer.code.as_deref()) {
        (Settler::Pipeline, 202, _) => true,
        // The peer's answer is final: issued, with the coupon it issued.
        (Settler::Peer, 200, _) => answer.str_field("status") == Some("SUCCEEDED"),
        (_, 410, Some("ERR_COUPON_OUT_OF_STOCK")) | (_, 409, Some("ERR_COUPON_ALREADY_ACQUIRED")) => true,
        // A key sent twice: whichever of the two comes second may find the first in flight.
        (Settler::Pipeline, 409, Some("ERR_IDEMPOTENCY_KEY_IN_USE")) => kind != AttemptKind::Second,
        _ => false,
    }
}

/// What the requests share while they run.
struct Sale {
    api: Api,
    settler: Settler,
    coupon: i64,
    recorder: Recorder,
    outcomes: Outcomes,
    accepted: Mutex<Vec<Uuid>>,
    /// The request each key was answered with, to catch a key that names two.
    keys: Mutex<HashMap<String, Uuid>>,
    keys_with_two_requests: AtomicU64,
    /// `202`s, or the peer's `200`s.
    accepted_answers: AtomicU64,
    /// The peer's `200`s: the user coupon each one says it issued.
    issued_in_answers: Mutex<Vec<Uuid>>,
}

impl Sale {
    fn new(api: Api, settler: Settler, coupon: i64) -> Self {
        Self {
            api,
            settler,
            coupon,
            recorder: Recorder::default(),
            outcomes: Outcomes::default(),
            accepted: Mutex::new(Vec::new()),
            keys: Mutex::new(HashMap::new()),
            keys_with_two_requests: AtomicU64::new(0),
            accepted_answers: AtomicU64::new(0),
            issued_in_answers: Mutex::new(Vec::new()),
        }
    }

    async fn send(&self, attempt: Attempt, intended: Instant) {
        let answer = self
            .api
            .issue_coupon(self.coupon, attempt.user, &attempt.key)
            .await;
        let latency = intended.elapsed();
        self.recorder.record("answer (all)", latency);
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                self.outcomes.count(&transport_outcome(&e), false);
                return;
            }
        };
        let outcome = answer.outcome();
        self.recorder.record(&format!("answer {outcome}"), latency);
        self.outcomes
            .count(&outcome, is_allowed(attempt.kind, &answer, self.settler));
        if answer.replayed {
            self.outcomes.count("(of which replayed)", true);
        }
        if self.settler == Settler::Peer && answer.status == 200 {
            self.accepted_answers.fetch_add(1, Ordering::Relaxed);
            let issued = answer
                .body
                .pointer("/result/userCouponId")
                .and_then(|v| v.as_str())
                .and_then(|v| v.parse().ok());
            // A 200 that names no coupon counts as issued nothing (and fails a check).
            self.issued_in_answers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(issued.unwrap_or_default());
        }
        if answer.status == 202 {
            self.accepted_answers.fetch_add(1, Ordering::Relaxed);
            if let Some(id) = answer.request_id() {
                self.accepted
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(id);
                let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
                match keys.get(&attempt.key) {
                    Some(first) if *first != id => {
                        self.keys_with_two_requests.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(_) => {}
                    None => {
                        keys.insert(attempt.key, id);
                    }
                }
            }
        }
    }
}

/// A small sale of its own before the measured one, then ANALYZE (see `--warmup`).
async fn warm_up(harness: &Harness, args: &FlashSaleArgs, prefix: &str) -> anyhow::Result<()> {
    let count = args.common.warmup;
    if count == 0 {
        return Ok(());
    }
    let users = setup::create_users(&harness.db, &harness.api, &format!("{prefix}warmup-"), count, 0).await?;
    // Half of them get one: user_coupons then holds enough rows to be planned as a table.
    let quantity = i64::try_from(count / 2).unwrap_or(1).max(1);
    let coupon = harness
        .api
        .create_coupon(&format!("{prefix}warmup"), 1_000, quantity)
        .await?;
    let plan = plan_attempts(
        &users,
        args.retry_share,
        args.second_attempt_share,
        50,
        args.common.seed + 1,
    );
    let sale = Arc::new(Sale::new(harness.commands.clone(), harness.settler, coupon));
    schedule::drive(
        plan.into_iter(),
        harness.warmup_pace(),
        None,
        move |attempt, intended| {
            let sale = Arc::clone(&sale);
            async move { sale.send(attempt, intended).await }
        },
    )
    .await;
    harness
        .wait_until_settled(
            "SELECT count(*) FROM requests WHERE kind = 'COUPON_ISSUE' AND partition_key = $1 AND status = 'PENDING'",
            coupon,
        )
        .await?;
    harness.analyze().await
}

pub async fn run(args: &FlashSaleArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let harness = Harness::connect(common).await?;
    let prefix = setup::run_prefix("flash");
    let users = setup::create_users(&harness.db, &harness.api, &prefix, args.users, 0).await?;
    let coupon = harness
        .api
        .create_coupon(&format!("{prefix}coupon"), 1_000, args.quantity)
        .await?;
    warm_up(&harness, args, &prefix).await?;
    let plan = plan_attempts(
        &users,
        args.retry_share,
        args.second_attempt_share,
        common.concurrency,
        common.seed,
    );
    let requests = plan.len();
    println!(
        "flash sale: coupon {coupon} x{}, {} users, {requests} requests, {}",
        args.quantity,
        users.len(),
        common.pace().describe()
    );

    let sale = Arc::new(Sale {
        recorder: Recorder::tapped(common.latency_tap.clone()),
        ..Sale::new(harness.commands.clone(), harness.settler, coupon)
    });
    let window = harness.begin().await;
    let load = Arc::clone(&sale);
    let timing = schedule::drive(plan.into_iter(), common.pace(), None, move |attempt, intended| {
        let sale = Arc::clone(&load);
        async move { sale.send(attempt, intended).await }
    })
    .await;
    let drained = harness
        .wait_until_settled(
            "SELECT count(*) FROM requests WHERE kind = 'COUPON_ISSUE' AND partition_key = $1 AND status = 'PENDING'",
            coupon,
        )
        .await?;
    let measured = harness.end(window).await;

    let load_seconds = timing.elapsed().as_secs_f64();
    let (issued, last_issue, first_accept, last_settled, settled): (i64, Option<f64>, Option<f64>, Option<f64>, i64) =
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM user_coupons WHERE coupon_id = $1),
                    (SELECT extract(epoch FROM max(issued_at))::float8 FROM user_coupons WHERE coupon_id = $1),
                    extract(epoch FROM min(created_at))::float8,
                    extract(epoch FROM max(completed_at))::float8,
                    count(*) FILTER (WHERE status <> 'PENDING')
             FROM requests WHERE kind = 'COUPON_ISSUE' AND partition_key = $1",
        )
        .bind(coupon)
        .fetch_one(&harness.db)
        .await?;
    let started = timing.started_at.timestamp_micros() as f64 / 1e6;
    let accepted_answers = sale.accepted_answers.load(Ordering::Relaxed);
    let issue = last_issue.map(|last| (last - started, issued as f64 / (last - started)));
    let settling = first_accept
        .zip(last_settled)
        .map(|(first, last)| (last - first, settled as f64 / (last - first)));
    let figures = Figures::FlashSale(FlashSaleFigures {
        requests: timing.dispatched,
        load_seconds,
        answered_per_sec: timing.dispatched as f64 / load_seconds,
        accepted: accepted_answers,
        accepted_per_sec: accepted_answers as f64 / load_seconds,
        issued: u64::try_from(issued).unwrap_or_default(),
        last_issue_after_start_seconds: issue.map(|(seconds, _)| seconds),
        coupons_issued_per_sec: issue.map(|(_, per_sec)| per_sec),
        accept_to_settled_seconds: settling.map(|(seconds, _)| seconds),
        settled_per_sec: settling.map(|(_, per_sec)| per_sec),
        drain_after_load_seconds: drained
            .filter(|_| harness.settler == Settler::Pipeline)
            .map(|drain| drain.as_secs_f64()),
        dispatch: dispatch_lag(common, &timing),
        db: measured.db_activity(timing.dispatched as f64),
    });
    let mut latencies = sale.recorder.summaries();
    if let Some(l) = db_latency(
        &harness.db,
        "SELECT extract(epoch FROM completed_at - created_at)::float8 * 1000 AS ms
         FROM requests WHERE kind = 'COUPON_ISSUE' AND partition_key = $1 AND status <> 'PENDING'",
        coupon,
    )
    .await?
    {
        latencies.insert("accept to settled (DB)".to_owned(), l);
    }

    let accepted = sale
        .accepted
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let facts = FlashSaleFacts {
        coupon,
        expected_issued: args.quantity.min(users.len() as i64),
        users: (
            users.first().copied().unwrap_or_default(),
            users.last().copied().unwrap_or_default(),
        ),
        accepted,
        unexpected_answers: sale.outcomes.unexpected(),
        keys_with_two_requests: sale.keys_with_two_requests.load(Ordering::Relaxed),
        concurrency: common.concurrency,
        settler: harness.settler,
        issued_in_answers: sale
            .issued_in_answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
    };
    let checks = checks::flash_sale(&harness.db, &harness.api, &facts).await?;
    let mut notes = Vec::new();
    if drained.is_none() {
        notes.push(format!(
            "requests were still pending {} s after the load",
            common.drain_timeout_secs
        ));
    }
    let mut params = base_params(common);
    params.insert("users".to_owned(), users.len().to_string());
    params.insert("quantity".to_owned(), args.quantity.to_string());
    params.insert("requests".to_owned(), requests.to_string());
    let violations = checks.violations();
    harness.finish(ScenarioResult {
        label: common.label.clone(),
        pace: common.pace().describe(),
        params,
        started_at: timing.started_at,
        figures,
        latencies,
        outcomes: sale.outcomes.snapshot(),
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
    use serde_json::Value;

    #[test]
    fn every_user_asks_once_and_retries_follow_their_first_request() {
        let users: Vec<i64> = (1..=1_000).collect();
        let plan = plan_attempts(&users, 0.10, 0.05, 20, 7);
        let count = |k: AttemptKind| plan.iter().filter(|a| a.kind == k).count();
        assert_eq!(count(AttemptKind::First), 1_000);
        assert_eq!(count(AttemptKind::Retry), 100);
        assert_eq!(count(AttemptKind::Second), 50);
        let mut first_at = HashMap::new();
        for (i, a) in plan.iter().enumerate() {
            match a.kind {
                AttemptKind::First => {
                    assert_eq!(a.key, format!("flash-{}-1", a.user));
                    assert!(
                        first_at.insert(a.user, i).is_none(),
                        "user {} asked first twice",
                        a.user
                    );
                }
                AttemptKind::Retry => {
                    assert_eq!(a.key, format!("flash-{}-1", a.user), "a retry reuses the key");
                    assert!(first_at.contains_key(&a.user), "a retry comes after its first");
                }
                AttemptKind::Second => {
                    assert_eq!(
                        a.key,
                        format!("flash-{}-2", a.user),
                        "a second attempt has its own key"
                    );
                    assert!(
                        first_at.get(&a.user).is_some_and(|f| *f < i),
                        "a second attempt comes later"
                    );
                }
            }
        }
        assert_eq!(
            plan,
            plan_attempts(&users, 0.10, 0.05, 20, 7),
            "the plan is repeatable"
        );
    }

    fn answer(status: u16, code: Option<&str>) -> Answer {
        Answer {
            status,
            code: code.map(str::to_owned),
            body: Value::Null,
            replayed: false,
            retry_after: None,
        }
    }

    #[test]
    fn sold_out_and_already_held_are_correct_answers_and_errors_are_not() {
        use AttemptKind::*;
        let ours = |kind, answer: &Answer| is_allowed(kind, answer, Settler::Pipeline);
        assert!(ours(First, &answer(202, None)));
        assert!(ours(First, &answer(410, Some("ERR_COUPON_OUT_OF_STOCK"))));
        assert!(ours(Second, &answer(409, Some("ERR_COUPON_ALREADY_ACQUIRED"))));
        assert!(ours(Retry, &answer(409, Some("ERR_IDEMPOTENCY_KEY_IN_USE"))));
        assert!(!ours(Second, &answer(409, Some("ERR_IDEMPOTENCY_KEY_IN_USE"))));
        assert!(!ours(First, &answer(503, Some("ERR_UNAVAILABLE"))));
        assert!(!ours(First, &answer(500, Some("ERR_INTERNAL"))));
        assert!(!ours(Retry, &answer(422, Some("ERR_IDEMPOTENCY_KEY_REUSED"))));
    }

    #[test]
    fn the_peer_answers_issued_or_refused_and_nothing_asynchronous() {
        use AttemptKind::*;
        let peer = |kind, answer: &Answer| is_allowed(kind, answer, Settler::Peer);
        let mut issued = answer(200, None);
        issued.body = serde_json::json!({ "status": "SUCCEEDED", "result": {} });
        assert!(peer(First, &issued));
        assert!(
            !peer(First, &answer(200, None)),
            "a 200 that is not a settled success"
        );
        assert!(peer(Retry, &answer(409, Some("ERR_COUPON_ALREADY_ACQUIRED"))));
        assert!(peer(First, &answer(410, Some("ERR_COUPON_OUT_OF_STOCK"))));
        assert!(!peer(First, &answer(202, None)), "the peer never defers");
        assert!(!peer(Retry, &answer(409, Some("ERR_IDEMPOTENCY_KEY_IN_USE"))));
        assert!(!peer(First, &answer(500, Some("ERR_INTERNAL"))));
    }
}
