//! The upstream HTTP client: one pooled keep-alive client per endpoint, HTTPS through rustls.
//!
//! Trust comes from the Mozilla roots (webpki-roots) plus the platform's store, plus an endpoint's
//! own `ca_file` when it names one (self-hosted relays, and the tests' self-signed upstream).
//! HTTP/1.1 only, as Claude Code itself speaks to the API, so relays see the traffic they expect.
//!
//! Each serving worker thread (see `server.rs`) has its own pool, so a request, its upstream
//! connection task and the connection's wakeups stay on one thread; threads that are not workers
//! (the prober, tests) share one more pool.

use std::cell::Cell;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::Timeouts;

/// Body type of upstream requests: the buffered client body, replayed per attempt.
pub type UpstreamBody = Full<Bytes>;

type Pool = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

/// The pooled clients of one endpoint: one per serving worker, plus one shared by other threads.
#[derive(Clone)]
pub struct UpstreamClient {
    pools: Arc<[Pool]>,
}

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks the current thread as serving worker `index` (its requests use that worker's pools).
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(Some(index)));
}

impl UpstreamClient {
    /// Sends a request on this thread's pool.
    pub fn request(
        &self,
        req: http::Request<UpstreamBody>,
    ) -> hyper_util::client::legacy::ResponseFuture {
        let shared = self.pools.len() - 1;
        let i = WORKER.with(Cell::get).map_or(shared, |w| w.min(shared));
        self.pools[i].request(req)
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

/// Builds the client for one endpoint with a single (shared) pool.
pub fn build_client(
    ca_file: Option<&Path>,
    timeouts: &Timeouts,
) -> Result<UpstreamClient, ClientError> {
    build_worker_clients(ca_file, timeouts, 0)
}

/// Builds the pooled clients for one endpoint: `workers` worker pools and a shared one.
pub fn build_worker_clients(
    ca_file: Option<&Path>,
    timeouts: &Timeouts,
    workers: usize,
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
    let pools: Vec<Pool> = (0..=workers)
        .map(|_| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .build(https.clone())
        })
        .collect();
    Ok(UpstreamClient {
        pools: pools.into(),
    })
}
