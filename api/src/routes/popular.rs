//! Popular products: `GET /products/popular`, served from the batch's daily sales rollup
//! and ranking snapshot (never from orders), and `POST /admin/batch/popular-products/run`,
//! which computes them now.
//!
//! The window is anchored on the newest snapshot's day D (the UTC day the batch ran for):
//! `from` = D - days, `to` = D - 1, both included, as `YYYY-MM-DD`. Anchoring every
//! filter on the same day keeps the default answer (the snapshot) and any other (summed
//! from the rollup) consistent with each other, and only ever covers days the batch has
//! rolled up completely. Before the first run the answer is an empty list over the days
//! before today, with `computedAt` null.
//!
//! Answers are cached per filter in this process and kept while the newest snapshot stays
//! the same. Whether it changed is asked of PostgreSQL (one index lookup) at most every
//! [`CHECK_INTERVAL`], so a new snapshot is served within that time and a burst of reads
//! costs the database almost nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Extension;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use shared::domain::error::ErrorCode;
use shared::domain::popular::{Filter, Ranking, SnapshotVersion};
use sqlx::PgPool;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Result};
use crate::http::extract::Query;
use crate::routes::openapi::ErrorSchema;
use crate::AppState;

/// Longest a new snapshot goes unnoticed by the cache.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(popular_products))
        // One cache per built app: tests run several apps, each on its own database.
        .route_layer(Extension(Arc::new(PopularCache::default())))
}

/// The admin part, mounted behind the admin token by [`crate::routes::admin`].
pub fn admin_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(run_popular_products))
}

/// The raw query; parsed by [`Filter::parse`] so that bad values get the contract's error.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PopularQuery {
    /// Whole days before the ranking's day, 1 to 30 (default 3).
    days: Option<String>,
    /// Products, 1 to 50 (default 5).
    limit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PopularProducts {
    /// First day of the window (UTC, included), `YYYY-MM-DD`.
    from: NaiveDate,
    /// Last day of the window (UTC, included): the day before the ranking's day.
    to: NaiveDate,
    /// When the batch computed the ranking; null before its first run.
    computed_at: Option<DateTime<Utc>>,
    items: Vec<PopularProduct>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PopularProduct {
    /// 1 for the best seller; equal quantities rank the lower productId first.
    rank: i32,
    product_id: i64,
    name: String,
    /// The product's current price.
    price: i64,
    /// Units sold in paid orders over the window.
    sold_quantity: i64,
}

impl From<&Ranking> for PopularProducts {
    fn from(ranking: &Ranking) -> Self {
        Self {
            from: ranking.window.from,
            to: ranking.window.to,
            computed_at: ranking.computed_at(),
            items: ranking
                .items
                .iter()
                .map(|p| PopularProduct {
                    rank: p.rank,
                    product_id: p.product_id,
                    name: p.name.clone(),
                    price: p.price,
                    sold_quantity: p.sold_quantity,
                })
                .collect(),
        }
    }
}

fn invalid_filter(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::PopularInvalidFilter, message)
}

/// The best-selling products over the whole days before the ranking's day.
#[utoipa::path(
    get, path = "/products/popular", tag = "products",
    params(PopularQuery),
    responses(
        (status = 200, body = PopularProducts),
        (status = 400, body = ErrorSchema, description = "ERR_POPULAR_INVALID_FILTER"),
    )
)]
async fn popular_products(
    State(state): State<AppState>,
    Extension(cache): Extension<Arc<PopularCache>>,
    query: std::result::Result<Query<PopularQuery>, ApiError>,
) -> Result<axum::Json<PopularProducts>> {
    // A query that does not even deserialize (a parameter given twice) is a bad filter too.
    let Query(query) = query.map_err(|_| invalid_filter("give days and limit at most once each"))?;
    let filter = Filter::parse(query.days.as_deref(), query.limit.as_deref())
        .map_err(|e| invalid_filter(e.to_string()))?;
    let answer = cache.answer(&state.db, filter, Utc::now().date_naive()).await?;
    Ok(axum::Json(answer))
}

/// Runs the sales rollup and the popular-products ranking now (as of today, UTC) and
/// answers the ranking, as `GET /products/popular` will with its defaults.
#[utoipa::path(
    post, path = "/admin/batch/popular-products/run", tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, body = PopularProducts),
        (status = 401, body = ErrorSchema, description = "ERR_UNAUTHORIZED"),
    )
)]
async fn run_popular_products(State(state): State<AppState>) -> Result<axum::Json<PopularProducts>> {
    let started = Utc::now();
    let refreshed = shared::store::popular::refresh(&state.db, started.date_naive()).await;
    record_run(&state.db, started, &refreshed).await;
    let refreshed = refreshed?;
    tracing::info!(
        as_of = %started.date_naive(),
        rollup_rows = refreshed.rollup_rows,
        "popular products computed on demand"
    );
    Ok(axum::Json(PopularProducts::from(&refreshed.ranking)))
}

/// Records an on-demand run in `job_runs`, next to the batch's runs. A failure to record is
/// logged only: the ranking itself is computed and committed.
async fn record_run(
    db: &PgPool,
    started: DateTime<Utc>,
    result: &std::result::Result<shared::domain::popular::Refreshed, sqlx::Error>,
) {
    let (outcome, rows, error) = match result {
        Ok(r) => (
            "SUCCEEDED",
            Some(i64::try_from(r.rollup_rows).unwrap_or(i64::MAX)),
            None,
        ),
        Err(e) => ("FAILED", None, Some(e.to_string())),
    };
    let recorded = sqlx::query!(
        "INSERT INTO job_runs (job, period, trigger, outcome, runner, started_at, finished_at, rows, error)
         VALUES ($1, $2, 'ADMIN', $3, $4, $2, now(), $5, $6)",
        shared::domain::popular::JOB,
        started,
        outcome,
        format!("api-{}", std::process::id()),
        rows,
        error,
    )
    .execute(db)
    .await;
    if let Err(e) = recorded {
        tracing::warn!(error = %e, "cannot record the on-demand popular-products run");
    }
}

/// Answers per filter, valid while the newest snapshot is the one they were read from.
#[derive(Default)]
struct PopularCache {
    /// The newest snapshot as last seen, when, and on which day (the answer before any
    /// snapshot depends on the day). An async mutex: concurrent requests wait for one
    /// check instead of each asking PostgreSQL.
    seen: tokio::sync::Mutex<Option<Seen>>,
    answers: Mutex<HashMap<Filter, Cached>>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    at: Instant,
    today: NaiveDate,
    version: Option<SnapshotVersion>,
}

#[derive(Debug, Clone)]
struct Cached {
    today: NaiveDate,
    version: Option<SnapshotVersion>,
    answer: PopularProducts,
}

impl PopularCache {
    async fn answer(&self, db: &PgPool, filter: Filter, today: NaiveDate) -> Result<PopularProducts> {
        let version = self.newest_version(db, today).await?;
        let hit = self
            .answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&filter)
            .filter(|c| c.version == version && c.today == today)
            .map(|c| c.answer.clone());
        if let Some(answer) = hit {
            return Ok(answer);
        }
        let ranking = shared::store::popular::read(db, filter, today).await?;
        let answer = PopularProducts::from(&ranking);
        // Kept under the version the read itself saw, which may be newer than `version`;
        // answers of older versions can never be served again, so they go.
        let mut answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        answers.retain(|_, c| c.version == ranking.version && c.today == today);
        answers.insert(
            filter,
            Cached {
                today,
                version: ranking.version,
                answer: answer.clone(),
            },
        );
        Ok(answer)
    }

    /// The newest snapshot's version, asked of PostgreSQL at most every [`CHECK_INTERVAL`].
    async fn newest_version(&self, db: &PgPool, today: NaiveDate) -> Result<Option<SnapshotVersion>> {
        let mut seen = self.seen.lock().await;
        match *seen {
            Some(s) if s.today == today && s.at.elapsed() < CHECK_INTERVAL => Ok(s.version),
            _ => {
                let version = shared::store::popular::latest_version(db).await?;
                *seen = Some(Seen {
                    at: Instant::now(),
                    today,
                    version,
                });
                Ok(version)
            }
        }
    }
}
