//! The command path of the API: a command is stored as a `PENDING` request, published with
//! the broker's confirm, and answered `202 Accepted` with its status URL.
//!
//! The database transaction commits before the publish, never around it. If the publish
//! fails, the request is withdrawn (marked failed before any worker could see it, and its
//! idempotency key released) and the client gets 503 with `Retry-After`: a 503 means nothing
//! was accepted. If the API dies between commit and confirm, the worker's sweeper
//! publishes the request later, so a 202 is never lost.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use shared::broker::{Broker, PublishError, Publisher};
use shared::command::{self, RequestKind};
use shared::error::{ErrorBody, ErrorCode};
use shared::topology::Topology;
use sqlx::{PgConnection, PgPool};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::{ApiError, Result};
use crate::extract::IdempotencyKey;
use crate::idempotency::{self, Outcome};
use crate::AppState;

/// Seconds a client should wait before polling a pending request.
pub const POLL_AFTER_SECS: &str = "1";

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
        let mut published =
            command::publish(&self.publisher, &self.topology, request_id, kind, partition_key).await;
        if let Err(PublishError::Unroutable(_)) = published {
            // The partition queues are missing (a broker that lost its data): declare them
            // and try once more.
            if let Err(e) = self.declare_topology().await {
                tracing::warn!(error = format!("{e:#}"), "cannot declare the command topology");
            }
            published =
                command::publish(&self.publisher, &self.topology, request_id, kind, partition_key).await;
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
        let marked = sqlx::query("UPDATE requests SET published = true WHERE id = ANY($1) AND NOT published")
            .bind(&ids)
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

/// The body of a `202 Accepted`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    pub request_id: Uuid,
    /// `COUPON_ISSUE`, `ORDER_CREATE` or `ORDER_PAY`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Always `PENDING` here.
    pub status: &'static str,
    /// Where to poll: `/requests/{requestId}`.
    pub status_url: String,
    /// The order an `ORDER_CREATE` creates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<Uuid>,
}

/// A command to accept.
pub struct NewCommand {
    pub kind: RequestKind,
    /// What the partition hashes: the coupon for coupon commands, the user for order commands.
    pub partition_key: i64,
    pub payload: serde_json::Value,
    pub order_id: Option<Uuid>,
}

/// Runs `check_and_store` (the command's own checks and rows) and stores the request, in
/// one idempotent transaction; then publishes and answers 202.
pub async fn submit(
    state: &AppState,
    key: &IdempotencyKey,
    scope: &str,
    request: &serde_json::Value,
    command: NewCommand,
    check_and_store: impl AsyncFnOnce(&mut PgConnection, Uuid) -> Result<()>,
) -> Result<Response> {
    let request_id = Uuid::now_v7();
    let outcome = idempotency::run(
        &state.db,
        key,
        scope,
        request,
        StatusCode::ACCEPTED,
        async |conn| {
            check_and_store(&mut *conn, request_id).await?;
            sqlx::query("INSERT INTO requests (id, kind, partition_key, payload) VALUES ($1, $2, $3, $4)")
                .bind(request_id)
                .bind(command.kind.as_str())
                .bind(command.partition_key)
                .bind(&command.payload)
                .execute(&mut *conn)
                .await?;
            Ok(Accepted {
                request_id,
                kind: command.kind.as_str(),
                status: "PENDING",
                status_url: format!("/requests/{request_id}"),
                order_id: command.order_id,
            })
        },
    )
    .await?;

    let accepted = match outcome {
        Outcome::Fresh(accepted) => accepted,
        Outcome::Replayed(response) => return Ok(response),
    };
    if let Err(e) = state
        .commands
        .publish(request_id, command.kind, command.partition_key)
        .await
    {
        withdraw(&state.db, request_id, key, scope).await;
        return Err(ApiError::Unavailable(anyhow::Error::new(e).context("RabbitMQ")));
    }
    Ok(accepted_response(accepted))
}

/// `202` with `Location` and `Retry-After`.
fn accepted_response(accepted: Accepted) -> Response {
    let location = accepted.status_url.clone();
    let mut response = (StatusCode::ACCEPTED, axum::Json(accepted)).into_response();
    add_polling_headers(&mut response, &location);
    response
}

/// The headers of an answer about a pending request.
pub fn add_polling_headers(response: &mut Response, status_url: &str) {
    if let Ok(location) = HeaderValue::from_str(status_url) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(POLL_AFTER_SECS));
}

/// Takes back a request whose publish failed, so that the 503 the client gets is true:
/// the request can no longer take effect (a worker that receives it anyway finds it
/// terminal), and its idempotency key is free for the retry.
async fn withdraw(db: &PgPool, request_id: Uuid, key: &IdempotencyKey, scope: &str) {
    let withdrawn = async {
        let mut tx = db.begin().await?;
        let error = ErrorBody::new(
            ErrorCode::Unavailable,
            "the request could not be queued; it was not accepted",
        );
        sqlx::query(
            "UPDATE requests SET status = 'FAILED', error = $2, completed_at = now()
             WHERE id = $1 AND status = 'PENDING'",
        )
        .bind(request_id)
        .bind(serde_json::to_value(&error).unwrap_or_default())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE orders SET status = 'REJECTED', closed_at = now()
             WHERE create_request_id = $1 AND status = 'PENDING'",
        )
        .bind(request_id)
        .execute(&mut *tx)
        .await?;
        if let Some(key) = key.0.as_deref() {
            sqlx::query("DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2")
                .bind(scope)
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    };
    if let Err(e) = withdrawn.await {
        // PostgreSQL is down too: the request stays PENDING and the sweeper publishes it later.
        tracing::warn!(%request_id, error = %e, "cannot withdraw an unpublished request; it will be published later");
    }
}
