//! The [`Attempt`] guard that records each attempt exactly once and drives health transitions.
//!
//! **Invariant:** the only way to move an endpoint's outcome counters is to finish or drop an
//! [`Attempt`]; `finish` consumes the guard and `Drop` records `Cancelled` if it was never finished,
//! so an attempt cannot be recorded twice or forgotten, whatever path it ends through.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::clock::{Clock, ms};
use crate::health::classify::Outcome;
use crate::health::endpoint::{Endpoint, LastError};
use crate::health::estimate::FAILURE_PENALTY;
use crate::health::machine::Event;
use crate::health::machine::Phase;
use crate::health::queue::FailureQueue;
use crate::health::queue::PhaseChange;

/// Everything an [`Attempt`] needs to record its outcome and drive health.
pub struct Recorder {
    /// Shared clock.
    pub clock: Clock,
    /// The failure queue, where phase transitions are applied.
    pub queue: Arc<FailureQueue>,
    /// Cooldown after a 429 without a reset hint.
    pub default_cooldown: Duration,
}

/// One try of a request against one endpoint. Created when the attempt is sent; records exactly
/// one outcome — by [`Attempt::finish`], or as `Cancelled` when dropped unfinished.
pub struct Attempt {
    ep: Arc<Endpoint>,
    recorder: Arc<Recorder>,
    started: tokio::time::Instant,
    /// The endpoint's departure count when the attempt began (see `Live::departures`).
    departures: u64,
    holds_probation: bool,
    finished: bool,
}

impl Attempt {
    /// Starts an attempt: `total_requests` and `in_flight` rise by one.
    pub fn begin(ep: Arc<Endpoint>, recorder: Arc<Recorder>, holds_probation: bool) -> Self {
        ep.live.started.fetch_add(1, Ordering::AcqRel);
        let departures = ep.live.departures.load(Ordering::Acquire);
        Self {
            ep,
            recorder,
            started: tokio::time::Instant::now(),
            departures,
            holds_probation,
            finished: false,
        }
    }

    /// The endpoint this attempt goes to.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.ep
    }

    /// Notes that response headers arrived.
    pub fn first_byte(&self) {
        let end = tokio::time::Instant::now();
        let elapsed = end.saturating_duration_since(self.started);
        self.ep.live.ttfb.observe(elapsed);
        self.ep
            .live
            .estimate
            .observe(elapsed, self.recorder.clock.ms_at(end));
    }

    /// Records the verdict, with a message for `last_error` when it is a failure.
    pub fn finish(mut self, outcome: Outcome, detail: Option<String>) {
        self.finished = true;
        self.record(outcome, detail);
    }

    fn record(&mut self, outcome: Outcome, detail: Option<String>) {
        let live = &self.ep.live;
        let kind = outcome.kind();
        let rec = &self.recorder;
        // One clock read serves the latency sample, the estimate and the clock reading.
        let end = tokio::time::Instant::now();
        let elapsed = end.saturating_duration_since(self.started);
        let now = rec.clock.ms_at(end);
        if !matches!(outcome, Outcome::Cancelled) {
            live.total.observe(elapsed);
        }
        live.ended[kind as usize].fetch_add(1, Ordering::AcqRel);
        let event = match outcome {
            Outcome::Success => {
                // Every worker's successes would write this shared cache line: write only to
                // end a run of failures.
                if live.consecutive.load(Ordering::Acquire) != 0 {
                    live.consecutive.store(0, Ordering::Release);
                }
                Some(Event::Success)
            }
            Outcome::CallerError | Outcome::Cancelled => None,
            fault => {
                live.estimate.observe(elapsed.max(FAILURE_PENALTY), now);
                let consecutive = live
                    .consecutive
                    .fetch_add(1, Ordering::AcqRel)
                    .saturating_add(1);
                let message =
                    detail.map_or_else(|| kind.name().replace('_', " "), |d| self.ep.scrub(&d));
                let error = Arc::new(LastError {
                    kind,
                    message,
                    at: rec.clock.wall(now),
                });
                // The previous one is dropped after the lock is released.
                let previous = live.last_error.lock().replace(error);
                drop(previous);
                Some(match fault {
                    Outcome::RateLimited(wait) => {
                        let wait = wait.unwrap_or(rec.default_cooldown);
                        let until = now.saturating_add(ms(wait)).max(now + 1);
                        // The queue entry reads the deadline from here: nothing else to update.
                        let before = live.cooldown_until_ms.fetch_max(until, Ordering::AcqRel);
                        if before < until && live.phase() == Phase::CoolingDown {
                            // Already out: no transition, but the cluster must hear of the
                            // later deadline.
                            rec.queue
                                .note_change(&self.ep, PhaseChange::CooldownExtended);
                        }
                        Event::RateLimited
                    }
                    Outcome::Auth => Event::AuthFailed,
                    _ => Event::Failure { consecutive },
                })
            }
        };
        if self.holds_probation {
            live.probation_busy.store(false, Ordering::Release);
        }
        match event {
            // An attempt that began before the endpoint last left rotation (a stream opened
            // before a 429, say) says nothing about it since: only one that began after (on
            // probation, or as the least-bad fallback) brings it back.
            Some(Event::Success) => {
                rec.queue.succeeded(&self.ep, self.departures, now);
            }
            Some(event) => {
                rec.queue.transition(&self.ep, event, now);
            }
            None => {}
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.finished {
            self.finished = true;
            self.record(Outcome::Cancelled, None);
        }
    }
}
