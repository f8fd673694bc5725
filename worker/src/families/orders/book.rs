//! The rows an order batch locked, read as the book it is decided on.
use shared::domain::money::{Discount, DiscountType};
use shared::domain::order::OrderStatus;
use shared::domain::order_book::{HeldCoupon, Line, Order, OrderBook, Product, Rows};
use uuid::Uuid;

use crate::settling::pipeline::{LockedState, SettleError};

/// Reads the result sets of [`OrderCommands::lock_state`](super::OrderCommands::lock_state),
/// in its order, as the book the batch is decided on.
pub(super) fn read_book(mut state: LockedState, max_reserved_orders: i64) -> Result<OrderBook, SettleError> {
    let orders = state
        .rows::<(Uuid, i64, OrderStatus, i64)>()?
        .into_iter()
        .map(|(id, user_id, status, total_amount)| Order {
            id,
            user_id,
            status,
            total_amount,
        })
        .collect();
    // The users' lock: its rows say nothing the orders do not.
    state.rows::<(i64,)>()?;
    let reserved_orders = state.rows::<(i64, i64)>()?;
    let products = state
        .rows::<(i64, String, i64, i64, Option<i64>)>()?
        .into_iter()
        .map(|(id, name, price, available, max_per_customer)| Product {
            id,
            name,
            price,
            available,
            max_per_customer,
        })
        .collect();
    let units_held = state.rows::<(i64, i64, i64)>()?;
    let lines = state
        .rows::<(Uuid, i64, i64, String, i64)>()?
        .into_iter()
        .map(|(order_id, product_id, quantity, name, unit_price)| Line {
            order_id,
            product_id,
            quantity,
            name,
            unit_price,
        })
        .collect();
    let balances = state.rows::<(i64, i64)>()?;
    let held = state
        .rows::<HeldCouponRow>()?
        .into_iter()
        .map(HeldCoupon::from)
        .collect();
    let applicable = state.rows::<(i64, i64)>()?;
    Ok(OrderBook::new(Rows {
        orders,
        lines,
        products,
        balances,
        held,
        applicable,
        reserved_orders,
        units_held,
        max_reserved_orders,
    }))
}

#[derive(sqlx::FromRow)]
struct HeldCouponRow {
    id: Uuid,
    user_id: i64,
    coupon_id: i64,
    used: bool,
    discount_type: DiscountType,
    discount_value: i64,
    expired: bool,
    all_products: bool,
}

impl From<HeldCouponRow> for HeldCoupon {
    fn from(row: HeldCouponRow) -> Self {
        HeldCoupon {
            id: row.id,
            user_id: row.user_id,
            coupon_id: row.coupon_id,
            used: row.used,
            discount: Discount::new(row.discount_type, row.discount_value),
            expired: row.expired,
            all_products: row.all_products,
        }
    }
}
