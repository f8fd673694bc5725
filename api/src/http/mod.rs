//! HTTP plumbing: what stands between a socket and a handler, shared by every route.
//!
//! - [`server`]: hyper with header, body, write and handler timeouts.
//! - [`connections`]: the open-files limit, connections bounded per client and in total, TCP
//!   keepalive.
//! - [`forwarded`]: the client's address behind trusted proxies.
//! - [`auth`]: who is calling: the [`auth::Caller`] extractor of every route that acts for a
//!   user, and the admin token.
//! - [`limits`]: per-user and per-client-address rate limits.
//! - [`shedding`]: reads past their bound answered `503` at once.
//! - [`extract`]: extractors whose rejections are the contract's errors.
//! - [`pagination`]: cursor pages (`limit`, `cursor`).
//! - [`observability`]: request metrics and the access log.

pub mod auth;
pub mod connections;
pub mod extract;
pub mod forwarded;
pub mod limits;
pub mod observability;
pub mod pagination;
pub mod server;
pub mod shedding;
