//! The registry clock: milliseconds since the gateway started, on tokio's clock so that tests can
//! pause and advance time.
//!
//! Deadlines live in atomics as these milliseconds; `0` means "none", so the clock starts at 1.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Days since the Unix epoch, UTC.
pub fn day_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs() / 86_400).unwrap_or(0))
}

/// `YYYY-MM-DD` of a day number (days since 1970-01-01), proleptic Gregorian.
pub fn day_string(days: i64) -> String {
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_format_as_utc_dates() {
        assert_eq!(day_string(0), "1970-01-01");
        assert_eq!(day_string(19_723), "2024-01-01");
        assert_eq!(day_string(19_782), "2024-02-29");
        assert_eq!(day_string(20_454), "2026-01-01");
        assert_eq!(day_string(-1), "1969-12-31");
    }
}
