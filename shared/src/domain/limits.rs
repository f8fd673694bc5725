//! What one customer may hold at once: a bounded number of unpaid orders (so nobody keeps
//! stock away from everyone), and at most a product's `maxPerCustomer` units of it (a flash
//! sale's per-person limit).
//!
//! The api asks these rules with what it read outside any transaction, to refuse at once;
//! the worker asks them again under the locks that settle the order, which is where they
//! hold (`worker::families::orders`).

use crate::domain::error::{ErrorBody, ErrorCode};
use crate::domain::order::OrderStatus;

/// The statuses whose units count against a product's per-customer limit: what the customer
/// holds or has bought. Cancelled, expired and rejected orders give their units back.
pub const HOLDING_STATUSES: [OrderStatus; 2] = [OrderStatus::Reserved, OrderStatus::Paid];

/// One line of an order as the limit sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitedLine {
    pub product_id: i64,
    /// Units this order asks for.
    pub quantity: i64,
    /// The product's `maxPerCustomer`; `None`: no limit.
    pub max_per_customer: Option<i64>,
    /// Units of the product the customer already holds in `RESERVED` and `PAID` orders.
    pub held: i64,
}

impl LimitedLine {
    /// Whether the line keeps the customer within the product's limit.
    pub fn within_limit(&self) -> bool {
        match self.max_per_customer {
            None => true,
            Some(max) => self
                .held
                .checked_add(self.quantity)
                .is_some_and(|total| total <= max),
        }
    }
}

/// The refusal of an order one of whose lines would take the customer past a product's
/// per-customer limit (the first such line), or `None` when every line stays within.
pub fn refuse_past_limit(lines: impl IntoIterator<Item = LimitedLine>) -> Option<ErrorBody> {
    let line = lines.into_iter().find(|line| !line.within_limit())?;
    let max = line.max_per_customer.unwrap_or_default();
    let message = if line.held == 0 {
        format!("at most {max} units of product {} per customer", line.product_id)
    } else {
        format!(
            "at most {max} units of product {} per customer, and {} are already in your orders",
            line.product_id, line.held
        )
    };
    Some(ErrorBody::new(ErrorCode::OrderLimitExceeded, message))
}

/// The refusal of one more order from a customer who holds `unpaid` unpaid orders, when
/// that reaches `cap`.
pub fn refuse_past_unpaid_cap(unpaid: i64, cap: i64) -> Option<ErrorBody> {
    (unpaid >= cap).then(|| {
        ErrorBody::new(
            ErrorCode::OrderTooManyReserved,
            format!("at most {cap} unpaid orders at once: pay or cancel one first"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(quantity: i64, max: Option<i64>, held: i64) -> LimitedLine {
        LimitedLine {
            product_id: 7,
            quantity,
            max_per_customer: max,
            held,
        }
    }

    #[test]
    fn a_product_without_a_limit_allows_any_quantity() {
        assert!(line(10_000, None, i64::MAX).within_limit());
        assert_eq!(refuse_past_limit([line(10_000, None, 5)]), None);
    }

    #[test]
    fn units_held_and_ordered_together_may_reach_the_limit_but_not_pass_it() {
        assert!(line(2, Some(2), 0).within_limit());
        assert!(line(1, Some(2), 1).within_limit());
        assert!(!line(3, Some(2), 0).within_limit());
        assert!(!line(1, Some(2), 2).within_limit());
        // No overflow turns a huge holding into a small one.
        assert!(!line(1, Some(2), i64::MAX).within_limit());
    }

    #[test]
    fn the_first_line_past_its_limit_is_the_refusal() {
        let lines = [
            line(1, Some(5), 0),
            LimitedLine {
                product_id: 9,
                quantity: 2,
                max_per_customer: Some(2),
                held: 1,
            },
        ];
        let refusal = refuse_past_limit(lines).expect("refused");
        assert_eq!(refusal.code, ErrorCode::OrderLimitExceeded);
        assert!(refusal.message.contains("product 9"), "{}", refusal.message);
        assert!(refusal.message.contains("1 are already"), "{}", refusal.message);
    }

    #[test]
    fn the_unpaid_cap_refuses_the_order_that_would_pass_it() {
        assert_eq!(refuse_past_unpaid_cap(9, 10), None);
        let refusal = refuse_past_unpaid_cap(10, 10).expect("refused");
        assert_eq!(refusal.code, ErrorCode::OrderTooManyReserved);
        assert!(refuse_past_unpaid_cap(0, 0).is_some());
    }
}
