//! HTTP/2 to upstreams (`http2 = true` on an endpoint): streams multiplexed on few connections,
//! at most `H2_STREAMS_PER_CONNECTION` on each, their slots given back when answers end, exact
//! counters; h2c with prior knowledge over `http`, ALPN over `https` (HTTP/1.1 when the server
//! declines), and failover when an upstream does not speak it.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use ccgate::transport::upstream::H2_STREAMS_PER_CONNECTION;
use support::gateway::{GatewayBuilder, TestGateway};
use support::mock::{MockUpstream, Script, SseEvent, anthropic_message};

/// What the HTTP/2 upstream saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    /// Requests by HTTP version.
    versions: Mutex<HashMap<Version, usize>>,
    /// HTTP/2 requests that carried a `Host` header (the host goes in `:authority`).
    h2_with_host: AtomicUsize,
    /// Most streams open at once on any one connection.
    max_streams_per_connection: AtomicUsize,
    /// Streams open now, over all connections, and the most there were.
    open: AtomicUsize,
    max_open: AtomicUsize,
    /// How many times held streams were let go (see [`Hold::UntilReleased`]).
    released: tokio::sync::watch::Sender<u64>,
}

/// What a stream waits for before its first content.
#[derive(Clone, Copy)]
enum Hold {
    /// A fixed pause.
    Pace(Duration),
    /// [`H2Upstream::release`]: the test opens a whole wave of streams, then lets them go.
    UntilReleased,
}

/// An upstream on hyper's own server (HTTP/1.1 and HTTP/2, with TLS or without) that answers
/// Messages calls: JSON, or an SSE stream of `deltas` events whose first content waits `hold`.
struct H2Upstream {
    addr: SocketAddr,
    seen: Arc<Seen>,
    ca_pem: Option<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for H2Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl H2Upstream {
    async fn start(tls: bool, deltas: usize, hold: Hold) -> Self {
        Self::start_allowing(tls, deltas, hold, 1000).await
    }

    /// An upstream whose connections allow `max_streams` concurrent streams each
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    async fn start_allowing(tls: bool, deltas: usize, hold: Hold, max_streams: u32) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Seen::default());
        let (acceptor, ca_pem) = if tls {
            let (a, pem) = tls_acceptor();
            (Some(a), Some(pem))
        } else {
            (None, None)
        };
        let s = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                s.connections.fetch_add(1, Ordering::SeqCst);
                let (seen, acceptor) = (Arc::clone(&s), acceptor.clone());
                tokio::spawn(async move {
                    let open = Arc::new(AtomicUsize::new(0));
                    let svc = service_fn(move |req| {
                        answer(req, Arc::clone(&seen), Arc::clone(&open), deltas, hold)
                    });
                    let mut b = auto::Builder::new(TokioExecutor::new());
                    b.http2().max_concurrent_streams(max_streams);
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(tcp).await {
                                let _ = b.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = b.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            seen,
            ca_pem,
            task,
        }
    }

    fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    fn requests(&self, v: Version) -> usize {
        let versions = self.seen.versions.lock().expect("versions");
        versions.get(&v).copied().unwrap_or(0)
    }

    fn connections(&self) -> usize {
        self.seen.connections.load(Ordering::SeqCst)
    }

    /// Lets every stream held so far go on to its content, once `n` are open.
    async fn release_when_open(&self, n: usize) {
        support::wait::eventually(&format!("{n} streams open at the upstream"), || async {
            self.seen.open.load(Ordering::SeqCst) == n
        })
        .await;
        self.seen.released.send_modify(|r| *r += 1);
    }
}

/// A stream's place among its connection's open streams (and all open streams), counted while
/// its answer is sent.
struct Open(Arc<AtomicUsize>, Arc<Seen>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        self.1.open.fetch_sub(1, Ordering::SeqCst);
    }
}

type Chunk = Result<Frame<Bytes>, Infallible>;

async fn answer(
    req: Request<Incoming>,
    seen: Arc<Seen>,
    open: Arc<AtomicUsize>,
    deltas: usize,
    hold: Hold,
) -> Result<Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>, Infallible> {
    *seen
        .versions
        .lock()
        .expect("versions")
        .entry(req.version())
        .or_default() += 1;
    if req.version() == Version::HTTP_2 && req.headers().contains_key(http::header::HOST) {
        seen.h2_with_host.fetch_add(1, Ordering::SeqCst);
    }
    // Which release a held stream waits for, read before it counts as open.
    let mut released = seen.released.subscribe();
    let arrived = *released.borrow();
    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
    seen.max_streams_per_connection
        .fetch_max(now, Ordering::SeqCst);
    let all = seen.open.fetch_add(1, Ordering::SeqCst) + 1;
    seen.max_open.fetch_max(all, Ordering::SeqCst);
    let guard = Open(open, Arc::clone(&seen));
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let stream = body
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["stream"] == true);
    if !stream {
        drop(guard);
        let json = anthropic_message("claude-sonnet-4", "hi", 10, 5).to_string();
        let body = http_body_util::Full::new(Bytes::from(json))
            .map_err(|e| match e {})
            .boxed();
        let resp = Response::builder()
            .header("content-type", "application/json")
            .body(body)
            .expect("response");
        return Ok(resp);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(4);
    tokio::spawn(async move {
        let _guard = guard;
        for (i, e) in SseEvent::message_stream(deltas).into_iter().enumerate() {
            // The first content waits: the gateway holds the stream's preamble meanwhile.
            if i == 3 {
                match hold {
                    Hold::Pace(pace) => tokio::time::sleep(pace).await,
                    Hold::UntilReleased => {
                        let _ = released.wait_for(|r| *r > arrived).await;
                    }
                }
            }
            let chunk = Bytes::copy_from_slice(e.as_bytes());
            if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                return;
            }
        }
    });
    let body = StreamBody::new(tokio_stream_from(rx)).boxed();
    let resp = Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .expect("response");
    Ok(resp)
}

/// The receiver as a stream of frames.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Chunk>,
) -> impl futures_util::Stream<Item = Chunk> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A TLS acceptor with a fresh self-signed certificate for `127.0.0.1` that offers `h2` and
/// `http/1.1` by ALPN, and the certificate's PEM.
fn tls_acceptor() -> (TlsAcceptor, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
        .expect("self-signed certificate");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .expect("certificate and key");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (TlsAcceptor::from(Arc::new(config)), certified.cert.pem())
}

/// A gateway with one `http2 = true` endpoint over TLS at `url`, trusting `ca_pem` (the file
/// returned must outlive the gateway's start).
async fn tls_gateway(
    name: &str,
    url: &str,
    ca_pem: &str,
) -> (TestGateway, tempfile::NamedTempFile) {
    let mut ca = tempfile::NamedTempFile::new().expect("tempfile");
    ca.write_all(ca_pem.as_bytes()).expect("write CA");
    ca.flush().expect("flush");
    let path = ccgate::config::toml_string(ca.path().to_str().expect("utf-8"));
    let gw = GatewayBuilder::new()
        .endpoint(name, url, &format!("http2 = true\nca_file = {path}"))
        .start()
        .await;
    (gw, ca)
}

/// `n` concurrent streaming requests, let go once all are open at `up`; returns how many ended
/// with `message_stop`.
async fn streams(gw: &Arc<TestGateway>, up: &H2Upstream, n: usize) -> usize {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let gw = Arc::clone(gw);
            tokio::spawn(async move {
                let a = gw.post_message(true).await;
                a.status == 200 && a.text().contains("event: message_stop")
            })
        })
        .collect();
    up.release_when_open(n).await;
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.expect("client task"));
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_share_few_connections_and_every_one_is_counted() {
    // Each wave's streams are held until all are open at the upstream.
    let up = H2Upstream::start(false, 3, Hold::UntilReleased).await;
    let gw = GatewayBuilder::new()
        .server("max_connections = 4096")
        .endpoint("h2", &up.url(), "http2 = true")
        .start()
        .await;
    let gw = Arc::new(gw);

    // 300 streams open at once: three times what one connection may carry.
    const WAVE: usize = 300;
    assert_eq!(
        streams(&gw, &up, WAVE).await,
        WAVE,
        "every stream completed"
    );
    assert_eq!(up.requests(Version::HTTP_2), WAVE, "all over HTTP/2");
    assert_eq!(up.requests(Version::HTTP_11), 0);
    let after_first = up.connections();
    let most = up.seen.max_streams_per_connection.load(Ordering::SeqCst);
    assert!(
        most <= H2_STREAMS_PER_CONNECTION,
        "{most} streams on one connection, more than {H2_STREAMS_PER_CONNECTION}"
    );
    let overlap = up.seen.max_open.load(Ordering::SeqCst);
    assert!(
        overlap > H2_STREAMS_PER_CONNECTION,
        "only {overlap} streams were open at once: the cap was not exercised"
    );
    assert!(
        most > 1,
        "streams were multiplexed ({most} at most on one connection)"
    );
    // Each worker pool opens its own connections, as few as its streams need.
    assert!(
        (2..=8).contains(&after_first),
        "{after_first} connections for {WAVE} streams ({overlap} at once)"
    );

    // Every stream gave its slot back as its answer ended: all connections carry none.
    let ep = gw.gateway.registry.by_name("h2").expect("endpoint h2");
    support::wait::eventually("every connection idle", || async {
        ep.client.idle_connections() == after_first
    })
    .await;
    // A second wave finds the room: it opens no more connections than the first.
    assert_eq!(streams(&gw, &up, WAVE).await, WAVE);
    let second = up.connections() - after_first;
    assert!(
        second <= after_first,
        "the second wave opened {second} connections (the first {after_first})"
    );
    // JSON answers go over the same connections.
    let a = gw.post_message(false).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(up.requests(Version::HTTP_2), 2 * WAVE + 1);

    // Exact accounting, as over HTTP/1.1.
    gw.settle().await;
    let v = gw.endpoint_view("h2").await;
    assert_eq!(v["outcomes"]["success"], 2 * WAVE as u64 + 1, "{v}");
    assert_eq!(v["total_requests"], 2 * WAVE as u64 + 1, "{v}");
}

/// A server that allows fewer streams per connection than ccgate's 100 gets no more than it
/// allows: the streams past its limit open another connection instead of waiting in the first
/// for one of its streams to end (audit: the server's limit was not read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_lower_stream_limit_opens_another_connection() {
    let up = H2Upstream::start_allowing(false, 3, Hold::UntilReleased, 2).await;
    // One worker, so one pool: the wave below meets the connection the first request opened.
    let gw = Arc::new(
        GatewayBuilder::new()
            .server("workers = 1")
            .endpoint("h2", &up.url(), "http2 = true")
            .start()
            .await,
    );
    // Its answer came after the server's SETTINGS, so the limit is known from here on.
    let a = gw.post_message(false).await;
    assert_eq!(a.status, 200, "{}", a.text());
    // Four streams held open together: two on that connection, two on a second (whose first
    // stream opened it and whose second comes within its limit, whether or not its SETTINGS
    // have arrived by then). Streams queued behind the limit would never all be open at once.
    assert_eq!(streams(&gw, &up, 4).await, 4);
    assert_eq!(up.seen.max_streams_per_connection.load(Ordering::SeqCst), 2);
    assert_eq!(up.connections(), 2);
    gw.settle().await;
    let v = gw.endpoint_view("h2").await;
    assert_eq!(v["outcomes"]["success"], 5, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_negotiates_http2_by_alpn_and_falls_back_to_http1() {
    // A server that offers h2: the requests go over HTTP/2.
    let up = H2Upstream::start(true, 2, Hold::Pace(Duration::from_millis(10))).await;
    let (gw, _ca) = tls_gateway("h2", &up.url(), up.ca_pem.as_deref().expect("TLS")).await;
    for stream in [false, true, false] {
        let a = gw.post_message(stream).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    assert_eq!(up.requests(Version::HTTP_2), 3);
    // The client's `Host` is not forwarded over HTTP/2: the host goes in `:authority`.
    assert_eq!(up.seen.h2_with_host.load(Ordering::SeqCst), 0);
    // One connection per worker pool at most (the test client may reach either worker).
    assert!(up.connections() <= 3, "{} connections", up.connections());

    // A server that offers only HTTP/1.1 (the test mock, which speaks nothing else): ccgate
    // speaks HTTP/1.1 to it.
    let h1 = MockUpstream::start_tls().await;
    let (gw, _ca) = tls_gateway("h1", &h1.url(), &h1.ca_pem).await;
    h1.push(Script::json_ok());
    h1.push(Script::sse_ok(2));
    for stream in [false, true] {
        let a = gw.post_message(stream).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    assert_eq!(h1.count(), 2);
    let r = h1.last_request().expect("request");
    assert!(r.header("host").is_some(), "HTTP/1.1 requests carry Host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_does_not_speak_h2c_fails_over() {
    // Prior knowledge over plain http: an HTTP/1.1-only upstream cannot answer.
    let h1 = MockUpstream::start().await;
    let spare = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .endpoint("h2c", &h1.url(), "http2 = true\npriority = 1")
        .endpoint("spare", &spare.url(), "priority = 2")
        .start()
        .await;
    let a = gw.post_message(false).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.header("x-ccgate-endpoint"), Some("spare"));
    assert_eq!(h1.count(), 0, "no HTTP/1.1 request reached it");
    assert_eq!(spare.count(), 1);
    gw.settle().await;
    let v = gw.endpoint_view("h2c").await;
    assert_eq!(v["outcomes"]["transport"], 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_hang_up_give_their_streams_back() {
    // Streams held until all are open; every client hangs up after its first frame.
    let up = H2Upstream::start(false, 3, Hold::UntilReleased).await;
    let gw = GatewayBuilder::new()
        .endpoint("h2", &up.url(), "http2 = true")
        .start()
        .await;
    let gw = Arc::new(gw);
    let body = TestGateway::message_body(true).to_string();
    let tasks: Vec<_> = (0..150)
        .map(|_| {
            let (gw, body) = (Arc::clone(&gw), body.clone());
            tokio::spawn(async move {
                let headers = [("content-type", "application/json")];
                let resp = gw
                    .send(http::Method::POST, "/v1/messages", &headers, body)
                    .await;
                let mut body = resp.into_body();
                // The first frame (the held preamble and the first content), then away.
                let first = body.frame().await;
                assert!(matches!(first, Some(Ok(_))), "a first frame");
            })
        })
        .collect();
    up.release_when_open(150).await;
    for t in tasks {
        t.await.expect("client task");
    }
    // Every stream ends at the upstream (reset by the gateway or finished), and ccgate's
    // connections all carry none: no slot stayed taken by a body that was dropped.
    support::wait::eventually("the upstream's streams ended", || async {
        up.seen.open.load(Ordering::SeqCst) == 0
    })
    .await;
    let ep = gw.gateway.registry.by_name("h2").expect("endpoint h2");
    support::wait::eventually("every connection idle", || async {
        ep.client.idle_connections() == up.connections()
    })
    .await;
    assert!(up.connections() >= 2, "150 streams needed two connections");
    gw.settle().await;
    let v = gw.endpoint_view("h2").await;
    // A stream whose end had already arrived with its first content was delivered; the rest were
    // cancelled. None is the endpoint's failure.
    let (ok, gone) = (&v["outcomes"]["success"], &v["outcomes"]["cancelled"]);
    let counted = ok.as_u64().zip(gone.as_u64()).map(|(a, b)| a + b);
    assert_eq!(counted, Some(150), "{v}");
    assert_eq!(v["endpoint_errors"], 0, "{v}");
}

/// An HTTP/2 server (prior knowledge) that refuses unprocessed (`REFUSED_STREAM`) each stream
/// `refuse` picks (given the request and its place on its connection, from 0) and answers every
/// other one with `body` as JSON. Returns its address, the streams refused and answered, and its
/// task.
async fn h2_refusing_server(
    refuse: impl Fn(&http::Request<h2::RecvStream>, usize) -> bool + Send + Sync + 'static,
    body: Bytes,
) -> (
    SocketAddr,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let refused = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let (r, a) = (Arc::clone(&refused), Arc::clone(&answered));
    let refuse = Arc::new(refuse);
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (r, a, refuse, body) = (
                Arc::clone(&r),
                Arc::clone(&a),
                Arc::clone(&refuse),
                body.clone(),
            );
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                let mut nth = 0;
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    nth += 1;
                    if refuse(&req, nth - 1) {
                        r.fetch_add(1, Ordering::SeqCst);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    drop(req);
                    let resp = http::Response::builder()
                        .header("content-type", "application/json")
                        .body(())
                        .expect("response");
                    if let Ok(mut send) = respond.send_response(resp, false) {
                        a.fetch_add(1, Ordering::SeqCst);
                        let _ = send.send_data(body.clone(), true);
                    }
                }
            });
        }
    });
    (addr, refused, answered, server)
}

/// A probe refused unprocessed (an HTTP/2 stream refused before the server acted on it) goes out
/// again, as a client attempt does: the refusal says nothing about the endpoint, so the probe
/// passes. The server refuses the first probe stream it sees and answers every later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_refused_unprocessed_goes_out_again() {
    let probes = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&probes);
    let (addr, _refused, answered, server) = h2_refusing_server(
        move |req, _| req.uri().path() == "/v1/models" && seen.fetch_add(1, Ordering::SeqCst) == 0,
        Bytes::from_static(br#"{"data":[]}"#),
    )
    .await;
    let gw = GatewayBuilder::new()
        .endpoint(
            "a",
            &format!("http://{addr}"),
            "http2 = true\nprobe = \"models\"",
        )
        .start()
        .await;
    let probe = gw
        .request(
            http::Method::POST,
            "/_ccgate/endpoints/a/probe",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(probe.status, 200, "{}", probe.text());
    let v = probe.json();
    assert_eq!(v["passed"], true, "{v}");
    assert_eq!(
        probes.load(Ordering::SeqCst),
        2,
        "one refused, one answered"
    );
    assert_eq!(answered.load(Ordering::SeqCst), 1);
    server.abort();
}

/// A stream the server refuses unprocessed (`REFUSED_STREAM`, as a server about to close a
/// connection does) goes out again on another connection: the client gets its answer and the
/// endpoint is not blamed (audit: each refusal was a transport failure, and a few at once ejected
/// a healthy endpoint). The server answers the first stream of each connection and refuses every
/// later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_refused_unprocessed_goes_out_again() {
    let body = anthropic_message("claude-sonnet-4-5", "hi", 1, 1).to_string();
    let (addr, refused, answered, server) = h2_refusing_server(
        |_, nth_on_connection| nth_on_connection > 0,
        Bytes::from(body),
    )
    .await;
    let gw = GatewayBuilder::new()
        .health("failure_threshold = 1")
        .endpoint("a", &format!("http://{addr}"), "http2 = true")
        .start()
        .await;
    for i in 0..4 {
        let ans = gw.post_message(false).await;
        assert_eq!(ans.status, 200, "request {i}: {}", ans.text());
    }
    gw.settle().await;
    let v = gw.endpoint_view("a").await;
    assert_eq!(v["state"], "healthy", "{v}");
    assert_eq!(v["successful_requests"], 4, "{v}");
    assert_eq!(v["failed_requests"], 0, "{v}");
    assert_eq!(answered.load(Ordering::SeqCst), 4);
    assert!(
        refused.load(Ordering::SeqCst) >= 1,
        "the server refused none"
    );
    server.abort();
}

/// An HTTP/2 client that leaves during its upload (it resets its stream, or its connection
/// breaks) is a cancelled request, as an HTTP/1.1 client that closes mid-body is, not the
/// caller's error (audit: counted as 400 caller errors).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_leaves_mid_upload_is_cancelled() {
    let up = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    for close_connection in [false, true] {
        let tcp = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        let (mut client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        let driver = tokio::spawn(conn);
        let req = http::Request::post(gw.url("/v1/messages"))
            .header("content-type", "application/json")
            .body(())
            .expect("request");
        let (_answer, mut body) = client.send_request(req, false).expect("send");
        body.send_data(Bytes::from_static(br#"{"model":"claude-son"#), false)
            .expect("data");
        // The gateway has begun reading the body before the client leaves.
        support::wait::eventually("the request under way", || async {
            gw.admin("stats").await["in_flight"] == 1
        })
        .await;
        if close_connection {
            driver.abort();
            drop(client);
        } else {
            body.send_reset(h2::Reason::CANCEL);
        }
        support::wait::eventually("the request ended", || async {
            gw.admin("stats").await["in_flight"] == 0
        })
        .await;
    }
    let s = gw.admin("stats").await;
    assert_eq!(s["cancelled"], 2, "{s}");
    assert_eq!(s["caller_errors"], 0, "{s}");
    assert_eq!(up.count(), 0);
    gw.shutdown().await;
}
