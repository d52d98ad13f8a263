//! The Redis foundation of cluster mode (`ccgate::cluster`), against a real `redis-server` that
//! each test starts on its own free loopback port (`tests/support/redis.rs`; `scripts/test.sh`
//! installs Redis). Several "instances" are separate links (own connections, own instance names)
//! racing from many tasks at once; waits are condition polls bounded by a deadline.

#[path = "support/redis.rs"]
mod redis_server;
#[path = "support/wait.rs"]
mod wait;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ccgate::cluster::{
    Claim, ClusterConfig, ClusterError, ClusterEvent, ClusterLink, EndpointId, LinkOptions,
    PhaseChange, RedisUrl, ResyncReason, SharedPhase, TotalsFlusher,
};
use redis_server::RedisServer;
use tokio::sync::{Barrier, broadcast};
use wait::{eventually, within};

/// Short timings so outages and expiries show within a test; command timeouts stay generous for
/// a loaded machine.
fn options() -> LinkOptions {
    LinkOptions {
        connect_timeout: Duration::from_secs(2),
        command_timeout: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(100),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..LinkOptions::default()
    }
}

/// One instance: its link, an event receiver subscribed before the supervisor started, and the
/// supervisor task.
struct Instance {
    link: ClusterLink,
    events: broadcast::Receiver<ClusterEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.link.shutdown();
        self.task.abort();
    }
}

fn instance(redis: &RedisServer, prefix: &str, name: &str) -> Instance {
    instance_at(&redis.url(), prefix, name)
}

fn instance_at(url: &str, prefix: &str, name: &str) -> Instance {
    let config =
        ClusterConfig::new(RedisUrl::new(url).expect("url"), prefix, name).expect("cluster config");
    let (link, supervisor) = ClusterLink::new(config, options()).expect("link");
    let events = link.subscribe();
    let task = tokio::spawn(supervisor.run());
    Instance { link, events, task }
}

async fn all_up(instances: &[&Instance]) {
    for i in instances {
        let link = i.link.clone();
        eventually("cluster link up", || {
            let link = link.clone();
            async move { link.is_up() }
        })
        .await;
    }
}

/// The next event matching `pred`, skipping others; panics after the deadline.
async fn expect_event(
    rx: &mut broadcast::Receiver<ClusterEvent>,
    what: &str,
    pred: impl Fn(&ClusterEvent) -> bool,
) -> ClusterEvent {
    within(what, async {
        loop {
            match rx.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("event channel closed"),
            }
        }
    })
    .await
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn relay() -> EndpointId {
    EndpointId::new("relay", "https://relay.example/api")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_episode_per_outage_across_three_instances_and_many_tasks() {
    let redis = RedisServer::start();
    let insts: Vec<Instance> = ["a", "b", "c"]
        .iter()
        .map(|n| instance(&redis, "t1", n))
        .collect();
    all_up(&insts.iter().collect::<Vec<_>>()).await;

    for outage in 0..2 {
        const TASKS: usize = 32;
        let barrier = Arc::new(Barrier::new(insts.len() * TASKS));
        let mut racers = Vec::new();
        for inst in &insts {
            for _ in 0..TASKS {
                let (link, barrier) = (inst.link.clone(), barrier.clone());
                racers.push(tokio::spawn(async move {
                    barrier.wait().await;
                    link.claim_episode(&relay(), Duration::from_secs(30))
                        .await
                        .expect("claim")
                }));
            }
        }
        let mut claims = Vec::new();
        for r in racers {
            claims.push(within("claim", r).await.expect("task"));
        }
        let winners: Vec<&Claim> = claims.iter().filter(|c| c.won()).collect();
        assert_eq!(
            winners.len(),
            1,
            "outage {outage}: exactly one episode opens"
        );
        let token = winners[0].token().to_owned();
        assert!(
            claims.iter().all(|c| c.token() == token),
            "every loser is told the winner's episode"
        );
        for c in &claims {
            if let Claim::Held { expires_in, .. } = c {
                assert!(*expires_in > Duration::ZERO && *expires_in <= Duration::from_secs(30));
            }
        }
        assert_eq!(
            insts[2].link.open_episode(&relay()).await.expect("get"),
            Some(token.clone())
        );
        // Only the episode's own token closes it; any instance may close it with that token.
        assert!(
            !insts[1]
                .link
                .close_episode(&relay(), "someone-else:1")
                .await
                .expect("close")
        );
        assert!(
            insts[1]
                .link
                .close_episode(&relay(), &token)
                .await
                .expect("close")
        );
        assert_eq!(
            insts[0].link.open_episode(&relay()).await.expect("get"),
            None
        );
    }

    // The same name at another base URL is another endpoint: its own episode.
    let other = EndpointId::new("relay", "https://elsewhere.example/api");
    assert!(
        insts[0]
            .link
            .claim_episode(&relay(), Duration::from_secs(30))
            .await
            .expect("claim")
            .won()
    );
    assert!(
        insts[1]
            .link
            .claim_episode(&other, Duration::from_secs(30))
            .await
            .expect("claim")
            .won()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prober_lease_is_renewed_only_by_its_holder_and_taken_over_after_expiry() {
    let redis = RedisServer::start();
    let insts: Vec<Instance> = ["a", "b", "c"]
        .iter()
        .map(|n| instance(&redis, "t2", n))
        .collect();
    all_up(&insts.iter().collect::<Vec<_>>()).await;
    let ttl = Duration::from_millis(400);

    // Three instances × 16 tasks race for the lease: one holder.
    let barrier = Arc::new(Barrier::new(48));
    let mut racers = Vec::new();
    for (i, inst) in insts.iter().enumerate() {
        for _ in 0..16 {
            let (link, barrier) = (inst.link.clone(), barrier.clone());
            racers.push(tokio::spawn(async move {
                barrier.wait().await;
                let c = link
                    .acquire_prober_lease(&relay(), ttl)
                    .await
                    .expect("acquire");
                (i, c)
            }));
        }
    }
    let mut holders = std::collections::BTreeSet::new();
    for r in racers {
        let (i, c) = within("acquire", r).await.expect("task");
        if c.won() {
            holders.insert(i);
        }
    }
    // Re-entrant for the same process, so several tasks of the winner may report `Won`; never
    // two instances.
    assert_eq!(holders.len(), 1, "one prober instance, got {holders:?}");
    let h = *holders.iter().next().expect("a holder");
    let (holder, other) = (&insts[h].link, &insts[(h + 1) % 3].link);
    assert_eq!(
        holder.prober(&relay()).await.expect("get").as_deref(),
        Some(holder.holder())
    );

    // Only the holder renews or releases.
    assert!(
        !other
            .renew_prober_lease(&relay(), ttl)
            .await
            .expect("renew")
    );
    assert!(!other.release_prober_lease(&relay()).await.expect("release"));
    assert!(
        holder
            .renew_prober_lease(&relay(), ttl)
            .await
            .expect("renew")
    );

    // Renewed while probing, the lease outlives its TTL several times over.
    let probing_until = Instant::now() + ttl * 3;
    while Instant::now() < probing_until {
        assert!(
            holder
                .renew_prober_lease(&relay(), ttl)
                .await
                .expect("renew")
        );
        assert!(
            !other
                .acquire_prober_lease(&relay(), ttl)
                .await
                .expect("acquire")
                .won()
        );
        tokio::time::sleep(ttl / 4).await;
    }

    // The holder "dies" (stops renewing): the other takes over once the lease expires.
    let started = Instant::now();
    let other2 = other.clone();
    eventually("lease taken over after expiry", || {
        let other = other2.clone();
        async move {
            other
                .acquire_prober_lease(&relay(), Duration::from_secs(30))
                .await
                .expect("acquire")
                .won()
        }
    })
    .await;
    assert!(
        started.elapsed() >= ttl / 2,
        "taken over only after expiry ({:?})",
        started.elapsed()
    );
    // The old holder can neither renew nor release its successor's lease.
    assert!(
        !holder
            .renew_prober_lease(&relay(), ttl)
            .await
            .expect("renew")
    );
    assert!(
        !holder
            .release_prober_lease(&relay())
            .await
            .expect("release")
    );
    assert_eq!(
        other.prober(&relay()).await.expect("get").as_deref(),
        Some(other.holder())
    );
    assert!(other.release_prober_lease(&relay()).await.expect("release"));
    assert_eq!(other.prober(&relay()).await.expect("get"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_news_reaches_the_others_and_a_cooldown_deadline_only_grows() {
    let redis = RedisServer::start();
    let mut a = instance(&redis, "t3", "a");
    let mut b = instance(&redis, "t3", "b");
    let c = instance(&redis, "t3", "c");
    all_up(&[&a, &b, &c]).await;
    let now = unix_ms();

    let long = a
        .link
        .publish_health(&relay(), PhaseChange::cooling_down(now + 10_000))
        .await
        .expect("publish");
    assert_eq!(long.cooldown_until_ms, Some(now + 10_000));
    let seen = expect_event(
        &mut b.events,
        "a's cooldown at b",
        |e| matches!(e, ClusterEvent::Health(n) if n.origin == "a"),
    )
    .await;
    let ClusterEvent::Health(seen) = seen else {
        unreachable!()
    };
    assert_eq!(seen, long);
    assert_eq!(seen.endpoint_id(), relay());
    assert_eq!(seen.phase, SharedPhase::CoolingDown);

    // A shorter cooldown from c does not shorten it: stored and published with the longer one.
    let short = c
        .link
        .publish_health(&relay(), PhaseChange::cooling_down(now + 5_000))
        .await
        .expect("publish");
    assert_eq!(short.cooldown_until_ms, Some(now + 10_000));
    let seen = expect_event(
        &mut b.events,
        "c's cooldown at b",
        |e| matches!(e, ClusterEvent::Health(n) if n.origin == "c"),
    )
    .await;
    assert!(matches!(seen, ClusterEvent::Health(n) if n.cooldown_until_ms == Some(now + 10_000)));
    // A later, longer one extends it everywhere.
    let longer = b
        .link
        .publish_health(&relay(), PhaseChange::cooling_down(now + 20_000))
        .await
        .expect("publish");
    assert_eq!(longer.cooldown_until_ms, Some(now + 20_000));
    expect_event(&mut a.events, "b's longer cooldown at a", |e| {
        matches!(e, ClusterEvent::Health(n) if n.origin == "b" && n.cooldown_until_ms == Some(now + 20_000))
    })
    .await;

    // Many concurrent publishers of random deadlines: the stored deadline is their maximum.
    let mut tasks = Vec::new();
    let mut max = now + 20_000;
    for (i, inst) in [&a, &b, &c].iter().enumerate() {
        for k in 0..40u64 {
            let d = now + 1_000 + (k * 7919 + i as u64 * 104_729) % 60_000;
            max = max.max(d);
            let link = inst.link.clone();
            tasks.push(tokio::spawn(async move {
                link.publish_health(&relay(), PhaseChange::cooling_down(d))
                    .await
                    .expect("publish")
            }));
        }
    }
    let mut last_seen_max = 0;
    for t in tasks {
        let n = within("publish", t).await.expect("task");
        let d = n.cooldown_until_ms.expect("deadline");
        assert!(d >= now + 20_000, "never below the deadline already stored");
        last_seen_max = last_seen_max.max(d);
    }
    assert_eq!(last_seen_max, max);
    let view = c.link.health_view().await.expect("view");
    assert_eq!(view.len(), 1);
    assert_eq!(view[0].cooldown_until_ms, Some(max));

    // Recovery ends the cooldown run: the view shows it without a deadline, with its episode.
    let rec = a
        .link
        .publish_health(
            &relay(),
            PhaseChange::new(SharedPhase::Recovered).in_episode("a#1:1"),
        )
        .await
        .expect("publish");
    assert_eq!(rec.cooldown_until_ms, None);
    let view = b.link.health_view().await.expect("view");
    assert_eq!(view, vec![rec.clone()]);
    assert!(!view[0].phase.out_of_rotation());
    // Seeding never overwrites existing news, and fills in what is missing.
    assert_eq!(
        c.link
            .seed_health(&relay(), PhaseChange::new(SharedPhase::Ejected))
            .await
            .expect("seed"),
        None
    );
    let official = EndpointId::new("official", "https://api.anthropic.com");
    assert!(
        c.link
            .seed_health(&official, PhaseChange::new(SharedPhase::Healthy))
            .await
            .expect("seed")
            .is_some()
    );
    assert_eq!(a.link.health_view().await.expect("view").len(), 2);
    a.link.forget_health(&official).await.expect("forget");
    assert_eq!(a.link.health_view().await.expect("view"), vec![rec]);

    // An instance never receives its own news. One channel reaches a subscriber in the order
    // its messages were published, so once `a` hears news `b` published after `a`'s own, `a`'s
    // would have come before it. What else `a` hears meanwhile is the others' earlier news,
    // still on its way.
    let mut own = a.link.subscribe();
    a.link
        .publish_health(&relay(), PhaseChange::new(SharedPhase::Ejected))
        .await
        .expect("publish");
    expect_event(&mut b.events, "a's ejection at b", |e| {
        matches!(e, ClusterEvent::Health(n) if n.origin == "a" && n.phase == SharedPhase::Ejected)
    })
    .await;
    b.link
        .publish_health(&relay(), PhaseChange::new(SharedPhase::Recovered))
        .await
        .expect("publish");
    expect_event(&mut own, "b's later news at a", |e| match e {
        ClusterEvent::Health(n) => {
            assert_ne!(n.origin, "a", "an instance received its own news: {n:?}");
            n.origin == "b" && n.phase == SharedPhase::Recovered
        }
        _ => false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_binding_is_shared_first_binder_wins_and_moves_for_everyone() {
    let redis = RedisServer::start();
    let a = instance(&redis, "t4", "a");
    let mut b = instance(&redis, "t4", "b");
    let c = instance(&redis, "t4", "c");
    all_up(&[&a, &b, &c]).await;
    let ttl = Duration::from_secs(60);
    let (x, y, z) = (
        EndpointId::new("x", "https://x.example"),
        EndpointId::new("y", "https://y.example"),
        EndpointId::new("z", "https://z.example"),
    );

    // Three instances bind one new session at once to different endpoints: one binding wins,
    // and every binder is told which.
    let barrier = Arc::new(Barrier::new(30));
    let mut tasks = Vec::new();
    for (inst, ep) in [(&a, &x), (&b, &y), (&c, &z)] {
        for _ in 0..10 {
            let (link, ep, barrier) = (inst.link.clone(), ep.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                link.bind_session("s1", &ep, ttl).await.expect("bind")
            }));
        }
    }
    let mut bound = std::collections::BTreeSet::new();
    for t in tasks {
        bound.insert(within("bind", t).await.expect("task"));
    }
    assert_eq!(bound.len(), 1, "one binding in force: {bound:?}");
    let winner = bound.into_iter().next().expect("winner");
    for inst in [&a, &b, &c] {
        assert_eq!(
            inst.link.session_binding("s1").await.expect("get"),
            Some(winner.clone())
        );
    }

    // A plain binding is published to the others.
    assert_eq!(a.link.bind_session("s2", &x, ttl).await.expect("bind"), x);
    let seen = expect_event(
        &mut b.events,
        "s2 binding at b",
        |e| matches!(e, ClusterEvent::Session(n) if n.session == "s2"),
    )
    .await;
    assert!(
        matches!(seen, ClusterEvent::Session(n) if n.endpoint_id() == Some(x.clone()) && n.origin == "a")
    );

    // x leaves rotation: b and c both move s2 away from x at once; they end on one endpoint.
    let (moved_b, moved_c) = tokio::join!(
        b.link.move_session("s2", Some(&x), &y, ttl),
        c.link.move_session("s2", Some(&x), &z, ttl)
    );
    let (moved_b, moved_c) = (moved_b.expect("move"), moved_c.expect("move"));
    assert_eq!(moved_b, moved_c, "both movers end on the same endpoint");
    assert_ne!(moved_b, x);
    assert_eq!(
        a.link.session_binding("s2").await.expect("get"),
        Some(moved_b.clone())
    );
    // A stale move (from x again) does not undo it.
    assert_eq!(
        a.link
            .move_session("s2", Some(&x), &x, ttl)
            .await
            .expect("move"),
        moved_b
    );

    // Sliding TTL: a refresh extends only bindings that still hold the given endpoint.
    let short = Duration::from_millis(300);
    assert_eq!(a.link.bind_session("s3", &x, short).await.expect("bind"), x);
    assert_eq!(
        a.link
            .refresh_sessions(&[("s3", &x), ("s2", &x)], ttl)
            .await
            .expect("refresh"),
        1
    );
    tokio::time::sleep(short * 2).await; // s3 would have expired without the refresh.
    assert_eq!(
        c.link.session_binding("s3").await.expect("get"),
        Some(x.clone())
    );

    // Delete-on-move: dropping only the binding one expects.
    assert!(!a.link.unbind_session("s2", &x).await.expect("unbind"));
    assert!(a.link.unbind_session("s2", &moved_b).await.expect("unbind"));
    assert_eq!(b.link.session_binding("s2").await.expect("get"), None);
    expect_event(
        &mut b.events,
        "s2 dropped at b",
        |e| matches!(e, ClusterEvent::Session(n) if n.session == "s2" && n.endpoint.is_none()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_totals_equal_the_sum_of_deltas_from_concurrent_flushers() {
    let redis = RedisServer::start();
    const INSTANCES: usize = 6;
    const ROUNDS: i64 = 40;
    let insts: Vec<Instance> = (0..INSTANCES)
        .map(|i| instance(&redis, "t5", &format!("i{i}")))
        .collect();
    all_up(&insts.iter().collect::<Vec<_>>()).await;

    // Every instance flushes ROUNDS times at once with the others, each batch several counters.
    let barrier = Arc::new(Barrier::new(INSTANCES));
    let mut tasks = Vec::new();
    for (i, inst) in insts.iter().enumerate() {
        let (link, barrier) = (inst.link.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let mut flusher = TotalsFlusher::new();
            let mut own = BTreeMap::<String, i64>::new();
            barrier.wait().await;
            for r in 1..=ROUNDS {
                for (counter, delta) in [
                    ("requests", r),
                    ("failed", (r + i as i64) % 3),
                    ("tokens.input", 1000 * r + i as i64),
                ] {
                    flusher.add(counter, delta);
                    if delta != 0 {
                        *own.entry(counter.to_owned()).or_insert(0) += delta;
                    }
                }
                // A lost reply is resent: the same batch a second time counts once.
                let batch = flusher.next_batch().expect("batch").clone();
                assert!(link.send_totals(&batch).await.expect("send"));
                assert!(!link.send_totals(&batch).await.expect("resend"));
                flusher.acknowledge();
                assert!(link.flush_totals(&mut flusher).await.expect("flush"));
            }
            own
        }));
    }
    let mut expected = BTreeMap::<String, i64>::new();
    let mut own_by_instance = BTreeMap::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let own = within("flusher", t).await.expect("task");
        for (k, v) in &own {
            *expected.entry(k.clone()).or_insert(0) += v;
        }
        own_by_instance.insert(format!("i{i}"), own);
    }

    let view = insts[0]
        .link
        .cluster_view(Duration::from_secs(60))
        .await
        .expect("view");
    assert_eq!(view.totals, expected, "cluster sums = sum of every delta");
    assert_eq!(view.instances.len(), INSTANCES);
    let mut summed = BTreeMap::<String, i64>::new();
    for inst in &view.instances {
        assert_eq!(inst.totals, own_by_instance[&inst.instance]);
        assert!(inst.last_heard_ms <= view.now_ms && inst.last_heard_ms + 60_000 > view.now_ms);
        for (k, v) in &inst.totals {
            *summed.entry(k.clone()).or_insert(0) += v;
        }
    }
    assert_eq!(summed, view.totals, "sums = the instances' own counters");

    // An instance that stops (no heartbeat) leaves the live list; its contribution stays.
    let gone = insts[INSTANCES - 1].link.clone();
    gone.shutdown();
    let reader = insts[0].link.clone();
    eventually("dead instance pruned", || {
        let (reader, expected) = (reader.clone(), expected.clone());
        async move {
            let v = reader
                .cluster_view(Duration::from_millis(500))
                .await
                .expect("view");
            v.instances.len() == INSTANCES - 1
                && v.instances.iter().all(|i| i.instance != "i5")
                && v.totals == expected
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_then_restarted_empty_reports_down_then_up_and_asks_for_a_resync() {
    let mut redis = RedisServer::start();
    let mut a = instance(&redis, "t6", "a");
    let b = instance(&redis, "t6", "b");
    expect_event(&mut a.events, "first connect", |e| {
        matches!(e, ClusterEvent::Resync(ResyncReason::Connected))
    })
    .await;
    all_up(&[&a, &b]).await;
    a.link
        .publish_health(&relay(), PhaseChange::new(SharedPhase::Ejected))
        .await
        .expect("publish");
    assert_eq!(b.link.health_view().await.expect("view").len(), 1);

    redis.kill();
    expect_event(&mut a.events, "down after kill", |e| {
        matches!(e, ClusterEvent::Down)
    })
    .await;
    assert!(!a.link.is_up());
    // While down, calls fail at once: nothing waits for Redis.
    let t = Instant::now();
    let err = a
        .link
        .claim_episode(&relay(), Duration::from_secs(5))
        .await
        .expect_err("down");
    assert!(matches!(err, ClusterError::Unavailable), "{err}");
    assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
    let mut flusher = TotalsFlusher::new();
    flusher.add("requests", 3);
    assert!(a.link.flush_totals(&mut flusher).await.is_err());
    flusher.add("requests", 4); // accumulates while the batch of 3 waits

    redis.restart();
    let ev = expect_event(&mut a.events, "resync after restart", |e| {
        matches!(e, ClusterEvent::Resync(_))
    })
    .await;
    assert!(matches!(
        ev,
        ClusterEvent::Resync(ResyncReason::Reconnected)
    ));
    all_up(&[&a, &b]).await;
    // The Redis came back empty: the shared view is gone until repopulated by seeding.
    assert!(b.link.health_view().await.expect("view").is_empty());
    assert!(
        a.link
            .seed_health(&relay(), PhaseChange::new(SharedPhase::Ejected))
            .await
            .expect("seed")
            .is_some()
    );
    assert_eq!(b.link.health_view().await.expect("view").len(), 1);
    // Totals held back while down arrive exactly once: the batch of 3, then the 4.
    while !a.link.flush_totals(&mut flusher).await.expect("flush") {}
    let view = b
        .link
        .cluster_view(Duration::from_secs(60))
        .await
        .expect("view");
    assert_eq!(view.totals.get("requests"), Some(&7));

    // Data lost under a live connection (FLUSHALL): the heartbeat notices and asks for a resync,
    // even when a totals flush reaches Redis before it (audit: the flush stamped the heartbeat
    // again, so the loss went unnoticed and the shared view was never rebuilt).
    assert!(redis.command("FLUSHALL").starts_with("+OK"));
    flusher.add("requests", 1);
    assert!(a.link.flush_totals(&mut flusher).await.expect("flush"));
    expect_event(&mut a.events, "resync after flush", |e| {
        matches!(e, ClusterEvent::Resync(ResyncReason::DataLost))
    })
    .await;
    assert!(a.link.is_up());
}

/// Two clusters with the same prefix in two databases of one Redis stay apart: health news of one
/// never reaches the other (audit: keys were per database, but publish and subscribe span them
/// all, so one cluster's ejections took endpoints out in the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clusters_in_two_databases_of_one_redis_hear_only_their_own_news() {
    let redis = RedisServer::start();
    let a1 = instance_at(&format!("{}/1", redis.url()), "t7", "a1");
    let mut b1 = instance_at(&format!("{}/1", redis.url()), "t7", "b1");
    let a2 = instance_at(&format!("{}/2", redis.url()), "t7", "a2");
    let mut b2 = instance_at(&format!("{}/2", redis.url()), "t7", "b2");
    all_up(&[&a1, &b1, &a2, &b2]).await;
    a1.link
        .publish_health(&relay(), PhaseChange::new(SharedPhase::Ejected))
        .await
        .expect("publish in database 1");
    expect_event(
        &mut b1.events,
        "a1's news at b1",
        |e| matches!(e, ClusterEvent::Health(n) if n.origin == "a1"),
    )
    .await;
    // Then news in database 2: b2 hears a2's; anything of a1's would have come before it, on the
    // same subscription.
    a2.link
        .publish_health(&relay(), PhaseChange::cooling_down(unix_ms() + 5_000))
        .await
        .expect("publish in database 2");
    let first = expect_event(&mut b2.events, "news at b2", |e| {
        matches!(e, ClusterEvent::Health(_))
    })
    .await;
    assert!(
        matches!(&first, ClusterEvent::Health(n) if n.origin == "a2"),
        "database 1's news reached database 2: {first:?}"
    );
    assert_eq!(b2.link.health_view().await.expect("view").len(), 1);
}

/// Two live instances under one name are told apart from a restart: each logs it and says so
/// (`name_clash`), and it ends when one of them stops; a single instance, restarted under its
/// name, never clashes (audit: namesakes silently mixed up their totals and news).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_live_instances_under_one_name_are_noticed() {
    let redis = RedisServer::start();
    let first = instance(&redis, "t8", "solo");
    all_up(&[&first]).await;
    drop(first);
    // Restarted under its name: one beat sees the earlier life, which is no clash.
    let solo = instance(&redis, "t8", "solo");
    all_up(&[&solo]).await;
    let a = instance(&redis, "t8", "same");
    let b = instance(&redis, "t8", "same");
    all_up(&[&a, &b]).await;
    for link in [a.link.clone(), b.link.clone()] {
        eventually("the clash noticed", || {
            let link = link.clone();
            async move { link.name_clash() }
        })
        .await;
    }
    assert!(!solo.link.name_clash(), "a restart is no clash");
    drop(b);
    let link = a.link.clone();
    eventually("the clash over", || {
        let link = link.clone();
        async move { !link.name_clash() }
    })
    .await;
    assert!(!solo.link.name_clash());
}
