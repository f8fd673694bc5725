//! What the settlement of a batch asks of a command family, and what it hands it.
//!
//! [`crate::settling::settle`] runs every batch the same way, in three round trips to PostgreSQL:
//!
//! 1. **Lock and fence**: one simple-protocol message opens the transaction, checks the
//!    partition lease, locks the batch's request rows ([`CommandFamily::lock_requests`])
//!    and locks and reads what the family's rules need ([`CommandFamily::lock_state`]).
//! 2. **Decide and write**: the family decides the batch in memory
//!    ([`CommandFamily::decide`]); one statement then writes its effects (its
//!    [`CommandFamily::write_ctes`]) and every request's outcome.
//! 3. **Commit**: the changes to rows that many partitions share (a product a crowd
//!    orders: [`Decided::at_commit`]) and `COMMIT`, in one message, then the settled-batch
//!    notice.
//!
//! Rows that many partitions share are read without a lock in the first round trip
//! ([`SharedRows::AtCommit`]) and changed relatively (`reserved = reserved + n`) in the
//! message that commits, so a batch holds such a row only from that statement to the end
//! of its commit, never across a round trip: batches of other partitions queue on it for a
//! statement and a WAL flush, not for a whole settlement. What was decided from the unlocked
//! read stands only if it is still true at commit: the family refuses nothing for a reason
//! the shared rows gave (it asks to be settled again with them locked:
//! [`SettleError::SharedRowsMoved`]), and the schema's constraints fail a commit whose
//! relative change no longer fits (then the same). A batch settled again takes the shared
//! rows locked in its first round trip ([`SharedRows::Locked`]), as every other row.
//!
//! A family is one implementation of [`CommandFamily`]; the settlement core never names
//! one. This module imports neither family, so they import it without a circle.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use shared::domain::command::Family;
use shared::domain::command::{RequestKind, RequestResult, RequestStatus};
use shared::domain::error::ErrorBody;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::FromRow;
use uuid::Uuid;

/// Why a settlement did not commit.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error("the partition lease was lost")]
    LeaseLost,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("request {id} cannot be settled: {reason}")]
    Unsettleable { id: Uuid, reason: String },
    #[error("no settlement is known for the {0} family")]
    UnknownFamily(&'static str),
    /// Read unlocked, a shared row (a product's stock) no longer allows what was decided, or
    /// a refusal rests on it: settle the batch again with the shared rows locked.
    #[error("a row shared by many partitions changed since it was read; settling again with it locked")]
    SharedRowsMoved,
}

/// How a batch takes the rows that many partitions share (see the module's comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedRows {
    /// Read without a lock, changed relatively in the message that commits.
    AtCommit,
    /// Locked in the first round trip, like every other row: after
    /// [`SettleError::SharedRowsMoved`].
    Locked,
}

/// A request that is still `PENDING`, as read under its row lock.
#[derive(Debug, Clone)]
pub struct PendingRequest {
    pub id: Uuid,
    pub kind: RequestKind,
    pub payload: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// A request row as the lock statement returns it.
#[derive(Debug, sqlx::FromRow)]
pub struct RequestRow {
    pub id: Uuid,
    pub kind: RequestKind,
    pub payload: serde_json::Value,
    pub status: RequestStatus,
    pub created_at: DateTime<Utc>,
}

impl From<RequestRow> for PendingRequest {
    fn from(row: RequestRow) -> Self {
        Self {
            id: row.id,
            kind: row.kind,
            payload: row.payload,
            created_at: row.created_at,
        }
    }
}

/// How the family's rules settled one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Succeeded(RequestResult),
    Failed(ErrorBody),
}

impl Decision {
    pub fn status(&self) -> RequestStatus {
        match self {
            Decision::Succeeded(_) => RequestStatus::Succeeded,
            Decision::Failed(_) => RequestStatus::Failed,
        }
    }
}

/// Adds a family's write parameters to the write statement, after the core's own.
pub type BindWrites = Box<dyn FnOnce(&mut PgArguments) -> Result<(), sqlx::error::BoxDynError> + Send>;

/// What a family decided for a batch, and what that writes.
pub struct Decided {
    /// One per request, in the order the requests were given.
    pub decisions: Vec<Decision>,
    /// The parameters of the family's [`CommandFamily::write_ctes`], from
    /// [`FIRST_FAMILY_PARAMETER`] on, in their order.
    pub writes: BindWrites,
    /// Whether the writes put events in the outbox (the relay is then woken after commit).
    pub wrote_events: bool,
    /// Simple-protocol statements sent with `COMMIT`, before it: the relative changes to
    /// the shared rows, each row locked in id order first. Only integers of this code are
    /// spliced into them.
    pub at_commit: Vec<String>,
}

/// The number of the first parameter a family's write CTEs may use: the ones before it
/// carry the outcomes (see [`crate::settling::settle`]).
pub const FIRST_FAMILY_PARAMETER: usize = 5;

/// The result sets of [`CommandFamily::lock_state`], one per statement, in order.
pub struct LockedState {
    sets: std::vec::IntoIter<Vec<PgRow>>,
}

impl LockedState {
    pub fn new(sets: Vec<Vec<PgRow>>) -> Self {
        Self {
            sets: sets.into_iter(),
        }
    }

    /// The rows of the next statement, read as `T`.
    pub fn rows<T: for<'r> FromRow<'r, PgRow>>(&mut self) -> Result<Vec<T>, SettleError> {
        let rows = self.sets.next().ok_or_else(|| {
            SettleError::Database(sqlx::Error::Protocol(
                "a lock statement returned no result".to_owned(),
            ))
        })?;
        rows.iter()
            .map(|row| T::from_row(row))
            .collect::<Result<_, _>>()
            .map_err(SettleError::Database)
    }
}

/// A command family's part in settling its batches.
pub trait CommandFamily: Send + Sync {
    /// One `SELECT` that locks, by id and in id order, the request rows of the batch `ids`
    /// (an SQL literal, see [`uuid_array`]), and any other request that must be settled
    /// with them, returning the columns of [`RequestRow`].
    fn lock_requests(&self, ids: &str) -> String {
        // dynamic: sent with `BEGIN` and the fence as one message, which the macros cannot build.
        format!(
            "SELECT id, kind, payload, status, created_at FROM requests
             WHERE id = ANY({ids}) ORDER BY id FOR NO KEY UPDATE"
        )
    }

    /// Statements run right after [`Self::lock_requests`], in the same round trip, that
    /// lock (in the global lock order) and read what the decisions need. They may select
    /// the batch's request rows by `ids` again; they are locked already. With
    /// [`SharedRows::AtCommit`] the rows many partitions share are read without a lock.
    fn lock_state(&self, ids: &str, shared: SharedRows) -> Vec<String>;

    /// The requests in the order they must be settled: `pending` is the batch's in broker
    /// order, `beside` those [`Self::lock_requests`] locked beside the batch, still pending.
    fn settling_order(
        &self,
        pending: Vec<PendingRequest>,
        _beside: Vec<PendingRequest>,
    ) -> Vec<PendingRequest> {
        pending
    }

    /// Decides `requests` in order from what [`Self::lock_state`] read, without I/O.
    /// `now` is the transaction's `now()`, for whatever the decisions stamp. With
    /// [`SharedRows::AtCommit`], a refusal that rests on a shared row read unlocked is
    /// [`SettleError::SharedRowsMoved`] instead.
    fn decide(
        &self,
        requests: &[PendingRequest],
        state: LockedState,
        now: DateTime<Utc>,
        shared: SharedRows,
    ) -> Result<Decided, SettleError>;

    /// The data-modifying CTEs of the write statement (`name AS (...)`, comma-separated),
    /// using parameters from [`FIRST_FAMILY_PARAMETER`] on. Always the same text, so the
    /// statement is prepared once per connection.
    fn write_ctes(&self) -> &'static str;
}

/// The family of each queue, and the write statement composed for it: built once at start.
#[derive(Clone, Default)]
pub struct Families {
    table: HashMap<Family, (Arc<dyn CommandFamily>, Arc<str>)>,
}

impl Families {
    /// Adds `family`'s settlement; `outcomes` composes its write statement from its CTEs.
    pub fn with(
        mut self,
        family: Family,
        settlement: Arc<dyn CommandFamily>,
        outcomes: impl Fn(&str) -> String,
    ) -> Self {
        let statement = outcomes(settlement.write_ctes()).into();
        self.table.insert(family, (settlement, statement));
        self
    }

    /// The settlement of `family` and its write statement.
    pub fn of(&self, family: Family) -> Result<(Arc<dyn CommandFamily>, Arc<str>), SettleError> {
        self.table
            .get(&family)
            .cloned()
            .ok_or(SettleError::UnknownFamily(family.as_str()))
    }
}

/// `ids` as an SQL literal of type `uuid[]`.
///
/// The lock statement travels with `BEGIN` in one simple-protocol message (so opening the
/// transaction costs no round trip of its own), and that protocol takes no parameters.
/// Only typed values are spliced: a `Uuid` prints as hex digits and dashes, nothing else.
pub fn uuid_array(ids: &[Uuid]) -> String {
    let mut literal = String::with_capacity(12 + ids.len() * 37);
    literal.push_str("'{");
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            literal.push(',');
        }
        let _ = write!(literal, "{id}");
    }
    literal.push_str("}'::uuid[]");
    literal
}

/// A stored name (a status, a kind, a family) as an SQL string literal, for the
/// simple-protocol lock statement. Names are `&'static str` of this code, never input.
pub fn text(name: &'static str) -> String {
    debug_assert!(!name.contains('\''));
    format!("'{name}'")
}

/// A field of a request's payload (`r.payload`) as a `bigint`, or NULL when it is not a
/// plain positive integer: a payload no worker can read is refused by the family's rules
/// in memory, not by a failed cast that would abort the batch's lock statement.
pub fn payload_bigint(field: &'static str) -> String {
    format!("CASE WHEN r.payload->>'{field}' ~ '^[0-9]{{1,18}}$' THEN (r.payload->>'{field}')::bigint END")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uuid_array_literal_holds_the_ids_and_nothing_else() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(uuid_array(&[a, b]), format!("'{{{a},{b}}}'::uuid[]"));
        assert_eq!(uuid_array(&[]), "'{}'::uuid[]");
    }
}
