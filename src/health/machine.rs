//! The endpoint health state machine: pure, no I/O, no clock.
//!
//! [`next`] maps (phase, event) to the new phase and the one side effect the transition carries
//! (a failure-queue entry opened or closed). [`crate::health::queue::FailureQueue::transition`] applies it
//! under the queue's lock: it re-reads the phase there, re-runs `next` and stores the new phase, so
//! when many attempts race on the same transition exactly one of them wins and performs the effect
//! — that is what makes "one failure episode per outage" hold.

/// Where an endpoint stands with respect to rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Phase {
    /// In rotation.
    Healthy = 0,
    /// Out of rotation after `failure_threshold` consecutive failures; probes decide its return.
    Ejected = 1,
    /// Out of rotation after a 429 until its reset time passes.
    CoolingDown = 2,
    /// Out of rotation because its credential was refused (401/403); a probe must verify it.
    AuthDisabled = 3,
    /// Back after a passed probe, admitting one real request at a time until one succeeds.
    Probation = 4,
}

impl Phase {
    /// Decodes the value stored in the atomic cell.
    pub fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::Ejected,
            2 => Phase::CoolingDown,
            3 => Phase::AuthDisabled,
            4 => Phase::Probation,
            _ => Phase::Healthy,
        }
    }
    /// Whether the endpoint sits in the failure queue in this phase.
    pub fn is_out(self) -> bool {
        !matches!(self, Phase::Healthy)
    }
    /// Whether this phase admits no request at all (`Probation` admits one at a time).
    pub fn is_excluded(self) -> bool {
        matches!(
            self,
            Phase::Ejected | Phase::CoolingDown | Phase::AuthDisabled
        )
    }
}

/// Why an endpoint left rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Too many consecutive failures.
    Failures,
    /// 429.
    RateLimited,
    /// 401/402/403.
    Auth,
}

impl Reason {
    /// Stable name for views.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Failures => "consecutive_failures",
            Reason::RateLimited => "rate_limited",
            Reason::Auth => "auth",
        }
    }
}

/// Something that happened to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// An attempt failed with an ordinary fault; `consecutive` is the failure count including it.
    Failure {
        /// Consecutive failures including this one.
        consecutive: u32,
    },
    /// An attempt got a 429.
    RateLimited,
    /// An attempt was refused for its credential.
    AuthFailed,
    /// A real attempt succeeded.
    Success,
    /// A recovery probe verified the endpoint.
    ProbePassed,
    /// The cooldown deadline passed.
    CooldownExpired,
}

/// The side effect a transition carries; performed only by the attempt that won the transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing beyond the phase change.
    None,
    /// A new failure episode: add a failure-queue entry.
    Open(Reason),
    /// The entry already exists; its reason changes.
    Reason(Reason),
    /// The probe passed: the entry switches to probation.
    Probation,
    /// The episode is over: remove the entry.
    Close,
}

/// The transition for `event` in `phase`, or `None` when the phase stays as it is.
pub fn next(phase: Phase, event: Event, threshold: u32) -> Option<(Phase, Effect)> {
    use Event as E;
    use Phase as P;
    match (phase, event) {
        (P::Healthy, E::Failure { consecutive }) if consecutive >= threshold => {
            Some((P::Ejected, Effect::Open(Reason::Failures)))
        }
        (P::Healthy, E::RateLimited) => Some((P::CoolingDown, Effect::Open(Reason::RateLimited))),
        (P::Healthy, E::AuthFailed) => Some((P::AuthDisabled, Effect::Open(Reason::Auth))),
        // Probation admits one request; if it fails the endpoint goes straight back out, in the
        // same episode.
        (P::Probation, E::Failure { .. }) => Some((P::Ejected, Effect::Reason(Reason::Failures))),
        (P::Probation, E::RateLimited) => {
            Some((P::CoolingDown, Effect::Reason(Reason::RateLimited)))
        }
        (P::Probation | P::Ejected | P::CoolingDown, E::AuthFailed) => {
            Some((P::AuthDisabled, Effect::Reason(Reason::Auth)))
        }
        // A real success proves more than any probe, whatever the phase.
        (P::Probation | P::Ejected | P::CoolingDown | P::AuthDisabled, E::Success) => {
            Some((P::Healthy, Effect::Close))
        }
        (P::Ejected | P::AuthDisabled, E::ProbePassed) => Some((P::Probation, Effect::Probation)),
        (P::CoolingDown, E::CooldownExpired) => Some((P::Healthy, Effect::Close)),
        _ => None,
    }
}

/// Growing probe backoff: `base * 2^attempts`, capped, with up to ±20% jitter from `jitter`
/// (a number in `[0, 1)`).
pub fn probe_backoff(
    base: std::time::Duration,
    cap: std::time::Duration,
    attempts: u32,
    jitter: f64,
) -> std::time::Duration {
    let exp = base
        .saturating_mul(1u32.checked_shl(attempts.min(20)).unwrap_or(u32::MAX))
        .min(cap);
    let factor = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
    exp.mul_f64(factor).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Effect as F;
    use Event as E;
    use Phase as P;

    type Row = (P, E, Option<(P, F)>);

    #[test]
    fn transition_table() {
        let t = 3;
        let table: &[Row] = &[
            (P::Healthy, E::Failure { consecutive: 1 }, None),
            (P::Healthy, E::Failure { consecutive: 2 }, None),
            (
                P::Healthy,
                E::Failure { consecutive: 3 },
                Some((P::Ejected, F::Open(Reason::Failures))),
            ),
            (
                P::Healthy,
                E::Failure { consecutive: 9 },
                Some((P::Ejected, F::Open(Reason::Failures))),
            ),
            (
                P::Healthy,
                E::RateLimited,
                Some((P::CoolingDown, F::Open(Reason::RateLimited))),
            ),
            (
                P::Healthy,
                E::AuthFailed,
                Some((P::AuthDisabled, F::Open(Reason::Auth))),
            ),
            (P::Healthy, E::Success, None),
            (P::Healthy, E::ProbePassed, None),
            (P::Healthy, E::CooldownExpired, None),
            (P::Ejected, E::Failure { consecutive: 9 }, None),
            (P::Ejected, E::RateLimited, None),
            (
                P::Ejected,
                E::AuthFailed,
                Some((P::AuthDisabled, F::Reason(Reason::Auth))),
            ),
            (
                P::Ejected,
                E::ProbePassed,
                Some((P::Probation, F::Probation)),
            ),
            (P::Ejected, E::Success, Some((P::Healthy, F::Close))),
            (P::Ejected, E::CooldownExpired, None),
            (P::CoolingDown, E::RateLimited, None),
            (P::CoolingDown, E::Failure { consecutive: 5 }, None),
            (
                P::CoolingDown,
                E::CooldownExpired,
                Some((P::Healthy, F::Close)),
            ),
            (P::CoolingDown, E::ProbePassed, None),
            (
                P::CoolingDown,
                E::AuthFailed,
                Some((P::AuthDisabled, F::Reason(Reason::Auth))),
            ),
            (P::AuthDisabled, E::Failure { consecutive: 5 }, None),
            (P::AuthDisabled, E::AuthFailed, None),
            (
                P::AuthDisabled,
                E::ProbePassed,
                Some((P::Probation, F::Probation)),
            ),
            (P::AuthDisabled, E::Success, Some((P::Healthy, F::Close))),
            (P::Probation, E::Success, Some((P::Healthy, F::Close))),
            (
                P::Probation,
                E::Failure { consecutive: 1 },
                Some((P::Ejected, F::Reason(Reason::Failures))),
            ),
            (
                P::Probation,
                E::RateLimited,
                Some((P::CoolingDown, F::Reason(Reason::RateLimited))),
            ),
            (
                P::Probation,
                E::AuthFailed,
                Some((P::AuthDisabled, F::Reason(Reason::Auth))),
            ),
            (P::Probation, E::ProbePassed, None),
        ];
        for (phase, event, want) in table {
            assert_eq!(next(*phase, *event, t), *want, "{phase:?} + {event:?}");
        }
    }

    #[test]
    fn every_open_starts_from_healthy_and_every_close_ends_out() {
        // Episodes can only be opened from rotation and only closed from outside it, so the
        // number of queue entries can never exceed one per endpoint.
        let phases = [
            P::Healthy,
            P::Ejected,
            P::CoolingDown,
            P::AuthDisabled,
            P::Probation,
        ];
        let events = [
            E::Failure { consecutive: 1 },
            E::Failure { consecutive: 100 },
            E::RateLimited,
            E::AuthFailed,
            E::Success,
            E::ProbePassed,
            E::CooldownExpired,
        ];
        for p in phases {
            for e in events {
                if let Some((to, effect)) = next(p, e, 3) {
                    match effect {
                        F::Open(_) => assert!(p == P::Healthy && to.is_out()),
                        F::Close => assert!(p.is_out() && to == P::Healthy),
                        F::Reason(_) | F::Probation => assert!(p.is_out() && to.is_out()),
                        F::None => {}
                    }
                    assert_eq!(
                        to.is_out(),
                        !matches!(effect, F::Close) && (p.is_out() || matches!(effect, F::Open(_)))
                    );
                }
            }
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        use std::time::Duration as D;
        let b = D::from_secs(10);
        let cap = D::from_secs(300);
        assert_eq!(probe_backoff(b, cap, 0, 0.5), D::from_secs(10));
        assert_eq!(probe_backoff(b, cap, 1, 0.5), D::from_secs(20));
        assert_eq!(probe_backoff(b, cap, 3, 0.5), D::from_secs(80));
        assert_eq!(probe_backoff(b, cap, 10, 0.5), cap);
        assert_eq!(probe_backoff(b, cap, u32::MAX, 0.99), cap);
        assert_eq!(probe_backoff(b, cap, 0, 0.0), D::from_secs(8));
        assert!(probe_backoff(b, cap, 0, 0.999) < D::from_secs(12));
    }
}
