//! RabbitMQ: the connection, the command topology, and publishing commands.
//!
//! - [`broker`]: the connection, re-established on demand, to any node of a cluster.
//! - [`topology`]: the command exchanges and partition queues.
//! - [`commands`]: a stored request's command published to its partition queue.

pub mod broker;
pub mod commands;
pub mod topology;
