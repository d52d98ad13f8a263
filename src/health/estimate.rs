//! A peak-sensitive, time-decaying latency estimate for `least_latency` (the "PeakEWMA" of
//! Finagle and Linkerd): a sample above the estimate replaces it at once, a sample below pulls it
//! down with a weight that grows with the time since the last update, and an estimate nobody
//! refreshes decays towards zero — so an endpoint that was slow is tried again after a while
//! instead of being starved forever on stale evidence.
//!
//! Samples are time to first byte (streams last minutes; their total time says nothing about the
//! endpoint), and a failure counts as a sample of [`FAILURE_PENALTY`]: an endpoint that answers
//! 429 or 500 in a millisecond must look slow, not fast.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Time constant of the decay.
pub const DECAY: Duration = Duration::from_secs(10);

/// The sample recorded for an attempt that failed through the endpoint's fault.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(5);

/// The estimate, in microseconds, and when it was last updated (registry-clock ms). The two
/// words are updated separately: a reader may pair a fresh value with a slightly older stamp,
/// which only makes one selection marginally less exact — this is a heuristic, not an account.
#[derive(Default)]
pub struct PeakEwma {
    micros: AtomicU64,
    stamp_ms: AtomicU64,
}

impl PeakEwma {
    /// Adds a sample taken at `now_ms`.
    pub fn observe(&self, sample: Duration, now_ms: u64) {
        let sample = sample.as_secs_f64() * 1e6;
        let stamp = self.stamp_ms.swap(now_ms, Ordering::AcqRel);
        let w = decay_weight(now_ms.saturating_sub(stamp));
        let _ = self
            .micros
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                let old = old as f64;
                let new = if sample > old {
                    sample
                } else {
                    old * w + sample * (1.0 - w)
                };
                Some(new.round().max(1.0) as u64)
            });
    }

    /// Whether the estimate says little any more at `now_ms`: no sample yet, or none for three
    /// time constants (it has decayed to a twentieth of what it was).
    pub fn stale(&self, now_ms: u64) -> bool {
        let stamp = self.stamp_ms.load(Ordering::Acquire);
        self.micros.load(Ordering::Acquire) == 0
            || now_ms.saturating_sub(stamp) >= 3 * DECAY.as_millis() as u64
    }

    /// The estimate at `now_ms`, decayed for the time since the last sample. Zero when there
    /// is no evidence (never sampled, or long ago), which makes the endpoint worth trying.
    pub fn get(&self, now_ms: u64) -> Duration {
        let micros = self.micros.load(Ordering::Acquire) as f64;
        let stamp = self.stamp_ms.load(Ordering::Acquire);
        let decayed = micros * decay_weight(now_ms.saturating_sub(stamp));
        Duration::from_micros(decayed as u64)
    }
}

fn decay_weight(elapsed_ms: u64) -> f64 {
    (-(elapsed_ms as f64) / (DECAY.as_secs_f64() * 1000.0)).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_are_taken_at_once_and_decay_with_time() {
        let e = PeakEwma::default();
        e.observe(Duration::from_millis(10), 1);
        assert_eq!(e.get(1), Duration::from_millis(10));
        e.observe(Duration::from_millis(500), 2);
        assert_eq!(e.get(2), Duration::from_millis(500));
        // One time constant later, e^-1 of it is left.
        let later = e.get(2 + 10_000).as_secs_f64();
        assert!((later - 0.5 / std::f64::consts::E).abs() < 0.001, "{later}");
        // A fast sample right after a peak barely moves it; the same sample much later wins.
        e.observe(Duration::from_millis(10), 3);
        assert!(e.get(3) > Duration::from_millis(490));
        e.observe(Duration::from_millis(10), 100_000);
        assert!(e.get(100_000) < Duration::from_millis(11));
    }

    #[test]
    fn unsampled_is_zero() {
        assert_eq!(PeakEwma::default().get(50), Duration::ZERO);
    }
}
