//! Property tests of the pure health state machine (`health::next`), of probe backoff
//! (`health::probe_backoff`), and a model-based test of cooldown deadlines against the real
//! recorder and admission on a paused clock.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use ccgate::config::Config;
use ccgate::health::attempt::Attempt;
use ccgate::health::classify::Outcome;
use ccgate::health::machine::{self as health, Effect, Event, Phase, Reason};
use ccgate::health::registry::{Admission, Registry};

const PHASES: [Phase; 5] = [
    Phase::Healthy,
    Phase::Ejected,
    Phase::CoolingDown,
    Phase::AuthDisabled,
    Phase::Probation,
];

/// What happened to one attempt or probe, before the recorder turns it into an [`Event`].
#[derive(Clone, Copy, Debug)]
enum Happening {
    Fault,
    RateLimited,
    AuthFailed,
    Success,
    ProbePassed,
    CooldownExpired,
}

fn happening() -> impl Strategy<Value = Happening> {
    prop_oneof![
        4 => Just(Happening::Fault),
        1 => Just(Happening::RateLimited),
        1 => Just(Happening::AuthFailed),
        2 => Just(Happening::Success),
        1 => Just(Happening::ProbePassed),
        1 => Just(Happening::CooldownExpired),
    ]
}

fn phase() -> impl Strategy<Value = Phase> {
    proptest::sample::select(PHASES.to_vec())
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (0u32..20).prop_map(|consecutive| Event::Failure { consecutive }),
        Just(Event::RateLimited),
        Just(Event::AuthFailed),
        Just(Event::Success),
        Just(Event::ProbePassed),
        Just(Event::CooldownExpired),
    ]
}

/// The phase a reason puts an endpoint in.
fn phase_for(reason: Reason) -> Phase {
    match reason {
        Reason::Failures => Phase::Ejected,
        Reason::RateLimited => Phase::CoolingDown,
        Reason::Auth => Phase::AuthDisabled,
    }
}

/// Checks one transition of `next` against the rules it must obey, whatever the history.
fn check_step(
    from: Phase,
    event: Event,
    threshold: u32,
) -> Result<Option<(Phase, Effect)>, TestCaseError> {
    let got = health::next(from, event, threshold);
    let Some((to, effect)) = got else {
        // Nothing moves from Healthy except a fault that reaches the threshold, a 429 or a refusal.
        if from == Phase::Healthy {
            prop_assert!(
                !matches!(event, Event::RateLimited | Event::AuthFailed),
                "{event:?} must take a healthy endpoint out"
            );
            if let Event::Failure { consecutive } = event {
                prop_assert!(
                    consecutive < threshold,
                    "{consecutive} >= {threshold} must eject"
                );
            }
        }
        if from == Phase::Probation {
            prop_assert!(
                matches!(event, Event::ProbePassed | Event::CooldownExpired),
                "probation must react to {event:?}"
            );
        }
        return Ok(None);
    };
    prop_assert_ne!(to, from, "a transition changes the phase");
    prop_assert_eq!(
        Phase::from_u8(to as u8),
        to,
        "phase survives the atomic cell"
    );

    // Effects agree with the phase change: an episode opens exactly when the endpoint leaves
    // rotation and closes exactly when it comes back.
    let (was_out, is_out) = (from.is_out(), to.is_out());
    prop_assert_eq!(matches!(effect, Effect::Open(_)), !was_out && is_out);
    prop_assert_eq!(matches!(effect, Effect::Close), was_out && !is_out);
    prop_assert_eq!(matches!(effect, Effect::Probation), to == Phase::Probation);
    prop_assert_eq!(
        matches!(effect, Effect::Reason(_)),
        was_out && is_out && to != Phase::Probation
    );
    prop_assert_ne!(
        effect,
        Effect::None,
        "every phase change carries its queue effect"
    );
    if let Effect::Open(r) | Effect::Reason(r) = effect {
        prop_assert_eq!(phase_for(r), to, "the entry's reason names the phase");
    }

    // Ejection happens exactly when the consecutive count reaches the threshold in rotation.
    if from == Phase::Healthy && to == Phase::Ejected {
        let Event::Failure { consecutive } = event else {
            return Err(TestCaseError::fail(format!("ejected by {event:?}")));
        };
        prop_assert!(consecutive >= threshold);
    }
    if let (Phase::Healthy, Event::Failure { consecutive }) = (from, event) {
        prop_assert_eq!(consecutive >= threshold, to == Phase::Ejected);
    }
    // A refused credential is only left through proof that it works: a passed probe (to
    // probation) or a real success.
    if from == Phase::AuthDisabled {
        prop_assert!(
            matches!(
                (event, to),
                (Event::ProbePassed, Phase::Probation) | (Event::Success, Phase::Healthy)
            ),
            "left auth-disabled by {event:?} to {to:?}"
        );
    }
    // Probation: one success brings it back, any fault sends it out again.
    if from == Phase::Probation {
        let want = match event {
            Event::Success => Phase::Healthy,
            Event::Failure { .. } => Phase::Ejected,
            Event::RateLimited => Phase::CoolingDown,
            Event::AuthFailed => Phase::AuthDisabled,
            _ => return Err(TestCaseError::fail(format!("probation moved by {event:?}"))),
        };
        prop_assert_eq!(to, want);
    }
    // Probation is only entered through a passed probe.
    if to == Phase::Probation {
        prop_assert_eq!(event, Event::ProbePassed);
        prop_assert!(matches!(from, Phase::Ejected | Phase::AuthDisabled));
    }
    // Back in rotation only on a real success or an expired cooldown.
    if to == Phase::Healthy {
        prop_assert!(
            event == Event::Success
                || (event == Event::CooldownExpired && from == Phase::CoolingDown)
        );
    }
    // The losers of a race re-run `next` under the lock with the same event on the winner's
    // phase: they must find nothing left to do, or the effect would be performed twice.
    prop_assert_eq!(
        health::next(to, event, threshold),
        None,
        "a repeated {:?} after {:?} -> {:?} must be a no-op",
        event,
        from,
        to
    );
    Ok(got)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Every single transition, from any phase, obeys the rules.
    #[test]
    fn every_transition_obeys_the_rules(from in phase(), event in event(), threshold in 1u32..10) {
        check_step(from, event, threshold)?;
    }

    /// Only fault events depend on the threshold.
    #[test]
    fn only_faults_depend_on_the_threshold(from in phase(), event in event(), a in 1u32..10, b in 1u32..10) {
        if !matches!(event, Event::Failure { .. }) {
            prop_assert_eq!(health::next(from, event, a), health::next(from, event, b));
        }
    }

    /// Any decoded byte is a valid phase, and the encoding round-trips.
    #[test]
    fn phases_decode_to_valid_values(v in any::<u8>()) {
        let p = Phase::from_u8(v);
        // Each phase's own value decodes to it; any other byte falls back to `Healthy`.
        let expected = PHASES.get(usize::from(v)).copied().unwrap_or(Phase::Healthy);
        prop_assert_eq!(p, expected);
        prop_assert_eq!(p as u8, if usize::from(v) < PHASES.len() { v } else { 0 });
        prop_assert_eq!(Phase::from_u8(p as u8), p);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Random histories driven the way the recorder drives the machine (the consecutive count
    /// rises on every endpoint fault and resets on success): at every step the failure queue
    /// holds the endpoint iff it is out of rotation, episodes open only from rotation, and the
    /// `threshold`-th consecutive fault in rotation is the one that ejects.
    #[test]
    fn histories_keep_one_entry_per_outage(
        threshold in 1u32..6,
        steps in proptest::collection::vec(happening(), 1..80),
    ) {
        let mut phase = Phase::Healthy;
        let mut consecutive = 0u32;
        let mut entry_open = false;
        let (mut opened, mut closed) = (0u32, 0u32);
        for h in steps {
            let event = match h {
                Happening::Fault => {
                    consecutive += 1;
                    Event::Failure { consecutive }
                }
                Happening::RateLimited => {
                    consecutive += 1;
                    Event::RateLimited
                }
                Happening::AuthFailed => {
                    consecutive += 1;
                    Event::AuthFailed
                }
                Happening::Success => {
                    consecutive = 0;
                    Event::Success
                }
                Happening::ProbePassed => Event::ProbePassed,
                Happening::CooldownExpired => Event::CooldownExpired,
            };
            let before = phase;
            if let Some((to, effect)) = check_step(phase, event, threshold)? {
                match effect {
                    Effect::Open(_) => {
                        prop_assert!(!entry_open, "a second entry for one endpoint");
                        entry_open = true;
                        opened += 1;
                    }
                    Effect::Close => {
                        prop_assert!(entry_open, "closing an entry that is not there");
                        entry_open = false;
                        closed += 1;
                    }
                    Effect::Reason(_) | Effect::Probation => prop_assert!(entry_open),
                    Effect::None => {}
                }
                phase = to;
            }
            prop_assert_eq!(entry_open, phase.is_out());
            prop_assert!(opened == closed || opened == closed + 1);
            if before == Phase::Healthy && matches!(h, Happening::Fault) {
                prop_assert_eq!(phase == Phase::Ejected, consecutive >= threshold);
            }
        }
    }

    /// Backoff with a fixed jitter never shrinks as failed probes accumulate, and never passes
    /// the cap.
    #[test]
    fn backoff_is_monotone_and_capped(
        base_ms in 1u64..60_000,
        cap_factor in 1u64..200,
        jitter in 0.0f64..1.0,
        attempts in 0u32..70,
    ) {
        let base = Duration::from_millis(base_ms);
        let cap = base * u32::try_from(cap_factor).unwrap_or(1);
        let a = health::probe_backoff(base, cap, attempts, jitter);
        let b = health::probe_backoff(base, cap, attempts + 1, jitter);
        prop_assert!(a <= b, "{a:?} then {b:?}");
        prop_assert!(b <= cap);
    }

    /// The jitter stays within ±20% of `min(base · 2^attempts, cap)` (never above the cap), and
    /// below the cap growth beats jitter: the next delay is longer whatever both jitters were.
    #[test]
    fn backoff_jitter_stays_in_bounds(
        base_ms in 1u64..60_000,
        cap_factor in 1u64..200,
        attempts in 0u32..70,
        j1 in 0.0f64..1.0,
        j2 in 0.0f64..1.0,
    ) {
        let base = Duration::from_millis(base_ms);
        let cap = base * u32::try_from(cap_factor).unwrap_or(1);
        let exp = |n: u32| base.saturating_mul(2u32.saturating_pow(n)).min(cap);
        let d = health::probe_backoff(base, cap, attempts, j1);
        let low = exp(attempts).mul_f64(0.8);
        let high = exp(attempts).mul_f64(1.2).min(cap);
        let ns = Duration::from_nanos(1);
        prop_assert!(d + ns >= low && d <= high + ns, "{d:?} not in [{low:?}, {high:?}]");
        if exp(attempts + 1) < cap {
            let next = health::probe_backoff(base, cap, attempts + 1, j2);
            prop_assert!(next > d, "{next:?} after {d:?}");
        }
        // Out-of-range jitter is clamped, not extrapolated.
        prop_assert_eq!(
            health::probe_backoff(base, cap, attempts, -3.0),
            health::probe_backoff(base, cap, attempts, 0.0)
        );
        prop_assert_eq!(
            health::probe_backoff(base, cap, attempts, 7.0),
            health::probe_backoff(base, cap, attempts, 1.0)
        );
    }
}

/// One step of the cooldown model: let time pass, then maybe get a 429.
#[derive(Clone, Debug)]
struct CooldownStep {
    advance_ms: u64,
    /// `None`: no 429 this step. `Some(None)`: a 429 without a reset hint.
    rate_limited: Option<Option<u64>>,
}

fn cooldown_step() -> impl Strategy<Value = CooldownStep> {
    (
        0u64..40_000,
        prop_oneof![
            1 => Just(None),
            1 => Just(Some(None)),
            4 => (0u64..90_000).prop_map(|w| Some(Some(w))),
        ],
    )
        .prop_map(|(advance_ms, rate_limited)| CooldownStep {
            advance_ms,
            rate_limited,
        })
}

const DEFAULT_COOLDOWN_MS: u64 = 30_000;

fn cooldown_config() -> Config {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\
         [health]\nfailure_threshold = 3\nrate_limit_cooldown = \"{DEFAULT_COOLDOWN_MS}ms\"\n\
         [[endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"key-a\"\n"
    );
    let env = |_: &str| None;
    Config::from_toml(&toml, "cooldown.toml", &env).unwrap_or_else(|e| panic!("{e}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The real recorder and admission on a paused clock against a model: the cooldown deadline
    /// is the maximum of every `now + retry-after` seen (a shorter later hint never shortens
    /// it), admission says no strictly before the deadline and yes from it on, and each
    /// cooldown that ran out and was followed by another 429 is a new episode.
    #[test]
    fn cooldown_deadline_is_the_max_and_admission_follows_it(
        steps in proptest::collection::vec(cooldown_step(), 1..40),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        rt.block_on(async move {
            let reg = Registry::new(&cooldown_config()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let ep = Arc::clone(&reg.endpoints[0]);
            let mut deadline = 0u64;
            let mut cooling = false;
            let mut episodes = 0u64;
            for step in steps {
                tokio::time::advance(Duration::from_millis(step.advance_ms)).await;
                let now = reg.clock.now_ms();
                let admitted = reg.admit(&ep);
                if cooling && now < deadline {
                    prop_assert_eq!(admitted, Admission::No, "admitted {} ms early", deadline - now);
                    prop_assert_eq!(ep.live.phase(), Phase::CoolingDown);
                } else {
                    prop_assert_eq!(admitted, Admission::Yes, "still out {} ms after", now.saturating_sub(deadline));
                    prop_assert_eq!(ep.live.phase(), Phase::Healthy);
                    cooling = false;
                }
                if let Some(hint) = step.rate_limited {
                    Attempt::begin(Arc::clone(&ep), Arc::clone(&reg.recorder), false)
                        .finish(Outcome::RateLimited(hint.map(Duration::from_millis)), None);
                    deadline = deadline.max(now + hint.unwrap_or(DEFAULT_COOLDOWN_MS).max(1));
                    if !cooling {
                        episodes += 1;
                        cooling = true;
                    }
                    prop_assert_eq!(ep.live.phase(), Phase::CoolingDown);
                }
                prop_assert_eq!(ep.live.cooldown_until_ms(), deadline);
                let (entries, stats) = reg.queue.view();
                prop_assert_eq!(entries.len(), usize::from(cooling));
                prop_assert_eq!(stats.total_failed, episodes);
                prop_assert_eq!(stats.total_closed, episodes - u64::from(cooling));
                if let Some(e) = entries.first() {
                    prop_assert_eq!(e.reason, Reason::RateLimited);
                    prop_assert_eq!(e.next_probe_at_ms, deadline, "the entry shows when it is back");
                }
            }
            Ok(())
        })?;
    }
}
