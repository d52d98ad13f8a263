//! The leanest reverse proxy hyper and tokio allow, as a yardstick for ccgate's own overhead.
//!
//! It does nothing a gateway needs beyond moving bytes: no failover, no statistics, no body
//! buffering, no header rewriting besides what HTTP/1.1 requires. Its architecture matches
//! ccgate's serving path (one single-threaded runtime per worker thread, each with its own
//! upstream connections), so `ccgate - bare-proxy` is the cost of ccgate's features and
//! `bare-proxy - nginx` the cost of the hyper/tokio stack itself.
//!
//! ```text
//! bare-proxy --port 0 --upstream 127.0.0.1:PORT_A --upstream 127.0.0.1:PORT_B [--workers N]
//!            [--http2]
//! ```
//!
//! `--http2` speaks HTTP/2 without TLS (prior knowledge) to the upstreams, every request of a
//! worker multiplexed on one connection per upstream (the mocks need `--http2` too): the
//! experiment of `bench/h2.sh`, which weighs what HTTP/2 to upstreams would save in memory per
//! stream against what it costs in CPU.
//! Prints `listening on http://ADDR` once ready.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::client::conn::http2;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// One worker's keep-alive connections to each upstream.
struct Pools {
    upstreams: Vec<SocketAddr>,
    /// `Host` for each upstream, built once.
    hosts: Vec<http::HeaderValue>,
    idle: Vec<RefCell<Vec<SendRequest<Incoming>>>>,
    /// With `--http2`: the one multiplexed connection to each upstream, once made.
    h2: Option<Vec<RefCell<Option<http2::SendRequest<Incoming>>>>>,
    next: Cell<usize>,
}

impl Pools {
    async fn send(&self, mut req: Request<Incoming>) -> Result<Response<Incoming>, Error> {
        let i = self.next.get();
        self.next.set((i + 1) % self.upstreams.len());
        let addr = self.upstreams[i];
        if let Some(h2) = &self.h2 {
            return self.send_h2(&h2[i], addr, req).await;
        }
        let mut sender = self.checkout(i);
        if sender.is_none() {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::task::spawn_local(async move {
                let _ = conn.await;
            });
            sender = Some(s);
        }
        let mut sender = sender.expect("a connection");
        req.headers_mut()
            .insert(http::header::HOST, self.hosts[i].clone());
        let resp = sender.send_request(req).await?;
        // Busy until its body is read; `checkout` skips it until then.
        self.idle[i].borrow_mut().push(sender);
        Ok(resp)
    }

    async fn send_h2(
        &self,
        conn: &RefCell<Option<http2::SendRequest<Incoming>>>,
        addr: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Result<Response<Incoming>, Error> {
        let open = conn.borrow().as_ref().filter(|s| !s.is_closed()).cloned();
        let mut sender = match open {
            Some(s) => s,
            None => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let (s, c) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
                tokio::task::spawn_local(async move {
                    let _ = c.await;
                });
                *conn.borrow_mut() = Some(s.clone());
                s
            }
        };
        // HTTP/2 names the origin in `:authority`, from an absolute URI.
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = format!("http://{addr}{pq}").parse()?;
        sender.ready().await?;
        Ok(sender.send_request(req).await?)
    }

    fn checkout(&self, i: usize) -> Option<SendRequest<Incoming>> {
        let mut idle = self.idle[i].borrow_mut();
        idle.retain(|s| !s.is_closed());
        let pos = idle.iter().position(SendRequest::is_ready)?;
        Some(idle.swap_remove(pos))
    }
}

fn main() -> Result<(), Error> {
    let mut port = 0u16;
    let mut upstreams = Vec::new();
    let mut workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut h2 = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--port" => port = value()?.parse()?,
            "--upstream" => upstreams.push(value()?.parse::<SocketAddr>()?),
            "--workers" => workers = value()?.parse()?,
            "--http2" => h2 = true,
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    if upstreams.is_empty() {
        return Err("at least one --upstream ADDR".into());
    }
    // Bound with a listen backlog of 4096, as the mocks and nginx (std's bind uses 128, which
    // thousands of simultaneous connects overrun).
    let listener = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
            socket.listen(4096)?.into_std()
        })?;
    listener.set_nonblocking(true)?;
    println!("listening on http://{}", listener.local_addr()?);
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let listener = listener.try_clone().expect("clone the listener");
            let upstreams = upstreams.clone();
            std::thread::spawn(move || worker(listener, upstreams, h2))
        })
        .collect();
    for t in threads {
        t.join().expect("worker thread")?;
    }
    Ok(())
}

fn worker(
    listener: std::net::TcpListener,
    upstreams: Vec<SocketAddr>,
    h2: bool,
) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = TcpListener::from_std(listener)?;
        let hosts = upstreams
            .iter()
            .map(|a| a.to_string().parse())
            .collect::<Result<_, _>>()?;
        let pools = Rc::new(Pools {
            hosts,
            idle: upstreams.iter().map(|_| RefCell::new(Vec::new())).collect(),
            h2: h2.then(|| upstreams.iter().map(|_| RefCell::new(None)).collect()),
            upstreams,
            next: Cell::new(0),
        });
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like (as ccgate and nginx do): back off
                    // briefly and go on; the connection waits in the backlog.
                    eprintln!("bare-proxy: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let pools = Rc::clone(&pools);
            tokio::task::spawn_local(async move {
                let svc = service_fn(move |req| {
                    let pools = Rc::clone(&pools);
                    async move {
                        let resp = pools.send(req).await;
                        if let Err(e) = &resp {
                            // The client sees its connection closed; say why (e.g. out of fds).
                            eprintln!("bare-proxy: upstream: {e}");
                        }
                        resp
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    })
}
