//! The background prober: probes each queued endpoint when it is due, one probe per endpoint at a
//! time, and returns cooled-down endpoints to rotation.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::task::JoinSet;

use crate::control::cluster::ClusterNode;
use crate::health::machine::{Event, Phase};
use crate::proxy::gateway::Gateway;
use crate::proxy::probe::probe_and_record;

/// The background prober: probes each queued endpoint when it is due (one probe per endpoint at a
/// time), returns cooled-down endpoints to rotation, and sleeps until the next due time or a
/// change in the queue. Ends when `shutdown` resolves.
pub async fn run_prober(gw: Arc<Gateway>, shutdown: tokio::sync::watch::Receiver<bool>) {
    run_prober_in(gw, None, shutdown).await;
}

/// [`run_prober`] as one instance of a cluster: an endpoint is probed only while this instance
/// holds its prober lease (or Redis is unreachable); otherwise its probe is postponed a backoff.
pub async fn run_prober_in(
    gw: Arc<Gateway>,
    cluster: Option<Arc<ClusterNode>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut shutdown = shutdown;
    let mut running: JoinSet<usize> = JoinSet::new();
    let mut busy: HashSet<usize> = HashSet::new();
    let reg = Arc::clone(&gw.registry);
    loop {
        let now = reg.clock.now_ms();
        // An attempt begun before a config reload may have ejected a kept endpoint through the
        // previous gateway's queue: give it the entry (and the probes) it is owed here.
        reg.queue.reconcile_all(&reg.endpoints, now);
        let mut next_due: Option<u64> = None;
        for entry in reg.queue.entries() {
            let ep = &reg.endpoints[entry.idx];
            if entry.probation || busy.contains(&entry.idx) || ep.live.admin_disabled() {
                continue;
            }
            if entry.next_probe_at_ms > now {
                next_due = Some(next_due.map_or(entry.next_probe_at_ms, |d: u64| {
                    d.min(entry.next_probe_at_ms)
                }));
                continue;
            }
            match ep.live.phase() {
                Phase::CoolingDown => {
                    let until = ep.live.cooldown_until_ms();
                    if now >= until {
                        reg.queue.transition(ep, Event::CooldownExpired, now);
                    } else {
                        next_due = Some(next_due.map_or(until, |d: u64| d.min(until)));
                    }
                    continue;
                }
                Phase::Ejected | Phase::AuthDisabled => {}
                // Back in rotation since the entries were read (a success ended the episode):
                // nothing to probe. A probe now could be counted against a new episode that
                // opens while it runs, one that no probe was due for.
                Phase::Healthy | Phase::Probation => continue,
            }
            busy.insert(entry.idx);
            let until = now + crate::clock::ms(gw.config.health.probe_timeout);
            reg.queue.probing(entry.idx, until);
            let gw = Arc::clone(&gw);
            let ep = Arc::clone(ep);
            let cluster = cluster.clone();
            running.spawn(async move {
                if let Some(node) = cluster
                    && !node.may_probe(&gw, &ep).await
                {
                    gw.registry.queue.postpone_probe(ep.idx);
                    return ep.idx;
                }
                probe_and_record(&gw, &ep).await;
                ep.idx
            });
        }
        let sleep_until = reg.clock.instant(next_due.unwrap_or(now + 60_000));
        tokio::select! {
            _ = tokio::time::sleep_until(sleep_until) => {}
            _ = reg.queue.changed.notified() => {}
            Some(done) = running.join_next(), if !running.is_empty() => {
                if let Ok(idx) = done {
                    busy.remove(&idx);
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    running.abort_all();
}
