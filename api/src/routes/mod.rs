//! The routes: one module per part of the contract (`docs/api.md`), each a `router()` of its
//! handlers with their `#[utoipa::path]`, merged into the app by [`crate::router`].
//!
//! - [`users`], [`tokens`]: registration and a user's bearer tokens.
//! - [`balance`]: balances and their ledger.
//! - [`products`], [`popular`]: the catalogue as clients see it, and the popular products.
//! - [`coupons`], [`orders`]: coupon issues, orders and payments; their commands go down the
//!   command path ([`crate::commands`]).
//! - [`requests`], [`request_stream`]: the commands' requests, read one by one or streamed as
//!   they settle.
//! - [`admin`], [`partitions`], [`consistency_audit`]: what operators do behind the admin
//!   token: the catalogue, coupon kinds, batch runs, the partitions at a glance.
//! - [`health`]: liveness and readiness.
//! - [`openapi`], [`docs`]: `/openapi.json`, generated from the handlers, and `/docs`, Swagger
//!   UI over it.

pub mod admin;
pub mod balance;
pub mod consistency_audit;
pub mod coupons;
pub mod docs;
pub mod health;
pub mod openapi;
pub mod orders;
pub mod partitions;
pub mod popular;
pub mod products;
pub mod request_stream;
pub mod requests;
pub mod tokens;
pub mod users;
