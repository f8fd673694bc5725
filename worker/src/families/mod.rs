//! The command families: what a batch of one family's commands locks, decides and writes,
//! each through [`crate::settling::pipeline::CommandFamily`]. The decisions themselves are
//! the domain's rules (`shared::domain::coupon`, `shared::domain::order_book`).
//!
//! - [`coupons`]: coupon issues.
//! - [`orders`]: order creations (stock reservation) and payments.

pub mod coupons;
pub mod orders;
