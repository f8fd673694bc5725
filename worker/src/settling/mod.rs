//! Settling a batch of commands: one PostgreSQL transaction per batch, fenced by the
//! partition's lease, acked only after it commits.
//!
//! - [`settle`]: the transaction, its three round trips, its retries, the ack.
//! - [`acks`]: acks and rejects given up when the broker does not take them in time.
//! - [`pipeline`]: what that settlement asks of a command family ([`pipeline::CommandFamily`])
//!   and what it hands it, so the mechanism stays the same for every family
//!   ([`crate::families`]).

pub mod acks;
pub mod pipeline;
pub mod settle;
