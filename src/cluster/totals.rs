//! Cluster totals: each instance adds its counter deltas to Redis on its flush, and the cluster
//! view reads every live instance's own sums beside the cluster-wide ones.
//!
//! **Nothing lost or counted twice.** A [`TotalsFlusher`] turns accumulated deltas into a numbered
//! [`TotalsBatch`] and keeps it until Redis acknowledges it; the script applies a batch's
//! `HINCRBY`s (cluster sums and the instance's own row) atomically and records `holder seq` in a
//! fence, so a batch resent after a timeout whose reply was lost is recognised and skipped. Deltas
//! that arrive meanwhile wait for the next batch. While Redis is down, deltas simply accumulate.
//!
//! **Who is alive.** The supervisor stamps `instances[name] = now` (Redis's clock, so instances'
//! clock skew does not matter) every heartbeat, and each flush stamps it too. Reading the view
//! drops instances not heard from for `dead_after`. The cluster sums keep a dead instance's
//! contribution; its own row expires after [`LinkOptions::instance_retention`](super::LinkOptions).
//! So the sums equal the live instances' own counters once flushed, as long as no instance died.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::cluster::link::{ClusterError, ClusterLink};
use crate::cluster::scripts;

/// One numbered set of deltas, sent until acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TotalsBatch {
    /// Its number within this process (from 1, increasing).
    pub seq: u64,
    /// Counter name → delta.
    pub deltas: BTreeMap<String, i64>,
}

/// Accumulates counter deltas between flushes and holds the batch in flight. One per link (its
/// sequence numbers are fenced per instance).
#[derive(Debug, Default)]
pub struct TotalsFlusher {
    pending: BTreeMap<String, i64>,
    in_flight: Option<TotalsBatch>,
    last_seq: u64,
}

impl TotalsFlusher {
    /// An empty flusher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `delta` to `counter` for the next batch.
    pub fn add(&mut self, counter: &str, delta: i64) {
        if delta != 0 {
            *self.pending.entry(counter.to_owned()).or_insert(0) += delta;
        }
    }

    /// The batch to send: the one still unacknowledged, else a new one from the pending deltas
    /// (`None` when there is nothing to send).
    pub fn next_batch(&mut self) -> Option<&TotalsBatch> {
        if self.in_flight.is_none() {
            self.pending.retain(|_, d| *d != 0);
            if self.pending.is_empty() {
                return None;
            }
            self.last_seq += 1;
            self.in_flight = Some(TotalsBatch {
                seq: self.last_seq,
                deltas: std::mem::take(&mut self.pending),
            });
        }
        self.in_flight.as_ref()
    }

    /// Redis applied (or had already applied) the batch in flight.
    pub fn acknowledge(&mut self) {
        self.in_flight = None;
    }

    /// Whether everything added has been acknowledged.
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_none() && self.pending.values().all(|d| *d == 0)
    }
}

/// One live instance in the cluster view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceView {
    /// Its name.
    pub instance: String,
    /// When it was last heard from (Redis's clock, unix ms).
    pub last_heard_ms: u64,
    /// Its own flushed counters.
    pub totals: BTreeMap<String, i64>,
}

/// The cluster view: live instances and the cluster-wide sums, read in one atomic step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterView {
    /// Redis's clock when read (unix ms).
    pub now_ms: u64,
    /// Live instances, by name.
    pub instances: Vec<InstanceView>,
    /// Cluster-wide sums of every flush ever applied.
    pub totals: BTreeMap<String, i64>,
}

fn decode(what: &str) -> ClusterError {
    ClusterError::Decode(what.to_owned())
}

impl ClusterLink {
    /// Sends `batch` (exactly once in effect: a resend is skipped). True when applied now, false
    /// when Redis had already applied it.
    pub async fn send_totals(&self, batch: &TotalsBatch) -> Result<bool, ClusterError> {
        let keys = &self.inner.keys;
        let instance = &self.inner.config.instance;
        let mut inv = scripts::FLUSH_TOTALS.prepare_invoke();
        inv.key(keys.totals())
            .key(keys.instance_totals(instance))
            .key(keys.totals_fence())
            .key(keys.instances())
            .arg(instance)
            .arg(&self.inner.holder)
            .arg(batch.seq)
            .arg(self.inner.options.instance_retention.as_millis() as u64);
        for (counter, delta) in &batch.deltas {
            inv.arg(counter).arg(*delta);
        }
        let applied: i64 = self
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(applied == 1)
    }

    /// Sends the flusher's next batch, if any, and acknowledges it on success. True when
    /// everything added so far is now in Redis. On error the batch stays in flight for the next
    /// flush (same number, so it cannot be counted twice).
    pub async fn flush_totals(&self, flusher: &mut TotalsFlusher) -> Result<bool, ClusterError> {
        let Some(batch) = flusher.next_batch() else {
            return Ok(true);
        };
        let batch = batch.clone();
        self.send_totals(&batch).await?;
        flusher.acknowledge();
        Ok(flusher.is_idle())
    }

    /// The cluster view; instances not heard from for `dead_after` are dropped from the live list
    /// (and from Redis) on the way.
    pub async fn cluster_view(&self, dead_after: Duration) -> Result<ClusterView, ClusterError> {
        let keys = &self.inner.keys;
        let instances_key = keys.instances();
        let holders_key = keys.instance_holders();
        let live: Vec<String> = self
            .call(|mut c| async move {
                scripts::LIVE_INSTANCES
                    .key(instances_key)
                    .key(holders_key)
                    .arg(dead_after.as_millis() as u64)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let (now, pairs) = live.split_first().ok_or_else(|| decode("live instances"))?;
        let now_ms: u64 = now.parse().map_err(|_| decode("redis time"))?;
        let mut heard = Vec::with_capacity(pairs.len() / 2);
        for pair in pairs.chunks_exact(2) {
            let ms: u64 = pair[1].parse().map_err(|_| decode("heartbeat"))?;
            heard.push((pair[0].clone(), ms));
        }
        heard.sort();
        // One MULTI for every row, so the instance rows and the sums come from the same moment.
        let mut pipe = redis::pipe();
        pipe.atomic().hgetall(keys.totals());
        for (name, _) in &heard {
            pipe.hgetall(keys.instance_totals(name));
        }
        let mut rows: Vec<BTreeMap<String, i64>> = self
            .call(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        if rows.len() != heard.len() + 1 {
            return Err(decode("totals rows"));
        }
        let totals = rows.remove(0);
        let instances = heard
            .into_iter()
            .zip(rows)
            .map(|((instance, last_heard_ms), totals)| InstanceView {
                instance,
                last_heard_ms,
                totals,
            })
            .collect();
        Ok(ClusterView {
            now_ms,
            instances,
            totals,
        })
    }
}
