//! How fast a partition settles its commands, and what that says about a wait.
//!
//! Each partition keeps a decayed count of the commands it settled (`recent`: each weighted
//! by `exp(-age / TAU)`) and the time those weights cover (`span`, seconds). The rate is
//! `recent / span`: at a steady rate `r` both grow to `r·TAU` and `TAU`, so it reads `r`;
//! right after a partition starts settling, `span` is only the time it has been at it, so
//! the first seconds are not read as a slow start. A pause longer than `TAU` starts both
//! again (the partition had nothing to do; that is not slowness). Once nothing settles, the
//! count decays and the time since the last settlement grows, so the rate falls towards 0;
//! after [`KNOWN_FOR`] without a settlement it is unknown.
//!
//! The worker keeps these numbers with each batch it commits
//! (`shared::store::settle_rates`), one row write per batch; the api reads them.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// The decay time of the settle rate: the rate follows a change within a few of these.
pub const TAU_SECS: f64 = 10.0;

/// A rate is known while the partition settled something this recently.
pub const KNOWN_FOR: Duration = Duration::from_secs(60);

/// The shortest span a rate is read over: a single batch settled a moment ago is a rate of
/// its size per second, not of its size per microsecond.
const MIN_SPAN_SECS: f64 = 1.0;

/// A partition's settle rate as last written, with its batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SettleRate {
    /// Commands settled, weighted by `exp(-age / TAU)` as of `last_settled_at`.
    pub recent: f64,
    /// Seconds those weights cover, as of `last_settled_at`.
    pub span: f64,
    pub last_settled_at: DateTime<Utc>,
}

impl SettleRate {
    /// Commands settled per second around `now` (0 when nothing settled for long).
    pub fn per_sec(&self, now: DateTime<Utc>) -> f64 {
        let idle = seconds_between(self.last_settled_at, now);
        let weight = (-idle / TAU_SECS).exp();
        let span = (self.span * weight + idle).max(MIN_SPAN_SECS);
        (self.recent * weight / span).max(0.0)
    }

    /// Whether the rate says anything at `now`: something settled within [`KNOWN_FOR`].
    pub fn is_known(&self, now: DateTime<Utc>) -> bool {
        seconds_between(self.last_settled_at, now) <= KNOWN_FOR.as_secs_f64() && self.per_sec(now) > 0.0
    }

    /// How long a command with `position` commands before it waits, at this rate: until
    /// those and itself are settled. `None` when the rate is unknown.
    pub fn estimated_wait(&self, position: u64, now: DateTime<Utc>) -> Option<Duration> {
        if !self.is_known(now) {
            return None;
        }
        let seconds = (position as f64 + 1.0) / self.per_sec(now);
        // Bounded, so that a rate that fell to almost nothing reads as a day, not as infinity.
        Some(Duration::from_secs_f64(seconds.min(86_400.0)))
    }

    /// The rate after a batch of `settled` commands at `at`: what the worker's statement
    /// (`shared::store::settle_rates`) computes in SQL, written out here to test it.
    pub fn after_batch(previous: Option<&SettleRate>, settled: u64, at: DateTime<Utc>) -> SettleRate {
        let fresh = SettleRate {
            recent: settled as f64,
            span: 0.0,
            last_settled_at: at,
        };
        let Some(previous) = previous else {
            return fresh;
        };
        let gap = seconds_between(previous.last_settled_at, at);
        if gap > TAU_SECS {
            return fresh;
        }
        let weight = (-gap / TAU_SECS).exp();
        SettleRate {
            recent: previous.recent * weight + settled as f64,
            span: previous.span * weight + gap,
            last_settled_at: at.max(previous.last_settled_at),
        }
    }
}

/// Seconds from `from` to `to`, never negative (clocks of two hosts may disagree a little).
fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    ((to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6).max(0.0)
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    fn at(millis: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + TimeDelta::milliseconds(millis)
    }

    /// `per_sec` batches of `size`, one every `every_ms`, for `for_ms`.
    fn steady(size: u64, every_ms: i64, for_ms: i64) -> SettleRate {
        let mut rate = SettleRate::after_batch(None, size, at(0));
        let mut t = every_ms;
        while t <= for_ms {
            rate = SettleRate::after_batch(Some(&rate), size, at(t));
            t += every_ms;
        }
        rate
    }

    #[test]
    fn a_steady_rate_reads_as_itself_soon_after_it_starts_and_long_after() {
        // 20 commands every 100 ms: 200 per second.
        for for_ms in [2_000, 60_000] {
            let rate = steady(20, 100, for_ms).per_sec(at(for_ms));
            assert!((180.0..=220.0).contains(&rate), "after {for_ms} ms: {rate}");
        }
    }

    #[test]
    fn a_rate_falls_once_nothing_settles_and_is_unknown_after_a_minute() {
        let rate = steady(20, 100, 30_000);
        let busy = rate.per_sec(at(30_000));
        let later = rate.per_sec(at(40_000));
        assert!(later < busy / 2.0, "{busy} then {later}");
        assert!(rate.is_known(at(40_000)));
        assert!(!rate.is_known(at(30_000 + 61_000)));
        assert_eq!(rate.estimated_wait(5, at(30_000 + 61_000)), None);
    }

    #[test]
    fn a_pause_longer_than_the_decay_time_starts_the_rate_again() {
        let slow = steady(1, 1_000, 30_000);
        let after_pause = SettleRate::after_batch(Some(&slow), 50, at(30_000 + 20_000));
        assert_eq!(after_pause.recent, 50.0);
        assert_eq!(after_pause.span, 0.0);
        // One batch of 50 a moment ago reads as 50 per second (the shortest span).
        assert_eq!(after_pause.per_sec(at(30_000 + 20_000)), 50.0);
    }

    #[test]
    fn the_wait_counts_the_commands_before_and_the_command_itself() {
        let rate = steady(10, 100, 20_000); // about 100 per second
        let now = at(20_000);
        let first = rate.estimated_wait(0, now).map(|d| d.as_millis());
        let hundredth = rate.estimated_wait(99, now).map(|d| d.as_millis());
        assert!(matches!(first, Some(8..=12)), "{first:?}");
        assert!(matches!(hundredth, Some(900..=1_100)), "{hundredth:?}");
    }
}
