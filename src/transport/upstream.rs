//! The upstream HTTP client: keep-alive HTTP/1.1 connections per endpoint, HTTPS through rustls.
//!
//! Trust comes from the Mozilla roots (webpki-roots) plus the platform's store, plus an endpoint's
//! own `ca_file` when it names one (self-hosted relays, and the tests' self-signed upstream).
//! HTTP/1.1 only, as Claude Code itself speaks to the API, so relays see the traffic they expect.
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
//! A connection goes back to its pool once its response body has been read to the end (a small
//! task waits for that). A request that finds its pooled connection closed before anything was
//! written to it is retried on another connection: that is the keep-alive race with an upstream
//! that closes idle connections, not a failure of the endpoint.

use std::cell::Cell;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use parking_lot::Mutex;
use tokio::time::Instant;
use tower_service::Service;

use crate::config::{DEFAULT_MAX_IDLE_UPSTREAM, Timeouts};

/// Body type of upstream requests: the buffered client body, replayed per attempt.
pub type UpstreamBody = crate::transport::replay::ReplayBody;

/// How long an unused connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The connections of one endpoint: one idle pool per serving worker, plus one shared by other
/// threads.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Arc<Pools>,
}

struct Pools {
    connector: HttpsConnector<HttpConnector>,
    idle: Box<[Mutex<VecDeque<Idle>>]>,
    /// Most idle connections one pool keeps.
    max_idle: usize,
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
}

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks the current thread as serving worker `index` (its requests use that worker's pools).
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(Some(index)));
}

impl UpstreamClient {
    /// Sends a request (its URI absolute) on a connection from this thread's pool, or a new one,
    /// and waits for the response headers.
    pub async fn request(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let shared = self.inner.idle.len() - 1;
        let slot = WORKER.with(Cell::get).map_or(shared, |w| w.min(shared));
        let origin = self.inner.origin(req.uri())?;
        req.headers_mut().insert(header::HOST, origin.host.clone());
        // The connection gets the origin form; the absolute URI is kept for connecting.
        let target = origin_form(req.uri());
        let uri = std::mem::replace(req.uri_mut(), target);

        while let Some(mut sender) = self.inner.checkout(slot) {
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.inner.keep(slot, sender);
                    return Ok(resp);
                }
                // Closed before the request was written: the keep-alive race, try another.
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(UpstreamError::Http(e.into_error())),
                },
            }
        }
        let mut sender = self.inner.connect(uri).await?;
        let resp = sender.send_request(req).await?;
        self.inner.keep(slot, sender);
        Ok(resp)
    }
}

impl UpstreamClient {
    /// Idle connections ready for a request, over all pools.
    pub fn idle_connections(&self) -> usize {
        self.inner
            .idle
            .iter()
            .map(|p| p.lock().iter().filter(|i| i.sender.is_ready()).count())
            .sum()
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

    /// Returns `sender` to `slot`'s pool once its response has been read to the end.
    fn keep(self: &Arc<Self>, slot: usize, mut sender: SendRequest<UpstreamBody>) {
        if sender.is_ready() {
            self.checkin(slot, sender);
            return;
        }
        let pools = Arc::clone(self);
        tokio::spawn(async move {
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

    /// A new connection to `uri`'s origin, its task spawned on the current runtime.
    async fn connect(&self, uri: Uri) -> Result<SendRequest<UpstreamBody>, UpstreamError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(UpstreamError::Connect)?;
        let io = connector.call(uri).await.map_err(UpstreamError::Connect)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
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
    build_worker_clients(ca_file, timeouts, 0, DEFAULT_MAX_IDLE_UPSTREAM)
}

/// Builds the pooled clients for one endpoint: `workers` worker pools and a shared one, each
/// keeping at most `max_idle` idle connections.
pub fn build_worker_clients(
    ca_file: Option<&Path>,
    timeouts: &Timeouts,
    workers: usize,
    max_idle: usize,
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
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let idle = (0..=workers).map(|_| Mutex::new(VecDeque::new())).collect();
    Ok(UpstreamClient {
        inner: Arc::new(Pools {
            connector: https,
            idle,
            max_idle,
            origin: OnceLock::new(),
        }),
    })
}
