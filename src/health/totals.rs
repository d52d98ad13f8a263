//! Gateway-wide totals for client requests, with the same construction as the endpoint counters:
//! `in_flight` is `started − ended`, read ended-first, so `total_requests == successful_requests +
//! failed_requests + in_flight` holds in every snapshot.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::health::classify::Outcome;
use crate::health::endpoint::Endpoint;
use crate::wire::usage::Usage;

/// What the request path learns about one request for the recent-requests record (never a body
/// or a credential): filled in as the request goes, handed to the [`RequestSink`] when it ends.
#[derive(Clone, Debug, Default)]
pub struct RequestNote {
    /// When the request arrived.
    pub at: Option<SystemTime>,
    /// Method.
    pub method: String,
    /// Path, without the query.
    pub path: String,
    /// The model the request asked for.
    pub model: Option<String>,
    /// Time until the answer's headers went to the client.
    pub first_byte: Option<Duration>,
    /// Tokens of a successful answer.
    pub usage: Option<Usage>,
}

/// One client request that has ended, as the guard saw it.
#[derive(Clone, Debug)]
pub struct EndedRequest {
    /// Its id.
    pub id: RequestId,
    /// Endpoint whose answer was relayed (or the last tried) and attempts, if any was tried.
    pub served: Option<(String, u32)>,
    /// The status the client got, if it got an answer: an endpoint's, or one of ccgate's own
    /// (after every attempt failed, or without trying one: a refusal, a model no endpoint serves).
    pub status: Option<u16>,
    /// How it ended.
    pub how: RequestEnd,
    /// From arrival to the end of the answer.
    pub total: Duration,
    /// What the request path noted.
    pub note: RequestNote,
}

/// Where ended requests go (the recent-requests ring, a layer above): called once per request,
/// on the request path, so it must only do short in-memory work.
pub trait RequestSink: Send + Sync {
    /// One request ended.
    fn ended(&self, request: EndedRequest);
}

/// How a client request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum RequestEnd {
    /// A complete 2xx answer.
    Success = 0,
    /// Every candidate failed, or none was available: ccgate answered with an error.
    Upstream,
    /// The caller's own error, passed through or answered locally (413, 401 for the access token).
    Caller,
    /// The client went away.
    Cancelled,
}

impl RequestEnd {
    const COUNT: usize = 4;

    /// Every way a request ends, in counter order.
    pub const ALL: [RequestEnd; Self::COUNT] =
        [Self::Success, Self::Upstream, Self::Caller, Self::Cancelled];

    /// From the outcome of the attempt whose answer the client got.
    pub fn from_outcome(o: Outcome) -> Self {
        match o {
            Outcome::Success => Self::Success,
            Outcome::CallerError => Self::Caller,
            Outcome::Cancelled => Self::Cancelled,
            _ => Self::Upstream,
        }
    }
}

/// Gateway totals.
#[derive(Default)]
pub struct GatewayStats {
    started: AtomicU64,
    ended: [AtomicU64; RequestEnd::COUNT],
    /// Attempts after the first, across all requests.
    pub retries: AtomicU64,
    /// Requests served by the least-bad fallback because no endpoint was admitted.
    pub fallbacks: AtomicU64,
    /// Failovers not made because the retry budget was spent.
    pub budget_refusals: AtomicU64,
}

/// A consistent view of the gateway totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewaySnapshot {
    /// Client requests received (proxied paths only).
    pub total: u64,
    /// In progress.
    pub in_flight: u64,
    /// Complete 2xx answers.
    pub successful: u64,
    /// Everything else that ended: `upstream_errors + caller_errors + cancelled`.
    pub failed: u64,
    /// Part of `failed`: all candidates failed or none was available.
    pub upstream_errors: u64,
    /// Part of `failed`: the caller's own error.
    pub caller_errors: u64,
    /// Part of `failed`: the client went away.
    pub cancelled: u64,
    /// Attempts after the first.
    pub retries: u64,
    /// Least-bad fallbacks.
    pub fallbacks: u64,
    /// Failovers refused by the retry budget.
    pub budget_refusals: u64,
}

impl GatewaySnapshot {
    /// Requests that ended `how`.
    pub fn ended(&self, how: RequestEnd) -> u64 {
        match how {
            RequestEnd::Success => self.successful,
            RequestEnd::Upstream => self.upstream_errors,
            RequestEnd::Caller => self.caller_errors,
            RequestEnd::Cancelled => self.cancelled,
        }
    }
}

impl GatewayStats {
    /// Starts counting one client request.
    pub fn begin(self: &Arc<Self>) -> RequestGuard {
        self.started.fetch_add(1, Ordering::AcqRel);
        RequestGuard {
            stats: Arc::clone(self),
            done: false,
            id: RequestId::new(),
            started: tokio::time::Instant::now(),
            served: None,
            status: None,
            sink: None,
        }
    }

    /// Reads the totals (ended first, then started).
    pub fn snapshot(&self) -> GatewaySnapshot {
        let e: [u64; RequestEnd::COUNT] =
            std::array::from_fn(|i| self.ended[i].load(Ordering::Acquire));
        let total = self.started.load(Ordering::Acquire);
        let ended: u64 = e.iter().sum();
        GatewaySnapshot {
            total,
            in_flight: total.saturating_sub(ended),
            successful: e[RequestEnd::Success as usize],
            failed: ended - e[RequestEnd::Success as usize],
            upstream_errors: e[RequestEnd::Upstream as usize],
            caller_errors: e[RequestEnd::Caller as usize],
            cancelled: e[RequestEnd::Cancelled as usize],
            retries: self.retries.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            budget_refusals: self.budget_refusals.load(Ordering::Relaxed),
        }
    }
}

/// One client request in progress; records exactly once (`finish`, or `Cancelled` on drop), and
/// writes the request's one log line when it does.
pub struct RequestGuard {
    stats: Arc<GatewayStats>,
    done: bool,
    id: RequestId,
    started: tokio::time::Instant,
    served: Option<(Arc<Endpoint>, u32)>,
    status: Option<u16>,
    /// The recent-requests sink and what is noted for it (`None`: nothing is noted).
    sink: Option<(Arc<dyn RequestSink>, Box<RequestNote>)>,
}

/// A request's id: returned to the client as `x-ccgate-request-id` and logged with the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestId(u64);

impl RequestId {
    /// A fresh random id.
    pub fn new() -> Self {
        Self(fastrand::u64(..))
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestId {
    /// `req_` and the id in 16 lowercase hex digits, written without a formatter.
    fn text(self) -> [u8; 20] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = *b"req_0000000000000000";
        for (i, b) in out[4..].iter_mut().enumerate() {
            *b = HEX[(self.0 >> (60 - 4 * i) & 0xf) as usize];
        }
        out
    }

    /// The id as text, written without the formatter (as [`Display`](std::fmt::Display) writes it).
    pub fn text_string(self) -> String {
        self.text().iter().map(|&b| char::from(b)).collect()
    }

    /// The id as a header value.
    pub fn header_value(self) -> http::HeaderValue {
        http::HeaderValue::from_bytes(&self.text())
            .expect("`req_` and hex digits are a valid header value")
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.text();
        f.write_str(std::str::from_utf8(&text).map_err(|_| std::fmt::Error)?)
    }
}

impl RequestEnd {
    /// Stable name (the log line's `outcome`, the stored counter, the metrics label).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Upstream => "upstream_error",
            Self::Caller => "caller_error",
            Self::Cancelled => "cancelled",
        }
    }
}

impl RequestGuard {
    /// This request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Notes the attempt under way: a request that ends before any answer (the client left) is
    /// recorded with the last endpoint tried and how many attempts it made.
    pub fn trying(&mut self, endpoint: &Arc<Endpoint>, attempts: u32) {
        self.served = Some((Arc::clone(endpoint), attempts));
    }

    /// Notes, for the log line, the endpoint whose answer is relayed, after how many attempts, and
    /// the status relayed. Called once, when the request is answered: for an answer of ccgate's
    /// own after every attempt failed, with the last endpoint tried and the status ccgate answers
    /// with.
    pub fn served_by(&mut self, endpoint: &Arc<Endpoint>, attempts: u32, status: u16) {
        self.served = Some((Arc::clone(endpoint), attempts));
        self.status = Some(status);
    }

    /// Notes the status of an answer of ccgate's own given without trying an endpoint (a
    /// refusal, a model no endpoint serves).
    pub fn answered_locally(&mut self, status: http::StatusCode) {
        self.status = Some(status.as_u16());
    }

    /// Hands this request to `sink` when it ends, with what is noted meanwhile.
    pub fn record_to(&mut self, sink: Arc<dyn RequestSink>, note: RequestNote) {
        self.sink = Some((sink, Box::new(note)));
    }

    /// What is noted for the recent-requests record, when one is kept.
    pub fn note_mut(&mut self) -> Option<&mut RequestNote> {
        self.sink.as_mut().map(|(_, note)| &mut **note)
    }

    /// Notes that the answer's headers go to the client now.
    pub fn note_first_byte(&mut self) {
        let elapsed = self.started.elapsed();
        if let Some((_, note)) = &mut self.sink {
            note.first_byte = Some(elapsed);
        }
    }

    /// Notes a successful answer's tokens.
    pub fn note_usage(&mut self, usage: Usage) {
        if let Some((_, note)) = &mut self.sink {
            note.usage = Some(usage);
        }
    }

    fn record(&mut self, how: RequestEnd) {
        let Some((sink, note)) = self.sink.take() else {
            return;
        };
        sink.ended(EndedRequest {
            id: self.id,
            served: self
                .served
                .as_ref()
                .map(|(ep, attempts)| (ep.name.clone(), *attempts)),
            status: self.status,
            how,
            total: self.started.elapsed(),
            note: *note,
        });
    }

    fn log(&self, how: RequestEnd) {
        if !tracing::enabled!(tracing::Level::INFO) {
            return;
        }
        let latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        match &self.served {
            Some((ep, attempts)) => tracing::info!(
                request_id = %self.id,
                endpoint = %ep.name,
                attempts,
                status = self.status,
                outcome = how.name(),
                latency_ms,
                "request"
            ),
            None => tracing::info!(
                request_id = %self.id,
                status = self.status,
                outcome = how.name(),
                latency_ms,
                "request"
            ),
        }
    }

    /// Records how the request ended, judged from the outcome of the attempt that answered it.
    pub fn finish(self, outcome: Outcome) {
        self.end(RequestEnd::from_outcome(outcome));
    }

    /// Records how the request ended.
    pub fn end(mut self, how: RequestEnd) {
        self.done = true;
        self.stats.ended[how as usize].fetch_add(1, Ordering::AcqRel);
        self.log(how);
        self.record(how);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            self.stats.ended[RequestEnd::Cancelled as usize].fetch_add(1, Ordering::AcqRel);
            self.log(RequestEnd::Cancelled);
            self.record(RequestEnd::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_header_matches_its_display() {
        for n in [
            0,
            1,
            0xabc,
            u64::MAX,
            0x0123_4567_89ab_cdef,
            fastrand::u64(..),
        ] {
            let id = RequestId(n);
            assert_eq!(id.header_value(), id.to_string().as_str(), "{n:#x}");
            assert_eq!(id.to_string(), format!("req_{n:016x}"));
            assert_eq!(id.text_string(), id.to_string());
        }
        assert_eq!(RequestId(0xabc).header_value(), "req_0000000000000abc");
    }
}
