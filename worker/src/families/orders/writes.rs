//! What an order batch's book changed, written: the columns bound as the parameters of the
//! batch's write statement, and the stock changes sent with its `COMMIT`.
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use shared::domain::events::OrderPaid as OrderPaidEvent;
use shared::domain::money::LedgerKind;
use shared::domain::order::OrderStatus;
use shared::domain::order_book::{Changes, StockChange};
use sqlx::Arguments;
use uuid::Uuid;

/// The batch's stock changes, per product (units reserved, units sold), as the statements
/// sent with its `COMMIT`: the products locked in id order (a second batch changing the same
/// products waits at the first, never holding one the first needs), then changed relatively,
/// so that batches of other partitions that changed them meanwhile are added to, not
/// overwritten. `product_reserved_within_stock` and `product_stock_not_negative` fail the
/// commit when the change no longer fits (then the batch is settled again with the products
/// locked). Only integers are spliced: no input reaches the text.
pub(super) fn stock_changes(stock: &BTreeMap<i64, StockChange>) -> Vec<String> {
    if stock.is_empty() {
        return Vec::new();
    }
    let ids = stock.keys().map(i64::to_string).collect::<Vec<_>>().join(",");
    let changes = stock
        .iter()
        .map(|(id, change)| format!("({id},{},{})", change.reserved, change.sold))
        .collect::<Vec<_>>()
        .join(",");
    // dynamic: sent with `COMMIT` in one simple-protocol message, which takes no parameters.
    vec![
        format!("SELECT 1 FROM products WHERE id IN ({ids}) ORDER BY id FOR NO KEY UPDATE"),
        format!(
            "UPDATE products p
             SET reserved = p.reserved + d.reserve - d.sell, stock = p.stock - d.sell,
                 sold = p.sold + d.sell, updated_at = now()
             FROM (VALUES {changes}) AS d(id, reserve, sell)
             WHERE p.id = d.id"
        ),
    ]
}

/// The parameters of [`OrderCommands::write_ctes`](super::OrderCommands::write_ctes), column by column.
#[derive(Default)]
pub(super) struct Writes {
    order_ids: Vec<Uuid>,
    order_statuses: Vec<OrderStatus>,
    order_totals: Vec<Option<i64>>,
    reserved_until: Vec<Option<DateTime<Utc>>>,
    closed: Vec<bool>,
    paid_at: Vec<Option<DateTime<Utc>>>,
    discounts: Vec<Option<i64>>,
    paid_amounts: Vec<Option<i64>>,
    coupon_ids: Vec<Option<i64>>,
    snapshot_orders: Vec<Uuid>,
    snapshot_products: Vec<i64>,
    snapshot_names: Vec<String>,
    snapshot_prices: Vec<i64>,
    balance_users: Vec<i64>,
    balance_amounts: Vec<i64>,
    ledger_users: Vec<i64>,
    ledger_amounts: Vec<i64>,
    ledger_after: Vec<i64>,
    ledger_orders: Vec<Uuid>,
    used_coupons: Vec<Uuid>,
    used_orders: Vec<Uuid>,
    payment_ids: Vec<Uuid>,
    payment_orders: Vec<Uuid>,
    payment_users: Vec<i64>,
    payment_requests: Vec<Uuid>,
    payment_amounts: Vec<i64>,
    payment_discounts: Vec<i64>,
    payment_coupons: Vec<Option<Uuid>>,
    event_ids: Vec<Uuid>,
    /// `order.paid` events, each written to the outbox as the one JSON value it serializes to.
    pub(super) events: Vec<sqlx::types::Json<OrderPaidEvent>>,
    /// Per changed order (beside `order_ids`), the event its payment wrote, as `$35`; the
    /// ledger entries' kind (`$36`, always a payment here) follows it.
    paid_event_ids: Vec<Option<Uuid>>,
}

impl From<Changes> for Writes {
    fn from(changes: Changes) -> Self {
        let mut writes = Writes::default();
        for change in changes.orders {
            writes.order_ids.push(change.order_id);
            writes.order_statuses.push(change.status);
            writes.order_totals.push(change.reserved.map(|(total, _)| total));
            writes
                .reserved_until
                .push(change.reserved.map(|(_, until)| until));
            writes.closed.push(change.closed);
            writes.paid_at.push(change.paid.map(|p| p.at));
            writes.discounts.push(change.paid.map(|p| p.discount));
            writes.paid_amounts.push(change.paid.map(|p| p.amount));
            writes.coupon_ids.push(change.paid.and_then(|p| p.coupon_id));
            writes.paid_event_ids.push(change.paid.map(|p| p.event_id));
        }
        for snapshot in changes.snapshots {
            writes.snapshot_orders.push(snapshot.order_id);
            writes.snapshot_products.push(snapshot.product_id);
            writes.snapshot_names.push(snapshot.name);
            writes.snapshot_prices.push(snapshot.unit_price);
        }
        (writes.balance_users, writes.balance_amounts) = changes.balances.into_iter().unzip();
        for entry in changes.ledger {
            writes.ledger_users.push(entry.user_id);
            writes.ledger_amounts.push(entry.amount);
            writes.ledger_after.push(entry.balance_after);
            writes.ledger_orders.push(entry.order_id);
        }
        (writes.used_coupons, writes.used_orders) = changes.used_coupons.into_iter().unzip();
        for p in changes.payments {
            writes.payment_ids.push(p.id);
            writes.payment_orders.push(p.order_id);
            writes.payment_users.push(p.user_id);
            writes.payment_requests.push(p.request_id);
            writes.payment_amounts.push(p.amount);
            writes.payment_discounts.push(p.discount);
            writes.payment_coupons.push(p.user_coupon_id);
        }
        (writes.event_ids, writes.events) = changes
            .events
            .into_iter()
            .map(|event| (event.event_id, sqlx::types::Json(event)))
            .unzip();
        writes
    }
}

impl Writes {
    pub(super) fn bind(self, args: &mut sqlx::postgres::PgArguments) -> Result<(), sqlx::error::BoxDynError> {
        args.add(self.order_ids)?;
        args.add(self.order_statuses)?;
        args.add(self.order_totals)?;
        args.add(self.reserved_until)?;
        args.add(self.closed)?;
        args.add(self.paid_at)?;
        args.add(self.discounts)?;
        args.add(self.paid_amounts)?;
        args.add(self.coupon_ids)?;
        args.add(self.snapshot_orders)?;
        args.add(self.snapshot_products)?;
        args.add(self.snapshot_names)?;
        args.add(self.snapshot_prices)?;
        args.add(self.balance_users)?;
        args.add(self.balance_amounts)?;
        args.add(self.ledger_users)?;
        args.add(self.ledger_amounts)?;
        args.add(self.ledger_after)?;
        args.add(self.ledger_orders)?;
        args.add(self.used_coupons)?;
        args.add(self.used_orders)?;
        args.add(self.payment_ids)?;
        args.add(self.payment_orders)?;
        args.add(self.payment_users)?;
        args.add(self.payment_requests)?;
        args.add(self.payment_amounts)?;
        args.add(self.payment_discounts)?;
        args.add(self.payment_coupons)?;
        args.add(self.event_ids)?;
        args.add(self.events)?;
        args.add(self.paid_event_ids)?;
        args.add(LedgerKind::Payment)?;
        Ok(())
    }
}
