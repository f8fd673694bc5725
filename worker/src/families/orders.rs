//! The order family: stock reservation and payment, a whole batch at a time.
//!
//! A batch holds one user partition's commands in broker order, so a user's create and pay
//! are settled in that order. Every row of the batch's users is locked up front, in the
//! batch's lock round trip: orders by id, then the users of those orders by id, then
//! balances by user id, then held coupons by id. Products are what partitions share (a
//! crowd buys a few of them): they are read without a lock there, and locked by id and
//! changed relatively (`reserved = reserved + n`) in the message that commits
//! ([`crate::settling::pipeline::SharedRows`]), so a batch holds a hot product's row for a statement
//! and its commit's flush, never while it waits on anything else. A batch that found the
//! stock moved (its relative change no longer fits, or a reservation it would refuse for
//! stock) is settled again with the products locked up front, after the users and before
//! the balances. Cancellation and expiry lock orders then products; nothing else locks a
//! `users` row (foreign-key checks take key-share locks, which `NO KEY UPDATE` does not
//! conflict with), and products are either the last rows a batch locks or come after
//! every row that a batch of another user could hold, so concurrent batches, cancels and
//! expiries never deadlock. The batch is then decided in memory by the
//! order rules ([`shared::domain::order_book`]), command after command, each seeing what
//! the earlier ones did (stock reserved, balance debited, coupon used, orders and units the
//! user holds), and the final state of every row is written in the batch's one write
//! statement. Each command either applies all its effects or, refused, none: a refusal is
//! a decision, not an error, and does not roll the batch back.
//!
//! The per-user limits (the unpaid-order cap, a product's `maxPerCustomer`) are counted
//! here, under the lock of the user's `users` row, because only a count taken under a lock
//! that every settlement of the user's orders takes holds under concurrency. Today a user's
//! orders share one partition, whose lease the batch holds, so they settle one batch at a
//! time anyway; the user's row lock keeps the counts right if orders are ever routed
//! otherwise (by hot product, say), when two batches of one user could settle at once.
//! The counts are statements of their own after that lock: under `READ COMMITTED` each
//! statement reads a snapshot taken when it starts, so they see every order that the
//! user's previous lock holder committed; a count inside the locking statement would read
//! the snapshot from before the wait.
//!
//! - `book`: the rows the batch locked, read as the order book it is decided on.
//! - `decisions`: each command decided on that book, creations before the payments of
//!   their orders: a reservation or a payment, counted.
//! - `writes`: what the book changed, as the parameters of the batch's write statement and
//!   the stock changes sent with its `COMMIT`.

mod book;
mod decisions;
#[cfg(test)]
mod tests;
mod writes;

use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::domain::command::{OrderCreate, OrderPay, RequestKind, RequestStatus};
use shared::domain::error::ErrorCode;
use shared::domain::limits::HOLDING_STATUSES;
use shared::domain::order::OrderStatus;

use crate::settling::pipeline::{
    payload_bigint, text, CommandFamily, Decided, Decision, LockedState, PendingRequest, SettleError,
    SharedRows,
};

use book::read_book;
pub use decisions::with_creations_first;
use decisions::{reserve, settle_payment};
use writes::{stock_changes, Writes};

/// Order creations and payments, partitioned by user.
pub struct OrderCommands {
    /// How long a reservation holds its stock.
    pub reservation_ttl: Duration,
    /// Most `RESERVED` orders one user may hold: a creation past it is refused
    /// `ERR_ORDER_TOO_MANY_RESERVED`.
    pub max_reserved_orders: i64,
}

enum OrderCommand {
    Create(OrderCreate),
    Pay(OrderPay),
}

/// The orders the batch's requests are about (`ids`: the batch's request ids, a literal):
/// the typed `order_id` the api stored with each.
fn named_orders(ids: &str) -> String {
    format!("SELECT r.order_id FROM requests r WHERE r.id = ANY({ids})")
}

/// What the batch's payments name in their payloads (`field`), for their requests only.
fn named_by_payments(ids: &str, field: &'static str) -> String {
    format!(
        "SELECT {} FROM requests r WHERE r.id = ANY({ids}) AND r.kind = {}",
        payload_bigint(field),
        text(RequestKind::OrderPay.as_str())
    )
}

impl CommandFamily for OrderCommands {
    /// Locks an order batch's request rows, and with them the `PENDING` creation of every
    /// order a `PENDING` payment of the batch pays for: all in one statement, by id, the
    /// order in which every settlement locks requests.
    ///
    /// A user's commands share a partition, so a creation is normally settled before any
    /// payment of its order. It comes later only when its message does: the api's publish
    /// was not confirmed and the sweeper sent it after the payment, or it was dead-lettered
    /// and sent back. The payment would then find its order `PENDING` and be refused,
    /// although the contract accepts a payment of a `PENDING` order; [`with_creations_first`]
    /// settles the stored creation first instead. Only the payer's own orders (so the
    /// creation is in this partition, whose lease the transaction holds), and not a
    /// creation a worker has given up on or that waits in the dead letters: its failure is
    /// not the payment's to repeat.
    fn lock_requests(&self, ids: &str) -> String {
        let pending = text(RequestStatus::Pending.as_str());
        let order_pending = text(OrderStatus::Pending.as_str());
        let pay = text(RequestKind::OrderPay.as_str());
        let create = text(RequestKind::OrderCreate.as_str());
        // dynamic: sent with `BEGIN` and the fence as one message, which the macros cannot build.
        format!(
            "WITH creations AS (
                SELECT o.create_request_id AS id
                FROM requests r
                JOIN orders o ON o.id = r.order_id
                WHERE r.id = ANY({ids}) AND r.kind = {pay} AND r.status = {pending}
                  AND o.status = {order_pending} AND o.user_id = r.user_id
                  AND NOT EXISTS (SELECT 1 FROM settle_failures f WHERE f.request_id = o.create_request_id)
                  AND NOT EXISTS (SELECT 1 FROM dead_letters d
                                  WHERE d.request_id = o.create_request_id AND d.resolution IS NULL))
             SELECT id, kind, payload, status, created_at FROM requests
             WHERE id = ANY({ids})
                OR (id IN (SELECT id FROM creations) AND status = {pending} AND kind = {create})
             ORDER BY id FOR NO KEY UPDATE"
        )
    }

    fn lock_state(&self, ids: &str, shared: SharedRows) -> Vec<String> {
        let orders = named_orders(ids);
        let product_lock = match shared {
            SharedRows::AtCommit => "",
            SharedRows::Locked => "FOR NO KEY UPDATE",
        };
        let payers = named_by_payments(ids, "userId");
        let coupons = named_by_payments(ids, "couponId");
        let user = payload_bigint("userId");
        let coupon = payload_bigint("couponId");
        let pay = text(RequestKind::OrderPay.as_str());
        let reserved = text(OrderStatus::Reserved.as_str());
        let holding = HOLDING_STATUSES
            .iter()
            .map(|status| text(status.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        // The owners of the batch's orders: creators and payers alike, so that every order
        // batch of a user takes the user's lock.
        let users = format!("SELECT o.user_id FROM orders o WHERE o.id IN ({orders})");
        // `NO KEY UPDATE`, here and wherever rows are locked: settlements never change keys,
        // and this lock does not conflict with the key-share locks that foreign-key checks
        // take. With `FOR UPDATE`, the API inserting order lines (locking their products in
        // the client's order) and a reservation locking the same products deadlocked under
        // a burst.
        // dynamic: sent with `BEGIN` and the fence as one message, which the macros cannot build.
        vec![
            format!(
                "SELECT o.id, o.user_id, o.status, o.total_amount FROM orders o
                 WHERE o.id IN ({orders}) ORDER BY o.id FOR NO KEY UPDATE"
            ),
            // The users' rows, the lock the per-user limits are counted under (see the
            // module's comment). Nothing is read from them.
            format!(
                "SELECT u.id FROM users u WHERE u.id IN ({users})
                 ORDER BY u.id FOR NO KEY UPDATE"
            ),
            // Each user's `RESERVED` orders, for the unpaid-order cap (on
            // `orders_unpaid_by_user`, which holds no paid history).
            format!(
                "SELECT o.user_id, count(*) AS reserved FROM orders o
                 WHERE o.user_id IN ({users}) AND o.status = {reserved}
                 GROUP BY o.user_id"
            ),
            format!(
                "SELECT p.id, p.name, p.price, p.stock - p.reserved AS available, p.max_per_customer
                 FROM products p
                 WHERE p.id IN (SELECT oi.product_id FROM order_items oi WHERE oi.order_id IN ({orders}))
                 ORDER BY p.id {product_lock}"
            ),
            // The units each user holds of each limited product the user orders in the
            // batch, in `RESERVED` and `PAID` orders. After the products' lock, so the
            // limits it selects by are the ones just read. Without a limited product the
            // pairs are none and nothing is walked; with one, the user's orders
            // (`orders_by_user`, paid history included: it counts), each probed for the
            // product on `order_items`' key. No index of its own: one would cost a write at
            // every reservation and payment, for the rare batch with a limit.
            format!(
                "SELECT pair.user_id, pair.product_id,
                        (SELECT COALESCE(sum(oi.quantity), 0)::bigint
                         FROM orders o
                         JOIN order_items oi ON oi.order_id = o.id AND oi.product_id = pair.product_id
                         WHERE o.user_id = pair.user_id AND o.status IN ({holding})) AS held
                 FROM (SELECT DISTINCT o.user_id, line.product_id
                       FROM orders o
                       JOIN order_items line ON line.order_id = o.id
                       JOIN products p ON p.id = line.product_id
                       WHERE o.id IN ({orders}) AND p.max_per_customer IS NOT NULL) pair"
            ),
            format!(
                "SELECT oi.order_id, oi.product_id, oi.quantity, oi.name, oi.unit_price
                 FROM order_items oi WHERE oi.order_id IN ({orders})
                 ORDER BY oi.order_id, oi.product_id"
            ),
            format!(
                "SELECT b.user_id, b.amount FROM balances b
                 WHERE b.user_id IN ({payers}) ORDER BY b.user_id FOR NO KEY UPDATE"
            ),
            format!(
                "SELECT uc.id, uc.user_id, uc.coupon_id, uc.used_at IS NOT NULL AS used,
                        c.discount_type, c.discount_value, c.expires_at <= now() AS expired,
                        c.all_products
                 FROM user_coupons uc JOIN coupons c ON c.id = uc.coupon_id
                 WHERE uc.id IN (SELECT held.id FROM requests r
                                 JOIN user_coupons held ON held.user_id = {user} AND held.coupon_id = {coupon}
                                 WHERE r.id = ANY({ids}) AND r.kind = {pay})
                 ORDER BY uc.id FOR NO KEY UPDATE OF uc"
            ),
            // The products of the batch's orders each paying coupon applies to.
            format!(
                "SELECT cp.coupon_id, cp.product_id FROM coupon_products cp
                 WHERE cp.coupon_id IN ({coupons})
                   AND cp.product_id IN (SELECT oi.product_id FROM order_items oi WHERE oi.order_id IN ({orders}))"
            ),
        ]
    }

    fn settling_order(
        &self,
        pending: Vec<PendingRequest>,
        beside: Vec<PendingRequest>,
    ) -> Vec<PendingRequest> {
        with_creations_first(pending, beside)
    }

    fn decide(
        &self,
        requests: &[PendingRequest],
        state: LockedState,
        now: DateTime<Utc>,
        shared: SharedRows,
    ) -> Result<Decided, SettleError> {
        let commands: Vec<OrderCommand> = requests
            .iter()
            .map(|r| {
                let parsed = match r.kind {
                    RequestKind::OrderCreate => {
                        serde_json::from_value(r.payload.clone()).map(OrderCommand::Create)
                    }
                    RequestKind::OrderPay => serde_json::from_value(r.payload.clone()).map(OrderCommand::Pay),
                    RequestKind::CouponIssue => {
                        return Err(SettleError::Unsettleable {
                            id: r.id,
                            reason: "a coupon command in an order partition".to_owned(),
                        })
                    }
                };
                parsed.map_err(|e| SettleError::Unsettleable {
                    id: r.id,
                    reason: format!("malformed order payload: {e}"),
                })
            })
            .collect::<Result<_, _>>()?;
        let ttl =
            chrono::Duration::from_std(self.reservation_ttl).map_err(|e| SettleError::Unsettleable {
                id: requests.first().map(|r| r.id).unwrap_or_default(),
                reason: format!("the reservation time is out of range: {e}"),
            })?;
        let mut book = read_book(state, self.max_reserved_orders)?;
        let decisions = requests
            .iter()
            .zip(&commands)
            .map(|(request, command)| match command {
                OrderCommand::Create(create) => reserve(&mut book, create, now + ttl),
                OrderCommand::Pay(pay) => settle_payment(&mut book, pay, request.id, now),
            })
            .collect::<Vec<_>>();
        // Stock read unlocked is no ground for a refusal: the units may have come back
        // since (a cancel, an expiry). Settled again with the products locked, the refusal
        // is true of the moment it is decided.
        if shared == SharedRows::AtCommit
            && decisions
                .iter()
                .any(|d| matches!(d, Decision::Failed(e) if e.code == ErrorCode::OrderOutOfStock))
        {
            return Err(SettleError::SharedRowsMoved);
        }
        let at_commit = stock_changes(book.stock());
        let writes = Writes::from(book.into_changes());
        let wrote_events = !writes.events.is_empty();
        Ok(Decided {
            decisions,
            writes: Box::new(move |args| writes.bind(args)),
            wrote_events,
            at_commit,
        })
    }

    fn write_ctes(&self) -> &'static str {
        // dynamic: part of the write statement composed at start (`settle::write_statement`).
        // Parameters from `FIRST_FAMILY_PARAMETER` (5) on, in the order `Writes::bind`
        // adds them. Each `x = ANY(..)` is for the planner, as in the outcomes' `UPDATE`:
        // under a generic plan it cannot tell how many rows an `UNNEST` holds, and a guess
        // of many could scan a whole table instead of looking a few rows up.
        "moved AS (
            UPDATE orders o
            SET status = w.status,
                total_amount = COALESCE(w.total_amount, o.total_amount),
                reserved_until = COALESCE(w.reserved_until, o.reserved_until),
                closed_at = CASE WHEN w.closed THEN now() ELSE o.closed_at END,
                paid_at = COALESCE(w.paid_at, o.paid_at),
                discount_amount = COALESCE(w.discount_amount, o.discount_amount),
                paid_amount = COALESCE(w.paid_amount, o.paid_amount),
                coupon_id = CASE WHEN w.paid_at IS NULL THEN o.coupon_id ELSE w.coupon_id END,
                paid_event_id = COALESCE(w.paid_event_id, o.paid_event_id)
            FROM UNNEST($5::uuid[], $6::text[], $7::bigint[], $8::timestamptz[], $9::bool[],
                        $10::timestamptz[], $11::bigint[], $12::bigint[], $13::bigint[], $35::uuid[])
                 AS w(id, status, total_amount, reserved_until, closed, paid_at, discount_amount,
                      paid_amount, coupon_id, paid_event_id)
            WHERE o.id = ANY($5) AND o.id = w.id),
         snapshot AS (
            UPDATE order_items oi SET name = s.name, unit_price = s.price
            FROM UNNEST($14::uuid[], $15::bigint[], $16::text[], $17::bigint[])
                 AS s(order_id, product_id, name, price)
            WHERE oi.order_id = ANY($14) AND oi.order_id = s.order_id AND oi.product_id = s.product_id),
         debited AS (
            UPDATE balances b SET amount = d.amount, updated_at = now()
            FROM UNNEST($18::bigint[], $19::bigint[]) AS d(user_id, amount)
            WHERE b.user_id = ANY($18) AND b.user_id = d.user_id),
         ledger AS (
            INSERT INTO balance_transactions (user_id, kind, amount, balance_after, order_id)
            SELECT l.user_id, $36::text, l.amount, l.balance_after, l.order_id
            FROM UNNEST($20::bigint[], $21::bigint[], $22::bigint[], $23::uuid[])
                 AS l(user_id, amount, balance_after, order_id)),
         used AS (
            UPDATE user_coupons uc SET used_at = now(), order_id = u.order_id
            FROM UNNEST($24::uuid[], $25::uuid[]) AS u(id, order_id)
            WHERE uc.id = ANY($24) AND uc.id = u.id),
         payment AS (
            INSERT INTO payments (id, order_id, user_id, request_id, amount, discount_amount, user_coupon_id)
            SELECT * FROM UNNEST($26::uuid[], $27::uuid[], $28::bigint[], $29::uuid[],
                                 $30::bigint[], $31::bigint[], $32::uuid[])),
         event AS (
            INSERT INTO outbox (id, routing_key, payload)
            SELECT e.id, 'order.paid', e.payload FROM UNNEST($33::uuid[], $34::jsonb[]) AS e(id, payload))"
    }
}
