//! Recent failovers, for the dashboard: a small ring of the last requests that needed more than
//! one attempt or found no endpoint, including those whose client left during failover (status
//! 499, served by none). Written only on those requests, never on the happy path.

use std::collections::VecDeque;

use parking_lot::Mutex;
use serde::Serialize;

/// How many recent failovers are kept.
pub const CAPACITY: usize = 100;

/// One failed attempt within a request.
#[derive(Clone, Debug, Serialize)]
pub struct FailedAttempt {
    /// Endpoint name.
    pub endpoint: String,
    /// Outcome kind (`server_error`, `timeout`, ...).
    pub outcome: &'static str,
    /// What went wrong (never a secret).
    pub message: String,
}

/// A request that failed over, or found nothing that worked.
#[derive(Clone, Debug, Serialize)]
pub struct Failover {
    /// When it was answered (RFC 3339).
    pub at: String,
    /// The request's id (`x-ccgate-request-id`).
    pub request_id: String,
    /// Attempts that failed, in order.
    pub failed: Vec<FailedAttempt>,
    /// Who answered in the end, if anyone did.
    pub served_by: Option<String>,
    /// Status the client got (499 when it left before any answer).
    pub status: u16,
}

/// The ring of recent failovers.
#[derive(Default)]
pub struct Events {
    ring: Mutex<VecDeque<Failover>>,
}

impl Events {
    /// Records a failover.
    pub fn push(&self, event: Failover) {
        let mut ring = self.ring.lock();
        if ring.len() == CAPACITY {
            ring.pop_front();
        }
        ring.push_back(event);
    }

    /// The recent failovers, newest first.
    pub fn recent(&self) -> Vec<Failover> {
        self.ring.lock().iter().rev().cloned().collect()
    }
}
