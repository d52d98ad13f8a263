//! Shared health news: each phase change that takes an endpoint out of rotation or brings it back
//! is stored as the endpoint's latest entry in a hash *and* published on a channel, in one script.
//!
//! The channel is the fast path (other instances apply the news within a round trip); the hash is
//! what a (re)connecting instance reads to catch up, and what an empty Redis is repopulated into
//! ([`ClusterLink::seed_health`]). A cooldown deadline only grows cluster-wide: the script keeps
//! the later of the stored and the new deadline, and the news it publishes carries the effective
//! one, so two instances cooling the same endpoint down for different times agree on the longer.
//! Receivers should apply deadlines with the same max rule locally.
//!
//! Receivers match news to their own endpoints by name *and* URL fingerprint (an instance whose
//! config differs ignores news about that endpoint and says so once), drop news older than the
//! last `seq` seen from the same origin, and apply the rest through the same transition entry
//! point as local outcomes.

use std::sync::atomic::Ordering;

use crate::cluster::keys::EndpointId;
use crate::cluster::link::{ClusterError, ClusterLink, unix_ms};
use crate::cluster::news::{HealthNews, PhaseChange};
use crate::cluster::scripts;

impl ClusterLink {
    async fn store_health(
        &self,
        endpoint: &EndpointId,
        change: PhaseChange,
        only_if_absent: bool,
    ) -> Result<Option<HealthNews>, ClusterError> {
        let seq = self.inner.news_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let news = HealthNews {
            endpoint: endpoint.name().to_owned(),
            url_fingerprint: endpoint.fingerprint(),
            phase: change.phase,
            episode: change.episode,
            origin: self.inner.config.instance.clone(),
            seq,
            at_ms: unix_ms(),
            // Spliced in by the script after taking the maximum.
            cooldown_until_ms: None,
        };
        let body = serde_json::to_string(&news).map_err(|e| ClusterError::Decode(e.to_string()))?;
        let deadline = change
            .cooldown_until_ms
            .map(|d| d.to_string())
            .unwrap_or_default();
        let keys = &self.inner.keys;
        let (view, until, channel) = (
            keys.health_view(),
            keys.health_until(),
            keys.health_channel(),
        );
        let field = endpoint.wire();
        let stored: Option<String> = self
            .call(|mut c| async move {
                scripts::PUBLISH_HEALTH
                    .key(view)
                    .key(until)
                    .arg(field)
                    .arg(channel)
                    .arg(body)
                    .arg(deadline)
                    .arg(if only_if_absent { "1" } else { "0" })
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        stored
            .map(|s| serde_json::from_str(&s).map_err(|e| ClusterError::Decode(e.to_string())))
            .transpose()
    }

    /// Publishes a phase change of `endpoint` to every other instance and stores it as the
    /// endpoint's latest. Returns the news as stored (its deadline is the cluster-wide maximum).
    pub async fn publish_health(
        &self,
        endpoint: &EndpointId,
        change: PhaseChange,
    ) -> Result<HealthNews, ClusterError> {
        self.store_health(endpoint, change, false)
            .await?
            .ok_or_else(|| ClusterError::Decode("publish returned nothing".to_owned()))
    }

    /// Publishes `change` only if the shared view has no entry for `endpoint` yet: how an
    /// instance repopulates a Redis that came back empty without overwriting newer news from
    /// others. `None` when an entry existed (apply that one instead).
    pub async fn seed_health(
        &self,
        endpoint: &EndpointId,
        change: PhaseChange,
    ) -> Result<Option<HealthNews>, ClusterError> {
        self.store_health(endpoint, change, true).await
    }

    /// The shared view: the latest news of every endpoint, ordered by endpoint (unreadable entries
    /// are skipped).
    pub async fn health_view(&self) -> Result<Vec<HealthNews>, ClusterError> {
        let view = self.inner.keys.health_view();
        let all: std::collections::BTreeMap<String, String> = self
            .call(|mut c| async move { redis::cmd("HGETALL").arg(view).query_async(&mut c).await })
            .await?;
        Ok(all
            .into_values()
            .filter_map(|json| serde_json::from_str(&json).ok())
            .collect())
    }

    /// Removes `endpoint` from the shared view (it left every instance's config).
    pub async fn forget_health(&self, endpoint: &EndpointId) -> Result<(), ClusterError> {
        let keys = &self.inner.keys;
        let (view, until, field) = (keys.health_view(), keys.health_until(), endpoint.wire());
        self.call(|mut c| async move {
            redis::pipe()
                .atomic()
                .hdel(view, &field)
                .ignore()
                .hdel(until, &field)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }
}
