//! The registry clock: milliseconds since the gateway started, on tokio's clock so that tests can
//! pause and advance time.
//!
//! Deadlines live in atomics as these milliseconds; `0` means "none", so the clock starts at 1.

use std::time::{Duration, SystemTime};

/// A monotonic millisecond clock anchored to wall time for display.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch: tokio::time::Instant,
    wall: SystemTime,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self {
            epoch: tokio::time::Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// Milliseconds since start, plus one.
    pub fn now_ms(&self) -> u64 {
        self.ms_at(tokio::time::Instant::now())
    }

    /// The clock reading at `t` (for callers that already read the time).
    pub fn ms_at(&self, t: tokio::time::Instant) -> u64 {
        let since = t.saturating_duration_since(self.epoch);
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// The tokio instant for a clock reading.
    pub fn instant(&self, ms: u64) -> tokio::time::Instant {
        self.epoch + Duration::from_millis(ms.saturating_sub(1))
    }

    /// Wall time for a clock reading.
    pub fn wall(&self, ms: u64) -> SystemTime {
        self.wall + Duration::from_millis(ms.saturating_sub(1))
    }

    /// Seconds since start.
    pub fn uptime(&self) -> Duration {
        self.epoch.elapsed()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Formats a wall time as RFC 3339 (UTC, seconds).
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Converts a duration to whole milliseconds, saturating.
pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
