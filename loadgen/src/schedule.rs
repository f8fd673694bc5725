//! The load engine: runs jobs closed loop or open loop.
//!
//! Closed loop, `concurrency` clients each take the next job when their last one finished:
//! the offered load adapts to the server, which is what a fixed crowd of users does.
//!
//! Open loop, job `i` is due at `start + i / rate` whatever happened to the jobs before it,
//! and the time each job is handed is its due time, not the moment it actually started. A
//! server that stalls therefore shows every request it made wait, instead of hiding them by
//! slowing the client down (coordinated omission). `max_in_flight` bounds the connections;
//! a job that waits for one still counts its latency from its due time.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A job that starts this long after its due time counts as late: the client (or the
/// connection limit) did not keep up. Below it is timer granularity.
const LATE: Duration = Duration::from_millis(5);

/// How jobs are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// `concurrency` clients, each sending its next request when the last one answered.
    Closed { concurrency: usize },
    /// `rate` jobs per second at fixed intervals, at most `max_in_flight` at once.
    Open { rate: f64, max_in_flight: usize },
}

impl Pace {
    pub fn describe(&self) -> String {
        match self {
            Pace::Closed { concurrency } => format!("closed loop, {concurrency} clients"),
            Pace::Open { rate, max_in_flight } => {
                format!("open loop, {rate}/s, at most {max_in_flight} in flight")
            }
        }
    }
}

/// When the `index`-th job of an open-loop run is due, counted from the start.
pub fn due_offset(index: u64, rate: f64) -> Duration {
    if rate <= 0.0 || !rate.is_finite() {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(index as f64 / rate)
}

/// What a run looked like from the driver's side.
#[derive(Debug, Clone)]
pub struct Timing {
    pub started: Instant,
    /// The same moment on the wall clock, to compare with PostgreSQL's timestamps.
    pub started_at: DateTime<Utc>,
    pub finished: Instant,
    pub dispatched: u64,
    /// Open loop: jobs that started more than [`LATE`] after they were due (the client or
    /// the connection limit could not keep up), and the worst delay.
    pub late: u64,
    pub worst_lag: Duration,
}

impl Timing {
    pub fn elapsed(&self) -> Duration {
        self.finished - self.started
    }
}

/// Runs `work(job, intended_start)` for every job (or until `limit` has passed since the
/// start), paced by `pace`, and returns once every started job has finished.
pub async fn drive<J, I, F, Fut>(jobs: I, pace: Pace, limit: Option<Duration>, work: F) -> Timing
where
    J: Send + 'static,
    I: Iterator<Item = J> + Send + 'static,
    F: Fn(J, Instant) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let started = Instant::now();
    let started_at = Utc::now();
    let deadline = limit.map(|l| started + l);
    let work = Arc::new(work);
    let (dispatched, late, worst_lag) = match pace {
        Pace::Closed { concurrency } => (
            closed_loop(jobs, concurrency, deadline, work).await,
            0,
            Duration::ZERO,
        ),
        Pace::Open { rate, max_in_flight } => {
            open_loop(jobs, rate, max_in_flight, started, deadline, work).await
        }
    };
    Timing {
        started,
        started_at,
        finished: Instant::now(),
        dispatched,
        late,
        worst_lag,
    }
}

async fn closed_loop<J, I, F, Fut>(
    jobs: I,
    concurrency: usize,
    deadline: Option<Instant>,
    work: Arc<F>,
) -> u64
where
    J: Send + 'static,
    I: Iterator<Item = J> + Send + 'static,
    F: Fn(J, Instant) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let jobs = Arc::new(Mutex::new(jobs));
    let dispatched = Arc::new(AtomicU64::new(0));
    let mut clients = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let jobs = Arc::clone(&jobs);
        let work = Arc::clone(&work);
        let dispatched = Arc::clone(&dispatched);
        clients.spawn(async move {
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let next = jobs.lock().unwrap_or_else(PoisonError::into_inner).next();
                let Some(job) = next else { break };
                dispatched.fetch_add(1, Ordering::Relaxed);
                work(job, Instant::now()).await;
            }
        });
    }
    while clients.join_next().await.is_some() {}
    dispatched.load(Ordering::Relaxed)
}

async fn open_loop<J, I, F, Fut>(
    jobs: I,
    rate: f64,
    max_in_flight: usize,
    started: Instant,
    deadline: Option<Instant>,
    work: Arc<F>,
) -> (u64, u64, Duration)
where
    J: Send + 'static,
    I: Iterator<Item = J> + Send + 'static,
    F: Fn(J, Instant) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut running = JoinSet::new();
    let (mut dispatched, mut late, mut worst_lag) = (0_u64, 0_u64, Duration::ZERO);
    for (index, job) in (0_u64..).zip(jobs) {
        let due = started + due_offset(index, rate);
        if deadline.is_some_and(|d| due >= d) {
            break;
        }
        tokio::time::sleep_until(due).await;
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let lag = Instant::now().saturating_duration_since(due);
        worst_lag = worst_lag.max(lag);
        if lag > LATE {
            late += 1;
        }
        let work = Arc::clone(&work);
        running.spawn(async move {
            work(job, due).await;
            drop(slot);
        });
        dispatched += 1;
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
    (dispatched, late, worst_lag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_loop_jobs_are_due_at_fixed_intervals_that_do_not_drift() {
        assert_eq!(due_offset(0, 200.0), Duration::ZERO);
        assert_eq!(due_offset(1, 200.0), Duration::from_millis(5));
        assert_eq!(due_offset(200, 200.0), Duration::from_secs(1));
        // No accumulated rounding error after a million intervals of 1/3 ms.
        let late = due_offset(3_000_000, 3_000.0);
        assert!(late.abs_diff(Duration::from_secs(1_000)) < Duration::from_micros(1));
        assert_eq!(due_offset(5, 0.0), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_keeps_sending_on_schedule_while_the_server_is_slow() {
        let intended = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&intended);
        let pace = Pace::Open {
            rate: 100.0,
            max_in_flight: 100,
        };
        let timing = drive(0..5, pace, None, move |_, due| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap_or_else(PoisonError::into_inner).push(due);
                // Every answer takes a second: a closed loop would need five.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
        .await;
        let intended = intended.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let offsets: Vec<u128> = intended
            .iter()
            .map(|t| (*t - timing.started).as_millis())
            .collect();
        assert_eq!(offsets, vec![0, 10, 20, 30, 40]);
        assert_eq!(timing.dispatched, 5);
        assert!(
            timing.elapsed() < Duration::from_millis(1_100),
            "{:?}",
            timing.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_latency_counts_from_the_due_time_when_connections_run_out() {
        let lags = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&lags);
        let pace = Pace::Open {
            rate: 100.0,
            max_in_flight: 1,
        };
        let timing = drive(0..3, pace, None, move |_, due| {
            let seen = Arc::clone(&seen);
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                seen.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(due.elapsed().as_millis());
            }
        })
        .await;
        // One connection: the second job waits for the first (due at 10 ms, answered at
        // 200 ms), the third for the second (due at 20 ms, answered at 300 ms).
        let lags = lags.lock().unwrap_or_else(PoisonError::into_inner).clone();
        assert_eq!(lags, vec![100, 190, 280]);
        assert_eq!(timing.late, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_waits_for_each_answer_and_stops_at_the_limit() {
        let pace = Pace::Closed { concurrency: 2 };
        let timing = drive(0..6, pace, None, |_, _| {
            tokio::time::sleep(Duration::from_secs(1))
        })
        .await;
        assert_eq!(timing.dispatched, 6);
        assert_eq!(timing.elapsed().as_secs(), 3);

        let endless = drive(0.., pace, Some(Duration::from_millis(2_500)), |_, _| {
            tokio::time::sleep(Duration::from_secs(1))
        })
        .await;
        assert_eq!(endless.dispatched, 6);
    }
}
