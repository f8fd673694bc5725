//! The worker: consumes command partitions from RabbitMQ and settles each batch of commands
//! in one PostgreSQL transaction. Run as many replicas as you like; they share the
//! partitions through leases in PostgreSQL.
//!
//! # Layout
//! - [`config`]: the worker's settings.
//! - [`coordinator`]: which partitions this replica consumes, rebalanced every heartbeat.
//! - [`leases`]: replica presence and partition leases in PostgreSQL.
//! - [`consumer`]: the serial consumer of one partition queue.
//! - [`stall_watch`]: notices a consumer the broker keeps registered and feeds nothing.
//! - [`settle`]: one transaction per batch, fenced by the lease, acked after commit.
//! - [`pipeline`]: what that settlement asks of each command family.
//! - [`coupons`]: the coupon family: issues, applied to a batch.
//! - [`orders`]: the order family: stock reservation and payment settlement.
//! - [`outbox`]: publishes events after commit to `ecommerce.events`.
//! - [`dataplatform`]: `worker data-platform`, a stand-in consumer of those events.
//! - [`dead_letter_consumer`]: marks requests of dead-lettered commands failed and parks the
//!   messages.
//! - [`parked_letters`]: `worker dead-letters list | replay | discard`, the operators' command
//!   over the parked letters.
//! - [`sweeper`]: re-publishes requests whose publish was never confirmed.

pub mod config;
pub mod consumer;
pub mod coordinator;
pub mod coupons;
pub mod dataplatform;
pub mod dead_letter_consumer;
pub mod leases;
pub mod orders;
pub mod outbox;
pub mod parked_letters;
pub mod pipeline;
pub mod settle;
pub mod stall_watch;
pub mod sweeper;

use std::sync::Arc;

use anyhow::Context as _;
use shared::domain::command::Family;
use shared::messaging::broker::{Broker, Publisher};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use config::WorkerConfig;

/// What every task of a replica shares.
pub struct Context {
    pub db: PgPool,
    pub broker: Arc<Broker>,
    /// Confirmed publishing, for the sweeper and parked dead letters.
    pub publisher: Publisher,
    pub config: WorkerConfig,
    /// Woken after a batch that may have written outbox events commits.
    pub outbox_written: tokio::sync::Notify,
    /// Batches of one family this replica settles at once.
    pub settle_slots: consumer::SettleSlots,
    /// This replica's identity in `worker_replicas` and `partition_leases`; new at every
    /// start, so a restarted process never mistakes its predecessor's leases for its own.
    pub replica: Uuid,
    /// How each family's batches are settled: the one place a family meets its rules.
    pub families: pipeline::Families,
}

impl Context {
    /// A replica's context on `db` and a broker connection of its own, under a new
    /// replica identity.
    pub fn new(config: WorkerConfig, db: PgPool) -> Self {
        let broker = Arc::new(Broker::new(&config.broker, config.name.clone()));
        let families = pipeline::Families::default()
            .with(
                Family::Coupon,
                Arc::new(coupons::CouponIssues),
                settle::write_statement,
            )
            .with(
                Family::Order,
                Arc::new(orders::OrderCommands {
                    reservation_ttl: config.reservation_ttl,
                    max_reserved_orders: config.max_reserved_orders_per_user,
                }),
                settle::write_statement,
            );
        Self {
            db,
            publisher: Publisher::new(Arc::clone(&broker)),
            broker,
            settle_slots: consumer::SettleSlots::new(config.settle_concurrency),
            config,
            outbox_written: tokio::sync::Notify::new(),
            replica: Uuid::now_v7(),
            families,
        }
    }

    /// Declares the command topology; failures are logged, as callers retry anyway.
    pub async fn declare_topology(&self) {
        let declared = async {
            let channel = self.broker.channel().await?;
            self.config.topology.declare(&channel).await?;
            let _ = channel.close(200, "declared".into()).await;
            anyhow::Ok(())
        };
        if let Err(e) = declared.await {
            tracing::warn!(error = format!("{e:#}"), "cannot declare the command topology");
        }
    }
}

/// Starts the worker and runs it until `shutdown` fires.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.metrics_addr))?;
    let db = shared::store::db::connect_and_migrate(&config.database, "worker").await?;
    let ctx = Arc::new(Context::new(config, db));
    if ctx.broker.wait_until_reachable(&shutdown).await.is_err() {
        tracing::info!("stopped before RabbitMQ was reachable");
        return Ok(());
    }
    ctx.declare_topology().await;
    outbox::declare_exchange(&ctx).await;

    let metrics_addr = listener.local_addr()?;
    let metrics = tokio::spawn(shared::telemetry::serve_metrics(
        listener,
        shared::telemetry::metrics_recorder()?,
        shutdown.clone(),
    ));
    let sweeper = tokio::spawn(sweeper::run(Arc::clone(&ctx), shutdown.clone()));
    let dead_letters = tokio::spawn(dead_letter_consumer::run(Arc::clone(&ctx), shutdown.clone()));
    let relay = tokio::spawn(outbox::run(Arc::clone(&ctx), shutdown.clone()));
    tracing::info!(name = %ctx.config.name, replica = %ctx.replica, %metrics_addr, "worker ready");

    let coordinated = coordinator::Coordinator::new(Arc::clone(&ctx))
        .run(shutdown.clone())
        .await;
    let _ = tokio::join!(sweeper, dead_letters, relay, metrics);
    ctx.publisher.close().await;
    ctx.broker.close().await;
    ctx.db.close().await;
    tracing::info!("worker stopped");
    coordinated
}
