//! State that lasts (SPEC §9): cumulative counters, failure episodes and the usage ledger in an
//! embedded SQLite database, written by one background task and read back on start.
//!
//! **Invariant: never on the request path.** Requests only do in-memory work that was there
//! anyway (the atomics of [`Live`] and [`GatewayStats`], the failure queue's episode log) plus one
//! short lock on the usage tally ([`UsageTally::add`]). The writer ([`run_writer`]) wakes every
//! `flush_interval`, gathers what changed, and writes it in one transaction on the blocking pool.
//!
//! **Invariant: nothing is counted twice, nothing needs a hook.** The writer follows each live
//! counter cell (`Arc<Live>`, shared by an endpoint and its successors across config reloads)
//! and remembers the snapshot it last wrote; a flush writes `snapshot − last written` and, only
//! once the transaction has committed, moves `last written` on. A failed flush leaves it where it
//! was, so the next one writes the whole difference. Cells an endpoint no longer uses are followed
//! until nothing else holds them (their last attempts recorded), then written a last time.
//!
//! **Crash safety.** WAL journal, `synchronous = NORMAL`, one transaction per flush: `kill -9`
//! loses at most what happened since the last commit and never leaves a half-written flush.
//!
//! A database that cannot be opened never stops the gateway: it logs a warning and serves without
//! persistence, and `/_ccgate/stats` says why under `storage`.

mod db;
mod ledger;
mod values;
mod writer;

pub use crate::store::db::{Store, saturating_i64};
pub use crate::store::ledger::{LedgerRow, StoredRequest, read_ledger, read_requests};
pub use crate::store::values::{EpisodeRow, GatewayTotals, RECENT_EPISODES, StorageStatus};
pub use crate::store::writer::{Persist, attach, run_writer};
