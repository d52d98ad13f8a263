//! The relayed response body: frames pass through as they arrive, and the attempt's outcome is
//! decided and recorded when the body ends — or, if the client goes away, when it is dropped.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::time::{Instant, Sleep};

use crate::health::attempt::Attempt;
use crate::health::classify::{Outcome, TransportKind, classify_sse_error};
use crate::health::registry::Registry;
use crate::health::totals::RequestGuard;
use crate::proxy::forward::ClientCredential;
use crate::proxy::scrub;
use crate::proxy::usage::LiveUsage;
use crate::proxy::usage::UsageTally;
use crate::proxy::usage::ledger_model;
use crate::transport::upstream::AnswerBody;
use crate::wire::sse::{SseScanner, error_event};
use crate::wire::usage;

use crate::transport::error_chain;

/// How a relayed body is judged when it ends.
pub enum Judge {
    /// An SSE stream, read by its scanner (in the state the held preamble left it): success needs
    /// `message_stop`; an `error` event decides otherwise.
    Stream(SseScanner),
    /// Any other 2xx body: success when it ends cleanly.
    Plain,
    /// A JSON answer read whole and judged valid by the one parse that also read its usage:
    /// success when it goes out, and that usage (if any) is what it cost.
    Answer(Option<usage::MessageUsage>),
    /// An answer already judged the caller's error: that verdict, when it ends.
    CallerError,
}

/// The response body relayed to the client. It owns the attempt and the request guards, so the
/// attempt's outcome is recorded when the body ends — or, if the client goes away, when it is
/// dropped. Frames pass through as they arrive, none held back after the preamble; a plain body
/// whose usage is read is also kept (shared `Bytes`, up to [`usage::MAX_JSON_BODY`]) until it
/// ends.
pub struct RelayBody {
    held: VecDeque<Bytes>,
    upstream: Option<AnswerBody>,
    judge: Judge,
    idle: Duration,
    /// The idle timer, armed only when the upstream first keeps the body waiting: a body that is
    /// ready as soon as it is polled (most plain answers) never reads the clock or touches the
    /// timer wheel. It is not moved for every frame: when it fires before the upstream has been
    /// quiet for `idle`, it is moved to that time and waited on again.
    sleep: Option<Pin<Box<Sleep>>>,
    /// When the upstream went quiet: the first wait after its last frame (`None` while a frame
    /// has arrived since).
    quiet_since: Option<Instant>,
    attempt: Option<Attempt>,
    request: Option<RequestGuard>,
    /// An SSE error event to send after an upstream failure, then end.
    trailer: Option<Bytes>,
    /// Where a successful answer's token usage goes (see [`RelayBody::with_usage`]).
    usage: Option<UsageTap>,
    /// A stream's secrets to scrub from an upstream `error` event (see [`RelayBody::scrubbing`]).
    secrets: Option<Arc<Registry>>,
    /// The frames of an upstream `error` event under way, held until it ends and is scrubbed
    /// whole (a secret may lie across two frames).
    error_held: Vec<u8>,
    /// The client's own credential, scrubbed from the attempt's error text (an upstream's
    /// `error` event may echo it), which the endpoint's views and the failure queue show.
    client_credential: ClientCredential,
    /// For a stream: the shutdown's signal to end it with an `error` event (see [`StreamStop`]).
    stop: Option<(Arc<StreamStop>, Arc<AtomicWaker>)>,
}

/// The streams being relayed, for the end of a shutdown: streams still open when the drain's
/// deadline comes are ended with an SSE `error` event (and their attempts counted as cancelled)
/// before their connections are dropped, so a client is told, not cut off mid-event. Each stream
/// registers a waker once; [`StreamStop::stop`] wakes them all.
#[derive(Default)]
pub struct StreamStop {
    stopping: AtomicBool,
    wakers: Mutex<Vec<Weak<AtomicWaker>>>,
}

impl StreamStop {
    /// A waker slot for one more stream.
    fn watch(&self) -> Arc<AtomicWaker> {
        let slot = Arc::new(AtomicWaker::new());
        let mut wakers = self.wakers.lock();
        // Streams that ended leave dead entries: swept each time the list reaches a power of
        // two (from 64), so it stays within about twice the streams open at its largest.
        if wakers.len() >= 64 && wakers.len().is_power_of_two() {
            wakers.retain(|w| w.strong_count() > 0);
        }
        wakers.push(Arc::downgrade(&slot));
        slot
    }

    /// Ends every stream: each, when next polled (woken now), sends its `error` event and ends.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let wakers = std::mem::take(&mut *self.wakers.lock());
        for w in wakers.iter().filter_map(Weak::upgrade) {
            w.wake();
        }
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// A relayed answer's way into the usage tally: streams report usage through their scanner; a
/// plain body is kept (as the frames' shared `Bytes`, not copied) up to
/// [`usage::MAX_JSON_BODY`] and read when it ends.
struct UsageTap {
    sinks: UsageSinks,
    frames: Vec<Bytes>,
    len: usize,
    too_large: bool,
}

/// Where a successful answer's usage goes: the ledger's tally (when storage is on) and the live
/// per-endpoint, per-model sums.
pub struct UsageSinks {
    /// The store's tally, `None` without storage.
    pub tally: Option<Arc<UsageTally>>,
    /// The live sums since start.
    pub live: Arc<LiveUsage>,
}

impl UsageTap {
    fn keep(&mut self, data: &Bytes) {
        if self.too_large {
            return;
        }
        self.len += data.len();
        if self.len > usage::MAX_JSON_BODY {
            self.too_large = true;
            self.frames = Vec::new();
        } else {
            self.frames.push(data.clone());
        }
    }
}

impl RelayBody {
    /// Wraps an upstream body: `held` frames first, then the rest of `upstream`. With no upstream
    /// (a body already read whole and judged), the outcome is recorded as the last held frame goes
    /// out.
    pub fn new(
        upstream: Option<AnswerBody>,
        held: Vec<Bytes>,
        judge: Judge,
        idle: Duration,
        attempt: Attempt,
        request: RequestGuard,
    ) -> Self {
        let mut relay = Self {
            held: held.into(),
            upstream,
            judge,
            idle,
            sleep: None,
            quiet_since: None,
            attempt: Some(attempt),
            request: Some(request),
            trailer: None,
            usage: None,
            secrets: None,
            error_held: Vec::new(),
            client_credential: ClientCredential::default(),
            stop: None,
        };
        if relay.upstream.is_none() && relay.held.is_empty() {
            // An empty body read whole: nothing will be polled.
            relay.end();
        }
        relay
    }

    /// Adds the answer's token usage to `tally` when it ends successfully: for a stream from its
    /// `message_start` / `message_delta` events, for a plain JSON body from its top-level `usage`.
    /// Only a success is counted, so never a caller error. Only in-memory work happens on this
    /// path.
    pub fn with_usage(&mut self, sinks: Option<UsageSinks>) -> &mut Self {
        self.usage = sinks.map(|sinks| {
            let mut tap = UsageTap {
                sinks,
                frames: Vec::new(),
                len: 0,
                too_large: false,
            };
            // Only a plain body is read for usage when it ends (an answer already parsed carries
            // its usage in its judge).
            if matches!(self.judge, Judge::Plain) {
                for data in &self.held {
                    tap.keep(data);
                }
            }
            tap
        });
        self
    }

    /// Scrubs every endpoint's secret from the upstream `error` event of a stream (its message
    /// may echo the key, as error answers can), as the error answers that are not streams are.
    pub fn scrubbing(&mut self, reg: Option<Arc<Registry>>) -> &mut Self {
        self.secrets = reg;
        self
    }

    /// Scrubs the client's own credential from what the upstream says went wrong, before the
    /// attempt records it (the client's stream itself may carry it: the client sent it).
    pub fn scrubbing_client(&mut self, credential: &ClientCredential) -> &mut Self {
        if !credential.is_empty() {
            self.client_credential = credential.clone();
        }
        self
    }

    /// Lets the shutdown end this stream with an `error` event (see [`StreamStop`]).
    pub fn stopped_by(&mut self, stop: Option<&Arc<StreamStop>>) -> &mut Self {
        self.stop = stop.map(|s| (Arc::clone(s), s.watch()));
        self
    }

    /// Ends a stream the shutdown cut: an `api_error` event (a 500-class error, which clients
    /// such as Claude Code retry patiently, where they give up on a few 529s), the attempt counted
    /// as cancelled (no fault of the endpoint's). A stream whose answer is already complete
    /// (`message_stop`) or already failed (the upstream's `error` event) ends as it is: an error
    /// after a complete answer would have the client send it, and pay for it, again.
    fn cut_for_shutdown(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.stop = None;
        let (boundary, decided) = match &self.judge {
            Judge::Stream(sc) => {
                let f = sc.facts();
                (sc.at_boundary(), f.message_stop || f.error.is_some())
            }
            _ => (true, false),
        };
        if decided {
            self.end();
            return Poll::Ready(self.trailer.take().map(|b| Ok(Frame::data(b))));
        }
        self.finish(Outcome::Cancelled, None);
        Poll::Ready(Some(Ok(Frame::data(closing_error_event(
            boundary,
            "api_error",
            "ccgate is shutting down and ended this stream; send the request again",
        )))))
    }

    /// Hands a successful answer's usage to the tally.
    fn record_usage(&mut self) {
        let Some(tap) = self.usage.take() else {
            return;
        };
        let Some(ep) = self.attempt.as_ref().map(|a| a.endpoint()) else {
            return;
        };
        let found = match (&mut self.judge, tap.too_large) {
            (Judge::Stream(sc), _) => sc.usage().cloned(),
            (Judge::Answer(found), _) => found.take(),
            (_, true) => None,
            (_, false) => match tap.frames.as_slice() {
                [] => None,
                [one] => usage::from_json_body(one),
                many => usage::from_json_body(&many.concat()),
            },
        };
        if let Some(mut u) = found {
            let model = ledger_model(u.model.take());
            tap.sinks.live.add(&ep.name, &model, &u.usage);
            if let Some(r) = self.request.as_mut() {
                r.note_usage(u.usage);
            }
            if let Some(tally) = &tap.sinks.tally {
                u.model = Some(model);
                tally.add(&ep.name, u);
            }
        }
    }

    fn finish(&mut self, outcome: Outcome, detail: Option<String>) {
        self.upstream = None;
        if outcome == Outcome::Success {
            self.record_usage();
        }
        self.usage = None;
        if let Some(a) = self.attempt.take() {
            let detail = match detail {
                Some(d) if !self.client_credential.is_empty() => {
                    Some(self.client_credential.scrub(&d))
                }
                d => d,
            };
            a.finish(outcome, detail);
        }
        if let Some(r) = self.request.take() {
            r.finish(outcome);
        }
    }

    /// Ends the relay after an upstream failure: the outcome is recorded and, for a stream, an SSE
    /// `error` event tells the client what happened instead of a silent cut.
    fn fail(
        &mut self,
        outcome: Outcome,
        detail: String,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let boundary = match &self.judge {
            Judge::Stream(sc) => Some(sc.at_boundary()),
            _ => None,
        };
        self.finish(outcome, Some(detail.clone()));
        if let Some(boundary) = boundary {
            let ty = if outcome == Outcome::Overloaded {
                "overloaded_error"
            } else {
                "api_error"
            };
            return Poll::Ready(Some(Ok(Frame::data(closing_error_event(
                boundary,
                ty,
                &format!("upstream stream failed: {detail}"),
            )))));
        }
        Poll::Ready(Some(Err(detail.into())))
    }

    /// Records the outcome of an answer that has no body (HEAD, 204, 304).
    pub fn complete_without_body(mut self) {
        let outcome = if matches!(self.judge, Judge::CallerError) {
            Outcome::CallerError
        } else {
            Outcome::Success
        };
        self.finish(outcome, None);
    }

    /// Records the outcome of an upstream body that has ended. A stream that ended without
    /// `message_stop` (and without an `error` event of its own) is a failure after the first byte:
    /// like every other, it ends the client's stream with an SSE `error` event (queued as the
    /// trailer), so the client cannot take a truncated answer for a complete one.
    fn end(&mut self) {
        let (outcome, detail) = self.end_outcome();
        if let Judge::Stream(sc) = &self.judge
            && outcome == Outcome::Transport(TransportKind::Cut)
        {
            let message = detail
                .as_deref()
                .unwrap_or("stream ended before message_stop");
            self.trailer = Some(closing_error_event(
                sc.at_boundary(),
                "api_error",
                &format!("upstream stream failed: {message}"),
            ));
        }
        self.finish(outcome, detail);
    }

    fn end_outcome(&self) -> (Outcome, Option<String>) {
        match &self.judge {
            Judge::CallerError => (Outcome::CallerError, None),
            Judge::Stream(sc) => {
                let f = sc.facts();
                match &f.error {
                    Some((ty, msg)) => (classify_sse_error(ty), Some(format!("{ty}: {msg}"))),
                    None if f.message_stop => (Outcome::Success, None),
                    None => (
                        Outcome::Transport(TransportKind::Cut),
                        Some("stream ended before message_stop".into()),
                    ),
                }
            }
            Judge::Plain | Judge::Answer(_) => (Outcome::Success, None),
        }
    }
}

/// The `error` event that ends a relayed stream after an upstream failure. It always starts a
/// fresh event: when the bytes relayed so far stopped inside an event (mid-line, or inside a
/// multi-byte character), a blank line ends that event first, so the error event is never read as
/// part of it.
fn closing_error_event(at_boundary: bool, error_type: &str, message: &str) -> Bytes {
    let event = error_event(error_type, message);
    if at_boundary {
        return event;
    }
    let mut out = Vec::with_capacity(event.len() + 2);
    out.extend_from_slice(b"\n\n");
    out.extend_from_slice(&event);
    Bytes::from(out)
}

/// `bytes` with every endpoint's secret replaced.
fn scrubbed(reg: &Registry, bytes: Vec<u8>) -> Bytes {
    Bytes::from(scrub::scrub_bytes(reg, &bytes).unwrap_or(bytes))
}

/// Error type of client-facing bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for RelayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(b) = this.held.pop_front() {
            let upstream_done = this.upstream.as_ref().is_none_or(Body::is_end_stream);
            if this.held.is_empty() && upstream_done && this.attempt.is_some() {
                // A body read whole before it was committed: it ends with its last frame (hyper
                // may not poll again once the declared length is written).
                this.end();
            }
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if let Some((stop, waker)) = &this.stop
            && this.upstream.is_some()
        {
            waker.register(cx.waker());
            if stop.is_stopping() {
                return this.cut_for_shutdown();
            }
        }
        let Some(upstream) = this.upstream.as_mut() else {
            if this.attempt.is_some() {
                // An empty body read whole.
                this.end();
            }
            return Poll::Ready(this.trailer.take().map(|b| Ok(Frame::data(b))));
        };
        match Pin::new(upstream).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.quiet_since = None;
                match frame.into_data() {
                    Ok(data) => {
                        let mut data = data;
                        if let Judge::Stream(sc) = &mut this.judge {
                            sc.feed(&data);
                            if let Some(reg) = this.secrets.as_deref() {
                                if sc.in_error_event() {
                                    // Held until the event ends, to be scrubbed whole.
                                    this.error_held.extend_from_slice(&data);
                                    cx.waker().wake_by_ref();
                                    return Poll::Pending;
                                }
                                if !this.error_held.is_empty() {
                                    this.error_held.extend_from_slice(&data);
                                    data = scrubbed(reg, std::mem::take(&mut this.error_held));
                                } else if sc.facts().error.is_some() {
                                    // The event may have come whole in this frame (or it came
                                    // before; scrubbing a frame again finds nothing).
                                    if let Some(clean) = scrub::scrub_bytes(reg, &data) {
                                        data = Bytes::from(clean);
                                    }
                                }
                            }
                        } else if let Some(tap) = this.usage.as_mut() {
                            tap.keep(&data);
                        }
                        // hyper drops a body once its declared length is written, without polling
                        // for the end: record the attempt as soon as the upstream body is complete.
                        if this.upstream.as_ref().is_some_and(Body::is_end_stream) {
                            this.end();
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    // Trailers are not part of the Anthropic API; drop them and keep reading.
                    Err(_) => {
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => this.fail(
                Outcome::Transport(TransportKind::Cut),
                format!("upstream body broke: {}", error_chain(&e)),
            ),
            Poll::Ready(None) => {
                this.end();
                if !this.error_held.is_empty() {
                    // An error event the upstream did not end: what it sent of it, scrubbed.
                    let held = std::mem::take(&mut this.error_held);
                    if let Some(reg) = this.secrets.as_deref() {
                        return Poll::Ready(Some(Ok(Frame::data(scrubbed(reg, held)))));
                    }
                }
                Poll::Ready(this.trailer.take().map(|b| Ok(Frame::data(b))))
            }
            Poll::Pending => {
                // The upstream went quiet: from the first wait after its last frame, it has
                // `idle` to send the next.
                let quiet_since = *this.quiet_since.get_or_insert_with(Instant::now);
                let due = quiet_since + this.idle;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                loop {
                    ready!(sleep.as_mut().poll(cx));
                    if sleep.deadline() >= due {
                        break;
                    }
                    // Armed for an earlier quiet spell, which a frame ended.
                    sleep.as_mut().reset(due);
                }
                let idle = humantime::format_duration(this.idle).to_string();
                this.fail(
                    Outcome::Transport(TransportKind::Idle),
                    format!("upstream silent for {idle}"),
                )
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.upstream.is_none() && self.held.is_empty() && self.trailer.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.upstream, self.held.is_empty()) {
            (Some(u), true) => u.size_hint(),
            (None, _) if self.trailer.is_none() => {
                SizeHint::with_exact(self.held.iter().map(|b| b.len() as u64).sum())
            }
            _ => SizeHint::default(),
        }
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        // The client went away before the body ended. A stream that already carried its
        // `message_stop` was delivered in full; anything else was cancelled.
        if self.attempt.is_some() {
            let delivered = matches!(&self.judge,
                Judge::Stream(s) if s.facts().message_stop && s.facts().error.is_none());
            if delivered {
                self.finish(Outcome::Success, None);
            } else {
                self.upstream = None;
                self.attempt.take();
                if let Some(r) = self.request.take() {
                    r.finish(Outcome::Cancelled);
                }
            }
        }
    }
}
