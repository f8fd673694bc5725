//! Cursor pagination: `?limit=&cursor=`, answered with `nextCursor` while more items follow.
//!
//! A cursor is the key of the last item of the previous page. Keyset pagination stays fast
//! on deep pages and never skips or repeats an item when rows are inserted between calls.

use serde::Deserialize;
use shared::domain::error::ErrorCode;
use utoipa::IntoParams;

use crate::error::ApiError;

pub const DEFAULT_LIMIT: i64 = 20;
pub const MAX_LIMIT: i64 = 100;

/// The raw query; parsed by [`PageQuery::parse`] so that bad values get the contract's error.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page, 1 to 100 (default 20).
    limit: Option<String>,
    /// `nextCursor` of the previous page.
    cursor: Option<String>,
}

/// A validated page request over items keyed by a positive integer id.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub limit: i64,
    /// The key after which (in the listing's order) this page starts.
    pub after: Option<i64>,
}

impl PageQuery {
    /// A page over items keyed by a positive integer.
    pub fn parse(&self) -> Result<Page, ApiError> {
        let (limit, after) = self.parse_with(|raw| raw.parse::<i64>().ok().filter(|c| *c > 0))?;
        Ok(Page { limit, after })
    }

    /// The limit and the cursor, read by `cursor` (which rejects what it did not give out).
    pub fn parse_with<C>(&self, cursor: impl Fn(&str) -> Option<C>) -> Result<(i64, Option<C>), ApiError> {
        let limit = match self.limit.as_deref() {
            None => DEFAULT_LIMIT,
            Some(raw) => raw
                .parse::<i64>()
                .ok()
                .filter(|l| (1..=MAX_LIMIT).contains(l))
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::InvalidRequest,
                        "limit must be an integer from 1 to 100",
                    )
                })?,
        };
        let after = match self.cursor.as_deref() {
            None | Some("") => None,
            Some(raw) => Some(cursor(raw).ok_or_else(|| {
                ApiError::new(ErrorCode::InvalidRequest, "cursor is not one this API gave out")
            })?),
        };
        Ok((limit, after))
    }
}

/// Splits one extra fetched row off a page: when the query asked for `limit + 1` rows and
/// got them, more follow, and the last kept item's key is the next cursor. Any key type
/// that prints as its cursor will do (integer ids, UUIDs).
pub fn finish_page<T, K: ToString>(
    mut rows: Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> K,
) -> (Vec<T>, Option<String>) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if rows.len() > limit {
        rows.truncate(limit);
        let next = rows.last().map(|last| key(last).to_string());
        (rows, next)
    } else {
        (rows, None)
    }
}
