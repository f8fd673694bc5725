//! Coupon rules without I/O: who gets a coupon from a batch of issue requests.

use std::collections::{HashMap, HashSet};

use crate::domain::command::CouponIssue;
use crate::domain::error::ErrorCode;

/// What a batch needs to know of one coupon, read under its row lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CouponStock {
    /// Coupons left to issue.
    pub remaining: i64,
    pub expired: bool,
}

/// The outcome of one issue request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueDecision {
    Issue,
    Refuse(ErrorCode),
}

/// What is known of one issue request when it is decided: by the api's check before the
/// queue (read without locks), or by the worker (under the coupon's row lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssueFacts {
    pub user_registered: bool,
    /// The coupon's state; `None` when there is no such coupon.
    pub coupon: Option<IssueState>,
    /// The user holds this coupon already.
    pub held: bool,
}

/// The state of a coupon that matters to one more issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssueState {
    pub expired: bool,
    /// Nothing is left to issue.
    pub sold_out: bool,
}

/// Why an issue request is refused, if it is: the one rule of the api's check and the
/// worker's decision, in the contract's order: the user (400), the coupon (404), its
/// expiry (410), one of a kind per user (409), then the stock (410). (The worker used to
/// look at the coupon before the user; the api never let both be missing, so no answer
/// changes.)
pub fn refusal(facts: IssueFacts) -> Option<ErrorCode> {
    let Some(coupon) = facts.coupon.filter(|_| facts.user_registered) else {
        return Some(if facts.user_registered {
            ErrorCode::CouponNotFound
        } else {
            ErrorCode::BalanceInvalidUser
        });
    };
    if coupon.expired {
        Some(ErrorCode::CouponExpired)
    } else if facts.held {
        Some(ErrorCode::CouponAlreadyAcquired)
    } else if coupon.sold_out {
        Some(ErrorCode::CouponOutOfStock)
    } else {
        None
    }
}

/// Decides a batch of issue requests in the order given (the broker's order): first come,
/// first served, at most one coupon of a kind per user, never beyond what is left.
///
/// `held` holds the `(coupon, user)` pairs issued before this batch.
pub fn decide_issues(
    requests: &[CouponIssue],
    coupons: &HashMap<i64, CouponStock>,
    registered_users: &HashSet<i64>,
    held: &HashSet<(i64, i64)>,
) -> Vec<IssueDecision> {
    let mut remaining: HashMap<i64, i64> = coupons.iter().map(|(id, c)| (*id, c.remaining)).collect();
    let mut issued_now: HashSet<(i64, i64)> = HashSet::new();
    requests
        .iter()
        .map(|request| {
            let pair = (request.coupon_id, request.user_id);
            let facts = IssueFacts {
                user_registered: registered_users.contains(&request.user_id),
                coupon: coupons.get(&request.coupon_id).map(|coupon| IssueState {
                    expired: coupon.expired,
                    sold_out: remaining.get(&request.coupon_id).is_none_or(|left| *left <= 0),
                }),
                held: held.contains(&pair) || issued_now.contains(&pair),
            };
            if let Some(code) = refusal(facts) {
                return IssueDecision::Refuse(code);
            }
            if let Some(left) = remaining.get_mut(&request.coupon_id) {
                *left -= 1;
            }
            issued_now.insert(pair);
            IssueDecision::Issue
        })
        .collect()
}

/// The message of a refused issue, for people.
pub fn refusal_message(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::CouponNotFound => "no coupon with this couponId",
        ErrorCode::CouponExpired => "this coupon has expired",
        ErrorCode::CouponOutOfStock => "every coupon of this kind has been issued",
        ErrorCode::CouponAlreadyAcquired => "this user already holds this coupon",
        ErrorCode::BalanceInvalidUser => "userId is not a registered user",
        _ => "the coupon cannot be issued",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue(coupon_id: i64, user_id: i64) -> CouponIssue {
        CouponIssue { coupon_id, user_id }
    }

    fn stock(remaining: i64) -> CouponStock {
        CouponStock {
            remaining,
            expired: false,
        }
    }

    #[test]
    fn the_first_requests_in_order_get_what_is_left() {
        let coupons = HashMap::from([(1, stock(2))]);
        let users: HashSet<i64> = (1..=4).collect();
        let decisions = decide_issues(
            &[issue(1, 3), issue(1, 1), issue(1, 4), issue(1, 2)],
            &coupons,
            &users,
            &HashSet::new(),
        );
        assert_eq!(
            decisions,
            vec![
                IssueDecision::Issue,
                IssueDecision::Issue,
                IssueDecision::Refuse(ErrorCode::CouponOutOfStock),
                IssueDecision::Refuse(ErrorCode::CouponOutOfStock),
            ]
        );
    }

    #[test]
    fn a_user_gets_one_coupon_of_a_kind_within_and_across_batches() {
        let coupons = HashMap::from([(1, stock(10)), (2, stock(10))]);
        let users = HashSet::from([7, 8]);
        let held = HashSet::from([(2, 8)]);
        let decisions = decide_issues(
            &[issue(1, 7), issue(1, 7), issue(2, 7), issue(2, 8)],
            &coupons,
            &users,
            &held,
        );
        assert_eq!(
            decisions,
            vec![
                IssueDecision::Issue,
                IssueDecision::Refuse(ErrorCode::CouponAlreadyAcquired),
                IssueDecision::Issue,
                IssueDecision::Refuse(ErrorCode::CouponAlreadyAcquired),
            ]
        );
    }

    #[test]
    fn refusals_come_in_the_contracts_order() {
        let open = IssueState {
            expired: false,
            sold_out: false,
        };
        let gone = IssueState {
            expired: true,
            sold_out: true,
        };
        let facts = |user_registered, coupon, held| IssueFacts {
            user_registered,
            coupon,
            held,
        };
        let cases = [
            (facts(false, None, false), Some(ErrorCode::BalanceInvalidUser)),
            (
                facts(false, Some(gone), true),
                Some(ErrorCode::BalanceInvalidUser),
            ),
            (facts(true, None, false), Some(ErrorCode::CouponNotFound)),
            (facts(true, Some(gone), true), Some(ErrorCode::CouponExpired)),
            (
                facts(
                    true,
                    Some(IssueState {
                        expired: false,
                        ..gone
                    }),
                    true,
                ),
                Some(ErrorCode::CouponAlreadyAcquired),
            ),
            (
                facts(
                    true,
                    Some(IssueState {
                        expired: false,
                        ..gone
                    }),
                    false,
                ),
                Some(ErrorCode::CouponOutOfStock),
            ),
            (facts(true, Some(open), false), None),
        ];
        for (facts, refused) in cases {
            assert_eq!(refusal(facts), refused, "{facts:?}");
        }
    }

    #[test]
    fn unknown_expired_and_unregistered_are_refused_with_their_codes() {
        let coupons = HashMap::from([(
            1,
            CouponStock {
                remaining: 5,
                expired: true,
            },
        )]);
        let users = HashSet::from([1]);
        let decisions = decide_issues(
            &[issue(9, 1), issue(1, 1), issue(1, 2)],
            &coupons,
            &users,
            &HashSet::new(),
        );
        assert_eq!(
            decisions,
            vec![
                IssueDecision::Refuse(ErrorCode::CouponNotFound),
                IssueDecision::Refuse(ErrorCode::CouponExpired),
                IssueDecision::Refuse(ErrorCode::BalanceInvalidUser),
            ]
        );
    }
}
