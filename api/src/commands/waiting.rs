//! Answers without polling: a client that asks to wait (`Prefer: respond-async, wait=N` on a
//! command, `?wait=N` on its request) is held until its request is settled, or N seconds.
//!
//! Waiters are woken by the workers' one notice per settled batch
//! ([`shared::store::settlements`], PostgreSQL `LISTEN/NOTIFY`), which this process listens to on a
//! connection of its own. A waiter holds no database connection and reads nothing while it
//! waits: it registers before it reads or publishes its request, and the listener reads the
//! requests of each notice that someone here waits for, in one statement, and hands each to
//! its waiters. Notices are not durable (one sent while the
//! listener reconnects is lost, and so is one a worker did not send because it died between
//! its commit and its notice), so every `REQUEST_WAIT_POLL_MS` the listener also reads, in one
//! statement for every request waited on, which of them are settled, and hands them over:
//! a lost notice costs at most one poll interval, and the polling costs one statement per
//! interval per api process, not one per waiter.
//!
//! A stream of a user's settled requests (`GET /users/{userId}/requests/stream`,
//! [`crate::routes::request_stream`]) is woken by the same notices: when streams are open, the
//! listener reads, in one statement per read of notices, which streaming users the notice's
//! requests belong to, and wakes their streams, which read what settled from their position.
//! Lost notices are covered as for waiters: every poll interval one statement names the
//! streaming users with requests settled since the previous sweep, and wakes their streams.
//!
//! A user holds at most `MAX_WAITS_PER_USER` waits at once in this process, whatever kind
//! (`Prefer: wait`, `?wait=`, request streams): a wait is a parked request with its
//! connection, and one user must not park hundreds of them. One more is refused `429
//! ERR_RATE_LIMITED` before anything is read or stored; the waits already held are untouched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use shared::domain::ids::UserId;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::commands::request_status::{fetch_settled, RequestView};
use crate::error::ApiError;

/// What a user refused another wait is told to wait before asking again: waits last
/// seconds, so one of theirs has likely ended by then.
const RETRY_WAIT_AFTER: Duration = Duration::from_secs(1);

/// How long the listener waits before connecting again after a failure.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// The requests someone waits for, and how they are woken.
pub struct Waiters {
    db: PgPool,
    /// Request id → a place for each of its waiters.
    waiting: Mutex<HashMap<Uuid, Vec<Arc<Place>>>>,
    /// User → the wake-up of each of their open request streams.
    streams: Mutex<HashMap<UserId, Vec<Arc<Notify>>>>,
    /// The oldest transaction still running at the previous sweep (`pg_snapshot_xmin`):
    /// every request settled since has a settling transaction at least this old.
    swept_from: Mutex<Option<i64>>,
    /// Waits each user holds now (users without any are not kept).
    held: Mutex<HashMap<UserId, usize>>,
    /// `MAX_WAITS_PER_USER`: the most waits one user may hold at once (0: no bound).
    max_per_user: usize,
    /// Cancelled when the api starts shutting down: waiters answer at once (their `202`, or
    /// the request still `PENDING`) rather than be cut off with their connection.
    closing: CancellationToken,
}

/// One waiter's place: where its settled request is put, and its wake-up.
#[derive(Default)]
struct Place {
    settled: OnceLock<RequestView>,
    woken: Notify,
}

impl Waiters {
    /// Starts listening for settled requests (and sweeping for the ones whose notice was
    /// lost every `poll_every`) until `stop`.
    pub fn start(
        db: PgPool,
        poll_every: Duration,
        max_per_user: usize,
        stop: CancellationToken,
    ) -> (Arc<Self>, JoinHandle<()>) {
        let waiters = Arc::new(Self {
            db,
            waiting: Mutex::default(),
            streams: Mutex::default(),
            swept_from: Mutex::default(),
            held: Mutex::default(),
            max_per_user,
            closing: CancellationToken::new(),
        });
        let listening = tokio::spawn(listen(Arc::clone(&waiters), poll_every, stop));
        (waiters, listening)
    }

    /// Ends every wait now and refuses new ones (the api is shutting down).
    pub fn close(&self) {
        self.closing.cancel();
    }

    /// Takes a place among the waiters of `request` for `user`, before the caller reads it
    /// as its own or publishes it: what settles it from then on is kept for
    /// [`Registration::settled`]. `429 ERR_RATE_LIMITED` when `user` already holds
    /// `MAX_WAITS_PER_USER` waits.
    pub fn register(&self, request: Uuid, user: UserId) -> Result<Registration<'_>, ApiError> {
        self.hold(user)?;
        let place = Arc::new(Place::default());
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.entry(request).or_default().push(Arc::clone(&place));
        Ok(Registration {
            waiters: self,
            request,
            user,
            place,
        })
    }

    /// Opens a stream of `user`'s settled requests: woken when one of theirs may have
    /// settled, until it is dropped. It counts as one of the user's waits: `429
    /// ERR_RATE_LIMITED` when they already hold `MAX_WAITS_PER_USER`.
    pub fn open_stream(self: &Arc<Self>, user: UserId) -> Result<StreamRegistration, ApiError> {
        self.hold(user)?;
        let woken = Arc::new(Notify::new());
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams.entry(user).or_default().push(Arc::clone(&woken));
        metrics::gauge!("api_request_streams_open").increment(1);
        Ok(StreamRegistration {
            waiters: Arc::clone(self),
            user,
            woken,
        })
    }

    /// Counts one more wait of `user`, or refuses it past the bound.
    fn hold(&self, user: UserId) -> Result<(), ApiError> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(user).or_default();
        if self.max_per_user > 0 && *count >= self.max_per_user {
            metrics::counter!("api_waits_refused_total").increment(1);
            return Err(ApiError::RateLimited(RETRY_WAIT_AFTER));
        }
        *count += 1;
        metrics::gauge!("api_waits_open").increment(1);
        Ok(())
    }

    /// Gives a wait of `user` back to their allowance.
    fn release(&self, user: UserId) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&user);
            }
        }
        metrics::gauge!("api_waits_open").decrement(1);
    }

    /// The users with a stream open now.
    fn streaming(&self) -> Vec<i64> {
        let streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams.keys().map(|user| user.get()).collect()
    }

    /// Wakes every stream of `users`.
    fn wake_streams_of(&self, users: impl IntoIterator<Item = i64>) {
        let streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        for user in users.into_iter().filter_map(UserId::new) {
            for woken in streams.get(&user).into_iter().flatten() {
                // A permit: kept if the stream is reading this instant, so it reads again.
                woken.notify_one();
            }
        }
    }

    /// Wakes the streams of the users whose requests are among `settled` (one statement,
    /// none when no stream is open).
    async fn wake_streams(&self, settled: &[Uuid]) -> sqlx::Result<()> {
        let streaming = self.streaming();
        if streaming.is_empty() || settled.is_empty() {
            return Ok(());
        }
        let users = sqlx::query_scalar!(
            r#"SELECT DISTINCT user_id AS "user_id!" FROM requests WHERE id = ANY($1) AND user_id = ANY($2)"#,
            settled,
            &streaming,
        )
        .fetch_all(&self.db)
        .await?;
        self.wake_streams_of(users);
        Ok(())
    }

    /// Wakes the streams of the users with requests settled since the previous sweep (one
    /// statement, none while no stream is open): the ones whose notice was lost are among
    /// them. The first sweep after none was open wakes every stream, as it knows no "since".
    async fn sweep_streams(&self) -> sqlx::Result<()> {
        let streaming = self.streaming();
        if streaming.is_empty() {
            *self.swept_from.lock().unwrap_or_else(PoisonError::into_inner) = None;
            return Ok(());
        }
        let since = *self.swept_from.lock().unwrap_or_else(PoisonError::into_inner);
        let swept = sqlx::query!(
            r#"SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS "horizon!",
                      ARRAY(SELECT DISTINCT user_id FROM requests
                             WHERE user_id = ANY($1) AND settled_xid >= $2) AS "users!""#,
            &streaming,
            since.unwrap_or(i64::MAX),
        )
        .fetch_one(&self.db)
        .await?;
        *self.swept_from.lock().unwrap_or_else(PoisonError::into_inner) = Some(swept.horizon);
        match since {
            Some(_) => self.wake_streams_of(swept.users),
            None => self.wake_streams_of(streaming),
        }
        Ok(())
    }

    /// Reads, in one statement, those of `candidates` that someone here waits for and that
    /// are settled, and hands each to its waiters. Nothing is read when nobody waits.
    async fn deliver(&self, candidates: impl Iterator<Item = Uuid>) -> sqlx::Result<()> {
        let waited: Vec<Uuid> = {
            let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
            candidates.filter(|id| waiting.contains_key(id)).collect()
        };
        if waited.is_empty() {
            return Ok(());
        }
        let settled = fetch_settled(&self.db, &waited).await?;
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        for request in settled {
            for place in waiting.get(&request.request_id).into_iter().flatten() {
                let _ = place.settled.set(request.clone());
                // A permit: kept if its waiter is not polling its wake-up this instant.
                place.woken.notify_one();
            }
        }
        Ok(())
    }

    /// The requests waited on now.
    fn waited_on(&self) -> Vec<Uuid> {
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.keys().copied().collect()
    }
}

/// A waiter's place; given up when the waiter is done (answered, timed out, or its client
/// went away), and the request forgotten with its last waiter.
pub struct Registration<'a> {
    waiters: &'a Waiters,
    request: Uuid,
    /// Whose wait it is, given back to their allowance when it ends.
    user: UserId,
    place: Arc<Place>,
}

impl Registration<'_> {
    /// The request once it is settled (found by its notice, or by the listener's sweep), or
    /// `None` once `within` passes or the api starts shutting down.
    pub async fn settled(self, within: Duration) -> Option<RequestView> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(settled) = self.place.settled.get() {
                return Some(settled.clone());
            }
            tokio::select! {
                () = self.place.woken.notified() => metrics::counter!("api_waiters_woken_total").increment(1),
                () = tokio::time::sleep_until(deadline) => return None,
                () = self.waiters.closing.cancelled() => return None,
            }
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut waiting = self
            .waiters
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(places) = waiting.get_mut(&self.request) {
            places.retain(|place| !Arc::ptr_eq(place, &self.place));
            if places.is_empty() {
                waiting.remove(&self.request);
            }
        }
        drop(waiting);
        self.waiters.release(self.user);
    }
}

/// An open stream's place among the waiters: its wake-up, and one of its user's waits;
/// both given back when it is dropped (the stream ended, or its client went away).
pub struct StreamRegistration {
    waiters: Arc<Waiters>,
    user: UserId,
    woken: Arc<Notify>,
}

impl StreamRegistration {
    /// Returns once one of the user's requests may have settled since the last call (at
    /// once if that happened meanwhile).
    pub async fn woken(&self) {
        self.woken.notified().await;
        metrics::counter!("api_request_streams_woken_total").increment(1);
    }

    /// Returns once the api starts shutting down: the stream ends, and its client resumes
    /// from its last event on another replica or after the restart.
    pub async fn closing(&self) {
        self.waiters.closing.cancelled().await;
    }
}

impl Drop for StreamRegistration {
    fn drop(&mut self) {
        let mut streams = self
            .waiters
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(places) = streams.get_mut(&self.user) {
            places.retain(|woken| !Arc::ptr_eq(woken, &self.woken));
            if places.is_empty() {
                streams.remove(&self.user);
            }
        }
        drop(streams);
        self.waiters.release(self.user);
        metrics::gauge!("api_request_streams_open").decrement(1);
    }
}

/// Listens for settled requests and hands them to their waiters, reconnecting after
/// failures; and every `poll_every` looks for settled requests whose notice was lost.
async fn listen(waiters: Arc<Waiters>, poll_every: Duration, stop: CancellationToken) {
    let sweeping = tokio::spawn(sweep(Arc::clone(&waiters), poll_every, stop.clone()));
    // The reads run apart from the listener, so that a slow read holds up no notice, and one
    // at a time: the notices that come while one runs are read together by the next.
    let (notices, received) = mpsc::unbounded_channel();
    let delivering = tokio::spawn(deliver_notices(Arc::clone(&waiters), received));
    loop {
        let listened = async {
            let mut listener = PgListener::connect_with(&waiters.db).await?;
            listener.listen(shared::store::settlements::CHANNEL).await?;
            // Notices sent while nobody here listened are lost: the streams read again.
            waiters.wake_streams_of(waiters.streaming());
            loop {
                let notice = listener.recv().await?;
                let _ =
                    notices.send(shared::store::settlements::parse(notice.payload()).collect::<Vec<Uuid>>());
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            () = stop.cancelled() => break,
            ended = listened => {
                if let Err(e) = ended {
                    tracing::warn!(error = %e, "not listening for settled requests; waiters are woken by the sweep meanwhile");
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(RECONNECT_AFTER) => {}
        }
    }
    drop(notices);
    let _ = tokio::join!(sweeping, delivering);
}

/// Hands the requests of the notices received to their waiters, the notices that arrived
/// while the last read ran in one statement.
async fn deliver_notices(waiters: Arc<Waiters>, mut received: mpsc::UnboundedReceiver<Vec<Uuid>>) {
    const MAX_NOTICES_PER_READ: usize = 64;
    let mut notices = Vec::with_capacity(MAX_NOTICES_PER_READ);
    while received.recv_many(&mut notices, MAX_NOTICES_PER_READ).await > 0 {
        let settled: Vec<Uuid> = notices.drain(..).flatten().collect();
        if let Err(e) = waiters.deliver(settled.iter().copied()).await {
            tracing::debug!(error = %e, "cannot read settled requests; the sweep finds them");
        }
        if let Err(e) = waiters.wake_streams(&settled).await {
            tracing::debug!(error = %e, "cannot read whose requests settled; the sweep finds them");
        }
    }
}

/// Every `poll_every`, one statement for every request waited on: hands those that are
/// settled to their waiters (their notice was lost).
async fn sweep(waiters: Arc<Waiters>, poll_every: Duration, stop: CancellationToken) {
    let mut every = tokio::time::interval(poll_every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = stop.cancelled() => return,
        }
        let waited = waiters.waited_on();
        if let Err(e) = waiters.deliver(waited.into_iter()).await {
            tracing::debug!(error = %e, "cannot sweep for settled requests");
        }
        if let Err(e) = waiters.sweep_streams().await {
            tracing::debug!(error = %e, "cannot sweep for the streams' settled requests");
        }
    }
}

/// The `wait=N` of a `Prefer` header (RFC 7240), in whole seconds, at most `max`: `None`
/// without one. Preferences are hints, so a malformed one is ignored rather than refused.
pub fn preferred_wait(prefer: &str, max: Duration) -> Option<Duration> {
    prefer
        .split([',', ';'])
        .filter_map(|preference| {
            let (name, value) = preference.split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("wait")
                .then(|| value.trim().trim_matches('"').parse::<u64>().ok())
                .flatten()
        })
        .next()
        .filter(|seconds| *seconds > 0)
        .map(|seconds| Duration::from_secs(seconds).min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_of_a_prefer_header_is_read_and_capped() {
        let max = Duration::from_secs(30);
        let secs = |p: &str| preferred_wait(p, max).map(|d| d.as_secs());
        assert_eq!(secs("respond-async, wait=5"), Some(5));
        assert_eq!(secs("wait=10; respond-async"), Some(10));
        assert_eq!(secs("Wait = \"7\""), Some(7));
        assert_eq!(secs("respond-async, wait=3600"), Some(30));
        assert_eq!(secs("respond-async"), None);
        assert_eq!(secs("wait=0"), None);
        assert_eq!(secs("wait=soon"), None);
        assert_eq!(secs("return=minimal"), None);
    }

    #[tokio::test]
    async fn a_request_is_forgotten_with_its_last_waiter() {
        let waiters = unstarted(0);
        let request = Uuid::now_v7();
        let user = UserId::new(1).expect("a user id");
        let first = waiters.register(request, user).expect("no bound");
        let second = waiters.register(request, user).expect("no bound");
        drop(first);
        assert_eq!(waiters.waited_on(), vec![request]);
        drop(second);
        assert!(waiters.waited_on().is_empty());
    }

    fn unstarted(max_per_user: usize) -> Waiters {
        Waiters {
            db: PgPool::connect_lazy("postgres://localhost/unused").expect("a valid URL"),
            waiting: Mutex::default(),
            streams: Mutex::default(),
            swept_from: Mutex::default(),
            held: Mutex::default(),
            max_per_user,
            closing: CancellationToken::new(),
        }
    }

    #[tokio::test]
    async fn a_user_past_the_bound_is_refused_and_gets_the_wait_back_when_one_ends() {
        let waiters = unstarted(2);
        let (ann, bob) = (UserId::new(1).expect("id"), UserId::new(2).expect("id"));
        let first = waiters.register(Uuid::now_v7(), ann).expect("room");
        let _second = waiters.register(Uuid::now_v7(), ann).expect("room");
        assert!(matches!(
            waiters.register(Uuid::now_v7(), ann),
            Err(ApiError::RateLimited(_))
        ));
        let _others = waiters
            .register(Uuid::now_v7(), bob)
            .expect("another user's own bound");
        drop(first);
        assert!(waiters.register(Uuid::now_v7(), ann).is_ok());
    }
}
