//! The upstream HTTP client: keep-alive HTTP/1.1 connections per endpoint (or multiplexed HTTP/2
//! ones, for an endpoint set to `http2`), HTTPS through rustls.
//!
//! Trust comes from the Mozilla roots (webpki-roots) plus the platform's store, plus an endpoint's
//! own `ca_file` when it names one (self-hosted relays, and the tests' self-signed upstream).
//! HTTP/1.1 by default, as Claude Code itself speaks to the API, so relays see the traffic they
//! expect. An endpoint with `http2 = true` offers HTTP/2 by ALPN over `https` (and falls back to
//! HTTP/1.1 when the server declines) or speaks it with prior knowledge over plain `http`. Its
//! requests are then streams multiplexed on a few connections per worker — up to
//! [`H2_STREAMS_PER_CONNECTION`] each, the minimum RFC 9113 advises servers to allow, or the
//! server's own limit when lower — which saves
//! each stream the HTTP/1.1 connection's buffers and task (39% of ccgate's memory per open
//! stream, measured in `bench/ANALYSIS.md`) at some CPU per short request. A stream holds
//! its connection's slot until its answer's body ends or is dropped; a connection that carries
//! no stream is kept only if it is its pool's first (so a burst's extra connections close once
//! it is over), and HTTP/2 pings every [`H2_PING_INTERVAL`] find connections that died quietly.
//!
//! Each serving worker thread (see `server.rs`) has its own pool of idle connections, so a
//! request, its upstream connection task and the connection's wakeups stay on one thread; threads
//! that are not workers (the prober, tests) share one more pool. A client belongs to one endpoint:
//! its first request binds it to that origin (whose `Host` header is then built once) and a
//! request to any other origin is refused, so a pool needs no key: it is a stack of idle senders
//! (the most recently used first, so the fewest connections stay warm), each dropped once it has
//! idled [`IDLE_TIMEOUT`], once its connection closed, or when it is found not ready. A pool keeps
//! at most `server.max_idle_upstream` connections: one that comes back to a full pool pushes out
//! the one idle longest, so a burst of concurrent requests leaves no more than that many open.
//!
//! A connection goes back to its pool once its response body has been read to the end: the
//! answer's body holds the connection's sender and checks it in at its end (hyper has readied the
//! connection by then), or at once when the whole body came with the head. A body dropped early
//! leaves a small task waiting for the connection to be ready or closed. A request that finds its
//! pooled connection closed before anything was written to it is retried on another connection:
//! that is the keep-alive race with an upstream that closes idle connections, not a failure of
//! the endpoint.

use std::cell::Cell;
use std::collections::VecDeque;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http_body::{Body, Frame, SizeHint};

use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::client::conn::http2;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use parking_lot::Mutex;
use tokio::time::Instant;
use tower_service::Service;

use crate::config::{DEFAULT_MAX_IDLE_UPSTREAM, Timeouts};
use crate::transport::headers::remove_in_order;
use crate::transport::socket::Socket;

/// Body type of upstream requests: the buffered client body, replayed per attempt.
pub type UpstreamBody = crate::transport::replay::ReplayBody;

/// How long an unused connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Most concurrent streams ccgate opens on one HTTP/2 connection: RFC 9113 §6.5.2 advises servers
/// to allow at least 100. A server that allows fewer (`SETTINGS_MAX_CONCURRENT_STREAMS`) gets no
/// more than it allows, once its SETTINGS have arrived; more streams open another connection.
pub const H2_STREAMS_PER_CONNECTION: usize = 100;

/// How often an HTTP/2 connection is pinged (idle or not); one unanswered for
/// [`H2_PING_TIMEOUT`] is closed.
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(30);

/// How long an HTTP/2 ping may go unanswered.
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The connections of one endpoint: one idle pool per serving worker, plus one shared by other
/// threads.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Arc<Pools>,
}

struct Pools {
    connector: HttpsConnector<HttpConnector>,
    idle: Box<[Mutex<VecDeque<Idle>>]>,
    /// The HTTP/2 side of each pool; empty for an endpoint that does not speak HTTP/2.
    h2: Box<[H2Pool]>,
    /// Most idle connections one pool keeps.
    max_idle: usize,
    /// The connect timeout, for TCP and TLS together (the connector bounds the TCP connect
    /// only).
    connect_timeout: Duration,
    /// The server declined HTTP/2 by ALPN at the last connect: requests go the HTTP/1.1 way at
    /// once, without the HTTP/2 pool's one-connect-at-a-time turn (which would make every new
    /// HTTP/1.1 connection wait for the one before). A later connect that gets HTTP/2 clears it.
    h2_declined: AtomicBool,
    /// The origin every request of this client goes to, set by the first one.
    origin: OnceLock<Origin>,
}

struct Origin {
    scheme: Scheme,
    authority: Authority,
    /// `Host` for it.
    host: HeaderValue,
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// One pool's HTTP/2 connections.
#[derive(Default)]
struct H2Pool {
    conns: Mutex<Vec<H2Conn>>,
    /// The turn to open a connection (see [`UpstreamClient::send_h2`]).
    turn: tokio::sync::Mutex<()>,
}

/// One HTTP/2 connection and the number of its streams in use.
#[derive(Clone)]
struct H2Conn {
    sender: http2::SendRequest<UpstreamBody>,
    streams: Arc<AtomicUsize>,
    /// The connection itself, driven by its task ([`H2Driver`]) and read for the server's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` (hyper tells it only there).
    conn: Arc<Mutex<H2Connection>>,
}

type H2Connection = http2::Connection<Socket, UpstreamBody, TokioExecutor>;

impl H2Conn {
    /// Whether it takes another stream: it carries fewer than [`H2_STREAMS_PER_CONNECTION`], and
    /// fewer than the server allows once its SETTINGS have been read (a stream past that would
    /// wait in the connection for another to end).
    fn has_room(&self) -> bool {
        let streams = self.streams.load(Ordering::Relaxed);
        streams < H2_STREAMS_PER_CONNECTION && streams < self.conn.lock().current_max_send_streams()
    }
}

/// A stream's place on its HTTP/2 connection, given back when dropped.
struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    fn take(streams: &Arc<AtomicUsize>) -> Self {
        streams.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(streams))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A new connection: HTTP/1.1, or HTTP/2 when the endpoint speaks it.
enum NewConn {
    H1(SendRequest<UpstreamBody>),
    H2(H2Conn),
}

/// The body of an upstream's answer: hyper's, plus what it holds of its connection until it ends
/// or is dropped.
pub struct AnswerBody {
    inner: Incoming,
    holds: Holds,
}

/// What an answer's body holds of its connection.
enum Holds {
    Nothing,
    /// Over HTTP/2: the stream's slot on its connection, freed when dropped.
    Stream {
        _slot: StreamSlot,
    },
    /// Over HTTP/1.1: the connection's sender, which goes back to pool `slot` of `pools`.
    Sender {
        pools: Arc<Pools>,
        slot: usize,
        sender: SendRequest<UpstreamBody>,
    },
}

impl AnswerBody {
    fn new(resp: Response<Incoming>, holds: Holds) -> Response<Self> {
        resp.map(|inner| Self { inner, holds })
    }

    /// Lets go of the connection: an HTTP/2 stream's slot is freed (dropped with the holding this
    /// replaces), an HTTP/1.1 connection goes back to its pool. At the body's end hyper has
    /// usually readied that connection for the next request already, so it is checked in without
    /// a task to wait for it.
    fn release(&mut self) {
        if let Holds::Sender {
            pools,
            slot,
            sender,
        } = std::mem::replace(&mut self.holds, Holds::Nothing)
        {
            pools.keep(slot, sender);
        }
    }
}

impl Drop for AnswerBody {
    fn drop(&mut self) {
        // A body dropped before its end closes the connection: the task `keep` leaves waiting
        // then sees it closed and drops the sender.
        self.release();
    }
}

impl Body for AnswerBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            this.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why an upstream request got no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The URL cannot be requested (no host).
    #[error("invalid upstream URL {0}")]
    Url(String),
    /// The URL is on another origin than the one this client is bound to.
    #[error("{requested} is not on {bound}, the origin of this client")]
    OtherOrigin {
        /// The URL asked for.
        requested: String,
        /// The client's origin.
        bound: String,
    },
    /// No connection could be made (DNS, TCP, TLS).
    #[error("connect error")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The HTTP/1.1 exchange failed (connection closed, malformed response, ...).
    #[error("upstream connection error")]
    Http(#[from] hyper::Error),
    /// The server refused the HTTP/2 stream without processing it (above a graceful GOAWAY's last
    /// stream id, or `REFUSED_STREAM`; RFC 9113 §8.7): safe to send again, on another connection
    /// (the refusing one takes no more), and no fault of the endpoint.
    #[error("upstream refused the stream unprocessed")]
    Refused(#[source] hyper::Error),
}

/// How many times a request goes out again after the endpoint refused it unprocessed
/// ([`UpstreamError::Refused`]), in one attempt or one probe.
pub const MAX_REFUSALS: u32 = 3;

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks the current thread as serving worker `index` (its requests use that worker's pools).
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(Some(index)));
}

/// What [`UpstreamClient::send_h2`] did with a request.
enum H2Sent<'a> {
    /// It went out as a stream and was answered.
    Answered(Response<AnswerBody>),
    /// No connection of the pool had room: the request comes back with the pool's turn to
    /// make one.
    NoRoom(Request<UpstreamBody>, tokio::sync::MutexGuard<'a, ()>),
}

impl UpstreamClient {
    /// Sends a request (its URI absolute) on a connection from this thread's pool, or a new one,
    /// and waits for the response headers.
    ///
    /// An async block, not an async fn, so that the request is kept once in the future (see
    /// `proxy::handler::handle`).
    #[allow(clippy::manual_async_fn)]
    pub fn request(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> impl Future<Output = Result<Response<AnswerBody>, UpstreamError>> + Send + '_ {
        async move {
            let shared = self.inner.idle.len() - 1;
            let slot = WORKER.with(Cell::get).map_or(shared, |w| w.min(shared));
            let origin = self.inner.origin(req.uri())?;
            let mut turn = None;
            if self.inner.speaks_h2() && !self.inner.h2_declined.load(Ordering::Relaxed) {
                // HTTP/2 names the host in `:authority`, from the URI.
                remove_in_order(req.headers_mut(), |n| *n == header::HOST);
                // Boxed: the HTTP/2 path's state would otherwise size every request's future.
                match Box::pin(self.send_h2(slot, req)).await? {
                    H2Sent::Answered(resp) => return Ok(resp),
                    H2Sent::NoRoom(back, t) => {
                        req = back;
                        // Declined meanwhile (the connect this request waited for got
                        // HTTP/1.1): no turn to keep.
                        if !self.inner.h2_declined.load(Ordering::Relaxed) {
                            turn = Some(t);
                        }
                    }
                }
            }
            // In place of the client's `Host`, when it sent one (`insert` keeps a header's
            // position).
            req.headers_mut().insert(header::HOST, origin.host.clone());
            // The connection gets the origin form; the absolute URI is kept for connecting.
            let target = origin_form(req.uri());
            let uri = std::mem::replace(req.uri_mut(), target);
            while let Some(mut sender) = self.inner.checkout(slot) {
                drop(turn.take());
                match sender.try_send_request(req).await {
                    Ok(resp) => return Ok(self.inner.answer(resp, slot, sender)),
                    // Closed before the request was written: the keep-alive race, try another.
                    Err(mut e) => match e.take_message() {
                        Some(back) => req = back,
                        None => return Err(UpstreamError::Http(e.into_error())),
                    },
                }
            }
            // Boxed: connecting (an HTTP/2 handshake above all) is a large state machine that would
            // otherwise sit in every request's future, copied whole on every request; it runs only
            // when a new connection is needed.
            match Box::pin(self.inner.connect(uri.clone())).await? {
                NewConn::H1(mut sender) => {
                    drop(turn);
                    let resp = sender.send_request(req).await?;
                    Ok(self.inner.answer(resp, slot, sender))
                }
                NewConn::H2(mut conn) => {
                    remove_in_order(req.headers_mut(), |n| *n == header::HOST);
                    *req.uri_mut() = uri;
                    let stream = StreamSlot::take(&conn.streams);
                    self.inner.h2[slot].conns.lock().push(conn.clone());
                    drop(turn);
                    match conn.sender.send_request(req).await {
                        Ok(resp) => Ok(AnswerBody::new(resp, Holds::Stream { _slot: stream })),
                        // The new connection's first stream refused unprocessed, as in
                        // `send_h2`: the caller may send it again.
                        Err(e) if refused_unprocessed(&e) => {
                            self.inner.forget_h2(slot, &conn);
                            Err(UpstreamError::Refused(e))
                        }
                        Err(e) => Err(UpstreamError::Http(e)),
                    }
                }
            }
        }
    }

    /// Sends `req` (its URI absolute: HTTP/2 names the origin in `:authority`) as a stream on a
    /// connection of pool `slot` with room for it. Without one, the caller gets the request back
    /// with the pool's turn to connect: one request connects at a time, so a burst that fills
    /// every connection opens one more, not one per request; the others wait for the turn and
    /// find the room it made.
    async fn send_h2(
        &self,
        slot: usize,
        mut req: Request<UpstreamBody>,
    ) -> Result<H2Sent<'_>, UpstreamError> {
        let mut turn = None;
        loop {
            if let Some((mut conn, stream)) = self.inner.checkout_h2(slot) {
                drop(turn.take());
                match conn.sender.try_send_request(req).await {
                    Ok(resp) => {
                        return Ok(H2Sent::Answered(AnswerBody::new(
                            resp,
                            Holds::Stream { _slot: stream },
                        )));
                    }
                    // Refused before the request went out (a GOAWAY, a closed connection): that
                    // connection takes no more streams; try another.
                    Err(mut e) => match e.take_message() {
                        Some(back) => {
                            self.inner.forget_h2(slot, &conn);
                            req = back;
                            continue;
                        }
                        // Sent, and refused unprocessed: the caller may send it again (it
                        // holds what the request is made from; keeping a copy here would cost
                        // every request a copy of its headers).
                        None if refused_unprocessed(e.error()) => {
                            self.inner.forget_h2(slot, &conn);
                            return Err(UpstreamError::Refused(e.into_error()));
                        }
                        None => return Err(UpstreamError::Http(e.into_error())),
                    },
                }
            }
            match turn {
                Some(t) => return Ok(H2Sent::NoRoom(req, t)),
                None => turn = Some(self.inner.h2[slot].turn.lock().await),
            }
        }
    }
}

impl UpstreamClient {
    /// Whether `other` is this client (a clone): the same pools and connections.
    pub fn shares_pools(&self, other: &UpstreamClient) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Idle connections ready for a request, over all pools.
    pub fn idle_connections(&self) -> usize {
        self.inner
            .idle
            .iter()
            .map(|p| p.lock().iter().filter(|i| i.sender.is_ready()).count())
            .sum::<usize>()
            + self
                .inner
                .h2
                .iter()
                .map(|p| {
                    let conns = p.conns.lock();
                    let idle = |c: &&H2Conn| c.streams.load(Ordering::Relaxed) == 0;
                    conns
                        .iter()
                        .filter(idle)
                        .filter(|c| !c.sender.is_closed())
                        .count()
                })
                .sum::<usize>()
    }
}

impl Pools {
    /// The origin of `uri`, which must be this client's (the first request binds it).
    fn origin(&self, uri: &Uri) -> Result<&Origin, UpstreamError> {
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(UpstreamError::Url(uri.to_string()));
        };
        let origin = match self.origin.get() {
            Some(o) => o,
            None => {
                let o = Origin {
                    scheme: scheme.clone(),
                    authority: authority.clone(),
                    host: host_header(uri)?,
                };
                self.origin.get_or_init(|| o)
            }
        };
        if origin.scheme == *scheme && origin.authority == *authority {
            Ok(origin)
        } else {
            Err(UpstreamError::OtherOrigin {
                requested: uri.to_string(),
                bound: format!("{}://{}", origin.scheme, origin.authority),
            })
        }
    }

    /// The most recently used ready connection of `slot`, if any.
    fn checkout(&self, slot: usize) -> Option<SendRequest<UpstreamBody>> {
        let mut idle = self.idle[slot].lock();
        while let Some(i) = idle.pop_back() {
            if i.since.elapsed() >= IDLE_TIMEOUT {
                // Everything below it idled longer still.
                idle.clear();
                return None;
            }
            if i.sender.is_ready() {
                return Some(i.sender);
            }
            // Closed, or in a state it should not be in while idle: drop it.
        }
        None
    }

    /// Whether this endpoint speaks HTTP/2 (offers it, over `https`).
    fn speaks_h2(&self) -> bool {
        !self.h2.is_empty()
    }

    /// An open HTTP/2 connection of `slot` with room for one more stream, and that stream's slot.
    /// Closed connections are dropped, and so are the ones that carry no stream but the first.
    fn checkout_h2(&self, slot: usize) -> Option<(H2Conn, StreamSlot)> {
        let mut conns = self.h2[slot].conns.lock();
        let mut first_idle = true;
        conns.retain(|c| {
            if c.sender.is_closed() {
                return false;
            }
            if c.streams.load(Ordering::Relaxed) > 0 {
                return true;
            }
            std::mem::replace(&mut first_idle, false)
        });
        let conn = conns.iter().find(|c| c.has_room())?;
        Some((conn.clone(), StreamSlot::take(&conn.streams)))
    }

    /// Takes `conn` out of `slot`'s pool: its streams in flight go on, no new one goes there.
    fn forget_h2(&self, slot: usize, conn: &H2Conn) {
        self.h2[slot]
            .conns
            .lock()
            .retain(|c| !Arc::ptr_eq(&c.streams, &conn.streams));
    }

    /// An HTTP/1.1 answer. `sender` goes back to pool `slot` now if hyper has readied it (the
    /// whole body came with the head), else when the body ends.
    fn answer(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        slot: usize,
        sender: SendRequest<UpstreamBody>,
    ) -> Response<AnswerBody> {
        if sender.is_ready() {
            self.checkin(slot, sender);
            return AnswerBody::new(resp, Holds::Nothing);
        }
        let holds = Holds::Sender {
            pools: Arc::clone(self),
            slot,
            sender,
        };
        AnswerBody::new(resp, holds)
    }

    /// Returns `sender` to `slot`'s pool: now if hyper has readied it, else once a task sees it
    /// ready (a connection that closes instead is dropped).
    fn keep(self: &Arc<Self>, slot: usize, mut sender: SendRequest<UpstreamBody>) {
        if sender.is_ready() {
            self.checkin(slot, sender);
            return;
        }
        // Outside a runtime (a body dropped by a thread that has none) the connection closes.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pools = Arc::clone(self);
        runtime.spawn(async move {
            if sender.ready().await.is_ok() {
                pools.checkin(slot, sender);
            }
        });
    }

    fn checkin(&self, slot: usize, sender: SendRequest<UpstreamBody>) {
        let now = Instant::now();
        let mut idle = self.idle[slot].lock();
        while idle
            .front()
            .is_some_and(|i| now.duration_since(i.since) >= IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if self.max_idle == 0 {
            return;
        }
        while idle.len() >= self.max_idle {
            // Dropping the sender closes its connection.
            idle.pop_front();
        }
        idle.push_back(Idle { sender, since: now });
    }

    /// A new connection to `uri`'s origin, its task spawned on the current runtime: HTTP/2 when
    /// this endpoint speaks it (over `https`, when the server chose it by ALPN), else HTTP/1.1.
    async fn connect(&self, uri: Uri) -> Result<NewConn, UpstreamError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(UpstreamError::Connect)?;
        let tls = uri.scheme() == Some(&Scheme::HTTPS);
        // TCP and TLS both within the connect timeout: a server that accepts the connection and
        // never finishes the handshake is a connect failure, not a wait for the first byte.
        let io = match tokio::time::timeout(self.connect_timeout, connector.call(uri)).await {
            Ok(io) => io.map_err(UpstreamError::Connect)?,
            Err(_) => {
                let took = humantime::format_duration(self.connect_timeout);
                return Err(UpstreamError::Connect(
                    format!("connect (TCP and TLS) timed out after {took}").into(),
                ));
            }
        };
        let negotiated_h2 = io.connected().is_negotiated_h2();
        if self.speaks_h2() && tls {
            self.h2_declined.store(!negotiated_h2, Ordering::Relaxed);
        }
        if self.speaks_h2() && (!tls || negotiated_h2) {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_PING_INTERVAL)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .keep_alive_while_idle(true)
                .handshake(Socket::from(io))
                .await?;
            let conn = Arc::new(Mutex::new(conn));
            drive::<true, _>(H2Driver(Arc::clone(&conn)));
            let streams = Arc::new(AtomicUsize::new(0));
            return Ok(NewConn::H2(H2Conn {
                sender,
                streams,
                conn,
            }));
        }
        let (sender, conn) = hyper::client::conn::http1::handshake(Socket::from(io)).await?;
        drive::<false, _>(conn);
        Ok(NewConn::H1(sender))
    }
}

/// Whether an HTTP/2 stream failed because the server refused it without processing it: a
/// graceful GOAWAY (`NO_ERROR`) whose last stream id is below it (h2 gives the GOAWAY's error
/// only to those streams; one at or below that id that is cut gets a broken pipe), or a
/// `REFUSED_STREAM` reset.
fn refused_unprocessed(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && ((h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR))
                    || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)));
        }
        source = s.source();
    }
    false
}

/// An HTTP/2 connection's task: the connection is shared with its place in the pool, which reads
/// the server's stream limit from it.
struct H2Driver(Arc<Mutex<H2Connection>>);

impl Future for H2Driver {
    type Output = Result<(), hyper::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut *self.0.lock()).poll(cx)
    }
}

/// Spawns the task that drives an upstream connection (HTTP/2 when `H2`) until it ends, and
/// logs how it ended. `map`, not an async block: a block would keep the connection twice, once
/// as its capture and once as the future it awaits; and the closure captures nothing, so the
/// task is the connection's size.
fn drive<const H2: bool, C>(conn: C)
where
    C: Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(conn.map(|ended| {
        if let Err(e) = ended {
            let version = if H2 { "HTTP/2" } else { "HTTP/1.1" };
            tracing::debug!(error = %e, version, "upstream connection ended");
        }
    }));
}

/// `Host` for `uri`: its host, with the port when it is not the scheme's default.
fn host_header(uri: &Uri) -> Result<HeaderValue, UpstreamError> {
    let bad = || UpstreamError::Url(uri.to_string());
    let host = uri.host().ok_or_else(bad)?;
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    match uri.port_u16() {
        Some(p) if p != default_port => HeaderValue::from_str(&format!("{host}:{p}")),
        _ => HeaderValue::from_str(host),
    }
    .map_err(|_| bad())
}

/// The request target sent on the connection: path and query only.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(pq) if pq.as_str() != "/" => Uri::from(pq.clone()),
        _ => Uri::from_static("/"),
    }
}

/// The Mozilla roots plus the platform's, loaded once per process.
fn base_roots() -> &'static rustls::RootCertStore {
    static ROOTS: OnceLock<rustls::RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        // The platform store is a bonus: a machine without one still has the Mozilla roots.
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        roots
    })
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The CA file could not be read or holds no certificate.
    #[error("ca_file {path}: {message}")]
    CaFile {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// Builds the client for one endpoint with a single (shared) pool of the default size.
pub fn build_client(
    ca_file: Option<&Path>,
    timeouts: &Timeouts,
) -> Result<UpstreamClient, ClientError> {
    build_worker_clients(ca_file, timeouts, 0, DEFAULT_MAX_IDLE_UPSTREAM, false)
}

/// Builds the pooled clients for one endpoint: `workers` worker pools and a shared one, each
/// keeping at most `max_idle` idle HTTP/1.1 connections; `http2`: the endpoint speaks HTTP/2.
pub fn build_worker_clients(
    ca_file: Option<&Path>,
    timeouts: &Timeouts,
    workers: usize,
    max_idle: usize,
    http2: bool,
) -> Result<UpstreamClient, ClientError> {
    let mut roots = base_roots().clone();
    if let Some(path) = ca_file {
        let err = |message: String| ClientError::CaFile {
            path: path.display().to_string(),
            message,
        };
        let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| err(e.to_string()))?;
            roots.add(cert).map_err(|e| err(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(err("no PEM certificate in it".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeouts.connect));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    // ALPN offers `h2` only for an endpoint that speaks it.
    let https = if http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.wrap_connector(http)
    };
    let idle = (0..=workers).map(|_| Mutex::new(VecDeque::new())).collect();
    let h2 = (0..=workers)
        .filter(|_| http2)
        .map(|_| H2Pool::default())
        .collect();
    Ok(UpstreamClient {
        inner: Arc::new(Pools {
            connector: https,
            idle,
            h2,
            max_idle,
            connect_timeout: timeouts.connect,
            h2_declined: AtomicBool::new(false),
            origin: OnceLock::new(),
        }),
    })
}
