//! The identifier of every check: stable, so that tests, the fault suite and result files
//! name a check by it, while its description (what the printouts show) may be reworded.
//!
//! An identifier is `suite.name` in snake case (`flash_sale.not_over_issued`). Result files
//! keep it beside the description; once written, an identifier names its check for good.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Which checks a check belongs to: each suite's descriptions differ from one another, which
/// is what lets a result file written before the identifiers be read (see
/// [`CheckId::described`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Suite {
    /// `checks::flash_sale`, against our api or the synchronous peer.
    FlashSale,
    /// `checks::checkout`.
    Checkout,
    /// `checks::browse`.
    Browse,
    /// `checks::whole_system`, run by the fault suite.
    WholeSystem,
    /// The pgbench baselines' own checks.
    Baseline,
}

/// Declares [`CheckId`] from one line per check, so that an identifier, its suite and its
/// description cannot drift apart.
macro_rules! check_ids {
    ($($suite:ident $prefix:literal {
        $($variant:ident $name:literal => $description:literal,)*
    })*) => {
        /// One check, whatever the run that made it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum CheckId {
            $($($variant,)*)*
        }

        impl CheckId {
            /// Every check.
            pub const ALL: &'static [CheckId] = &[$($(CheckId::$variant,)*)*];

            /// The stable identifier: `suite.name`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($(CheckId::$variant => concat!($prefix, ".", $name),)*)*
                }
            }

            /// What the check asserts, as the printouts show it.
            pub fn description(self) -> &'static str {
                match self {
                    $($(CheckId::$variant => $description,)*)*
                }
            }

            pub fn suite(self) -> Suite {
                match self {
                    $($(CheckId::$variant => Suite::$suite,)*)*
                }
            }
        }
    };
}

check_ids! {
    FlashSale "flash_sale" {
        FlashSaleAnswersAllowed "answers_allowed" => "every answer was one the contract allows",
        FlashSaleKeyNamesOneRequest "key_names_one_request" => "an Idempotency-Key never named two requests",
        FlashSaleIssuedCountDb "issued_count_db" => "coupon issued count is the quantity (DB)",
        FlashSaleNotOverIssued "not_over_issued" => "never issued beyond the total",
        FlashSaleQuantityIssued "quantity_issued" => "exactly the quantity issued (user_coupons rows)",
        FlashSaleNoUserHoldsTwice "no_user_holds_twice" => "no user holds it twice",
        FlashSaleIssuedToRunUsers "issued_to_run_users" => "issued only to users of this run",
        FlashSalePeerAnswerPerCoupon "peer_answer_per_coupon" => "one 200 answer per issued coupon",
        FlashSalePeerAnswersNameCoupons "peer_answers_name_coupons" => "every 200 names a coupon issued by this sale",
        FlashSaleRequestsTerminalDb "requests_terminal_db" => "every request terminal (DB)",
        FlashSaleSuccessPerCoupon "success_per_coupon" => "one succeeded request per issued coupon",
        FlashSaleExpectedFailuresOnly "expected_failures_only" => "failures are only out of stock, already acquired or withdrawn after a 503 (no ERR_PROCESSING_FAILED)",
        FlashSaleAcceptedNotWithdrawn "accepted_not_withdrawn" => "no request answered 202 was withdrawn",
        FlashSaleSuccessNamesCoupon "success_names_coupon" => "every success names the coupon it issued",
        FlashSaleCouponHasRequest "coupon_has_request" => "every issued coupon has its succeeded request",
        FlashSaleAcceptedTerminalDb "accepted_terminal_db" => "every 202 is stored and terminal (DB)",
        FlashSaleAcceptedTerminalApi "accepted_terminal_api" => "every 202 reads terminal at GET /requests/{id} (API)",
        FlashSaleIssuedQuantityApi "issued_quantity_api" => "coupon issuedQuantity is the quantity (API)",
        FlashSaleHoldersSeeCouponApi "holders_see_coupon_api" => "holders see the coupon at GET /users/{id}/coupons (API, sample)",
    }
    Checkout "checkout" {
        CheckoutAnswersAllowed "answers_allowed" => "every answer was one the contract allows",
        CheckoutJourneysPaid "journeys_paid" => "every journey ended paid",
        CheckoutNoNegativeBalance "no_negative_balance" => "no balance negative",
        CheckoutBalanceIsLedger "balance_is_ledger" => "balance = CHARGE + REFUND - PAYMENT of its ledger",
        CheckoutChargesAppliedOnce "charges_applied_once" => "each charge applied exactly once, and only by the users who sent one",
        CheckoutBalanceAfterIsBalance "balance_after_is_balance" => "the newest ledger entry's balanceAfter is the balance",
        CheckoutStockConserved "stock_conserved" => "stock + sold = initial stock, every product",
        CheckoutReservedIsOrders "reserved_is_orders" => "reserved = units of RESERVED orders, every product",
        CheckoutSoldIsOrders "sold_is_orders" => "sold = units of PAID orders, every product",
        CheckoutPaymentPerPaidOrder "payment_per_paid_order" => "one payment per PAID order, none for others",
        CheckoutAmountsAgree "amounts_agree" => "payment = paid amount = total - discount = ledger PAYMENT",
        CheckoutUsedCouponsPaid "used_coupons_paid" => "every used coupon belongs to its PAID order and payment",
        CheckoutDiscountsUsedCoupons "discounts_used_coupons" => "every order with the coupon used a held coupon",
        CheckoutIssuedCountIsHeld "issued_count_is_held" => "coupon issued count = coupons held",
        CheckoutEventPerPaidOrder "event_per_paid_order" => "one order.paid event per PAID order, none for others (outbox and published)",
        CheckoutRequestsTerminalDb "requests_terminal_db" => "every request terminal (DB)",
        CheckoutNoProcessingFailed "no_processing_failed" => "no ERR_PROCESSING_FAILED",
        CheckoutOrdersPaidDb "orders_paid_db" => "every user's order PAID (DB)",
        CheckoutProductStockApi "product_stock_api" => "GET /products/{id} stock = on hand - reserved (API)",
        CheckoutBalancesApi "balances_api" => "GET /users/{id}/balance = the balance row (API, sample)",
        CheckoutOrdersPaidApi "orders_paid_api" => "GET /users/{id}/orders/{orderId} reads PAID (API, sample)",
    }
    Browse "browse" {
        BrowseAnswersOk "answers_ok" => "every answer was 200",
        BrowseProductsApi "products_api" => "GET /products/{id} = the product row (API)",
        BrowseBalancesApi "balances_api" => "GET /users/{id}/balance = the balance row (API, sample)",
    }
    WholeSystem "whole_system" {
        WholeSystemCouponsNotOverIssued "coupons_not_over_issued" => "no coupon issued beyond its total",
        WholeSystemIssuedCountIsHeld "issued_count_is_held" => "every coupon's issued count = the coupons held",
        WholeSystemCouponHeldIffIssued "coupon_held_iff_issued" => "a coupon is held if and only if a COUPON_ISSUE request SUCCEEDED in issuing it",
        WholeSystemNoCouponHeldTwice "no_coupon_held_twice" => "no user holds a coupon twice",
        WholeSystemStockInBounds "stock_in_bounds" => "no product with negative stock or reservations, or more reserved than on hand",
        WholeSystemReservedIsOrders "reserved_is_orders" => "reserved = units of RESERVED orders, every product",
        WholeSystemSoldIsOrders "sold_is_orders" => "sold = units of PAID orders, every product",
        WholeSystemNoNegativeBalance "no_negative_balance" => "no balance negative",
        WholeSystemBalanceIsLedger "balance_is_ledger" => "balance = CHARGE + REFUND - PAYMENT of its ledger, every user",
        WholeSystemNoOrderPaidTwice "no_order_paid_twice" => "no order paid twice (payments, ledger PAYMENT entries)",
        WholeSystemPaymentPerPaidOrder "payment_per_paid_order" => "a payment for every PAID order and no other; a ledger PAYMENT entry for every one that cost something",
        WholeSystemPaymentIffPaid "payment_iff_paid" => "a payment exists if and only if an ORDER_PAY request SUCCEEDED in making it",
        WholeSystemOrdersSettledAsCreated "orders_settled_as_created" => "every order settled as its create request says",
        WholeSystemPaymentAfterCreation "payment_after_creation" => "no payment settled before its order's creation",
        WholeSystemRequestsTerminal "requests_terminal" => "every request terminal",
        WholeSystemNoProcessingFailed "no_processing_failed" => "no request failed for want of processing (ERR_PROCESSING_FAILED)",
        WholeSystemNothingDeadLettered "nothing_dead_lettered" => "nothing dead-lettered",
        WholeSystemEventsPublished "events_published" => "every event published (the outbox is empty)",
        WholeSystemEventPerPaidOrder "event_per_paid_order" => "one order.paid event per PAID order, none for others (outbox and received)",
        WholeSystemEventsReceived "events_received" => "the data platform received one order.paid per PAID order, none for others",
        WholeSystemRequestsTerminalApi "requests_terminal_api" => "GET /requests/{id} reads terminal (API, sample)",
        WholeSystemBalancesApi "balances_api" => "GET /users/{id}/balance = the balance row (API, sample)",
    }
    Baseline "baseline" {
        BaselineAllTransactionsRan "all_transactions_ran" => "pgbench ran every transaction",
        BaselineNoFailedTransaction "no_failed_transaction" => "no failed transaction",
        BaselineQuantityIssuedCoupon "quantity_issued_coupon" => "exactly the quantity issued (coupon row)",
        BaselineQuantityIssuedRows "quantity_issued_rows" => "exactly the quantity issued (rows)",
        BaselineNoUserHoldsTwice "no_user_holds_twice" => "no user holds it twice",
        BaselineStockConserved "stock_conserved" => "stock + sold = initial stock",
        BaselineNoNegativeBalance "no_negative_balance" => "no balance negative",
        BaselinePaymentPerTransaction "payment_per_transaction" => "one payment per transaction",
        BaselinePaymentsAreDebits "payments_are_debits" => "payments = balances debited",
    }
}

impl CheckId {
    /// The check of `suite` described so: how a result file written before the identifiers
    /// names its checks (a description is unique within its suite, not across suites).
    pub fn described(suite: Suite, description: &str) -> Option<CheckId> {
        CheckId::ALL
            .iter()
            .copied()
            .find(|id| id.suite() == suite && id.description() == description)
    }
}

impl fmt::Display for CheckId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An identifier no check has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownCheckId(pub String);

impl fmt::Display for UnknownCheckId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no check is identified as `{}`", self.0)
    }
}

impl std::error::Error for UnknownCheckId {}

impl FromStr for CheckId {
    type Err = UnknownCheckId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CheckId::ALL
            .iter()
            .copied()
            .find(|id| id.as_str() == s)
            .ok_or_else(|| UnknownCheckId(s.to_owned()))
    }
}

impl Serialize for CheckId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CheckId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let id = String::deserialize(deserializer)?;
        id.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn identifiers_are_unique_snake_case_and_start_with_their_suite() {
        let mut seen = HashSet::new();
        for id in CheckId::ALL {
            assert!(seen.insert(id.as_str()), "{id} twice");
            let (suite, name) = id.as_str().split_once('.').expect("suite.name");
            let prefix = match id.suite() {
                Suite::FlashSale => "flash_sale",
                Suite::Checkout => "checkout",
                Suite::Browse => "browse",
                Suite::WholeSystem => "whole_system",
                Suite::Baseline => "baseline",
            };
            assert_eq!(suite, prefix, "{id}");
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{id} is not snake case"
            );
            assert_eq!(id.as_str().parse::<CheckId>(), Ok(*id));
        }
    }

    #[test]
    fn a_description_names_one_check_within_its_suite() {
        for id in CheckId::ALL {
            assert_eq!(CheckId::described(id.suite(), id.description()), Some(*id));
        }
        assert_eq!(
            CheckId::described(Suite::Checkout, "no balance negative"),
            Some(CheckId::CheckoutNoNegativeBalance)
        );
        assert_eq!(
            CheckId::described(Suite::Baseline, "no balance negative"),
            Some(CheckId::BaselineNoNegativeBalance)
        );
        assert_eq!(CheckId::described(Suite::Browse, "no balance negative"), None);
    }

    #[test]
    fn identifiers_are_written_as_their_string() {
        let json = serde_json::to_string(&CheckId::FlashSaleNotOverIssued).expect("serializes");
        assert_eq!(json, "\"flash_sale.not_over_issued\"");
        assert_eq!(
            serde_json::from_str::<CheckId>(&json).ok(),
            Some(CheckId::FlashSaleNotOverIssued)
        );
        assert!(serde_json::from_str::<CheckId>("\"flash_sale.no_such_check\"").is_err());
    }
}
