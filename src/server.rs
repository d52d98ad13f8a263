//! Wiring: bind the listener, serve connections, run the background prober, and shut down
//! gracefully. The only module that spawns long-lived tasks, so shutdown can wait for all of them.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::proxy::{self, Gateway};

/// A bound, not yet running, gateway.
pub struct Server {
    listener: TcpListener,
    gateway: Arc<Gateway>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// An endpoint's upstream client could not be built.
    #[error(transparent)]
    Client(#[from] crate::upstream::ClientError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl Server {
    /// Builds the gateway and binds its listener.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let addr = config.server.listen;
        let gateway = Arc::new(Gateway::new(config)?);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        Ok(Self { listener, gateway })
    }

    /// The address actually bound (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.gateway.config.server.listen)
    }

    /// The shared gateway state.
    pub fn gateway(&self) -> Arc<Gateway> {
        Arc::clone(&self.gateway)
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish for
    /// up to `server.shutdown_timeout`, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server { listener, gateway } = self;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let prober = tokio::spawn(crate::probe::run_prober(Arc::clone(&gateway), stop_rx));
        let graceful = GracefulShutdown::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(60));
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
            };
            let _ = stream.set_nodelay(true);
            let gw = Arc::clone(&gateway);
            let service = service_fn(move |req| {
                let gw = Arc::clone(&gw);
                async move { Ok::<_, Infallible>(proxy::handle(gw, req).await) }
            });
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
        drop(listener);
        let _ = stop_tx.send(true);
        let limit = gateway.config.server.shutdown_timeout;
        tracing::info!(
            "shutting down; waiting up to {} for in-flight requests",
            humantime::format_duration(limit)
        );
        if tokio::time::timeout(limit, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                "in-flight requests still running after the shutdown timeout; closing them"
            );
        }
        let _ = prober.await;
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
