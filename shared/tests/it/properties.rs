//! Property tests of the domain rules: for any input, not just the examples in the unit
//! tests, discounts stay within what they apply to, totals never wrap, amounts are accepted
//! exactly within the bounds the services enforce and never overflow inside them, keys land
//! on the partition FNV-1a gives them, ownership moves only when it has to, and an order's
//! life has one ending.

use proptest::prelude::*;
use shared::domain::ids::{
    whole_number_in, MAX_BALANCE, MAX_CHARGE, MAX_LINE_QUANTITY, MAX_ORDER_LINES, MAX_PRICE, MAX_STOCK,
};
use shared::domain::money::{order_total, Discount};
use shared::domain::order::{OrderEvent, OrderStatus, EVENTS};
use shared::domain::partition::{partition_of, rendezvous_owner};
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
    fn a_key_lands_on_the_partition_fnv1a_gives_it(key in any::<i64>(), partitions in any::<u16>()) {
        let partition = partition_of(key, partitions);
        prop_assert_eq!(partition, reference_partition(key, partitions));
        prop_assert!(partition < partitions.max(1));
    }

    #[test]
    fn an_amount_is_accepted_exactly_within_the_bounds_the_services_enforce(
        rule in prop::sample::select(AMOUNT_RULES.to_vec()),
        near_edge in any::<bool>(),
        offset in -3_i64..=3,
        anywhere in any::<i64>(),
    ) {
        let (what, min, max) = rule;
        // Half the cases sit on or just beside a bound, where an off-by-one would show.
        let amounts = if near_edge { vec![min + offset, max + offset] } else { vec![anywhere] };
        for amount in amounts {
            let accepted = whole_number_in(&serde_json::Number::from(amount), min, max);
            let expected = (min..=max).contains(&amount).then_some(amount);
            prop_assert_eq!(accepted, expected, "{} of {}", what, amount);
        }
    }

    #[test]
    fn a_charge_the_cap_allows_never_overflows(balance in 0..=MAX_BALANCE, amount in 1..=MAX_CHARGE) {
        // The api adds the charge to the balance in PostgreSQL's bigint before comparing
        // with the cap (`amount + $2 <= MAX_BALANCE`); that sum must fit for every balance
        // the cap lets exist and every amount a charge may carry.
        let after = balance.checked_add(amount);
        prop_assert!(after.is_some());
        prop_assert_eq!(after.is_some_and(|a| a <= MAX_BALANCE), amount <= MAX_BALANCE - balance);
    }

    #[test]
    fn an_order_within_bounds_has_a_total_and_a_payable_amount(
        lines in prop::collection::vec((1..=MAX_PRICE, 1..=MAX_LINE_QUANTITY), 1..=MAX_ORDER_LINES),
        percent in 1_i64..=100,
        fixed in 1..=MAX_PRICE,
    ) {
        // Every order the api accepts (lines, prices and quantities in bounds) is priced:
        // "the order total is too large" never fires inside the bounds.
        let total = order_total(lines.iter().copied());
        let exact: i128 = lines.iter().map(|&(price, quantity)| i128::from(price) * i128::from(quantity)).sum();
        prop_assert_eq!(total.map(i128::from), Some(exact));
        let total = total.unwrap();
        for discount in [Discount::Percent(percent), Discount::Fixed(fixed)] {
            let discount = discount.on(total);
            prop_assert!((0..=total).contains(&discount));
            let paid = total.checked_sub(discount);
            prop_assert!(paid.is_some_and(|p| (0..=total).contains(&p)));
        }
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

/// The partition of a key, written out from its definition rather than by calling the
/// crate: FNV-1a (64-bit; offset basis 0xcbf29ce484222325, each byte XORed in and then
/// multiplied by the prime 0x100000001b3) over the key's 8 big-endian bytes, modulo the
/// partition count, with a count of 0 read as 1.
fn reference_partition(key: i64, partitions: u16) -> u16 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = key.to_be_bytes().iter().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    });
    u16::try_from(hash % u64::from(partitions.max(1))).unwrap()
}

/// The bounds on amounts the api reads, as it applies them (`whole_number_in(raw, min, max)`):
/// (what, min, max).
const AMOUNT_RULES: [(&str, i64, i64); 4] = [
    ("a charge", 1, MAX_CHARGE),
    ("a price", 1, MAX_PRICE),
    ("a stock", 0, MAX_STOCK),
    ("a line's quantity", 1, MAX_LINE_QUANTITY),
];

#[test]
fn known_keys_stay_on_their_partitions() {
    // Computed apart from this crate (FNV-1a by hand in another language): a change of the
    // hash, the byte order or the modulo moves some of these, and with them the keys of
    // commands already in flight, whose later commands would then race on another queue.
    let pinned: [(i64, u16, u16); 12] = [
        (1, 16, 2),
        (2, 16, 15),
        (42, 16, 7),
        (1_000_000, 16, 2),
        (0, 16, 5),
        (-1, 16, 13),
        (i64::MAX, 16, 13),
        (i64::MIN, 16, 5),
        (123_456_789, 7, 0),
        (987_654_321, 1_024, 406),
        (5, 1, 0),
        (5, 0, 0),
    ];
    for (key, partitions, expected) in pinned {
        assert_eq!(
            partition_of(key, partitions),
            expected,
            "key {key} of {partitions}"
        );
        assert_eq!(
            reference_partition(key, partitions),
            expected,
            "the reference, key {key}"
        );
    }
}

#[test]
fn the_amount_bounds_are_those_of_the_contract() {
    // API.md: a charge is 1 to 10,000,000 won and a balance never passes 1,000,000,000; an
    // order has at most 50 lines. The properties above use the constants, this pins them.
    assert_eq!(MAX_CHARGE, 10_000_000);
    assert_eq!(MAX_BALANCE, 1_000_000_000);
    assert_eq!(MAX_ORDER_LINES, 50);
    // The largest order stays far from i64, so its total can never wrap.
    let largest = i128::from(MAX_PRICE) * i128::from(MAX_LINE_QUANTITY) * MAX_ORDER_LINES as i128;
    assert!(largest < i128::from(i64::MAX));
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
