//! Cluster mode end to end (issue #13): a real `redis-server` (`support/redis.rs`) and THREE real
//! `ccgate serve` processes sharing it (`support/process.rs`), in front of scriptable mock
//! upstreams (`support/mock.rs`). Every wait is a condition polled against a deadline.
#![cfg(unix)]

#[path = "support/process.rs"]
mod process;
mod support;

use std::time::Duration;

use http::Method;
use serde_json::Value;

use process::{Sandbox, Serving, get, post_message};
use support::mock::{MockUpstream, Script};
use support::redis::RedisServer;
use support::wait::{self, eventually, eventually_some}; // `wait` for `support/process.rs`

/// One endpoint of the test configs: name, mock, extra keys.
#[derive(Clone, Copy)]
struct Ep<'a> {
    name: &'a str,
    mock: &'a MockUpstream,
    extra: &'a str,
}

/// Three instances sharing one Redis under a prefix of their own.
struct Cluster {
    instances: Vec<Serving>,
    sandboxes: Vec<Sandbox>,
    prefix: String,
}

fn cluster_config(
    redis: &RedisServer,
    prefix: &str,
    instance: &str,
    eps: &[Ep<'_>],
    server: &str,
) -> String {
    let mut s = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n\n\
         [health]\nfailure_threshold = 2\nprobe_interval = \"300ms\"\nprobe_max_interval = \"600ms\"\n\n\
         [cluster]\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\ninstance = \"{instance}\"\nflush_interval = \"100ms\"\n",
        redis.url()
    );
    for e in eps {
        s.push_str(&format!(
            "\n[[endpoints]]\nname = \"{}\"\nbase_url = \"{}\"\napi_key = \"sk-test-{}\"\nprobe = \"models\"\n{}\n",
            e.name,
            e.mock.url(),
            e.name,
            e.extra
        ));
    }
    s
}

/// Endpoint `a` (priority 1) and its failover `b` (priority 2), on the two mocks.
fn a_then_b(mocks: &[MockUpstream; 2]) -> [Ep<'_>; 2] {
    [
        Ep {
            name: "a",
            mock: &mocks[0],
            extra: "priority = 1",
        },
        Ep {
            name: "b",
            mock: &mocks[1],
            extra: "priority = 2",
        },
    ]
}

impl Cluster {
    async fn start(redis: &RedisServer, eps: &[Ep<'_>], server: &str) -> Self {
        let prefix = format!("t{}", fastrand::u64(..));
        let mut instances = Vec::new();
        let mut sandboxes = Vec::new();
        for i in 1..=3 {
            let sb = Sandbox::new();
            let text = cluster_config(redis, &prefix, &format!("i{i}"), eps, server);
            let path = sb.write("config.toml", &text);
            let mut cmd = sb.command(&["serve", "--config", path.to_str().expect("utf-8 path")]);
            if let Ok(filter) = std::env::var("CLUSTER_TEST_LOG") {
                cmd.env("RUST_LOG", filter);
            }
            instances.push(process::start(cmd).await);
            sandboxes.push(sb);
        }
        let c = Self {
            instances,
            sandboxes,
            prefix,
        };
        for s in &c.instances {
            let addr = s.addr;
            eventually("instance linked to Redis", || async move {
                get(addr, "/_ccgate/health", &[]).await.json()["cluster"]["redis_up"] == true
            })
            .await;
            // The mark the CLI knows a gateway by, on the cluster's health answer too (review:
            // missing, so `claude run` and endpoint edits took a cluster gateway for a stranger).
            let health = get(addr, "/_ccgate/health", &[]).await;
            assert_eq!(
                health.header("x-ccgate-version"),
                Some(env!("CARGO_PKG_VERSION")),
                "{health:?}"
            );
        }
        c
    }

    /// Waits for `check` like `eventually`, printing every instance's log when it never holds.
    async fn until<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for s in &self.instances {
            eprintln!("=== {}\n{}", s.addr, s.stderr_now());
        }
        panic!("timed out waiting for {what}");
    }

    /// Waits until every instance's failure queue is empty (an endpoint is back in rotation
    /// everywhere), sending a request through each of the instances `through` every round so
    /// that a probation can end.
    async fn until_queues_empty(&self, through: &[usize]) {
        self.until("every failure queue empty", || async {
            for &i in through {
                post_message(self.addr(i), &[]).await;
            }
            let mut empty = true;
            for i in 0..3 {
                empty &= self.queue(i).await["size"] == 0;
            }
            empty
        })
        .await;
    }

    fn addr(&self, i: usize) -> std::net::SocketAddr {
        self.instances[i].addr
    }

    async fn state(&self, i: usize, name: &str) -> String {
        process::endpoint_view(self.addr(i), name).await["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn wait_state(&self, name: &str, want: &str) {
        for i in 0..3 {
            let c = self;
            eventually(&format!("{name} {want} on instance {i}"), || async move {
                c.state(i, name).await == want
            })
            .await;
        }
    }

    async fn queue(&self, i: usize) -> Value {
        get(self.addr(i), "/_ccgate/failure-queue", &[])
            .await
            .json()
    }

    async fn stats(&self, i: usize) -> Value {
        get(self.addr(i), "/_ccgate/stats", &[]).await.json()
    }

    async fn view(&self) -> Value {
        get(self.addr(0), "/_ccgate/cluster", &[]).await.json()
    }

    /// Waits until the cluster view's sums equal the sum of the instances' own counters.
    async fn totals_agree(&self, counters: &[&str]) -> Value {
        let mut last = Value::Null;
        for _ in 0..200 {
            let view = self.view().await;
            let mut ok = view["instances"].as_array().map(Vec::len) == Some(3);
            for c in counters {
                let mut sum = 0;
                for i in 0..3 {
                    sum += self.stats(i).await[c].as_i64().unwrap_or(0);
                }
                ok &= view["totals"][c].as_i64().unwrap_or(0) == sum;
            }
            if ok {
                return view;
            }
            last = view;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cluster totals never equalled the instances' sums: {last}");
    }
}

/// Endpoints `a` and `b`, `a` preferred.
fn a_and_b<'a>(a: &'a MockUpstream, b: &'a MockUpstream) -> [Ep<'a>; 2] {
    [
        Ep {
            name: "a",
            mock: a,
            extra: "priority = 1",
        },
        Ep {
            name: "b",
            mock: b,
            extra: "priority = 2",
        },
    ]
}

/// Two endpoints answering JSON, `a` preferred over `b`, behind three instances.
async fn a_before_b(redis: &RedisServer) -> (MockUpstream, MockUpstream, Cluster) {
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    a.set_default(Script::json_ok());
    b.set_default(Script::json_ok());
    let c = Cluster::start(redis, &a_and_b(&a, &b), "").await;
    (a, b, c)
}

fn served_by(a: &process::Answer) -> String {
    a.header("x-ccgate-endpoint").unwrap_or("-").to_owned()
}

/// An endpoint failing for the instances at the same moment is ejected on all three, with one
/// queue entry each, one episode cluster-wide (`total_failed` +1 in the cluster view), and one
/// prober.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_outage_is_one_episode_and_one_prober_cluster_wide() {
    let redis = RedisServer::start();
    let bad = MockUpstream::start().await;
    let good = MockUpstream::start().await;
    bad.set_default(Script::error(500, "api_error", "boom"));
    good.set_default(Script::json_ok());
    let c = Cluster::start(&redis, &a_and_b(&bad, &good), "").await;

    // Every instance sees `a` fail at once: two failing attempts each, concurrently.
    let mut tasks = Vec::new();
    for i in 0..3 {
        for _ in 0..2 {
            let addr = c.addr(i);
            tasks.push(tokio::spawn(
                async move { post_message(addr, &[]).await.status },
            ));
        }
    }
    for t in tasks {
        assert_eq!(
            t.await.expect("request task"),
            200,
            "failover serves every request"
        );
    }
    c.wait_state("a", "ejected").await;
    let mut local_failed = 0;
    for i in 0..3 {
        let q = c.queue(i).await;
        assert_eq!(q["size"], 1, "one queue entry on instance {i}: {q}");
        assert_eq!(q["entries"][0]["name"], "a");
        local_failed += q["stats"]["total_failed"].as_i64().expect("total_failed");
    }
    assert_eq!(local_failed, 1, "exactly one instance won the episode");
    let view = c.totals_agree(&["total_requests", "failed_requests"]).await;
    eventually("cluster total_failed", || async {
        c.view().await["totals"]["total_failed"] == 1
    })
    .await;
    assert_eq!(view["instances"].as_array().map(Vec::len), Some(3));
    // `ccgate status --cluster` shows every instance and the sums.
    let url = c.instances[2].url();
    let f = process::run(c.sandboxes[2].command(&["status", "--cluster", "--url", &url])).await;
    f.assert_success();
    for name in [
        "i1",
        "i2",
        "i3",
        "cluster (all flushes)",
        "Redis redis://127.0.0.1",
    ] {
        assert!(f.stdout.contains(name), "{name} missing:\n{}", f.stdout);
    }

    // One prober: only the lease holder runs probes, for several probe intervals.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let mut probers = 0;
    for i in 0..3 {
        let verified = c.queue(i).await["stats"]["total_verified"]
            .as_i64()
            .unwrap_or(0);
        if verified > 0 {
            probers += 1;
        }
    }
    assert_eq!(probers, 1, "exactly one instance probes the dead endpoint");
    // And each database holds at most one episode of `a`.
    for i in 0..3 {
        let eps = get(c.addr(i), "/_ccgate/episodes", &[]).await.json();
        let n = eps["episodes"]
            .as_array()
            .map_or(0, |l| l.iter().filter(|e| e["name"] == "a").count());
        assert!(
            n <= 1,
            "instance {i} stored {n} episodes of one outage: {eps}"
        );
    }

    // Recovery anywhere brings it back everywhere.
    bad.set_default(Script::json_ok());
    c.until_queues_empty(&[0]).await;

    // An operator's switch on one instance holds on all.
    let disable = process::call(
        c.addr(1),
        Method::POST,
        "/_ccgate/endpoints/a/disable",
        &[],
        String::new(),
    )
    .await;
    assert_eq!(disable.status, 200);
    c.wait_state("a", "disabled").await;
    let enable = process::call(
        c.addr(2),
        Method::POST,
        "/_ccgate/endpoints/a/enable",
        &[],
        String::new(),
    )
    .await;
    assert_eq!(enable.status, 200);
    for i in 0..3 {
        let c = &c;
        eventually("enabled everywhere", || async move {
            c.state(i, "a").await != "disabled"
        })
        .await;
    }
}

/// An outage that ends on other instances ends the run of failures on the one that saw it begin:
/// after the recovery, one more failure there is the first of a new run, not the run's third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_elsewhere_ends_the_run_of_failures_here() {
    let redis = RedisServer::start();
    let (a, _b, c) = a_before_b(&redis).await;
    a.set_default(Script::error(500, "api_error", "boom"));
    // `failure_threshold = 2`: two failures on instance 0 eject `a` on all three.
    for _ in 0..2 {
        assert_eq!(post_message(c.addr(0), &[]).await.status, 200);
    }
    c.wait_state("a", "ejected").await;
    let view = process::endpoint_view(c.addr(0), "a").await;
    assert_eq!(view["consecutive_failures"], 2, "{view}");

    // It recovers through instances 1 and 2 only: instance 0 hears of it as news.
    a.set_default(Script::json_ok());
    c.until_queues_empty(&[1, 2]).await;
    let view = process::endpoint_view(c.addr(0), "a").await;
    assert_eq!(view["consecutive_failures"], 0, "{view}");
    assert_eq!(view["state"], "healthy", "{view}");

    // One failure on instance 0: below the threshold, so `a` stays in rotation everywhere.
    a.push(Script::error(500, "api_error", "blip"));
    let r = post_message(c.addr(0), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(served_by(&r), "b");
    let view = process::endpoint_view(c.addr(0), "a").await;
    assert_eq!(view["consecutive_failures"], 1, "{view}");
    assert_eq!(view["state"], "degraded", "{view}");
    for i in 0..3 {
        assert_eq!(c.queue(i).await["size"], 0, "instance {i}");
    }
    let r = post_message(c.addr(0), &[]).await;
    assert_eq!(served_by(&r), "a", "{}", r.body);
}

/// An endpoint a reload adds takes the cluster's view of it at once: one that another instance
/// already ejected is out of rotation here before any request could fail on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_added_by_reload_takes_the_shared_view() {
    let redis = RedisServer::start();
    let (a, b, c) = a_before_b(&redis).await;
    let bad = MockUpstream::start().await;
    bad.set_default(Script::error(500, "api_error", "boom"));
    let [ep_a, ep_b] = a_and_b(&a, &b);
    let with_bad = [
        ep_a,
        ep_b,
        Ep {
            name: "bad",
            mock: &bad,
            extra: "priority = 0",
        },
    ];
    let reload = |i: usize| {
        let text = cluster_config(&redis, &c.prefix, &format!("i{}", i + 1), &with_bad, "");
        c.sandboxes[i].write("config.toml", &text);
        let addr = c.addr(i);
        async move {
            let r = process::call(addr, Method::POST, "/_ccgate/reload", &[], String::new()).await;
            assert_eq!(r.status, 200, "{}", r.body);
            assert!(r.body.contains("bad"), "added: {}", r.body);
        }
    };
    // Instance 0 adds `bad` and ejects it (`failure_threshold = 2`).
    reload(0).await;
    for _ in 0..2 {
        assert_eq!(post_message(c.addr(0), &[]).await.status, 200);
    }
    assert_eq!(c.state(0, "bad").await, "ejected");
    assert_eq!(bad.count(), 2);

    // Instance 1 adds it too: out of rotation at once, and no request of its own goes there.
    reload(1).await;
    let c1 = &c;
    eventually(
        "`bad` ejected on instance 1 after its reload",
        || async move { c1.state(1, "bad").await == "ejected" },
    )
    .await;
    let r = post_message(c.addr(1), &[]).await;
    assert_eq!(served_by(&r), "a", "{}", r.body);
    assert_eq!(
        bad.count(),
        2,
        "instance 1 never tried the ejected endpoint"
    );
}

/// A 429 cooldown set by one instance is honoured by the others until its deadline, and a later,
/// longer one extends it everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooldowns_are_shared_and_only_grow() {
    let redis = RedisServer::start();
    let (a, b, c) = a_before_b(&redis).await;
    a.push(Script::rate_limited(3));
    let first = post_message(c.addr(0), &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(served_by(&first), "b");
    c.wait_state("a", "cooling_down").await;
    let hits = a.count();
    for i in [1, 2, 1, 2] {
        let r = post_message(c.addr(i), &[]).await;
        assert_eq!(served_by(&r), "b", "instance {i} honours the cooldown");
    }
    assert_eq!(
        a.count(),
        hits,
        "nobody sent `a` a request while it cooled down"
    );

    // Instance 2 finds `b` rate limited for long, so its next request tries `a` as the least-bad
    // endpoint, which answers with a longer cooldown: it must extend everywhere.
    b.push(Script::rate_limited(30));
    a.push(Script::rate_limited(8));
    let r = post_message(c.addr(1), &[]).await;
    assert_ne!(r.status, 200, "`b` is rate limited and `a` cools down");
    let r = post_message(c.addr(1), &[]).await;
    assert_eq!(r.header("x-ccgate-fallback"), Some("least-bad"), "{r:?}");
    assert_eq!(a.count(), hits + 1);
    // Past the first deadline (3 s), `a` still cools down on every instance.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for i in 0..3 {
        assert_eq!(c.state(i, "a").await, "cooling_down", "instance {i}");
    }
}

/// A session alternating between instances keeps its endpoint, and moves for everyone when that
/// endpoint is ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_stay_put_across_instances_and_move_together() {
    let redis = RedisServer::start();
    let mocks = [
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
    ];
    for m in &mocks {
        m.set_default(Script::json_ok());
    }
    let eps = [
        Ep {
            name: "a",
            mock: &mocks[0],
            extra: "",
        },
        Ep {
            name: "b",
            mock: &mocks[1],
            extra: "",
        },
        Ep {
            name: "c",
            mock: &mocks[2],
            extra: "",
        },
    ];
    let c = Cluster::start(&redis, &eps, "strategy = \"round_robin\"").await;
    // Put the instances' round-robin cursors in different places.
    for i in 0..3 {
        for _ in 0..i {
            post_message(c.addr(i), &[]).await;
        }
    }
    let session = [("x-claude-code-session-id", "s-cluster-1")];
    // The first binder in Redis wins: whichever instance that was, all converge on its choice.
    post_message(c.addr(0), &session).await;
    // Instance 0's binding is written through to Redis before anyone else asks.
    let key = format!("GET {}:session:s-cluster-1|claude-sonnet-4-5", c.prefix);
    c.until("the session bound in Redis", || {
        let reply = redis.command(&key);
        async move { reply.starts_with('$') && !reply.starts_with("$-1") }
    })
    .await;
    let bound = served_by(&post_message(c.addr(0), &session).await);
    for round in 0..3 {
        for i in [1, 2, 0] {
            let addr = c.addr(i);
            let want = bound.clone();
            c.until(&format!("session on {want} via instance {i}"), || {
                let want = want.clone();
                async move { served_by(&post_message(addr, &session).await) == want }
            })
            .await;
            let _ = round;
        }
    }
    // Each later request lands on the bound endpoint at once.
    for i in [1, 2, 0, 1, 2] {
        assert_eq!(served_by(&post_message(c.addr(i), &session).await), bound);
    }

    // Its endpoint fails: the session moves, and stays moved for all.
    let idx = ["a", "b", "c"]
        .iter()
        .position(|n| *n == bound)
        .expect("bound name");
    mocks[idx].set_default(Script::error(500, "api_error", "boom"));
    let moved = served_by(&post_message(c.addr(0), &session).await);
    assert_ne!(moved, bound);
    // More traffic on instance 1 until it ejects the endpoint; the others learn it.
    c.until("bound endpoint ejected", || {
        let bound = bound.clone();
        let c = &c;
        async move {
            post_message(c.addr(0), &[]).await;
            c.state(0, &bound).await == "ejected"
        }
    })
    .await;
    c.wait_state(&bound, "ejected").await;
    // Instances that meet the ejection each move the session to whichever endpoint serves them
    // next; the first move written to Redis wins, and every instance converges on it.
    let addrs = [c.addr(1), c.addr(2), c.addr(0)];
    let agreed = eventually_some("one endpoint for the session on every instance", || async {
        let mut seen = Vec::new();
        for addr in addrs {
            seen.push(served_by(&post_message(addr, &session).await));
        }
        (seen.iter().all(|s| *s == seen[0]) && seen[0] != bound).then(|| seen[0].clone())
    })
    .await;
    let key = format!("GET {}:session:s-cluster-1|claude-sonnet-4-5", c.prefix);
    assert!(
        redis.command(&key).contains(&format!("{agreed}@")),
        "Redis holds {agreed}"
    );
    for i in [2, 1, 0, 2, 1] {
        assert_eq!(
            served_by(&post_message(c.addr(i), &session).await),
            agreed,
            "instance {i}"
        );
    }
}

/// Redis killed during traffic: no client request fails, every instance says Redis is down (health
/// view and metric); Redis restarted empty: the shared view is rebuilt and the cluster counters
/// equal the sum of the instances' own after a flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_is_invisible_to_clients_and_repaired() {
    let mut redis = RedisServer::start();
    let bad = MockUpstream::start().await;
    let good = MockUpstream::start().await;
    bad.set_default(Script::error(500, "api_error", "boom"));
    good.set_default(Script::json_ok());
    let c = Cluster::start(&redis, &a_and_b(&bad, &good), "").await;
    post_message(c.addr(0), &[]).await;
    post_message(c.addr(0), &[]).await;
    c.wait_state("a", "ejected").await;

    // Traffic on all three while Redis dies.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..3 {
        let addr = c.addr(i);
        let stop = std::sync::Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                statuses.push(post_message(addr, &[]).await.status.as_u16());
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    for i in 0..3 {
        let addr = c.addr(i);
        eventually("Redis reported down", || async move {
            get(addr, "/_ccgate/health", &[]).await.json()["cluster"]["redis_up"] == false
        })
        .await;
        let redis_down = format!("ccgate_cluster_redis_up{{instance=\"i{}\"}} 0", i + 1);
        let metrics = get(addr, "/_ccgate/metrics", &[]).await.body;
        assert!(metrics.contains(&redis_down), "{metrics}");
        // In OpenMetrics the cluster's families come before the one closing `# EOF`.
        let accept = [("accept", "application/openmetrics-text; version=1.0.0")];
        let open_metrics = get(addr, "/_ccgate/metrics", &accept).await.body;
        assert!(open_metrics.contains(&redis_down), "{open_metrics}");
        assert!(open_metrics.ends_with("\n# EOF\n"), "{open_metrics}");
        assert_eq!(open_metrics.matches("# EOF").count(), 1, "{open_metrics}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        let statuses = t.await.expect("traffic task");
        total += statuses.len();
        assert!(
            statuses.iter().all(|s| *s == 200),
            "a request failed: {statuses:?}"
        );
    }
    assert!(total > 10, "traffic ran ({total} requests)");
    for i in 0..3 {
        let addr = c.addr(i);
        eventually("Redis reported up again", || async move {
            get(addr, "/_ccgate/health", &[]).await.json()["cluster"]["redis_up"] == true
        })
        .await;
    }
    // The empty Redis got the shared view back: `a` is ejected in it.
    let key = format!("HGETALL {}:health:view", c.prefix);
    eventually("shared view rebuilt", || async {
        let all = redis.command(&key);
        all.contains("\"endpoint\":\"a\"") && all.contains("\"phase\":\"ejected\"")
    })
    .await;
    for i in 0..3 {
        assert_eq!(c.state(i, "a").await, "ejected");
    }
    c.totals_agree(&["total_requests", "successful_requests", "failed_requests"])
        .await;
    // The outage was logged once per instance, and the end of it once.
    for s in &c.instances {
        let log = s.stderr_until("Redis reachable again").await;
        if std::env::var("CLUSTER_TEST_LOG").is_ok() {
            eprintln!("=== {}\n{log}", s.addr);
        }
        let lost = log.matches("cluster: lost Redis").count()
            + log.matches("cluster: Redis unreachable").count();
        assert_eq!(lost, 1, "one warning per outage:\n{log}");
        assert_eq!(log.matches("Redis reachable again").count(), 1, "{log}");
    }
}

/// What an instance learns while it cannot reach Redis is published when the link is back, even
/// though Redis kept a shared view that still says otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_learnt_alone_is_republished_on_reconnect() {
    let redis = RedisServer::start();
    let (_a, _b, c) = a_before_b(&redis).await;
    // Redis stops answering (its data stays): every link times out and goes down.
    assert!(redis.command("CLIENT PAUSE 4000 ALL").contains("OK"));
    let addr = c.addr(0);
    eventually("instance 1 sees Redis down", || async move {
        get(addr, "/_ccgate/health", &[]).await.json()["cluster"]["redis_up"] == false
    })
    .await;
    let r = process::call(
        addr,
        Method::POST,
        "/_ccgate/endpoints/b/disable",
        &[],
        String::new(),
    )
    .await;
    assert_eq!(r.status, 200, "admin switches work without Redis");
    assert_eq!(served_by(&post_message(addr, &[]).await), "a");
    // Once Redis answers again, the others learn it.
    c.wait_state("b", "disabled").await;
}

/// The cluster's per-endpoint totals count every attempt of an endpoint a reload changed, made
/// before and after the reload and between two totals flushes (audit: the attempts of the
/// replaced counter cell since the last flush were never sent, and the new cell's were cut by
/// the old cell's value).
#[tokio::test]
async fn cluster_totals_keep_the_attempts_of_an_endpoint_a_reload_changed() {
    let redis = RedisServer::start();
    let a = MockUpstream::start().await;
    let prefix = format!("t{}", fastrand::u64(..));
    let text = |weight: u32| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n\
             [cluster]\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\ninstance = \"i1\"\nflush_interval = \"3s\"\n\n\
             [[endpoints]]\nname = \"a\"\nbase_url = \"{}\"\napi_key = \"sk-test-a\"\nweight = {weight}\n",
            redis.url(),
            a.url()
        )
    };
    let sb = Sandbox::new();
    let path = sb.write("config.toml", &text(100));
    let serving =
        process::start(sb.command(&["serve", "--config", path.to_str().expect("utf-8")])).await;
    let addr = serving.addr;
    eventually("instance linked to Redis", || async move {
        get(addr, "/_ccgate/health", &[]).await.json()["cluster"]["redis_up"] == true
    })
    .await;
    let mut sent = 0;
    for (weight, n) in [(200, 10), (300, 5), (300, 3)] {
        for _ in 0..n {
            assert_eq!(post_message(addr, &[]).await.status, 200);
        }
        sent += n;
        sb.write("config.toml", &text(weight));
        let r = process::call(addr, Method::POST, "/_ccgate/reload", &[], String::new()).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // The last flush, at stop, sends what the interval held back.
    let f = serving.stop().await;
    assert_eq!(f.status.code(), Some(0), "{}", f.output());
    assert_eq!(a.count(), sent as usize);
    let reply = redis.command(&format!("HGET {prefix}:totals endpoint:a:total_requests"));
    assert!(
        reply.ends_with(&format!("\r\n{sent}\r\n")),
        "cluster totals hold {reply:?}, {sent} attempts were made; {}",
        redis.command(&format!("HGETALL {prefix}:totals"))
    );
}

/// An endpoint the cluster holds ejected stays ejected on an instance whose reload rebuilt it
/// (its settings changed): the resync after the reload gives it the cluster's phase again
/// (audit: news it had applied before was dropped as already seen, and it took traffic to a
/// dead upstream).
#[tokio::test]
async fn a_reload_that_rebuilds_an_ejected_endpoint_keeps_it_ejected() {
    let redis = RedisServer::start();
    let mocks = [MockUpstream::start().await, MockUpstream::start().await];
    let eps = a_then_b(&mocks);
    let c = Cluster::start(&redis, &eps, "").await;
    // `a` breaks; instance 0 ejects it, and every instance learns it.
    mocks[0].set_default(Script::error(500, "api_error", "boom"));
    c.until("a ejected on instance 0", || async {
        post_message(c.addr(0), &[]).await;
        c.state(0, "a").await == "ejected"
    })
    .await;
    c.wait_state("a", "ejected").await;

    // Instance 1 reloads a config in which `a` changed (its weight): it is rebuilt there.
    let changed = [
        Ep {
            extra: "priority = 1\nweight = 7",
            ..eps[0]
        },
        eps[1],
    ];
    let text = cluster_config(&redis, &c.prefix, "i2", &changed, "");
    c.sandboxes[1].write("config.toml", &text);
    let r = process::call(
        c.addr(1),
        Method::POST,
        "/_ccgate/reload",
        &[],
        String::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("\"changed\":[\"a\"]"), "{}", r.body);
    c.until("a ejected again on instance 1", || async {
        c.state(1, "a").await == "ejected"
    })
    .await;
    // Its traffic goes to `b` (the prober may meet `a` meanwhile, which still fails).
    let before = mocks[0].count();
    for _ in 0..5 {
        let a = post_message(c.addr(1), &[]).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.header("x-ccgate-endpoint"), Some("b"));
    }
    assert!(
        mocks[0].count() - before <= 1,
        "requests went to the ejected endpoint"
    );
}

/// A session that fails over once (its endpoint answers one 500 and stays in rotation) moves to
/// the endpoint that served it, on every instance, and stays there: the move is written to the
/// shared map as a move, not as a late first bind that the old binding wins (audit: it flipped
/// back to the failing endpoint, and a session near its endpoint's quota bounced on every request).
#[tokio::test]
async fn a_session_that_fails_over_once_moves_for_every_instance() {
    let redis = RedisServer::start();
    let mocks = [
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
    ];
    let names = ["a", "b", "c"];
    let eps: Vec<Ep<'_>> = names
        .iter()
        .zip(&mocks)
        .map(|(name, mock)| Ep {
            name,
            mock,
            extra: "",
        })
        .collect();
    let c = Cluster::start(&redis, &eps, "strategy = \"round_robin\"").await;
    let session = [("x-claude-code-session-id", "s-failover-1")];
    let bound = served_by(&post_message(c.addr(0), &session).await);
    let key = format!("GET {}:session:s-failover-1|claude-sonnet-4-5", c.prefix);
    c.until("the session bound in Redis", || {
        let reply = redis.command(&key);
        let want = format!("{bound}@");
        async move { reply.contains(&want) }
    })
    .await;
    // Its endpoint fails once: the request fails over, and the session moves with it.
    let idx = names.iter().position(|n| *n == bound).expect("bound name");
    mocks[idx].push(Script::error(500, "api_error", "once"));
    let moved = served_by(&post_message(c.addr(0), &session).await);
    assert_ne!(moved, bound);
    c.until("the move written to Redis", || {
        let reply = redis.command(&key);
        let want = format!("{moved}@");
        async move { reply.contains(&want) }
    })
    .await;
    for i in [0, 1, 2, 0, 1, 2] {
        let addr = c.addr(i);
        let moved = moved.clone();
        c.until(&format!("session on {moved} via instance {i}"), || {
            let moved = moved.clone();
            async move { served_by(&post_message(addr, &session).await) == moved }
        })
        .await;
    }
    // And stays: the old endpoint works again, the session does not go back.
    for i in [0, 1, 2, 0, 1, 2] {
        assert_eq!(served_by(&post_message(c.addr(i), &session).await), moved);
    }
}

/// An ejection made through the previous gateway's queue by requests that began before a reload
/// is published to the cluster like any other (audit: the other instances never heard of it).
#[tokio::test]
async fn an_ejection_across_a_reload_reaches_the_other_instances() {
    let redis = RedisServer::start();
    let mocks = [MockUpstream::start().await, MockUpstream::start().await];
    let eps = a_then_b(&mocks);
    let c = Cluster::start(&redis, &eps, "").await;
    // Two slow failures (the threshold), in flight on instance 0 while it reloads.
    let slow =
        Script::error(500, "api_error", "boom").delay_before_headers(Duration::from_millis(400));
    mocks[0].push_n(slow, 2);
    let addr = c.addr(0);
    let in_flight: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { post_message(addr, &[]).await }))
        .collect();
    mocks[0].wait_requests(2).await;
    let r = process::call(addr, Method::POST, "/_ccgate/reload", &[], String::new()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    for t in in_flight {
        let answer = t.await.expect("request");
        assert_eq!(answer.header("x-ccgate-endpoint"), Some("b"), "{answer:?}");
    }
    c.wait_state("a", "ejected").await;
}
