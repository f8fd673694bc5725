//! Partitions and leases: which partition queues this replica consumes, and how it consumes
//! them.
//!
//! - [`leases`]: replica presence and partition leases in PostgreSQL.
//! - [`coordinator`]: which partitions this replica owns, rebalanced every heartbeat; runs
//!   one consumer per owned partition.
//! - [`consumer`]: the serial consumer of one partition queue, a batch at a time, handed to
//!   [`crate::settling`].
//! - [`stall_watch`]: notices a consumer the broker keeps registered and feeds nothing.

pub mod consumer;
pub mod coordinator;
pub mod leases;
pub mod stall_watch;
