//! Self-test of the mock upstream in `tests/support/mock.rs`, driven over raw TCP (and TLS) by a
//! tiny hand-written HTTP/1.1 client. ccgate itself is not involved.

mod support;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde_json::{Value, json};
use support::mock::{
    Gate, MOCK_MODEL, MockUpstream, Script, SseEvent, anthropic_error, anthropic_message,
    sse_delta_text, sse_ok_text,
};
use support::wait::within;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::rustls;

/// How long we listen for bytes that must NOT arrive (an absence check, not synchronisation).
const QUIET: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

/// Response head: status and headers.
#[derive(Debug)]
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A complete response.
#[derive(Debug)]
struct Response {
    head: Head,
    body: Bytes,
    /// For chunked responses: the chunks as received on the wire.
    chunks: Vec<Bytes>,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("response body is JSON")
    }
}

struct Client<S> {
    stream: S,
    buf: BytesMut,
}

impl Client<TcpStream> {
    async fn connect(up: &MockUpstream) -> Self {
        let stream = TcpStream::connect(up.addr())
            .await
            .expect("connect to mock");
        Self::new(stream)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(stream: S) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write request");
        self.stream.flush().await.expect("flush request");
    }

    /// Sends a request with a `content-length` body.
    async fn send(&mut self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut req = format!("{method} {target} HTTP/1.1\r\nHost: mock\r\n");
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.send_raw(&bytes).await;
    }

    async fn post(&mut self, body: &Value) {
        self.send(
            "POST",
            "/v1/messages?beta=true",
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        )
        .await;
    }

    async fn fill(&mut self) -> io::Result<()> {
        self.buf.reserve(8192);
        match self.stream.read_buf(&mut self.buf).await? {
            0 => Err(io::ErrorKind::UnexpectedEof.into()),
            _ => Ok(()),
        }
    }

    async fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(pos + 2);
                return Ok(String::from_utf8_lossy(&line[..pos]).into_owned());
            }
            self.fill().await?;
        }
    }

    async fn read_head(&mut self) -> io::Result<Head> {
        let status_line = self.read_line().await?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status line has a status code");
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
        let mut headers = Vec::new();
        loop {
            let line = self.read_line().await?;
            if line.is_empty() {
                return Ok(Head { status, headers });
            }
            let (n, v) = line.split_once(':').expect("header line has a colon");
            headers.push((n.to_owned(), v.trim().to_owned()));
        }
    }

    async fn read_exact_body(&mut self, n: usize) -> io::Result<Bytes> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(self.buf.split_to(n).freeze())
    }

    /// One chunk of a chunked body; `None` for the terminating chunk (trailers consumed).
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        let size_line = self.read_line().await?;
        let size = usize::from_str_radix(size_line.trim(), 16).expect("chunk size is hex");
        if size == 0 {
            while !self.read_line().await?.is_empty() {}
            return Ok(None);
        }
        let data = self.read_exact_body(size + 2).await?;
        assert_eq!(&data[size..], b"\r\n", "chunk ends with CRLF");
        Ok(Some(data.slice(..size)))
    }

    async fn read_response(&mut self) -> io::Result<Response> {
        let head = self.read_head().await?;
        let mut chunks = Vec::new();
        let body = if head
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            let mut body = BytesMut::new();
            while let Some(chunk) = self.read_chunk().await? {
                body.extend_from_slice(&chunk);
                chunks.push(chunk);
            }
            body.freeze()
        } else {
            let n = head
                .header("content-length")
                .map_or(0, |v| v.parse().expect("numeric content-length"));
            self.read_exact_body(n).await?
        };
        Ok(Response { head, body, chunks })
    }

    /// Reads until EOF; `Ok(bytes)` on a clean close, `Err` on a reset etc.
    async fn read_to_close(&mut self) -> io::Result<Bytes> {
        loop {
            self.buf.reserve(8192);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Ok(self.buf.split().freeze());
            }
        }
    }

    /// Asserts that nothing arrives for [`QUIET`].
    async fn assert_quiet(&mut self) {
        self.buf.reserve(8192);
        let read = timeout(QUIET, self.stream.read_buf(&mut self.buf)).await;
        assert!(
            read.is_err(),
            "expected silence, got {read:?} / {:?}",
            self.buf
        );
    }
}

/// Event name of one SSE chunk (`event: NAME\n...`).
fn event_name(chunk: &[u8]) -> String {
    let text = std::str::from_utf8(chunk).expect("event is UTF-8");
    assert!(
        text.ends_with("\n\n"),
        "one whole event per chunk: {text:?}"
    );
    text.lines()
        .find_map(|l| l.strip_prefix("event: "))
        .expect("event line")
        .to_owned()
}

/// Parsed `data:` of one SSE chunk.
fn event_data(chunk: &[u8]) -> Value {
    let text = std::str::from_utf8(chunk).expect("event is UTF-8");
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("data line");
    serde_json::from_str(data).expect("data is JSON")
}

fn standard_names(n: usize) -> Vec<String> {
    let mut names = vec!["message_start", "content_block_start", "ping"];
    names.extend(std::iter::repeat_n("content_block_delta", n));
    names.extend(["content_block_stop", "message_delta", "message_stop"]);
    names.into_iter().map(str::to_owned).collect()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn default_json_recording_and_keep_alive() {
    let up = MockUpstream::start().await;
    assert!(up.url().starts_with("http://127.0.0.1:"));
    assert_eq!(up.url(), format!("http://{}", up.addr()));

    let mut c = Client::connect(&up).await;
    c.send(
        "POST",
        "/v1/messages?beta=true",
        &[
            ("X-Api-Key", "sk-client"),
            ("anthropic-version", "2023-06-01"),
            ("Anthropic-Beta", "a"),
            ("anthropic-beta", "b"),
        ],
        br#"{"model":"m"}"#,
    )
    .await;
    let r = within("response 1", c.read_response())
        .await
        .expect("response 1");
    assert_eq!(r.head.status, 200);
    assert_eq!(r.head.header("content-type"), Some("application/json"));
    assert_eq!(
        r.json(),
        anthropic_message(MOCK_MODEL, "Hello from the mock", 10, 5)
    );
    assert_eq!(r.json()["type"], "message");

    // Second request on the same connection.
    c.send("GET", "/v1/models", &[], b"").await;
    let r = within("response 2", c.read_response())
        .await
        .expect("response 2");
    assert_eq!(r.head.status, 200);

    assert_eq!(up.count(), 2);
    assert_eq!(up.connections_accepted(), 1);
    assert_eq!(up.served("ok_json"), 2);
    let rec = up.received();
    assert_eq!(rec[0].method, "POST");
    assert_eq!(rec[0].path_and_query, "/v1/messages?beta=true");
    assert_eq!(rec[0].path(), "/v1/messages");
    assert_eq!(rec[0].body, Bytes::from_static(br#"{"model":"m"}"#));
    assert_eq!(rec[0].json(), Some(json!({"model": "m"})));
    let names: Vec<&str> = rec[0].headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "Host",
            "X-Api-Key",
            "anthropic-version",
            "Anthropic-Beta",
            "anthropic-beta",
            "Content-Length"
        ]
    );
    assert_eq!(rec[0].header("x-api-key"), Some("sk-client"));
    assert_eq!(rec[0].header("ANTHROPIC-BETA"), Some("a"));
    assert_eq!(rec[0].header_all("anthropic-beta"), ["a", "b"]);
    assert_eq!(rec[0].header("authorization"), None);
    assert_eq!(rec[1].method, "GET");
    assert!(rec[1].body.is_empty());
    assert_eq!(rec[0].connection_id, rec[1].connection_id);
    assert_eq!(
        up.last_request().map(|r| r.path_and_query),
        Some("/v1/models".into())
    );

    // A second connection gets a new id.
    let mut c2 = Client::connect(&up).await;
    c2.send("GET", "/", &[], b"").await;
    within("response 3", c2.read_response())
        .await
        .expect("response 3");
    assert_eq!(up.connections_accepted(), 2);
    assert_ne!(up.received()[2].connection_id, rec[0].connection_id);
}

#[tokio::test]
async fn chunked_request_body_and_expect_continue() {
    let up = MockUpstream::start().await;
    let mut c = Client::connect(&up).await;
    c.send_raw(
        b"POST /v1/messages HTTP/1.1\r\nHost: mock\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;ext=1\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: t\r\n\r\n",
    )
    .await;
    let r = within("chunked response", c.read_response())
        .await
        .expect("response");
    assert_eq!(r.head.status, 200);
    assert_eq!(up.received()[0].body, Bytes::from_static(b"hello world!"));

    // Large content-length body arriving in pieces, with `expect: 100-continue`.
    let body = vec![b'x'; 300_000];
    c.send_raw(
        format!(
            "POST /big HTTP/1.1\r\nHost: mock\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let interim = within("100 continue", c.read_head()).await.expect("100");
    assert_eq!(interim.status, 100);
    for piece in body.chunks(70_000) {
        c.send_raw(piece).await;
    }
    let r = within("big response", c.read_response())
        .await
        .expect("response");
    assert_eq!(r.head.status, 200);
    assert_eq!(up.received()[1].body.len(), body.len());
    assert_eq!(up.connections_accepted(), 1);
}

#[tokio::test]
async fn queue_is_fifo_then_default() {
    let up = MockUpstream::start().await;
    up.push(Script::error(500, "api_error", "boom"));
    up.push(Script::rate_limited_until(7, "2030-01-01T00:00:00Z"));
    up.push(Script::overloaded().header("x-should-retry", "true"));
    up.push(Script::json_ok().label("custom"));
    up.set_default(Script::error(503, "overloaded_error", "later"));
    assert_eq!(up.queued(), 4);

    let mut c = Client::connect(&up).await;
    let mut statuses = Vec::new();
    let mut responses = Vec::new();
    for _ in 0..6 {
        c.post(&json!({"model": "m"})).await;
        let r = within("response", c.read_response())
            .await
            .expect("response");
        statuses.push(r.head.status);
        responses.push(r);
    }
    assert_eq!(statuses, [500, 429, 529, 200, 503, 503]);
    assert_eq!(responses[0].json(), anthropic_error("api_error", "boom"));
    assert_eq!(
        responses[1].json()["error"]["type"],
        Value::from("rate_limit_error")
    );
    assert_eq!(responses[1].head.header("retry-after"), Some("7"));
    assert_eq!(
        responses[1]
            .head
            .header("anthropic-ratelimit-requests-reset"),
        Some("2030-01-01T00:00:00Z")
    );
    assert_eq!(responses[2].json()["error"]["type"], "overloaded_error");
    assert_eq!(responses[2].head.header("x-should-retry"), Some("true"));
    assert_eq!(
        responses[4].json(),
        anthropic_error("overloaded_error", "later")
    );

    let labels = up.served_by_label();
    assert_eq!(labels.get("status_500"), Some(&1));
    assert_eq!(labels.get("status_429"), Some(&1));
    assert_eq!(labels.get("status_529"), Some(&1));
    assert_eq!(labels.get("custom"), Some(&1));
    assert_eq!(labels.get("status_503"), Some(&2));
    assert_eq!(labels.values().sum::<u64>(), 6);
    assert_eq!(up.queued(), 0);

    // push_n and clear_queue.
    up.push_n(Script::error(418, "x", "y"), 3);
    assert_eq!(up.queued(), 3);
    up.clear_queue();
    assert_eq!(up.queued(), 0);
}

#[tokio::test]
async fn sse_stream_one_chunk_per_event_then_keep_alive() {
    let up = MockUpstream::start().await;
    up.push(Script::sse_ok(3));
    let mut c = Client::connect(&up).await;
    c.post(&json!({"stream": true})).await;
    let r = within("sse", c.read_response())
        .await
        .expect("sse response");
    assert_eq!(r.head.status, 200);
    assert_eq!(r.head.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.head.header("transfer-encoding"), Some("chunked"));
    let names: Vec<String> = r.chunks.iter().map(|c| event_name(c)).collect();
    assert_eq!(names, standard_names(3));
    let text: String = r.chunks[3..6]
        .iter()
        .map(|c| {
            event_data(c)["delta"]["text"]
                .as_str()
                .expect("text")
                .to_owned()
        })
        .collect();
    assert_eq!(text, sse_ok_text(3));
    assert_eq!(event_data(&r.chunks[0])["message"]["model"], MOCK_MODEL);
    assert_eq!(event_data(&r.chunks[7])["usage"]["output_tokens"], 3);
    assert_eq!(
        r.chunks[0].as_ref(),
        SseEvent::message_start().as_bytes(),
        "wire format is `event: NAME\\ndata: JSON\\n\\n`"
    );
    assert!(r.chunks[2].starts_with(b"event: ping\ndata: {"));

    // The connection is reusable after the clean chunked ending.
    c.post(&json!({})).await;
    let r = within("json after sse", c.read_response())
        .await
        .expect("response");
    assert_eq!(r.head.status, 200);
    assert_eq!(up.connections_accepted(), 1);
    assert_eq!(up.served("ok_sse"), 1);
    assert_eq!(up.peer_disconnects(), 0);
}

#[tokio::test(start_paused = true)]
async fn sse_pacing_follows_the_paused_clock() {
    let up = MockUpstream::start().await;
    up.push(Script::sse_ok(2).pacing(Duration::from_secs(10)));
    up.push(Script::json_ok().delay_before_headers(Duration::from_secs(30)));
    let mut c = Client::connect(&up).await;

    let start = tokio::time::Instant::now();
    c.post(&json!({})).await;
    let r = c.read_response().await.expect("paced sse");
    assert_eq!(r.chunks.len(), 8);
    // 7 gaps between 8 events.
    assert!(
        start.elapsed() >= Duration::from_secs(70),
        "{:?}",
        start.elapsed()
    );

    let start = tokio::time::Instant::now();
    c.post(&json!({})).await;
    let r = c.read_response().await.expect("delayed json");
    assert_eq!(r.head.status, 200);
    assert!(
        start.elapsed() >= Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn sse_cut_after_closes_without_terminating_chunk() {
    let up = MockUpstream::start().await;
    up.push(Script::sse_ok(2).cut_after(4));
    let mut c = Client::connect(&up).await;
    c.post(&json!({})).await;
    let head = within("head", c.read_head()).await.expect("head");
    assert_eq!(head.status, 200);
    for name in &standard_names(2)[..4] {
        let chunk = within("chunk", c.read_chunk()).await.expect("chunk");
        assert_eq!(&event_name(&chunk.expect("not the last chunk")), name);
    }
    let err = within("cut", c.read_chunk())
        .await
        .expect_err("stream is cut");
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    assert_eq!(up.served("sse_cut"), 1);
    assert_eq!(up.peer_disconnects(), 0);
}

#[tokio::test]
async fn sse_stall_after_holds_until_peer_leaves() {
    let up = MockUpstream::start().await;
    up.push(Script::sse_ok(2).stall_after(3));
    let mut c = Client::connect(&up).await;
    c.post(&json!({})).await;
    within("head", c.read_head()).await.expect("head");
    for _ in 0..3 {
        within("chunk", c.read_chunk())
            .await
            .expect("chunk")
            .expect("event");
    }
    c.assert_quiet().await;
    assert_eq!(up.peer_disconnects(), 0);
    drop(c);
    within("peer disconnect", up.wait_peer_disconnects(1)).await;
    assert_eq!(up.peer_disconnects(), 1);
    assert_eq!(up.served("sse_stall"), 1);
}

#[tokio::test]
async fn sse_gate_opened_after_or_before_the_wait() {
    let up = MockUpstream::start().await;
    let gate = Gate::new();
    up.push(Script::sse_ok(1).gate_after(2, gate.clone()).label("gated"));
    let mut c = Client::connect(&up).await;
    c.post(&json!({})).await;
    within("head", c.read_head()).await.expect("head");
    for _ in 0..2 {
        within("chunk", c.read_chunk())
            .await
            .expect("chunk")
            .expect("event");
    }
    within("gate arrival", gate.wait_arrived(1)).await;
    c.assert_quiet().await;
    assert!(!gate.is_open());
    gate.open();
    let mut names = Vec::new();
    while let Some(chunk) = within("rest", c.read_chunk()).await.expect("chunk") {
        names.push(event_name(&chunk));
    }
    assert_eq!(names, standard_names(1)[2..]);

    // A gate opened before the stream reaches it does not block.
    let open = Gate::new();
    open.open();
    up.push(
        Script::sse_ok(1)
            .gate_after(0, open.clone())
            .gate_after(9, open.clone()),
    );
    c.post(&json!({})).await;
    let r = within("pre-opened gate", c.read_response())
        .await
        .expect("response");
    assert_eq!(r.chunks.len(), 7);
    assert_eq!(open.arrived(), 1, "gate at 9 is beyond the 7 events");
    assert_eq!(up.served("gated"), 1);
    assert_eq!(up.served("ok_sse"), 1);

    // A client leaving while the stream waits at a gate is a peer disconnect.
    let never = Gate::new();
    up.push(Script::sse_ok(1).gate_after(1, never.clone()));
    c.post(&json!({})).await;
    within("head", c.read_head()).await.expect("head");
    within("chunk", c.read_chunk()).await.expect("chunk");
    within("gate arrival", never.wait_arrived(1)).await;
    drop(c);
    within("peer disconnect", up.wait_peer_disconnects(1)).await;
}

#[tokio::test]
async fn sse_error_event_after_ends_cleanly() {
    let up = MockUpstream::start().await;
    up.push(Script::sse_ok(3).error_event_after(1, "overloaded_error"));
    up.push(
        Script::sse_ok(3)
            .error_event_after(4, "api_error")
            .label("late_error"),
    );
    let mut c = Client::connect(&up).await;

    c.post(&json!({})).await;
    let r = within("sse", c.read_response()).await.expect("clean end");
    let names: Vec<String> = r.chunks.iter().map(|c| event_name(c)).collect();
    assert_eq!(names, ["message_start", "error"]);
    assert_eq!(
        event_data(&r.chunks[1]),
        anthropic_error("overloaded_error", "Overloaded")
    );

    c.post(&json!({})).await;
    let r = within("sse", c.read_response()).await.expect("clean end");
    let names: Vec<String> = r.chunks.iter().map(|c| event_name(c)).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "error"
        ]
    );
    assert_eq!(event_data(&r.chunks[4])["error"]["type"], "api_error");
    assert_eq!(event_data(&r.chunks[3])["delta"]["text"], sse_delta_text(0));

    assert_eq!(up.served("sse_error"), 1);
    assert_eq!(up.served("late_error"), 1);
    assert_eq!(up.connections_accepted(), 1);
}

#[tokio::test]
async fn sse_custom_events_status_and_headers() {
    let up = MockUpstream::start().await;
    up.push(
        Script::sse_events(vec![
            SseEvent::raw(": comment\n\n"),
            SseEvent::raw(""),
            SseEvent::new("custom", &json!({"a": 1})),
        ])
        .status(201)
        .header("request-id", "req_1")
        .header("Content-Type", "text/event-stream; charset=utf-8"),
    );
    let mut c = Client::connect(&up).await;
    c.post(&json!({})).await;
    let r = within("sse", c.read_response()).await.expect("response");
    assert_eq!(r.head.status, 201);
    assert_eq!(r.head.header("request-id"), Some("req_1"));
    assert_eq!(
        r.head.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(
        r.chunks,
        [
            Bytes::from_static(b": comment\n\n"),
            Bytes::from_static(b"event: custom\ndata: {\"a\":1}\n\n"),
        ]
    );
    assert_eq!(up.served("sse_custom"), 1);
}

#[tokio::test]
async fn stall_before_headers_counts_peer_disconnect() {
    let up = MockUpstream::start().await;
    up.push(Script::stall_before_headers());
    let mut c = Client::connect(&up).await;
    c.post(&json!({"x": 1})).await;
    within("request", up.wait_requests(1)).await;
    c.assert_quiet().await;
    assert_eq!(up.peer_disconnects(), 0);
    drop(c);
    within("peer disconnect", up.wait_peer_disconnects(1)).await;
    assert_eq!(up.served("stall"), 1);
    assert_eq!(up.received()[0].json(), Some(json!({"x": 1})));

    // Leaving during a delay before headers counts too.
    up.push(Script::json_ok().delay_before_headers(Duration::from_secs(3600)));
    let mut c = Client::connect(&up).await;
    c.post(&json!({})).await;
    within("request", up.wait_requests(2)).await;
    drop(c);
    within("peer disconnect", up.wait_peer_disconnects(2)).await;
}

#[tokio::test]
async fn reset_before_headers_is_a_tcp_reset() {
    let up = MockUpstream::start().await;
    up.push(Script::reset_before_headers());
    let mut c = Client::connect(&up).await;
    c.post(&json!({})).await;
    let err = within("reset", c.read_to_close())
        .await
        .expect_err("connection is reset");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    assert_eq!(up.served("reset"), 1);
    assert_eq!(up.count(), 1);
    assert_eq!(up.peer_disconnects(), 0);
}

#[tokio::test]
async fn close_before_headers_is_a_clean_eof() {
    let up = MockUpstream::start().await;
    up.push(Script::close_before_headers());
    let mut c = Client::connect(&up).await;
    c.post(&json!({})).await;
    let rest = within("close", c.read_to_close())
        .await
        .expect("clean close");
    assert!(rest.is_empty());
    assert_eq!(up.served("close"), 1);
    assert_eq!(up.peer_disconnects(), 0);
}

#[tokio::test]
async fn connection_close_and_body_cut_and_head() {
    let up = MockUpstream::start().await;

    // The client asks to close.
    let mut c = Client::connect(&up).await;
    c.send("GET", "/", &[("Connection", "close")], b"").await;
    let r = within("response", c.read_response())
        .await
        .expect("response");
    assert_eq!(r.head.header("connection"), Some("close"));
    assert!(
        within("eof", c.read_to_close())
            .await
            .expect("eof")
            .is_empty()
    );

    // The script asks to close.
    up.push(Script::json_ok().close_connection());
    let mut c = Client::connect(&up).await;
    c.send("GET", "/", &[], b"").await;
    let r = within("response", c.read_response())
        .await
        .expect("response");
    assert_eq!(r.head.header("connection"), Some("close"));
    assert!(
        within("eof", c.read_to_close())
            .await
            .expect("eof")
            .is_empty()
    );

    // A body cut short of its content-length.
    up.push(Script::response(200, "text/plain", "0123456789").cut_body_after(4));
    let mut c = Client::connect(&up).await;
    c.send("GET", "/", &[], b"").await;
    let head = within("head", c.read_head()).await.expect("head");
    assert_eq!(head.header("content-length"), Some("10"));
    let rest = within("eof", c.read_to_close()).await.expect("eof");
    assert_eq!(rest, Bytes::from_static(b"0123"));
    assert_eq!(up.served("body_cut"), 1);

    // HEAD gets headers only, and the connection stays usable.
    let mut c = Client::connect(&up).await;
    c.send("HEAD", "/", &[], b"").await;
    let head = within("head", c.read_head()).await.expect("head");
    assert_eq!(head.status, 200);
    assert!(head.header("content-length").is_some());
    c.send("GET", "/", &[], b"").await;
    let r = within("response", c.read_response())
        .await
        .expect("response");
    assert_eq!(r.json()["type"], "message");
}

#[tokio::test]
async fn malformed_requests_get_400_and_the_server_survives() {
    let up = MockUpstream::start().await;
    let garbage: [&[u8]; 5] = [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    ];
    for bytes in garbage {
        let mut c = Client::connect(&up).await;
        c.send_raw(bytes).await;
        let r = within("400", c.read_response())
            .await
            .expect("400 response");
        assert_eq!(r.head.status, 400, "{:?}", String::from_utf8_lossy(bytes));
        assert!(
            within("eof", c.read_to_close())
                .await
                .expect("eof")
                .is_empty()
        );
    }
    // A connection that dies mid-request: the client's FIN arrives before the body is complete
    // (as when it is dropped), and the mock closing its side shows it is done with the request.
    let mut c = Client::connect(&up).await;
    c.send_raw(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\nshort")
        .await;
    c.stream.shutdown().await.expect("half-close");
    let rest = within("the mock to close the cut request", c.read_to_close())
        .await
        .expect("closed cleanly");
    assert!(rest.is_empty(), "no answer to a cut request: {rest:?}");
    drop(c);

    assert_eq!(up.count(), 0);
    let mut c = Client::connect(&up).await;
    c.send("GET", "/", &[], b"").await;
    let r = within("response", c.read_response())
        .await
        .expect("response");
    assert_eq!(r.head.status, 200);
    assert_eq!(up.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn default_fn_with_thousands_of_concurrent_connections() {
    const N: usize = 2000;
    let up = Arc::new(MockUpstream::start().await);
    up.set_default_fn(|req| match req.header("x-pick") {
        Some("sse") => Script::sse_ok(1).label("pick_sse"),
        Some("err") => Script::error(529, "overloaded_error", "o").label("pick_err"),
        _ => Script::json_ok().label("pick_json"),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let up = Arc::clone(&up);
        tasks.spawn(async move {
            let pick = ["sse", "err", "json"][i % 3];
            let mut c = Client::connect(&up).await;
            c.send("POST", "/v1/messages", &[("x-pick", pick)], b"{}")
                .await;
            let r = c.read_response().await.expect("response");
            let expected = match pick {
                "sse" => 200,
                "err" => 529,
                _ => 200,
            };
            assert_eq!(r.head.status, expected);
            if pick == "sse" {
                assert_eq!(r.chunks.len(), 7);
            }
        });
    }
    within("all clients", async {
        while let Some(res) = tasks.join_next().await {
            res.expect("client task succeeded");
        }
    })
    .await;
    let labels = up.served_by_label();
    let per = |k: usize| ((N - k) as u64).div_ceil(3);
    assert_eq!(labels.get("pick_sse"), Some(&per(0)));
    assert_eq!(labels.get("pick_err"), Some(&per(1)));
    assert_eq!(labels.get("pick_json"), Some(&per(2)));
    assert_eq!(up.count(), N);
    assert_eq!(up.connections_accepted(), N as u64);
    assert_eq!(up.peer_disconnects(), 0);
}

#[tokio::test]
async fn dropping_the_mock_closes_everything() {
    let up = MockUpstream::start().await;
    up.push(Script::stall_before_headers());
    let addr = up.addr();
    let mut c = Client::connect(&up).await;
    c.post(&json!({})).await;
    within("request", up.wait_requests(1)).await;
    drop(up);
    // The stalled connection is closed (EOF or reset, both fine) ...
    let _ = within("close after drop", c.read_to_close()).await;
    // ... and the listener is gone.
    let refused = within("connect after drop", async {
        loop {
            match TcpStream::connect(addr).await {
                Err(e) => return e,
                // The abort may not have been processed yet; this connection then gets closed.
                Ok(s) => {
                    let mut c = Client::new(s);
                    let _ = c.read_to_close().await;
                }
            }
        }
    })
    .await;
    assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
}

async fn tls_client(
    up: &MockUpstream,
    server_name: &str,
) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(up.ca_pem.as_bytes()) {
        roots.add(cert.expect("PEM cert")).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(up.addr()).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).expect("name");
    let tls = within("tls handshake", connector.connect(name, tcp))
        .await
        .expect("TLS handshake with the mock's certificate");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    Client::new(tls)
}

#[tokio::test]
async fn tls_json_sse_and_faults() {
    let up = MockUpstream::start_tls().await;
    assert!(up.is_tls());
    assert_eq!(up.url(), format!("https://localhost:{}", up.addr().port()));
    assert_eq!(
        up.url_ip(),
        format!("https://127.0.0.1:{}", up.addr().port())
    );
    assert!(up.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));

    let mut c = tls_client(&up, "localhost").await;
    c.post(&json!({})).await;
    let r = within("tls json", c.read_response())
        .await
        .expect("response");
    assert_eq!(r.json()["type"], "message");

    up.push(Script::sse_ok(2));
    c.post(&json!({})).await;
    let r = within("tls sse", c.read_response())
        .await
        .expect("response");
    let names: Vec<String> = r.chunks.iter().map(|c| event_name(c)).collect();
    assert_eq!(names, standard_names(2));
    assert_eq!(up.connections_accepted(), 1);

    // The IP SAN works too, and faults behave the same over TLS.
    let mut c = tls_client(&up, "127.0.0.1").await;
    up.push(Script::reset_before_headers());
    c.post(&json!({})).await;
    let err = within("tls reset", c.read_to_close())
        .await
        .expect_err("reset");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");

    let mut c = tls_client(&up, "localhost").await;
    up.push(Script::sse_ok(1).stall_after(1));
    c.post(&json!({})).await;
    within("head", c.read_head()).await.expect("head");
    within("chunk", c.read_chunk()).await.expect("chunk");
    drop(c);
    within("tls peer disconnect", up.wait_peer_disconnects(1)).await;
}
