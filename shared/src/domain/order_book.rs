//! The order rules of a settlement: reserving an order's stock and paying for it, over the
//! rows a batch of order commands has locked, in memory.
//!
//! An [`OrderBook`] starts from those rows ([`Rows`]) and takes the batch's commands one
//! after the other, each seeing what the earlier ones did: stock reserved, balances debited,
//! coupons used, unpaid orders and units each customer holds. Each command either applies
//! all its effects or, refused, none: a refusal is the contract's error body, and the book
//! is left exactly as it was. What the accepted commands changed comes out as [`Changes`],
//! one final state per row, which the worker writes in one statement.
//!
//! The rules, in the order they are asked:
//! - a reservation: the order is still `PENDING`; every line within its product's
//!   per-customer limit, then the customer under the unpaid-order cap (their own limits,
//!   whatever stock is left); every product has the units; the total fits in an `i64` and the
//!   order has lines. All lines are reserved, or none; names and prices are snapshotted.
//! - a payment: the order exists and is the payer's, and is `RESERVED`; a coupon, when named,
//!   is held, unused, unexpired and applies to some line (a restricted coupon discounts only
//!   the lines of its products); the balance covers the total less the discount. Then the
//!   balance is debited with its ledger entry, the reserved units are sold, the coupon used,
//!   the payment and the `order.paid` event recorded, and the order is `PAID`.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::command::{OrderPaid, OrderPay, OrderReserved};
use crate::domain::error::{ErrorBody, ErrorCode};
use crate::domain::events::{OrderPaid as OrderPaidEvent, OrderPaidType, PaidItem};
use crate::domain::limits::{refuse_past_limit, refuse_past_unpaid_cap, LimitedLine};
use crate::domain::money::{order_total, Discount};
use crate::domain::order::{OrderEvent, OrderStatus};

/// An order as its settlement locked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: Uuid,
    pub user_id: i64,
    pub status: OrderStatus,
    pub total_amount: i64,
}

/// One line of an order: what the api stored, then the snapshot a reservation takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub order_id: Uuid,
    pub product_id: i64,
    pub quantity: i64,
    pub name: String,
    pub unit_price: i64,
}

/// A product an order of the batch names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub id: i64,
    pub name: String,
    pub price: i64,
    /// On hand minus reserved: what can still be reserved.
    pub available: i64,
    /// Most units one customer may hold in `RESERVED` and `PAID` orders; `None`: no limit.
    pub max_per_customer: Option<i64>,
}

/// A coupon a payer holds, with what the coupon says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldCoupon {
    /// The holding (`user_coupons.id`), marked used by a payment.
    pub id: Uuid,
    pub user_id: i64,
    pub coupon_id: i64,
    pub used: bool,
    /// `None`: the stored discount is not one the rules know (a payment with it is refused).
    pub discount: Option<Discount>,
    pub expired: bool,
    /// Whether it applies to every product; otherwise to the products of `Rows::applicable`.
    pub all_products: bool,
}

/// What a settlement read under its locks: the book's starting point.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    pub orders: Vec<Order>,
    pub lines: Vec<Line>,
    pub products: Vec<Product>,
    /// `(user, balance)` of the batch's payers; a payer without one has nothing to spend.
    pub balances: Vec<(i64, i64)>,
    pub held: Vec<HeldCoupon>,
    /// `(coupon, product)`: the products of the batch a restricted coupon applies to.
    pub applicable: Vec<(i64, i64)>,
    /// `(user, count)` of `RESERVED` orders; a user without an entry holds none.
    pub reserved_orders: Vec<(i64, i64)>,
    /// `(user, product, units)` held in `RESERVED` and `PAID` orders, for limited products.
    pub units_held: Vec<(i64, i64, i64)>,
    /// The most unpaid orders one customer may hold.
    pub max_reserved_orders: i64,
}

/// What a payment needs from outside the rules: who asked, when, and the ids it mints (so
/// that the rules read no clock and draw no random numbers).
#[derive(Debug, Clone, Copy)]
pub struct PaymentContext {
    pub request_id: Uuid,
    pub now: DateTime<Utc>,
    pub payment_id: Uuid,
    pub event_id: Uuid,
}

/// The units a batch reserved and sold of one product.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StockChange {
    pub reserved: i64,
    pub sold: i64,
}

/// What a batch changed in one order, with its final status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderChange {
    pub order_id: Uuid,
    pub status: OrderStatus,
    /// Reserved: its total and until when.
    pub reserved: Option<(i64, DateTime<Utc>)>,
    /// Closed by a refusal.
    pub closed: bool,
    pub paid: Option<PaidFields>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaidFields {
    pub at: DateTime<Utc>,
    pub discount: i64,
    pub amount: i64,
    /// The coupon the payment used.
    pub coupon_id: Option<i64>,
    /// The `order.paid` event written with the payment, kept on the order (its outbox row
    /// is deleted once published): the consistency audit's trace of it.
    pub event_id: Uuid,
}

/// A line whose product was renamed or repriced since the api stored it: written anew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub order_id: Uuid,
    pub product_id: i64,
    pub name: String,
    pub unit_price: i64,
}

/// A payment's ledger entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerEntry {
    pub user_id: i64,
    pub amount: i64,
    pub balance_after: i64,
    pub order_id: Uuid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payment {
    pub id: Uuid,
    pub order_id: Uuid,
    pub user_id: i64,
    pub request_id: Uuid,
    pub amount: i64,
    pub discount: i64,
    pub user_coupon_id: Option<Uuid>,
}

/// Every row a batch changes, each once, with its final state.
#[derive(Debug, Default)]
pub struct Changes {
    pub orders: Vec<OrderChange>,
    pub snapshots: Vec<Snapshot>,
    /// By product id, ascending: the order the products are locked in at commit.
    pub stock: BTreeMap<i64, StockChange>,
    /// `(user, balance after)`, by user id.
    pub balances: Vec<(i64, i64)>,
    pub ledger: Vec<LedgerEntry>,
    /// `(holding, order)`: coupons used, and by which order.
    pub used_coupons: Vec<(Uuid, Uuid)>,
    pub payments: Vec<Payment>,
    pub events: Vec<OrderPaidEvent>,
}

/// Per order, what has changed so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Changed {
    reserved: Option<(i64, DateTime<Utc>)>,
    closed: bool,
    paid: Option<PaidFields>,
}

/// The rows of a batch, as its commands have changed them so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderBook {
    orders: HashMap<Uuid, Order>,
    /// Lines by order.
    lines: HashMap<Uuid, Vec<Line>>,
    products: HashMap<i64, Product>,
    balances: HashMap<i64, i64>,
    /// Coupons held, by `(user, coupon)`.
    held: HashMap<(i64, i64), HeldCoupon>,
    applicable: HashSet<(i64, i64)>,
    reserved_orders: HashMap<i64, i64>,
    max_reserved_orders: i64,
    /// Units held by `(user, product)`, for limited products (no entry: none held).
    units_held: HashMap<(i64, i64), i64>,
    changed: BTreeMap<Uuid, Changed>,
    snapshots: BTreeMap<(Uuid, i64), (String, i64)>,
    stock: BTreeMap<i64, StockChange>,
    debited: BTreeMap<i64, i64>,
    ledger: Vec<LedgerEntry>,
    used: Vec<(Uuid, Uuid)>,
    payments: Vec<Payment>,
    events: Vec<OrderPaidEvent>,
}

/// Whether a reservation refused with `code` rejected its order (refused for the order's
/// own reasons: a limit, stock, its lines), rather than finding it missing or no longer
/// `PENDING`, which changes nothing.
pub fn rejects_order(code: ErrorCode) -> bool {
    !matches!(
        code,
        ErrorCode::OrderNotFound | ErrorCode::OrderConcurrencyConflict
    )
}

fn refuse<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, ErrorBody> {
    Err(ErrorBody::new(code, message))
}

impl OrderBook {
    pub fn new(rows: Rows) -> Self {
        let mut lines: HashMap<Uuid, Vec<Line>> = HashMap::new();
        for line in rows.lines {
            lines.entry(line.order_id).or_default().push(line);
        }
        Self {
            orders: rows.orders.into_iter().map(|o| (o.id, o)).collect(),
            lines,
            products: rows.products.into_iter().map(|p| (p.id, p)).collect(),
            balances: rows.balances.into_iter().collect(),
            held: rows
                .held
                .into_iter()
                .map(|h| ((h.user_id, h.coupon_id), h))
                .collect(),
            applicable: rows.applicable.into_iter().collect(),
            reserved_orders: rows.reserved_orders.into_iter().collect(),
            max_reserved_orders: rows.max_reserved_orders,
            units_held: rows
                .units_held
                .into_iter()
                .map(|(user, product, held)| ((user, product), held))
                .collect(),
            changed: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            stock: BTreeMap::new(),
            debited: BTreeMap::new(),
            ledger: Vec::new(),
            used: Vec::new(),
            payments: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Reserves every line of a `PENDING` order or none, snapshotting names and prices.
    ///
    /// A refusal for the order's own reasons (limits, stock, its lines) rejects the order:
    /// that change is the only one a refused reservation makes. An order that is missing or
    /// no longer `PENDING` is refused without any change.
    pub fn reserve(
        &mut self,
        order_id: Uuid,
        reserved_until: DateTime<Utc>,
    ) -> Result<OrderReserved, ErrorBody> {
        let Some(order) = self.orders.get(&order_id) else {
            return refuse(ErrorCode::OrderNotFound, "the order does not exist");
        };
        if order.status.after(OrderEvent::Reserve).is_none() {
            return refuse(
                ErrorCode::OrderConcurrencyConflict,
                "the order was cancelled before its stock could be reserved",
            );
        }
        let user = order.user_id;
        let lines = self.lines.get(&order_id).cloned().unwrap_or_default();
        let priced = lines
            .iter()
            .filter_map(|line| self.products.get(&line.product_id).map(|p| (line, p)))
            .collect::<Vec<_>>();
        let total = order_total(
            priced
                .iter()
                .map(|(line, product)| (product.price, line.quantity)),
        );
        let refusal = self
            .past_limits(user, &priced)
            .or_else(|| {
                let (_, product) = priced
                    .iter()
                    .find(|(line, product)| product.available < line.quantity)?;
                Some(ErrorBody::new(
                    ErrorCode::OrderOutOfStock,
                    format!("product {} has {} left", product.id, product.available.max(0)),
                ))
            })
            .or_else(|| match total {
                None => Some(ErrorBody::new(
                    ErrorCode::OrderInvalidItems,
                    "the order total is too large",
                )),
                Some(_) if priced.is_empty() => Some(ErrorBody::new(
                    ErrorCode::OrderInvalidItems,
                    "the order has no lines",
                )),
                Some(_) => None,
            });
        if let Some(refusal) = refusal {
            self.move_order(order_id, OrderEvent::Reject);
            self.changed.entry(order_id).or_default().closed = true;
            return Err(refusal);
        }
        let total = total.unwrap_or_default();
        let priced = priced
            .into_iter()
            .map(|(line, product)| {
                (
                    line.product_id,
                    line.quantity,
                    product.name.clone(),
                    product.price,
                )
            })
            .collect::<Vec<_>>();
        *self.reserved_orders.entry(user).or_default() += 1;
        for (product_id, quantity, name, price) in priced {
            if let Some(product) = self.products.get_mut(&product_id) {
                product.available -= quantity;
            }
            *self.units_held.entry((user, product_id)).or_default() += quantity;
            self.stock.entry(product_id).or_default().reserved += quantity;
            let Some(line) = self
                .lines
                .get_mut(&order_id)
                .and_then(|lines| lines.iter_mut().find(|l| l.product_id == product_id))
            else {
                continue;
            };
            // The api stored the line with the name and price it quoted; only a product
            // renamed or repriced since needs its line written again (most orders: none, a
            // row update less per line).
            if line.name != name || line.unit_price != price {
                self.snapshots
                    .insert((order_id, product_id), (name.clone(), price));
            }
            line.name = name;
            line.unit_price = price;
        }
        let status = self
            .move_order(order_id, OrderEvent::Reserve)
            .unwrap_or(OrderStatus::Reserved);
        if let Some(order) = self.orders.get_mut(&order_id) {
            order.total_amount = total;
        }
        self.changed.entry(order_id).or_default().reserved = Some((total, reserved_until));
        Ok(OrderReserved {
            order_id,
            status,
            total_amount: total,
            reserved_until,
        })
    }

    /// The refusal of an order past one of its customer's limits: a product's
    /// per-customer limit first, then the unpaid-order cap.
    fn past_limits(&self, user: i64, priced: &[(&Line, &Product)]) -> Option<ErrorBody> {
        refuse_past_limit(priced.iter().map(|(line, product)| {
            LimitedLine {
                product_id: line.product_id,
                quantity: line.quantity,
                max_per_customer: product.max_per_customer,
                held: self
                    .units_held
                    .get(&(user, line.product_id))
                    .copied()
                    .unwrap_or(0),
            }
        }))
        .or_else(|| {
            let reserved = self.reserved_orders.get(&user).copied().unwrap_or(0);
            refuse_past_unpaid_cap(reserved, self.max_reserved_orders)
        })
    }

    /// Pays a `RESERVED` order. Any refusal leaves the book as it was (a failed payment
    /// keeps the order `RESERVED`, so the user can charge and pay again).
    pub fn pay(&mut self, pay: &OrderPay, at: PaymentContext) -> Result<OrderPaid, ErrorBody> {
        let lines = self.lines.get(&pay.order_id).cloned().unwrap_or_default();
        let Some(order) = self.orders.get(&pay.order_id).filter(|_| !lines.is_empty()) else {
            return refuse(ErrorCode::PaymentOrderNotFound, "no order with this orderId");
        };
        if order.user_id != pay.user_id {
            return refuse(ErrorCode::OrderUnauthorized, "this order belongs to another user");
        }
        if order.status.after(OrderEvent::Pay).is_none() {
            return refuse(
                ErrorCode::PaymentInvalidOrderStatus,
                format!("an order that is {} cannot be paid", order.status.as_str()),
            );
        }
        let total = order.total_amount;
        let (discount, held) = match pay.coupon_id {
            None => (0, None),
            Some(coupon_id) => {
                let (discount, held) = self.coupon_discount(pay.user_id, coupon_id, total, &lines)?;
                (discount, Some(held))
            }
        };
        let amount = total - discount;
        let balance_after = match self.balances.get(&pay.user_id).copied() {
            _ if amount == 0 => None,
            Some(balance) if balance >= amount && amount > 0 => Some(balance - amount),
            _ => {
                return refuse(
                    ErrorCode::PaymentInsufficientBalance,
                    format!("the balance does not cover {amount} won"),
                )
            }
        };
        if let Some(after) = balance_after {
            self.balances.insert(pay.user_id, after);
            self.debited.insert(pay.user_id, after);
            self.ledger.push(LedgerEntry {
                user_id: pay.user_id,
                amount,
                balance_after: after,
                order_id: pay.order_id,
            });
        }
        for line in &lines {
            self.stock.entry(line.product_id).or_default().sold += line.quantity;
        }
        let coupon_used = held.map(|(_, coupon_id)| coupon_id);
        if let Some((holding, coupon_id)) = held {
            self.used.push((holding, pay.order_id));
            if let Some(held) = self.held.get_mut(&(pay.user_id, coupon_id)) {
                held.used = true;
            }
        }
        self.payments.push(Payment {
            id: at.payment_id,
            order_id: pay.order_id,
            user_id: pay.user_id,
            request_id: at.request_id,
            amount,
            discount,
            user_coupon_id: held.map(|(holding, _)| holding),
        });
        self.move_order(pay.order_id, OrderEvent::Pay);
        // Paid, it is no longer unpaid; its units stay held (`PAID` counts as `RESERVED` did).
        if let Some(reserved) = self.reserved_orders.get_mut(&pay.user_id) {
            *reserved -= 1;
        }
        self.changed.entry(pay.order_id).or_default().paid = Some(PaidFields {
            at: at.now,
            discount,
            amount,
            coupon_id: coupon_used,
            event_id: at.event_id,
        });
        self.events.push(OrderPaidEvent {
            event_id: at.event_id,
            kind: OrderPaidType::OrderPaid,
            occurred_at: at.now,
            order_id: pay.order_id,
            user_id: pay.user_id,
            items: lines
                .iter()
                .map(|l| PaidItem {
                    product_id: l.product_id,
                    name: l.name.clone(),
                    unit_price: l.unit_price,
                    quantity: l.quantity,
                })
                .collect(),
            total_amount: total,
            discount_amount: discount,
            paid_amount: amount,
            coupon_id: coupon_used,
        });
        Ok(OrderPaid {
            order_id: pay.order_id,
            payment_id: at.payment_id,
            paid_amount: amount,
            discount_amount: discount,
        })
    }

    /// The discount of a coupon on this order, with the holding to mark used and its
    /// coupon, or the refusal.
    fn coupon_discount(
        &self,
        user_id: i64,
        coupon_id: i64,
        total: i64,
        lines: &[Line],
    ) -> Result<(i64, (Uuid, i64)), ErrorBody> {
        let invalid = |message: &str| refuse(ErrorCode::PaymentInvalidCoupon, message);
        let Some(held) = self.held.get(&(user_id, coupon_id)) else {
            return invalid("the user does not hold this coupon");
        };
        if held.used {
            return invalid("this coupon has already been used");
        }
        if held.expired {
            return invalid("this coupon has expired");
        }
        let base = if held.all_products {
            total
        } else {
            // The coupon discounts the lines it applies to.
            lines
                .iter()
                .filter(|l| self.applicable.contains(&(coupon_id, l.product_id)))
                .map(|l| l.unit_price * l.quantity)
                .sum()
        };
        if base == 0 {
            return invalid("this coupon applies to no product of this order");
        }
        let Some(discount) = held.discount else {
            return invalid("this coupon's discount is not valid");
        };
        Ok((discount.on(base), (held.id, coupon_id)))
    }

    /// Moves an order by `event` when it may happen; its new status.
    fn move_order(&mut self, order_id: Uuid, event: OrderEvent) -> Option<OrderStatus> {
        let order = self.orders.get_mut(&order_id)?;
        let next = order.status.after(event)?;
        order.status = next;
        self.changed.entry(order_id).or_default();
        Some(next)
    }

    /// The units reserved and sold so far, by product.
    pub fn stock(&self) -> &BTreeMap<i64, StockChange> {
        &self.stock
    }

    /// Every row the accepted commands changed, with its final state.
    pub fn into_changes(self) -> Changes {
        let orders = self
            .changed
            .into_iter()
            .filter_map(|(id, change)| {
                let order = self.orders.get(&id)?;
                Some(OrderChange {
                    order_id: id,
                    status: order.status,
                    reserved: change.reserved,
                    closed: change.closed,
                    paid: change.paid,
                })
            })
            .collect();
        Changes {
            orders,
            snapshots: self
                .snapshots
                .into_iter()
                .map(|((order_id, product_id), (name, unit_price))| Snapshot {
                    order_id,
                    product_id,
                    name,
                    unit_price,
                })
                .collect(),
            stock: self.stock,
            balances: self.debited.into_iter().collect(),
            ledger: self.ledger,
            used_coupons: self.used,
            payments: self.payments,
            events: self.events,
        }
    }
}

#[cfg(test)]
mod tests;
