//! The order rules by example, then as properties over any batch of commands: nothing is
//! reserved past its stock or a customer's limits, money adds up, and a refusal changes
//! nothing but the rejection it states.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use super::*;
use proptest::prelude::*;

const MOUSE: i64 = 1;
const PAD: i64 = 2;
const ANN: i64 = 10;
const BOB: i64 = 20;
/// Every product.
const WELCOME: i64 = 100;
/// The pad only.
const PAD_DEAL: i64 = 200;

fn at() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn context() -> PaymentContext {
    PaymentContext {
        request_id: Uuid::now_v7(),
        now: at(),
        payment_id: Uuid::now_v7(),
        event_id: Uuid::now_v7(),
    }
}

fn product(id: i64, price: i64, available: i64, max_per_customer: Option<i64>) -> Product {
    Product {
        id,
        name: format!("product {id}"),
        price,
        available,
        max_per_customer,
    }
}

fn held(user_id: i64, coupon_id: i64, discount: Discount, all_products: bool) -> HeldCoupon {
    HeldCoupon {
        id: Uuid::now_v7(),
        user_id,
        coupon_id,
        used: false,
        discount: Some(discount),
        expired: false,
        all_products,
    }
}

/// Adds a `PENDING` order of `user` with `(product, quantity)` lines, at the products' prices.
fn order(rows: &mut Rows, user_id: i64, lines: &[(i64, i64)]) -> Uuid {
    let id = Uuid::now_v7();
    rows.orders.push(Order {
        id,
        user_id,
        status: OrderStatus::Pending,
        total_amount: 0,
    });
    for &(product_id, quantity) in lines {
        let price = rows
            .products
            .iter()
            .find(|p| p.id == product_id)
            .map_or(1, |p| p.price);
        rows.lines.push(Line {
            order_id: id,
            product_id,
            quantity,
            name: format!("product {product_id}"),
            unit_price: price,
        });
    }
    id
}

fn shop() -> Rows {
    Rows {
        products: vec![product(MOUSE, 20_000, 3, None), product(PAD, 5_000, 10, Some(2))],
        balances: vec![(ANN, 50_000)],
        held: vec![
            held(ANN, WELCOME, Discount::Percent(10), true),
            held(ANN, PAD_DEAL, Discount::Fixed(3_000), false),
        ],
        applicable: vec![(PAD_DEAL, PAD)],
        max_reserved_orders: 2,
        ..Rows::default()
    }
}

fn pay(order_id: Uuid, user_id: i64, coupon_id: Option<i64>) -> OrderPay {
    OrderPay {
        order_id,
        user_id,
        coupon_id,
    }
}

#[test]
fn a_reservation_takes_every_line_and_a_payment_spends_balance_and_coupon() {
    let mut rows = shop();
    let id = order(&mut rows, ANN, &[(MOUSE, 1), (PAD, 2)]);
    let mut book = OrderBook::new(rows);

    let reserved = book.reserve(id, at()).unwrap();
    assert_eq!(reserved.total_amount, 30_000);
    assert_eq!(reserved.status, OrderStatus::Reserved);
    let paid = book.pay(&pay(id, ANN, Some(WELCOME)), context()).unwrap();
    assert_eq!((paid.paid_amount, paid.discount_amount), (27_000, 3_000));

    let changes = book.into_changes();
    assert_eq!(changes.stock[&MOUSE], StockChange { reserved: 1, sold: 1 });
    assert_eq!(changes.stock[&PAD], StockChange { reserved: 2, sold: 2 });
    assert_eq!(changes.balances, vec![(ANN, 23_000)]);
    assert_eq!(changes.ledger.len(), 1);
    assert_eq!(changes.used_coupons.len(), 1);
    assert_eq!(changes.events.len(), 1);
    assert_eq!(changes.events[0].paid_amount, 27_000);
    assert_eq!(changes.orders.len(), 1);
    assert_eq!(changes.orders[0].status, OrderStatus::Paid);
}

#[test]
fn a_restricted_coupon_discounts_only_its_products_lines() {
    let mut rows = shop();
    let id = order(&mut rows, ANN, &[(MOUSE, 1), (PAD, 1)]);
    let mut book = OrderBook::new(rows);
    book.reserve(id, at()).unwrap();
    let paid = book.pay(&pay(id, ANN, Some(PAD_DEAL)), context()).unwrap();
    // 3,000 off the pad's 5,000, nothing off the mouse.
    assert_eq!((paid.paid_amount, paid.discount_amount), (22_000, 3_000));

    let mut rows = shop();
    let mouse_only = order(&mut rows, ANN, &[(MOUSE, 1)]);
    let mut book = OrderBook::new(rows);
    book.reserve(mouse_only, at()).unwrap();
    let refusal = book
        .pay(&pay(mouse_only, ANN, Some(PAD_DEAL)), context())
        .unwrap_err();
    assert_eq!(refusal.code, ErrorCode::PaymentInvalidCoupon);
}

#[test]
fn a_short_product_rejects_the_whole_order_and_holds_nothing() {
    let mut rows = shop();
    let id = order(&mut rows, ANN, &[(PAD, 1), (MOUSE, 4)]);
    let mut book = OrderBook::new(rows);
    let refusal = book.reserve(id, at()).unwrap_err();
    assert_eq!(refusal.code, ErrorCode::OrderOutOfStock);
    assert!(
        refusal.message.contains("product 1 has 3 left"),
        "{}",
        refusal.message
    );
    let changes = book.into_changes();
    assert!(changes.stock.is_empty());
    assert_eq!(changes.orders[0].status, OrderStatus::Rejected);
    assert!(changes.orders[0].closed);
}

#[test]
fn limits_come_before_stock_and_count_what_the_batch_reserved() {
    let mut rows = shop();
    let first = order(&mut rows, ANN, &[(PAD, 2)]);
    let second = order(&mut rows, ANN, &[(PAD, 1)]);
    let third = order(&mut rows, ANN, &[(MOUSE, 1)]);
    let fourth = order(&mut rows, ANN, &[(MOUSE, 1)]);
    let fifth = order(&mut rows, ANN, &[(MOUSE, 1)]);
    let more_pads = order(&mut rows, ANN, &[(PAD, 1)]);
    let mut book = OrderBook::new(rows);
    book.reserve(first, at()).unwrap();
    // Two pads held: a third passes the product's limit.
    assert_eq!(
        book.reserve(second, at()).unwrap_err().code,
        ErrorCode::OrderLimitExceeded
    );
    book.reserve(third, at()).unwrap();
    // Two unpaid orders: the cap.
    assert_eq!(
        book.reserve(fourth, at()).unwrap_err().code,
        ErrorCode::OrderTooManyReserved
    );
    // Paying one frees a place under the cap, but not the pads: paid units stay held.
    book.pay(&pay(first, ANN, None), context()).unwrap();
    book.reserve(fifth, at()).unwrap();
    book.pay(&pay(third, ANN, None), context()).unwrap();
    assert_eq!(
        book.reserve(more_pads, at()).unwrap_err().code,
        ErrorCode::OrderLimitExceeded
    );
}

#[test]
fn a_payment_is_refused_for_another_user_a_second_time_and_without_money() {
    let mut rows = shop();
    let id = order(&mut rows, ANN, &[(MOUSE, 3)]);
    let mut book = OrderBook::new(rows);
    // Not reserved yet.
    assert_eq!(
        book.pay(&pay(id, ANN, None), context()).unwrap_err().code,
        ErrorCode::PaymentInvalidOrderStatus
    );
    book.reserve(id, at()).unwrap();
    assert_eq!(
        book.pay(&pay(id, BOB, None), context()).unwrap_err().code,
        ErrorCode::OrderUnauthorized
    );
    // 60,000 against a balance of 50,000.
    assert_eq!(
        book.pay(&pay(id, ANN, None), context()).unwrap_err().code,
        ErrorCode::PaymentInsufficientBalance
    );
    // With 10 % off it is 54,000: still short.
    let before = book.clone();
    assert!(book.pay(&pay(id, ANN, Some(WELCOME)), context()).is_err());
    assert_eq!(
        book, before,
        "a refused payment changes nothing, the coupon included"
    );
}

#[test]
fn a_renamed_or_repriced_product_is_snapshotted_and_charged_at_its_new_price() {
    let mut rows = shop();
    let id = order(&mut rows, ANN, &[(MOUSE, 1), (PAD, 1)]);
    rows.products[0].price = 21_000;
    let mut book = OrderBook::new(rows);
    assert_eq!(book.reserve(id, at()).unwrap().total_amount, 26_000);
    let changes = book.into_changes();
    assert_eq!(
        changes.snapshots,
        vec![Snapshot {
            order_id: id,
            product_id: MOUSE,
            name: "product 1".to_owned(),
            unit_price: 21_000,
        }]
    );
}

#[test]
fn a_free_order_is_paid_without_touching_the_balance() {
    let mut rows = shop();
    rows.held.push(held(BOB, WELCOME, Discount::Percent(100), true));
    let id = order(&mut rows, BOB, &[(PAD, 1)]);
    let mut book = OrderBook::new(rows);
    book.reserve(id, at()).unwrap();
    let paid = book.pay(&pay(id, BOB, Some(WELCOME)), context()).unwrap();
    assert_eq!(paid.paid_amount, 0);
    let changes = book.into_changes();
    assert!(changes.balances.is_empty() && changes.ledger.is_empty());
    assert_eq!(changes.payments.len(), 1);
}

// ---- properties ----

#[derive(Debug, Clone)]
enum Command {
    Reserve(usize),
    /// An order, a payer (usually its owner), a coupon.
    Pay(usize, usize, Option<i64>),
}

#[derive(Debug, Clone)]
struct Batch {
    rows: Rows,
    commands: Vec<Command>,
}

const USERS: [i64; 3] = [ANN, BOB, 30];

fn discount() -> impl Strategy<Value = Option<Discount>> {
    prop_oneof![
        (1_i64..=30_000).prop_map(|v| Some(Discount::Fixed(v))),
        (1_i64..=100).prop_map(|v| Some(Discount::Percent(v))),
        Just(None),
    ]
}

fn batch() -> impl Strategy<Value = Batch> {
    let products = prop::collection::vec((1_i64..=40_000, 0_i64..=6, prop::option::of(1_i64..=4)), 1..=4);
    let balances = prop::collection::vec(prop::option::of(0_i64..=120_000), USERS.len());
    let coupons = prop::collection::vec(
        (
            0..USERS.len(),
            1_i64..=3,
            discount(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        0..=5,
    );
    let orders = prop::collection::vec(
        (
            0..USERS.len(),
            prop::collection::btree_map(1_i64..=4, 1_i64..=4, 0..=3),
            // a price the api quoted that may differ from the product's
            prop::option::of(1_i64..=40_000),
        ),
        1..=8,
    );
    let held_before = prop::collection::vec(0_i64..=2, USERS.len());
    (products, balances, coupons, orders, held_before, 0_i64..=3)
        .prop_flat_map(|(products, balances, coupons, orders, held_before, cap)| {
            let n = orders.len();
            let commands = prop::collection::vec(
                prop_oneof![
                    (0..n).prop_map(Command::Reserve),
                    (0..n, 0..USERS.len(), prop::option::of(1_i64..=3))
                        .prop_map(|(o, u, c)| Command::Pay(o, u, c)),
                ],
                1..=16,
            );
            (
                Just((products, balances, coupons, orders, held_before, cap)),
                commands,
            )
        })
        .prop_map(
            |((products, balances, coupons, orders, held_before, cap), commands)| {
                let products: Vec<Product> = products
                    .into_iter()
                    .enumerate()
                    .map(|(i, (price, available, max))| product(i as i64 + 1, price, available, max))
                    .collect();
                let mut rows = Rows {
                    balances: USERS
                        .iter()
                        .zip(balances)
                        .filter_map(|(user, balance)| Some((*user, balance?)))
                        .collect(),
                    max_reserved_orders: cap,
                    ..Rows::default()
                };
                for (user, coupon, discount, used, expired, all_products) in coupons {
                    let user = USERS[user];
                    if rows
                        .held
                        .iter()
                        .any(|h| h.user_id == user && h.coupon_id == coupon)
                    {
                        continue;
                    }
                    rows.held.push(HeldCoupon {
                        id: Uuid::now_v7(),
                        user_id: user,
                        coupon_id: coupon,
                        used,
                        discount,
                        expired,
                        all_products,
                    });
                    if !all_products {
                        // A restricted coupon applies to the product of its own number.
                        rows.applicable.push((coupon, coupon));
                    }
                }
                for (user, lines, quoted) in orders {
                    let id = Uuid::now_v7();
                    rows.orders.push(Order {
                        id,
                        user_id: USERS[user],
                        status: OrderStatus::Pending,
                        total_amount: 0,
                    });
                    // Every line names a product that exists (a foreign key in the schema).
                    for (product_id, quantity) in
                        lines.into_iter().filter(|(p, _)| *p <= products.len() as i64)
                    {
                        rows.lines.push(Line {
                            order_id: id,
                            product_id,
                            quantity,
                            name: format!("product {product_id}"),
                            unit_price: quoted.unwrap_or(1),
                        });
                    }
                }
                for (user, held) in USERS.iter().zip(held_before) {
                    for p in products.iter().filter(|p| p.max_per_customer.is_some()) {
                        rows.units_held.push((*user, p.id, held));
                    }
                }
                rows.products = products;
                Batch { rows, commands }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_batch_never_oversells_passes_no_limit_and_its_money_adds_up(batch in batch()) {
        let Batch { rows, commands } = batch;
        let start = rows.clone();
        let order_ids: Vec<Uuid> = rows.orders.iter().map(|o| o.id).collect();
        let mut book = OrderBook::new(rows);
        let mut reserved_orders: HashMap<i64, i64> = HashMap::new();

        for command in &commands {
            let before = book.clone();
            match *command {
                Command::Reserve(o) => match book.reserve(order_ids[o], at()) {
                    Ok(reserved) => {
                        let unpaid = reserved_orders.entry(before.orders[&order_ids[o]].user_id).or_default();
                        *unpaid += 1;
                        // The unpaid-order cap.
                        prop_assert!(*unpaid <= start.max_reserved_orders);
                        let lines = &book.lines[&order_ids[o]];
                        let total = order_total(lines.iter().map(|l| (l.unit_price, l.quantity)));
                        prop_assert_eq!(Some(reserved.total_amount), total);
                    }
                    Err(refusal) => {
                        // Refused for the order's own reasons, it is rejected and nothing
                        // else moves; refused for its status, nothing at all moves.
                        let mut expected = before.clone();
                        if rejects_order(refusal.code) {
                            expected.move_order(order_ids[o], OrderEvent::Reject);
                            expected.changed.entry(order_ids[o]).or_default().closed = true;
                        }
                        prop_assert_eq!(&book, &expected, "{:?}", refusal);
                    }
                },
                Command::Pay(o, u, coupon) => {
                    let order = before.orders[&order_ids[o]].clone();
                    match book.pay(&pay(order.id, USERS[u], coupon), context()) {
                        Ok(paid) => {
                            prop_assert_eq!(order.user_id, USERS[u]);
                            prop_assert_eq!(order.status, OrderStatus::Reserved);
                            prop_assert!((0..=order.total_amount).contains(&paid.discount_amount));
                            prop_assert_eq!(paid.paid_amount + paid.discount_amount, order.total_amount);
                            *reserved_orders.entry(order.user_id).or_default() -= 1;
                        }
                        Err(refusal) => prop_assert_eq!(&book, &before, "{:?}", refusal),
                    }
                }
            }
        }

        let final_orders = book.orders.clone();
        let final_lines = book.lines.clone();
        let changes = book.into_changes();
        for product in &start.products {
            let change = changes.stock.get(&product.id).copied().unwrap_or_default();
            // No oversell: what the batch reserved fits in what was available.
            prop_assert!(change.reserved <= product.available, "{:?} {:?}", product, change);
            // Every order started PENDING, so what was sold was reserved by this batch.
            prop_assert!(change.sold <= change.reserved);
            let sold: i64 = final_orders
                .values()
                .filter(|o| o.status == OrderStatus::Paid)
                .flat_map(|o| final_lines[&o.id].iter())
                .filter(|l| l.product_id == product.id)
                .map(|l| l.quantity)
                .sum();
            prop_assert_eq!(change.sold, sold);
            // Per-customer limits hold, counting what each held before.
            if let Some(max) = product.max_per_customer {
                for user in USERS {
                    let before = start
                        .units_held
                        .iter()
                        .find(|(u, p, _)| *u == user && *p == product.id)
                        .map_or(0, |(_, _, held)| *held);
                    let taken: i64 = final_orders
                        .values()
                        .filter(|o| o.user_id == user && matches!(o.status, OrderStatus::Reserved | OrderStatus::Paid))
                        .flat_map(|o| final_lines[&o.id].iter())
                        .filter(|l| l.product_id == product.id)
                        .map(|l| l.quantity)
                        .sum();
                    prop_assert!(taken == 0 || before + taken <= max, "user {} product {:?}: {} + {}", user, product, before, taken);
                }
            }
        }
        // Balances: never negative, and each equals its start less its ledger.
        for (user, after) in &changes.balances {
            let start_balance = start.balances.iter().find(|(u, _)| u == user).map(|(_, b)| *b).unwrap();
            let spent: i64 = changes.ledger.iter().filter(|e| e.user_id == *user).map(|e| e.amount).sum();
            prop_assert!(*after >= 0);
            prop_assert_eq!(*after, start_balance - spent);
        }
        // One payment, one event and at most one coupon per paid order; a coupon used once.
        let paid = final_orders.values().filter(|o| o.status == OrderStatus::Paid).count();
        prop_assert_eq!(changes.payments.len(), paid);
        prop_assert_eq!(changes.events.len(), paid);
        let mut holdings: Vec<Uuid> = changes.used_coupons.iter().map(|(h, _)| *h).collect();
        holdings.sort();
        holdings.dedup();
        prop_assert_eq!(holdings.len(), changes.used_coupons.len());
        for payment in &changes.payments {
            let order = &final_orders[&payment.order_id];
            prop_assert_eq!(payment.amount + payment.discount, order.total_amount);
            let lines_total = order_total(final_lines[&order.id].iter().map(|l| (l.unit_price, l.quantity)));
            prop_assert_eq!(Some(order.total_amount), lines_total);
        }
    }
}
