//! Wiring: bind the listener, serve connections, run the background prober, reload the config on
//! request (SIGHUP or `POST /_ccgate/reload`), and shut down gracefully. The only module that
//! spawns long-lived tasks, so shutdown can wait for all of them.
//!
//! The gateway in service lives in a [`Handle`] behind an `ArcSwap`: each request takes the
//! current one, and a reload swaps in its successor atomically. Requests already running finish
//! on the gateway they started with; endpoints the reload kept share their live state with it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};

use std::path::PathBuf;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body::Body;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, ProcessEnv};
use crate::health::registry::ReloadReport;
use crate::proxy::entry::{self, Destination};
use crate::proxy::gateway::Gateway;
use crate::proxy::handler;
use crate::proxy::relay::BoxError;
use crate::proxy::response::{self, GateBody};
use crate::store::Persist;

/// A bound, not yet running, gateway.
pub struct Server {
    listener: TcpListener,
    handle: Arc<Handle>,
}

/// The gateway in service, and how to replace it.
pub struct Handle {
    current: ArcSwap<Gateway>,
    /// State that lasts: the database, lifetime counters and episodes (one per process, shared
    /// by every gateway a reload builds).
    persist: Arc<Persist>,
    source: Option<PathBuf>,
    reloading: tokio::sync::Mutex<()>,
    prober: parking_lot::Mutex<Option<BgTask>>,
    /// Cluster mode (`[cluster]`): this instance's link to the others.
    cluster: Option<Arc<crate::control::cluster::ClusterNode>>,
    /// Turns true to end the shutdown's drain at once (a second signal), as its deadline would.
    cut_short: watch::Sender<bool>,
}

/// A background task and the signal that stops it.
struct BgTask {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl BgTask {
    /// Spawns `run(stop)`; the task is to end once `stop` turns true or its sender goes away.
    fn spawn<F>(run: impl FnOnce(watch::Receiver<bool>) -> F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop, rx) = watch::channel(false);
        Self {
            stop,
            task: tokio::spawn(run(rx)),
        }
    }

    /// Asks the task to stop, without waiting for it.
    fn signal(&self) {
        let _ = self.stop.send(true);
    }

    /// Asks the task to stop and waits until it has.
    async fn stop(self) {
        self.signal();
        let _ = self.task.await;
    }
}

/// Why a reload did not happen (the running gateway is unchanged).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The gateway was started without a config file.
    #[error("this gateway was started without a config file; restart it to change its endpoints")]
    NoSource,
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The new config has problems.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// An endpoint's client could not be built.
    #[error(transparent)]
    Client(#[from] crate::transport::upstream::ClientError),
    /// The new config has no access token, and the running listener is beyond loopback (the
    /// file's own `listen` may be loopback: it applies only at restart).
    #[error(
        "server.access_token: this gateway listens on {0}, not a loopback address; a config without an access token would leave it open to anyone who can reach it"
    )]
    Exposed(SocketAddr),
}

impl Handle {
    /// The gateway serving new requests.
    pub fn current(&self) -> Arc<Gateway> {
        self.current.load_full()
    }

    /// Re-reads the config file and swaps in the reloaded gateway.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let path = self.source.as_ref().ok_or(ReloadError::NoSource)?;
        // A config file is small: reading it in place is cheaper than a blocking-pool hop.
        let text = crate::config::read_capped(path).map_err(|source| ReloadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let config = Config::from_toml(&text, &path.display().to_string(), &ProcessEnv)?;
        self.reload_with(config).await
    }

    /// Swaps in the gateway for `config`, continuing the current one.
    pub async fn reload_with(&self, config: Config) -> Result<ReloadReport, ReloadError> {
        let _one_at_a_time = self.reloading.lock().await;
        let current = self.current();
        let listen = current.config.server.listen;
        if !listen.ip().is_loopback() && config.server.access_token.is_none() {
            return Err(ReloadError::Exposed(listen));
        }
        let (next, report) = current.reloaded(config)?;
        let next = Arc::new(next);
        // The cells the reload replaces are written (and added to the cluster's totals) even if
        // no flush has seen them yet.
        self.persist.follow(&current);
        if let Some(node) = &self.cluster {
            node.follow_replaced(&current);
        }
        self.current.store(Arc::clone(&next));
        if let Some(node) = self.cluster.clone() {
            // Off the reload's path: Redis may be slow or away (the link resyncs on reconnect).
            let gw = Arc::clone(&next);
            tokio::spawn(async move { node.adopt_reloaded(&gw).await });
        }
        self.start_prober(next);
        tracing::info!(
            added = ?report.added,
            removed = ?report.removed,
            changed = ?report.changed,
            kept = ?report.kept,
            "configuration reloaded"
        );
        for setting in &report.restart_needed {
            tracing::warn!("reload: {setting}");
        }
        Ok(report)
    }

    /// Starts the prober for `gw`, stopping the previous gateway's.
    fn start_prober(&self, gw: Arc<Gateway>) {
        let cluster = self.cluster.clone();
        let prober = BgTask::spawn(|stop| crate::control::prober::run_prober_in(gw, cluster, stop));
        if let Some(old) = self.prober.lock().replace(prober) {
            old.signal();
        }
    }

    async fn stop_prober(&self) {
        let prober = self.prober.lock().take();
        if let Some(prober) = prober {
            prober.stop().await;
        }
    }
}

/// `POST /_ccgate/reload`: re-reads the config file (the same token and same-site rules as the
/// other admin writes).
async fn reload_route<B>(handle: &Handle, req: &Request<B>) -> Response<GateBody> {
    if let Some(refused) =
        crate::control::admin::refuse_write(&handle.current(), req.method(), req.headers())
    {
        return refused;
    }
    match handle.reload().await {
        Ok(report) => {
            let mut v = serde_json::to_value(&report).unwrap_or_default();
            v["reloaded"] = true.into();
            response::json(StatusCode::OK, &v)
        }
        Err(e @ ReloadError::NoSource) => response::error(
            StatusCode::CONFLICT,
            "invalid_request_error",
            &format!("ccgate: {e}"),
        ),
        Err(e) => response::error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!("ccgate: configuration not reloaded: {e}"),
        ),
    }
}

/// Routes one request: admission first (method, target, path; see [`entry`]), then ccgate's own
/// prefix to the control plane, the pre-connect answered here, and API paths to the proxy of the
/// current gateway. The proxy never sees `/_ccgate/`, and every later stage sees the normalised
/// origin-form target only.
// An async block, not an async fn: see `proxy::handler::handle`.
#[allow(clippy::manual_async_fn)]
fn serve_one<B>(
    handle: Arc<Handle>,
    mut req: Request<B>,
) -> impl Future<Output = Response<GateBody>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    async move {
        let admitted = match entry::host_lines(req.version(), req.headers())
            .and_then(|()| entry::admit(req.method(), req.uri()))
        {
            Ok(a) => a,
            Err(refusal) => {
                tracing::debug!(method = %req.method(), %refusal, "request refused at the door");
                return refusal.answer();
            }
        };
        let gw = handle.current();
        if gw.config.server.access_token.is_none() {
            // Nothing but the loopback listener guards this gateway: no browser page from
            // another site may use it.
            if let Some(refusal) = entry::foreign_browser(req.headers(), req.uri()) {
                tracing::debug!(%refusal, "request refused at the door");
                return refusal.answer();
            }
        }
        if let Some(target) = admitted.target {
            *req.uri_mut() = Uri::from(target);
        }
        match admitted.destination {
            Destination::Preconnect => Response::new(GateBody::empty()),
            Destination::Control if req.uri().path() == "/_ccgate/reload" => {
                reload_route(&handle, &req).await
            }
            Destination::Control => {
                if let Some(resp) =
                    crate::control::cluster_view::route(handle.cluster.as_ref(), &gw, &req).await
                {
                    return resp;
                }
                crate::control::admin::handle(gw, &handle.persist, req).await
            }
            Destination::Api => handler::handle(gw, req).await,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// An endpoint's upstream client could not be built.
    #[error(transparent)]
    Client(#[from] crate::transport::upstream::ClientError),
    /// The `[cluster]` table could not be used.
    #[error("cluster: {0}")]
    Cluster(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl Server {
    /// Builds the gateway and binds its listener. `source` is the file the config came from, so
    /// that SIGHUP and `POST /_ccgate/reload` can re-read it (`None`: no reloads).
    pub async fn bind_with_source(
        config: Config,
        source: Option<PathBuf>,
    ) -> Result<Self, StartError> {
        let addr = config.server.listen;
        // The address first: a start that cannot listen changes nothing (opening the database
        // closes the last run's attempts in flight).
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let mut gateway = Gateway::new(config)?;
        let persist = crate::store::attach(&mut gateway).await;
        let cluster = match &gateway.config.cluster {
            Some(settings) => {
                let node = crate::control::cluster::ClusterNode::new(settings)
                    .map_err(StartError::Cluster)?;
                node.attach(&gateway);
                Some(node)
            }
            None => None,
        };
        let gateway = Arc::new(gateway);
        let handle = Arc::new(Handle {
            current: ArcSwap::new(gateway),
            persist,
            source,
            reloading: tokio::sync::Mutex::new(()),
            prober: parking_lot::Mutex::new(None),
            cut_short: watch::Sender::new(false),
            cluster,
        });
        Ok(Self { listener, handle })
    }

    /// The handle through which the gateway in service is reached and reloaded.
    pub fn handle(&self) -> Arc<Handle> {
        Arc::clone(&self.handle)
    }

    /// Cluster mode's link, when `[cluster]` is configured.
    pub fn cluster(&self) -> Option<Arc<crate::control::cluster::ClusterNode>> {
        self.handle.cluster.clone()
    }

    /// The address actually bound (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.handle.current().config.server.listen)
    }

    /// The gateway in service now.
    pub fn gateway(&self) -> Arc<Gateway> {
        self.handle.current()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish for
    /// up to `server.shutdown_timeout`, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        self.run_until(shutdown, std::future::pending::<()>).await;
    }

    /// [`Server::run`], with a drain that ends at once, as at its deadline, when the future
    /// `cut_short` makes (once the shutdown has begun: a second signal) resolves.
    pub async fn run_until<F>(
        self,
        shutdown: impl Future<Output = ()>,
        cut_short: impl FnOnce() -> F,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        let Server { listener, handle } = self;
        let cluster = start_cluster(&handle);
        handle.start_prober(handle.current());
        let writer = start_writer(&handle);
        let mut hangups = hangups();
        let exposed = listener
            .local_addr()
            .map_or(true, |a| !a.ip().is_loopback());
        let server_config = handle.current().config.server.clone();
        // A deadline for reading each request head guards against clients that trickle bytes to
        // hold connections open, and closes idle keep-alive connections. It arms a timer for
        // every request (about 7% of ccgate's CPU per request in the c=64 benchmark), so unless
        // configured it is used only when the listener is reachable from other machines; on
        // loopback the clients are the user's own.
        let header_timeout = server_config
            .header_read_timeout
            .or(exposed.then_some(crate::config::EXPOSED_HEADER_READ_TIMEOUT));
        raise_open_file_limit(server_config.max_connections);
        let limit = Arc::new(ConnectionLimit::new(server_config.max_connections));
        let workers: Vec<Worker> = (0..server_config.workers)
            .filter_map(|i| Worker::spawn(i, Arc::clone(&handle), header_timeout))
            .collect();
        // Connections no worker could take (none started) are served here.
        let local = Connections::new(header_timeout);
        let mut next = 0usize;
        tokio::pin!(shutdown);
        loop {
            let (stream, _peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
                Some(()) = next_hangup(&mut hangups) => {
                    let handle = Arc::clone(&handle);
                    tokio::spawn(async move {
                        if let Err(e) = handle.reload().await {
                            tracing::warn!(error = %e, "SIGHUP: configuration not reloaded");
                        }
                    });
                    continue;
                }
            };
            // Past the limit a connection is accepted and closed at once: the client gets a clear
            // connection error instead of waiting in the backlog, and nothing is held for it.
            let Some(slot) = limit.take() else {
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            // Connections go to the workers in turn; each serves its connections on its own
            // single-threaded event loop.
            let stream = match workers.get(next % workers.len().max(1)) {
                Some(w) => match stream.into_std() {
                    Ok(std) => match w.tx.send((std, slot)) {
                        Ok(()) => {
                            next = next.wrapping_add(1);
                            continue;
                        }
                        Err(tokio::sync::mpsc::error::SendError((std, slot))) => {
                            TcpStream::from_std(std).ok().map(|s| (s, slot))
                        }
                    },
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot hand over a connection");
                        None
                    }
                },
                None => Some((stream, slot)),
            };
            if let Some((stream, slot)) = stream {
                local.serve(stream, slot, Arc::clone(&handle));
            }
        }
        // Listening for the second signal before the listener closes: a client that sees it
        // closed may already send that signal.
        let cut = cut_short();
        drop(listener);
        let cutter = Arc::clone(&handle);
        let cut = tokio::spawn(async move {
            cut.await;
            tracing::warn!("second signal: ending the requests still running now");
            cutter.cut_short.send_replace(true);
        });
        handle.stop_prober().await;
        let limit = handle.current().config.server.shutdown_timeout;
        tracing::info!(
            "shutting down; waiting up to {} for in-flight requests",
            humantime::format_duration(limit)
        );
        let mut done = Vec::new();
        for w in workers {
            drop(w.tx);
            done.push(w.done);
        }
        local.shutdown(limit, &handle).await;
        for d in done {
            let _ = d.await;
        }
        cut.abort();
        // The writer's last flush comes after the requests have drained.
        writer.stop().await;
        // Newest first: the totals task's last flush and the publisher's last news go out
        // while the link to Redis is still up (the supervisor, which shuts it, stops last).
        for task in cluster.into_iter().rev() {
            task.stop().await;
        }
        if let Some(node) = &handle.cluster {
            node.shutdown();
        }
    }
}

/// Raises the open-file soft limit to the hard limit, as nginx's `worker_rlimit_nofile` and Go's
/// runtime do: every proxied stream holds two descriptors (the client's connection and the
/// upstream one), so the usual soft limit of 1,024 would cap the gateway near 500 open streams.
/// Warns when even the hard limit is short of two descriptors per allowed connection.
fn raise_open_file_limit(max_connections: usize) {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .ok()
        .map(|(soft, _)| soft);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(now) => {
            if let Some(before) = before.filter(|&b| b < now) {
                tracing::info!(from = before, to = now, "raised the open-file limit");
            }
            let need = 2 * max_connections as u64 + 64;
            if now < need {
                tracing::warn!(
                    limit = now,
                    max_connections,
                    "the open-file limit is below two descriptors per allowed connection; \
                     raise it (ulimit -Hn, systemd's LimitNOFILE=) or lower server.max_connections"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

/// How long streams ended at the shutdown's deadline have to get their `error` event out.
const STREAM_END_GRACE: Duration = Duration::from_secs(1);

/// HTTP/2's connection preface, which a client speaking HTTP/2 with prior knowledge sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The connections one event loop serves, and their graceful shutdown.
struct Connections {
    builders: Arc<Builders>,
    header_timeout: Option<Duration>,
    graceful: GracefulShutdown,
    /// Turns true when shutdown begins: the HTTP/2 connections, which close themselves (see
    /// [`serve_h2`]), hear it here.
    closing: watch::Sender<bool>,
}

/// How a connection is served, chosen by its first bytes.
struct Builders {
    /// HTTP/1.1 or HTTP/2 with prior knowledge, told apart by reading the first 24 bytes.
    auto: auto::Builder<TokioExecutor>,
    /// HTTP/1.1 only, for a connection whose first bytes already ruled out HTTP/2's preface:
    /// hyper then makes its first read from the socket. After the auto builder's 24-byte read,
    /// hyper's first read holds those 24 bytes and its next one doubles the read buffer to
    /// 16 KB, which the connection keeps for its whole life (8 KB more per open stream). hyper's
    /// own HTTP/1.1 connection is also 0.9 KB smaller than the auto builder's, which has room
    /// for an HTTP/2 one.
    http1: http1::Builder,
}

impl Connections {
    /// `header_timeout`: the deadline for reading a request head, if any.
    fn new(header_timeout: Option<Duration>) -> Self {
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout);
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout);
        Self {
            builders: Arc::new(Builders { auto, http1 }),
            header_timeout,
            graceful: GracefulShutdown::new(),
            closing: watch::Sender::new(false),
        }
    }

    /// Serves one connection on the current runtime; `slot` is freed when it ends.
    fn serve(&self, stream: TcpStream, slot: ConnectionSlot, handle: Arc<Handle>) {
        let builders = Arc::clone(&self.builders);
        let watcher = self.graceful.watcher();
        let mut closing = self.closing.subscribe();
        let header_timeout = self.header_timeout;
        tokio::spawn(async move {
            // A connection that closes, or sends nothing before the head's deadline or the
            // shutdown, is done.
            let Some(http1) = starts_http1(&stream, header_timeout, &mut closing).await else {
                drop(slot);
                return;
            };
            let io = TokioIo::new(stream);
            let ended = if http1 {
                let service = service_fn(move |req| {
                    let handle = Arc::clone(&handle);
                    // hyper keeps room for this future in every connection for its whole life:
                    // box the request's large state machine, so an idle or streaming connection
                    // holds a pointer instead of kilobytes.
                    async move { Ok::<_, Infallible>(Box::pin(serve_one(handle, req)).await) }
                });
                let conn = builders.http1.serve_connection(io, service);
                watcher.watch(conn).await.map_err(BoxError::from)
            } else {
                // Boxed: the task keeps room for the larger of its connections for its whole
                // life, and HTTP/2 with prior knowledge is the rare one.
                let h2 = serve_h2(&builders.auto, io, handle, closing, header_timeout);
                // The watcher counts the connection until it ends, for the shutdown to wait on.
                let ended = Box::pin(h2).await;
                drop(watcher);
                ended
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }

    /// Lets in-flight requests finish for up to `limit`.
    async fn shutdown(self, limit: Duration, handle: &Handle) {
        self.closing.send_replace(true);
        let drained = self.graceful.shutdown();
        tokio::pin!(drained);
        let mut cut_short = handle.cut_short.subscribe();
        tokio::select! {
            done = tokio::time::timeout(limit, drained.as_mut()) => {
                if done.is_ok() {
                    return;
                }
                tracing::warn!(
                    "in-flight requests still running after the shutdown timeout; ending them"
                );
            }
            _ = cut_short.wait_for(|cut| *cut) => {}
        }
        // Streams still open are told with an `error` event, which gets a moment to reach them
        // before every connection is dropped.
        handle.current().streams.stop();
        let _ = tokio::time::timeout(STREAM_END_GRACE, drained).await;
    }
}

/// Serves a connection whose first bytes may be HTTP/2's preface (through the auto builder, which
/// reads them and picks the protocol). hyper has no deadline for an HTTP/2 connection's preface
/// or its idle time; with `limit` (the head deadline), the connection is shut down gracefully
/// (`GOAWAY`, so that a client's next request opens a new one) once it has had no request open
/// for that long: before its first request (a client that sends a byte of the preface, or the
/// preface alone, and then nothing), and between requests, as an idle HTTP/1.1 keep-alive
/// connection is closed. `closing` turning true (shutdown) shuts it down the same way.
async fn serve_h2(
    auto: &auto::Builder<TokioExecutor>,
    io: TokioIo<TcpStream>,
    handle: Arc<Handle>,
    mut closing: watch::Receiver<bool>,
    limit: Option<Duration>,
) -> Result<(), BoxError> {
    let streams = Arc::new(OpenStreams::default());
    let open = Arc::clone(&streams);
    let service = service_fn(move |req| {
        let handle = Arc::clone(&handle);
        let open = StreamOpen::new(&open);
        async move {
            let resp = Box::pin(serve_one(handle, req)).await;
            Ok::<_, Infallible>(resp.map(|body| Counted { body, _open: open }))
        }
    });
    let conn = auto.serve_connection(io, service);
    tokio::pin!(conn);
    let idle = async {
        match limit {
            Some(limit) => streams.idle_for(limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(idle);
    // A graceful shutdown waits for the client (its acknowledgement of the GOAWAY's ping): one
    // that never answers is dropped after another `limit`.
    let grace = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(grace);
    let mut idled = false;
    let mut shutting = *closing.borrow_and_update();
    if shutting {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            ended = conn.as_mut() => return ended,
            () = &mut idle, if !shutting => {
                tracing::debug!("HTTP/2 connection idle past the head deadline; closing it");
                conn.as_mut().graceful_shutdown();
                shutting = true;
                idled = true;
                if let Some(limit) = limit {
                    grace.as_mut().reset(tokio::time::Instant::now() + limit);
                }
            }
            () = &mut grace, if idled => return Ok(()),
            changed = closing.changed(), if !shutting => {
                if changed.is_err() || *closing.borrow() {
                    conn.as_mut().graceful_shutdown();
                    shutting = true;
                }
            }
        }
    }
}

/// The requests open on one HTTP/2 connection (their answers not yet sent in full), and a wake-up
/// for each that begins or ends.
#[derive(Default)]
struct OpenStreams {
    open: AtomicUsize,
    begun: std::sync::atomic::AtomicU64,
    changed: tokio::sync::Notify,
}

impl OpenStreams {
    /// Returns once no request has been open for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the reads, so a change after them wakes it.
            changed.as_mut().enable();
            let begun = self.begun.load(Ordering::Acquire);
            if self.open.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(limit) => {
                    let quiet = self.open.load(Ordering::Acquire) == 0
                        && self.begun.load(Ordering::Acquire) == begun;
                    if quiet {
                        return;
                    }
                }
                () = &mut changed => {}
            }
        }
    }
}

/// One open request of an HTTP/2 connection, until its answer's body is dropped.
struct StreamOpen(Arc<OpenStreams>);

impl StreamOpen {
    fn new(streams: &Arc<OpenStreams>) -> Self {
        streams.begun.fetch_add(1, Ordering::AcqRel);
        streams.open.fetch_add(1, Ordering::AcqRel);
        streams.changed.notify_waiters();
        Self(Arc::clone(streams))
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

pin_project_lite::pin_project! {
    /// An answer's body that keeps its request counted as open until it is dropped.
    struct Counted {
        #[pin]
        body: GateBody,
        _open: StreamOpen,
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Whether a new connection's first bytes rule out HTTP/2's preface, read without consuming
/// them; `None` when the client closed, or sent nothing before `deadline`. Bytes that could still
/// begin the preface (a client that sent only `P`, say) are left to the auto builder to read.
/// A connection that has sent nothing when shutdown begins (a client's spare connection, opened
/// ahead of need) is closed then too: it holds no request, and the shutdown would otherwise wait
/// out its whole limit for it.
async fn starts_http1(
    stream: &TcpStream,
    deadline: Option<Duration>,
    closing: &mut watch::Receiver<bool>,
) -> Option<bool> {
    let mut head = [0u8; H2_PREFACE.len()];
    let peek = async {
        let peek = stream.peek(&mut head);
        match deadline {
            Some(d) => tokio::time::timeout(d, peek).await.ok(),
            None => Some(peek.await),
        }
    };
    let n = tokio::select! {
        biased;
        n = peek => n?.ok()?,
        _ = closing.wait_for(|closing| *closing) => return None,
    };
    (n > 0).then(|| !H2_PREFACE.starts_with(&head[..n]))
}

/// The cap on open client connections (`server.max_connections`). Each idle keep-alive
/// connection costs a task and its buffers, so thousands of them must stay bounded.
struct ConnectionLimit {
    open: AtomicUsize,
    max: usize,
    /// Set while the limit is reached, so that it is logged once per episode, not per refusal.
    full: AtomicBool,
}

/// One open client connection, counted until dropped.
struct ConnectionSlot(Arc<ConnectionLimit>);

impl ConnectionLimit {
    fn new(max: usize) -> Self {
        Self {
            open: AtomicUsize::new(0),
            max,
            full: AtomicBool::new(false),
        }
    }

    /// A slot for a new connection, or `None` at the limit (logged once until a slot frees).
    fn take(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if taken {
            if self.full.swap(false, Ordering::AcqRel) {
                tracing::info!(
                    max_connections = self.max,
                    "client connections below the limit again; accepting"
                );
            }
            Some(ConnectionSlot(Arc::clone(self)))
        } else {
            if !self.full.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    max_connections = self.max,
                    "client connection limit reached (server.max_connections); closing new \
                     connections until some end"
                );
            }
            None
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A serving thread with its own single-threaded runtime and upstream pools: a request, its
/// upstream connection and all their wakeups stay on one thread, as in nginx's worker model.
struct Worker {
    tx: tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, ConnectionSlot)>,
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Worker {
    fn spawn(index: usize, handle: Arc<Handle>, header_timeout: Option<Duration>) -> Option<Self> {
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(std::net::TcpStream, ConnectionSlot)>();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("ccgate-worker-{index}"))
            .spawn(move || {
                crate::transport::upstream::set_worker(index);
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a worker event loop");
                        return;
                    }
                };
                runtime.block_on(async move {
                    tokio::spawn(standing_timer());
                    let conns = Connections::new(header_timeout);
                    while let Some((std, slot)) = rx.recv().await {
                        match TcpStream::from_std(std) {
                            Ok(stream) => conns.serve(stream, slot, Arc::clone(&handle)),
                            Err(e) => tracing::debug!(error = %e, "cannot adopt a connection"),
                        }
                    }
                    let limit = handle.current().config.server.shutdown_timeout;
                    conns.shutdown(limit, &handle).await;
                });
                // Dropping the runtime ends whatever the shutdown timeout cut off.
                drop(runtime);
                let _ = done_tx.send(());
            });
        match spawned {
            Ok(_) => Some(Self { tx, done }),
            Err(e) => {
                tracing::error!(error = %e, "cannot start a worker thread");
                None
            }
        }
    }
}

/// A timer that is always armed on a worker, at most [`STANDING_TICK`] ahead.
///
/// tokio wakes its driver through an eventfd whenever a new timer is due before the driver's
/// planned wake-up, since the driver may be parked in `epoll_wait` until then. With no timer armed
/// that is every timer: at low load each request's first-byte deadline cost one `write` to the
/// eventfd and one more event for the next `epoll_wait` to return (seen with `strace -c` at
/// concurrency 1: one `write` per request). Request deadlines are seconds to minutes away, so
/// with this tick armed they are later than the planned wake-up and are inserted without a wake.
/// The price is one wake-up per tick on an idle worker.
async fn standing_timer() {
    loop {
        tokio::time::sleep(STANDING_TICK).await;
    }
}

/// How far ahead [`standing_timer`] keeps a worker's next wake-up: below the request deadlines
/// ccgate arms by default (the shortest, `timeouts.connect`, is 10 s). A deadline configured
/// shorter still works; its timer wakes the driver as before.
const STANDING_TICK: Duration = Duration::from_secs(1);

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

/// SIGHUP, which asks for a config reload.
fn hangups() -> Hangups {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::hangup())
            .inspect_err(|e| tracing::warn!(error = %e, "cannot listen for SIGHUP"))
            .ok()
    }
}

async fn next_hangup(h: &mut Hangups) -> Option<()> {
    #[cfg(unix)]
    if let Some(s) = h {
        return s.recv().await;
    }
    #[cfg(not(unix))]
    let _ = h;
    std::future::pending().await
}

/// The next signal on any of `streams`.
#[cfg(unix)]
async fn next_signal(streams: &mut [tokio::signal::unix::Signal]) {
    let waits = streams.iter_mut().map(|s| Box::pin(s.recv()));
    let _ = futures_util::future::select_all(waits).await;
}

/// SIGINT or SIGTERM (Ctrl-C elsewhere), twice: the first future resolves on the first signal,
/// the second on the next one. The handlers are installed now, before this returns.
pub fn shutdown_signals() -> (
    impl Future<Output = ()> + Send + 'static,
    impl Future<Output = ()> + Send + 'static,
) {
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let (second_tx, second_rx) = tokio::sync::oneshot::channel::<()>();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let streams = [
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ];
        let mut streams: Vec<_> = streams
            .into_iter()
            .filter_map(|s| {
                s.map_err(|e| tracing::warn!(error = %e, "cannot listen for a shutdown signal"))
                    .ok()
            })
            .collect();
        tokio::spawn(async move {
            if streams.is_empty() {
                return;
            }
            next_signal(&mut streams).await;
            let _ = first_tx.send(());
            next_signal(&mut streams).await;
            let _ = second_tx.send(());
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = first_tx.send(());
        let _ = tokio::signal::ctrl_c().await;
        let _ = second_tx.send(());
    });
    // A sender dropped without a signal (no handler could be installed) means no signal, ever.
    let wait = |rx: tokio::sync::oneshot::Receiver<()>| async move {
        if rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    (wait(first_rx), wait(second_rx))
}

/// Starts the database writer (state that lasts); without a database open it ends at once.
/// Stopping it makes it flush one last time.
fn start_writer(handle: &Arc<Handle>) -> BgTask {
    let persist = Arc::clone(&handle.persist);
    let handle = Arc::clone(handle);
    BgTask::spawn(|stop| crate::store::run_writer(persist, move || handle.current(), stop))
}

/// Starts cluster mode's tasks (the link's supervisor, news in, news out, totals) when
/// `[cluster]` is configured. The event task subscribed when the node was built, before the
/// supervisor runs, so it sees the first `Resync`.
fn start_cluster(handle: &Arc<Handle>) -> Vec<BgTask> {
    let Some(node) = handle.cluster.clone() else {
        return Vec::new();
    };
    let current = {
        let handle = Arc::clone(handle);
        Arc::new(move || handle.current()) as crate::control::cluster::Current
    };
    let mut tasks = Vec::new();
    if let Some(supervisor) = node.take_supervisor() {
        let link = node.link().clone();
        tasks.push(BgTask::spawn(|mut stop| async move {
            tokio::select! {
                () = supervisor.run() => {}
                _ = stop.changed() => link.shutdown(),
            }
        }));
    }
    let (n, c) = (Arc::clone(&node), Arc::clone(&current));
    tasks.push(BgTask::spawn(|stop| {
        crate::control::cluster::run_events(n, c, stop)
    }));
    let (n, c) = (Arc::clone(&node), Arc::clone(&current));
    tasks.push(BgTask::spawn(|stop| {
        crate::control::cluster::run_publisher(n, c, stop)
    }));
    tasks.push(BgTask::spawn(|stop| {
        crate::control::cluster::run_totals(node, current, stop)
    }));
    tasks
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A connected pair on loopback: the client's end and the server's accepted end.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    /// The first bytes decide how a connection is served, and reading them consumes nothing.
    #[tokio::test]
    async fn first_bytes_tell_http1_from_the_http2_preface() {
        let cases: [(&[u8], bool); 6] = [
            (b"POST /v1/messages HTTP/1.1\r\n", true),
            (b"GET / HTTP/1.1\r\n", true),
            (b"PO", true),
            (H2_PREFACE, false),
            // What could still begin the preface goes to the builder that reads it whole.
            (b"P", false),
            (b"PRI * HTTP/2.0\r\n", false),
        ];
        for (sent, http1) in cases {
            let (mut client, server) = pair().await;
            client.write_all(sent).await.expect("write");
            // Wait until every byte sent is readable, so that the answer is about all of them.
            let mut seen = vec![0u8; sent.len()];
            while server.peek(&mut seen).await.expect("peek") < sent.len() {
                tokio::task::yield_now().await;
            }
            let (_open, mut closing) = watch::channel(false);
            assert_eq!(
                starts_http1(&server, None, &mut closing).await,
                Some(http1),
                "{:?}",
                String::from_utf8_lossy(sent)
            );
            let mut left = vec![0u8; sent.len()];
            assert_eq!(server.peek(&mut left).await.expect("peek"), sent.len());
            assert_eq!(left, sent, "nothing was consumed");
        }
    }

    /// A client that closes without a byte, or sends nothing before the head's deadline or the
    /// shutdown, is not served at all.
    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_dropped() {
        let (open, mut closing) = watch::channel(false);
        let (client, server) = pair().await;
        drop(client);
        assert_eq!(starts_http1(&server, None, &mut closing).await, None);
        let (_client, server) = pair().await;
        assert_eq!(
            starts_http1(&server, Some(Duration::from_secs(30)), &mut closing).await,
            None
        );
        let (_client, server) = pair().await;
        open.send_replace(true);
        assert_eq!(starts_http1(&server, None, &mut closing).await, None);
    }
}
