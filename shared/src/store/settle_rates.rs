//! Each partition's settle rate (`partition_settlements`; [`crate::domain::settle_rate`]
//! says what the numbers mean): written by the worker with every batch it commits, read by
//! the api for a request's estimated wait and the partitions' view.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use crate::domain::command::Family;
use crate::domain::settle_rate::{SettleRate, TAU_SECS};

/// The statement that counts `settled` commands of `family`'s `partition` as settled now,
/// for the simple-protocol message that commits their batch (so it costs no round trip,
/// and commits or rolls back with the batch). Its values are a family name and numbers
/// printed by this code, so they can be written as literals.
///
/// The same arithmetic as [`SettleRate::after_batch`]: the gap since the last batch decays
/// what was there; a gap longer than the decay time starts again.
pub fn record(family: Family, partition: u16, settled: usize) -> String {
    let gap = "GREATEST(0, extract(epoch FROM now() - s.last_settled_at)::float8)";
    format!(
        "INSERT INTO partition_settlements AS s (family, partition, settled, last_settled_at, recent, span)
         VALUES ('{family}', {partition}, {settled}, now(), {settled}, 0)
         ON CONFLICT (family, partition) DO UPDATE SET
            settled = s.settled + EXCLUDED.settled,
            last_settled_at = GREATEST(s.last_settled_at, EXCLUDED.last_settled_at),
            recent = CASE WHEN {gap} > {TAU_SECS:?} THEN EXCLUDED.recent
                          ELSE s.recent * exp(-{gap} / {TAU_SECS:?}) + EXCLUDED.recent END,
            span = CASE WHEN {gap} > {TAU_SECS:?} THEN 0
                        ELSE s.span * exp(-{gap} / {TAU_SECS:?}) + {gap} END",
        family = family.as_str(),
    )
}

/// One partition's settlements so far.
#[derive(Debug, Clone, Copy)]
pub struct PartitionSettlements {
    /// Commands settled in the partition since it was first counted.
    pub settled: i64,
    pub rate: SettleRate,
}

/// Every counted partition of `family`, by partition, and PostgreSQL's clock at the read
/// (what the rates are evaluated at).
pub async fn of_family(
    db: impl PgExecutor<'_>,
    family: Family,
) -> Result<(HashMap<u16, PartitionSettlements>, DateTime<Utc>), sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT partition, settled, last_settled_at, recent, span, now() AS "now!"
           FROM partition_settlements WHERE family = $1"#,
        family.as_str(),
    )
    .fetch_all(db)
    .await?;
    let now = rows.first().map_or_else(Utc::now, |r| r.now);
    let partitions = rows
        .into_iter()
        .filter_map(|r| {
            let partition = u16::try_from(r.partition).ok()?;
            let rate = SettleRate {
                recent: r.recent,
                span: r.span,
                last_settled_at: r.last_settled_at,
            };
            Some((
                partition,
                PartitionSettlements {
                    settled: r.settled,
                    rate,
                },
            ))
        })
        .collect();
    Ok((partitions, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statement_names_its_partition_and_count_and_decays_with_tau() {
        let statement = record(Family::Coupon, 3, 7);
        assert!(
            statement.contains("VALUES ('coupon', 3, 7, now(), 7, 0)"),
            "{statement}"
        );
        assert!(statement.contains("> 10.0 THEN"), "{statement}");
    }
}
