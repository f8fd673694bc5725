//! The relay: what PostgreSQL holds is published to RabbitMQ after commit, never inside a
//! transaction, and forgotten (an outbox row, a dead api's row) only after the broker's confirm.
//!
//! - [`outbox`]: events written by settling transactions, published to `ecommerce.events`.
//! - [`sweeper`]: commands stored by an api that died before publishing them, published to
//!   their partition queues.

pub mod outbox;
pub mod sweeper;
