//! Publishing commands: each with the broker's confirm, and the confirmed ones marked
//! published in PostgreSQL, many per statement, so that the sweeper leaves them alone.

use std::sync::Arc;
use std::time::Duration;

use shared::domain::command::RequestKind;
use shared::messaging::broker::{Broker, PublishError, Publisher};
use shared::messaging::topology::Topology;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Publishes commands and remembers, in batches, which ones the broker confirmed.
pub struct Dispatcher {
    publisher: Publisher,
    topology: Topology,
    confirmed: mpsc::UnboundedSender<Uuid>,
}

impl Dispatcher {
    /// Starts the dispatcher and the task that records confirmations; the task ends once the
    /// dispatcher is dropped and what it holds is written.
    pub fn start(broker: Arc<Broker>, topology: Topology, db: PgPool) -> (Arc<Self>, JoinHandle<()>) {
        let (confirmed, receiver) = mpsc::unbounded_channel();
        let recorder = tokio::spawn(record_confirmations(db, receiver));
        let dispatcher = Arc::new(Self {
            publisher: Publisher::new(broker),
            topology,
            confirmed,
        });
        (dispatcher, recorder)
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Closes the publishing channel; once no request is being handled.
    pub async fn close(&self) {
        self.publisher.close().await;
    }

    /// Declares the command topology (idempotent).
    pub async fn declare_topology(&self) -> anyhow::Result<()> {
        let channel = self.publisher.broker().channel().await?;
        self.topology.declare(&channel).await?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    /// Publishes a stored request's command and waits for the confirm.
    pub async fn publish(
        &self,
        request_id: Uuid,
        kind: RequestKind,
        partition_key: i64,
    ) -> Result<(), PublishError> {
        let mut published = shared::messaging::commands::publish(
            &self.publisher,
            &self.topology,
            request_id,
            kind,
            partition_key,
        )
        .await;
        if let Err(PublishError::Unroutable(_)) = published {
            // The partition queues are missing (a broker that lost its data): declare them
            // and try once more.
            if let Err(e) = self.declare_topology().await {
                tracing::warn!(error = format!("{e:#}"), "cannot declare the command topology");
            }
            published = shared::messaging::commands::publish(
                &self.publisher,
                &self.topology,
                request_id,
                kind,
                partition_key,
            )
            .await;
        }
        let family = kind.family().as_str();
        match &published {
            Ok(()) => {
                metrics::counter!("api_commands_published_total", "family" => family, "outcome" => "confirmed").increment(1);
                // The receiver only ends with the process; a lost flag costs a re-publish.
                let _ = self.confirmed.send(request_id);
            }
            Err(_) => {
                metrics::counter!("api_commands_published_total", "family" => family, "outcome" => "failed")
                    .increment(1)
            }
        }
        published
    }
}

/// Marks confirmed requests published, many per statement, so the sweeper leaves them alone
/// even when workers are minutes behind during a burst.
async fn record_confirmations(db: PgPool, mut receiver: mpsc::UnboundedReceiver<Uuid>) {
    const MAX_PER_STATEMENT: usize = 1_000;
    let mut ids = Vec::with_capacity(MAX_PER_STATEMENT);
    while receiver.recv_many(&mut ids, MAX_PER_STATEMENT).await > 0 {
        // A request a worker is settling right now is passed over: the worker marks it
        // itself. Waiting for it made a convoy under load, workers waiting for this
        // statement's row locks while it waited for theirs.
        let marked = sqlx::query!(
            "UPDATE requests SET published = true
             WHERE id IN (SELECT id FROM requests WHERE id = ANY($1) AND NOT published
                          FOR NO KEY UPDATE SKIP LOCKED)",
            &ids,
        )
        .execute(&db)
        .await;
        if let Err(e) = marked {
            tracing::warn!(error = %e, requests = ids.len(), "cannot record publish confirmations; the sweeper will re-publish them");
        }
        ids.clear();
        // Let confirmations accumulate a little under load instead of one statement each.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
