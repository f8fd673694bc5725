//! Replica presence and partition leases, in PostgreSQL.
//!
//! Each replica heartbeats a row in `worker_replicas`. Every replica computes, from the
//! same list of live replicas, the rendezvous owner of each partition; it acquires the
//! leases it should own and hands over those it should not. A lease carries an epoch that
//! grows with every change of hands; settlement checks it inside its transaction, so a
//! replica that lost a lease (paused, partitioned away) cannot commit on that partition.

use std::time::Duration;

use shared::domain::command::Family;
use shared::messaging::topology::Topology;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A lease this replica holds on one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub family: Family,
    pub partition: u16,
    pub owner: Uuid,
    pub epoch: i64,
}

impl Lease {
    /// Inside a settling transaction: true while this lease still stands. The row stays
    /// share-locked until commit, so the lease cannot change hands under a batch in flight.
    pub async fn fence(&self, conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
        let held: Option<i32> = sqlx::query_scalar!(
            r#"SELECT 1 AS "held!" FROM partition_leases
             WHERE family = $1 AND partition = $2 AND owner = $3 AND epoch = $4
             FOR SHARE"#,
            self.family.as_str(),
            i32::from(self.partition),
            self.owner,
            self.epoch,
        )
        .fetch_optional(conn)
        .await?;
        Ok(held.is_some())
    }
}

fn interval_secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Creates the lease rows of every partition (once per deployment; later calls do nothing).
pub async fn ensure_rows(db: &PgPool, topology: &Topology) -> Result<(), sqlx::Error> {
    for family in Family::ALL {
        sqlx::query!(
            "INSERT INTO partition_leases (family, partition)
             SELECT $1, p FROM generate_series(0, $2 - 1) AS p
             ON CONFLICT DO NOTHING",
            family.as_str(),
            i32::from(topology.partitions),
        )
        .execute(db)
        .await?;
    }
    Ok(())
}

/// Records that this replica is alive and returns the ids of all live replicas.
pub async fn heartbeat(
    db: &PgPool,
    replica: Uuid,
    name: &str,
    replica_ttl: Duration,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query!(
        "INSERT INTO worker_replicas (id, name) VALUES ($1, $2)
         ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
        replica,
        name,
    )
    .execute(db)
    .await?;
    live(db, replica_ttl).await
}

/// The ids of the replicas heard from within `replica_ttl`.
pub async fn live(db: &PgPool, replica_ttl: Duration) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT id FROM worker_replicas WHERE heartbeat_at > now() - make_interval(secs => $1) ORDER BY id",
        interval_secs(replica_ttl),
    )
    .fetch_all(db)
    .await
}

/// Extends the leases this replica holds; returns every lease it holds as
/// `(family, partition, epoch)`.
///
/// A settling batch holds its lease under a share lock (its fence) until it commits, and an
/// update of the lease waits for that. Waiting for every busy partition at each heartbeat
/// made a convoy under load: the renewal waited for the batches in flight, and every new
/// batch's fence then waited for the renewal's commit. So a lease a batch holds right now is
/// passed over, unless it has less than half its life left: that one is waited for. A lease
/// a batch holds under its fence cannot be taken over meanwhile (a takeover waits for the
/// same lock), so it is still this replica's.
pub async fn renew(
    db: &PgPool,
    replica: Uuid,
    lease_ttl: Duration,
) -> Result<Vec<(String, i32, i64)>, sqlx::Error> {
    // `$2::float8`: the TTL is in seconds with a fraction; left to `$2 / 2`, the parameter
    // would be taken for an integer (and halved by integer division).
    let held = sqlx::query!(
        r#"WITH idle AS (
            SELECT family, partition FROM partition_leases
            WHERE owner = $1 AND expires_at >= now() + make_interval(secs => $2::float8 / 2)
            FOR NO KEY UPDATE SKIP LOCKED),
         due AS (
            SELECT family, partition FROM partition_leases
            WHERE owner = $1 AND expires_at < now() + make_interval(secs => $2 / 2)),
         renewed AS (
            UPDATE partition_leases SET expires_at = now() + make_interval(secs => $2)
            WHERE (family, partition) IN (SELECT * FROM idle UNION ALL SELECT * FROM due)
              AND owner = $1
            RETURNING family, partition, epoch),
         passed_over AS (
            SELECT family, partition, epoch FROM partition_leases
            WHERE owner = $1 AND expires_at >= now()
              AND (family, partition) NOT IN (SELECT family, partition FROM renewed))
         SELECT family AS "family!", partition AS "partition!", epoch AS "epoch!" FROM renewed
         UNION ALL SELECT * FROM passed_over"#,
        replica,
        interval_secs(lease_ttl),
    )
    .fetch_all(db)
    .await?;
    Ok(held
        .into_iter()
        .map(|l| (l.family, l.partition, l.epoch))
        .collect())
}

/// Takes the lease of a partition that is free, expired, or already handed to this
/// replica, with a new epoch. `None` while another replica still holds it.
pub async fn acquire(
    db: &PgPool,
    replica: Uuid,
    family: Family,
    partition: u16,
    lease_ttl: Duration,
) -> Result<Option<Lease>, sqlx::Error> {
    let epoch: Option<i64> = sqlx::query_scalar!(
        "UPDATE partition_leases
         SET owner = $1, epoch = epoch + 1, expires_at = now() + make_interval(secs => $4)
         WHERE family = $2 AND partition = $3
           AND (owner IS NULL OR owner = $1 OR expires_at < now())
         RETURNING epoch",
        replica,
        family.as_str(),
        i32::from(partition),
        interval_secs(lease_ttl),
    )
    .fetch_optional(db)
    .await?;
    Ok(epoch.map(|epoch| Lease {
        family,
        partition,
        owner: replica,
        epoch,
    }))
}

/// Gives a lease this replica holds to `next` (the partition's rendezvous owner), or
/// frees it when there is none. Handing it over directly, rather than freeing it, means
/// the partition always has exactly one live owner.
///
/// `next` may be leaving at the same moment (a scale-down stops several replicas at once):
/// the lease goes to it only while it is live, read under a share lock so that its
/// [`retire`] waits for this handover or this handover sees it retired. A replica that
/// leaves frees, after handing over its own, whatever was handed to it before it retired
/// (see [`free_all`]); otherwise such a partition would wait for its lease to expire.
pub async fn hand_over(
    db: &PgPool,
    lease: &Lease,
    next: Option<Uuid>,
    lease_ttl: Duration,
    replica_ttl: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "WITH next AS (
            SELECT id FROM worker_replicas
            WHERE id = $4 AND heartbeat_at > now() - make_interval(secs => $6)
            FOR SHARE)
         UPDATE partition_leases
         SET owner = (SELECT id FROM next), epoch = epoch + 1,
             expires_at = CASE WHEN EXISTS (SELECT 1 FROM next) THEN now() + make_interval(secs => $5)
                               ELSE '-infinity' END
         WHERE family = $1 AND partition = $2 AND owner = $3",
        lease.family.as_str(),
        i32::from(lease.partition),
        lease.owner,
        next,
        interval_secs(lease_ttl),
        interval_secs(replica_ttl),
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Takes this replica off the live list without removing its row (first thing at
/// shutdown): from then on no replica hands it a partition, while the leases it still
/// drains keep naming a replica that exists.
pub async fn retire(db: &PgPool, replica: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE worker_replicas SET heartbeat_at = '-infinity' WHERE id = $1",
        replica
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Frees every lease still naming `replica`: at shutdown, after its own were handed over,
/// those other leaving replicas handed to it meanwhile.
pub async fn free_all(db: &PgPool, replica: Uuid) -> Result<u64, sqlx::Error> {
    let freed = sqlx::query!(
        "UPDATE partition_leases SET owner = NULL, epoch = epoch + 1, expires_at = '-infinity'
         WHERE owner = $1",
        replica,
    )
    .execute(db)
    .await?;
    Ok(freed.rows_affected())
}

/// Removes this replica's row (last thing at shutdown, once it holds no lease), and forgets
/// replicas that have been gone for a day.
pub async fn leave(db: &PgPool, replica: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "DELETE FROM worker_replicas WHERE id = $1 OR heartbeat_at < now() - interval '1 day'",
        replica,
    )
    .execute(db)
    .await?;
    Ok(())
}
