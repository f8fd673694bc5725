//! The commands as a client sends them (`POST /coupons/{couponId}/issue`, `POST /orders`,
//! `POST /orders/{orderId}/payment`): what can be refused from the request alone, before
//! anything is looked up.
//!
//! The api and the synchronous peer both read requests through these rules, so that the two
//! refuse the same requests with the same codes and messages and a benchmark compares their
//! designs, not their validation.

use std::collections::HashSet;

use serde_json::Number;
use uuid::Uuid;

use super::command::OrderLine;
use super::error::{ErrorBody, ErrorCode};
use super::ids::{whole_number_in, CouponId, UserId, MAX_LINE_QUANTITY, MAX_ORDER_LINES};

/// The `couponId` of a path: a positive integer.
pub fn coupon_id(raw: &str) -> Result<CouponId, ErrorBody> {
    CouponId::parse(raw)
        .ok_or_else(|| ErrorBody::new(ErrorCode::InvalidRequest, "couponId must be a positive integer"))
}

/// The `userId` of a coupon issue: a positive integer (whether it is registered is for a
/// lookup to say, with the same code).
pub fn coupon_user(raw: &Number) -> Result<UserId, ErrorBody> {
    whole_number_in(raw, 1, i64::MAX)
        .and_then(UserId::new)
        .ok_or_else(invalid_coupon_user)
}

/// `ERR_BALANCE_INVALID_USER`: the contract's answer to a coupon issue for a `userId` that
/// is malformed or not registered.
pub fn invalid_coupon_user() -> ErrorBody {
    ErrorBody::new(ErrorCode::BalanceInvalidUser, "userId is not a registered user")
}

/// The `userId` of an order or a payment: a positive integer (whether it is registered is
/// for a lookup to say, with the same code).
pub fn order_user(raw: &Number) -> Result<UserId, ErrorBody> {
    whole_number_in(raw, 1, i64::MAX)
        .and_then(UserId::new)
        .ok_or_else(invalid_user)
}

/// `ERR_ORDER_INVALID_USER`: the answer to a `userId` that is malformed or not registered.
pub fn invalid_user() -> ErrorBody {
    ErrorBody::new(ErrorCode::OrderInvalidUser, "userId is not a registered user")
}

/// `ERR_ORDER_INVALID_ITEMS`, with what is wrong with the lines.
pub fn invalid_items(message: &str) -> ErrorBody {
    ErrorBody::new(ErrorCode::OrderInvalidItems, message)
}

/// The `orderId` of a path: a UUID.
pub fn order_id(raw: &str) -> Result<Uuid, ErrorBody> {
    Uuid::parse_str(raw).map_err(|_| ErrorBody::new(ErrorCode::InvalidRequest, "orderId must be a UUID"))
}

/// The shape and ranges of an order's lines, given as `(productId, quantity)`: 1 to
/// [`MAX_ORDER_LINES`] lines, positive product ids, each product once, 1 to
/// [`MAX_LINE_QUANTITY`] units. The first line at fault is the one reported.
pub fn order_lines<'a, I>(lines: I) -> Result<Vec<OrderLine>, ErrorBody>
where
    I: IntoIterator<Item = (&'a Number, &'a Number)>,
    I::IntoIter: ExactSizeIterator,
{
    let lines = lines.into_iter();
    if lines.len() == 0 || lines.len() > MAX_ORDER_LINES {
        return Err(invalid_items("an order has 1 to 50 lines"));
    }
    let mut seen = HashSet::new();
    lines
        .map(|(product_id, quantity)| {
            let product_id = whole_number_in(product_id, 1, i64::MAX)
                .ok_or_else(|| invalid_items("productId must be a positive integer"))?;
            let quantity = whole_number_in(quantity, 1, MAX_LINE_QUANTITY)
                .ok_or_else(|| invalid_items("quantity must be a whole number from 1 to 10,000"))?;
            if !seen.insert(product_id) {
                return Err(invalid_items("each product may appear once in an order"));
            }
            Ok(OrderLine { product_id, quantity })
        })
        .collect()
}

/// The optional `couponId` of a payment: a positive integer when given (whether the user
/// holds it, and whether it applies, is the settlement's to say).
pub fn payment_coupon(raw: Option<&Number>) -> Result<Option<i64>, ErrorBody> {
    raw.map(|raw| {
        whole_number_in(raw, 1, i64::MAX).ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::PaymentInvalidCoupon,
                "couponId must be a positive integer",
            )
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(raw: &str) -> Number {
        serde_json::from_str(raw).unwrap_or_else(|e| panic!("{raw} is not a JSON number: {e}"))
    }

    fn lines(raw: &[(&str, &str)]) -> Result<Vec<OrderLine>, ErrorBody> {
        let numbers: Vec<(Number, Number)> = raw.iter().map(|(p, q)| (number(p), number(q))).collect();
        order_lines(numbers.iter().map(|(p, q)| (p, q)))
    }

    fn refusal(result: Result<Vec<OrderLine>, ErrorBody>) -> String {
        match result {
            Ok(lines) => panic!("accepted {lines:?}"),
            Err(body) => {
                assert_eq!(body.code, ErrorCode::OrderInvalidItems);
                body.message
            }
        }
    }

    #[test]
    fn well_formed_lines_are_read_in_order() {
        let read = lines(&[("7", "1"), ("3", "10000")]).ok();
        let expected = vec![
            OrderLine {
                product_id: 7,
                quantity: 1,
            },
            OrderLine {
                product_id: 3,
                quantity: MAX_LINE_QUANTITY,
            },
        ];
        assert_eq!(read, Some(expected));
    }

    #[test]
    fn an_order_has_one_to_fifty_lines() {
        assert_eq!(refusal(lines(&[])), "an order has 1 to 50 lines");
        let ids: Vec<String> = (1..=MAX_ORDER_LINES + 1).map(|id| id.to_string()).collect();
        let fifty_one: Vec<(&str, &str)> = ids.iter().map(|id| (id.as_str(), "1")).collect();
        assert_eq!(refusal(lines(&fifty_one)), "an order has 1 to 50 lines");
        assert_eq!(
            lines(&fifty_one[..MAX_ORDER_LINES]).map(|l| l.len()),
            Ok(MAX_ORDER_LINES)
        );
    }

    #[test]
    fn product_ids_are_positive_integers() {
        for bad in ["0", "-1", "1.5", "1e30"] {
            assert_eq!(
                refusal(lines(&[(bad, "1")])),
                "productId must be a positive integer",
                "{bad}"
            );
        }
    }

    #[test]
    fn quantities_are_whole_numbers_up_to_ten_thousand() {
        for bad in ["0", "-2", "2.5", "10001"] {
            assert_eq!(
                refusal(lines(&[("1", bad)])),
                "quantity must be a whole number from 1 to 10,000",
                "{bad}"
            );
        }
    }

    #[test]
    fn a_product_appears_once() {
        assert_eq!(
            refusal(lines(&[("4", "1"), ("5", "1"), ("4", "2")])),
            "each product may appear once in an order"
        );
    }

    #[test]
    fn users_and_coupons_are_positive_integers() {
        assert_eq!(order_user(&number("12")).map(UserId::get), Ok(12));
        for bad in ["0", "-3", "1.5"] {
            assert_eq!(order_user(&number(bad)), Err(invalid_user()), "{bad}");
        }
        assert_eq!(payment_coupon(None), Ok(None));
        assert_eq!(payment_coupon(Some(&number("9"))), Ok(Some(9)));
        let refused = payment_coupon(Some(&number("0"))).map_err(|body| body.code);
        assert_eq!(refused, Err(ErrorCode::PaymentInvalidCoupon));
    }

    #[test]
    fn coupon_issues_name_positive_coupons_and_users() {
        assert_eq!(coupon_id("5").map(CouponId::get), Ok(5));
        assert_eq!(
            coupon_id("0").map_err(|body| body.code),
            Err(ErrorCode::InvalidRequest)
        );
        assert_eq!(coupon_user(&number("3")).map(UserId::get), Ok(3));
        assert_eq!(coupon_user(&number("-3")), Err(invalid_coupon_user()));
    }

    #[test]
    fn order_ids_are_uuids() {
        let id = Uuid::now_v7();
        assert_eq!(order_id(&id.to_string()), Ok(id));
        let refused = order_id("42").map_err(|body| body.code);
        assert_eq!(refused, Err(ErrorCode::InvalidRequest));
    }
}
