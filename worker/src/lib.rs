//! The worker: consumes command partitions from RabbitMQ and settles each batch of commands
//! in one PostgreSQL transaction. Run as many replicas as you like; they share the
//! partitions through leases in PostgreSQL.
//!
//! # Layout
//! - [`partitions`]: who consumes which partition: replica presence and leases in
//!   PostgreSQL, the coordinator that rebalances them, the serial consumer of one partition
//!   queue, and the watch on a consumer the broker stopped feeding.
//! - [`settling`]: one transaction per batch, fenced by the lease, acked after commit, and
//!   what that settlement asks of each command family.
//! - [`families`]: the command families: coupon issues, and orders with their payments.
//! - [`dead_letters`]: commands that could not be settled: their requests failed, their
//!   messages parked, and the operators' command over the parked letters.
//! - [`relay`]: what PostgreSQL holds published after commit: events to `ecommerce.events`,
//!   and commands whose api died before publishing them.
//! - [`dataplatform`]: `worker data-platform`, a stand-in consumer of those events.
//! - [`config`]: the worker's settings.
//!
//! A partition's consumer hands each batch to the settlement, which hands each family its
//! commands through one trait ([`settling::pipeline::CommandFamily`]); a batch that keeps
//! failing goes to the dead letters; the relay publishes what a settlement wrote.

pub mod config;
pub mod dataplatform;
pub mod dead_letters;
pub mod families;
pub mod partitions;
pub mod relay;
pub mod settling;

use std::sync::Arc;

use anyhow::Context as _;
use shared::domain::command::Family;
use shared::messaging::broker::{Broker, Publisher};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use config::WorkerConfig;

use crate::dead_letters::dead_letter_consumer;
use crate::families::{coupons, orders};
use crate::partitions::{consumer, coordinator};
use crate::relay::{outbox, sweeper};
use crate::settling::{pipeline, settle};

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
