//! Hostile clients and hostile upstreams, each through the real server (issue #12 items 5 and 6,
//! issue #17 items 1–9, issue #21 items 4–7). One test per case. Requests a hyper client would
//! normalise (odd targets, control bytes, `Expect`, absolute form, TRACE/CONNECT) go over raw TCP.
//!
//! Cases that fail today are `#[ignore = "defect: ..."]` with the issue item they belong to; run
//! them with `cargo test --test hostile -- --ignored`.

mod support;

use bytes::Bytes;
use http::Method;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::gateway::{Answer, GatewayBuilder, TestGateway};
use support::mock::{
    Gate, MOCK_MODEL, MockUpstream, ReceivedRequest, Script, SseEvent, anthropic_message,
};
use support::wait::within;

const MESSAGES: &str = "/v1/messages";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A gateway whose prober stays quiet and whose retry budget never refuses a failover.
fn builder() -> GatewayBuilder {
    GatewayBuilder::new()
        .health("probe_interval = \"1h\"")
        .health("probe_max_interval = \"1h\"")
        .table("retry_budget", "ratio = 10.0")
        .table("retry_budget", "min_per_second = 100000")
}

/// Text of B's answers, so a test can tell who answered.
const FROM_B: &str = "answer from B";

/// B: a healthy upstream whose JSON answers say [`FROM_B`] and whose streams are complete.
async fn healthy_b() -> MockUpstream {
    let b = MockUpstream::start().await;
    b.set_default_fn(|req| {
        if stream_requested(req) {
            Script::sse_ok(2)
        } else {
            Script::json(200, &anthropic_message(MOCK_MODEL, FROM_B, 10, 5))
        }
    });
    b
}

fn stream_requested(req: &ReceivedRequest) -> bool {
    req.json()
        .and_then(|v| v["stream"].as_bool())
        .unwrap_or(false)
}

/// `a` answers a JSON request with `script`: the client gets `b`'s whole answer, and `a` counts the
/// attempt as one endpoint failure.
async fn json_request_fails_over_from(script: Script) {
    let a = MockUpstream::start().await;
    a.set_default(script);
    let (b, gw) = a_then_b(builder(), &a.url()).await;
    let ans = gw.post_message(false).await;
    assert_json_from_b(&ans);
    assert_eq!(b.count(), 1);
    assert_eq!(counts(&gw, "a").await, (1, 0, 1));
}

/// A (hostile, priority 1) and B (healthy, priority 2) behind one gateway built from `gb`.
async fn a_then_b(gb: GatewayBuilder, a_url: &str) -> (MockUpstream, TestGateway) {
    let b = healthy_b().await;
    let gw = gb
        .endpoint("a", a_url, "priority = 1")
        .endpoint("b", &b.url(), "priority = 2")
        .start()
        .await;
    (b, gw)
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a count in {v}"))
}

/// `(total, successful, endpoint_errors)` of an endpoint, once nothing is in flight: the third is
/// what blames the endpoint (`failed_requests` also holds the caller's own errors).
async fn counts(gw: &TestGateway, name: &str) -> (u64, u64, u64) {
    gw.settle().await;
    let v = gw.endpoint_view(name).await;
    (
        n(&v, "total_requests"),
        n(&v, "successful_requests"),
        n(&v, "endpoint_errors"),
    )
}

/// Asserts the answer is B's complete JSON message.
#[track_caller]
fn assert_json_from_b(a: &Answer) {
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    assert_eq!(v["content"][0]["text"], FROM_B, "{v}");
}

/// Asserts the answer is a complete SSE stream (B's) with no error event.
#[track_caller]
fn assert_clean_stream(a: &Answer) {
    assert_eq!(a.status, 200, "{}", a.text());
    let text = a.text();
    assert!(
        text.starts_with("event: message_start"),
        "stream does not start with message_start: {text:?}"
    );
    assert!(text.contains("event: message_stop"), "{text:?}");
    assert!(!text.contains("event: error"), "{text:?}");
}

/// Asserts an Anthropic error JSON body.
#[track_caller]
fn assert_anthropic_error(body: &[u8]) -> Value {
    let v: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "not an Anthropic error ({e}): {}",
            String::from_utf8_lossy(body)
        )
    });
    assert_eq!(v["type"], "error", "{v}");
    assert!(v["error"]["type"].is_string(), "{v}");
    v
}

/// Streaming `POST /v1/messages` with `headers`.
async fn post_stream(gw: &TestGateway, headers: &[(&str, &str)]) -> Answer {
    gw.post(MESSAGES, headers, &TestGateway::message_body(true))
        .await
}

/// A raw HTTP/1.1 answer.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads more bytes into `buf`; `false` at the connection's end (or a reset).
async fn fill(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = vec![0u8; 64 * 1024];
    match tcp.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(k) => {
            buf.extend_from_slice(&chunk[..k]);
            true
        }
    }
}

/// Reads one response (after any `1xx`) from `tcp`: the head, then a body framed by
/// `content-length`, chunked encoding or the connection's end. `None` when the connection ends
/// (or is reset) before a full head arrives.
async fn read_response(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Raw> {
    let read = async {
        loop {
            let end = loop {
                if let Some(p) = find(buf, b"\r\n\r\n") {
                    break p + 4;
                }
                if !fill(tcp, buf).await {
                    return None;
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end);
            let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
            if (100..200).contains(&status) {
                continue;
            }
            let mut raw = Raw {
                status,
                head,
                body: Vec::new(),
            };
            let chunked = raw
                .header("transfer-encoding")
                .is_some_and(|v| v.contains("chunked"));
            if chunked {
                loop {
                    let Some(p) = find(buf, b"\r\n") else {
                        if !fill(tcp, buf).await {
                            return Some(raw);
                        }
                        continue;
                    };
                    let size = usize::from_str_radix(
                        String::from_utf8_lossy(&buf[..p])
                            .split(';')
                            .next()
                            .unwrap_or("")
                            .trim(),
                        16,
                    )
                    .ok()?;
                    while buf.len() < p + 2 + size + 2 {
                        if !fill(tcp, buf).await {
                            return Some(raw);
                        }
                    }
                    raw.body.extend_from_slice(&buf[p + 2..p + 2 + size]);
                    buf.drain(..p + 2 + size + 2);
                    if size == 0 {
                        return Some(raw);
                    }
                }
            }
            let len = raw.header("content-length").and_then(|v| v.parse().ok());
            match len {
                Some(len) => {
                    while buf.len() < len {
                        if !fill(tcp, buf).await {
                            break;
                        }
                    }
                    let take = len.min(buf.len());
                    raw.body = buf.drain(..take).collect();
                }
                None if status == 204 || status == 304 => {}
                None => {
                    while fill(tcp, buf).await {}
                    raw.body = std::mem::take(buf);
                }
            }
            return Some(raw);
        }
    };
    within("a raw answer from the gateway", read).await
}

/// Sends `request` on a fresh connection and reads one answer.
async fn raw(gw: &TestGateway, request: &[u8]) -> Option<Raw> {
    let mut tcp = TcpStream::connect(gw.addr).await.expect("connect");
    tcp.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    read_response(&mut tcp, &mut buf).await
}

/// A raw request: `METHOD TARGET HTTP/1.1`, `host`, `connection: close`, `extra` header lines,
/// and `body` with its `content-length`.
fn raw_request(method: &str, target: &str, extra: &[&str], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {target} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n");
    for h in extra {
        r.push_str(h);
        r.push_str("\r\n");
    }
    if !body.is_empty() {
        r.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        ));
    }
    r.push_str("\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

fn message_bytes(stream: bool) -> Vec<u8> {
    TestGateway::message_body(stream).to_string().into_bytes()
}

/// The gateway still answers a plain request after a hostile one.
async fn still_serves(gw: &TestGateway) {
    let a = gw.post_message(false).await;
    assert_eq!(a.status, 200, "the gateway still serves: {}", a.text());
}

// ---------------------------------------------------------------------------------------------
// Hostile clients
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_body_over_the_cap_is_413_and_touches_no_endpoint() {
    let up = MockUpstream::start().await;
    let gw = builder()
        .server("max_body_bytes = 4096")
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    // Declared too large.
    let r = raw(&gw, &raw_request("POST", MESSAGES, &[], &vec![b'x'; 5000]))
        .await
        .expect("an answer");
    assert_eq!(r.status, 413, "{r:?}");
    assert_anthropic_error(&r.body);
    // Declared small, then more bytes than the cap in chunks.
    let mut req = b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..5 {
        req.extend_from_slice(b"400\r\n");
        req.extend_from_slice(&[b'y'; 0x400]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let r = raw(&gw, &req).await.expect("an answer");
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(up.count(), 0, "no endpoint touched");
    assert_eq!(counts(&gw, "a").await, (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_malformed_and_non_utf8_json_blames_no_endpoint() {
    let up = MockUpstream::start().await;
    // Like the real API: 400 for a body that is not JSON.
    up.set_default_fn(|req| match req.json() {
        Some(_) => Script::json_ok(),
        None => Script::error(400, "invalid_request_error", "invalid JSON"),
    });
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let bodies: [&[u8]; 5] = [
        b"{\"model\": \"claude\", \"stream\": tr",
        b"{\"model\": \"\xff\xfe\", \"messages\": []}",
        b"\xc3\x28\xa0\xa1 not json at all",
        b"{\"metadata\": {\"user_id\": \"\xed\xa0\x80\"}, \"stream\": true}",
        b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    ];
    for body in bodies {
        let r = raw(&gw, &raw_request("POST", MESSAGES, &[], body))
            .await
            .expect("an answer");
        assert_eq!(r.status, 400, "{r:?}");
        assert_anthropic_error(&r.body);
    }
    let (_, _, failed) = counts(&gw, "a").await;
    assert_eq!(
        failed, 0,
        "a client's bad JSON is not the endpoint's failure"
    );
    still_serves(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_with_100_kb_of_headers_is_answered_cleanly() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let value = "v".repeat(2000);
    let lines: Vec<String> = (0..50).map(|i| format!("x-big-{i}: {value}")).collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let r = raw(
        &gw,
        &raw_request("POST", MESSAGES, &lines, &message_bytes(false)),
    )
    .await
    .expect("an answer, not a bare close");
    eprintln!(
        "100 KB of headers: {} (upstream saw {} request(s))",
        r.status,
        up.count()
    );
    // Either served in full or refused as too large; never blamed on the endpoint.
    match r.status {
        200 => assert!(
            up.last_request().expect("forwarded").headers.len() >= 50,
            "every header forwarded"
        ),
        431 => assert_eq!(up.count(), 0),
        other => panic!("unexpected status {other}: {r:?}"),
    }
    let (_, _, failed) = counts(&gw, "a").await;
    assert_eq!(failed, 0);
    still_serves(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_control_bytes_in_header_values_are_refused_locally() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    for value in ["a\x01b", "a\x00b", "a\x7fb", "a\rb", "a\x1bb"] {
        let header = format!("x-evil: {value}");
        let r = raw(
            &gw,
            &raw_request("POST", MESSAGES, &[&header], &message_bytes(false)),
        )
        .await;
        let status = r.as_ref().map(|r| r.status);
        assert_eq!(status, Some(400), "{value:?}: {r:?}");
    }
    assert_eq!(up.count(), 0, "nothing forwarded");
    still_serves(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_chunked_request_body_is_forwarded_whole() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let body = message_bytes(false);
    let mut req = b"POST /v1/messages?beta=true HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for part in body.chunks(7) {
        req.extend_from_slice(format!("{:x};ext=1\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\nx-trailer: t\r\n\r\n");
    let r = raw(&gw, &req).await.expect("an answer");
    assert_eq!(r.status, 200, "{r:?}");
    let got = up.last_request().expect("forwarded");
    assert_eq!(got.body, Bytes::from(body));
    assert_eq!(got.path_and_query, "/v1/messages?beta=true");
    assert_eq!(counts(&gw, "a").await, (1, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_expect_100_continue_is_honoured_and_not_forwarded() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let body = message_bytes(false);
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    );
    let mut tcp = TcpStream::connect(gw.addr).await.expect("connect");
    tcp.write_all(head.as_bytes()).await.expect("head");
    // The client waits for the interim answer before it sends its body.
    let mut seen = Vec::new();
    within("100 Continue", async {
        let mut chunk = [0u8; 256];
        while find(&seen, b"\r\n\r\n").is_none() {
            let k = tcp.read(&mut chunk).await.expect("read");
            assert!(k > 0, "closed before 100 Continue");
            seen.extend_from_slice(&chunk[..k]);
        }
    })
    .await;
    assert!(
        seen.starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    tcp.write_all(&body).await.expect("body");
    let pos = find(&seen, b"\r\n\r\n").expect("end of interim") + 4;
    let mut rest = seen.split_off(pos);
    let r = read_response(&mut tcp, &mut rest).await.expect("answer");
    assert_eq!(r.status, 200, "{r:?}");
    let got = up.last_request().expect("forwarded");
    assert_eq!(got.body, Bytes::from(body));
    assert_eq!(
        got.header("expect"),
        None,
        "Expect forwarded: {:?}",
        got.headers
    );
}

/// A request whose first bytes arrive alone (`P`, which could still begin HTTP/2's preface, or
/// `PO`, which cannot) is served whole, however the gateway tells the protocols apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_request_split_after_its_first_bytes_is_served() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let request = raw_request("POST", MESSAGES, &[], &message_bytes(false));
    for split in [1, 2, 16] {
        let mut tcp = TcpStream::connect(gw.addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        tcp.write_all(&request[..split]).await.expect("first bytes");
        tcp.flush().await.expect("flush");
        tokio::task::yield_now().await;
        tcp.write_all(&request[split..]).await.expect("the rest");
        let mut buf = Vec::new();
        let r = read_response(&mut tcp, &mut buf).await.expect("answer");
        assert_eq!(r.status, 200, "split after {split}: {r:?}");
    }
    assert_eq!(up.count(), 3);
    still_serves(&gw).await;
}

/// An HTTP/2 (prior knowledge) connection to the gateway, driven by a task of its own.
async fn h2_connect(
    gw: &TestGateway,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = TcpStream::connect(gw.addr).await.expect("connect");
    let (send, conn) = within(
        "an HTTP/2 handshake",
        hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        ),
    )
    .await
    .expect("the gateway speaks HTTP/2 with prior knowledge");
    (send, tokio::spawn(conn))
}

/// A Messages request for an HTTP/2 connection to the gateway.
fn h2_message(gw: &TestGateway, stream: bool) -> http::Request<http_body_util::Full<Bytes>> {
    http::Request::post(format!("http://{}{MESSAGES}", gw.addr))
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .body(http_body_util::Full::new(Bytes::from(message_bytes(
            stream,
        ))))
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_http2_prior_knowledge_is_served() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let (mut send, _conn) = h2_connect(&gw).await;
    let req = h2_message(&gw, false);
    let resp = within("an HTTP/2 answer", send.send_request(req))
        .await
        .expect("answer");
    assert_eq!(resp.status(), 200);
    let body = within(
        "the HTTP/2 body",
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await
    .expect("body")
    .to_bytes();
    let text = String::from_utf8_lossy(&body);
    // What matters is that the JSON answer arrived whole over HTTP/2.
    let v: Value = serde_json::from_str(&text).expect("a whole JSON answer");
    assert_eq!(v["type"], "message");
    assert_eq!(up.count(), 1);
    let got = up.last_request().expect("forwarded");
    assert!(
        got.header("host")
            .is_some_and(|h| h == up.addr().to_string()),
        "the upstream request carries the upstream's host: {:?}",
        got.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_absolute_form_target_never_chooses_the_upstream() {
    let up = MockUpstream::start().await;
    let decoy = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let decoy_host = decoy.addr().to_string();
    for target in [
        format!("http://{decoy_host}/v1/messages"),
        "http://other.host/v1/messages".to_owned(),
        format!("https://{decoy_host}/v1/messages?beta=true"),
    ] {
        let host = format!("host: {decoy_host}");
        let mut req =
            format!("POST {target} HTTP/1.1\r\n{host}\r\nconnection: close\r\n").into_bytes();
        let body = message_bytes(false);
        req.extend_from_slice(
            format!(
                "content-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        req.extend_from_slice(&body);
        let before = up.count();
        let r = raw(&gw, &req).await.expect("an answer");
        eprintln!("absolute form {target}: {}", r.status);
        match r.status {
            200 => {
                assert_eq!(up.count(), before + 1);
                let got = up.last_request().expect("forwarded");
                assert_eq!(got.path(), MESSAGES, "{target}");
                assert_eq!(
                    got.header("host"),
                    Some(up.addr().to_string().as_str()),
                    "{target}: the upstream sees its own host"
                );
            }
            400 => assert_eq!(up.count(), before),
            other => panic!("{target}: unexpected {other}: {r:?}"),
        }
    }
    assert_eq!(decoy.count(), 0, "the client's host is never contacted");
}

/// Without an access token, only the loopback listener guards the gateway: a browser page from
/// another site cannot use it, neither by DNS rebinding (a `Host` that is not a loopback name)
/// nor by making the browser post to it (an `Origin` that is not one), on the API and on the
/// admin views. Pages from localhost and clients that are not browsers pass; with a token, the
/// token decides (audit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_from_other_sites_cannot_use_a_gateway_without_a_token() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let body = message_bytes(false);
    let send = |gw: &TestGateway, method: &str, path: &str, host: &str, extra: Vec<String>| {
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
        for h in extra {
            req.push_str(&h);
            req.push_str("\r\n");
        }
        let body = if method == "POST" {
            body.clone()
        } else {
            Vec::new()
        };
        req.push_str(&format!(
            "content-type: text/plain\r\ncontent-length: {}\r\n\r\n",
            body.len()
        ));
        let mut req = req.into_bytes();
        req.extend_from_slice(&body);
        let gw_addr = gw.addr;
        async move {
            let mut tcp = TcpStream::connect(gw_addr).await.expect("connect");
            tcp.write_all(&req).await.expect("write");
            let mut buf = Vec::new();
            read_response(&mut tcp, &mut buf).await.expect("an answer")
        }
    };
    let port = gw.addr.port();
    let refused = [
        ("POST", MESSAGES, format!("evil.example:{port}"), vec![]),
        (
            "GET",
            "/_ccgate/endpoints",
            format!("evil.example:{port}"),
            vec![],
        ),
        (
            "POST",
            MESSAGES,
            format!("127.0.0.1:{port}"),
            vec!["origin: https://evil.example".to_owned()],
        ),
        (
            "POST",
            "/_ccgate/endpoints/a/disable",
            format!("127.0.0.1:{port}"),
            vec!["origin: null".to_owned()],
        ),
    ];
    for (method, path, host, extra) in refused {
        let r = send(&gw, method, path, &host, extra.clone()).await;
        assert_eq!(
            r.status, 403,
            "{method} {path} host {host} {extra:?}: {r:?}"
        );
        assert_eq!(
            assert_anthropic_error(&r.body)["error"]["type"],
            "permission_error"
        );
    }
    assert_eq!(up.count(), 0, "nothing reached the upstream");
    assert_eq!(gw.endpoint_view("a").await["state"], "healthy");

    let allowed = [
        (format!("127.0.0.1:{port}"), vec![]),
        (
            format!("localhost:{port}"),
            vec!["origin: http://localhost:3000".to_owned()],
        ),
        (
            format!("[::1]:{port}"),
            vec!["origin: http://127.0.0.1:8080".to_owned()],
        ),
    ];
    for (host, extra) in allowed {
        let r = send(&gw, "POST", MESSAGES, &host, extra.clone()).await;
        assert_eq!(r.status, 200, "host {host} {extra:?}: {r:?}");
    }
    assert_eq!(up.count(), 3);

    // With a token, the token decides: a request that carries it passes whatever its names.
    let up = MockUpstream::start().await;
    let gw = builder()
        .server("access_token = \"gate-token-sites\"")
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    let with_token = vec![
        "x-api-key: gate-token-sites".to_owned(),
        "origin: https://chat.example".to_owned(),
    ];
    let r = send(&gw, "POST", MESSAGES, "gateway.example", with_token).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = send(&gw, "POST", MESSAGES, "gateway.example", vec![]).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(up.count(), 1);
}

/// Admin views under a token, reached by path tricks.
const TRICKS: [&str; 14] = [
    "/_CCGATE/endpoints",
    "/_Ccgate/stats",
    "/_ccgate/../_ccgate/endpoints",
    "/_ccgate/./endpoints",
    "/_ccgate//endpoints",
    "//_ccgate/endpoints",
    "/_ccgate%2fendpoints",
    "/_ccgate%2Fendpoints",
    "/%5Fccgate/endpoints",
    "/%5fccgate%2fstats",
    "/v1/../_ccgate/endpoints",
    "/./_ccgate/stats",
    "/_ccgate/endpoints/",
    "/_ccgate/%2e%2e/_ccgate/stats",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_admin_prefix_tricks_reach_no_admin_view_and_leak_no_token() {
    const TOKEN: &str = "gate-token-hostile-42";
    let up = MockUpstream::start().await;
    let gw = builder()
        .server(&format!("access_token = \"{TOKEN}\""))
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    let looks_admin = |r: &Raw| {
        r.status == 200
            && serde_json::from_slice::<Value>(&r.body)
                .is_ok_and(|v| v.get("endpoints").is_some() || v.get("total_requests").is_some())
    };
    // Without the token: no admin view, nothing forwarded.
    for path in TRICKS {
        let r = raw(&gw, &raw_request("GET", path, &[], b""))
            .await
            .expect("an answer");
        assert!(!looks_admin(&r), "{path} without the token: {r:?}");
        assert_ne!(r.status, 200, "{path} without the token: {r:?}");
        assert!(!r.text().contains("key-a"), "{path}");
    }
    assert_eq!(up.count(), 0, "nothing forwarded without the token");
    // With the token: an admin view or a forwarded request, but the token never goes upstream.
    let auth = format!("x-api-key: {TOKEN}");
    let bearer = format!("authorization: Bearer {TOKEN}");
    for path in TRICKS {
        for h in [&auth, &bearer] {
            let r = raw(&gw, &raw_request("GET", path, &[h], b""))
                .await
                .expect("an answer");
            eprintln!("{path} with the token: {}", r.status);
        }
    }
    assert_eq!(
        up.count(),
        0,
        "the admin prefix in disguise is never forwarded: {:?}",
        up.received()
            .iter()
            .map(|r| r.path_and_query.clone())
            .collect::<Vec<_>>()
    );
    for got in up.received() {
        assert!(!got.path_and_query.contains(TOKEN));
        for (name, value) in &got.headers {
            assert!(
                !value.contains(TOKEN),
                "token forwarded upstream in {name} for {}",
                got.path_and_query
            );
        }
    }
    eprintln!(
        "forwarded with the token: {:?}",
        up.received()
            .iter()
            .map(|r| r.path_and_query.clone())
            .collect::<Vec<_>>()
    );
}

/// `METHOD TARGET` answered locally with `status`, counted against no endpoint nor in the
/// gateway's totals; the answer.
async fn answered_locally(method: &str, target: &str, status: u16) -> Raw {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let r = raw(&gw, &raw_request(method, target, &[], b"")).await;
    let forwarded = up.received();
    let r = r.unwrap_or_else(|| {
        panic!(
            "{method} {target}: the connection ended without an answer; upstream saw {:?}",
            forwarded
                .iter()
                .map(|q| format!("{} {}", q.method, q.path_and_query))
                .collect::<Vec<_>>()
        )
    });
    assert_eq!(
        r.status,
        status,
        "{method} {target}: {r:?}; upstream saw {:?}",
        forwarded
            .iter()
            .map(|q| format!("{} {}", q.method, q.path_and_query))
            .collect::<Vec<_>>()
    );
    assert_anthropic_error(&r.body);
    assert_eq!(up.count(), 0, "{method} {target} forwarded");
    assert_eq!(counts(&gw, "a").await, (0, 0, 0));
    let s = gw.admin("stats").await;
    assert_eq!(n(&s, "total_requests"), 0, "refused at the door: {s}");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_trace_is_405_locally() {
    let r = answered_locally("TRACE", MESSAGES, 405).await;
    let allow = r.header("allow").expect("Allow on a 405");
    assert!(
        allow.contains("POST") && !allow.contains("TRACE"),
        "{allow}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_unused_methods_are_405_locally() {
    for method in ["PUT", "PATCH", "PROPFIND", "FOO"] {
        let r = answered_locally(method, MESSAGES, 405).await;
        assert!(r.header("allow").is_some(), "{method}: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connect_is_405_locally() {
    let up = MockUpstream::start().await;
    let target = up.addr().to_string();
    answered_locally("CONNECT", &target, 405).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_asterisk_target_is_400_locally() {
    answered_locally("POST", "*", 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_path_climbing_above_the_root_is_400_locally() {
    answered_locally("GET", "/v1/../../admin", 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_encoded_dot_segments_climbing_above_the_root_are_400_locally() {
    answered_locally("GET", "/v1/%2e%2e/%2E%2E/admin", 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_encoded_slashes_in_a_path_are_400_locally() {
    answered_locally("GET", "/v1/models%2F..%2F..%2Fadmin", 400).await;
    answered_locally("POST", "/v1/messages%5c..", 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_dot_segments_are_removed_before_forwarding() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let body = message_bytes(false);
    for target in [
        "/v1/x/../messages?beta=true",
        "/v1/./%2E%2e/v1//messages?beta=true",
    ] {
        let r = raw(&gw, &raw_request("POST", target, &[], &body))
            .await
            .expect("an answer");
        assert_eq!(r.status, 200, "{target}: {r:?}");
        let got = up.last_request().expect("forwarded");
        assert_eq!(got.path_and_query, "/v1/messages?beta=true", "{target}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_paths_outside_the_api_get_a_local_404() {
    for target in [
        "/",
        "/favicon.ico",
        "/v2/messages",
        "/admin",
        "/api",
        "/metrics/x",
    ] {
        let r = answered_locally("GET", target, 404).await;
        let v = assert_anthropic_error(&r.body);
        assert_eq!(v["error"]["type"], "not_found_error", "{target}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_api_and_claude_code_paths_are_forwarded() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    for (method, path) in [
        (Method::GET, "/v1/models"),
        (Method::POST, "/v1/messages/count_tokens"),
        (Method::POST, "/api/event_logging/batch"),
        (Method::DELETE, "/v1/files/file_1"),
    ] {
        let a = gw
            .request(method.clone(), path, &[], Bytes::from_static(b"{}"))
            .await;
        assert_eq!(a.status, 200, "{method} {path}: {}", a.text());
        let got = up.last_request().expect("forwarded");
        assert_eq!((got.method.as_str(), got.path()), (method.as_str(), path));
    }
    assert_eq!(up.count(), 4);
    assert_eq!(counts(&gw, "a").await, (4, 4, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_501_is_the_callers_error_not_the_endpoints() {
    let up = MockUpstream::start().await;
    up.set_default(Script::error(501, "api_error", "not implemented"));
    let gw = builder()
        .health("failure_threshold = 2")
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    for _ in 0..4 {
        let a = gw
            .request(Method::OPTIONS, MESSAGES, &[], Bytes::new())
            .await;
        assert_eq!(a.status, 501, "{}", a.text());
    }
    assert_eq!(up.count(), 4, "each request tried once, never failed over");
    let v = gw.endpoint_view("a").await;
    assert_eq!(n(&v, "endpoint_errors"), 0, "{v}");
    assert_eq!(n(&v, "caller_errors"), 4, "{v}");
    assert_eq!(v["state"], "healthy", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_aborting_its_upload_is_cancelled() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let mut tcp = TcpStream::connect(gw.addr).await.expect("connect");
    tcp.write_all(b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"model\":")
        .await
        .expect("write");
    // The gateway has begun the request once it shows in the stats.
    support::wait::eventually("the upload to be seen", || async {
        n(&gw.admin("stats").await, "total_requests") == 1
    })
    .await;
    drop(tcp);
    support::wait::eventually("the request to end", || async {
        n(&gw.admin("stats").await, "in_flight") == 0
    })
    .await;
    let s = gw.admin("stats").await;
    assert_eq!(n(&s, "cancelled"), 1, "{s}");
    assert_eq!(n(&s, "caller_errors"), 0, "{s}");
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_malformed_chunked_body_is_the_callers_error_not_cancelled() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let req = b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"a\"\r\nzz\r\n";
    let mut tcp = TcpStream::connect(gw.addr).await.expect("connect");
    tcp.write_all(req).await.expect("write");
    let mut buf = Vec::new();
    let r = read_response(&mut tcp, &mut buf).await;
    eprintln!("malformed chunk: {r:?}");
    support::wait::eventually("the request to end", || async {
        let s = gw.admin("stats").await;
        n(&s, "total_requests") == 1 && n(&s, "in_flight") == 0
    })
    .await;
    let s = gw.admin("stats").await;
    assert_eq!(n(&s, "caller_errors"), 1, "{s}");
    assert_eq!(n(&s, "cancelled"), 0, "{s}");
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_bearer_scheme_is_case_insensitive() {
    const TOKEN: &str = "gate-token-case";
    let up = MockUpstream::start().await;
    let gw = builder()
        .server(&format!("access_token = \"{TOKEN}\""))
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let h = format!("{scheme} {TOKEN}");
        let a = gw
            .post(
                MESSAGES,
                &[("authorization", &h)],
                &TestGateway::message_body(false),
            )
            .await;
        assert_eq!(a.status, 200, "{scheme}: {}", a.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_wrong_method_on_an_admin_path_is_405_with_allow() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let a = gw
        .request(Method::GET, "/_ccgate/endpoints/a/probe", &[], Bytes::new())
        .await;
    assert_eq!(a.status, 405, "{}", a.text());
    assert!(
        a.header("allow").is_some_and(|v| v.contains("POST")),
        "{:?}",
        a.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_metrics_at_the_root_is_served_locally() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let a = gw.request(Method::GET, "/metrics", &[], Bytes::new()).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(a.text().contains("# TYPE"), "{}", a.text());
    assert_eq!(up.count(), 0, "forwarded upstream");
    assert_eq!(counts(&gw, "a").await, (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_metrics_at_the_root_needs_the_access_token() {
    const TOKEN: &str = "gate-token-metrics";
    let up = MockUpstream::start().await;
    let gw = builder()
        .server(&format!("access_token = \"{TOKEN}\""))
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    let a = gw.request(Method::GET, "/metrics", &[], Bytes::new()).await;
    assert_eq!(a.status, 401, "{}", a.text());
    let bearer = format!("Bearer {TOKEN}");
    let a = gw
        .request(
            Method::GET,
            "/metrics",
            &[("authorization", &bearer)],
            Bytes::new(),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(up.count(), 0, "forwarded upstream");
}

// ---------------------------------------------------------------------------------------------
// Hostile upstreams
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_garbage_sse_before_content_fails_over() {
    let a = MockUpstream::start().await;
    a.set_default(Script::sse_events(vec![
        SseEvent::message_start(),
        SseEvent::raw(&b"\x00\xff\xfe\x01binary garbage\n\n"[..]),
        SseEvent::raw("event: nonsense\ndata: {not json\n\n"),
        SseEvent::raw("data: \x7f\x7f\x7f\n\n"),
        SseEvent::message_stop(),
    ]));
    let (b, gw) = a_then_b(builder(), &a.url()).await;
    let ans = post_stream(&gw, &[]).await;
    assert_clean_stream(&ans);
    assert!(!ans.text().contains("garbage"), "{}", ans.text());
    assert_eq!(b.count(), 1, "B served");
    assert_eq!(counts(&gw, "a").await, (1, 0, 1));
    assert_eq!(counts(&gw, "b").await, (1, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_endless_ping_preamble_is_capped() {
    let a = MockUpstream::start().await;
    // About 8.5 MB and 256,000 pings without content, then the upstream holds the stream open.
    let batch: String =
        std::iter::repeat_n("event: ping\ndata: {\"type\": \"ping\"}\n\n", 1000).collect();
    let mut events = vec![SseEvent::message_start()];
    events.extend(std::iter::repeat_n(SseEvent::raw(batch), 256));
    let hold = Gate::new();
    a.set_default(Script::sse_events(events).gate_after(257, hold.clone()));
    let (b, gw) = a_then_b(builder().timeouts("idle = \"60s\""), &a.url()).await;
    // Past the cap the gateway either fails over (a whole answer from B) or commits A's stream
    // (its first bytes arrive); it never holds the client while the preamble grows.
    let resp = gw
        .send(
            Method::POST,
            MESSAGES,
            &[("content-type", "application/json")],
            Bytes::from(message_bytes(true)),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = within(
        "the first bytes of the answer",
        http_body_util::BodyExt::frame(&mut body),
    )
    .await
    .expect("a frame")
    .expect("not broken");
    assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
    hold.open();
    // ccgate fails over past the cap: the answer is B's whole stream, A's attempt a failure.
    let mut text = String::from_utf8_lossy(first.data_ref().expect("data")).into_owned();
    let rest = within(
        "the rest of the answer",
        http_body_util::BodyExt::collect(body),
    )
    .await
    .expect("not broken")
    .to_bytes();
    text.push_str(&String::from_utf8_lossy(&rest));
    assert!(text.starts_with("event: message_start"), "{text:?}");
    assert!(text.contains("event: message_stop"), "{text:?}");
    // A's pings (written with a space after the colon) never reach the client.
    assert!(
        !text.contains("{\"type\": \"ping\"}"),
        "A's preamble leaked"
    );
    assert_eq!(b.count(), 1);
    assert_eq!(counts(&gw, "a").await, (1, 0, 1));
}

/// `data` gzip-compressed with stored (uncompressed) deflate blocks: a valid gzip member any
/// decoder reads, built without a compression library.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let chunks: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(65535).collect()
    };
    for (i, c) in chunks.iter().enumerate() {
        out.push(u8::from(i + 1 == chunks.len()));
        let len = c.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(c);
    }
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    out.extend_from_slice(&(!crc).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_gzip_sse_with_an_early_error_event_fails_over() {
    let a = MockUpstream::start().await;
    // Compressed only when the request allows it, as a real upstream does; a gateway that asks
    // for identity gets the same events plain.
    a.set_default_fn(|req| {
        let events = [
            SseEvent::message_start(),
            SseEvent::error("overloaded_error", "Overloaded"),
        ];
        let plain: Vec<u8> = events.iter().flat_map(|e| e.as_bytes().to_vec()).collect();
        let gzip = req
            .header("accept-encoding")
            .is_some_and(|v| v.contains("gzip"));
        if gzip {
            Script::sse_events(vec![SseEvent::raw(gzip_stored(&plain))])
                .header("content-encoding", "gzip")
        } else {
            Script::sse_events(events.to_vec())
        }
    });
    let (b, gw) = a_then_b(builder(), &a.url()).await;
    let ans = post_stream(&gw, &[("accept-encoding", "gzip, deflate, br, zstd")]).await;
    assert_eq!(
        b.count(),
        1,
        "B was tried: {:?} {:?}",
        ans.status,
        ans.headers
    );
    assert_eq!(ans.header("content-encoding"), None);
    assert_clean_stream(&ans);
    let (_, ok, failed) = counts(&gw, "a").await;
    assert_eq!((ok, failed), (0, 1), "A's error event is A's failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_html_200_to_a_stream_request_fails_over() {
    let a = MockUpstream::start().await;
    a.set_default(Script::response(
        200,
        "text/html; charset=utf-8",
        "<html><body>Please log in</body></html>",
    ));
    let (b, gw) = a_then_b(builder(), &a.url()).await;
    let ans = post_stream(&gw, &[]).await;
    assert_clean_stream(&ans);
    assert_eq!(b.count(), 1);
    assert_eq!(counts(&gw, "a").await, (1, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_huge_response_header_fails_over() {
    let a = MockUpstream::start().await;
    a.set_default(Script::json_ok().header("x-huge", &"h".repeat(120 * 1024)));
    let (b, gw) = a_then_b(builder(), &a.url()).await;
    let ans = gw.post_message(false).await;
    assert!(
        ans.header("x-huge").is_none(),
        "the huge header reached the client"
    );
    assert_json_from_b(&ans);
    assert_eq!(b.count(), 1);
    assert_eq!(counts(&gw, "a").await, (1, 0, 1));
}

/// A status that answers no request (an unasked-for `101 Switching Protocols`, a status beyond
/// 599) is the endpoint's fault and fails over; relayed, a 101 broke the client's connection
/// (audit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_status_that_is_no_answer_fails_over() {
    for status in [101, 600, 999] {
        json_request_fails_over_from(Script::response(status, "application/json", "{}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_200_with_invalid_json_fails_over() {
    json_request_fails_over_from(Script::response(
        200,
        "application/json",
        "{\"id\": \"msg_x\", \"type\": \"message\", \"content\": [ {\"type\": \"te",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_accepts_tcp_and_never_answers_times_out_and_fails_over() {
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_url = format!("http://{}", silent.local_addr().expect("addr"));
    // Accepts and holds every connection, never reading or writing a byte.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let (b, gw) = a_then_b(builder().timeouts("first_byte = \"500ms\""), &silent_url).await;
    let ans = gw.post_message(false).await;
    assert_json_from_b(&ans);
    let ans = post_stream(&gw, &[]).await;
    assert_clean_stream(&ans);
    assert_eq!(b.count(), 2);
    let v = gw.endpoint_view("a").await;
    assert_eq!(n(&v, "total_requests"), 2, "{v}");
    assert_eq!(n(&v["outcomes"], "timeout"), 2, "{v}");
    assert_eq!(counts(&gw, "b").await, (2, 2, 0));
    holder.abort();
}

/// A TLS endpoint that accepts the connection and never finishes the handshake is a connect
/// failure within `connect`, not a wait for the first byte (audit: the handshake had no deadline,
/// and each attempt waited `first_byte`, 300 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_handshake_that_never_ends_is_cut_by_the_connect_timeout() {
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_url = format!("https://{}", silent.local_addr().expect("addr"));
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    // A first-byte timeout far past the answer deadline (20 s): only `connect` can end it.
    let gb = builder()
        .timeouts("connect = \"300ms\"")
        .timeouts("first_byte = \"120s\"");
    let (b, gw) = a_then_b(gb, &silent_url).await;
    let ans = gw.post_message(false).await;
    assert_json_from_b(&ans);
    let v = gw.endpoint_view("a").await;
    assert_eq!(n(&v["outcomes"], "timeout"), 1, "{v}");
    let message = v["last_error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("connect"), "{v}");
    assert_eq!(b.count(), 1);
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_400_echoing_the_key_is_scrubbed() {
    const SECRET: &str = "sk-ant-hostile-secret-0123456789";
    let a = MockUpstream::start().await;
    a.set_default(
        Script::error(
            400,
            "invalid_request_error",
            &format!("invalid request for key {SECRET}"),
        )
        .header("x-echoed-key", SECRET),
    );
    let gw = builder()
        .endpoint("a", &a.url(), &format!("api_key = \"{SECRET}\""))
        .start()
        .await;
    let ans = gw.post_message(false).await;
    assert_eq!(ans.status, 400, "{}", ans.text());
    assert_anthropic_error(&ans.body);
    let in_body = ans.text().contains(SECRET);
    let in_headers: Vec<String> = ans
        .headers
        .iter()
        .filter(|(_, v)| String::from_utf8_lossy(v.as_bytes()).contains(SECRET))
        .map(|(k, _)| k.to_string())
        .collect();
    assert!(
        !in_body && in_headers.is_empty(),
        "key in the body: {in_body}; in headers: {in_headers:?}; body {}",
        ans.text()
    );
}

/// A stream's `error` event after content, echoing the endpoint's key, reaches the client with the
/// key scrubbed, as an error answer does (audit, SPEC §10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_event_after_content_echoing_the_key_is_scrubbed() {
    const SECRET: &str = "sk-ant-hostile-secret-0123456789";
    let a = MockUpstream::start().await;
    let mut whole = SseEvent::message_stream(2);
    whole.truncate(4);
    whole.push(SseEvent::error(
        "overloaded_error",
        &format!("key {SECRET} overloaded"),
    ));
    // The same event again, in three writes 30 ms apart: the key lies across two of them, and
    // the blank line that ends the event comes last.
    let mut split = whole.clone();
    let event = split.pop().expect("the error event");
    let bytes = event.as_bytes();
    let at = bytes
        .windows(SECRET.len())
        .position(|w| w == SECRET.as_bytes())
        .expect("the key in the event")
        + 10;
    let end = bytes.len() - 2;
    split.extend([
        SseEvent::raw(bytes[..at].to_vec()),
        SseEvent::raw(bytes[at..end].to_vec()),
        SseEvent::raw(bytes[end..].to_vec()),
    ]);
    a.push(Script::sse_events(whole));
    a.push(Script::sse_events(split).pacing(std::time::Duration::from_millis(30)));
    let gw = builder()
        .endpoint("a", &a.url(), &format!("api_key = \"{SECRET}\""))
        .start()
        .await;
    for how in ["in one write", "in three writes"] {
        let ans = gw.post_message(true).await;
        assert_eq!(ans.status, 200, "{how}: {}", ans.text());
        let text = ans.text();
        assert!(
            !text.contains(SECRET),
            "{how}: the key reached the client: {text}"
        );
        assert!(
            text.contains("event: error") && text.contains("key *** overloaded"),
            "{how}: the error event is relayed, scrubbed: {text}"
        );
    }
}

/// A request body the client compressed cannot be read for `stream`: the upstream's stream is
/// relayed as it comes, not failed over as "not the JSON that was asked for" and blamed on the
/// endpoint (audit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_compressed_request_body_is_relayed_unjudged() {
    let a = MockUpstream::start().await;
    a.set_default(Script::sse_ok(2));
    let gw = builder().endpoint("a", &a.url(), "").start().await;
    let body = gzip_stored(&message_bytes(true));
    let ans = gw
        .request(
            Method::POST,
            MESSAGES,
            &[
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            body.clone(),
        )
        .await;
    assert_eq!(ans.status, 200, "{}", ans.text());
    assert!(ans.text().contains("message_stop"), "{}", ans.text());
    let got = a.last_request().expect("forwarded");
    assert_eq!(got.header("content-encoding"), Some("gzip"));
    assert_eq!(got.body, body, "the body goes as it came");
    gw.settle().await;
    assert_eq!(counts(&gw, "a").await, (1, 1, 0));
}

#[test]
fn gzip_helper_is_valid() {
    // A known vector: gzip of "" with stored blocks ends with CRC 0 and size 0.
    let z = gzip_stored(b"");
    assert_eq!(&z[z.len() - 8..], &[0, 0, 0, 0, 0, 0, 0, 0]);
    // CRC-32 of "123456789" is 0xCBF43926.
    let z = gzip_stored(b"123456789");
    assert_eq!(&z[z.len() - 8..z.len() - 4], &0xcbf4_3926u32.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// Connection limits
// ---------------------------------------------------------------------------------------------

/// `GET /_ccgate/health` on `tcp`, keeping the connection open; whether it was answered 200.
async fn health_on(tcp: &mut TcpStream) -> bool {
    if tcp
        .write_all(b"GET /_ccgate/health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    read_response(tcp, &mut buf)
        .await
        .is_some_and(|r| r.status == 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_keeps_at_most_max_idle_upstream_connections_per_worker() {
    let up = MockUpstream::start().await;
    let gate = Gate::new();
    up.push_n(
        Script::sse_events(SseEvent::message_stream(2)).gate_after(3, gate.clone()),
        6,
    );
    let gw = builder()
        .server("workers = 1")
        .server("max_idle_upstream = 2")
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    let gw = std::sync::Arc::new(gw);
    let streams: Vec<_> = (0..6)
        .map(|_| {
            let gw = std::sync::Arc::clone(&gw);
            tokio::spawn(async move { post_stream(&gw, &[]).await })
        })
        .collect();
    // Six streams run at once, each on its own upstream connection.
    gate.wait_arrived(6).await;
    assert_eq!(up.connections_accepted(), 6);
    gate.open();
    for s in streams {
        assert_clean_stream(&s.await.expect("stream task"));
    }
    // Back in the pool, two stay; the other four are closed.
    support::wait::eventually("four idle connections closed", || async {
        up.connections_ended() == 4
    })
    .await;
    let ep = gw.gateway.registry.by_name("a").expect("endpoint a");
    assert_eq!(ep.client.idle_connections(), 2);
    assert_eq!(up.connections_ended(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_closes_connections_past_max_connections() {
    let up = MockUpstream::start().await;
    let gw = builder()
        .server("max_connections = 2")
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    let mut c1 = TcpStream::connect(gw.addr).await.expect("connect");
    let mut c2 = TcpStream::connect(gw.addr).await.expect("connect");
    assert!(health_on(&mut c1).await, "first connection served");
    assert!(health_on(&mut c2).await, "second connection served");
    // Both stay open (keep-alive): a third is accepted and closed without an answer.
    let mut c3 = TcpStream::connect(gw.addr).await.expect("connect");
    assert!(!health_on(&mut c3).await, "a third connection is closed");
    assert!(
        health_on(&mut c2).await,
        "open connections keep being served"
    );
    // One ends: a new connection is served again.
    drop(c1);
    support::wait::eventually("a new connection served", || async {
        match TcpStream::connect(gw.addr).await {
            Ok(mut c) => health_on(&mut c).await,
            Err(_) => false,
        }
    })
    .await;
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_trickling_its_head_is_cut_by_the_header_read_timeout() {
    // On a listener reachable from other machines the deadline is on by default (60 s); the
    // knob arms the same mechanism on loopback.
    let up = MockUpstream::start().await;
    let gw = builder()
        .server("header_read_timeout = \"300ms\"")
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    let mut tcp = TcpStream::connect(gw.addr).await.expect("connect");
    let started = std::time::Instant::now();
    tcp.write_all(b"POST /v1/messages HTTP/1.1\r\n")
        .await
        .expect("write");
    // One byte every 50 ms: a slowloris client that never finishes its head.
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    let trickle = b"x-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut sent = 0;
    let mut chunk = [0u8; 1024];
    within("the gateway to cut the slow client", async {
        loop {
            tokio::select! {
                read = tcp.read(&mut chunk) => {
                    // An error answer (408) or the connection's end.
                    if matches!(read, Ok(0) | Err(_)) { break; }
                }
                _ = tick.tick() => {
                    let b = trickle[sent % trickle.len()];
                    sent += 1;
                    if tcp.write_all(&[b]).await.is_err() { break; }
                }
            }
        }
    })
    .await;
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "cut before the deadline: {:?}",
        started.elapsed()
    );
    // A kept-alive connection that stays idle is closed by the same deadline.
    let mut idle = TcpStream::connect(gw.addr).await.expect("connect");
    assert!(health_on(&mut idle).await);
    within("the idle connection to be closed", async {
        let mut b = [0u8; 64];
        while !matches!(idle.read(&mut b).await, Ok(0) | Err(_)) {}
    })
    .await;
    assert_eq!(up.count(), 0);
}

/// The head deadline holds for HTTP/2 too: a connection that sends one byte of the HTTP/2
/// preface, or the whole preface, and then nothing is closed by it, and so is an HTTP/2
/// connection left idle after its requests, while one with a request open stays (audit: these
/// held a connection slot for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_http2_connections_are_held_to_the_head_deadline() {
    let up = MockUpstream::start().await;
    let gate = Gate::new();
    up.push(Script::sse_ok(2).gate_after(4, gate.clone()));
    let gw = builder()
        .server("header_read_timeout = \"300ms\"")
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    let closed = |mut tcp: TcpStream| async move {
        let mut b = [0u8; 256];
        while !matches!(tcp.read(&mut b).await, Ok(0) | Err(_)) {}
    };
    for opening in [&b"P"[..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"] {
        let mut tcp = TcpStream::connect(gw.addr).await.expect("connect");
        tcp.write_all(opening).await.expect("write");
        let started = std::time::Instant::now();
        within("the silent HTTP/2 connection to be closed", closed(tcp)).await;
        assert!(
            started.elapsed() >= std::time::Duration::from_millis(250),
            "closed before the deadline: {:?}",
            started.elapsed()
        );
    }

    // A real HTTP/2 client: a stream held open by the upstream keeps the connection past the
    // deadline; idle after it, the connection is closed.
    let (mut send, conn) = h2_connect(&gw).await;
    let req = h2_message(&gw, true);
    let resp = within("an HTTP/2 answer", send.send_request(req))
        .await
        .expect("answer");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // The first content has come; the stream waits on the gate for longer than the deadline.
    let first = within(
        "the first content",
        http_body_util::BodyExt::frame(&mut body),
    )
    .await
    .expect("a frame")
    .expect("data");
    assert!(first.data_ref().is_some());
    // A second connection, opened after it and left idle, is closed by its deadline: by then
    // the first has been open longer than the deadline, with its stream open.
    let (_idle_send, idle) = h2_connect(&gw).await;
    within("the idle HTTP/2 connection to be closed", idle)
        .await
        .expect("connection task")
        .expect("closed with a GOAWAY");
    assert!(!conn.is_finished(), "closed with a stream open");
    // Not even being closed: it still takes a new request (a GOAWAY would refuse it).
    let again = within(
        "a second request on it",
        send.send_request(h2_message(&gw, false)),
    )
    .await
    .expect("the connection still takes requests");
    assert_eq!(again.status(), 200);
    gate.open();
    let rest = within(
        "the rest of the stream",
        http_body_util::BodyExt::collect(body),
    )
    .await
    .expect("the stream ends cleanly")
    .to_bytes();
    assert!(String::from_utf8_lossy(&rest).contains("message_stop"));
    // Closed with a GOAWAY: the client's connection ends cleanly, not as a broken one.
    let ended = within("the idle HTTP/2 connection to be closed", conn)
        .await
        .expect("connection task");
    assert!(ended.is_ok(), "closed without a GOAWAY: {ended:?}");
    assert_eq!(up.count(), 2);
}

// ---------------------------------------------------------------------------------------------
// Judging an answer before committing to it (issue #12 items 1–2, issue #17 items 2–4)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_json_cut_mid_body_fails_over() {
    let a = MockUpstream::start().await;
    a.set_default(Script::json_ok().cut_body_after(40));
    let (b, gw) = a_then_b(builder(), &a.url()).await;
    let ans = gw.post_message(false).await;
    assert_json_from_b(&ans);
    assert_eq!(b.count(), 1);
    let v = gw.endpoint_view("a").await;
    assert_eq!(n(&v["outcomes"], "transport"), 1, "{v}");
    assert_eq!(counts(&gw, "a").await, (1, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_json_stalling_mid_body_times_out_and_fails_over() {
    let a = MockUpstream::start().await;
    a.set_default(Script::json_ok().stall_body_after(40));
    let (b, gw) = a_then_b(builder().timeouts("idle = \"300ms\""), &a.url()).await;
    let ans = gw.post_message(false).await;
    assert_json_from_b(&ans);
    assert_eq!(b.count(), 1);
    let v = gw.endpoint_view("a").await;
    assert_eq!(n(&v["outcomes"], "timeout"), 1, "{v}");
    assert_eq!(counts(&gw, "a").await, (1, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_json_over_the_judging_cap_is_relayed_as_it_comes() {
    let a = MockUpstream::start().await;
    let big = "x".repeat(4000);
    a.set_default(Script::json(
        200,
        &support::mock::anthropic_message(MOCK_MODEL, &big, 10, 5),
    ));
    let (b, gw) = a_then_b(builder().table("relay", "max_json_bytes = 1024"), &a.url()).await;
    let ans = gw.post_message(false).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.json()["content"][0]["text"], big.as_str());
    assert_eq!(b.count(), 0);
    assert_eq!(counts(&gw, "a").await, (1, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_html_200_to_a_json_request_fails_over() {
    json_request_fails_over_from(Script::response(
        200,
        "text/html; charset=utf-8",
        "<html><body>Please log in</body></html>",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_json_answer_to_a_stream_request_fails_over() {
    let a = MockUpstream::start().await;
    a.set_default(Script::json_ok());
    let (b, gw) = a_then_b(builder(), &a.url()).await;
    let ans = post_stream(&gw, &[]).await;
    assert_clean_stream(&ans);
    assert_eq!(b.count(), 1);
    assert_eq!(counts(&gw, "a").await, (1, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_gzip_sse_despite_identity_fails_over() {
    let a = MockUpstream::start().await;
    let plain: Vec<u8> = SseEvent::message_stream(2)
        .iter()
        .flat_map(|e| e.as_bytes().to_vec())
        .collect();
    // An upstream that compresses whatever it is asked.
    a.set_default(
        Script::sse_events(vec![SseEvent::raw(gzip_stored(&plain))])
            .header("content-encoding", "gzip"),
    );
    let (b, gw) = a_then_b(builder(), &a.url()).await;
    let ans = post_stream(&gw, &[("accept-encoding", "gzip, deflate, br, zstd")]).await;
    assert_clean_stream(&ans);
    assert_eq!(ans.header("content-encoding"), None);
    assert_eq!(b.count(), 1);
    let asked = a.last_request().expect("A was asked");
    assert_eq!(asked.header("accept-encoding"), Some("identity"));
    assert_eq!(counts(&gw, "a").await, (1, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_unknown_event_after_content_is_relayed() {
    let a = MockUpstream::start().await;
    let mut events = SseEvent::message_stream(2);
    events.insert(
        4,
        SseEvent::raw("event: brand_new\ndata: {\"type\":\"brand_new\"}\n\n"),
    );
    a.set_default(Script::sse_events(events));
    let (b, gw) = a_then_b(builder(), &a.url()).await;
    let ans = post_stream(&gw, &[]).await;
    assert_eq!(ans.status, 200);
    let text = ans.text();
    assert!(text.contains("event: brand_new"), "{text:?}");
    assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    assert_eq!(b.count(), 0);
    assert_eq!(counts(&gw, "a").await, (1, 1, 0));
}

/// Asserts a stream answer that ends with ccgate's `error` event on a fresh event boundary, and
/// returns the bytes before that event.
#[track_caller]
fn assert_ends_with_error_event_on_a_boundary(ans: &Answer) -> Vec<u8> {
    assert_eq!(ans.status, 200, "{}", ans.text());
    let body = &ans.body[..];
    let at = body
        .windows(13)
        .rposition(|w| w == b"event: error\n")
        .unwrap_or_else(|| panic!("no error event: {:?}", ans.text()));
    let before = &body[..at];
    assert!(
        before.ends_with(b"\n\n"),
        "the error event does not start a fresh event: {:?}",
        String::from_utf8_lossy(body)
    );
    let event = std::str::from_utf8(&body[at..]).expect("the error event is UTF-8");
    assert!(event.ends_with("\n\n"), "{event:?}");
    let data = event
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("data line");
    assert_anthropic_error(data.as_bytes());
    before.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_stream_cut_inside_a_character_ends_with_an_error_event_on_a_fresh_boundary() {
    let a = MockUpstream::start().await;
    let half = b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"caf\xc3";
    a.set_default(
        Script::sse_events(vec![
            SseEvent::message_start(),
            SseEvent::content_block_start(),
            SseEvent::text_delta("Hello "),
            SseEvent::raw(&half[..]),
        ])
        .cut_after(4),
    );
    let (b, gw) = a_then_b(builder(), &a.url()).await;
    let ans = post_stream(&gw, &[]).await;
    let before = assert_ends_with_error_event_on_a_boundary(&ans);
    assert!(
        before.ends_with(b"\xc3\n\n"),
        "{:?}",
        String::from_utf8_lossy(&before)
    );
    assert_eq!(b.count(), 0, "content went out: no failover");
    assert_eq!(counts(&gw, "a").await, (1, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_stream_ending_cleanly_without_message_stop_ends_with_an_error_event() {
    let a = MockUpstream::start().await;
    let (_b, gw) = a_then_b(builder(), &a.url()).await;
    // Mid-line, then at an event boundary: the error event always starts a fresh event, and
    // no empty event is added when none is needed.
    for (tail, fresh) in [
        (SseEvent::raw("data: {\"type\":\"content_bl"), false),
        (SseEvent::content_block_stop(), true),
    ] {
        a.set_default(Script::sse_events(vec![
            SseEvent::message_start(),
            SseEvent::content_block_start(),
            SseEvent::text_delta("Hello "),
            tail,
        ]));
        let ans = post_stream(&gw, &[]).await;
        let before = assert_ends_with_error_event_on_a_boundary(&ans);
        assert!(!before.ends_with(b"\n\n\n\n"), "{:?}", ans.text());
        assert_eq!(
            before.ends_with(b"content_bl\n\n"),
            !fresh,
            "{:?}",
            ans.text()
        );
    }
    assert_eq!(counts(&gw, "a").await, (2, 0, 2));
}

/// Member names spelled with JSON escapes are the same members to every parser, and so to
/// ccgate: a `"str\u0065am": true` request expects a stream (audit: it expected JSON, so every
/// endpoint's correct stream was a failure, and three such requests ejected them all), and a
/// `"mod\u0065l"` is routed by its model (audit: it bypassed `models` and the local 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_member_names_are_read_as_parsers_read_them() {
    let up = MockUpstream::start().await;
    up.set_default(Script::sse_ok(2));
    let gw = GatewayBuilder::new()
        .health("failure_threshold = 1")
        .endpoint("a", &up.url(), "models = [\"claude-haiku-*\"]")
        .start()
        .await;
    let stream = r#"{"model":"claude-haiku-4-5","max_tokens":5,"messages":[],"str\u0065am":true}"#;
    for _ in 0..3 {
        let r = gw
            .request(
                Method::POST,
                "/v1/messages",
                &[("content-type", "application/json")],
                Bytes::from_static(stream.as_bytes()),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("message_stop"), "{}", r.text());
    }
    gw.settle().await;
    let v = gw.endpoint_view("a").await;
    assert_eq!(v["state"], "healthy", "{v}");
    assert_eq!(v["successful_requests"], 3, "{v}");

    let opus = r#"{"mod\u0065l":"claude-opus-4","max_tokens":5,"messages":[]}"#;
    let r = gw
        .request(
            Method::POST,
            "/v1/messages",
            &[("content-type", "application/json")],
            Bytes::from_static(opus.as_bytes()),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(up.count(), 3, "the unserved model reached no endpoint");
}

/// RFC 9112 §3.2: an HTTP/1.1 request without a `Host`, or any with two, is refused with 400 and
/// touches no endpoint; HTTP/1.0 may leave it out (audit: both were forwarded, and a loopback
/// `Host` first let a foreign second one through the browser check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_one_host_header_is_400_locally() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let body = message_bytes(false);
    let request = |version: &str, hosts: &[&str]| {
        let mut r = format!("POST {MESSAGES} {version}\r\nconnection: close\r\n");
        for h in hosts {
            r.push_str(&format!("host: {h}\r\n"));
        }
        r.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        ));
        let mut r = r.into_bytes();
        r.extend_from_slice(&body);
        r
    };
    for (version, hosts) in [
        ("HTTP/1.1", &[][..]),
        ("HTTP/1.1", &["127.0.0.1", "evil.example"][..]),
        ("HTTP/1.1", &["127.0.0.1", "127.0.0.1"][..]),
        ("HTTP/1.0", &["127.0.0.1", "evil.example"][..]),
    ] {
        let a = raw(&gw, &request(version, hosts)).await.expect("an answer");
        assert_eq!(a.status, 400, "{version} {hosts:?}");
        assert_anthropic_error(&a.body);
    }
    assert_eq!(up.count(), 0, "no endpoint touched");
    let a = raw(&gw, &request("HTTP/1.0", &[]))
        .await
        .expect("an answer");
    assert_eq!(a.status, 200, "HTTP/1.0 needs no Host");
    assert_eq!(up.count(), 1);
    still_serves(&gw).await;
    gw.shutdown().await;
}

/// An upstream that echoes the key percent-encoded (`-` as `%2D`, or every byte) leaks it neither
/// in a relayed error answer nor in a failover's message that the views show (audit: only the key
/// as written was scrubbed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_percent_encoded_echo_of_the_key_is_scrubbed() {
    // A relay's token with characters URL encoders do encode (`+/=`) beside ones they keep (`-`).
    const SECRET: &str = "rk-relay+token/0123456789==";
    let dashes = SECRET
        .replace('-', "%2D")
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D");
    let every: String = SECRET.bytes().map(|b| format!("%{b:02x}")).collect();
    // As `encodeURIComponent` writes it: `-` kept.
    let component = SECRET
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D");
    let said = format!("bad key {dashes} (as sent: {every}; in the URL: {component})");
    let a = MockUpstream::start().await;
    a.set_default(Script::error(400, "invalid_request_error", &said));
    let gw = builder()
        .endpoint("a", &a.url(), &format!("api_key = \"{SECRET}\""))
        .start()
        .await;
    let ans = gw.post_message(false).await;
    assert_eq!(ans.status, 400, "{}", ans.text());
    for form in [&dashes, &every, &component] {
        assert!(
            !ans.text().contains(form.as_str()),
            "{form}: {}",
            ans.text()
        );
    }
    assert!(ans.text().contains("bad key ***"), "{}", ans.text());

    // The same words in a failure the endpoint is blamed for: kept in its `last_error`.
    a.set_default(Script::error(500, "api_error", &said));
    let ans = gw.post_message(false).await;
    assert_eq!(ans.status, 502, "{}", ans.text());
    let view = gw.endpoint_view("a").await.to_string();
    for shown in [ans.text(), view] {
        for form in [&dashes, &every, &component] {
            assert!(!shown.contains(form.as_str()), "{form}: {shown}");
        }
    }
    gw.shutdown().await;
}
