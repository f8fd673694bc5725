//! Money rules: order totals and coupon discounts, in whole won (`i64`), never floats; and
//! the kinds of entries in a balance's ledger.

use serde::{Deserialize, Serialize};

use crate::domain::ids::MAX_PRICE;

/// How a coupon's `discountValue` reads, as the contract's `discountType` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DiscountType {
    /// Won off.
    Fixed,
    /// 1 to 100 percent off.
    Percent,
}

impl DiscountType {
    pub const ALL: [DiscountType; 2] = [DiscountType::Fixed, DiscountType::Percent];

    pub fn as_str(self) -> &'static str {
        match self {
            DiscountType::Fixed => "FIXED",
            DiscountType::Percent => "PERCENT",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        DiscountType::ALL.into_iter().find(|t| t.as_str() == raw)
    }

    /// The largest `discountValue` a coupon of this type may have: a price's bound for won
    /// off, 100 for a percentage.
    pub fn max_value(self) -> i64 {
        match self {
            DiscountType::Fixed => MAX_PRICE,
            DiscountType::Percent => 100,
        }
    }
}

/// How a coupon takes money off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discount {
    /// A fixed number of won, capped at what it applies to.
    Fixed(i64),
    /// 1 to 100 percent, rounded down to a whole won.
    Percent(i64),
}

impl Discount {
    /// The discount of a stored `(discount_type, discount_value)`; `None` when the value is
    /// out of its type's range.
    pub fn new(kind: DiscountType, value: i64) -> Option<Self> {
        match kind {
            DiscountType::Fixed if value > 0 => Some(Discount::Fixed(value)),
            DiscountType::Percent if (1..=100).contains(&value) => Some(Discount::Percent(value)),
            _ => None,
        }
    }

    /// [`Discount::new`] of a type read as text; `None` for an unknown type too.
    pub fn parse(kind: &str, value: i64) -> Option<Self> {
        DiscountType::parse(kind).and_then(|kind| Discount::new(kind, value))
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

/// What moved a balance, as a ledger entry's `type` names it. Every amount in the ledger is
/// positive; the kind says which way it moved the balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LedgerKind {
    /// Money the user added.
    Charge,
    /// An order paid from the balance.
    Payment,
    /// Money given back for an order.
    Refund,
}

impl LedgerKind {
    pub const ALL: [LedgerKind; 3] = [LedgerKind::Charge, LedgerKind::Payment, LedgerKind::Refund];

    pub fn as_str(self) -> &'static str {
        match self {
            LedgerKind::Charge => "CHARGE",
            LedgerKind::Payment => "PAYMENT",
            LedgerKind::Refund => "REFUND",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        LedgerKind::ALL.into_iter().find(|k| k.as_str() == raw)
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
        assert_eq!(
            Discount::new(DiscountType::Percent, 15),
            Some(Discount::Percent(15))
        );
    }

    #[test]
    fn the_text_of_each_type_and_kind_reads_back_as_it() {
        for kind in DiscountType::ALL {
            assert_eq!(DiscountType::parse(kind.as_str()), Some(kind));
            let json = serde_json::to_value(kind).unwrap();
            assert_eq!(json, kind.as_str());
        }
        for kind in LedgerKind::ALL {
            assert_eq!(LedgerKind::parse(kind.as_str()), Some(kind));
            let json = serde_json::to_value(kind).unwrap();
            assert_eq!(json, kind.as_str());
        }
        assert_eq!(DiscountType::parse("fixed"), None);
        assert_eq!(LedgerKind::parse("TOPUP"), None);
    }

    #[test]
    fn totals_add_up_and_refuse_overflow() {
        assert_eq!(order_total([(1_000, 2), (250, 4)]), Some(3_000));
        assert_eq!(order_total([]), Some(0));
        assert_eq!(order_total([(i64::MAX, 2)]), None);
        assert_eq!(order_total([(i64::MAX, 1), (1, 1)]), None);
    }
}
