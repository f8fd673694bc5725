//! Partitioning of commands, and which replica owns which partition.
//!
//! A command's partition is a stable hash of its key, so every process, of any version,
//! routes a key to the same queue. The owner of a partition is chosen by rendezvous
//! (highest random weight) hashing over the live replicas: every replica computes the same
//! answer from the same list, and when a replica joins or leaves only the partitions it
//! gains or loses move.

use std::hash::Hasher;

use fnv::FnvHasher;
use uuid::Uuid;

/// The partition of `key` among `partitions` (FNV-1a over the key's big-endian bytes).
pub fn partition_of(key: i64, partitions: u16) -> u16 {
    let mut hasher = FnvHasher::default();
    hasher.write(&key.to_be_bytes());
    let partitions = u64::from(partitions.max(1));
    // The remainder is below `partitions`, which fits in u16.
    u16::try_from(hasher.finish() % partitions).unwrap_or(0)
}

/// The replica that should own `partition` of `family`, among `replicas`.
pub fn rendezvous_owner(replicas: &[Uuid], family: &str, partition: u16) -> Option<Uuid> {
    replicas
        .iter()
        .max_by_key(|replica| (weight(replica, family, partition), **replica))
        .copied()
}

fn weight(replica: &Uuid, family: &str, partition: u16) -> u64 {
    let mut hasher = FnvHasher::default();
    hasher.write(replica.as_bytes());
    hasher.write(family.as_bytes());
    hasher.write(&partition.to_be_bytes());
    mix(hasher.finish())
}

/// SplitMix64's finalizer: FNV alone leaves inputs that differ in a few bytes with
/// correlated outputs, which would skew the spread of partitions over replicas.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_of_a_key_never_changes() {
        // Pinned to FNV-1a itself: changing the hash would re-route keys of commands in flight.
        for key in [1, 2, 3, 42, 1_000_000, i64::MAX] {
            assert_eq!(partition_of(key, 16), pinned_fnv(key), "key {key}");
        }
    }

    /// FNV-1a written out from its definition, to pin the crate's output.
    fn pinned_fnv(key: i64) -> u16 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in key.to_be_bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        (hash % 16) as u16
    }

    #[test]
    fn keys_spread_over_all_partitions() {
        let mut counts = [0_u32; 16];
        for key in 1..=16_000 {
            counts[usize::from(partition_of(key, 16))] += 1;
        }
        for (partition, &n) in counts.iter().enumerate() {
            assert!(
                (700..=1300).contains(&n),
                "partition {partition} got {n} of 16000"
            );
        }
    }

    #[test]
    fn every_replica_agrees_on_the_owner_whatever_the_list_order() {
        let replicas: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        let mut reversed = replicas.clone();
        reversed.reverse();
        for partition in 0..16 {
            assert_eq!(
                rendezvous_owner(&replicas, "coupon", partition),
                rendezvous_owner(&reversed, "coupon", partition)
            );
        }
        assert_eq!(rendezvous_owner(&[], "coupon", 0), None);
    }

    #[test]
    fn a_leaving_replica_moves_only_its_own_partitions() {
        let replicas: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
        let leaving = replicas[2];
        let remaining: Vec<Uuid> = replicas.iter().copied().filter(|r| *r != leaving).collect();
        for partition in 0..64 {
            let before = rendezvous_owner(&replicas, "order", partition);
            let after = rendezvous_owner(&remaining, "order", partition);
            if before != Some(leaving) {
                assert_eq!(before, after, "partition {partition} moved needlessly");
            }
        }
    }

    #[test]
    fn partitions_spread_over_replicas() {
        let replicas: Vec<Uuid> = (0..2).map(|_| Uuid::now_v7()).collect();
        let first = (0..256)
            .filter(|p| rendezvous_owner(&replicas, "coupon", *p) == Some(replicas[0]))
            .count();
        assert!(
            (80..=176).contains(&first),
            "{first} of 256 on one of two replicas"
        );
    }
}
