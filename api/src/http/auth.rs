//! Who is calling.
//!
//! Customers send `Authorization: Bearer <token>`; [`Caller`] is the one extractor that
//! checks it, so a handler that acts for a user cannot forget to: it takes a `Caller`, and
//! [`Caller::act_for`] refuses a `userId` of anyone else. A token is looked up by its hash
//! once and then believed for `TOKEN_CACHE_TTL_MS` (a few seconds) from a cache in this
//! process, so an authenticated request costs no database round trip in steady state and
//! a revoked token is refused by every replica within that time (at once by the replica
//! that revoked it). Tokens not in the cache are looked up many per statement: in a flash
//! sale every customer's first request is such a miss, and one lookup each would add a
//! round trip to every request of the burst.
//!
//! Tokens expire (`TOKEN_TTL_DAYS`): an expired token is looked up as an unknown one. When
//! each token was last used is kept in memory and written in bulk once a minute
//! ([`Authenticator::record_uses`]): one statement per minute per process, never a write per
//! request.
//!
//! The admin token is compared as SHA-256 digests in constant time: neither its bytes nor
//! its length can be learned from response times.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use chrono::{DateTime, Utc};
use moka::sync::Cache;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use shared::domain::error::ErrorCode;
use shared::domain::identity::{self, TokenHash};
use shared::domain::ids::UserId;
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::batched::Batched;
use crate::config::TokenPolicy;
use crate::error::{ApiError, Result};
use crate::http::limits::RateLimits;

/// Most tokens one process keeps verified at once; the least recently used go first.
const MAX_CACHED_TOKENS: u64 = 200_000;

/// The user a request acts for, proven by its bearer token: the api's one answer to "is this
/// user registered" (a token belongs to a registered user, and users are never deleted), so
/// the checks of the routes that act for a user do not ask PostgreSQL again.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    user: UserId,
    token: TokenHash,
}

impl Caller {
    pub fn user(&self) -> UserId {
        self.user
    }

    /// The hash of the token this request was sent with.
    pub fn token(&self) -> TokenHash {
        self.token
    }

    /// The `userId` of a path, which must be the caller: `malformed()` (the route's 400)
    /// when it does not parse, 403 when it is another user.
    pub fn own_path_user(&self, raw: &str, malformed: fn() -> ApiError) -> Result<UserId> {
        let user = UserId::parse(raw).ok_or_else(malformed)?;
        self.act_for(user)?;
        Ok(user)
    }

    /// `403 ERR_FORBIDDEN` unless `user` (from the path or the body) is the caller.
    pub fn act_for(&self, user: UserId) -> Result<()> {
        if user == self.user {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::Forbidden,
                "this token cannot act for another user",
            ))
        }
    }
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    Arc<Authenticator>: FromRef<S>,
    Arc<RateLimits>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        let Some(token) = bearer_token(&parts.headers) else {
            return Err(unauthorized("this route needs Authorization: Bearer <token>"));
        };
        let client = Arc::<RateLimits>::from_ref(state).client_address(parts);
        Arc::<Authenticator>::from_ref(state).verify(token, client).await
    }
}

/// The token of `Authorization: Bearer <token>`, if the header has that form.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(ErrorCode::Unauthorized, message)
}

/// Verifies customer tokens and the admin token.
pub struct Authenticator {
    /// Looks up the tokens the cache does not hold, many per statement: each with the
    /// moment the statement that read it started, which is how old the answer may be.
    lookups: Batched<TokenHash, (Option<UserId>, Instant)>,
    /// What a token's hash was found to be, and when. Believed for `fresh_for`; kept
    /// longer ([`REMEMBER_VALID`]) only so that a token that was valid may still be looked
    /// up from an address blocked for invalid tokens: a customer who shares an address with
    /// an attacker (one NAT) is not locked out.
    verified: Cache<TokenHash, Verified>,
    /// How long a verification is believed (`TOKEN_CACHE_TTL_MS`).
    fresh_for: Duration,
    /// Client addresses that presented too many invalid tokens, until when: their unknown
    /// tokens are refused without a lookup.
    blocked: Cache<IpAddr, Instant>,
    limits: Arc<RateLimits>,
    admin_digest: [u8; 32],
    /// When each token verified here was last used, since the last write of them: written
    /// in bulk by [`Authenticator::record_uses`], so that a request costs no write.
    uses: Mutex<HashMap<TokenHash, DateTime<Utc>>>,
    db: PgPool,
}

/// A token's verification: its user (`None`: unknown or revoked), and when it was read.
#[derive(Debug, Clone, Copy)]
struct Verified {
    user: Option<UserId>,
    at: Instant,
}

/// How long a token found valid is remembered as once valid (see [`Authenticator`]).
const REMEMBER_VALID: Duration = Duration::from_secs(600);

impl Authenticator {
    pub fn new(
        db: PgPool,
        ttl: Duration,
        limits: Arc<RateLimits>,
        admin_token: &secrecy::SecretString,
    ) -> Self {
        let lookups = {
            let db = db.clone();
            Batched::start(
                MAX_LOOKUPS_PER_STATEMENT,
                "api_token_lookup_batch_size",
                move |hashes| look_up(db.clone(), hashes),
            )
        };
        Self {
            lookups,
            verified: Cache::builder()
                .max_capacity(MAX_CACHED_TOKENS)
                .time_to_live(REMEMBER_VALID.max(ttl))
                .build(),
            fresh_for: ttl,
            blocked: Cache::builder()
                .max_capacity(MAX_CACHED_TOKENS)
                .time_to_live(Duration::from_secs(60))
                .build(),
            limits,
            admin_digest: Sha256::digest(admin_token.expose_secret().as_bytes()).into(),
            uses: Mutex::default(),
            db,
        }
    }

    /// Notes that `token` was used now, for the next bulk write.
    fn note_use(&self, token: TokenHash) {
        let mut uses = self.uses.lock().unwrap_or_else(PoisonError::into_inner);
        uses.insert(token, Utc::now());
    }

    /// When `token` was last used here since the last write, if it was.
    pub fn unrecorded_use(&self, token: &TokenHash) -> Option<DateTime<Utc>> {
        let uses = self.uses.lock().unwrap_or_else(PoisonError::into_inner);
        uses.get(token).copied()
    }

    /// Writes the uses of tokens noted since the last time, in one statement, `every`
    /// (`TOKEN_LAST_USED_WRITE_MS`, a minute) until `stop`, and once more then.
    pub fn record_uses(
        self: &Arc<Self>,
        every: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let auth = Arc::clone(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(every);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let stopping = tokio::select! {
                    _ = every.tick() => false,
                    () = stop.cancelled() => true,
                };
                if let Err(e) = auth.write_uses().await {
                    // Kept for the next attempt: a lost minute of uses is no harm.
                    tracing::debug!(error = %e, "cannot record when tokens were last used");
                }
                if stopping {
                    return;
                }
            }
        })
    }

    async fn write_uses(&self) -> sqlx::Result<()> {
        let taken = std::mem::take(&mut *self.uses.lock().unwrap_or_else(PoisonError::into_inner));
        if taken.is_empty() {
            return Ok(());
        }
        let (hashes, times): (Vec<Vec<u8>>, Vec<DateTime<Utc>>) =
            taken.iter().map(|(hash, at)| (hash.to_vec(), *at)).unzip();
        let written = sqlx::query!(
            "UPDATE user_tokens t SET last_used_at = GREATEST(t.last_used_at, u.at)
               FROM UNNEST($1::bytea[], $2::timestamptz[]) AS u(hash, at)
              WHERE t.token_hash = u.hash",
            &hashes,
            &times,
        )
        .execute(&self.db)
        .await;
        if written.is_err() {
            // Put back, unless a newer use was noted meanwhile.
            let mut uses = self.uses.lock().unwrap_or_else(PoisonError::into_inner);
            for (hash, at) in taken {
                uses.entry(hash).or_insert(at);
            }
        }
        written.map(|_| ())
    }

    /// The caller behind `token`, sent from `client`.
    async fn verify(&self, token: &str, client: IpAddr) -> Result<Caller> {
        if !identity::is_well_formed(token) {
            return Err(self.refuse(client));
        }
        let hash = identity::hash_token(token);
        let known = self.verified.get(&hash);
        match known {
            Some(Verified { user, at }) if at.elapsed() < self.fresh_for => {
                return match user {
                    Some(user) => {
                        self.note_use(hash);
                        Ok(Caller { user, token: hash })
                    }
                    None => Err(self.refuse(client)),
                };
            }
            _ => {}
        }
        let once_valid = known.is_some_and(|k| k.user.is_some());
        if let Some(until) = self.blocked.get(&client) {
            let wait = until.checked_duration_since(Instant::now());
            if let Some(wait) = wait.filter(|_| !once_valid) {
                return Err(ApiError::RateLimited(wait));
            }
        }
        let user = self.look_up_and_remember(hash).await?;
        match user {
            Some(user) => {
                self.note_use(hash);
                Ok(Caller { user, token: hash })
            }
            None => Err(self.refuse(client)),
        }
    }

    /// Whether the token `hash`, valid when a request was sent with it, still is: what a
    /// long answer (a request stream) asks now and then, so that it ends once its token is
    /// revoked or expires. Believed from the cache like any request's token (so a
    /// revocation on another replica is seen within `TOKEN_CACHE_TTL_MS`, on this one at
    /// once); else looked up, with the other lookups of the moment.
    pub async fn still_valid(&self, hash: TokenHash) -> Result<bool> {
        if let Some(Verified { user, at }) = self.verified.get(&hash) {
            if at.elapsed() < self.fresh_for {
                return Ok(user.is_some());
            }
        }
        Ok(self.look_up_and_remember(hash).await?.is_some())
    }

    /// Looks `hash` up and keeps the answer in the cache: its user, if it is valid.
    async fn look_up_and_remember(&self, hash: TokenHash) -> Result<Option<UserId>> {
        let (user, read_at) = self.look_up(hash).await?;
        // Believed from when it was read, not from when the answer came back (a slow
        // statement must not stretch the time a revoked token is accepted), and never over
        // something newer: a revocation here while the lookup ran stays in force.
        let read = Verified { user, at: read_at };
        self.verified.entry(hash).and_compute_with(|cached| match cached {
            Some(entry) if entry.value().at >= read_at => moka::ops::compute::Op::Nop,
            _ => moka::ops::compute::Op::Put(read),
        });
        Ok(user)
    }

    /// The user of the valid token `hash`, from PostgreSQL (with other lookups of the
    /// moment), and when it was read.
    async fn look_up(&self, hash: TokenHash) -> Result<(Option<UserId>, Instant)> {
        Ok(self.lookups.read(hash).await?)
    }

    /// Counts an invalid token from `client`: 401, or 429 once it sent too many (and then
    /// its unknown tokens are refused without a lookup until it may try again; tokens that
    /// were valid are still looked up).
    fn refuse(&self, client: IpAddr) -> ApiError {
        metrics::counter!("api_auth_failures_total").increment(1);
        match self.limits.auth_failure(client) {
            Ok(()) => unauthorized("the token is not valid"),
            Err(ApiError::RateLimited(wait)) => {
                self.blocked.insert(client, Instant::now() + wait);
                ApiError::RateLimited(wait)
            }
            Err(other) => other,
        }
    }

    /// Refuses a token from now on in this process (it was revoked here): a lookup still
    /// running, that read it before the revocation, cannot bring it back.
    pub fn forget(&self, token: TokenHash) {
        self.verified.insert(
            token,
            Verified {
                user: None,
                at: Instant::now(),
            },
        );
    }

    /// Checks the admin token of `headers`, sent from `client`: a wrong one counts against
    /// the address's invalid-token allowance like a customer's, so the admin token cannot
    /// be guessed faster than any other; once over it, the address is refused 429 without
    /// a comparison (right or wrong) until it may try again.
    pub fn check_admin(&self, headers: &HeaderMap, client: IpAddr) -> Result<()> {
        if let Some(wait) = self
            .blocked
            .get(&client)
            .and_then(|until| until.checked_duration_since(Instant::now()))
        {
            return Err(ApiError::RateLimited(wait));
        }
        if self.is_admin(headers) {
            return Ok(());
        }
        match self.refuse(client) {
            ApiError::Client(_) => Err(unauthorized(
                "this route needs Authorization: Bearer <admin token>",
            )),
            other => Err(other),
        }
    }

    /// Whether `headers` carry the admin token.
    fn is_admin(&self, headers: &HeaderMap) -> bool {
        let presented = bearer_token(headers).unwrap_or("");
        // Digests of equal length, compared in constant time: the time taken says nothing
        // of the token's bytes or its length.
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        digest.ct_eq(&self.admin_digest).into()
    }
}

/// Most tokens looked up by one statement.
const MAX_LOOKUPS_PER_STATEMENT: usize = 500;

/// The users of valid tokens among `hashes`, in their order, and when the statement started.
async fn look_up(db: PgPool, hashes: Vec<TokenHash>) -> sqlx::Result<Vec<(Option<UserId>, Instant)>> {
    let read_at = Instant::now();
    let keys: Vec<&[u8]> = hashes.iter().map(|hash| hash.as_slice()).collect();
    // `as _`: the macro checks a `bytea[]` against `&[Vec<u8>]` only; borrowed slices encode
    // the same, without a copy of every hash.
    let rows = sqlx::query!(
        "SELECT token_hash, user_id FROM user_tokens
          WHERE token_hash = ANY($1) AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
        &keys as _,
    )
    .fetch_all(&db)
    .await?;
    let users: HashMap<Vec<u8>, i64> = rows
        .into_iter()
        .map(|row| (row.token_hash, row.user_id))
        .collect();
    Ok(hashes
        .iter()
        .map(|hash| (users.get(hash.as_slice()).copied().and_then(UserId::new), read_at))
        .collect())
}

/// Makes a token for `user` and stores its hash; the token, to be shown once. With
/// `vouched_by`, only while that token (the caller's) is still valid in the database: the
/// cache may believe a token revoked a moment ago elsewhere, and a revoked token must not
/// mint one that outlives it. Refused `409 ERR_TOO_MANY_TOKENS` when the user already holds
/// `policy.max_per_user` live tokens.
pub async fn issue_token(
    conn: &mut sqlx::PgConnection,
    user: UserId,
    vouched_by: Option<TokenHash>,
    policy: TokenPolicy,
) -> Result<String> {
    // Concurrent issues for one user count one after the other, so that a burst of them
    // cannot pass the cap together: the user's row is locked first, and the tokens counted
    // by a statement of their own, whose snapshot (read committed) sees what the previous
    // holder of the lock committed. `NO KEY UPDATE`: the rows that reference the user
    // (orders, requests) take `KEY SHARE` on it, and are not held up by this.
    let exists = sqlx::query_scalar!("SELECT id FROM users WHERE id = $1 FOR NO KEY UPDATE", user.get())
        .fetch_optional(&mut *conn)
        .await?;
    if exists.is_none() {
        return Err(ApiError::internal(anyhow::anyhow!(
            "a token for a user that does not exist"
        )));
    }
    let standing = sqlx::query!(
        r#"SELECT count(*) FILTER (WHERE expires_at IS NULL OR expires_at > now()) AS "live!",
                  coalesce(bool_or(token_hash = $2 AND (expires_at IS NULL OR expires_at > now())), false) AS "vouched!"
             FROM user_tokens
            WHERE user_id = $1 AND revoked_at IS NULL"#,
        user.get(),
        vouched_by.as_ref().map(|h| h.as_slice()),
    )
    .fetch_one(&mut *conn)
    .await?;
    if vouched_by.is_some() && !standing.vouched {
        return Err(unauthorized("the token is not valid"));
    }
    if standing.live >= policy.max_per_user {
        return Err(ApiError::new(
            ErrorCode::TooManyTokens,
            format!(
                "this user already holds {} live tokens, the most allowed; revoke one first",
                policy.max_per_user
            ),
        ));
    }
    let new = identity::new_token()
        .map_err(|e| ApiError::internal(anyhow::anyhow!("the OS random source failed: {e}")))?;
    let expires_at = match policy.ttl {
        None => None,
        Some(ttl) => Some(
            chrono::Duration::from_std(ttl)
                .ok()
                .and_then(|ttl| Utc::now().checked_add_signed(ttl))
                .ok_or_else(|| ApiError::internal(anyhow::anyhow!("TOKEN_TTL_DAYS is out of range")))?,
        ),
    };
    sqlx::query!(
        "INSERT INTO user_tokens (user_id, token_hash, expires_at) VALUES ($1, $2, $3)",
        user.get(),
        new.hash.as_slice(),
        expires_at,
    )
    .execute(&mut *conn)
    .await?;
    Ok(new.token)
}
