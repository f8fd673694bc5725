//! Word that requests were settled, from the workers to every api replica: one PostgreSQL
//! `NOTIFY` per settled batch on [`CHANNEL`], naming the batch's requests, so that clients
//! waiting for an answer (`Prefer: wait`, `?wait=`) are woken rather than polling. A worker
//! sends it in the message that commits the batch, right after the `COMMIT`
//! ([`announcement`]), so it costs no round trip; the dead-letter handlers send theirs on
//! their own ([`announce`]).
//!
//! Not from the settling transaction itself: a transaction that notifies holds
//! PostgreSQL's notify-queue lock from its commit until its WAL is flushed, so every
//! notifying batch committed behind every other's flush while holding its row locks. The
//! notice is sent in a transaction of its own that does not wait for the flush: it has no
//! effect to make durable.
//!
//! `LISTEN/NOTIFY` rather than a RabbitMQ exchange: both api and workers already hold
//! PostgreSQL connections, a notification costs one statement per batch (not per command),
//! and it needs no queue per api replica to declare, expire and clean up. Notifications are
//! not durable: one sent while a replica's listener is reconnecting is lost (or never sent,
//! by a worker that dies between its commit and its notice), which is why waiters also read
//! the request again every poll interval.

use std::fmt::Write;

use sqlx::{Executor, PgPool};
use uuid::Uuid;

/// The notification channel.
pub const CHANNEL: &str = "requests_settled";

/// Most request ids in one notification: 200 ids fill 7,400 bytes, under PostgreSQL's
/// 8,000-byte payload limit.
const IDS_PER_NOTIFICATION: usize = 200;

/// The statements that announce `ids` settled, for a simple-protocol message that follows
/// a `COMMIT`: they run in a transaction of their own, committed without waiting for the
/// WAL flush. The payloads are uuids printed by this code (hex digits, dashes and commas),
/// so they can be written as literals.
pub fn announcement(ids: &[Uuid]) -> String {
    let mut statements = String::from("SELECT set_config('synchronous_commit', 'off', true);");
    for chunk in ids.chunks(IDS_PER_NOTIFICATION) {
        let payload = chunk.iter().map(Uuid::to_string).collect::<Vec<_>>().join(",");
        let _ = write!(statements, " SELECT pg_notify('{CHANNEL}', '{payload}');");
    }
    statements
}

/// Announces that `ids` are settled on their own ([`announcement`] as one message, one
/// transaction that does not wait for its WAL flush). Best effort: a lost notice costs its
/// waiters one poll interval, so a failure is logged and otherwise ignored.
pub async fn announce(db: &PgPool, ids: &[Uuid]) {
    if let Err(e) = db.execute(sqlx::raw_sql(&announcement(ids))).await {
        tracing::debug!(error = %e, "cannot announce settled requests; waiters will poll");
    }
}

/// The request ids of a notification's payload (what does not parse is skipped).
pub fn parse(payload: &str) -> impl Iterator<Item = Uuid> + '_ {
    payload
        .split(',')
        .filter_map(|id| Uuid::parse_str(id.trim()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_notification_fits_postgresql_s_payload_limit_and_parses_back() {
        let ids: Vec<Uuid> = (0..IDS_PER_NOTIFICATION).map(|_| Uuid::now_v7()).collect();
        let payload = ids.iter().map(Uuid::to_string).collect::<Vec<_>>().join(",");
        assert!(payload.len() < 8_000, "{}", payload.len());
        assert_eq!(parse(&payload).collect::<Vec<_>>(), ids);
        assert_eq!(parse("garbage,,").count(), 0);
    }
}
