//! Exhaustive interleavings of the transition that must have exactly one winner.
//!
//! The same scenarios run two ways over the real `Attempt` → `FailureQueue::transition` code:
//!
//! - under loom, which explores every interleaving of the atomics and the queue lock
//!   (`src/sync.rs` swaps loom's primitives in):
//!   `RUSTFLAGS="--cfg ccgate_loom" CARGO_TARGET_DIR=target/loom cargo test --test one_winner`
//!   (a crate-specific cfg: a global `--cfg loom` reconfigures tokio and breaks hyper-util)
//! - in a plain `cargo test`, as a stress test: many rounds of real threads released together by
//!   a barrier.
//!
//! Each scenario has several threads record an outcome on one endpoint at the same moment and then
//! checks what must hold whoever won: one queue entry per endpoint out of rotation, one episode
//! per outage, no lost counter update, a cooldown deadline equal to the longest one asked for.

use std::sync::Arc;
use std::time::Duration;

#[cfg(ccgate_loom)]
use loom::thread;
#[cfg(not(ccgate_loom))]
use std::thread;

use ccgate::clock::Clock;
use ccgate::config::Config;
use ccgate::health::attempt::{Attempt, Recorder};
use ccgate::health::classify::{Outcome, TransportKind};
use ccgate::health::endpoint::Endpoint;
use ccgate::health::machine::{Phase, Reason};
use ccgate::health::queue::FailureQueue;
use ccgate::transport::upstream::{UpstreamClient, build_client};

/// Rounds per scenario in the std stress version.
#[cfg(not(ccgate_loom))]
const ROUNDS: usize = 2000;

/// What a scenario needs that is not loom state: built once, outside the model.
struct Fixture {
    config: Config,
    client: UpstreamClient,
}

fn fixture() -> Arc<Fixture> {
    let toml = "[server]\nlisten = \"127.0.0.1:0\"\n\
                [[endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"key-a\"\n";
    let env = |_: &str| None;
    let config = Config::from_toml(toml, "one_winner.toml", &env).unwrap_or_else(|e| panic!("{e}"));
    let client = build_client(None, &config.timeouts).unwrap_or_else(|e| panic!("{e}"));
    Arc::new(Fixture { config, client })
}

/// One endpoint and its failure queue, fresh for each round (loom: each explored execution).
struct World {
    ep: Arc<Endpoint>,
    recorder: Arc<Recorder>,
    queue: Arc<FailureQueue>,
}

impl World {
    fn new(fx: &Fixture, threshold: u32) -> Self {
        let clock = Clock::new();
        let queue = Arc::new(FailureQueue::new(
            clock,
            threshold,
            Duration::from_secs(10),
            Duration::from_secs(300),
        ));
        let recorder = Arc::new(Recorder {
            clock,
            queue: Arc::clone(&queue),
            default_cooldown: Duration::from_secs(30),
        });
        let ep = Arc::new(Endpoint::new(0, &fx.config.endpoints[0], fx.client.clone()));
        Self {
            ep,
            recorder,
            queue,
        }
    }

    fn record(&self, outcome: Outcome) {
        Attempt::begin(Arc::clone(&self.ep), Arc::clone(&self.recorder), false)
            .finish(outcome, None);
    }

    /// What must hold after any set of recorded outcomes, whatever the interleaving.
    fn check_consistent(&self) {
        let phase = self.ep.live.phase();
        let (entries, stats) = self.queue.view();
        assert_eq!(
            entries.len(),
            usize::from(phase.is_out()),
            "queued iff out of rotation ({phase:?}, {entries:?})"
        );
        assert_eq!(
            stats.total_failed - stats.total_closed,
            entries.len() as u64,
            "every open episode has its entry: {stats:?}"
        );
        if let Some(e) = entries.first() {
            let want = match phase {
                Phase::Ejected => Reason::Failures,
                Phase::CoolingDown => Reason::RateLimited,
                Phase::AuthDisabled => Reason::Auth,
                Phase::Healthy | Phase::Probation => unreachable!("{phase:?} after attempts only"),
            };
            assert_eq!(e.reason, want, "the entry's reason names the phase");
            if phase == Phase::CoolingDown {
                assert_eq!(
                    e.next_probe_at_ms,
                    self.ep.live.cooldown_until_ms(),
                    "a cooling-down entry shows the (longest) deadline"
                );
            }
        }
        let c = self.ep.live.snapshot();
        assert_eq!(c.in_flight, 0, "every attempt ended");
    }
}

/// Starts `n` threads that each run `body(i)` at the same moment, and joins them.
/// Under loom the model checker decides the order; otherwise a barrier releases them together.
fn race(n: usize, body: impl Fn(usize) + Send + Sync + 'static) {
    let body = Arc::new(body);
    #[cfg(not(ccgate_loom))]
    let gate = Arc::new(std::sync::Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let body = Arc::clone(&body);
            #[cfg(not(ccgate_loom))]
            let gate = Arc::clone(&gate);
            thread::spawn(move || {
                #[cfg(not(ccgate_loom))]
                gate.wait();
                body(i);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("racer panicked");
    }
}

/// Runs `scenario` with `n` racing threads.
///
/// Under loom: with 2 racers every interleaving (no preemption bound), then with 3 racers every
/// interleaving with at most 3 preemptions (about 37,000 executions, ~10 s in a debug build;
/// unbounded 3-thread runs did not finish in 15 minutes), unless `LOOM_MAX_PREEMPTIONS` is set.
/// Prints how many executions were explored. Otherwise `ROUNDS` rounds of 8 real threads.
fn explore(name: &str, scenario: impl Fn(&Fixture, usize) + Send + Sync + 'static) {
    let fx = fixture();
    #[cfg(ccgate_loom)]
    {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let scenario = Arc::new(scenario);
        for (racers, bound) in [(2, None), (3, Some(3))] {
            let runs = Arc::new(AtomicUsize::new(0));
            let mut builder = loom::model::Builder::new();
            if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
                builder.preemption_bound = bound;
            }
            let (fx, scenario, counter) =
                (Arc::clone(&fx), Arc::clone(&scenario), Arc::clone(&runs));
            builder.check(move || {
                counter.fetch_add(1, Ordering::Relaxed);
                scenario(&fx, racers);
            });
            eprintln!(
                "loom {name}: {racers} racers, preemption bound {:?}: {} executions explored",
                builder.preemption_bound,
                runs.load(Ordering::Relaxed)
            );
        }
    }
    #[cfg(not(ccgate_loom))]
    {
        let _ = name;
        for _ in 0..ROUNDS {
            scenario(&fx, 8);
        }
    }
}

/// The seed's scenario in miniature: every racing attempt fails and each one's count reaches the
/// threshold. Exactly one ejects; one queue entry, one episode; no count is lost.
#[test]
fn concurrent_failures_at_the_threshold_eject_once() {
    explore(
        "concurrent_failures_at_the_threshold_eject_once",
        |fx, racers| {
            let w = Arc::new(World::new(fx, 1));
            let w2 = Arc::clone(&w);
            race(racers, move |_| w2.record(Outcome::ServerError));
            assert_eq!(w.ep.live.phase(), Phase::Ejected);
            let (entries, stats) = w.queue.view();
            assert_eq!(entries.len(), 1, "one queue entry");
            assert_eq!(stats.total_failed, 1, "one episode");
            assert_eq!(stats.total_closed, 0);
            assert_eq!(w.ep.live.consecutive_failures(), racers as u32);
            let c = w.ep.live.snapshot();
            assert_eq!(
                (c.total, c.failed(), c.in_flight),
                (racers as u64, racers as u64, 0)
            );
            w.check_consistent();
        },
    );
}

/// A threshold above one: only the attempts whose count reaches it race on the ejection; the
/// one that crosses it may not be the one that wins the lock, but someone ejects, once.
#[test]
fn only_attempts_that_reach_the_threshold_race_and_one_wins() {
    explore(
        "only_attempts_that_reach_the_threshold_race_and_one_wins",
        |fx, racers| {
            let w = Arc::new(World::new(fx, 2));
            let w2 = Arc::clone(&w);
            race(racers, move |i| {
                w2.record(if i % 2 == 0 {
                    Outcome::Overloaded
                } else {
                    Outcome::Transport(TransportKind::Cut)
                })
            });
            assert_eq!(w.ep.live.phase(), Phase::Ejected);
            assert_eq!(w.queue.view().1.total_failed, 1);
            w.check_consistent();
        },
    );
}

/// Different faults at once: a failure at the threshold and 429s with different hints (and, with
/// real threads, a refused credential). Whoever wins, it is one episode with one entry whose
/// reason matches the phase, and the cooldown deadline is the longest one asked for.
#[test]
fn mixed_faults_open_one_episode_and_keep_the_longest_cooldown() {
    explore(
        "mixed_faults_open_one_episode_and_keep_the_longest_cooldown",
        |fx, racers| {
            let w = Arc::new(World::new(fx, 1));
            let start = w.recorder.clock.now_ms();
            let w2 = Arc::clone(&w);
            race(racers, move |i| {
                w2.record(match i % 4 {
                    0 => Outcome::ServerError,
                    1 => Outcome::RateLimited(Some(Duration::from_secs(60))),
                    2 => Outcome::RateLimited(Some(Duration::from_secs(5))),
                    _ => Outcome::Auth,
                })
            });
            let end = w.recorder.clock.now_ms();
            let (entries, stats) = w.queue.view();
            assert_eq!(entries.len(), 1);
            assert_eq!(stats.total_failed, 1);
            assert!(w.ep.live.phase().is_out());
            let until = w.ep.live.cooldown_until_ms();
            assert!(
                (start + 60_000..=end + 60_000).contains(&until),
                "deadline {until} is not the 60 s one (recorded between {start} and {end})"
            );
            w.check_consistent();
        },
    );
}

/// A success racing failures at the threshold: every failure that linearizes after the success
/// ejects again, so there may be two episodes, but queue and phase always agree: never queued
/// while healthy, never out without an entry, and one success closes at most one episode.
#[test]
fn a_success_racing_failures_leaves_queue_and_phase_agreeing() {
    explore(
        "a_success_racing_failures_leaves_queue_and_phase_agreeing",
        |fx, racers| {
            let w = Arc::new(World::new(fx, 1));
            let w2 = Arc::clone(&w);
            race(racers, move |i| {
                w2.record(if i == 0 {
                    Outcome::Success
                } else {
                    Outcome::ServerError
                })
            });
            let stats = w.queue.view().1;
            let (failed, closed) = (stats.total_failed, stats.total_closed);
            match w.ep.live.phase() {
                // Every failure came before the success, which closed their one episode.
                Phase::Healthy => assert_eq!((failed, closed), (1, 1)),
                Phase::Ejected => assert!(
                    closed <= 1 && failed == closed + 1,
                    "one open episode: {stats:?}"
                ),
                p => panic!("{p:?} after failures and a success"),
            }
            w.check_consistent();
        },
    );
}

/// Readers racing one writer never see a torn snapshot: every ended attempt's start is visible,
/// so `in_flight` is never negative (it would saturate and break the identity), and the sum
/// identity holds.
#[test]
fn snapshots_taken_during_recording_are_never_torn() {
    explore(
        "snapshots_taken_during_recording_are_never_torn",
        |fx, racers| {
            let w = Arc::new(World::new(fx, 1));
            let w2 = Arc::clone(&w);
            let writes = if cfg!(ccgate_loom) { 1 } else { 500 };
            race(racers, move |i| {
                if i == 0 {
                    for k in 0..writes {
                        w2.record(if k % 3 == 0 {
                            Outcome::Success
                        } else {
                            Outcome::ServerError
                        });
                    }
                } else {
                    let mut last_total = 0;
                    for _ in 0..writes {
                        let c = w2.ep.live.snapshot();
                        let ended: u64 = c.by_kind.iter().sum();
                        assert_eq!(
                            c.total,
                            ended + c.in_flight,
                            "torn snapshot: started {} < ended {ended}",
                            c.total
                        );
                        assert_eq!(
                            c.successful() + c.failed() + c.cancelled() + c.in_flight,
                            c.total
                        );
                        // Not `in_flight <= 1`: attempts that end while the snapshot is being
                        // read count as in flight (ARCHITECTURE.md, invariant 2).
                        assert!(c.total >= last_total, "totals never go back");
                        last_total = c.total;
                    }
                }
            });
            assert_eq!(w.ep.live.snapshot().total, writes as u64);
        },
    );
}
