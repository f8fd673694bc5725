//! The correctness checks run at the end of every scenario, once every accepted command is
//! settled: what the API answers and what PostgreSQL holds must agree with each other and
//! with the invariants of the design. A failed check is a violation; a benchmark with one
//! has no figure worth reporting. Each check is named by its [`CheckId`].

mod id;

use std::collections::HashMap;
use std::fmt::Debug;
use std::time::Duration;

use anyhow::Context;
use futures::stream::{self, StreamExt};
use sqlx::PgPool;
use uuid::Uuid;

use crate::client::Api;
use crate::event_tap::EventTap;
pub use id::{CheckId, Suite, UnknownCheckId};

/// One check and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub id: CheckId,
    pub passed: bool,
    pub detail: String,
}

impl Check {
    /// What the check asserts, as the printouts show it.
    pub fn description(&self) -> &'static str {
        self.id.description()
    }
}

/// The checks of one scenario.
#[derive(Debug, Default)]
pub struct Checks(Vec<Check>);

impl Checks {
    pub fn expect(&mut self, id: CheckId, passed: bool, detail: impl Into<String>) {
        self.0.push(Check {
            id,
            passed,
            detail: detail.into(),
        });
    }

    pub fn expect_eq<T: PartialEq + Debug>(&mut self, id: CheckId, expected: T, actual: T) {
        let detail = format!("expected {expected:?}, found {actual:?}");
        self.expect(id, expected == actual, detail);
    }

    /// `count` rows that should not exist.
    pub fn expect_none(&mut self, id: CheckId, count: i64) {
        self.expect(id, count == 0, format!("{count} found"));
    }

    pub fn violations(&self) -> usize {
        self.0.iter().filter(|c| !c.passed).count()
    }

    pub fn into_vec(self) -> Vec<Check> {
        self.0
    }
}

async fn count(
    db: &PgPool,
    sql: &str,
    bind: impl FnOnce(QueryScalar<'_>) -> QueryScalar<'_>,
) -> anyhow::Result<i64> {
    bind(sqlx::query_scalar(sql))
        .fetch_one(db)
        .await
        .with_context(|| format!("check query failed: {sql}"))
}

type QueryScalar<'q> = sqlx::query::QueryScalar<'q, sqlx::Postgres, i64, sqlx::postgres::PgArguments>;

/// Who settles the commands a scenario sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settler {
    /// Our api accepts them and the workers settle them.
    Pipeline,
    /// The synchronous peer (`loadgen peer`) settles each in its request and answers the
    /// result: nothing is left to wait for and there are no request rows.
    Peer,
}

/// What the flash sale did, as the client saw it.
pub struct FlashSaleFacts {
    pub coupon: i64,
    /// Coupons that must have been issued: the quantity, or fewer users if there were.
    pub expected_issued: i64,
    pub users: (i64, i64),
    /// Every `requestId` the API accepted (202), replays included.
    pub accepted: Vec<Uuid>,
    pub unexpected_answers: u64,
    /// Idempotency keys that were answered with two different requests.
    pub keys_with_two_requests: u64,
    pub concurrency: usize,
    /// Who settled the requests: the peer keeps no request rows, and its answers are final.
    pub settler: Settler,
    /// The peer's `200`s: the user coupon each one names.
    pub issued_in_answers: Vec<Uuid>,
}

pub async fn flash_sale(db: &PgPool, api: &Api, facts: &FlashSaleFacts) -> anyhow::Result<Checks> {
    let mut checks = Checks::default();
    let coupon = facts.coupon;
    checks.expect_none(CheckId::FlashSaleAnswersAllowed, facts.unexpected_answers as i64);
    if facts.settler == Settler::Pipeline {
        checks.expect_none(
            CheckId::FlashSaleKeyNamesOneRequest,
            facts.keys_with_two_requests as i64,
        );
    }

    let (issued_count, total): (i64, i64) =
        sqlx::query_as("SELECT issued_quantity, total_quantity FROM coupons WHERE id = $1")
            .bind(coupon)
            .fetch_one(db)
            .await?;
    checks.expect_eq(
        CheckId::FlashSaleIssuedCountDb,
        facts.expected_issued,
        issued_count,
    );
    checks.expect(
        CheckId::FlashSaleNotOverIssued,
        issued_count <= total,
        format!("{issued_count} of {total}"),
    );
    let (rows, users, strangers): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT user_id), count(*) FILTER (WHERE user_id NOT BETWEEN $2 AND $3)
         FROM user_coupons WHERE coupon_id = $1",
    )
    .bind(coupon)
    .bind(facts.users.0)
    .bind(facts.users.1)
    .fetch_one(db)
    .await?;
    checks.expect_eq(CheckId::FlashSaleQuantityIssued, facts.expected_issued, rows);
    checks.expect_eq(CheckId::FlashSaleNoUserHoldsTwice, rows, users);
    checks.expect_none(CheckId::FlashSaleIssuedToRunUsers, strangers);
    if facts.settler == Settler::Peer {
        peer_answers_are_the_coupons_issued(&mut checks, db, facts, rows).await?;
    } else {
        requests_settled_the_sale(&mut checks, db, api, facts, rows).await?;
    }

    // Read back through the API.
    let answer = api.get(&format!("/coupons/{coupon}")).await?;
    checks.expect_eq(
        CheckId::FlashSaleIssuedQuantityApi,
        Some(facts.expected_issued),
        answer.i64_field("issuedQuantity"),
    );

    let holders: Vec<i64> = sqlx::query_scalar(
        "SELECT user_id FROM user_coupons WHERE coupon_id = $1 ORDER BY random() LIMIT 50",
    )
    .bind(coupon)
    .fetch_all(db)
    .await?;
    crate::setup::issue_tokens(db, api, &holders).await?;
    let mut missing = 0;
    for user in &holders {
        let answer = api.get(&format!("/users/{user}/coupons")).await?;
        let holds = answer
            .body
            .get("items")
            .and_then(|i| i.as_array())
            .is_some_and(|items| {
                items
                    .iter()
                    .any(|c| c.get("couponId").and_then(|v| v.as_i64()) == Some(coupon))
            });
        if !holds {
            missing += 1;
        }
    }
    checks.expect(
        CheckId::FlashSaleHoldersSeeCouponApi,
        missing == 0,
        format!("{missing} of {} sampled holders do not", holders.len()),
    );
    Ok(checks)
}

/// The peer answered each issued coupon once, with the coupon it issued: its answers
/// account for the rows.
async fn peer_answers_are_the_coupons_issued(
    checks: &mut Checks,
    db: &PgPool,
    facts: &FlashSaleFacts,
    rows: i64,
) -> anyhow::Result<()> {
    let answered = i64::try_from(facts.issued_in_answers.len()).unwrap_or(i64::MAX);
    checks.expect_eq(CheckId::FlashSalePeerAnswerPerCoupon, rows, answered);
    let unknown = count(
        db,
        "SELECT count(*) FROM UNNEST($1::uuid[]) AS a(id)
         WHERE NOT EXISTS (SELECT 1 FROM user_coupons uc WHERE uc.id = a.id AND uc.coupon_id = $2)",
        |q| q.bind(facts.issued_in_answers.clone()).bind(facts.coupon),
    )
    .await?;
    checks.expect_none(CheckId::FlashSalePeerAnswersNameCoupons, unknown);
    Ok(())
}

/// Every request the api accepted is settled, each success by the coupon it issued.
async fn requests_settled_the_sale(
    checks: &mut Checks,
    db: &PgPool,
    api: &Api,
    facts: &FlashSaleFacts,
    rows: i64,
) -> anyhow::Result<()> {
    let coupon = facts.coupon;
    // ERR_UNAVAILABLE: a request the api stored, could not queue, and withdrew before
    // answering 503; never one that was answered 202 (checked below).
    let (pending, succeeded, odd_failures): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'PENDING'),
                count(*) FILTER (WHERE status = 'SUCCEEDED'),
                count(*) FILTER (WHERE status = 'FAILED' AND error->>'code' NOT IN
                    ('ERR_COUPON_OUT_OF_STOCK', 'ERR_COUPON_ALREADY_ACQUIRED', 'ERR_UNAVAILABLE'))
         FROM requests WHERE kind = 'COUPON_ISSUE' AND partition_key = $1",
    )
    .bind(coupon)
    .fetch_one(db)
    .await?;
    checks.expect_none(CheckId::FlashSaleRequestsTerminalDb, pending);
    checks.expect_eq(CheckId::FlashSaleSuccessPerCoupon, rows, succeeded);
    checks.expect_none(CheckId::FlashSaleExpectedFailuresOnly, odd_failures);
    let withdrawn_202 = count(
        db,
        "SELECT count(*) FROM requests WHERE id = ANY($1) AND error->>'code' = 'ERR_UNAVAILABLE'",
        |q| q.bind(facts.accepted.clone()),
    )
    .await?;
    checks.expect_none(CheckId::FlashSaleAcceptedNotWithdrawn, withdrawn_202);
    let orphans = count(
        db,
        "SELECT count(*) FROM requests r
         WHERE kind = 'COUPON_ISSUE' AND partition_key = $1 AND status = 'SUCCEEDED'
           AND NOT EXISTS (SELECT 1 FROM user_coupons uc
                           WHERE uc.request_id = r.id AND uc.id::text = r.result->>'userCouponId')",
        |q| q.bind(coupon),
    )
    .await?;
    checks.expect_none(CheckId::FlashSaleSuccessNamesCoupon, orphans);
    let unexplained = count(
        db,
        "SELECT count(*) FROM user_coupons uc WHERE coupon_id = $1
           AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.id = uc.request_id AND r.status = 'SUCCEEDED')",
        |q| q.bind(coupon),
    )
    .await?;
    checks.expect_none(CheckId::FlashSaleCouponHasRequest, unexplained);
    let unsettled = count(
        db,
        "SELECT count(*) FROM UNNEST($1::uuid[]) AS a(id) LEFT JOIN requests r USING (id)
         WHERE r.status IS DISTINCT FROM 'SUCCEEDED' AND r.status IS DISTINCT FROM 'FAILED'",
        |q| q.bind(facts.accepted.clone()),
    )
    .await?;
    checks.expect_none(CheckId::FlashSaleAcceptedTerminalDb, unsettled);

    let mut accepted = facts.accepted.clone();
    accepted.sort_unstable();
    accepted.dedup();
    let not_terminal = stream::iter(accepted)
        .map(|id| async move {
            match api.request_status(id).await {
                Ok(a) if a.status == 200 && matches!(a.str_field("status"), Some("SUCCEEDED" | "FAILED")) => {
                    0
                }
                _ => 1,
            }
        })
        .buffer_unordered(facts.concurrency.max(1))
        .fold(0_i64, |sum, n| async move { sum + n })
        .await;
    checks.expect_none(CheckId::FlashSaleAcceptedTerminalApi, not_terminal);
    Ok(())
}

/// What the checkout did, as the client saw it.
pub struct CheckoutFacts {
    pub users: Vec<i64>,
    /// Products with the stock they started with.
    pub products: Vec<(i64, i64)>,
    pub coupon: i64,
    /// Users who charged their balance through the API before ordering.
    pub charged: Vec<i64>,
    /// What each of them charged.
    pub charge: i64,
    /// Orders the client saw paid, with their users.
    pub paid: Vec<(i64, Uuid)>,
    pub expected_paid: i64,
    pub unexpected_answers: u64,
    pub failed_journeys: u64,
    /// Who settled the commands: the peer keeps no request rows.
    pub settler: Settler,
    /// Where the `order.paid` events that left the outbox are counted.
    pub events: PublishedEvents,
}

/// Where the checkout's checks find the `order.paid` events the relay published: it deletes
/// an outbox row once the broker confirmed its event, so the outbox holds only those not
/// yet published.
pub enum PublishedEvents {
    /// Nothing publishes the run's events: the synchronous peer writes them to the outbox
    /// and no relay runs beside it, so the outbox holds them all.
    NotPublished,
    /// A queue of the run's own, bound before the load (benchmarks, where no data-platform
    /// stand-in runs).
    Tap(Box<EventTap>),
    /// The data-platform stand-in's `received_events` (the fault suite runs it).
    ReceivedByDataPlatform,
}

/// How long the checks wait for the stand-in to receive what the relay deleted.
const EVENTS_PATIENCE: Duration = Duration::from_secs(60);

/// Orders of `users` without exactly one distinct `order.paid` event if PAID, or with any
/// if not: events still in the outbox and events published, each counted once by its id.
async fn orders_without_one_event(
    db: &PgPool,
    users: &[i64],
    events: &PublishedEvents,
) -> anyhow::Result<i64> {
    if matches!(events, PublishedEvents::ReceivedByDataPlatform) {
        // The relay deletes an event before the stand-in records it: between the two it is
        // in neither table. Counted once the run's events have all left the outbox and as
        // many reached the stand-in as orders were paid (or the patience ran out, and the
        // count says what is missing).
        let deadline = tokio::time::Instant::now() + EVENTS_PATIENCE;
        while tokio::time::Instant::now() < deadline {
            let caught_up: Result<bool, _> = sqlx::query_scalar(
                "SELECT NOT EXISTS (SELECT 1 FROM outbox e JOIN orders o ON o.id::text = e.payload->>'orderId'
                                    WHERE e.routing_key = 'order.paid' AND o.user_id = ANY($1))
                    AND (SELECT count(*) FROM received_events r JOIN orders o ON o.id::text = r.payload->>'orderId'
                         WHERE r.routing_key = 'order.paid' AND o.user_id = ANY($1))
                        >= (SELECT count(*) FROM orders WHERE user_id = ANY($1) AND status = 'PAID')",
            )
            .bind(users)
            .fetch_one(db)
            .await;
            if matches!(caught_up, Ok(true)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The outbox first, then where published events went: one published in between is in
    // both and counts once by its id, where the other order would find it in neither.
    // Hash joins on the payload's order id: nothing indexes the payload.
    let in_outbox: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT e.id, o.id FROM outbox e JOIN orders o ON o.id::text = e.payload->>'orderId'
         WHERE e.routing_key = 'order.paid' AND o.user_id = ANY($1)",
    )
    .bind(users)
    .fetch_all(db)
    .await
    .context("cannot read the outbox")?;
    let published: Vec<(Uuid, Uuid)> = match events {
        PublishedEvents::NotPublished => Vec::new(),
        PublishedEvents::Tap(tap) => tap.seen().await?.into_iter().collect(),
        PublishedEvents::ReceivedByDataPlatform => sqlx::query_as(
            "SELECT r.event_id, o.id FROM received_events r JOIN orders o ON o.id::text = r.payload->>'orderId'
             WHERE r.routing_key = 'order.paid' AND o.user_id = ANY($1)",
        )
        .bind(users)
        .fetch_all(db)
        .await
        .context("cannot read received_events")?,
    };
    let mut order_of: HashMap<Uuid, Uuid> = in_outbox.into_iter().collect();
    order_of.extend(published);
    let mut per_order: HashMap<Uuid, i64> = HashMap::new();
    for order in order_of.into_values() {
        *per_order.entry(order).or_default() += 1;
    }
    let orders: Vec<(Uuid, bool)> =
        sqlx::query_as("SELECT id, status = 'PAID' FROM orders WHERE user_id = ANY($1)")
            .bind(users)
            .fetch_all(db)
            .await?;
    Ok(orders
        .iter()
        .filter(|(order, paid)| i64::from(*paid) != per_order.get(order).copied().unwrap_or(0))
        .count() as i64)
}

pub async fn checkout(db: &PgPool, api: &Api, facts: &CheckoutFacts) -> anyhow::Result<Checks> {
    let mut checks = Checks::default();
    let users = facts.users.clone();
    let product_ids: Vec<i64> = facts.products.iter().map(|(id, _)| *id).collect();
    checks.expect_none(CheckId::CheckoutAnswersAllowed, facts.unexpected_answers as i64);
    checks.expect_none(CheckId::CheckoutJourneysPaid, facts.failed_journeys as i64);

    let negative = count(db, "SELECT count(*) FROM balances WHERE amount < 0", |q| q).await?;
    checks.expect_none(CheckId::CheckoutNoNegativeBalance, negative);
    let off_ledger = shared::store::invariants::balances_off_ledger(db, Some(&users)).await?;
    checks.expect_none(CheckId::CheckoutBalanceIsLedger, off_ledger);
    // Charges sent again (no answer, 503, 409 while in flight) with their key: each user's
    // charge is on the ledger exactly once, and only theirs.
    let miscounted = count(
        db,
        "SELECT count(*) FROM unnest($1::bigint[]) AS u(user_id)
         WHERE (SELECT count(*) FROM balance_transactions t
                WHERE t.user_id = u.user_id AND t.kind = 'CHARGE' AND t.amount = $3)
               <> CASE WHEN u.user_id = ANY($2) THEN 1 ELSE 0 END",
        |q| {
            q.bind(users.clone())
                .bind(facts.charged.clone())
                .bind(facts.charge)
        },
    )
    .await?;
    checks.expect_none(CheckId::CheckoutChargesAppliedOnce, miscounted);
    let stale_after = count(
        db,
        "SELECT count(*) FROM balances b
         LEFT JOIN (SELECT DISTINCT ON (user_id) user_id, balance_after FROM balance_transactions
                    WHERE user_id = ANY($1) ORDER BY user_id, id DESC) t USING (user_id)
         WHERE b.user_id = ANY($1) AND b.amount <> COALESCE(t.balance_after, 0)",
        |q| q.bind(users.clone()),
    )
    .await?;
    checks.expect_none(CheckId::CheckoutBalanceAfterIsBalance, stale_after);

    let on_hand: Vec<(i64, i64, i64, i64)> =
        sqlx::query_as("SELECT id, stock, reserved, sold FROM products WHERE id = ANY($1) ORDER BY id")
            .bind(&product_ids)
            .fetch_all(db)
            .await?;
    let initial: HashMap<i64, i64> = facts.products.iter().copied().collect();
    let unbalanced = on_hand
        .iter()
        .filter(|(id, stock, _, sold)| initial.get(id) != Some(&(stock + sold)))
        .count();
    checks.expect_none(CheckId::CheckoutStockConserved, unbalanced as i64);
    let reserved_off =
        shared::store::invariants::products_reserved_off_orders(db, Some(&product_ids)).await?;
    checks.expect_none(CheckId::CheckoutReservedIsOrders, reserved_off);
    let sold_off = shared::store::invariants::products_sold_off_orders(db, Some(&product_ids)).await?;
    checks.expect_none(CheckId::CheckoutSoldIsOrders, sold_off);

    let payments_off = count(
        db,
        "SELECT count(*) FROM orders o WHERE o.user_id = ANY($1)
           AND (o.status = 'PAID') <> ((SELECT count(*) FROM payments p WHERE p.order_id = o.id) = 1)",
        |q| q.bind(users.clone()),
    )
    .await?;
    checks.expect_none(CheckId::CheckoutPaymentPerPaidOrder, payments_off);
    let amounts_off = count(
        db,
        "SELECT count(*) FROM orders o JOIN payments p ON p.order_id = o.id
         LEFT JOIN (SELECT order_id, sum(amount) AS paid FROM balance_transactions
                    WHERE kind = 'PAYMENT' AND user_id = ANY($1) GROUP BY order_id) l ON l.order_id = o.id
         WHERE o.user_id = ANY($1)
           AND (p.amount <> o.paid_amount OR o.paid_amount <> o.total_amount - o.discount_amount
                OR o.paid_amount <> COALESCE(l.paid, 0))",
        |q| q.bind(users.clone()),
    )
    .await?;
    checks.expect_none(CheckId::CheckoutAmountsAgree, amounts_off);

    let coupon = facts.coupon;
    let used_unpaid = count(
        db,
        "SELECT count(*) FROM user_coupons uc WHERE uc.coupon_id = $1 AND uc.used_at IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM payments p JOIN orders o ON o.id = p.order_id
                           WHERE p.user_coupon_id = uc.id AND o.id = uc.order_id
                             AND o.status = 'PAID' AND o.coupon_id = $1)",
        |q| q.bind(coupon),
    )
    .await?;
    checks.expect_none(CheckId::CheckoutUsedCouponsPaid, used_unpaid);
    let discounted_unused = count(
        db,
        "SELECT count(*) FROM orders o WHERE o.coupon_id = $1
           AND NOT EXISTS (SELECT 1 FROM user_coupons uc WHERE uc.order_id = o.id AND uc.used_at IS NOT NULL)",
        |q| q.bind(coupon),
    )
    .await?;
    checks.expect_none(CheckId::CheckoutDiscountsUsedCoupons, discounted_unused);
    let (issued, rows): (i64, i64) = sqlx::query_as(
        "SELECT issued_quantity, (SELECT count(*) FROM user_coupons WHERE coupon_id = $1)
         FROM coupons WHERE id = $1",
    )
    .bind(coupon)
    .fetch_one(db)
    .await?;
    checks.expect_eq(CheckId::CheckoutIssuedCountIsHeld, issued, rows);

    let events_off = orders_without_one_event(db, &users, &facts.events).await?;
    checks.expect_none(CheckId::CheckoutEventPerPaidOrder, events_off);

    if facts.settler == Settler::Pipeline {
        let (pending, processing_failed): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'PENDING'),
                    count(*) FILTER (WHERE error->>'code' = 'ERR_PROCESSING_FAILED')
             FROM requests WHERE kind IN ('ORDER_CREATE', 'ORDER_PAY') AND partition_key = ANY($1)",
        )
        .bind(&users)
        .fetch_one(db)
        .await?;
        checks.expect_none(CheckId::CheckoutRequestsTerminalDb, pending);
        checks.expect_none(CheckId::CheckoutNoProcessingFailed, processing_failed);
    }
    let paid = count(
        db,
        "SELECT count(*) FROM orders WHERE user_id = ANY($1) AND status = 'PAID'",
        |q| q.bind(users.clone()),
    )
    .await?;
    checks.expect_eq(CheckId::CheckoutOrdersPaidDb, facts.expected_paid, paid);

    // Read back through the API.
    let mut stock_off = 0;
    for (id, stock, reserved, _) in &on_hand {
        let answer = api.get(&format!("/products/{id}")).await?;
        if answer.i64_field("stock") != Some(stock - reserved) {
            stock_off += 1;
        }
    }
    checks.expect(
        CheckId::CheckoutProductStockApi,
        stock_off == 0,
        format!("{stock_off} of {} products differ", on_hand.len()),
    );
    let sample: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT user_id, amount FROM balances WHERE user_id = ANY($1) ORDER BY random() LIMIT 100",
    )
    .bind(&users)
    .fetch_all(db)
    .await?;
    balances_read_back(&mut checks, CheckId::CheckoutBalancesApi, db, api, &sample).await?;
    let readers: Vec<i64> = facts.paid.iter().take(50).map(|(user, _)| *user).collect();
    crate::setup::issue_tokens(db, api, &readers).await?;
    let mut not_paid = 0;
    for (user, order) in facts.paid.iter().take(50) {
        let answer = api.get(&format!("/users/{user}/orders/{order}")).await?;
        if answer.str_field("status") != Some("PAID") {
            not_paid += 1;
        }
    }
    checks.expect(
        CheckId::CheckoutOrdersPaidApi,
        not_paid == 0,
        format!("{not_paid} of {} sampled orders do not", facts.paid.len().min(50)),
    );
    Ok(checks)
}

/// Reads agree with the database once the load is over.
pub async fn browse(
    db: &PgPool,
    api: &Api,
    products: &[i64],
    users: &[i64],
    unexpected_answers: u64,
) -> anyhow::Result<Checks> {
    let mut checks = Checks::default();
    checks.expect_none(CheckId::BrowseAnswersOk, unexpected_answers as i64);
    let rows: Vec<(i64, i64)> =
        sqlx::query_as("SELECT id, stock - reserved FROM products WHERE id = ANY($1) ORDER BY id")
            .bind(products)
            .fetch_all(db)
            .await?;
    let mut stock_off = 0;
    for (id, stock) in &rows {
        if api.get(&format!("/products/{id}")).await?.i64_field("stock") != Some(*stock) {
            stock_off += 1;
        }
    }
    checks.expect(
        CheckId::BrowseProductsApi,
        stock_off == 0,
        format!("{stock_off} of {} differ", rows.len()),
    );
    let sample: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT user_id, amount FROM balances WHERE user_id = ANY($1) ORDER BY random() LIMIT 100",
    )
    .bind(users)
    .fetch_all(db)
    .await?;
    balances_read_back(&mut checks, CheckId::BrowseBalancesApi, db, api, &sample).await?;
    Ok(checks)
}

/// Invariants of the whole database, whatever ran against it: the fault suite checks them
/// after every scenario, once the load is settled and the events had time to arrive.
pub async fn whole_system(db: &PgPool, api: &Api) -> anyhow::Result<Checks> {
    let mut checks = Checks::default();
    let rows = |sql: &'static str| count(db, sql, |q| q);

    // Coupons: never over-issued, never held twice, the count is the rows.
    checks.expect_none(
        CheckId::WholeSystemCouponsNotOverIssued,
        shared::store::invariants::coupons_over_issued(db, None).await?,
    );
    checks.expect_none(
        CheckId::WholeSystemIssuedCountIsHeld,
        shared::store::invariants::coupons_issued_off_held(db, None).await?,
    );
    checks.expect_none(
        CheckId::WholeSystemCouponHeldIffIssued,
        shared::store::invariants::coupon_requests_off_held(db, None).await?,
    );
    checks.expect_none(
        CheckId::WholeSystemNoCouponHeldTwice,
        shared::store::invariants::coupons_held_twice(db, None).await?,
    );

    // Stock: never oversold; what is reserved and sold is what orders say.
    checks.expect_none(
        CheckId::WholeSystemStockInBounds,
        shared::store::invariants::products_out_of_bounds(db, None).await?,
    );
    checks.expect_none(
        CheckId::WholeSystemReservedIsOrders,
        shared::store::invariants::products_reserved_off_orders(db, None).await?,
    );
    checks.expect_none(
        CheckId::WholeSystemSoldIsOrders,
        shared::store::invariants::products_sold_off_orders(db, None).await?,
    );

    // Money: balances are their ledgers, never negative; nothing charged twice.
    checks.expect_none(
        CheckId::WholeSystemNoNegativeBalance,
        rows("SELECT count(*) FROM balances WHERE amount < 0").await?,
    );
    checks.expect_none(
        CheckId::WholeSystemBalanceIsLedger,
        shared::store::invariants::balances_off_ledger(db, None).await?,
    );
    checks.expect_none(
        CheckId::WholeSystemNoOrderPaidTwice,
        rows(
            "SELECT count(*) FROM (
               SELECT order_id FROM payments GROUP BY order_id HAVING count(*) > 1
               UNION ALL
               SELECT order_id FROM balance_transactions WHERE kind = 'PAYMENT'
               GROUP BY order_id HAVING count(*) > 1) d",
        )
        .await?,
    );
    // An order paid in full by its coupon debits nothing, so it has no ledger entry (the
    // ledger holds positive amounts only).
    checks.expect_none(
        CheckId::WholeSystemPaymentPerPaidOrder,
        rows(
            "SELECT count(*) FROM orders o
             WHERE (o.status = 'PAID') <> EXISTS (SELECT 1 FROM payments p WHERE p.order_id = o.id)
                OR (o.status = 'PAID' AND o.paid_amount > 0)
                   <> EXISTS (SELECT 1 FROM balance_transactions t
                              WHERE t.order_id = o.id AND t.kind = 'PAYMENT' AND t.amount = o.paid_amount)",
        )
        .await?,
    );
    checks.expect_none(
        CheckId::WholeSystemPaymentIffPaid,
        rows(
            "SELECT count(*) FROM requests r LEFT JOIN payments p ON p.request_id = r.id
             WHERE r.kind = 'ORDER_PAY' AND (r.status = 'SUCCEEDED') <> (p.id IS NOT NULL)",
        )
        .await?,
    );
    // A create FAILED leaves its order REJECTED, or CANCELLED if the user cancelled it while
    // it was PENDING (never reserved); one that SUCCEEDED reserved it.
    checks.expect_none(
        CheckId::WholeSystemOrdersSettledAsCreated,
        rows(
            "SELECT count(*) FROM orders o LEFT JOIN requests r ON r.id = o.create_request_id
             WHERE r.status IS DISTINCT FROM 'SUCCEEDED' AND r.status IS DISTINCT FROM 'FAILED'
                OR o.status = 'PENDING'
                OR (r.status = 'FAILED')
                   <> (o.status = 'REJECTED' OR (o.status = 'CANCELLED' AND o.reserved_until IS NULL))",
        )
        .await?,
    );

    // A user's commands are settled in order: no payment before its order's creation (both
    // in one transaction, when the creation's message came late, have one time).
    checks.expect_none(
        CheckId::WholeSystemPaymentAfterCreation,
        rows(
            "SELECT count(*) FROM requests p
             JOIN orders o ON o.id::text = p.payload->>'orderId'
             JOIN requests c ON c.id = o.create_request_id
             WHERE p.kind = 'ORDER_PAY' AND p.status = 'SUCCEEDED'
               AND (c.completed_at IS NULL OR c.completed_at > p.completed_at)",
        )
        .await?,
    );

    // Commands: every one settled, none given up on.
    checks.expect_none(
        CheckId::WholeSystemRequestsTerminal,
        rows("SELECT count(*) FROM requests WHERE status = 'PENDING'").await?,
    );
    checks.expect_none(
        CheckId::WholeSystemNoProcessingFailed,
        rows("SELECT count(*) FROM requests WHERE error->>'code' = 'ERR_PROCESSING_FAILED'").await?,
    );
    // A command sent back after running out of deliveries unread (`revived`: returned by
    // handovers, kills, restarts) is the system coping, not a dead letter.
    checks.expect_none(
        CheckId::WholeSystemNothingDeadLettered,
        rows("SELECT count(*) FROM dead_letters WHERE resolution IS DISTINCT FROM 'revived'").await?,
    );

    // Events: one order.paid per paid order, published and received once. The relay
    // deletes what it published, so an event is either still in the outbox or, through the
    // data-platform stand-in the suite runs, in received_events; by its id it counts once
    // if it is in both (published, not yet deleted). Nothing indexes the payload's order
    // id: the events are grouped by it once and joined to the orders (a hash join), where a
    // subquery per order would scan every event for each order, quadratic in a long run.
    checks.expect_none(
        CheckId::WholeSystemEventsPublished,
        rows("SELECT count(*) FROM outbox").await?,
    );
    checks.expect_none(
        CheckId::WholeSystemEventPerPaidOrder,
        rows(
            "SELECT count(*) FROM orders o LEFT JOIN (
               SELECT e.payload->>'orderId' AS order_id, count(DISTINCT e.id) AS events FROM (
                  SELECT id, payload FROM outbox WHERE routing_key = 'order.paid'
                  UNION ALL
                  SELECT event_id, payload FROM received_events WHERE routing_key = 'order.paid') e
               GROUP BY 1) e ON e.order_id = o.id::text
             WHERE (o.status = 'PAID')::int <> COALESCE(e.events, 0)",
        )
        .await?,
    );
    checks.expect_none(
        CheckId::WholeSystemEventsReceived,
        rows(
            "SELECT count(*) FROM orders o LEFT JOIN (
               SELECT payload->>'orderId' AS order_id, count(*) AS events FROM received_events
               WHERE routing_key = 'order.paid' GROUP BY 1) e ON e.order_id = o.id::text
             WHERE (o.status = 'PAID')::int <> COALESCE(e.events, 0)",
        )
        .await?,
    );

    // Through the API: a sample of requests reads terminal, of balances reads the row.
    let sample: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT id, user_id FROM requests WHERE user_id IS NOT NULL ORDER BY random() LIMIT 100",
    )
    .fetch_all(db)
    .await?;
    let senders: Vec<i64> = sample.iter().map(|(_, user)| *user).collect();
    crate::setup::issue_tokens(db, api, &senders).await?;
    let mut not_terminal = 0;
    for (id, user) in &sample {
        let answer = api.request_status_of(*user, *id).await?;
        if !(answer.status == 200 && matches!(answer.str_field("status"), Some("SUCCEEDED" | "FAILED"))) {
            not_terminal += 1;
        }
    }
    checks.expect(
        CheckId::WholeSystemRequestsTerminalApi,
        not_terminal == 0,
        format!("{not_terminal} of {} sampled requests do not", sample.len()),
    );
    let balances: Vec<(i64, i64)> =
        sqlx::query_as("SELECT user_id, amount FROM balances ORDER BY random() LIMIT 100")
            .fetch_all(db)
            .await?;
    balances_read_back(&mut checks, CheckId::WholeSystemBalancesApi, db, api, &balances).await?;
    Ok(checks)
}

/// Reads each sampled `(user, balance row)` back through `GET /users/{id}/balance`: check
/// `id`, the caller's suite's own.
async fn balances_read_back(
    checks: &mut Checks,
    id: CheckId,
    db: &PgPool,
    api: &Api,
    sample: &[(i64, i64)],
) -> anyhow::Result<()> {
    let readers: Vec<i64> = sample.iter().map(|(user, _)| *user).collect();
    crate::setup::issue_tokens(db, api, &readers).await?;
    let mut balance_off = 0;
    for (user, amount) in sample {
        let answer = api.get(&format!("/users/{user}/balance")).await?;
        if answer.i64_field("balance") != Some(*amount) {
            balance_off += 1;
        }
    }
    checks.expect(
        id,
        balance_off == 0,
        format!("{balance_off} of {} sampled users differ", sample.len()),
    );
    Ok(())
}
