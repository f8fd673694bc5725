//! Latency histograms: HdrHistogram in microseconds, summarised as p50, p90, p99 and max.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Longest latency tracked exactly; anything above is recorded as this.
const HIGHEST_MICROS: u64 = 10 * 60 * 1_000_000;

/// One latency distribution.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        // Three significant digits from 1 µs to 10 minutes. The constructor only fails for
        // bounds that are out of order or more than 5 significant digits: not these constants.
        match Histogram::new_with_bounds(1, HIGHEST_MICROS, 3) {
            Ok(histogram) => Self(histogram),
            Err(e) => unreachable!("constant histogram bounds rejected: {e:?}"),
        }
    }

    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(micros.clamp(1, HIGHEST_MICROS));
    }

    pub fn record_micros(&mut self, micros: u64) {
        self.0.saturating_record(micros.clamp(1, HIGHEST_MICROS));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides; on the impossible mismatch, keep what we have.
        let _ = self.0.add(&other.0);
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn summary(&self) -> LatencySummary {
        let ms = |micros: u64| micros as f64 / 1_000.0;
        LatencySummary {
            count: self.0.len(),
            mean_ms: self.0.mean() / 1_000.0,
            p50_ms: ms(self.0.value_at_quantile(0.50)),
            p90_ms: ms(self.0.value_at_quantile(0.90)),
            p99_ms: ms(self.0.value_at_quantile(0.99)),
            max_ms: ms(self.0.max()),
        }
    }
}

/// Percentiles of one distribution, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    /// `p50 / p90 / p99 / max` in ms, for tables.
    pub fn compact(&self) -> String {
        format!(
            "{} / {} / {} / {}",
            fmt_ms(self.p50_ms),
            fmt_ms(self.p90_ms),
            fmt_ms(self.p99_ms),
            fmt_ms(self.max_ms)
        )
    }
}

pub fn fmt_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.2}")
    }
}

/// Latencies by label (`POST /coupons/{id}/issue`, `poll`, …), recorded from many tasks.
#[derive(Debug, Default)]
pub struct Recorder {
    by_label: Mutex<BTreeMap<String, Latency>>,
    /// Where latencies also go as they are recorded, for a view over time (the soak).
    tap: Option<Arc<LatencyTap>>,
}

impl Recorder {
    /// A recorder that also hands every latency to `tap`, if any.
    pub fn tapped(tap: Option<Arc<LatencyTap>>) -> Self {
        Self {
            by_label: Mutex::default(),
            tap,
        }
    }

    pub fn record(&self, label: &str, latency: Duration) {
        if let Some(tap) = &self.tap {
            tap.record(label, latency);
        }
        let mut by_label = self.by_label.lock().unwrap_or_else(PoisonError::into_inner);
        match by_label.get_mut(label) {
            Some(histogram) => histogram.record(latency),
            None => {
                let mut histogram = Latency::new();
                histogram.record(latency);
                by_label.insert(label.to_owned(), histogram);
            }
        }
    }

    pub fn summaries(&self) -> BTreeMap<String, LatencySummary> {
        self.by_label
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(label, h)| (label.clone(), h.summary()))
            .collect()
    }
}

/// Latencies of chosen labels from several recorders, in one distribution that is taken
/// and started afresh at each sample: the latency of one window of a long run.
#[derive(Debug)]
pub struct LatencyTap {
    /// The labels that each stand for one request sent (not a sum of several, such as a
    /// whole journey, nor a read that waits by design, such as a long poll).
    labels: Vec<&'static str>,
    window: Mutex<Latency>,
}

impl LatencyTap {
    pub fn new(labels: &[&'static str]) -> Self {
        Self {
            labels: labels.to_vec(),
            window: Mutex::new(Latency::new()),
        }
    }

    fn record(&self, label: &str, latency: Duration) {
        if self.labels.contains(&label) {
            self.window
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .record(latency);
        }
    }

    /// What was recorded since the last call, and a fresh window.
    pub fn take(&self) -> Latency {
        std::mem::take(&mut *self.window.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_one_to_a_hundred_milliseconds() {
        let mut latency = Latency::new();
        for ms in 1..=100 {
            latency.record(Duration::from_millis(ms));
        }
        let s = latency.summary();
        assert_eq!(s.count, 100);
        // Three significant digits: within 0.1 % of the exact value.
        assert!((s.p50_ms - 50.0).abs() < 0.1, "{s:?}");
        assert!((s.p90_ms - 90.0).abs() < 0.1, "{s:?}");
        assert!((s.p99_ms - 99.0).abs() < 0.1, "{s:?}");
        assert!((s.max_ms - 100.0).abs() < 0.1, "{s:?}");
        assert!((s.mean_ms - 50.5).abs() < 0.1, "{s:?}");
    }

    #[test]
    fn one_slow_request_in_a_hundred_shows_at_the_max_not_the_p99() {
        let mut latency = Latency::new();
        for _ in 0..99 {
            latency.record(Duration::from_millis(2));
        }
        latency.record(Duration::from_secs(3));
        let s = latency.summary();
        assert!(s.p99_ms < 2.1, "{s:?}");
        assert!((s.max_ms - 3_000.0).abs() < 3.0, "{s:?}");
    }

    #[test]
    fn recorder_keeps_labels_apart_and_merging_adds_counts() {
        let recorder = Recorder::default();
        recorder.record("a", Duration::from_millis(1));
        recorder.record("a", Duration::from_millis(3));
        recorder.record("b", Duration::from_millis(5));
        let summaries = recorder.summaries();
        assert_eq!(summaries["a"].count, 2);
        assert_eq!(summaries["b"].count, 1);

        let mut merged = Latency::new();
        let mut other = Latency::new();
        other.record(Duration::from_millis(7));
        merged.merge(&other);
        merged.merge(&other);
        assert_eq!(merged.len(), 2);
    }
}
