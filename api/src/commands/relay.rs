//! The command relay: publishes, after their commit, the commands this api stored, in the
//! order they were accepted. PostgreSQL is the command log (a transactional outbox of
//! commands): a command is accepted, and answered `202`, once its request row commits;
//! RabbitMQ is told afterwards.
//!
//! [`CommandRelay::hand_over`] queues a stored command here. One task publishes the queue
//! in order on one confirm-mode channel, a whole slice before it waits for the slice's
//! confirms, and puts whatever was not confirmed (the broker down, a nack, a timeout) back
//! at the head of the queue, to be published again in the same order once the broker
//! answers. So while RabbitMQ is down commands are still accepted, up to the backlog limit
//! ([`crate::commands::backpressure`]), and they reach their queues in acceptance order when it is
//! back.
//!
//! Nothing is written per command to say it was published. This api's row in
//! `api_instances` is its heartbeat; when an api dies with commands not yet confirmed, a
//! worker's sweeper publishes every `PENDING` request that api accepted and deletes its row.
//! A command published twice settles once: the worker finds its request terminal. An api
//! that stops cleanly publishes its queue first and then deletes its own row.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::domain::command::RequestKind;
use shared::messaging::broker::{Broker, PublishError, Publisher};
use shared::messaging::topology::Topology;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Commands published before their confirms are awaited.
const SLICE: usize = 1_000;

/// How often this api says it is alive (`api_instances.heartbeat_at`). The sweeper counts
/// an api dead after `API_DEAD_AFTER_MS` (worker setting, 10 s) without one.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a stopping api goes on publishing what it holds before it leaves the rest to
/// the sweeper.
const DRAIN: Duration = Duration::from_secs(5);

/// A stored command to publish.
#[derive(Debug, Clone, Copy)]
pub struct StoredCommandRef {
    pub request_id: Uuid,
    pub kind: RequestKind,
    pub partition_key: i64,
}

/// This api's queue of stored commands not yet confirmed by the broker.
pub struct CommandRelay {
    /// This process in `api_instances`, written with every request it stores.
    instance: Uuid,
    queue: Mutex<VecDeque<StoredCommandRef>>,
    queued: Notify,
    /// Commands stored and not yet confirmed, queued or in flight.
    unpublished: AtomicUsize,
    /// Whether the last publish reached the broker.
    broker_reachable: AtomicBool,
    publisher: Publisher,
    topology: Topology,
}

/// The relay's tasks, ended by [`RelayTasks::stop`].
pub struct RelayTasks {
    stop: CancellationToken,
    publishing: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
    db: PgPool,
    relay: Arc<CommandRelay>,
}

impl CommandRelay {
    /// Registers this api in `api_instances` and starts publishing and heartbeating.
    pub async fn start(
        broker: Arc<Broker>,
        topology: Topology,
        db: PgPool,
        name: &str,
    ) -> anyhow::Result<(Arc<Self>, RelayTasks)> {
        let instance = Uuid::now_v7();
        sqlx::query!(
            "INSERT INTO api_instances (id, name) VALUES ($1, $2)",
            instance,
            name
        )
        .execute(&db)
        .await?;
        let relay = Arc::new(Self {
            instance,
            queue: Mutex::new(VecDeque::new()),
            queued: Notify::new(),
            unpublished: AtomicUsize::new(0),
            broker_reachable: AtomicBool::new(true),
            publisher: Publisher::new(broker),
            topology,
        });
        let stop = CancellationToken::new();
        let publishing = tokio::spawn(Arc::clone(&relay).publish_until(stop.clone()));
        let heartbeat = tokio::spawn(heartbeat(db.clone(), instance, name.to_owned(), stop.clone()));
        let tasks = RelayTasks {
            stop,
            publishing,
            heartbeat,
            db,
            relay: Arc::clone(&relay),
        };
        Ok((relay, tasks))
    }

    /// This api process, as `requests.accepted_by`.
    pub fn instance(&self) -> Uuid {
        self.instance
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Commands this api stored that the broker has not confirmed yet.
    pub fn unpublished(&self) -> usize {
        self.unpublished.load(Ordering::Relaxed)
    }

    /// Whether the last publish reached RabbitMQ (true until one fails).
    pub fn broker_reachable(&self) -> bool {
        self.broker_reachable.load(Ordering::Relaxed)
    }

    /// Queues committed commands for publishing, in the order given (their commit's).
    pub fn hand_over(&self, commands: impl IntoIterator<Item = StoredCommandRef>) {
        let mut added = 0;
        if let Ok(mut queue) = self.queue.lock() {
            for command in commands {
                queue.push_back(command);
                added += 1;
            }
        }
        if added > 0 {
            self.unpublished.fetch_add(added, Ordering::Relaxed);
            metrics::gauge!("api_commands_unpublished").set(self.unpublished() as f64);
            self.queued.notify_one();
        }
    }

    /// Declares the command topology (idempotent).
    pub async fn declare_topology(&self) -> anyhow::Result<()> {
        let channel = self.publisher.broker().channel().await?;
        self.topology.declare(&channel).await?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    fn take_slice(&self) -> Vec<StoredCommandRef> {
        match self.queue.lock() {
            Ok(mut queue) => {
                let n = queue.len().min(SLICE);
                queue.drain(..n).collect()
            }
            Err(_) => Vec::new(),
        }
    }

    /// Puts `commands` back at the head of the queue, in their order.
    fn put_back(&self, commands: Vec<StoredCommandRef>) {
        if let Ok(mut queue) = self.queue.lock() {
            for command in commands.into_iter().rev() {
                queue.push_front(command);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.queue.lock().map(|q| q.is_empty()).unwrap_or(true)
    }

    /// Publishes the queue until `stop` fires, then for at most [`DRAIN`] more while
    /// commands remain.
    async fn publish_until(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut draining_until = None;
        loop {
            if stop.is_cancelled() && draining_until.is_none() {
                draining_until = Some(tokio::time::Instant::now() + DRAIN);
            }
            if let Some(until) = draining_until {
                if self.is_empty() || tokio::time::Instant::now() >= until {
                    return;
                }
            }
            let slice = self.take_slice();
            if slice.is_empty() {
                tokio::select! {
                    () = self.queued.notified() => {}
                    () = stop.cancelled(), if draining_until.is_none() => {}
                }
                continue;
            }
            match self.publish_slice(slice).await {
                0 => {
                    backoff = Duration::from_millis(100);
                    self.broker_reachable.store(true, Ordering::Relaxed);
                }
                unconfirmed => {
                    self.broker_reachable.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        unconfirmed,
                        queued = self.unpublished(),
                        retry_in_ms = backoff.as_millis() as u64,
                        "commands not confirmed by RabbitMQ; they stay queued here, in order"
                    );
                    let sleep = tokio::time::sleep(backoff);
                    match draining_until {
                        Some(until) => {
                            tokio::select! {
                                () = sleep => {}
                                () = tokio::time::sleep_until(until) => {}
                            }
                        }
                        None => {
                            tokio::select! {
                                () = sleep => {}
                                () = stop.cancelled() => {}
                            }
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Publishes one slice; puts back what was not confirmed and returns how many.
    async fn publish_slice(&self, slice: Vec<StoredCommandRef>) -> usize {
        let messages: Vec<_> = slice
            .iter()
            .map(|c| {
                shared::messaging::commands::message(&self.topology, c.request_id, c.kind, c.partition_key)
            })
            .collect();
        let started = std::time::Instant::now();
        let results = self
            .publisher
            .publish_in_order(&self.topology.commands_exchange(), &messages)
            .await;
        metrics::histogram!("api_command_publish_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("api_command_publish_batch_size").record(slice.len() as f64);
        let mut unconfirmed = Vec::new();
        let mut unroutable = false;
        for (command, result) in slice.into_iter().zip(results) {
            let family = command.kind.family().as_str();
            match result {
                Ok(()) => {
                    metrics::counter!("api_commands_published_total", "family" => family, "outcome" => "confirmed")
                        .increment(1);
                }
                Err(e) => {
                    unroutable |= matches!(e, PublishError::Unroutable(_));
                    metrics::counter!("api_commands_published_total", "family" => family, "outcome" => "failed")
                        .increment(1);
                    unconfirmed.push(command);
                }
            }
        }
        if unroutable {
            // The partition queues are missing (a broker that lost its data): declare them
            // before the retry.
            if let Err(e) = self.declare_topology().await {
                tracing::warn!(error = format!("{e:#}"), "cannot declare the command topology");
            }
        }
        let kept = unconfirmed.len();
        let confirmed = messages.len() - kept;
        self.unpublished.fetch_sub(confirmed, Ordering::Relaxed);
        metrics::gauge!("api_commands_unpublished").set(self.unpublished() as f64);
        self.put_back(unconfirmed);
        kept
    }
}

impl RelayTasks {
    /// Stops the relay once nothing is accepted any more: publishes what it holds (for
    /// [`DRAIN`] at most), closes the channel, and removes this api from `api_instances`
    /// when nothing is left, else leaves the rest to the sweeper.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.publishing.await;
        let _ = self.heartbeat.await;
        self.relay.publisher.close().await;
        let left = self.relay.unpublished();
        if left > 0 {
            tracing::warn!(
                commands = left,
                "stopping with commands not yet confirmed by RabbitMQ; a worker's sweeper publishes them"
            );
            return;
        }
        let removed = sqlx::query!("DELETE FROM api_instances WHERE id = $1", self.relay.instance)
            .execute(&self.db)
            .await;
        if let Err(e) = removed {
            tracing::warn!(error = %e, "cannot remove this api from api_instances; the sweeper will, once it looks dead");
        }
    }
}

/// Says every [`HEARTBEAT`] that this api is alive. The row is written again if a sweeper
/// removed it (this api looked dead while PostgreSQL was out of its reach): a sweeper that
/// published this api's requests meanwhile only sent duplicates.
async fn heartbeat(db: PgPool, instance: Uuid, name: String, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(HEARTBEAT) => {}
        }
        let beat = sqlx::query!(
            "INSERT INTO api_instances (id, name) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), swept_until = NULL",
            instance,
            name
        )
        .execute(&db)
        .await;
        if let Err(e) = beat {
            tracing::debug!(error = %e, "cannot write this api's heartbeat");
        }
    }
}
