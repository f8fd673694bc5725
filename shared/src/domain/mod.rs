//! The rules of the pipeline, without I/O: nothing here reaches PostgreSQL, RabbitMQ or the
//! clock of a runtime, so each rule can be read, and tested, on its own.
//!
//! - [`ids`]: ids, names and the bounds of numbers in requests.
//! - [`money`]: order totals and coupon discounts.
//! - [`order`]: the life of an order: which status follows which event.
//! - [`order_book`]: reserving and paying orders over the rows a settlement locked.
//! - [`limits`]: what one customer may hold at once: unpaid orders, units of a product.
//! - [`coupon`]: who gets a coupon from a batch of issue requests, and why one is refused.
//! - [`partition`]: which partition a key goes to, which replica owns a partition.
//! - [`settle_rate`]: how fast a partition settles, and how long a command waits in it.
//! - [`command_input`]: the commands as a client sends them: what is refused before any
//!   lookup, by the api and the synchronous peer alike.
//! - [`command`]: asynchronous requests, their results and the messages that carry them.
//! - [`events`]: the `order.paid` event to the data platform.
//! - [`error`]: the contract's machine-readable error codes and error body.
//! - [`identity`]: customer bearer tokens: how they are made and how they are stored.
//! - [`popular`]: the popular-products ranking: windows, filters, ranks.

pub mod command;
pub mod command_input;
pub mod coupon;
pub mod error;
pub mod events;
pub mod identity;
pub mod ids;
pub mod limits;
pub mod money;
pub mod order;
pub mod order_book;
pub mod partition;
pub mod popular;
pub mod settle_rate;
