//! The retry budget: attempts after a request's first are limited to a share of the requests
//! seen recently, plus a small floor, so that an outage across endpoints cannot multiply the load
//! (clients such as Claude Code already retry up to ten times on their own). This is Finagle's
//! retry budget: every request deposits `ratio` of a token, every retry withdraws a whole one,
//! both counted over a sliding window of one-second slots.
//!
//! Deposits and withdrawals share one small lock. The check and the withdrawal happen under it,
//! so concurrent retries can never spend more than the budget holds.

use parking_lot::Mutex;

use crate::clock::Clock;
use crate::config::RetryBudgetConfig;

#[derive(Clone, Copy, Default)]
struct Slot {
    second: u64,
    requests: u64,
    retries: u64,
}

/// A sliding-window retry budget.
pub struct RetryBudget {
    ratio: f64,
    floor: f64,
    slots: Mutex<Vec<Slot>>,
    clock: Clock,
}

impl RetryBudget {
    /// A budget configured by `cfg`.
    pub fn new(cfg: &RetryBudgetConfig, clock: Clock) -> Self {
        let seconds = cfg.window.as_secs().max(1);
        Self {
            ratio: cfg.ratio,
            floor: f64::from(cfg.min_per_second) * seconds as f64,
            slots: Mutex::new(vec![Slot::default(); seconds as usize]),
            clock,
        }
    }

    fn second(&self) -> u64 {
        Self::second_of(self.clock.now_ms())
    }

    fn second_of(now_ms: u64) -> u64 {
        now_ms / 1000 + 1
    }

    fn slot(slots: &mut [Slot], second: u64) -> &mut Slot {
        let n = slots.len() as u64;
        let s = &mut slots[(second % n) as usize];
        if s.second != second {
            *s = Slot {
                second,
                ..Slot::default()
            };
        }
        s
    }

    /// Counts a client request arriving at `now_ms` on the budget's clock (the reading the
    /// request path already took for ranking).
    pub fn deposit(&self, now_ms: u64) {
        let second = Self::second_of(now_ms);
        Self::slot(&mut self.slots.lock(), second).requests += 1;
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_withdraw(&self) -> bool {
        let second = self.second();
        let mut slots = self.slots.lock();
        let n = slots.len() as u64;
        let (requests, retries) = slots
            .iter()
            .filter(|s| s.second + n > second)
            .fold((0, 0), |(q, r), s| (q + s.requests, r + s.retries));
        if self.floor + self.ratio * requests as f64 - retries as f64 >= 1.0 {
            Self::slot(&mut slots, second).retries += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn budget(ratio: f64, min_per_second: u32) -> RetryBudget {
        RetryBudget::new(
            &RetryBudgetConfig {
                ratio,
                min_per_second,
                window: Duration::from_secs(10),
            },
            Clock::new(),
        )
    }

    fn drain(b: &RetryBudget) -> u32 {
        let mut n = 0;
        while b.try_withdraw() {
            n += 1;
            assert!(n < 1_000_000);
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn share_of_requests_plus_floor() {
        let b = budget(0.2, 1);
        assert_eq!(drain(&b), 10, "the floor: 1 per second over 10 s");
        for _ in 0..100 {
            b.deposit(b.clock.now_ms());
        }
        assert_eq!(drain(&b), 20, "20% of 100 requests");
        assert_eq!(drain(&b), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn window_slides() {
        let b = budget(0.5, 0);
        for _ in 0..10 {
            b.deposit(b.clock.now_ms());
        }
        assert_eq!(drain(&b), 5);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(drain(&b), 0, "still inside the window: spent");
        tokio::time::advance(Duration::from_secs(6)).await;
        for _ in 0..4 {
            b.deposit(b.clock.now_ms());
        }
        assert_eq!(drain(&b), 2, "old requests and retries left the window");
    }

    #[test]
    fn concurrent_retries_never_overspend() {
        let b = std::sync::Arc::new(budget(0.1, 0));
        for _ in 0..1000 {
            b.deposit(b.clock.now_ms());
        }
        let granted = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        if b.try_withdraw() {
                            granted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(granted.into_inner(), 100);
    }
}
