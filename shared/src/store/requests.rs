//! Requests in PostgreSQL: how the domain's statuses and kinds are stored (as `TEXT`: those
//! of requests and orders, and a coupon's discount type and a ledger entry's kind), and the
//! one way a request fails without being settled.

use uuid::Uuid;

use crate::domain::command::{RequestKind, RequestStatus};
use crate::domain::money::{DiscountType, LedgerKind};
use crate::domain::order::OrderStatus;

/// Maps an enum stored in a `TEXT` column to and from that column, through its `as_str`
/// and `parse`, so statuses and kinds are bound and read as types, never as literals.
///
/// Written out rather than `#[derive(sqlx::Type)]` with `type_name = "text"`: sqlx treats
/// such a type as one it must look up by name, which costs a round trip to PostgreSQL on
/// every new connection; this one is plain `TEXT` (and `TEXT[]` for arrays) to sqlx.
macro_rules! stored_as_text {
    ($type:ty) => {
        impl sqlx::Type<sqlx::Postgres> for $type {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <str as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl sqlx::postgres::PgHasArrayType for $type {
            fn array_type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }

            fn array_compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::postgres::PgHasArrayType>::array_compatible(ty)
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $type {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.as_str(), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $type {
            fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                let raw = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                <$type>::parse(raw).ok_or_else(|| format!("{raw:?} is not a {}", stringify!($type)).into())
            }
        }
    };
}

stored_as_text!(RequestKind);
stored_as_text!(RequestStatus);
stored_as_text!(OrderStatus);
stored_as_text!(DiscountType);
stored_as_text!(LedgerKind);

/// Fails a request that is still `PENDING` with `error`, and rejects the order it was
/// creating, if any (a `PENDING` order holds no stock, so nothing is released). Waits for
/// the row lock of a worker settling the request right now: if that worker commits first,
/// the request is no longer `PENDING` and nothing changes. True when it was failed here.
///
/// Both ways a request fails without being settled go through here: its client cancelling
/// it (`DELETE /requests/{requestId}`), and a worker parking a dead letter.
pub async fn fail_pending(
    conn: &mut sqlx::PgConnection,
    request_id: Uuid,
    error: &crate::domain::error::ErrorBody,
) -> Result<bool, sqlx::Error> {
    let failed = sqlx::query!(
        "UPDATE requests SET status = $3, error = $2, completed_at = now()
         WHERE id = $1 AND status = $4",
        request_id,
        serde_json::to_value(error).unwrap_or_default(),
        RequestStatus::Failed as _,
        RequestStatus::Pending as _,
    )
    .execute(&mut *conn)
    .await?;
    if failed.rows_affected() == 0 {
        return Ok(false);
    }
    // `'PENDING'` stays written out: it is what lets the planner use the partial index
    // `orders_pending_by_request`, which a bound status would not under a generic plan.
    sqlx::query!(
        "UPDATE orders SET status = $2, closed_at = now()
         WHERE create_request_id = $1 AND status = 'PENDING'",
        request_id,
        OrderStatus::Rejected as _,
    )
    .execute(&mut *conn)
    .await?;
    Ok(true)
}
