//! Notices a partition consumer that is registered with the broker and fed nothing.
//!
//! RabbitMQ has left consumers registered without deliveries after node restarts (reports
//! against 3.x, quorum queues with single active consumer among them): the channel is open,
//! the consumer counts as active, heartbeats flow, and the partition's commands wait in the
//! queue while nobody settles them. Nothing breaks, so nothing reconnects.
//!
//! A consumer that waits with nothing in hand asks its queue, every few seconds, how many
//! messages are ready (a passive declare: one round trip, no lock). Ready messages that
//! have not reached it for `STALLED_CONSUMER_AFTER_MS` mean it is starved, and
//! [`crate::partitions::consumer`] subscribes again on a new channel. It only asks while it has nothing
//! in hand: every batch it took has been settled and acked, so closing the channel breaks
//! no order and leaves nothing in flight.
//!
//! `worker_partition_stalled_seconds{family,partition}` reports how long the partition has
//! been starved (0 when it is not), across re-subscriptions, so that a stall the watchdog
//! cannot cure keeps growing on the dashboard and raises `PartitionConsumerStalled`.

use std::time::Duration;

use shared::domain::command::Family;
use tokio::time::Instant;

/// The shortest time between two checks of one partition's queue.
const FASTEST_CHECK: Duration = Duration::from_millis(250);
/// The longest: a stall is noticed at most this long after its bound.
const SLOWEST_CHECK: Duration = Duration::from_secs(5);

/// What a check of the queue says about its consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Fed, or not starved for long enough yet.
    Fed,
    /// Ready messages have not reached this subscription for the bound: subscribe again.
    /// The duration is how long the partition has been starved.
    Starved(Duration),
}

/// The starvation clock of one partition consumer.
pub struct StallWatch {
    /// `STALLED_CONSUMER_AFTER_MS`.
    bound: Duration,
    /// The last moment the consumer was known not to be starved: it took a delivery,
    /// finished a batch, or its queue held nothing ready. Not moved by a re-subscription,
    /// so the gauge tells how long the partition has waited, however often it was revived.
    not_starved_at: Instant,
    /// When the current subscription started: a new one gets the whole bound to be fed.
    subscribed_at: Instant,
    /// `worker_partition_stalled_seconds` of this partition.
    gauge: metrics::Gauge,
    /// Whether the gauge shows anything but 0, so that a healthy consumer does not set it at
    /// every batch.
    reported: bool,
}

impl StallWatch {
    pub fn new(bound: Duration, family: Family, partition: u16, now: Instant) -> Self {
        let gauge = metrics::gauge!(
            "worker_partition_stalled_seconds",
            "family" => family.as_str(),
            "partition" => partition.to_string(),
        );
        gauge.set(0.0);
        Self {
            bound,
            not_starved_at: now,
            subscribed_at: now,
            gauge,
            reported: false,
        }
    }

    /// How often a waiting consumer checks its queue: twice per bound, within limits.
    pub fn check_every(&self) -> Duration {
        (self.bound / 2).clamp(FASTEST_CHECK, SLOWEST_CHECK)
    }

    /// The consumer took a delivery or finished a batch.
    pub fn fed(&mut self, now: Instant) {
        self.not_starved_at = now;
        self.clear();
    }

    /// The consumer subscribed again.
    pub fn resubscribed(&mut self, now: Instant) {
        self.subscribed_at = now;
    }

    /// Judges a waiting consumer whose queue holds `ready` messages.
    pub fn checked(&mut self, ready: u32, now: Instant) -> Verdict {
        if ready == 0 {
            self.fed(now);
            return Verdict::Fed;
        }
        let starved = now.saturating_duration_since(self.not_starved_at);
        self.gauge.set(starved.as_secs_f64());
        self.reported = true;
        let this_subscription = now.saturating_duration_since(self.not_starved_at.max(self.subscribed_at));
        if this_subscription >= self.bound {
            Verdict::Starved(starved)
        } else {
            Verdict::Fed
        }
    }

    /// The partition is no longer consumed here: its gauge goes back to 0.
    pub fn release(mut self) {
        self.reported = true;
        self.clear();
    }

    fn clear(&mut self) {
        if self.reported {
            self.gauge.set(0.0);
            self.reported = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(10);

    fn watch(now: Instant) -> StallWatch {
        StallWatch::new(BOUND, Family::Coupon, 3, now)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn ready_messages_unfed_for_the_bound_are_a_starved_consumer() {
        let start = Instant::now();
        let mut watch = watch(start);
        assert_eq!(watch.checked(5, start + secs(5)), Verdict::Fed);
        assert_eq!(watch.checked(5, start + secs(10)), Verdict::Starved(secs(10)));
    }

    #[test]
    fn an_empty_queue_is_never_a_stall_however_long_the_consumer_waits() {
        let start = Instant::now();
        let mut watch = watch(start);
        for s in (5..600).step_by(5) {
            assert_eq!(watch.checked(0, start + secs(s)), Verdict::Fed);
        }
        // Messages come after ten minutes of quiet: the clock starts at the last empty check
        // (595 s), not when the consumer began to wait.
        assert_eq!(watch.checked(3, start + secs(600)), Verdict::Fed);
        assert_eq!(watch.checked(3, start + secs(605)), Verdict::Starved(secs(10)));
    }

    #[test]
    fn a_consumer_fed_within_the_bound_is_never_starved() {
        let start = Instant::now();
        let mut watch = watch(start);
        for s in (0..120).step_by(6) {
            assert_eq!(watch.checked(50, start + secs(s + 5)), Verdict::Fed);
            watch.fed(start + secs(s + 6));
        }
    }

    #[test]
    fn a_new_subscription_gets_the_whole_bound_while_the_stall_keeps_counting() {
        let start = Instant::now();
        let mut watch = watch(start);
        assert_eq!(watch.checked(1, start + secs(10)), Verdict::Starved(secs(10)));
        watch.resubscribed(start + secs(10));
        assert_eq!(watch.checked(1, start + secs(15)), Verdict::Fed);
        assert_eq!(watch.checked(1, start + secs(20)), Verdict::Starved(secs(20)));
        watch.resubscribed(start + secs(20));
        watch.fed(start + secs(21));
        assert_eq!(watch.checked(1, start + secs(30)), Verdict::Fed);
        assert_eq!(watch.checked(1, start + secs(31)), Verdict::Starved(secs(10)));
    }

    #[test]
    fn checks_come_twice_per_bound_within_limits() {
        let start = Instant::now();
        assert_eq!(watch(start).check_every(), secs(5));
        let quick = StallWatch::new(Duration::from_millis(2_000), Family::Order, 0, start);
        assert_eq!(quick.check_every(), secs(1));
        let minutes = StallWatch::new(secs(600), Family::Order, 0, start);
        assert_eq!(minutes.check_every(), SLOWEST_CHECK);
        let instant = StallWatch::new(Duration::ZERO, Family::Order, 0, start);
        assert_eq!(instant.check_every(), FASTEST_CHECK);
    }
}
