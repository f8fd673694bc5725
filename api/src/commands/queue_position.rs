//! A pending request's place in its partition's queue (`queuePosition`: the commands
//! accepted before it in its partition and not yet settled) and its estimated wait
//! (`estimatedWaitMs`, from the partition's settle rate).
//!
//! Counting the pending requests ahead of one in PostgreSQL costs as many index entries as
//! its position, and in a flash sale every one of a hundred thousand clients polls: the
//! count per poll would grow with the square of the crowd. So each api process keeps a
//! snapshot of each family's pending request ids, split by partition and sorted by id
//! (UUIDv7: acceptance order), and answers a position by a binary search in it. The snapshot
//! is read from the partial index `requests_pending_in_order` alone, at most once per
//! [`max_age`] per family and only when someone asks (an api nobody asks about positions
//! reads nothing), together with the partitions' settle rates; the commands this process
//! accepts are added to it as their batch commits, so the `202` of a command counts those
//! accepted just before it. What it does not see at once (commands another api replica
//! accepted since the snapshot, commands settled since) it sees at the next read, within
//! [`max_age`]: a position is an estimate that is at most that old, never a lock.
//!
//! A settled request pays nothing: only requests still `PENDING` in PostgreSQL are placed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use shared::domain::command::{Family, RequestKind};
use shared::domain::partition::partition_of;
use shared::domain::settle_rate::SettleRate;
use sqlx::PgPool;
use uuid::Uuid;

/// Where a pending request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// Commands accepted before it in its partition and not yet settled.
    pub position: u64,
    /// Until it is settled, at its partition's recent rate; `None` when nothing settled
    /// there recently (the rate is unknown).
    pub estimated_wait: Option<Duration>,
}

/// The snapshots of both families' queues; see the module's documentation.
pub struct QueuePositions {
    db: PgPool,
    /// `COMMAND_PARTITIONS`: how keys are split into partitions, as the relay routes them.
    partitions: u16,
    families: [FamilyQueue; Family::ALL.len()],
}

#[derive(Default)]
struct FamilyQueue {
    snapshot: Mutex<Snapshot>,
    /// Held while the snapshot is read again, so that one read serves every request that
    /// found it stale at once.
    refreshing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Snapshot {
    /// When it was read; `None` before the first read.
    taken: Option<Instant>,
    /// Pending request ids by partition, each sorted.
    pending: HashMap<u16, Vec<Uuid>>,
    /// Pending requests in all (for how long the snapshot may serve).
    size: usize,
    rates: HashMap<u16, SettleRate>,
    /// PostgreSQL's clock when the rates were read, to evaluate them with.
    rates_at: Option<(DateTime<Utc>, Instant)>,
    /// Commands this process accepted while a read was under way, which that read may not
    /// have seen: added to the snapshot it brings.
    accepted_during_read: Option<Vec<(u16, Uuid)>>,
}

/// How long a snapshot of `size` pending requests serves: a quarter of a second, and more
/// for a long queue (10 µs per request, up to 5 s), so that reading it again never costs
/// more than a few percent of one PostgreSQL core however long the queue grows.
pub fn max_age(size: usize) -> Duration {
    Duration::from_micros(size as u64 * 10).clamp(Duration::from_millis(250), Duration::from_secs(5))
}

fn slot(family: Family) -> usize {
    match family {
        Family::Coupon => 0,
        Family::Order => 1,
    }
}

impl QueuePositions {
    pub fn new(db: PgPool, partitions: u16) -> Self {
        Self {
            db,
            partitions: partitions.max(1),
            families: Default::default(),
        }
    }

    /// The partition a command of this key travels in.
    fn partition(&self, partition_key: i64) -> u16 {
        partition_of(partition_key, self.partitions)
    }

    /// Commands this process stored, in the order their batch committed: added to the
    /// snapshots already read (a snapshot not read yet will find them in PostgreSQL).
    pub fn accepted(&self, commands: impl IntoIterator<Item = (RequestKind, i64, Uuid)>) {
        for (kind, partition_key, id) in commands {
            let partition = self.partition(partition_key);
            let queue = &self.families[slot(kind.family())];
            let Ok(mut snapshot) = queue.snapshot.lock() else {
                continue;
            };
            if let Some(during) = snapshot.accepted_during_read.as_mut() {
                during.push((partition, id));
            }
            if snapshot.taken.is_some() {
                snapshot.insert(partition, id);
            }
        }
    }

    /// Where the pending request `id` of `kind` with `partition_key` stands; `None` when the
    /// queue cannot be read (PostgreSQL is unreachable): the request is answered without it.
    pub async fn place(&self, kind: RequestKind, partition_key: i64, id: Uuid) -> Option<Place> {
        let family = kind.family();
        let queue = &self.families[slot(family)];
        if queue.is_stale() {
            let _refreshing = queue.refreshing.lock().await;
            // Another request may have read it while this one waited.
            if queue.is_stale() {
                if let Err(e) = self.read(family, queue).await {
                    tracing::debug!(error = %e, family = family.as_str(), "cannot read the pending requests; answering without positions");
                    return None;
                }
            }
        }
        let snapshot = queue.snapshot.lock().ok()?;
        Some(snapshot.place(self.partition(partition_key), id))
    }

    /// Reads `family`'s pending requests and settle rates into its snapshot.
    async fn read(&self, family: Family, queue: &FamilyQueue) -> Result<(), sqlx::Error> {
        if let Ok(mut snapshot) = queue.snapshot.lock() {
            snapshot.accepted_during_read = Some(Vec::new());
        }
        let started = Instant::now();
        let read = async {
            let rows = read_pending(&self.db, family).await?;
            let rates = shared::store::settle_rates::of_family(&self.db, family).await?;
            Ok::<_, sqlx::Error>((rows, rates))
        };
        let (rows, (settlements, db_now)) = match read.await {
            Ok(read) => read,
            Err(e) => {
                if let Ok(mut snapshot) = queue.snapshot.lock() {
                    snapshot.accepted_during_read = None;
                }
                return Err(e);
            }
        };
        let mut pending: HashMap<u16, Vec<Uuid>> = HashMap::new();
        let size = rows.len();
        for (id, partition_key) in rows {
            pending.entry(self.partition(partition_key)).or_default().push(id);
        }
        for ids in pending.values_mut() {
            ids.sort_unstable();
        }
        metrics::histogram!("api_queue_snapshot_read_seconds", "family" => family.as_str())
            .record(started.elapsed().as_secs_f64());
        let Ok(mut snapshot) = queue.snapshot.lock() else {
            return Ok(());
        };
        let during = snapshot.accepted_during_read.take().unwrap_or_default();
        *snapshot = Snapshot {
            taken: Some(Instant::now()),
            pending,
            size,
            rates: settlements.into_iter().map(|(p, s)| (p, s.rate)).collect(),
            rates_at: Some((db_now, Instant::now())),
            accepted_during_read: None,
        };
        for (partition, id) in during {
            snapshot.insert(partition, id);
        }
        Ok(())
    }
}

/// Every pending request of `family`: its id and the key its partition hashes, in no order.
pub async fn read_pending(db: &PgPool, family: Family) -> Result<Vec<(Uuid, i64)>, sqlx::Error> {
    // `'PENDING'` written out: it is what lets the planner use the partial index, and read
    // it alone (an index-only scan), which a bound status would not.
    let rows = sqlx::query!(
        "SELECT id, partition_key FROM requests WHERE status = 'PENDING' AND kind = ANY($1::text[])",
        family.kinds() as _,
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.partition_key)).collect())
}

impl FamilyQueue {
    fn is_stale(&self) -> bool {
        self.snapshot.lock().map_or(true, |s| match s.taken {
            None => true,
            Some(taken) => taken.elapsed() >= max_age(s.size),
        })
    }
}

impl Snapshot {
    /// Adds a pending id, keeping its partition sorted (new ids are usually the greatest,
    /// so this is usually a push).
    fn insert(&mut self, partition: u16, id: Uuid) {
        let ids = self.pending.entry(partition).or_default();
        match ids.binary_search(&id) {
            Ok(_) => {}
            Err(at) => {
                ids.insert(at, id);
                self.size += 1;
            }
        }
    }

    fn place(&self, partition: u16, id: Uuid) -> Place {
        let position = self
            .pending
            .get(&partition)
            .map_or(0, |ids| ids.partition_point(|pending| *pending < id)) as u64;
        let now = self
            .rates_at
            .map_or_else(Utc::now, |(db_now, read)| db_now + read.elapsed());
        let estimated_wait = self
            .rates
            .get(&partition)
            .and_then(|rate| rate.estimated_wait(position, now));
        Place {
            position,
            estimated_wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_counts_the_pending_ids_before_it_in_its_partition_only() {
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        let mut snapshot = Snapshot::default();
        for id in ids.iter().rev() {
            snapshot.insert(3, *id);
        }
        snapshot.insert(4, Uuid::now_v7());
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(snapshot.place(3, *id).position, n as u64);
        }
        // Not in the snapshot yet (accepted elsewhere since): counted after those before it.
        assert_eq!(snapshot.place(3, Uuid::now_v7()).position, 5);
        assert_eq!(snapshot.place(7, ids[0]).position, 0);
        assert_eq!(snapshot.place(3, ids[0]).estimated_wait, None);
    }

    #[test]
    fn a_long_queue_is_read_less_often() {
        assert_eq!(max_age(0), Duration::from_millis(250));
        assert_eq!(max_age(100_000), Duration::from_secs(1));
        assert_eq!(max_age(10_000_000), Duration::from_secs(5));
    }
}
