//! Property tests of the domain rules: for any input, not just the examples in the unit
//! tests, discounts stay within what they apply to, totals never wrap, keys always land
//! on the same partition, ownership moves only when it has to, and an order's life has one
//! ending.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use proptest::prelude::*;
use shared::domain::{whole_number_in, MAX_PRICE};
use shared::money::{order_total, Discount};
use shared::order::{OrderEvent, OrderStatus, EVENTS};
use shared::partition::{partition_of, rendezvous_owner};
use uuid::Uuid;

proptest! {
    #[test]
    fn a_fixed_discount_is_the_smaller_of_its_value_and_the_base(value in 1_i64..=MAX_PRICE, base in -1_000_i64..=50 * MAX_PRICE) {
        let discount = Discount::Fixed(value).on(base);
        prop_assert_eq!(discount, value.min(base.max(0)));
    }

    #[test]
    fn a_percent_discount_is_floored_and_never_above_the_base(percent in 1_i64..=100, base in 0_i64..=50 * MAX_PRICE) {
        let discount = Discount::Percent(percent).on(base);
        prop_assert_eq!(i128::from(discount), i128::from(base) * i128::from(percent) / 100);
        prop_assert!((0..=base).contains(&discount));
    }

    #[test]
    fn a_discount_grows_with_its_base(percent in 1_i64..=100, value in 1_i64..=MAX_PRICE, base in 0_i64..=MAX_PRICE, more in 0_i64..=MAX_PRICE) {
        for discount in [Discount::Percent(percent), Discount::Fixed(value)] {
            prop_assert!(discount.on(base) <= discount.on(base + more));
        }
    }

    #[test]
    fn only_stored_discounts_in_range_parse(kind in "FIXED|PERCENT|[A-Z]{1,8}", value in any::<i64>()) {
        let parsed = Discount::parse(&kind, value);
        let valid = match kind.as_str() {
            "FIXED" => value > 0,
            "PERCENT" => (1..=100).contains(&value),
            _ => false,
        };
        prop_assert_eq!(parsed.is_some(), valid);
    }

    #[test]
    fn an_order_total_is_exact_or_absent(lines in prop::collection::vec((0_i64..=i64::MAX / 2, 0_i64..=20_000), 0..60)) {
        let exact: i128 = lines.iter().map(|&(price, quantity)| i128::from(price) * i128::from(quantity)).sum();
        match order_total(lines.iter().copied()) {
            Some(total) => prop_assert_eq!(i128::from(total), exact),
            // None only when some partial sum or product leaves i64; the full sum then does
            // too, as every term is non-negative.
            None => prop_assert!(exact > i128::from(i64::MAX)),
        }
    }

    #[test]
    fn an_amount_is_accepted_exactly_when_whole_and_in_range(raw in any::<i64>(), min in -10_i64..=10, max in 0_i64..=1_000_000) {
        let number = serde_json::Number::from(raw);
        prop_assert_eq!(whole_number_in(&number, min, max), (min..=max).contains(&raw).then_some(raw));
    }

    #[test]
    fn a_fractional_amount_is_never_accepted(raw in -1.0e12_f64..1.0e12, min in -10_i64..=10) {
        prop_assume!(raw.fract() != 0.0);
        let number = serde_json::Number::from_f64(raw).unwrap();
        prop_assert_eq!(whole_number_in(&number, min, i64::MAX), None);
    }

    #[test]
    fn a_key_always_lands_on_the_same_partition_in_range(key in any::<i64>(), partitions in 1_u16..=1_024) {
        let partition = partition_of(key, partitions);
        prop_assert!(partition < partitions);
        prop_assert_eq!(partition, partition_of(key, partitions));
    }

    #[test]
    fn an_owner_is_a_live_replica_whatever_the_listing_order(seeds in prop::collection::vec(any::<u128>(), 1..12), partition in 0_u16..64) {
        let replicas: Vec<Uuid> = seeds.iter().map(|s| Uuid::from_u128(*s)).collect();
        let owner = rendezvous_owner(&replicas, "order", partition).unwrap();
        prop_assert!(replicas.contains(&owner));
        let mut reversed = replicas.clone();
        reversed.reverse();
        prop_assert_eq!(rendezvous_owner(&reversed, "order", partition), Some(owner));
    }

    #[test]
    fn a_partition_moves_only_when_its_owner_leaves(seeds in prop::collection::vec(any::<u128>(), 2..12), leaving in any::<prop::sample::Index>(), partition in 0_u16..64) {
        let replicas: Vec<Uuid> = seeds.iter().map(|s| Uuid::from_u128(*s)).collect();
        let owner = rendezvous_owner(&replicas, "coupon", partition).unwrap();
        let gone = replicas[leaving.index(replicas.len())];
        let remaining: Vec<Uuid> = replicas.iter().copied().filter(|r| *r != gone).collect();
        let after = rendezvous_owner(&remaining, "coupon", partition);
        if gone == owner {
            prop_assert!(after.is_some_and(|a| a != owner) || remaining.is_empty());
        } else {
            prop_assert_eq!(after, Some(owner));
        }
    }

    #[test]
    fn an_order_ends_once_and_is_paid_only_from_a_reservation(events in prop::collection::vec(prop::sample::select(EVENTS.to_vec()), 0..20)) {
        let mut status = OrderStatus::Pending;
        let mut closings = 0;
        for event in events {
            let Some(next) = status.after(event) else {
                continue;
            };
            prop_assert!(!status.is_closed(), "{status:?} moved on {event:?}");
            if next == OrderStatus::Paid {
                prop_assert_eq!(status, OrderStatus::Reserved);
            }
            if next.is_closed() {
                closings += 1;
            }
            status = next;
        }
        prop_assert!(closings <= 1);
        // Stock is held exactly while reserved, and a payment is accepted only before the end.
        prop_assert_eq!(status.holds_stock(), status == OrderStatus::Reserved);
        prop_assert_eq!(status.accepts_payment(), !status.is_closed());
    }

    #[test]
    fn an_order_status_reads_back_as_written(status in prop::sample::select(OrderStatus::ALL.to_vec())) {
        prop_assert_eq!(OrderStatus::parse(status.as_str()), Some(status));
        prop_assert_eq!(OrderStatus::parse(&status.as_str().to_lowercase()), None);
    }
}

#[test]
fn closed_statuses_are_the_four_endings() {
    let closed: Vec<OrderStatus> = OrderStatus::ALL.into_iter().filter(|s| s.is_closed()).collect();
    assert_eq!(
        closed,
        [
            OrderStatus::Paid,
            OrderStatus::Rejected,
            OrderStatus::Cancelled,
            OrderStatus::Expired
        ]
    );
    assert!(EVENTS
        .iter()
        .all(|e| OrderStatus::Pending.after(*e) != Some(OrderStatus::Paid)));
    assert_eq!(
        OrderStatus::Reserved.after(OrderEvent::Pay),
        Some(OrderStatus::Paid)
    );
}
