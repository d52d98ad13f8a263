//! The recent requests: a bounded ring of the last client requests (never a body or a
//! credential) for `/_ccgate/requests`, the dashboard and `ccgate requests`, and — when storage is
//! on — a bounded buffer of the same records that the store's writer drains into its `requests`
//! table.
//!
//! **Invariant:** the request path only pushes one record into memory when a request ends (one
//! short lock each on the ring and, with storage, the buffer); both are bounded, so memory stays
//! bounded however many requests pass.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use parking_lot::Mutex;

use crate::health::totals::EndedRequest;
use crate::health::totals::RequestSink;
use crate::wire::usage::Usage;

/// Longest path or model kept, in characters.
const MAX_TEXT: usize = 200;

/// One finished client request.
#[derive(Clone, Debug, PartialEq)]
pub struct RecentRequest {
    /// Position in this process's sequence (1, 2, ...): `--follow` asks for what came after.
    pub seq: u64,
    /// Arrival, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// `x-ccgate-request-id`.
    pub request_id: String,
    /// Method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The model asked for.
    pub model: Option<String>,
    /// Endpoint whose answer was relayed (or the last one tried).
    pub endpoint: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// Status the client got (`None`: no answer was sent).
    pub status: Option<u16>,
    /// `success`, `upstream_error`, `caller_error` or `cancelled`.
    pub outcome: &'static str,
    /// Milliseconds until the answer's headers went out.
    pub first_byte_ms: Option<f64>,
    /// Milliseconds until the answer ended.
    pub total_ms: f64,
    /// Tokens of a successful answer.
    pub usage: Option<Usage>,
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        s = s.chars().take(MAX_TEXT).collect();
    }
    s
}

/// The ring of recent requests and the store's buffer.
pub struct Recent {
    capacity: usize,
    ring: Mutex<VecDeque<Arc<RecentRequest>>>,
    /// Records the store has yet to write (only while `storing`).
    pending: Mutex<VecDeque<Arc<RecentRequest>>>,
    pending_capacity: AtomicU64,
    storing: AtomicBool,
    next_seq: AtomicU64,
    dropped: AtomicU64,
    /// When this ring (and its sequence) began: a reader following `seq` across a restart of
    /// the gateway sees it change.
    started_at: std::time::SystemTime,
}

impl Recent {
    /// A ring keeping the last `capacity` requests.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            pending: Mutex::default(),
            pending_capacity: AtomicU64::new(0),
            storing: AtomicBool::new(false),
            next_seq: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
            started_at: std::time::SystemTime::now(),
        }
    }

    /// When this ring's sequence began (the process's start: reloads keep the ring).
    pub fn started_at(&self) -> std::time::SystemTime {
        self.started_at
    }

    /// From now on, keeps up to `capacity` records for the store's writer to take (the oldest
    /// are dropped beyond that, when the writer falls behind).
    pub fn start_storing(&self, capacity: usize) {
        self.pending_capacity
            .store(capacity as u64, Ordering::Relaxed);
        self.storing.store(capacity > 0, Ordering::Release);
    }

    /// Adds one record.
    pub fn push(&self, mut r: RecentRequest) {
        r.seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let r = Arc::new(r);
        if self.storing.load(Ordering::Acquire) {
            let cap = self.pending_capacity.load(Ordering::Relaxed) as usize;
            let mut pending = self.pending.lock();
            if pending.len() >= cap {
                pending.pop_front();
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            pending.push_back(Arc::clone(&r));
        }
        if self.capacity == 0 {
            return;
        }
        let mut ring = self.ring.lock();
        if ring.len() >= self.capacity {
            ring.pop_front();
        }
        ring.push_back(r);
    }

    /// Up to `limit` of the most recent records with a `seq` above `after`, newest first.
    pub fn recent(&self, limit: usize, after: u64) -> Vec<Arc<RecentRequest>> {
        self.ring
            .lock()
            .iter()
            .rev()
            .take_while(|r| r.seq > after)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Records in the ring.
    pub fn len(&self) -> usize {
        self.ring.lock().len()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records the store has yet to write.
    pub fn pending_len(&self) -> usize {
        self.pending.lock().len()
    }

    /// Records the store never got because its buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Takes the records the store has yet to write, oldest first.
    pub fn take_pending(&self) -> Vec<Arc<RecentRequest>> {
        std::mem::take(&mut *self.pending.lock()).into()
    }

    /// Puts back records a failed flush could not write (in front, within the bound).
    pub fn restore(&self, rows: Vec<Arc<RecentRequest>>) {
        let cap = self.pending_capacity.load(Ordering::Relaxed) as usize;
        let mut pending = self.pending.lock();
        for r in rows.into_iter().rev() {
            if pending.len() >= cap {
                break;
            }
            pending.push_front(r);
        }
    }
}

impl RequestSink for Recent {
    fn ended(&self, e: EndedRequest) {
        let (endpoint, attempts) = match e.served {
            Some((ep, a)) => (Some(ep), a),
            None => (None, 0),
        };
        let status = e.status;
        let note = e.note;
        self.push(RecentRequest {
            seq: 0,
            at_ms: note
                .at
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as i64),
            request_id: e.id.text_string(),
            method: note.method,
            path: cut(note.path),
            model: note.model.map(cut),
            endpoint,
            attempts,
            status,
            outcome: e.how.name(),
            first_byte_ms: note.first_byte.map(|d| d.as_secs_f64() * 1000.0),
            total_ms: e.total.as_secs_f64() * 1000.0,
            usage: note.usage,
        });
    }
}

/// A stored request for tests of the ring and of the store's table.
#[cfg(test)]
pub(crate) fn sample(i: u64) -> RecentRequest {
    RecentRequest {
        seq: 0,
        at_ms: i as i64,
        request_id: format!("req_{i:016x}"),
        method: "POST".into(),
        path: "/v1/messages".into(),
        model: Some("claude-sonnet-4-5".into()),
        endpoint: Some("a".into()),
        attempts: 1,
        status: Some(200),
        outcome: "success",
        first_byte_ms: Some(1.0),
        total_ms: 2.0,
        usage: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A million requests through the ring and the store's buffer: both stay within their
    /// bounds, the newest are the ones kept, `after` pages correctly.
    #[test]
    fn a_million_requests_stay_bounded() {
        let r = Recent::new(1000);
        r.start_storing(5000);
        let mut taken = 0u64;
        for i in 0..1_000_000u64 {
            r.push(sample(i));
            if i % 100_000 == 99_999 {
                assert!(r.pending_len() <= 5000);
                taken += r.take_pending().len() as u64;
            }
            assert!(r.len() <= 1000);
        }
        assert_eq!(r.len(), 1000);
        assert_eq!(taken, 10 * 5000);
        assert_eq!(r.dropped(), 1_000_000 - 50_000);
        let newest = r.recent(3, 0);
        assert_eq!(
            newest.iter().map(|x| x.seq).collect::<Vec<_>>(),
            [1_000_000, 999_999, 999_998]
        );
        assert_eq!(r.recent(10, 999_998).len(), 2);
        assert!(r.recent(5000, 0).len() == 1000);
    }
}
