//! A small load client for streaming (SSE) workloads, for `bench/run.sh`.
//!
//! ```text
//! sse-load --url http://127.0.0.1:PORT/v1/messages -c 64 (--duration 10 | --streams 1000)
//!          [--body FILE] [-H 'name: value']... [--expect-events N] [--connect-timeout SECS]
//!          [--ramp SECS]
//! ```
//!
//! Each of the `-c` workers keeps one HTTP/1.1 keep-alive connection and sends `POST` requests one
//! after the other. Per stream it measures time to response headers, time to the first body byte
//! (TTFB), time to the first content event (`content_block_delta`, TTFC) and the total time, counts body frames and SSE events, and checks that the stream ended
//! with `message_stop` and carried no `event: error`. With `--duration`, streams still running at
//! the deadline are abandoned and not counted; with `--streams N`, exactly N streams are started.
//! `--ramp SECS` spreads the workers' first connects evenly over SECS (worker i starts at
//! i/c × SECS), so that thousands of workers do not all connect in the same millisecond and
//! overrun the server's listen backlog; without it all start at once.
//!
//! Every request asks the mock upstream to stamp its stream (`x-mock-stamp: 1`): the time the
//! request reached it, in `message_start`, and the time it sent the first content event, in that
//! event (microseconds of the system clock, which both processes share). From these the report
//! splits time to first content into the request's way to the upstream (`request_path_ms`) and
//! the first content event's way back (`first_content_relay_ms`), which the mock's wait between
//! them does not blur. Streams without stamps (another upstream) leave both out.
//! Prints one JSON object on stdout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

const DEFAULT_BODY: &str = r#"{"model":"claude-sonnet-4-5-20250929","max_tokens":1024,"stream":true,"messages":[{"role":"user","content":"Say something short."}]}"#;

struct Args {
    url: Uri,
    concurrency: usize,
    duration: Option<Duration>,
    streams: Option<i64>,
    body: Bytes,
    headers: Vec<(HeaderName, HeaderValue)>,
    expect_events: Option<u64>,
    connect_timeout: Duration,
    ramp: Duration,
}

fn usage() -> ! {
    eprintln!(
        "usage: sse-load --url URL -c N (--duration SECS | --streams N) [--body FILE] \
         [-H 'name: value']... [--expect-events N] [--connect-timeout SECS] [--ramp SECS]"
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut url = None;
    let mut a = Args {
        url: Uri::from_static("http://127.0.0.1/"),
        concurrency: 64,
        duration: None,
        streams: None,
        body: Bytes::from_static(DEFAULT_BODY.as_bytes()),
        headers: Vec::new(),
        expect_events: None,
        connect_timeout: Duration::from_secs(10),
        ramp: Duration::ZERO,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--url" => url = Some(val().parse::<Uri>().unwrap_or_else(|_| usage())),
            "-c" | "--concurrency" => a.concurrency = val().parse().unwrap_or_else(|_| usage()),
            "-d" | "--duration" => {
                let s: f64 = val().parse().unwrap_or_else(|_| usage());
                a.duration = Some(Duration::from_secs_f64(s));
            }
            "-n" | "--streams" => a.streams = Some(val().parse().unwrap_or_else(|_| usage())),
            "--body" => {
                let p = val();
                a.body = Bytes::from(std::fs::read(&p).unwrap_or_else(|e| {
                    eprintln!("sse-load: cannot read {p}: {e}");
                    std::process::exit(2)
                }));
            }
            "-H" | "--header" => {
                let h = val();
                let (n, v) = h.split_once(':').unwrap_or_else(|| usage());
                a.headers.push((
                    HeaderName::from_bytes(n.trim().as_bytes()).unwrap_or_else(|_| usage()),
                    HeaderValue::from_str(v.trim()).unwrap_or_else(|_| usage()),
                ));
            }
            "--expect-events" => a.expect_events = Some(val().parse().unwrap_or_else(|_| usage())),
            "--connect-timeout" => {
                let s: f64 = val().parse().unwrap_or_else(|_| usage());
                a.connect_timeout = Duration::from_secs_f64(s);
            }
            "--ramp" => {
                let s: f64 = val().parse().unwrap_or_else(|_| usage());
                a.ramp = Duration::from_secs_f64(s);
            }
            _ => usage(),
        }
    }
    a.url = url.unwrap_or_else(|| usage());
    if a.duration.is_none() && a.streams.is_none() {
        usage();
    }
    a
}

#[derive(Default)]
struct Stats {
    completed: u64,
    errors: BTreeMap<String, u64>,
    headers_us: Vec<u32>,
    ttfb_us: Vec<u32>,
    ttfc_us: Vec<u32>,
    total_us: Vec<u32>,
    frames: u64,
    events: u64,
    max_gap_us: Vec<u32>,
    request_path_us: Vec<u32>,
    first_relay_us: Vec<u32>,
}

impl Stats {
    fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }
    fn merge(&mut self, o: Stats) {
        self.completed += o.completed;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.headers_us.extend(o.headers_us);
        self.ttfb_us.extend(o.ttfb_us);
        self.ttfc_us.extend(o.ttfc_us);
        self.total_us.extend(o.total_us);
        self.max_gap_us.extend(o.max_gap_us);
        self.request_path_us.extend(o.request_path_us);
        self.first_relay_us.extend(o.first_relay_us);
        self.frames += o.frames;
        self.events += o.events;
    }
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(args: &Args) -> Result<Sender, String> {
    let host = args.url.host().unwrap_or("127.0.0.1");
    let port = args.url.port_u16().unwrap_or(80);
    let tcp = tokio::time::timeout(args.connect_timeout, TcpStream::connect((host, port)))
        .await
        .map_err(|_| "connect_timeout".to_string())?
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

enum Outcome {
    Done,
    Failed(String),
}

/// One stream on `sender`; records into `st`. Returns whether the connection may be reused.
async fn one_stream(args: &Args, sender: &mut Sender, st: &mut Stats) -> (Outcome, bool) {
    let authority = args
        .url
        .authority()
        .map(|a| a.as_str())
        .unwrap_or("127.0.0.1");
    let path = args.url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", authority)
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .header("x-api-key", "sk-bench-client")
        .header("x-mock-stamp", "1");
    for (n, v) in &args.headers {
        b = b.header(n, v);
    }
    let req = b.body(Full::new(args.body.clone())).expect("request");
    if sender.ready().await.is_err() {
        return (Outcome::Failed("connection_closed".into()), false);
    }
    let t0 = Instant::now();
    let sent_us = unix_us();
    let mut arrived_us = None;
    let mut first_relay_us = None;
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return (Outcome::Failed(format!("send: {e}")), false),
    };
    let t_head = t0.elapsed();
    let status = resp.status();
    let mut body = resp.into_body();
    let mut first: Option<Duration> = None;
    let mut first_content: Option<Duration> = None;
    let mut last = Instant::now();
    let mut max_gap = Duration::ZERO;
    let mut frames = 0u64;
    let mut events = 0u64;
    let mut prev_nl = false;
    let mut tail: Vec<u8> = Vec::with_capacity(256);
    let mut saw_error = false;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => {
                return (Outcome::Failed(format!("body: {e}")), false);
            }
            Some(Ok(f)) => {
                let Ok(data) = f.into_data() else { continue };
                if data.is_empty() {
                    continue;
                }
                let now = Instant::now();
                if first.is_none() {
                    first = Some(now - t0);
                } else {
                    max_gap = max_gap.max(now - last);
                }
                last = now;
                frames += 1;
                for &c in data.iter() {
                    if c == b'\n' {
                        if prev_nl {
                            events += 1;
                        }
                        prev_nl = true;
                    } else if c != b'\r' {
                        prev_nl = false;
                    }
                }
                if memfind(&data, b"event: error") {
                    saw_error = true;
                }
                tail.extend_from_slice(&data);
                if arrived_us.is_none() {
                    arrived_us = stamp(&tail, b"\"mock_arrived_us\":");
                }
                if first_content.is_none() && memfind(&tail, b"content_block_delta") {
                    first_content = Some(now - t0);
                    let got_us = unix_us();
                    first_relay_us =
                        stamp(&tail, b"\"mock_sent_us\":").map(|t| got_us.saturating_sub(t));
                }
                if tail.len() > 200 {
                    tail.drain(..tail.len() - 200);
                }
            }
        }
    }
    let total = t0.elapsed();
    if !status.is_success() {
        return (Outcome::Failed(format!("status_{}", status.as_u16())), true);
    }
    let is_sse = memfind(&tail, b"message_stop") || events > 0;
    if is_sse {
        if saw_error {
            return (Outcome::Failed("sse_error_event".into()), true);
        }
        if !memfind(&tail, b"message_stop") {
            return (Outcome::Failed("no_message_stop".into()), true);
        }
        if let Some(exp) = args.expect_events
            && events != exp
        {
            return (
                Outcome::Failed(format!("events_{events}_expected_{exp}")),
                true,
            );
        }
    }
    st.headers_us.push(t_head.as_micros() as u32);
    st.ttfb_us.push(first.unwrap_or(total).as_micros() as u32);
    if let Some(c) = first_content {
        st.ttfc_us.push(c.as_micros() as u32);
    }
    st.total_us.push(total.as_micros() as u32);
    st.max_gap_us.push(max_gap.as_micros() as u32);
    st.frames += frames;
    st.events += events;
    if let (Some(arrived), Some(relay)) = (arrived_us, first_relay_us) {
        st.request_path_us
            .push(arrived.saturating_sub(sent_us) as u32);
        st.first_relay_us.push(relay as u32);
    }
    (Outcome::Done, true)
}

/// Microseconds since the Unix epoch, by the system clock the mock upstream stamps with.
fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The number after `key` in `h` (a stamp of the mock upstream), if both are there whole.
fn stamp(h: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(h, key)? + key.len();
    let digits = h[at..].iter().take_while(|c| c.is_ascii_digit()).count();
    // A number cut by the end of what has arrived is not read.
    if at + digits >= h.len() {
        return None;
    }
    std::str::from_utf8(&h[at..at + digits]).ok()?.parse().ok()
}

fn memfind(h: &[u8], n: &[u8]) -> bool {
    find(h, n).is_some()
}

/// Where `n` first occurs in `h`.
fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

async fn worker(
    args: Arc<Args>,
    quota: Arc<AtomicI64>,
    deadline: Option<Instant>,
    start_at: Instant,
) -> Stats {
    let mut st = Stats::default();
    let mut sender: Option<Sender> = None;
    tokio::time::sleep_until(start_at).await;
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if args.streams.is_some() && quota.fetch_sub(1, Ordering::Relaxed) <= 0 {
            break;
        }
        let work = async {
            if sender.is_none() {
                match connect(&args).await {
                    Ok(s) => sender = Some(s),
                    Err(e) => return (Outcome::Failed(e), false),
                }
            }
            let s = sender.as_mut().expect("connected");
            one_stream(&args, s, &mut st).await
        };
        let res = match deadline {
            // Abandoned at the deadline: not counted.
            Some(d) => tokio::time::timeout_at(d, work).await.ok(),
            None => Some(work.await),
        };
        match res {
            None => break,
            Some((Outcome::Done, reuse)) => {
                st.completed += 1;
                if !reuse {
                    sender = None;
                }
            }
            Some((Outcome::Failed(kind), reuse)) => {
                let connect_failure = kind.starts_with("connect");
                st.error(kind);
                if !reuse {
                    sender = None;
                }
                if connect_failure {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    st
}

fn pct(v: &mut [u32]) -> String {
    if v.is_empty() {
        return "null".into();
    }
    v.sort_unstable();
    let at = |p: f64| {
        let i = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
        v[i.min(v.len() - 1)] as f64 / 1000.0
    };
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64 / 1000.0;
    format!(
        r#"{{"p50":{:.3},"p90":{:.3},"p99":{:.3},"max":{:.3},"mean":{:.3}}}"#,
        at(50.0),
        at(90.0),
        at(99.0),
        v[v.len() - 1] as f64 / 1000.0,
        mean
    )
}

fn main() {
    let args = Arc::new(parse_args());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let quota = Arc::new(AtomicI64::new(args.streams.unwrap_or(0)));
        let start = Instant::now();
        let deadline = args.duration.map(|d| start + d);
        let mut tasks = Vec::with_capacity(args.concurrency);
        for i in 0..args.concurrency {
            let start_at = start + args.ramp.mul_f64(i as f64 / args.concurrency as f64);
            tasks.push(tokio::spawn(worker(
                Arc::clone(&args),
                Arc::clone(&quota),
                deadline,
                start_at,
            )));
        }
        let mut st = Stats::default();
        for t in tasks {
            if let Ok(s) = t.await {
                st.merge(s);
            }
        }
        let elapsed = match deadline {
            Some(_) => args.duration.expect("duration").as_secs_f64(),
            None => start.elapsed().as_secs_f64(),
        };
        let n = st.completed.max(1) as f64;
        let errors: Vec<String> = st
            .errors
            .iter()
            .map(|(k, v)| format!("{:?}:{}", k, v))
            .collect();
        let error_total: u64 = st.errors.values().sum();
        println!(
            concat!(
                r#"{{"concurrency":{},"elapsed_s":{:.3},"completed":{},"errors":{},"#,
                r#""error_kinds":{{{}}},"streams_per_s":{:.2},"success_rate":{:.6},"#,
                r#""headers_ms":{},"ttfb_ms":{},"ttfc_ms":{},"total_ms":{},"max_gap_ms":{},"#,
                r#""frames_per_stream":{:.2},"events_per_stream":{:.2},"#,
                r#""request_path_ms":{},"first_content_relay_ms":{}}}"#
            ),
            args.concurrency,
            elapsed,
            st.completed,
            error_total,
            errors.join(","),
            st.completed as f64 / elapsed,
            st.completed as f64 / ((st.completed + error_total).max(1) as f64),
            pct(&mut st.headers_us),
            pct(&mut st.ttfb_us),
            pct(&mut st.ttfc_us),
            pct(&mut st.total_us),
            pct(&mut st.max_gap_us),
            st.frames as f64 / n,
            st.events as f64 / n,
            pct(&mut st.request_path_us),
            pct(&mut st.first_relay_us),
        );
    });
}
