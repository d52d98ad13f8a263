//! The values the store keeps and shows: counter arithmetic, client-request totals, episode rows
//! and where persistence stands.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::health::endpoint::Counters;
use crate::health::totals::{GatewaySnapshot, RequestEnd};

/// Most recent episodes kept in memory for `GET /_ccgate/episodes`.
pub const RECENT_EPISODES: usize = 100;

/// The counter name under which attempts started (`total_requests`) are stored.
pub(crate) const STARTED: &str = "started";

/// Combines two counter sets field by field with `op` (saturating add or subtract).
pub(crate) fn combine(a: &Counters, b: &Counters, op: fn(u64, u64) -> u64) -> Counters {
    Counters::from_parts(
        op(a.total, b.total),
        std::array::from_fn(|i| op(a.by_kind[i], b.by_kind[i])),
    )
}

pub(crate) fn plus(a: &Counters, b: &Counters) -> Counters {
    combine(a, b, u64::saturating_add)
}

pub(crate) fn minus(a: &Counters, b: &Counters) -> Counters {
    combine(a, b, u64::saturating_sub)
}

/// Client-request totals as stored (the gateway's [`GatewaySnapshot`] without `in_flight`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewayTotals {
    /// Client requests received.
    pub started: u64,
    /// Complete 2xx answers.
    pub success: u64,
    /// Every candidate failed, or none was available.
    pub upstream_errors: u64,
    /// The caller's own error.
    pub caller_errors: u64,
    /// The client went away.
    pub cancelled: u64,
}

impl GatewayTotals {
    /// The stored counter names, in the order of [`GatewayTotals::values`]: requests started,
    /// then each way a request ends.
    pub(crate) fn names() -> [&'static str; 5] {
        let [a, b, c, d] = RequestEnd::ALL.map(RequestEnd::name);
        [STARTED, a, b, c, d]
    }

    pub(crate) fn values(&self) -> [u64; 5] {
        [
            self.started,
            self.success,
            self.upstream_errors,
            self.caller_errors,
            self.cancelled,
        ]
    }

    pub(crate) fn from_values(v: [u64; 5]) -> Self {
        Self {
            started: v[0],
            success: v[1],
            upstream_errors: v[2],
            caller_errors: v[3],
            cancelled: v[4],
        }
    }

    pub(crate) fn zip(&self, other: &Self, f: impl Fn(u64, u64) -> u64) -> Self {
        let (a, b) = (self.values(), other.values());
        Self::from_values(std::array::from_fn(|i| f(a[i], b[i])))
    }

    /// Client requests that ended other than with a complete answer (as `/_ccgate/stats` counts
    /// `failed_requests`).
    pub fn failed(&self) -> u64 {
        self.upstream_errors
            .saturating_add(self.caller_errors)
            .saturating_add(self.cancelled)
    }
}

impl From<GatewaySnapshot> for GatewayTotals {
    fn from(s: GatewaySnapshot) -> Self {
        Self {
            started: s.total,
            success: s.successful,
            upstream_errors: s.upstream_errors,
            caller_errors: s.caller_errors,
            cancelled: s.cancelled,
        }
    }
}

/// One stored failure episode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpisodeRow {
    /// Row id.
    pub id: i64,
    /// Endpoint name.
    pub endpoint: String,
    /// Why it left rotation.
    pub reason: String,
    /// When (Unix ms).
    pub started_at_ms: i64,
    /// When it ended (Unix ms); `None` while it lasts.
    pub ended_at_ms: Option<i64>,
    /// Probes run in it.
    pub probes: u32,
    /// How it ended: `recovered`, `reload` (the endpoint was changed or removed), `shutdown`, or
    /// `restart` (the gateway stopped without a last flush).
    pub ended_by: Option<String>,
}

impl EpisodeRow {
    /// When it began.
    pub fn started_at(&self) -> SystemTime {
        wall(self.started_at_ms)
    }

    /// When it ended; `None` while it lasts.
    pub fn ended_at(&self) -> Option<SystemTime> {
        self.ended_at_ms.map(wall)
    }
}

/// Where persistence stands.
#[derive(Clone, Debug)]
pub struct StorageStatus {
    /// A database is open and written.
    pub enabled: bool,
    /// `[storage]` asked for one.
    pub configured: bool,
    /// The database file.
    pub path: Option<PathBuf>,
    /// How often the writer flushes.
    pub flush_interval: Duration,
    /// The last committed flush.
    pub last_flush: Option<SystemTime>,
    /// Why the database is not (or was not last time) written.
    pub error: Option<String>,
}

pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A stored Unix-ms time as a wall time, clamped to years 1970..=9999 (a hand-edited database
/// must not make a view panic).
pub(crate) fn wall(ms: i64) -> SystemTime {
    const LAST_MS: u64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    let ms = u64::try_from(ms).unwrap_or(0).min(LAST_MS);
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH)
}

/// An endpoint out of rotation, as saved for the next start (wall times in Unix ms; never the
/// secret, only [`crate::health::endpoint::Endpoint::fingerprint`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedHealth {
    /// Endpoint name.
    pub endpoint: String,
    /// Fingerprint of its configuration (name, URL, credential).
    pub fingerprint: String,
    /// `ejected`, `auth_disabled`, `cooling_down` (probation is saved as `ejected`: the probe must
    /// pass again).
    pub phase: String,
    /// Why it left rotation (a [`crate::health::machine::Reason`] name).
    pub reason: String,
    /// When the episode began.
    pub since_ms: i64,
    /// When the next probe is due.
    pub next_probe_at_ms: i64,
    /// End of a rate-limit cooldown (0 when not cooling down).
    pub cooldown_until_ms: i64,
    /// Probes run in the episode.
    pub probes: u32,
}

/// An endpoint's last failure, as saved for the next start (`last_error` in the views): its
/// message as the view shows it, already scrubbed of credentials (never the secret, only
/// [`crate::health::endpoint::Endpoint::fingerprint`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedLastError {
    /// Endpoint name.
    pub endpoint: String,
    /// Fingerprint of its configuration (name, URL, credential): a changed endpoint starts fresh.
    pub fingerprint: String,
    /// Outcome kind (a [`crate::health::classify::Kind`] name).
    pub kind: String,
    /// What went wrong.
    pub message: String,
    /// When (Unix ms).
    pub at_ms: i64,
}
