//! The command path: how a coupon issue, an order or a payment becomes a `PENDING` request,
//! answered `202 Accepted`, and what its client learns of it until a worker settles it.
//!
//! Going in, in this order:
//! - [`backpressure`]: `429` while the family's queues are deeper than their limit.
//! - [`coupon_checks`], [`order_checks`]: what is refused at once, read for many requests
//!   at a time.
//! - [`idempotency`]: `Idempotency-Key`, stored in PostgreSQL; a replay gets the first answer.
//! - [`accept`]: store the request (the one durable write) and answer `202`.
//! - [`intake`]: group commit: the commands accepted at the same moment written by one
//!   statement, then handed to the relay.
//! - [`relay`]: publishes the stored commands after their commit, in acceptance order, until
//!   the broker confirms them; this api's heartbeat for the worker's sweeper.
//!
//! Coming back:
//! - [`request_status`]: a request as clients see it, one of a user's or many settled at once.
//! - [`queue_position`]: where a pending request stands in its partition, and how long it
//!   may wait.
//! - [`polling`]: `Location` and `Retry-After` of pending requests, set in one place.
//! - [`waiting`]: clients that wait for their request to settle, woken by the workers.

pub mod accept;
pub mod backpressure;
pub mod coupon_checks;
pub mod idempotency;
pub mod intake;
pub mod order_checks;
pub mod polling;
pub mod queue_position;
pub mod relay;
pub mod request_status;
pub mod waiting;
