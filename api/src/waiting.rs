//! Answers without polling: a client that asks to wait (`Prefer: respond-async, wait=N` on a
//! command, `?wait=N` on its request) is held until its request is settled, or N seconds.
//!
//! Waiters are woken by the workers' one notice per settled batch
//! ([`shared::settlements`], PostgreSQL `LISTEN/NOTIFY`), which this process listens to on a
//! connection of its own. A waiter holds no database connection while it waits: it registers
//! before it reads or publishes its request, and reads it again only when woken. Notices are not durable (one sent while the
//! listener reconnects is lost, and so is one a worker did not send because it died between
//! its commit and its notice), so every `REQUEST_WAIT_POLL_MS` the listener also reads, in one
//! statement for every request waited on, which of them are settled, and wakes their waiters:
//! a lost notice costs at most one poll interval, and the polling costs one statement per
//! interval per api process, not one per waiter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::Result;

/// How long the listener waits before connecting again after a failure.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// The requests someone waits for, and how they are woken.
pub struct Waiters {
    /// Request id → a wake-up for each of its waiters.
    waiting: Mutex<HashMap<Uuid, Vec<Arc<Notify>>>>,
    /// Cancelled when the api starts shutting down: waiters answer at once (their `202`, or
    /// the request still `PENDING`) rather than be cut off with their connection.
    closing: CancellationToken,
}

impl Waiters {
    /// Starts listening for settled requests (and sweeping for the ones whose notice was
    /// lost every `poll_every`) until `stop`.
    pub fn start(db: PgPool, poll_every: Duration, stop: CancellationToken) -> (Arc<Self>, JoinHandle<()>) {
        let waiters = Arc::new(Self {
            waiting: Mutex::default(),
            closing: CancellationToken::new(),
        });
        let listening = tokio::spawn(listen(db, Arc::clone(&waiters), poll_every, stop));
        (waiters, listening)
    }

    /// Ends every wait now and refuses new ones (the api is shutting down).
    pub fn close(&self) {
        self.closing.cancel();
    }

    /// Takes a place among the waiters of `request`, before the caller reads it or publishes
    /// it: a notice that comes from then on is kept for [`Registration::settled`], so the
    /// read the caller makes anyway (or knowing the request was just stored) is the only
    /// read before the notice.
    pub fn register(&self, request: Uuid) -> Registration<'_> {
        let notify = Arc::new(Notify::new());
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.entry(request).or_default().push(Arc::clone(&notify));
        Registration {
            waiters: self,
            request,
            notify,
        }
    }

    /// Wakes whoever waits for one of `settled`.
    fn wake(&self, settled: impl Iterator<Item = Uuid>) {
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if waiting.is_empty() {
            return;
        }
        for request in settled {
            for notify in waiting.get(&request).into_iter().flatten() {
                // A permit: kept when its waiter is between two waits.
                notify.notify_one();
            }
        }
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
    notify: Arc<Notify>,
}

impl Registration<'_> {
    /// Waits for the request, known to be pending when registered, to be found settled (by
    /// its notice, or the listener's sweep), then reads it with `read`; the answer of the
    /// first read that finds it settled, or `None` once `within` passes or the api shuts
    /// down.
    pub async fn settled<T, F, Fut>(&self, within: Duration, read: F) -> Result<Option<T>>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            tokio::select! {
                () = self.notify.notified() => {
                    metrics::counter!("api_waiters_woken_total").increment(1);
                    if let Some(settled) = read().await? {
                        return Ok(Some(settled));
                    }
                }
                () = tokio::time::sleep_until(deadline) => return Ok(None),
                () = self.waiters.closing.cancelled() => return Ok(None),
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
        if let Some(notifies) = waiting.get_mut(&self.request) {
            notifies.retain(|notify| !Arc::ptr_eq(notify, &self.notify));
            if notifies.is_empty() {
                waiting.remove(&self.request);
            }
        }
    }
}

/// Listens for settled requests and wakes their waiters, reconnecting after failures; and
/// every `poll_every` wakes the waiters of requests found settled without a notice.
async fn listen(db: PgPool, waiters: Arc<Waiters>, poll_every: Duration, stop: CancellationToken) {
    let sweeping = tokio::spawn(sweep(db.clone(), Arc::clone(&waiters), poll_every, stop.clone()));
    loop {
        let listened = async {
            let mut listener = PgListener::connect_with(&db).await?;
            listener.listen(shared::settlements::CHANNEL).await?;
            loop {
                let notice = listener.recv().await?;
                waiters.wake(shared::settlements::parse(notice.payload()));
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
    let _ = sweeping.await;
}

/// Every `poll_every`, one statement for every request waited on: wakes the waiters of those
/// that are settled (their notice was lost).
async fn sweep(db: PgPool, waiters: Arc<Waiters>, poll_every: Duration, stop: CancellationToken) {
    let mut every = tokio::time::interval(poll_every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = stop.cancelled() => return,
        }
        let waited = waiters.waited_on();
        if waited.is_empty() {
            continue;
        }
        let settled: std::result::Result<Vec<Uuid>, sqlx::Error> =
            sqlx::query_scalar("SELECT id FROM requests WHERE id = ANY($1) AND status <> 'PENDING'")
                .bind(&waited)
                .fetch_all(&db)
                .await;
        match settled {
            Ok(settled) => waiters.wake(settled.into_iter()),
            Err(e) => tracing::debug!(error = %e, "cannot sweep for settled requests"),
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
        let waiters = Waiters {
            waiting: Mutex::default(),
            closing: CancellationToken::new(),
        };
        let request = Uuid::now_v7();
        let first = waiters.register(request);
        let second = waiters.register(request);
        drop(first);
        assert_eq!(waiters.waited_on(), vec![request]);
        drop(second);
        assert!(waiters.waited_on().is_empty());
    }
}
