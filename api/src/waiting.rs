//! Answers without polling: a client that asks to wait (`Prefer: respond-async, wait=N` on a
//! command, `?wait=N` on its request) is held until its request is settled, or N seconds.
//!
//! Waiters are woken by the workers' one notice per settled batch
//! ([`shared::settlements`], PostgreSQL `LISTEN/NOTIFY`), which this process listens to on a
//! connection of its own. A waiter holds no database connection while it waits; it reads
//! its request when woken, and also every `REQUEST_WAIT_POLL_MS` in case a notice was lost
//! (a listener reconnecting misses what was sent meanwhile).

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
    /// Request id → what its waiters wait on (shared by every waiter of that request).
    waiting: Mutex<HashMap<Uuid, Arc<Notify>>>,
    /// How often a waiter reads its request again without being woken.
    poll_every: Duration,
}

impl Waiters {
    /// Starts listening for settled requests until `stop`.
    pub fn start(db: PgPool, poll_every: Duration, stop: CancellationToken) -> (Arc<Self>, JoinHandle<()>) {
        let waiters = Arc::new(Self {
            waiting: Mutex::default(),
            poll_every,
        });
        let listening = tokio::spawn(listen(db, Arc::clone(&waiters), stop));
        (waiters, listening)
    }

    /// Reads `read` until it answers `Some` (the request is settled) or `within` passes;
    /// the last answer. `read` runs at once, then whenever the request is announced settled,
    /// and every poll interval.
    pub async fn wait<T, F, Fut>(&self, request: Uuid, within: Duration, read: F) -> Result<Option<T>>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        let deadline = tokio::time::Instant::now() + within;
        let registration = self.register(request);
        loop {
            // Interest first, then the read: a notice between the two is not missed.
            let woken = registration.notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if let Some(settled) = read().await? {
                return Ok(Some(settled));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::select! {
                () = &mut woken => metrics::counter!("api_waiters_woken_total").increment(1),
                () = tokio::time::sleep_until(deadline.min(now + self.poll_every)) => {}
            }
        }
    }

    fn register(&self, request: Uuid) -> Registration<'_> {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let notify = Arc::clone(waiting.entry(request).or_default());
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
            if let Some(notify) = waiting.get(&request) {
                notify.notify_waiters();
            }
        }
    }
}

/// A waiter's place; given up when the waiter is done (answered, timed out, or its client
/// went away), and the request forgotten with its last waiter.
struct Registration<'a> {
    waiters: &'a Waiters,
    request: Uuid,
    notify: Arc<Notify>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut waiting = self
            .waiters
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Two references: the map's and this one. Anything more is another waiter.
        if Arc::strong_count(&self.notify) <= 2 {
            waiting.remove(&self.request);
        }
    }
}

/// Listens for settled requests and wakes their waiters, reconnecting after failures.
async fn listen(db: PgPool, waiters: Arc<Waiters>, stop: CancellationToken) {
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
            () = stop.cancelled() => return,
            ended = listened => {
                if let Err(e) = ended {
                    tracing::warn!(error = %e, "not listening for settled requests; waiters poll meanwhile");
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RECONNECT_AFTER) => {}
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
}
