//! A fast, Anthropic-shaped mock upstream for the side-by-side benchmark (`bench/run.sh`).
//!
//! ```text
//! mock-upstream [--host 127.0.0.1] [--port 0] [--events 20] [--pace-ms 5]
//!               [--fail-status 500] [--threads 0] [--http2]
//! ```
//!
//! * `POST /v1/messages` answers a realistic JSON message (with `usage`), or, when the request
//!   body says `"stream": true`, an SSE stream: `message_start`, `content_block_start`, `ping`
//!   at once, then `--events` `content_block_delta` events each `--pace-ms` after the previous
//!   one, then `content_block_stop`, `message_delta` (with usage) and `message_stop`.
//! * Per-request overrides (so one mock serves every workload): headers `x-mock-events`,
//!   `x-mock-pace-ms`, `x-mock-fail-status`. `x-mock-stamp: 1` adds `"mock_arrived_us"` (when the
//!   request arrived) to `message_start` and `"mock_sent_us"` (when it was sent) to the first
//!   `content_block_delta`: microseconds since the Unix epoch, for sse-load's split of the time
//!   to first content.
//! * `--fail-status S` (S ≥ 400) makes every request on every path answer S with an
//!   Anthropic-shaped error body.
//! * `GET /v1/models`, `POST /v1/messages/count_tokens`, `HEAD /` / `GET /` answer too (so a
//!   gateway's health probes work); other paths get 404.
//! * `--http2` also serves HTTP/2 without TLS (prior knowledge, h2c) beside HTTP/1.1, with no
//!   limit on concurrent streams (for the HTTP/2 experiment of `bench/h2.sh`).
//! * Prints `listening on http://ADDR` on stdout once bound.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpSocket;
use tokio::time::{Instant, Sleep};

#[derive(Clone, Debug)]
struct Cfg {
    host: String,
    port: u16,
    events: u32,
    pace_ms: u64,
    fail_status: Option<u16>,
    threads: usize,
    http2: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: mock-upstream [--host H] [--port P] [--events N] [--pace-ms MS] \
         [--fail-status CODE] [--threads N] [--http2]"
    );
    std::process::exit(2);
}

fn parse_args() -> Cfg {
    let mut cfg = Cfg {
        host: "127.0.0.1".into(),
        port: 0,
        events: 20,
        pace_ms: 5,
        fail_status: None,
        threads: 0,
        http2: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--host" => cfg.host = val(),
            "--port" => cfg.port = val().parse().unwrap_or_else(|_| usage()),
            "--events" => cfg.events = val().parse().unwrap_or_else(|_| usage()),
            "--pace-ms" => cfg.pace_ms = val().parse().unwrap_or_else(|_| usage()),
            "--fail-status" => {
                let s: u16 = val().parse().unwrap_or_else(|_| usage());
                cfg.fail_status = (s != 0).then_some(s);
            }
            "--threads" => cfg.threads = val().parse().unwrap_or_else(|_| usage()),
            "--http2" => cfg.http2 = true,
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    cfg
}

// ------------------------------------------------------------------------------------------
// Canned bodies
// ------------------------------------------------------------------------------------------

const MODEL: &str = "claude-sonnet-4-5-20250929";

fn json_message() -> Bytes {
    // ~900 bytes, shaped like a real Messages API answer.
    let text = "Here is a short answer from the mock upstream. It is long enough to look like a \
                real reply: a couple of sentences, some punctuation, and a final line that says \
                nothing in particular, so that the body is closer to a real message than to an \
                empty object. The gateway should relay it byte for byte.";
    Bytes::from(format!(
        concat!(
            r#"{{"id":"msg_01MockBenchmarkUpstream000001","type":"message","role":"assistant","#,
            r#""model":"{model}","content":[{{"type":"text","text":"{text}"}}],"#,
            r#""stop_reason":"end_turn","stop_sequence":null,"#,
            r#""usage":{{"input_tokens":812,"cache_creation_input_tokens":0,"cache_read_input_tokens":1536,"#,
            r#""output_tokens":64,"service_tier":"standard"}}}}"#
        ),
        model = MODEL,
        text = text
    ))
}

fn sse_preamble() -> Bytes {
    Bytes::from(format!(
        concat!(
            "event: message_start\n",
            r#"data: {{"type":"message_start","message":{{"id":"msg_01MockBenchmarkUpstream000001","type":"message","role":"assistant","model":"{model}","content":[],"stop_reason":null,"stop_sequence":null,"usage":{{"input_tokens":812,"cache_creation_input_tokens":0,"cache_read_input_tokens":1536,"output_tokens":1}}}}}}"#,
            "\n\n",
            "event: content_block_start\n",
            r#"data: {{"type":"content_block_start","index":0,"content_block":{{"type":"text","text":""}}}}"#,
            "\n\n",
            "event: ping\n",
            r#"data: {{"type":"ping"}}"#,
            "\n\n"
        ),
        model = MODEL
    ))
}

fn sse_delta() -> Bytes {
    Bytes::from_static(
        b"event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"a few more words of the streamed reply, \"}}\n\n",
    )
}

/// Microseconds since the Unix epoch (the clock sse-load reads too).
fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The preamble with the time the request arrived in `message_start` (`x-mock-stamp`).
fn stamped_preamble(arrived_us: u64) -> Bytes {
    let p = sse_preamble();
    // Before the brace that closes `message_start`'s data, the first line to end in one.
    let at = p
        .windows(2)
        .position(|w| w == b"}\n")
        .expect("message_start ends its line");
    with_stamp(&p, at, "mock_arrived_us", arrived_us)
}

/// The content event with the time it is sent (`x-mock-stamp`).
fn stamped_delta(sent_us: u64) -> Bytes {
    let d = sse_delta();
    with_stamp(&d, d.len() - "}\n\n".len(), "mock_sent_us", sent_us)
}

/// `event` with the member `"key":us` added where its data object closes, at byte `at`.
fn with_stamp(event: &[u8], at: usize, key: &str, us: u64) -> Bytes {
    let member = format!(r#","{key}":{us}"#);
    let mut out = Vec::with_capacity(event.len() + member.len());
    out.extend_from_slice(&event[..at]);
    out.extend_from_slice(member.as_bytes());
    out.extend_from_slice(&event[at..]);
    Bytes::from(out)
}

fn sse_tail(events: u32) -> Bytes {
    Bytes::from(format!(
        concat!(
            "event: content_block_stop\n",
            r#"data: {{"type":"content_block_stop","index":0}}"#,
            "\n\n",
            "event: message_delta\n",
            r#"data: {{"type":"message_delta","delta":{{"stop_reason":"end_turn","stop_sequence":null}},"usage":{{"output_tokens":{out}}}}}"#,
            "\n\n",
            "event: message_stop\n",
            r#"data: {{"type":"message_stop"}}"#,
            "\n\n"
        ),
        out = events * 8
    ))
}

fn error_body(status: u16) -> Bytes {
    let kind = match status {
        429 => "rate_limit_error",
        529 => "overloaded_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    };
    Bytes::from(format!(
        r#"{{"type":"error","error":{{"type":"{kind}","message":"mock upstream answers {status}"}}}}"#
    ))
}

fn models_body() -> Bytes {
    Bytes::from(format!(
        r#"{{"data":[{{"type":"model","id":"{MODEL}","display_name":"Mock","created_at":"2025-09-29T00:00:00Z"}}],"has_more":false,"first_id":"{MODEL}","last_id":"{MODEL}"}}"#
    ))
}

struct Canned {
    json: Bytes,
    preamble: Bytes,
    delta: Bytes,
    models: Bytes,
}

// ------------------------------------------------------------------------------------------
// Response body: either one buffer or a paced SSE stream
// ------------------------------------------------------------------------------------------

enum MockBody {
    Full(Option<Bytes>),
    Sse(Box<SseBody>),
}

struct SseBody {
    preamble: Option<Bytes>,
    delta: Bytes,
    /// Stamp the first content event with the time it is sent (`x-mock-stamp`).
    stamp_first: bool,
    tail: Option<Bytes>,
    remaining: u32,
    pace: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            MockBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Sse(s) => s.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(b) => b.is_none(),
            MockBody::Sse(s) => s.preamble.is_none() && s.remaining == 0 && s.tail.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Sse(_) => SizeHint::default(),
        }
    }
}

impl SseBody {
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(p) = self.preamble.take() {
            if self.remaining > 0 && !self.pace.is_zero() {
                self.sleep = Some(Box::pin(tokio::time::sleep(self.pace)));
            }
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        if self.remaining > 0 {
            if let Some(sleep) = self.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // Next deadline relative to the previous one, so pacing does not drift.
                let next = sleep.deadline() + self.pace;
                sleep.as_mut().reset(next.max(Instant::now()));
            }
            self.remaining -= 1;
            if std::mem::take(&mut self.stamp_first) {
                return Poll::Ready(Some(Ok(Frame::data(stamped_delta(unix_us())))));
            }
            return Poll::Ready(Some(Ok(Frame::data(self.delta.clone()))));
        }
        Poll::Ready(self.tail.take().map(|t| Ok(Frame::data(t))))
    }
}

// ------------------------------------------------------------------------------------------
// Request handling
// ------------------------------------------------------------------------------------------

fn header_num<T: std::str::FromStr>(h: &HeaderMap, name: &str) -> Option<T> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// True when the JSON body has a top-level-ish `"stream": true` (whitespace tolerant). Cheap on
/// purpose: the mock must not be the bottleneck.
fn wants_stream(body: &[u8]) -> bool {
    let key = b"\"stream\"";
    let mut i = 0;
    while i + key.len() <= body.len() {
        if &body[i..i + key.len()] == key {
            let mut j = i + key.len();
            while j < body.len() && body[j].is_ascii_whitespace() {
                j += 1;
            }
            if j < body.len() && body[j] == b':' {
                j += 1;
                while j < body.len() && body[j].is_ascii_whitespace() {
                    j += 1;
                }
                return body[j..].starts_with(b"true");
            }
        }
        i += 1;
    }
    false
}

fn respond(status: u16, ctype: &'static str, body: MockBody) -> Response<MockBody> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(
        "request-id",
        HeaderValue::from_static("req_01MockBenchmarkUpstream"),
    );
    if ctype == "text/event-stream" {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    r
}

fn json(status: u16, b: Bytes) -> Response<MockBody> {
    respond(status, "application/json", MockBody::Full(Some(b)))
}

async fn handle(
    req: Request<Incoming>,
    cfg: Arc<Cfg>,
    canned: Arc<Canned>,
) -> Result<Response<MockBody>, Infallible> {
    let arrived_us = unix_us();
    let h = req.headers();
    let stamp = header_num::<u8>(h, "x-mock-stamp") == Some(1);
    let fail = header_num::<u16>(h, "x-mock-fail-status")
        .filter(|s| *s != 0)
        .or(cfg.fail_status);
    let events = header_num::<u32>(h, "x-mock-events").unwrap_or(cfg.events);
    let pace_ms = header_num::<u64>(h, "x-mock-pace-ms").unwrap_or(cfg.pace_ms);
    let method = req.method().clone();
    let path = req.uri().path().to_owned();

    // Always read the whole request body, as a real upstream would.
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(json(400, error_body(400))),
    };
    if let Some(s) = fail {
        return Ok(json(s, error_body(s)));
    }
    let resp = match (&method, path.as_str()) {
        (&Method::POST, "/v1/messages") => {
            if wants_stream(&body) {
                respond(
                    200,
                    "text/event-stream",
                    MockBody::Sse(Box::new(SseBody {
                        preamble: Some(if stamp {
                            stamped_preamble(arrived_us)
                        } else {
                            canned.preamble.clone()
                        }),
                        delta: canned.delta.clone(),
                        stamp_first: stamp,
                        tail: Some(sse_tail(events)),
                        remaining: events,
                        pace: Duration::from_millis(pace_ms),
                        sleep: None,
                    })),
                )
            } else {
                json(200, canned.json.clone())
            }
        }
        (&Method::POST, "/v1/messages/count_tokens") => {
            json(200, Bytes::from_static(br#"{"input_tokens":812}"#))
        }
        (&Method::GET, "/v1/models") => json(200, canned.models.clone()),
        (&Method::HEAD, "/") | (&Method::GET, "/") => {
            respond(200, "text/plain", MockBody::Full(None))
        }
        _ => json(404, error_body(404)),
    };
    Ok(resp)
}

fn main() {
    let cfg = parse_args();
    let mut rt = if cfg.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if cfg.threads > 1 {
        rt.worker_threads(cfg.threads);
    }
    let rt = rt.enable_all().build().expect("tokio runtime");
    rt.block_on(serve(cfg));
}

async fn serve(cfg: Cfg) {
    let addr: SocketAddr = format!("{}:{}", cfg.host, cfg.port)
        .parse()
        .unwrap_or_else(|_| usage());
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .expect("socket");
    socket.set_reuseaddr(true).expect("reuseaddr");
    socket.bind(addr).unwrap_or_else(|e| {
        eprintln!("mock-upstream: cannot bind {addr}: {e}");
        std::process::exit(1);
    });
    let listener = socket.listen(4096).expect("listen");
    let local = listener.local_addr().expect("local addr");
    println!("listening on http://{local}");
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let canned = Arc::new(Canned {
        json: json_message(),
        preamble: sse_preamble(),
        delta: sse_delta(),
        models: models_body(),
    });
    let http2 = cfg.http2;
    let cfg = Arc::new(cfg);
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).keep_alive(true);
    let mut both = auto::Builder::new(TokioExecutor::new());
    both.http1().timer(TokioTimer::new()).keep_alive(true);
    both.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(None);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("mock-upstream: accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let cfg = Arc::clone(&cfg);
        let canned = Arc::clone(&canned);
        let svc = service_fn(move |req| handle(req, Arc::clone(&cfg), Arc::clone(&canned)));
        if http2 {
            let conn = both
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
            continue;
        }
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{stamped_delta, stamped_preamble, wants_stream};

    #[test]
    fn stamps_close_the_data_objects() {
        let p = stamped_preamble(17);
        let text = std::str::from_utf8(&p).expect("utf-8");
        assert!(
            text.starts_with("event: message_start\ndata: {\"type\":\"message_start\"")
                && text.contains("}},\"mock_arrived_us\":17}\n\nevent: content_block_start"),
            "{text}"
        );
        let d = stamped_delta(42);
        let text = std::str::from_utf8(&d).expect("utf-8");
        assert!(text.ends_with(", \"},\"mock_sent_us\":42}\n\n"), "{text}");
    }

    #[test]
    fn stream_flag() {
        assert!(wants_stream(br#"{"model":"x","stream":true}"#));
        assert!(wants_stream(br#"{"stream" : true,"model":"x"}"#));
        assert!(!wants_stream(br#"{"model":"x","stream":false}"#));
        assert!(!wants_stream(br#"{"model":"x"}"#));
    }
}
