//! Domain rules that need no I/O: identifiers and money.

use std::fmt;

/// Most a single charge may add, in KRW.
pub const MAX_CHARGE: i64 = 10_000_000;
/// Most a balance may hold, in KRW.
pub const MAX_BALANCE: i64 = 1_000_000_000;
/// Highest price a product may have, in KRW; keeps any order total far from `i64` overflow.
pub const MAX_PRICE: i64 = 1_000_000_000;
/// Most units of a product that can be on hand.
pub const MAX_STOCK: i64 = 1_000_000_000;
/// Most lines in one order.
pub const MAX_ORDER_LINES: usize = 50;
/// Most units of one product in one order. With [`MAX_PRICE`] and [`MAX_ORDER_LINES`] it
/// bounds an order's total at 5e14 won, far from `i64` overflow.
pub const MAX_LINE_QUANTITY: i64 = 10_000;

macro_rules! positive_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(i64);

        impl $name {
            /// Accepts a positive 64-bit integer, as it appears in a path or a body.
            pub fn parse(raw: &str) -> Option<Self> {
                raw.parse::<i64>().ok().and_then(Self::new)
            }

            /// Accepts a positive value.
            pub fn new(value: i64) -> Option<Self> {
                (value > 0).then_some(Self(value))
            }

            pub fn get(self) -> i64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

positive_id!(
    /// A registered user's id.
    UserId
);
positive_id!(
    /// A product's id.
    ProductId
);
positive_id!(
    /// A coupon kind's id.
    CouponId
);

/// Reads a JSON number as a whole number of won within `min..=max`.
///
/// Amounts arrive as JSON numbers that may be fractional or beyond `i64`; those are out of
/// range, not malformed, so the caller answers with the field's own error code.
pub fn whole_number_in(value: &serde_json::Number, min: i64, max: i64) -> Option<i64> {
    value.as_i64().filter(|v| (min..=max).contains(v))
}

/// A display name: trimmed, 1 to `max_chars` characters, no control characters.
pub fn parse_name(raw: &str, max_chars: usize) -> Option<String> {
    let name = raw.trim();
    let length = name.chars().count();
    let printable = !name.chars().any(char::is_control);
    (length >= 1 && length <= max_chars && printable).then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_positive_integers() {
        assert_eq!(UserId::parse("42").map(UserId::get), Some(42));
        for bad in ["0", "-1", "abc", "", "1.5", "99999999999999999999", " 1"] {
            assert_eq!(UserId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn amounts_must_be_whole_and_in_range() {
        let n = |s: &str| serde_json::from_str::<serde_json::Number>(s).ok();
        let check = |s: &str| n(s).and_then(|v| whole_number_in(&v, 1, MAX_CHARGE));
        assert_eq!(check("1"), Some(1));
        assert_eq!(check("10000000"), Some(MAX_CHARGE));
        for bad in ["0", "-5", "10000001", "1.5", "1e30", "18446744073709551616"] {
            assert_eq!(check(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(parse_name("  Ann ", 10).as_deref(), Some("Ann"));
        assert_eq!(parse_name("   ", 10), None);
        assert_eq!(parse_name("abcdefghijk", 10), None);
        assert_eq!(parse_name("a\u{0}b", 10), None);
    }
}
