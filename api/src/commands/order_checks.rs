//! What the API checks of an order or a payment before accepting it, read for many
//! requests at once ([`Batched`]): under a checkout burst the orders accepted at the same
//! moment share one statement for their quotes, and the payments one for their orders.
//!
//! The checks read outside any transaction, which is safe because they only filter: a
//! refusal is true of the moment it was read, and whatever they let through is decided for
//! good by the worker under its locks. That includes the per-user limits (the unpaid-order
//! cap, a product's `maxPerCustomer`): orders of one user accepted at the same moment pass
//! the api's check together, and the worker refuses those past a limit as the request's
//! error.

use std::collections::{BTreeSet, HashMap};

use shared::domain::command::OrderCreate;
use shared::domain::command_input;
use shared::domain::error::ErrorCode;
use shared::domain::ids::UserId;
use shared::domain::limits::{refuse_past_limit, refuse_past_unpaid_cap, LimitedLine};
use shared::domain::money::order_total;
use shared::domain::order::OrderStatus;
use sqlx::PgPool;
use uuid::Uuid;

use crate::batched::Batched;
use crate::commands::intake::{PendingOrder, QuotedLine};
use crate::error::{ApiError, Result};

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

/// What a quote found: the user's unpaid orders, and each of the order's products that
/// exists. Whether the user is registered is not asked: the caller's token proves it
/// ([`crate::http::auth`]).
struct QuoteFacts {
    unpaid: i64,
    products: HashMap<i64, QuotedProduct>,
}

/// A product as a quote sees it.
#[derive(Clone)]
struct QuotedProduct {
    name: String,
    price: i64,
    /// Its per-customer limit, if any.
    max_per_customer: Option<i64>,
    /// Units of it the user holds in `RESERVED` and `PAID` orders; read only when the
    /// product has a limit (0 otherwise).
    held: i64,
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

    /// Checks the products, the units of each the user may still take (its
    /// `maxPerCustomer` less what the user holds) and how many unpaid orders the user holds
    /// (at most `cap`), and prices the order as it will be stored `PENDING`.
    ///
    /// The limits are read outside any transaction: orders of one user accepted at the same
    /// moment can pass them together here, and the worker, which counts under the locks
    /// that settle the orders, refuses those past a limit.
    pub async fn quote(&self, order: &OrderCreate, cap: i64) -> Result<PendingOrder> {
        let facts = self
            .quotes
            .read(QuoteQuery {
                user_id: order.user_id,
                product_ids: order.items.iter().map(|l| l.product_id).collect(),
            })
            .await?;
        let mut lines = Vec::with_capacity(order.items.len());
        let mut limited = Vec::with_capacity(order.items.len());
        for line in &order.items {
            let product = facts.products.get(&line.product_id).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::ProductNotFound,
                    format!("no product {}", line.product_id),
                )
            })?;
            lines.push(QuotedLine {
                product_id: line.product_id,
                name: product.name.clone(),
                unit_price: product.price,
                quantity: line.quantity,
            });
            limited.push(LimitedLine {
                product_id: line.product_id,
                quantity: line.quantity,
                max_per_customer: product.max_per_customer,
                held: product.held,
            });
        }
        // State after existence, as the contract orders its checks; the limits in the order
        // the worker asks them.
        if let Some(refusal) =
            refuse_past_limit(limited).or_else(|| refuse_past_unpaid_cap(facts.unpaid, cap))
        {
            return Err(ApiError::Client(refusal));
        }
        let total = order_total(lines.iter().map(|l| (l.unit_price, l.quantity)))
            .ok_or_else(|| invalid_items("the order total is too large"))?;
        Ok(PendingOrder {
            order_id: order.order_id,
            user_id: order.user_id,
            total,
            lines,
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

/// The facts of each quote, in one statement: a row per user (its unpaid orders), a row per
/// product, and a row per (user, product) of a query whose product has a per-customer limit
/// (the units the user holds), of every query in the batch.
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
    let (pair_users, pair_products): (Vec<i64>, Vec<i64>) = queries
        .iter()
        .flat_map(|q| q.product_ids.iter().map(|p| (q.user_id, *p)))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .unzip();
    // Each part leaves NULL the columns of the others. The units held are summed only for
    // a product with a limit (most have none, and cost nothing here), over the user's
    // orders (`orders_by_user`), each line looked up by its key.
    let rows = sqlx::query!(
        r#"SELECT u.id AS "user_id?",
                (SELECT count(*) FROM orders WHERE user_id = u.id AND status IN ('PENDING', 'RESERVED'))
                  AS "unpaid?",
                NULL::bigint AS "product_id?", NULL::text AS "name?", NULL::bigint AS "price?",
                NULL::bigint AS "max_per_customer?", NULL::bigint AS "held?"
         FROM unnest($1::bigint[]) AS u(id)
         UNION ALL
         SELECT NULL, NULL, p.id, p.name, p.price, p.max_per_customer, NULL
         FROM products p WHERE p.id = ANY($2)
         UNION ALL
         SELECT h.user_id, NULL, h.product_id, NULL, NULL, NULL,
                (SELECT COALESCE(sum(oi.quantity), 0)::bigint
                 FROM orders o JOIN order_items oi ON oi.order_id = o.id AND oi.product_id = h.product_id
                 WHERE o.user_id = h.user_id AND o.status IN ('RESERVED', 'PAID'))
         FROM unnest($3::bigint[], $4::bigint[]) AS h(user_id, product_id)
         WHERE EXISTS (SELECT 1 FROM products p WHERE p.id = h.product_id AND p.max_per_customer IS NOT NULL)"#,
        &users,
        &products,
        &pair_users,
        &pair_products,
    )
    .fetch_all(&db)
    .await?;
    let mut unpaid_orders: HashMap<i64, i64> = HashMap::new();
    let mut product_facts: HashMap<i64, QuotedProduct> = HashMap::new();
    let mut units_held: HashMap<(i64, i64), i64> = HashMap::new();
    for row in rows {
        // Which part a row comes from: a user, a product, or a user's units of a product.
        match (row.user_id, row.product_id) {
            (Some(user), None) => {
                unpaid_orders.insert(user, row.unpaid.unwrap_or(0));
            }
            (None, Some(id)) => {
                if let (Some(name), Some(price)) = (row.name, row.price) {
                    let max_per_customer = row.max_per_customer;
                    let product = QuotedProduct {
                        name,
                        price,
                        max_per_customer,
                        held: 0,
                    };
                    product_facts.insert(id, product);
                }
            }
            (Some(user), Some(product)) => {
                units_held.insert((user, product), row.held.unwrap_or(0));
            }
            (None, None) => {}
        }
    }
    Ok(queries
        .into_iter()
        .map(|query| QuoteFacts {
            unpaid: unpaid_orders.get(&query.user_id).copied().unwrap_or(0),
            products: query
                .product_ids
                .iter()
                .filter_map(|id| {
                    let mut found = product_facts.get(id)?.clone();
                    found.held = units_held.get(&(query.user_id, *id)).copied().unwrap_or(0);
                    Some((*id, found))
                })
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
    ApiError::Client(command_input::invalid_user())
}

pub fn invalid_items(message: &str) -> ApiError {
    ApiError::Client(command_input::invalid_items(message))
}

pub fn not_the_owner() -> ApiError {
    ApiError::new(ErrorCode::OrderUnauthorized, "this order belongs to another user")
}
