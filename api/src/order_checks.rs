//! What the API checks of an order or a payment before accepting it, read for many
//! requests at once ([`Batched`]): under a checkout burst the orders accepted at the same
//! moment share one statement for their quotes, and the payments one for their orders.
//!
//! The checks read outside any transaction, which is safe because they only filter: a
//! refusal is true of the moment it was read, and whatever they let through is decided for
//! good by the worker under its locks.

use std::collections::{BTreeSet, HashMap};

use shared::domain::command::OrderCreate;
use shared::domain::error::ErrorCode;
use shared::domain::ids::UserId;
use shared::domain::money::order_total;
use shared::domain::order::OrderStatus;
use sqlx::PgPool;
use uuid::Uuid;

use crate::batched::Batched;
use crate::error::{ApiError, Result};
use crate::intake::PendingOrder;

/// Most checks of one kind read by one statement.
const MAX_CHECKS_PER_STATEMENT: usize = 256;

/// The batched readers of order and payment checks.
pub struct OrderChecks {
    quotes: Batched<QuoteQuery, QuoteFacts>,
    orders: Batched<Uuid, Option<(i64, String)>>,
}

/// What a quote reads: the user and the order's products.
struct QuoteQuery {
    user_id: i64,
    product_ids: Vec<i64>,
}

/// What a quote found: the user's unpaid orders, and the name and price of each of the
/// order's products that exists. Whether the user is registered is not asked: the caller's
/// token proves it ([`crate::auth`]).
struct QuoteFacts {
    unpaid: i64,
    products: HashMap<i64, (String, i64)>,
}

impl OrderChecks {
    pub fn start(db: PgPool) -> Self {
        let quotes_db = db.clone();
        Self {
            quotes: Batched::start(MAX_CHECKS_PER_STATEMENT, "api_quote_batch_size", move |queries| {
                read_quotes(quotes_db.clone(), queries)
            }),
            orders: Batched::start(
                MAX_CHECKS_PER_STATEMENT,
                "api_payment_check_batch_size",
                move |ids| read_orders(db.clone(), ids),
            ),
        }
    }

    /// Checks how many unpaid orders the user holds (at most `cap`) and the products,
    /// and prices the order as it will be stored `PENDING`.
    ///
    /// The cap is read outside any transaction: orders of one user accepted at the same
    /// moment can pass it together, which the per-user rate limit bounds to a handful; it
    /// exists to keep one user from holding stock away from everyone, and a few over it do
    /// not.
    pub async fn quote(&self, order: &OrderCreate, cap: i64) -> Result<PendingOrder> {
        let ids: Vec<i64> = order.items.iter().map(|l| l.product_id).collect();
        let facts = self
            .quotes
            .read(QuoteQuery {
                user_id: order.user_id,
                product_ids: ids.clone(),
            })
            .await?;
        let mut names = Vec::new();
        let mut prices = Vec::new();
        let mut quantities = Vec::new();
        for line in &order.items {
            let (name, price) = facts.products.get(&line.product_id).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::ProductNotFound,
                    format!("no product {}", line.product_id),
                )
            })?;
            names.push(name.clone());
            prices.push(*price);
            quantities.push(line.quantity);
        }
        // State after existence, as the contract orders its checks.
        if facts.unpaid >= cap {
            return Err(ApiError::new(
                ErrorCode::OrderTooManyReserved,
                format!("at most {cap} unpaid orders at once: pay or cancel one first"),
            ));
        }
        let total = order_total(prices.iter().copied().zip(quantities.iter().copied()))
            .ok_or_else(|| invalid_items("the order total is too large"))?;
        Ok(PendingOrder {
            order_id: order.order_id,
            user_id: order.user_id,
            total,
            product_ids: ids,
            names,
            unit_prices: prices,
            quantities,
        })
    }

    /// What the API knows at once about a payment: the order exists (404), is the user's
    /// (403), and can still be paid (400). A `PENDING` order is accepted: its creation is
    /// settled first, in the same partition.
    pub async fn refuse_unpayable(&self, order: Uuid, user: UserId) -> Result<()> {
        let (owner, status) =
            self.orders.read(order).await?.ok_or_else(|| {
                ApiError::new(ErrorCode::PaymentOrderNotFound, "no order with this orderId")
            })?;
        if owner != user.get() {
            return Err(not_the_owner());
        }
        if !OrderStatus::parse(&status).is_some_and(OrderStatus::accepts_payment) {
            return Err(ApiError::new(
                ErrorCode::PaymentInvalidOrderStatus,
                format!("an order that is {status} cannot be paid"),
            ));
        }
        Ok(())
    }
}

/// The facts of each quote, in one statement: a row per user (whether it exists, its unpaid
/// orders) and a row per product, of every query in the batch.
async fn read_quotes(db: PgPool, queries: Vec<QuoteQuery>) -> sqlx::Result<Vec<QuoteFacts>> {
    let users: Vec<i64> = queries
        .iter()
        .map(|q| q.user_id)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let products: Vec<i64> = queries
        .iter()
        .flat_map(|q| q.product_ids.iter().copied())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // Every column is NULL in the other half of the union.
    let rows = sqlx::query!(
        r#"SELECT u.id AS "user_id?",
                (SELECT count(*) FROM orders WHERE user_id = u.id AND status IN ('PENDING', 'RESERVED'))
                  AS "unpaid?",
                NULL::bigint AS "product_id?", NULL::text AS "name?", NULL::bigint AS "price?"
         FROM unnest($1::bigint[]) AS u(id)
         UNION ALL
         SELECT NULL, NULL, p.id, p.name, p.price FROM products p WHERE p.id = ANY($2)"#,
        &users,
        &products,
    )
    .fetch_all(&db)
    .await?;
    let mut unpaid_orders: HashMap<i64, i64> = HashMap::new();
    let mut product_facts: HashMap<i64, (String, i64)> = HashMap::new();
    for row in rows {
        if let (Some(user), Some(unpaid)) = (row.user_id, row.unpaid) {
            unpaid_orders.insert(user, unpaid);
        } else if let (Some(id), Some(name), Some(price)) = (row.product_id, row.name, row.price) {
            product_facts.insert(id, (name, price));
        }
    }
    Ok(queries
        .into_iter()
        .map(|query| QuoteFacts {
            unpaid: unpaid_orders.get(&query.user_id).copied().unwrap_or(0),
            products: query
                .product_ids
                .iter()
                .filter_map(|id| product_facts.get(id).map(|found| (*id, found.clone())))
                .collect(),
        })
        .collect())
}

/// The owner and status of each order of `ids`, in one statement.
async fn read_orders(db: PgPool, ids: Vec<Uuid>) -> sqlx::Result<Vec<Option<(i64, String)>>> {
    let rows = sqlx::query!("SELECT id, user_id, status FROM orders WHERE id = ANY($1)", &ids)
        .fetch_all(&db)
        .await?;
    let found: HashMap<Uuid, (i64, String)> = rows
        .into_iter()
        .map(|row| (row.id, (row.user_id, row.status)))
        .collect();
    Ok(ids.iter().map(|id| found.get(id).cloned()).collect())
}

pub fn invalid_user() -> ApiError {
    ApiError::new(ErrorCode::OrderInvalidUser, "userId is not a registered user")
}

pub fn invalid_items(message: &str) -> ApiError {
    ApiError::new(ErrorCode::OrderInvalidItems, message)
}

pub fn not_the_owner() -> ApiError {
    ApiError::new(ErrorCode::OrderUnauthorized, "this order belongs to another user")
}
