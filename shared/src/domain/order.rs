//! The life of an order: which status follows which event, in one place.
//!
//! ```text
//! PENDING ──reserve──▶ RESERVED ──pay────▶ PAID
//!    │ ╲──reject──▶ REJECTED  │ ──cancel─▶ CANCELLED
//!    │                        ╰──expire─▶ EXPIRED
//!    ╰──cancel──▶ CANCELLED
//! ```
//! Every other status is closed: nothing happens to it any more. The SQL that moves an
//! order checks the same rule under the order's row lock; this type is what the code asks
//! before it tries.

/// An order's status, as stored and as the contract names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    Pending,
    Reserved,
    Paid,
    Rejected,
    Cancelled,
    Expired,
}

/// What can happen to an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderEvent {
    /// A worker reserved every line.
    Reserve,
    /// A worker could not reserve (out of stock), or the api withdrew its creation.
    Reject,
    /// A worker settled its payment.
    Pay,
    /// Its owner cancelled it.
    Cancel,
    /// Its reservation ran out before it was paid.
    Expire,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 6] = [
        OrderStatus::Pending,
        OrderStatus::Reserved,
        OrderStatus::Paid,
        OrderStatus::Rejected,
        OrderStatus::Cancelled,
        OrderStatus::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::Reserved => "RESERVED",
            OrderStatus::Paid => "PAID",
            OrderStatus::Rejected => "REJECTED",
            OrderStatus::Cancelled => "CANCELLED",
            OrderStatus::Expired => "EXPIRED",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    /// The status after `event`, or `None` when `event` cannot happen to this order.
    pub fn after(self, event: OrderEvent) -> Option<OrderStatus> {
        use OrderEvent as E;
        use OrderStatus as S;
        match (self, event) {
            (S::Pending, E::Reserve) => Some(S::Reserved),
            (S::Pending, E::Reject) => Some(S::Rejected),
            (S::Pending | S::Reserved, E::Cancel) => Some(S::Cancelled),
            (S::Reserved, E::Pay) => Some(S::Paid),
            (S::Reserved, E::Expire) => Some(S::Expired),
            _ => None,
        }
    }

    /// True once nothing can happen to the order any more.
    pub fn is_closed(self) -> bool {
        EVENTS.iter().all(|e| self.after(*e).is_none())
    }

    /// Whether the api accepts a payment command for it: any order that has not ended. A
    /// `PENDING` one is paid after its creation, which is settled first in the same partition.
    pub fn accepts_payment(self) -> bool {
        !self.is_closed()
    }

    /// Whether its units are held as `reserved` stock.
    pub fn holds_stock(self) -> bool {
        self == OrderStatus::Reserved
    }
}

/// Every event, for callers that ask about all of them.
pub const EVENTS: [OrderEvent; 5] = [
    OrderEvent::Reserve,
    OrderEvent::Reject,
    OrderEvent::Pay,
    OrderEvent::Cancel,
    OrderEvent::Expire,
];
