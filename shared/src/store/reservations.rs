//! Expiry of stock reservations: `RESERVED` orders past `reserved_until` become `EXPIRED`
//! and their units go back on sale. Called by the batch's schedule (and by tests).
//!
//! Orders are claimed with `FOR NO KEY UPDATE SKIP LOCKED`: an order that a payment or a cancel
//! holds right now is left alone, and whichever of them commits first wins; the others
//! see a status that is no longer `RESERVED`. Locks are taken orders first, then products
//! in id order, like every other writer, so expiry never deadlocks with them.

use sqlx::PgPool;
use uuid::Uuid;

/// Orders expired per transaction, so a large backlog does not hold locks for long.
const CHUNK: i64 = 500;

/// Expires every overdue reservation; returns how many orders expired.
pub async fn expire_overdue(db: &PgPool) -> Result<u64, sqlx::Error> {
    let mut expired = 0;
    loop {
        let n = expire_chunk(db).await?;
        expired += n;
        if n < CHUNK as u64 {
            return Ok(expired);
        }
    }
}

async fn expire_chunk(db: &PgPool) -> Result<u64, sqlx::Error> {
    let mut tx = db.begin().await?;
    let orders: Vec<Uuid> = sqlx::query_scalar!(
        "SELECT id FROM orders
         WHERE status = 'RESERVED' AND reserved_until < now()
         ORDER BY id LIMIT $1
         FOR NO KEY UPDATE SKIP LOCKED",
        CHUNK,
    )
    .fetch_all(&mut *tx)
    .await?;
    if orders.is_empty() {
        return Ok(0);
    }
    release_stock(&mut tx, &orders).await?;
    sqlx::query!(
        "UPDATE orders SET status = 'EXPIRED', closed_at = now() WHERE id = ANY($1)",
        &orders,
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    metrics::counter!("reservations_expired_total").increment(orders.len() as u64);
    tracing::info!(orders = orders.len(), "reservations expired");
    Ok(orders.len() as u64)
}

/// Gives the units reserved by `orders` back, locking the products in id order. The caller
/// holds the orders' row locks and changes their status in the same transaction.
pub async fn release_stock(conn: &mut sqlx::PgConnection, orders: &[Uuid]) -> Result<(), sqlx::Error> {
    let lines = sqlx::query!(
        r#"SELECT product_id, sum(quantity)::bigint AS "quantity!" FROM order_items
         WHERE order_id = ANY($1) GROUP BY product_id ORDER BY product_id"#,
        orders,
    )
    .fetch_all(&mut *conn)
    .await?;
    let (products, quantities): (Vec<i64>, Vec<i64>) = lines
        .into_iter()
        .map(|line| (line.product_id, line.quantity))
        .unzip();
    // Only the locks are wanted; the ids come back unread.
    sqlx::query_scalar!(
        "SELECT id FROM products WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
        &products,
    )
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query!(
        "UPDATE products p SET reserved = p.reserved - r.quantity, updated_at = now()
         FROM UNNEST($1::bigint[], $2::bigint[]) AS r(product_id, quantity)
         WHERE p.id = r.product_id",
        &products,
        &quantities,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}
