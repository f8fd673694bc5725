//! Money rules: order totals and coupon discounts, in whole won (`i64`), never floats.

/// How a coupon takes money off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discount {
    /// A fixed number of won, capped at what it applies to.
    Fixed(i64),
    /// 1 to 100 percent, rounded down to a whole won.
    Percent(i64),
}

impl Discount {
    /// Reads the stored `(discount_type, discount_value)`.
    pub fn parse(kind: &str, value: i64) -> Option<Self> {
        match kind {
            "FIXED" if value > 0 => Some(Discount::Fixed(value)),
            "PERCENT" if (1..=100).contains(&value) => Some(Discount::Percent(value)),
            _ => None,
        }
    }

    /// The discount on `base`, the part of an order the coupon applies to: never more than
    /// `base`, never negative.
    pub fn on(self, base: i64) -> i64 {
        let base = base.max(0);
        match self {
            Discount::Fixed(value) => value.min(base),
            // i128: base (up to ~5e10 per order) times 100 cannot overflow, but be explicit.
            Discount::Percent(percent) => {
                let discount = i128::from(base) * i128::from(percent) / 100;
                i64::try_from(discount).unwrap_or(base).min(base)
            }
        }
    }
}

/// The sum of `unit_price * quantity` over lines, or `None` on overflow.
pub fn order_total(lines: impl IntoIterator<Item = (i64, i64)>) -> Option<i64> {
    lines.into_iter().try_fold(0_i64, |total, (price, quantity)| {
        total.checked_add(price.checked_mul(quantity)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_discount_is_capped_at_what_it_applies_to() {
        assert_eq!(Discount::Fixed(3_000).on(10_000), 3_000);
        assert_eq!(Discount::Fixed(30_000).on(10_000), 10_000);
        assert_eq!(Discount::Fixed(5).on(0), 0);
    }

    #[test]
    fn a_percent_discount_rounds_down_to_a_whole_won() {
        assert_eq!(Discount::Percent(10).on(10_000), 1_000);
        assert_eq!(Discount::Percent(15).on(999), 149); // 149.85
        assert_eq!(Discount::Percent(33).on(1), 0);
        assert_eq!(Discount::Percent(100).on(12_345), 12_345);
    }

    #[test]
    fn only_valid_discounts_parse() {
        assert_eq!(Discount::parse("FIXED", 500), Some(Discount::Fixed(500)));
        assert_eq!(Discount::parse("PERCENT", 100), Some(Discount::Percent(100)));
        assert_eq!(Discount::parse("PERCENT", 101), None);
        assert_eq!(Discount::parse("PERCENT", 0), None);
        assert_eq!(Discount::parse("FIXED", 0), None);
        assert_eq!(Discount::parse("BOGO", 1), None);
    }

    #[test]
    fn totals_add_up_and_refuse_overflow() {
        assert_eq!(order_total([(1_000, 2), (250, 4)]), Some(3_000));
        assert_eq!(order_total([]), Some(0));
        assert_eq!(order_total([(i64::MAX, 2)]), None);
        assert_eq!(order_total([(i64::MAX, 1), (1, 1)]), None);
    }
}
