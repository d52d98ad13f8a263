//! Candidate order for one request: the strategy ranks every configured endpoint; the attempt loop
//! then walks the ranking, skipping endpoints that are not admitted, and never tries one twice.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::Strategy;
use crate::health::endpoint::Endpoint;
use crate::health::estimate::FAILURE_PENALTY;

/// Ranks endpoints for one request.
pub struct Selector {
    strategy: Strategy,
    next: AtomicUsize,
}

/// Endpoints a request has tried: bit `i` for endpoint `i` (at most 64, enforced by config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tried(u64);

impl Tried {
    /// Whether endpoint `idx` was tried.
    pub fn contains(self, idx: usize) -> bool {
        idx < 64 && self.0 & (1 << idx) != 0
    }
    /// Marks endpoint `idx` as tried; returns false if it already was.
    pub fn insert(&mut self, idx: usize) -> bool {
        if idx >= 64 || self.contains(idx) {
            return false;
        }
        self.0 |= 1 << idx;
        true
    }
    /// How many were tried.
    pub fn len(self) -> u32 {
        self.0.count_ones()
    }
    /// Whether none was tried.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl Selector {
    /// A selector for `strategy`.
    pub fn new(strategy: Strategy) -> Self {
        Self {
            strategy,
            next: AtomicUsize::new(0),
        }
    }

    /// Endpoint indexes in the order this request should try them; `now_ms` is the registry
    /// clock (for `least_latency`'s decaying estimates and rate-limit resets). Endpoints near
    /// their rate limit come last, in the strategy's order among themselves, until their window
    /// resets: they are still candidates, so a request that nothing else can serve goes there.
    pub fn rank(
        &self,
        endpoints: &[std::sync::Arc<Endpoint>],
        now_ms: u64,
        rng: &mut fastrand::Rng,
    ) -> Vec<usize> {
        self.rank_except(endpoints, Tried::default(), now_ms, rng)
    }

    /// [`Selector::rank`] for a request that `skip`s some endpoints (they do not serve its
    /// model, say): they come last, and `round_robin` turns over the others only.
    pub fn rank_except(
        &self,
        endpoints: &[std::sync::Arc<Endpoint>],
        skip: Tried,
        now_ms: u64,
        rng: &mut fastrand::Rng,
    ) -> Vec<usize> {
        let mut order = self.strategy_order(endpoints, skip, now_ms, rng);
        if endpoints.iter().any(|e| e.live.near_quota_limit(now_ms)) {
            // A stable sort on a boolean: the strategy's order is kept within each group.
            order.sort_by_key(|&i| endpoints[i].live.near_quota_limit(now_ms));
        }
        order
    }

    fn strategy_order(
        &self,
        endpoints: &[std::sync::Arc<Endpoint>],
        skip: Tried,
        now_ms: u64,
        rng: &mut fastrand::Rng,
    ) -> Vec<usize> {
        match self.strategy {
            Strategy::Priority => priority_order(endpoints, |e| (e.idx, e.priority, e.weight), rng),
            Strategy::Weighted => weighted_order(endpoints.iter().map(|e| (e.idx, e.weight)), rng),
            Strategy::LeastLatency => {
                let costs: Vec<Cost> = endpoints
                    .iter()
                    .map(|e| Cost {
                        idx: e.idx,
                        in_rotation: e.live.in_rotation(),
                        cost: least_latency_cost(e, now_ms),
                    })
                    .collect();
                rank_least_latency(&costs, rng)
            }
            Strategy::RoundRobin => {
                // The turn goes round the endpoints that can take the request now: one that is
                // out, switched off or skipped would hand its turn to the next in the list,
                // which would get a double share. The others follow, in list order, for when
                // nothing else is left.
                let takes =
                    |e: &&std::sync::Arc<Endpoint>| !skip.contains(e.idx) && e.live.in_rotation();
                let mut order = Vec::with_capacity(endpoints.len());
                order.extend(endpoints.iter().filter(takes).map(|e| e.idx));
                if !order.is_empty() {
                    let start = self.next.fetch_add(1, Ordering::Relaxed) % order.len();
                    order.rotate_left(start);
                }
                order.extend(endpoints.iter().filter(|e| !takes(e)).map(|e| e.idx));
                order
            }
        }
    }
}

/// What `least_latency` knows of one endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Cost {
    /// Endpoint index.
    pub idx: usize,
    /// Whether it looks admissible (in-rotation endpoints are ranked first).
    pub in_rotation: bool,
    /// Expected cost of sending it one more request.
    pub cost: f64,
}

/// The cost `least_latency` compares: the decaying first-byte estimate (failures counted as
/// slow) times one plus the attempts already in flight, as in Finagle's and Linkerd's
/// peak-EWMA balancers. An endpoint with no recent evidence (never sampled, or not for three
/// decay constants) costs next to nothing and gets tried, by one attempt: while that attempt is
/// out, and nothing new is known, each attempt in flight costs [`FAILURE_PENALTY`] (Finagle's
/// rule), so a burst does not pile onto an endpoint that only looked cheap because it had not
/// answered lately.
pub fn least_latency_cost(e: &Endpoint, now_ms: u64) -> f64 {
    let estimate = e.live.estimate.get(now_ms).as_secs_f64();
    let in_flight = e.live.snapshot().in_flight as f64;
    if in_flight > 0.0 && e.live.estimate.stale(now_ms) {
        return FAILURE_PENALTY.as_secs_f64() * in_flight;
    }
    estimate * (in_flight + 1.0)
}

/// Power of two choices, repeated to give a full order: of two endpoints drawn at random the
/// cheaper goes next. Endpoints out of rotation come after all those in rotation.
pub fn rank_least_latency(costs: &[Cost], rng: &mut fastrand::Rng) -> Vec<usize> {
    let mut out = Vec::with_capacity(costs.len());
    let mut pool: Vec<Cost> = Vec::with_capacity(costs.len());
    for group in [true, false] {
        pool.extend(costs.iter().copied().filter(|c| c.in_rotation == group));
        while !pool.is_empty() {
            let pick = if pool.len() == 1 {
                0
            } else {
                let a = rng.usize(..pool.len());
                let mut b = rng.usize(..pool.len() - 1);
                if b >= a {
                    b += 1;
                }
                if pool[b].cost < pool[a].cost { b } else { a }
            };
            out.push(pool.swap_remove(pick).idx);
        }
    }
    out
}

/// Lowest priority number first; weighted random order within each tier. `facts` are
/// `(index, priority, weight)`.
pub fn rank_priority(facts: &[(usize, u32, u32)], rng: &mut fastrand::Rng) -> Vec<usize> {
    priority_order(facts, |&f| f, rng)
}

/// [`rank_priority`] over any items, read by `fact` as `(index, priority, weight)`. The random
/// keys are drawn tier by tier (lowest first), in item order within a tier, as
/// [`weighted_order`] of each tier would draw them, into one vector sorted once.
fn priority_order<T>(
    items: &[T],
    fact: impl Fn(&T) -> (usize, u32, u32),
    rng: &mut fastrand::Rng,
) -> Vec<usize> {
    let mut keyed: Vec<(u32, f64, usize)> = Vec::with_capacity(items.len());
    // Tiers in ascending order without collecting them: each pass takes the lowest priority
    // above the last one (there are few tiers, and at most 64 endpoints).
    let mut tier = items.iter().map(|t| fact(t).1).min();
    while let Some(p) = tier {
        keyed.extend(
            items
                .iter()
                .map(&fact)
                .filter(|f| f.1 == p)
                .map(|(i, _, w)| (p, weight_key(rng, w), i)),
        );
        tier = items.iter().map(|t| fact(t).1).filter(|&q| q > p).min();
    }
    // Stable: equal keys keep item order, as in `weighted_order`.
    keyed.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
    keyed.into_iter().map(|(_, _, i)| i).collect()
}

/// The Efraimidis–Spirakis key of an item of weight `w` (0 counts as 1).
fn weight_key(rng: &mut fastrand::Rng, w: u32) -> f64 {
    rng.f64().powf(1.0 / f64::from(w.max(1)))
}

/// A weighted random permutation (Efraimidis–Spirakis): each item draws `u^(1/w)` and items are
/// sorted by that key, so the first place goes to item `i` with probability `w_i / Σw`.
pub fn weighted_order(
    items: impl Iterator<Item = (usize, u32)>,
    rng: &mut fastrand::Rng,
) -> Vec<usize> {
    let mut keyed: Vec<(f64, usize)> = items.map(|(i, w)| (weight_key(rng, w), i)).collect();
    keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
    keyed.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_tiers_come_in_order() {
        let mut rng = fastrand::Rng::with_seed(7);
        let facts = [(0, 2, 100), (1, 1, 100), (2, 3, 100), (3, 1, 100)];
        for _ in 0..100 {
            let r = rank_priority(&facts, &mut rng);
            assert_eq!(r.len(), 4);
            assert!(r[..2].contains(&1) && r[..2].contains(&3), "{r:?}");
            assert_eq!(&r[2..], &[0, 2]);
        }
    }

    #[test]
    fn weights_set_first_place_shares() {
        let mut rng = fastrand::Rng::with_seed(42);
        let n = 40_000;
        let mut first = [0u32; 3];
        for _ in 0..n {
            first[weighted_order([(0, 100), (1, 300), (2, 600)].into_iter(), &mut rng)[0]] += 1;
        }
        // Expected shares 10%, 30%, 60%; allow ±1.5 percentage points.
        for (got, want) in first.iter().zip([0.1, 0.3, 0.6]) {
            let share = f64::from(*got) / f64::from(n);
            assert!((share - want).abs() < 0.015, "share {share} want {want}");
        }
    }

    #[test]
    fn tried_set_never_admits_twice() {
        let mut t = Tried::default();
        assert!(t.insert(3));
        assert!(!t.insert(3));
        assert!(t.insert(63));
        assert!(!t.insert(64));
        assert_eq!(t.len(), 2);
        assert!(t.contains(63) && !t.contains(0));
    }
}
