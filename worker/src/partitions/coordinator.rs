//! Spreads partitions over live replicas and runs one consumer per owned partition.
//!
//! Every heartbeat the coordinator renews its presence and leases, computes the rendezvous
//! owner of every partition over the live replicas, hands over what it should no longer
//! own (after the partition's consumer has finished and acked its batch) and acquires what
//! it should. A replica that joins or leaves moves partitions within a few heartbeats; one
//! killed outright loses them when its leases expire.
//!
//! A lease this replica holds without consuming it (handed to it by a replica whose view of
//! the live list differed, or left behind by a consumer that ended or a handover that
//! failed) is handed on to the partition's owner at the next heartbeat: renewed and never
//! consumed, it would otherwise keep the partition from everyone for as long as this
//! replica lives.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::join_all;
use shared::domain::command::Family;
use shared::domain::partition::rendezvous_owner;
use shared::store::db::answered_within;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::partitions::leases::{self, Lease};
use crate::{consumer, Context};

/// A partition this replica consumes.
struct Running {
    lease: Lease,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    /// Asks the consumer to finish its batch, ack and close its channel, and waits for it.
    async fn stop(self) -> Lease {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "a partition consumer ended abnormally");
        }
        self.lease
    }
}

type Key = (Family, u16);

pub struct Coordinator {
    ctx: Arc<Context>,
    running: HashMap<Key, Running>,
}

impl Coordinator {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self {
            ctx,
            running: HashMap::new(),
        }
    }

    /// Rebalances every heartbeat until `shutdown`, then drains and hands over everything.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        leases::ensure_rows(&self.ctx.db, &self.ctx.config.topology).await?;
        let mut tick = tokio::time::interval(self.ctx.config.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.rebalance().await {
                tracing::warn!(error = %e, "rebalancing failed; retrying at the next heartbeat");
            }
            self.report();
        }
        self.leave().await;
        Ok(())
    }

    async fn rebalance(&mut self) -> Result<(), sqlx::Error> {
        let ctx = Arc::clone(&self.ctx);
        let me = ctx.replica;
        // Each step that waits on PostgreSQL is bounded: a connection that went silent would
        // otherwise stop the heartbeats for good, and every lease with them.
        let limit = ctx.config.database.answer_timeout();
        let (live, held) = answered_within(limit, async {
            let live = leases::heartbeat(&ctx.db, me, &ctx.config.name, ctx.config.replica_ttl).await?;
            let held = leases::renew(&ctx.db, me, ctx.config.lease_ttl).await?;
            Ok::<_, sqlx::Error>((live, held))
        })
        .await?;

        // Consumers that ended by themselves (broker gone) or whose lease was taken over
        // while this replica could not renew it.
        let stale: Vec<Key> = self
            .running
            .iter()
            .filter(|(_, r)| {
                r.task.is_finished()
                    || !held.iter().any(|(f, p, e)| {
                        f == r.lease.family.as_str()
                            && *p == i32::from(r.lease.partition)
                            && *e == r.lease.epoch
                    })
            })
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            if let Some(running) = self.running.remove(&key) {
                tracing::info!(
                    family = key.0.as_str(),
                    partition = key.1,
                    "partition consumer ended; it restarts if still ours"
                );
                running.stop().await;
            }
        }

        let mut give_away = Vec::new();
        let mut take = Vec::new();
        let mut idle = Vec::new();
        for family in Family::ALL {
            for partition in 0..ctx.config.topology.partitions {
                let owner = rendezvous_owner(&live, family.as_str(), partition);
                let running = self.running.contains_key(&(family, partition));
                let holds = held
                    .iter()
                    .find(|(f, p, _)| f == family.as_str() && *p == i32::from(partition))
                    .map(|(_, _, epoch)| *epoch);
                match (running, owner == Some(me), holds) {
                    (true, false, _) => give_away.push(((family, partition), owner)),
                    (false, true, _) => take.push((family, partition)),
                    (false, false, Some(epoch)) => {
                        let lease = Lease {
                            family,
                            partition,
                            owner: me,
                            epoch,
                        };
                        idle.push((lease, owner));
                    }
                    _ => {}
                }
            }
        }

        // Drain the partitions that moved away, all at once, then hand each to its new owner;
        // held leases with no consumer have nothing to drain.
        let stopping: Vec<_> = give_away
            .into_iter()
            .filter_map(|(key, next)| self.running.remove(&key).map(|r| (r, next)))
            .collect();
        let mut handing: Vec<(Lease, Option<Uuid>)> = join_all(
            stopping
                .into_iter()
                .map(|(r, next)| async move { (r.stop().await, next) }),
        )
        .await;
        handing.extend(idle);
        for (lease, next) in handing {
            // One failed handover must not strand the others: a lease it leaves with this
            // replica is idle, and handed on at the next heartbeat.
            let handed = leases::hand_over(
                &ctx.db,
                &lease,
                next,
                ctx.config.lease_ttl,
                ctx.config.replica_ttl,
            );
            match answered_within(limit, handed).await {
                Ok(()) => {
                    tracing::info!(family = lease.family.as_str(), partition = lease.partition, to = ?next, "partition handed over")
                }
                Err(e) => {
                    tracing::warn!(family = lease.family.as_str(), partition = lease.partition, error = %e, "cannot hand over a partition; retrying at the next heartbeat")
                }
            }
        }

        for (family, partition) in take {
            let acquired = leases::acquire(&ctx.db, me, family, partition, ctx.config.lease_ttl);
            if let Some(lease) = answered_within(limit, acquired).await? {
                tracing::info!(
                    family = family.as_str(),
                    partition,
                    epoch = lease.epoch,
                    "partition acquired"
                );
                self.start(lease);
            }
        }
        Ok(())
    }

    fn start(&mut self, lease: Lease) {
        let stop = CancellationToken::new();
        let task = tokio::spawn(consumer::run(Arc::clone(&self.ctx), lease, stop.clone()));
        self.running
            .insert((lease.family, lease.partition), Running { lease, stop, task });
    }

    fn report(&self) {
        for family in Family::ALL {
            let owned = self.running.keys().filter(|(f, _)| *f == family).count();
            metrics::gauge!("worker_partitions_owned", "family" => family.as_str()).set(owned as f64);
        }
    }

    /// Shutdown: every consumer finishes and acks its batch, then each lease goes to the
    /// partition's owner among the replicas that stay.
    async fn leave(&mut self) {
        let ctx = Arc::clone(&self.ctx);
        // Off the live list first: replicas leaving at the same time then hand their
        // partitions to those that stay, not to this one.
        if let Err(e) = leases::retire(&ctx.db, ctx.replica).await {
            tracing::warn!(error = %e, "cannot take this replica off the live list");
        }
        let others: Vec<Uuid> = match leases::live(&ctx.db, ctx.config.replica_ttl).await {
            Ok(live) => live.into_iter().filter(|r| *r != ctx.replica).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read live replicas; leases will expire instead");
                Vec::new()
            }
        };
        let running: Vec<Running> = self.running.drain().map(|(_, r)| r).collect();
        let drained = join_all(running.into_iter().map(Running::stop)).await;
        for lease in drained {
            let next = rendezvous_owner(&others, lease.family.as_str(), lease.partition);
            let handed = leases::hand_over(
                &ctx.db,
                &lease,
                next,
                ctx.config.lease_ttl,
                ctx.config.replica_ttl,
            );
            if let Err(e) = handed.await {
                tracing::warn!(error = %e, "cannot hand over a lease; it will expire instead");
            }
        }
        match leases::free_all(&ctx.db, ctx.replica).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                leases = n,
                "freed leases handed to this replica while it was leaving"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot free leases handed to this replica; they will expire")
            }
        }
        if let Err(e) = leases::leave(&ctx.db, ctx.replica).await {
            tracing::warn!(error = %e, "cannot remove this replica's row");
        }
        self.report();
    }
}
