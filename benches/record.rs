//! Hot-path benchmarks: recording an attempt's outcome on one endpoint from 1, 2 and 8 threads,
//! beside a `Mutex<HashMap<String, Stats>>` recorder (the approach of the tool ccgate replaces)
//! measured in the same run; ranking four endpoints; scanning one SSE event.
//!
//! `cargo bench --bench record`. Multi-threaded figures are wall time divided by the records
//! made by all threads together (ns per record, aggregate), measured from a common barrier.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use ccgate::config::{Config, Strategy};
use ccgate::health::attempt::{Attempt, Recorder};
use ccgate::health::classify::Outcome;
use ccgate::health::endpoint::Endpoint;
use ccgate::health::registry::Registry;
use ccgate::select::strategy::Selector;
use ccgate::wire::sse::SseScanner;

const THREADS: [usize; 3] = [1, 2, 8];

fn registry() -> Registry {
    let mut toml =
        String::from("[server]\nlisten = \"127.0.0.1:0\"\n[health]\nfailure_threshold = 5\n");
    for (name, priority) in [("a", 1), ("b", 1), ("c", 2), ("d", 3)] {
        toml.push_str(&format!(
            "[[endpoints]]\nname = \"{name}\"\nbase_url = \"http://127.0.0.1:9\"\n\
             api_key = \"key-{name}\"\npriority = {priority}\n"
        ));
    }
    let env = |_: &str| None;
    let config = Config::from_toml(&toml, "bench.toml", &env).unwrap_or_else(|e| panic!("{e}"));
    Registry::new(&config).unwrap_or_else(|e| panic!("{e}"))
}

/// The baseline: one lock around a map from endpoint name to plain counters, taken when an
/// attempt starts and again when it ends.
#[derive(Default)]
struct Stats {
    total: u64,
    in_flight: u64,
    successful: u64,
    failed: u64,
    consecutive: u32,
    latency_total: Duration,
    last_error: Option<String>,
}

struct Baseline {
    map: Mutex<HashMap<String, Stats>>,
}

impl Baseline {
    fn new() -> Self {
        let map = ["a", "b", "c", "d"]
            .into_iter()
            .map(|n| (n.to_string(), Stats::default()))
            .collect();
        Self {
            map: Mutex::new(map),
        }
    }

    fn with<R>(&self, name: &str, f: impl FnOnce(&mut Stats) -> R) -> R {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        f(map.get_mut(name).unwrap_or_else(|| panic!("no {name}")))
    }

    fn record(&self, name: &str, ok: bool) {
        let started = self.with(name, |s| {
            s.total += 1;
            s.in_flight += 1;
            Instant::now()
        });
        let elapsed = started.elapsed();
        self.with(name, |s| {
            s.in_flight -= 1;
            s.latency_total += elapsed;
            if ok {
                s.successful += 1;
                s.consecutive = 0;
            } else {
                s.failed += 1;
                s.consecutive += 1;
                s.last_error = Some("server error".to_string());
            }
        });
    }
}

fn ccgate_record(ep: &Arc<Endpoint>, rec: &Arc<Recorder>, outcome: Outcome) {
    Attempt::begin(Arc::clone(ep), Arc::clone(rec), false).finish(outcome, None);
}

/// Runs `op` `iters` times on each of `threads` threads released by one barrier; returns the
/// wall time from the first thread's start to the last one's end, divided by `threads`, so that
/// criterion's per-iteration figure is ns per record over all threads.
fn run_threads(threads: usize, iters: u64, op: &(dyn Fn() + Sync)) -> Duration {
    let barrier = Barrier::new(threads);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        op();
                    }
                    (start, Instant::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| panic!("bench thread panicked")))
            .collect()
    });
    let first = spans.iter().map(|s| s.0).min().unwrap_or_else(Instant::now);
    let last = spans.iter().map(|s| s.1).max().unwrap_or(first);
    (last - first) / u32::try_from(threads).unwrap_or(1)
}

fn bench_record(c: &mut Criterion, label: &str, outcome: Outcome) {
    let ok = matches!(outcome, Outcome::Success);
    let reg = registry();
    let ep = Arc::clone(&reg.endpoints[0]);
    let rec = Arc::clone(&reg.recorder);
    let baseline = Baseline::new();
    // Records issued on `ep`, warm-up included: every one must show in its counters.
    let issued = AtomicU64::new(0);
    let mut group = c.benchmark_group(format!("record_{label}"));
    group.throughput(Throughput::Elements(1));
    for threads in THREADS {
        group.bench_with_input(BenchmarkId::new("ccgate", threads), &threads, |b, &t| {
            b.iter_custom(|iters| {
                issued.fetch_add(iters * t as u64, Ordering::Relaxed);
                run_threads(t, iters, &|| ccgate_record(&ep, &rec, outcome))
            })
        });
        group.bench_with_input(
            BenchmarkId::new("mutex_hashmap", threads),
            &threads,
            |b, &t| b.iter_custom(|iters| run_threads(t, iters, &|| baseline.record("a", ok))),
        );
    }
    group.finish();
    // The counters saw every record: nothing lost under contention, each with its outcome.
    let snap = ep.live.snapshot();
    let issued = issued.into_inner();
    assert_eq!(snap.in_flight, 0);
    assert_eq!(snap.total, issued, "records issued vs counted");
    assert_eq!(
        snap.total,
        if ok { snap.successful() } else { snap.failed() }
    );
}

fn record_success(c: &mut Criterion) {
    bench_record(c, "success", Outcome::Success);
}

fn record_failure(c: &mut Criterion) {
    bench_record(c, "failure", Outcome::ServerError);
}

/// Where a record's time goes: the pieces `Attempt::begin` + `finish` are made of, one by one.
fn parts(c: &mut Criterion) {
    let reg = registry();
    let ep = Arc::clone(&reg.endpoints[1]);
    let clock = reg.clock;
    let mut group = c.benchmark_group("record_parts");
    group.bench_function("std_instant_now", |b| b.iter(|| black_box(Instant::now())));
    group.bench_function("tokio_instant_now", |b| {
        b.iter(|| black_box(tokio::time::Instant::now()))
    });
    group.bench_function("clock_now_ms", |b| b.iter(|| black_box(clock.now_ms())));
    group.bench_function("latency_observe", |b| {
        b.iter(|| {
            ep.live
                .total
                .observe(black_box(Duration::from_micros(1234)))
        })
    });
    group.bench_function("peak_ewma_observe", |b| {
        b.iter(|| {
            ep.live
                .estimate
                .observe(black_box(Duration::from_micros(1234)), black_box(1_000))
        })
    });
    group.bench_function("two_arc_clones_and_drops", |b| {
        b.iter(|| {
            let e = Arc::clone(black_box(&ep));
            let r = Arc::clone(black_box(&reg.recorder));
            drop(black_box((e, r)));
        })
    });
    let last: arc_swap::ArcSwapOption<(u64, String)> = arc_swap::ArcSwapOption::empty();
    group.bench_function("last_error_store", |b| {
        b.iter(|| last.store(Some(Arc::new((1, "server error".replace('_', " "))))))
    });
    for threads in [2, 8] {
        group.bench_with_input(
            BenchmarkId::new("last_error_store", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|iters| {
                    run_threads(t, iters, &|| {
                        last.store(Some(Arc::new((1, "server error".replace('_', " ")))))
                    })
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("peak_ewma_observe", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|iters| {
                    run_threads(t, iters, &|| {
                        ep.live.estimate.observe(Duration::from_micros(1234), 1_000)
                    })
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("clone_string_arc", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|iters| {
                    run_threads(t, iters, &|| {
                        drop(black_box(Arc::new((1, "server error".replace('_', " ")))))
                    })
                })
            },
        );
    }
    group.finish();
}

fn select(c: &mut Criterion) {
    let reg = registry();
    let now = reg.clock.now_ms();
    let mut group = c.benchmark_group("select_rank_4");
    for (name, strategy) in [
        ("priority", Strategy::Priority),
        ("weighted", Strategy::Weighted),
        ("least_latency", Strategy::LeastLatency),
    ] {
        let selector = Selector::new(strategy);
        let mut rng = fastrand::Rng::with_seed(7);
        group.bench_function(name, |b| {
            b.iter(|| black_box(selector.rank(black_box(&reg.endpoints), now, &mut rng)))
        });
    }
    group.finish();
}

fn sse(c: &mut Criterion) {
    let event: &[u8] = b"event: content_block_delta\n\
        data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\
        \"text\":\"Hello! Here is a typical streamed chunk of a few words.\"}}\n\n";
    let mut group = c.benchmark_group("sse");
    group.throughput(Throughput::Bytes(event.len() as u64));
    let mut scanner = SseScanner::new();
    group.bench_function("feed_content_block_delta", |b| {
        b.iter(|| scanner.feed(black_box(event)))
    });
    group.finish();
    // (Nothing was fed when a filter skipped this bench.)
    let facts = scanner.facts();
    assert!(facts.events == 0 || (facts.content && facts.error.is_none()));
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(2));
    targets = record_success, record_failure, parts, select, sse
}
criterion_main!(benches);
