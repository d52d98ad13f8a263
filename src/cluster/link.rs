//! The link to Redis: a cheap, cloneable [`ClusterLink`] that background tasks call, and the one
//! [`Supervisor`] task that owns the connections.
//!
//! The supervisor opens a multiplexed connection for commands and a pub/sub connection for news,
//! subscribes, stamps the heartbeat, and only then publishes the connection to callers and emits
//! [`ClusterEvent::Resync`]: so a caller that republishes and re-reads the shared view on that
//! event misses no news published after it. It then forwards news, beats every
//! [`LinkOptions::heartbeat_interval`], and on any failure withdraws the connection (callers get
//! [`ClusterError::Unavailable`] at once, never a wait), emits [`ClusterEvent::Down`], logs once
//! per outage, and reconnects with jittered exponential backoff.
//!
//! Spawning is the wiring's job (so shutdown can wait for the task): subscribe first, then spawn
//! [`Supervisor::run`]; [`ClusterLink::shutdown`] makes it return.

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisResult};
use tokio::sync::{Notify, broadcast, watch};

use crate::cluster::config::{ClusterConfig, LinkOptions};
use crate::cluster::keys::Keys;
use crate::cluster::news::HealthNews;
use crate::cluster::news::SessionNews;
use crate::cluster::scripts;

/// Why a cluster call did not happen. None of these is ever shown to a client: cluster calls run
/// in background tasks, and the gateway keeps serving on its local state.
#[derive(Debug)]
pub enum ClusterError {
    /// The link is down (or not up yet); the call was not attempted.
    Unavailable,
    /// Redis did not answer within [`LinkOptions::command_timeout`]; the effect is unknown.
    Timeout,
    /// Redis answered with an error, or the connection failed during the call.
    Redis(redis::RedisError),
    /// Redis answered with something this version cannot read.
    Decode(String),
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable => f.write_str("Redis unavailable"),
            Self::Timeout => f.write_str("Redis did not answer in time"),
            Self::Redis(e) => write!(f, "Redis: {e}"),
            Self::Decode(what) => write!(f, "unreadable answer from Redis: {what}"),
        }
    }
}

impl std::error::Error for ClusterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Redis(e) => Some(e),
            _ => None,
        }
    }
}

impl From<redis::RedisError> for ClusterError {
    fn from(e: redis::RedisError) -> Self {
        Self::Redis(e)
    }
}

/// Why the caller must republish its view and re-read the shared one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncReason {
    /// The first connection since start.
    Connected,
    /// Connected again after the link was down (Redis may have restarted empty).
    Reconnected,
    /// The link stayed up but this instance's heartbeat had vanished: Redis was flushed, or
    /// failed over to an empty replica, or this instance was pruned as dead.
    DataLost,
}

/// What the supervisor reports. Subscribe with [`ClusterLink::subscribe`]; a subscriber that lags
/// (`RecvError::Lagged`) should treat it as a resync and re-read [`ClusterLink::health_view`].
#[derive(Clone, Debug)]
pub enum ClusterEvent {
    /// The link is up and subscribed: publish this instance's view
    /// ([`ClusterLink::seed_health`] repopulates only what is missing) and re-read the shared one.
    Resync(ResyncReason),
    /// The link was lost; keep serving on local state. Calls fail fast until the next `Resync`.
    Down,
    /// Another instance published a phase change.
    Health(HealthNews),
    /// Another instance bound, moved or dropped a session.
    Session(SessionNews),
}

pub(super) struct Inner {
    pub(super) config: ClusterConfig,
    pub(super) options: LinkOptions,
    pub(super) keys: Keys,
    /// `instance#nonce`: this process's identity as a lease holder and flusher, distinct from an
    /// earlier life of an instance with the same name.
    pub(super) holder: String,
    client: redis::Client,
    conn: watch::Sender<Option<MultiplexedConnection>>,
    up: AtomicBool,
    events: broadcast::Sender<ClusterEvent>,
    /// Woken by a call that saw the connection fail, so the supervisor checks at once.
    poke: Notify,
    closed: AtomicBool,
    close: Notify,
    /// Per-instance sequence number of published news.
    pub(super) news_seq: AtomicU64,
    /// Counter behind episode tokens.
    pub(super) token_seq: AtomicU64,
    /// Heartbeats in a row that found another process beating under this instance's name; two
    /// or more is a live namesake (see `Supervisor::beat`).
    namesake_beats: AtomicU64,
}

/// A handle on the cluster link; clone it freely. Every method is for background tasks.
#[derive(Clone)]
pub struct ClusterLink {
    pub(super) inner: Arc<Inner>,
}

impl fmt::Debug for ClusterLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterLink")
            .field("redis_url", &self.inner.config.redis_url)
            .field("instance", &self.inner.config.instance)
            .field("up", &self.is_up())
            .finish()
    }
}

/// The task that owns the connections; run it with [`Supervisor::run`].
#[derive(Debug)]
pub struct Supervisor {
    link: ClusterLink,
}

/// A random 64-bit value from std's per-process random keys (no extra dependency needed for a
/// nonce and for jitter).
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

/// Unix milliseconds by this machine's clock.
pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Heartbeats in a row that must find another process under this instance's name before it is
/// a live namesake (a restart of this instance shows at one beat).
const NAMESAKE_BEATS: u64 = 2;

impl ClusterLink {
    /// A link (down until the supervisor connects) and its supervisor. Nothing is contacted yet.
    pub fn new(
        config: ClusterConfig,
        options: LinkOptions,
    ) -> Result<(ClusterLink, Supervisor), ClusterError> {
        let client = redis::Client::open(config.redis_url.expose())?;
        let (events, _) = broadcast::channel(options.event_capacity.max(16));
        let holder = format!("{}#{:016x}", config.instance, random_u64());
        let link = ClusterLink {
            inner: Arc::new(Inner {
                keys: Keys::in_db(
                    &config.key_prefix,
                    client.get_connection_info().redis_settings().db(),
                ),
                config,
                options,
                holder,
                client,
                conn: watch::Sender::new(None),
                up: AtomicBool::new(false),
                events,
                poke: Notify::new(),
                closed: AtomicBool::new(false),
                close: Notify::new(),
                news_seq: AtomicU64::new(0),
                token_seq: AtomicU64::new(0),
                namesake_beats: AtomicU64::new(0),
            }),
        };
        let supervisor = Supervisor { link: link.clone() };
        Ok((link, supervisor))
    }

    /// Whether the link is up now (for the health view and the `cluster_redis_up` metric).
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Acquire)
    }

    /// Whether another live instance uses this one's name (logged as an error when it starts).
    pub fn name_clash(&self) -> bool {
        self.inner.namesake_beats.load(Ordering::Acquire) >= NAMESAKE_BEATS
    }

    /// This instance's name.
    pub fn instance(&self) -> &str {
        &self.inner.config.instance
    }

    /// This process's holder identity (`instance#nonce`), as stored in leases and the totals fence.
    pub fn holder(&self) -> &str {
        &self.inner.holder
    }

    /// The key schema in use.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// Events from now on (subscribe before spawning the supervisor to see the first `Resync`).
    pub fn subscribe(&self) -> broadcast::Receiver<ClusterEvent> {
        self.inner.events.subscribe()
    }

    /// Stops the supervisor (it withdraws the connection and returns) and fails later calls fast.
    pub fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.close.notify_one();
        self.inner.conn.send_replace(None);
        self.inner.up.store(false, Ordering::Release);
    }

    /// Runs `f` on the current connection, bounded by the command timeout; fails fast when down.
    /// A failure that looks like a broken connection wakes the supervisor.
    pub(super) async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClusterError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let conn = self
            .inner
            .conn
            .borrow()
            .clone()
            .ok_or(ClusterError::Unavailable)?;
        match tokio::time::timeout(self.inner.options.command_timeout, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.inner.poke.notify_one();
                }
                Err(ClusterError::Redis(e))
            }
            Err(_) => {
                self.inner.poke.notify_one();
                Err(ClusterError::Timeout)
            }
        }
    }

    fn emit(&self, event: ClusterEvent) {
        // No subscriber is not an error: the wiring may not listen to everything.
        let _ = self.inner.events.send(event);
    }
}

/// How one connected period ended.
enum Ended {
    Shutdown,
    Lost(String),
}

impl Supervisor {
    /// Connects, serves, and reconnects until [`ClusterLink::shutdown`].
    pub async fn run(self) {
        let link = self.link;
        let inner = &link.inner;
        let opts = &inner.options;
        let url = inner.config.redis_url.redacted();
        let mut backoff = opts.backoff_min;
        let mut ever_connected = false;
        let mut outage_logged = false;
        while !inner.closed.load(Ordering::Acquire) {
            match Self::connect(&link).await {
                Ok((conn, pubsub)) => {
                    backoff = opts.backoff_min;
                    inner.conn.send_replace(Some(conn.clone()));
                    inner.up.store(true, Ordering::Release);
                    if outage_logged {
                        tracing::info!(redis = %url, instance = %inner.config.instance, "cluster: Redis reachable again; republishing this instance's view");
                    } else {
                        tracing::info!(redis = %url, instance = %inner.config.instance, "cluster: connected to Redis");
                    }
                    let reason = if ever_connected {
                        ResyncReason::Reconnected
                    } else {
                        ResyncReason::Connected
                    };
                    ever_connected = true;
                    link.emit(ClusterEvent::Resync(reason));
                    let ended = Self::serve(&link, conn, pubsub).await;
                    inner.conn.send_replace(None);
                    inner.up.store(false, Ordering::Release);
                    match ended {
                        Ended::Shutdown => return,
                        Ended::Lost(why) => {
                            link.emit(ClusterEvent::Down);
                            tracing::warn!(redis = %url, error = %why, "cluster: lost Redis; serving on local state and reconnecting");
                            outage_logged = true;
                        }
                    }
                }
                Err(e) => {
                    if outage_logged {
                        tracing::debug!(redis = %url, error = %e, "cluster: Redis still unreachable");
                    } else {
                        tracing::warn!(redis = %url, error = %e, "cluster: Redis unreachable; serving on local state and retrying");
                        outage_logged = true;
                    }
                }
            }
            // Jitter in [backoff/2, backoff] so instances do not reconnect in lockstep.
            let half = backoff / 2;
            let jitter = half.mul_f64((random_u64() % 1000) as f64 / 1000.0);
            tokio::select! {
                () = tokio::time::sleep(half + jitter) => {}
                () = inner.close.notified() => {}
            }
            backoff = (backoff * 2).min(opts.backoff_max);
        }
    }

    async fn connect(
        link: &ClusterLink,
    ) -> Result<(MultiplexedConnection, redis::aio::PubSub), ClusterError> {
        let inner = &link.inner;
        let opts = &inner.options;
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(opts.connect_timeout))
            .set_response_timeout(Some(opts.command_timeout));
        let mut conn = inner
            .client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await?;
        let mut pubsub =
            tokio::time::timeout(opts.connect_timeout, inner.client.get_async_pubsub())
                .await
                .map_err(|_| ClusterError::Timeout)??;
        let channels = [inner.keys.health_channel(), inner.keys.session_channel()];
        tokio::time::timeout(opts.connect_timeout, pubsub.subscribe(&channels))
            .await
            .map_err(|_| ClusterError::Timeout)??;
        tokio::time::timeout(opts.command_timeout, Self::beat(link, &mut conn))
            .await
            .map_err(|_| ClusterError::Timeout)??;
        Ok((conn, pubsub))
    }

    /// Stamps the heartbeat; true when the field was new. Notes another process beating under
    /// this instance's name: seen at two beats in a row, it is a live namesake (a restart of this
    /// instance shows once), which mixes up both instances' totals and news.
    async fn beat(link: &ClusterLink, conn: &mut MultiplexedConnection) -> RedisResult<bool> {
        let inner = &link.inner;
        let (added, other): (i64, i64) = scripts::HEARTBEAT
            .key(inner.keys.instances())
            .key(inner.keys.instance_holders())
            .arg(&inner.config.instance)
            .arg(&inner.holder)
            .invoke_async(conn)
            .await?;
        // Only this task beats: the count it reads back is its own.
        let before = if other == 1 {
            inner.namesake_beats.fetch_add(1, Ordering::AcqRel)
        } else {
            inner.namesake_beats.swap(0, Ordering::AcqRel)
        };
        if other == 1 && before + 1 == NAMESAKE_BEATS {
            tracing::error!(instance = %inner.config.instance, "cluster: another live instance uses this instance's name; give each its own [cluster] instance name (their totals and health news are being mixed up)");
        } else if other == 0 && before >= NAMESAKE_BEATS {
            tracing::info!(instance = %inner.config.instance, "cluster: no other instance uses this name any more");
        }
        Ok(added == 1)
    }

    async fn serve(
        link: &ClusterLink,
        mut conn: MultiplexedConnection,
        mut pubsub: redis::aio::PubSub,
    ) -> Ended {
        let inner = &link.inner;
        let health_channel = inner.keys.health_channel();
        let mut messages = pubsub.on_message();
        let mut tick = tokio::time::interval(inner.options.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset(); // `connect` has just beaten.
        loop {
            // News is only forwarded; the heartbeat (which also proves the command connection)
            // runs on a tick, or at once when a caller saw a call fail.
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else {
                        return Ended::Lost("subscription connection closed".to_owned());
                    };
                    Self::dispatch(link, &health_channel, &msg);
                    continue;
                }
                _ = tick.tick() => {}
                () = inner.poke.notified() => {}
                () = inner.close.notified() => return Ended::Shutdown,
            }
            if inner.closed.load(Ordering::Acquire) {
                return Ended::Shutdown;
            }
            match tokio::time::timeout(inner.options.command_timeout, Self::beat(link, &mut conn))
                .await
            {
                Ok(Ok(true)) => {
                    tracing::warn!(instance = %inner.config.instance, "cluster: this instance's heartbeat vanished from Redis (flushed or restarted under us); republishing");
                    link.emit(ClusterEvent::Resync(ResyncReason::DataLost));
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => return Ended::Lost(e.to_string()),
                Err(_) => return Ended::Lost("heartbeat timed out".to_owned()),
            }
        }
    }

    fn dispatch(link: &ClusterLink, health_channel: &str, msg: &redis::Msg) {
        let own = link.inner.config.instance.as_str();
        let payload = msg.get_payload_bytes();
        if msg.get_channel_name() == health_channel {
            match serde_json::from_slice::<HealthNews>(payload) {
                Ok(news) if news.origin != own => link.emit(ClusterEvent::Health(news)),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "cluster: unreadable health news dropped"),
            }
        } else {
            match serde_json::from_slice::<SessionNews>(payload) {
                Ok(news) if news.origin != own => link.emit(ClusterEvent::Session(news)),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "cluster: unreadable session news dropped"),
            }
        }
    }
}
