//! Group commit of accepted commands: the requests that one api process accepts at about
//! the same moment are written by one statement and one commit.
//!
//! Each accept hands its rows to [`Intake::store`] and waits for its own answer. A collector
//! task takes the first command waiting, adds every other one already queued (up to
//! `ACCEPT_BATCH_MAX`), and under load (the batch before held more than one) gathers for
//! `ACCEPT_GATHER_US` more, then gives the batch to one of `ACCEPT_WRITERS` writers. While
//! every writer is busy, commands queue up, so batches grow with the load and an idle api
//! adds no delay: a lone command is written at once.
//!
//! A batch is one `INSERT` shape whatever its size: the rows travel as arrays and are
//! expanded by `UNNEST`. Its statement either writes every row or none (it is one
//! statement), so when it fails for a reason other than an unreachable database, each
//! command is written again on its own; the one that broke the batch gets its own error and
//! the others are stored once, as if they had never been batched.
//!
//! The commands a batch stored are handed to the [`crate::commands::relay`] in the batch's order,
//! after the commit and before any of their clients is answered, and counted in their
//! partitions' queues ([`crate::commands::queue_position`]), so that each `202` counts the commands
//! accepted before it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use shared::domain::command::RequestKind;
use shared::domain::order::OrderStatus;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::commands::queue_position::QueuePositions;
use crate::commands::relay::{CommandRelay, StoredCommandRef};

/// How accepts are batched (`ACCEPT_*`).
#[derive(Debug, Clone, Copy)]
pub struct IntakeSettings {
    /// `ACCEPT_BATCH_MAX`: most commands written by one statement.
    pub batch_max: usize,
    /// `ACCEPT_GATHER_US`: how long a batch waits for more commands once the api is busy
    /// (the batch before held more than one). An idle api never waits.
    pub gather: Duration,
    /// `ACCEPT_WRITERS`: batch statements in flight at once (each holds one connection).
    pub writers: usize,
}

impl Default for IntakeSettings {
    fn default() -> Self {
        Self {
            batch_max: 256,
            gather: Duration::from_micros(1_000),
            writers: 4,
        }
    }
}

/// An idempotency key stored with the request it names (the request's own columns): the
/// request is written only when the key was free, and a replay's `202` is the request's.
#[derive(Debug, Clone)]
pub struct KeyClaim {
    /// The key's owner and route ([`crate::commands::idempotency::user_scope`]).
    pub scope: String,
    pub key: String,
    /// The body the key was first sent with, to tell a replay from a reuse.
    pub request: serde_json::Value,
}

/// An order stored `PENDING` with the request that creates it, readable at once with the
/// prices quoted when it was placed.
#[derive(Debug, Clone)]
pub struct PendingOrder {
    pub order_id: Uuid,
    pub user_id: i64,
    pub total: i64,
    /// In the order the client listed them.
    pub lines: Vec<QuotedLine>,
}

/// A line of a [`PendingOrder`], with the product's name and price when it was quoted.
#[derive(Debug, Clone)]
pub struct QuotedLine {
    pub product_id: i64,
    pub name: String,
    pub unit_price: i64,
    pub quantity: i64,
}

/// What a command creates along with its request, so that it can be read before a worker
/// settles the request.
#[derive(Debug, Clone)]
pub enum Creation {
    Order(PendingOrder),
}

impl Creation {
    /// The id the `202` names (`orderId`).
    pub fn id(&self) -> Uuid {
        match self {
            Creation::Order(order) => order.order_id,
        }
    }
}

/// One command to store: its request row, its key and what it creates.
#[derive(Debug, Clone)]
pub struct StoredCommand {
    pub request_id: Uuid,
    pub kind: RequestKind,
    pub partition_key: i64,
    pub payload: serde_json::Value,
    pub user_id: i64,
    pub key: Option<KeyClaim>,
    pub creates: Option<Creation>,
    /// The order the command creates or pays (`requests.order_id`).
    pub order_id: Option<Uuid>,
}

/// Why a command could not be stored; nothing of it was written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("PostgreSQL is unavailable: {0}")]
    Unavailable(String),
    #[error("the request could not be stored: {0}")]
    Failed(String),
}

impl From<&sqlx::Error> for StoreError {
    fn from(error: &sqlx::Error) -> Self {
        if shared::store::db::is_unavailable(error) {
            StoreError::Unavailable(error.to_string())
        } else {
            StoreError::Failed(error.to_string())
        }
    }
}

struct Entry {
    command: StoredCommand,
    /// True when stored, false when its key already existed (nothing written).
    answer: oneshot::Sender<Result<bool, StoreError>>,
}

/// Stores commands in batches; see the module's documentation.
pub struct Intake {
    entries: mpsc::UnboundedSender<Entry>,
}

impl Intake {
    /// Starts the collector; it ends once the intake is dropped and its last batch written.
    /// Every request stored is handed to `relay` in commit order, before its client is
    /// answered, and names the relay's api process (`requests.accepted_by`), so that the
    /// sweeper knows whose requests to publish should this process die.
    pub fn start(
        db: PgPool,
        settings: IntakeSettings,
        relay: Arc<CommandRelay>,
        queues: Arc<QueuePositions>,
    ) -> (Arc<Self>, JoinHandle<()>) {
        let (entries, receiver) = mpsc::unbounded_channel();
        let collector = tokio::spawn(collect(db, receiver, settings, relay, queues));
        (Arc::new(Self { entries }), collector)
    }

    /// Writes the command with the others accepted at the same moment. True when it was
    /// stored; false when its idempotency key was taken already (then nothing was written).
    pub async fn store(&self, command: StoredCommand) -> Result<bool, StoreError> {
        let (answer, answered) = oneshot::channel();
        self.entries
            .send(Entry { command, answer })
            .map_err(|_| StoreError::Unavailable("the api is shutting down".to_owned()))?;
        metrics::gauge!("api_accepts_waiting").increment(1.0);
        answered
            .await
            .map_err(|_| StoreError::Failed("the batch writer stopped".to_owned()))?
    }
}

async fn collect(
    db: PgPool,
    mut entries: mpsc::UnboundedReceiver<Entry>,
    settings: IntakeSettings,
    relay: Arc<CommandRelay>,
    queues: Arc<QueuePositions>,
) {
    let writers = Arc::new(Semaphore::new(settings.writers.max(1)));
    let batch_max = settings.batch_max.max(1);
    let mut busy = false;
    loop {
        // A free writer first: while all are busy, commands wait in the channel and the
        // next batch takes them all.
        let Ok(writer) = Arc::clone(&writers).acquire_owned().await else {
            break;
        };
        let Some(first) = entries.recv().await else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < batch_max {
            match entries.try_recv() {
                Ok(entry) => batch.push(entry),
                Err(_) => break,
            }
        }
        if busy && batch.len() < batch_max && !settings.gather.is_zero() {
            let until = tokio::time::Instant::now() + settings.gather;
            while batch.len() < batch_max {
                match tokio::time::timeout_at(until, entries.recv()).await {
                    Ok(Some(entry)) => batch.push(entry),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        busy = batch.len() > 1;
        metrics::gauge!("api_accepts_waiting").decrement(batch.len() as f64);
        let (db, relay, queues) = (db.clone(), Arc::clone(&relay), Arc::clone(&queues));
        tokio::spawn(async move {
            write_batch(&db, batch, &relay, &queues).await;
            drop(writer);
        });
    }
    // Every batch handed out is written before the collector ends.
    let _ = writers.acquire_many(settings.writers.max(1) as u32).await;
}

async fn write_batch(db: &PgPool, batch: Vec<Entry>, relay: &CommandRelay, queues: &QueuePositions) {
    metrics::histogram!("api_accept_batch_size").record(batch.len() as f64);
    let accepted_by = relay.instance();
    let commands: Vec<&StoredCommand> = batch.iter().map(|e| &e.command).collect();
    match insert(db, &commands, accepted_by).await {
        Ok(stored) => {
            relay.hand_over(
                commands
                    .iter()
                    .filter(|c| stored.contains(&c.request_id))
                    .map(|c| c.to_publish()),
            );
            queues.accepted(
                commands
                    .iter()
                    .filter(|c| stored.contains(&c.request_id))
                    .map(|c| (c.kind, c.partition_key, c.request_id)),
            );
            for entry in batch {
                let _ = entry.answer.send(Ok(stored.contains(&entry.command.request_id)));
            }
        }
        Err(e) if batch.len() > 1 && !shared::store::db::is_unavailable(&e) => {
            // One row broke the statement, and the statement wrote nothing: each command
            // on its own, so that only the one at fault fails.
            tracing::warn!(commands = batch.len(), error = %e, "an accept batch failed; storing its commands one by one");
            metrics::counter!("api_accept_batch_fallbacks_total").increment(1);
            for entry in batch {
                let alone = insert(db, &[&entry.command], accepted_by).await;
                let answer = match alone {
                    Ok(stored) => {
                        let was_stored = stored.contains(&entry.command.request_id);
                        if was_stored {
                            relay.hand_over([entry.command.to_publish()]);
                            let c = &entry.command;
                            queues.accepted([(c.kind, c.partition_key, c.request_id)]);
                        }
                        Ok(was_stored)
                    }
                    Err(e) => Err(StoreError::from(&e)),
                };
                let _ = entry.answer.send(answer);
            }
        }
        Err(e) => {
            let error = StoreError::from(&e);
            for entry in batch {
                let _ = entry.answer.send(Err(error.clone()));
            }
        }
    }
}

impl StoredCommand {
    /// What the relay needs to publish it.
    fn to_publish(&self) -> StoredCommandRef {
        StoredCommandRef {
            request_id: self.request_id,
            kind: self.kind,
            partition_key: self.partition_key,
        }
    }
}

/// A batch's rows as the arrays its statement takes.
#[derive(Default)]
struct Columns {
    ids: Vec<Uuid>,
    kinds: Vec<RequestKind>,
    partition_keys: Vec<i64>,
    payloads: Vec<serde_json::Value>,
    users: Vec<i64>,
    scopes: Vec<Option<String>>,
    keys: Vec<Option<String>>,
    key_requests: Vec<Option<serde_json::Value>>,
    order_ids: Vec<Option<Uuid>>,
    orders: OrderColumns,
}

#[derive(Default)]
struct OrderColumns {
    request_ids: Vec<Uuid>,
    ids: Vec<Uuid>,
    users: Vec<i64>,
    totals: Vec<i64>,
    line_orders: Vec<Uuid>,
    line_products: Vec<i64>,
    line_names: Vec<String>,
    line_prices: Vec<i64>,
    line_quantities: Vec<i64>,
}

impl Columns {
    fn of(commands: &[&StoredCommand]) -> Self {
        let mut columns = Columns::default();
        for command in commands {
            columns.ids.push(command.request_id);
            columns.kinds.push(command.kind);
            columns.partition_keys.push(command.partition_key);
            columns.payloads.push(command.payload.clone());
            columns.users.push(command.user_id);
            let key = command.key.as_ref();
            columns.scopes.push(key.map(|k| k.scope.clone()));
            columns.keys.push(key.map(|k| k.key.clone()));
            columns.key_requests.push(key.map(|k| k.request.clone()));
            columns.order_ids.push(command.order_id);
            match &command.creates {
                None => {}
                Some(Creation::Order(order)) => columns.orders.add(command.request_id, order),
            }
        }
        columns
    }
}

impl OrderColumns {
    fn add(&mut self, request_id: Uuid, order: &PendingOrder) {
        self.request_ids.push(request_id);
        self.ids.push(order.order_id);
        self.users.push(order.user_id);
        self.totals.push(order.total);
        for line in &order.lines {
            self.line_orders.push(order.order_id);
            self.line_products.push(line.product_id);
            self.line_names.push(line.name.clone());
            self.line_prices.push(line.unit_price);
            self.line_quantities.push(line.quantity);
        }
    }
}

/// Writes a batch: requests with their keys, pending orders and their lines, in one
/// statement (and so one commit). Returns the ids of the requests written.
///
/// Data-modifying CTEs see the same snapshot and run together; each insert is gated on
/// the one before through its RETURNING rows, and the foreign keys of the order lines are
/// checked at the end of the statement, once their order exists. A request with a key is
/// written only when the key is free: no request holds it (the unique index, so when two
/// commands of one batch bring the same key only the first is written) and no refusal was
/// saved under it (`idempotency_keys`).
///
/// Keyed rows are inserted in one order, `(scope, key)` and then the batch's own order (so
/// the first of two commands with one key claims it), by every batch: a key sent again
/// while its first request is in another batch's uncommitted insert waits for that batch,
/// and with two batches claiming two such keys in opposite orders each would wait for the
/// other until PostgreSQL broke the deadlock a second later (seen in the flash sale, whose
/// clients send a share of their requests twice).
async fn insert(
    db: &PgPool,
    commands: &[&StoredCommand],
    accepted_by: Uuid,
) -> Result<HashSet<Uuid>, sqlx::Error> {
    let c = Columns::of(commands);
    // `as _`: arrays of our text enum, and text, jsonb and uuid arrays that hold NULLs
    // (commands without a key, or about no order), which the macro's check (`&[String]`,
    // `&[Value]`, `&[Uuid]`) does not accept.
    let stored: Vec<Uuid> = sqlx::query_scalar!(
        "WITH input AS (
            SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::jsonb[], $5::bigint[],
                                 $6::text[], $7::text[], $8::jsonb[], $19::uuid[])
                WITH ORDINALITY
                AS i(id, kind, partition_key, payload, user_id, scope, key, request, order_id, n)),
         request AS (
            INSERT INTO requests (id, kind, partition_key, payload, user_id, order_id, accepted_by,
                                  idempotency_scope, idempotency_key, key_request)
            SELECT i.id, i.kind, i.partition_key, i.payload, i.user_id, i.order_id, $20,
                   i.scope, i.key, i.request
            FROM input i
            WHERE i.key IS NULL
               OR NOT EXISTS (SELECT 1 FROM idempotency_keys k WHERE k.scope = i.scope AND k.key = i.key)
            ORDER BY i.scope, i.key, i.n
            ON CONFLICT (idempotency_scope, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING id),
         pending_order AS (
            INSERT INTO orders (id, user_id, status, create_request_id, total_amount)
            SELECT o.id, o.user_id, $18, o.request_id, o.total
            FROM UNNEST($9::uuid[], $10::uuid[], $11::bigint[], $12::bigint[])
                 AS o(request_id, id, user_id, total)
            WHERE o.request_id IN (SELECT id FROM request)
            RETURNING id),
         lines AS (
            INSERT INTO order_items (order_id, product_id, name, unit_price, quantity)
            SELECT l.order_id, l.product_id, l.name, l.unit_price, l.quantity
            FROM UNNEST($13::uuid[], $14::bigint[], $15::text[], $16::bigint[], $17::bigint[])
                 AS l(order_id, product_id, name, unit_price, quantity)
            WHERE l.order_id IN (SELECT id FROM pending_order))
         SELECT id FROM request",
        &c.ids,
        &c.kinds as _,
        &c.partition_keys,
        &c.payloads,
        &c.users,
        &c.scopes as _,
        &c.keys as _,
        &c.key_requests as _,
        &c.orders.request_ids,
        &c.orders.ids,
        &c.orders.users,
        &c.orders.totals,
        &c.orders.line_orders,
        &c.orders.line_products,
        &c.orders.line_names,
        &c.orders.line_prices,
        &c.orders.line_quantities,
        OrderStatus::Pending.as_str(),
        &c.order_ids as _,
        accepted_by,
    )
    .fetch_all(db)
    .await?;
    Ok(stored.into_iter().collect())
}
