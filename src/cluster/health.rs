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

use serde::{Deserialize, Serialize};

use super::keys::{EndpointId, UrlFingerprint};
use super::link::{ClusterError, ClusterLink, unix_ms};
use super::scripts;

/// A phase of an endpoint as the cluster shares it (a superset of the local health machine's
/// phases plus the administrative and probe transitions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedPhase {
    /// In rotation (used when seeding the view).
    Healthy,
    /// Out of rotation after failures.
    Ejected,
    /// Out of rotation until `cooldown_until_ms` (rate limited).
    CoolingDown,
    /// Out of rotation: the endpoint refused its credential.
    AuthDisabled,
    /// Switched off by an operator.
    AdminDisabled,
    /// Switched back on by an operator.
    AdminEnabled,
    /// A recovery probe passed.
    Verified,
    /// Admitted on probation (limited traffic).
    Probation,
    /// Back in full rotation.
    Recovered,
}

impl SharedPhase {
    /// Whether the endpoint must not receive new requests in this phase.
    pub fn out_of_rotation(self) -> bool {
        matches!(
            self,
            Self::Ejected | Self::CoolingDown | Self::AuthDisabled | Self::AdminDisabled
        )
    }
}

/// One phase change as published and stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthNews {
    /// The endpoint's configured name.
    pub endpoint: String,
    /// Its base URL's fingerprint.
    pub url_fingerprint: UrlFingerprint,
    /// The phase it entered.
    pub phase: SharedPhase,
    /// The failure episode this change belongs to (from [`ClusterLink::claim_episode`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub episode: Option<String>,
    /// The instance that published it.
    pub origin: String,
    /// The origin's sequence number (per process, from 1): later news from one origin has a
    /// larger number.
    pub seq: u64,
    /// When the origin published it (its clock, unix ms).
    pub at_ms: u64,
    /// Cooldown deadline, unix ms: the cluster-wide maximum at the time of publishing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_until_ms: Option<u64>,
}

impl HealthNews {
    /// The endpoint's identity.
    pub fn endpoint_id(&self) -> EndpointId {
        EndpointId::from_parts(self.endpoint.clone(), self.url_fingerprint)
    }
}

/// What to publish about an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseChange {
    /// The phase entered.
    pub phase: SharedPhase,
    /// Cooldown deadline (unix ms), for [`SharedPhase::CoolingDown`].
    pub cooldown_until_ms: Option<u64>,
    /// The failure episode, when the change belongs to one.
    pub episode: Option<String>,
}

impl PhaseChange {
    /// A change without deadline or episode.
    pub fn new(phase: SharedPhase) -> Self {
        Self {
            phase,
            cooldown_until_ms: None,
            episode: None,
        }
    }

    /// A cooldown until `until_ms` (unix ms).
    pub fn cooling_down(until_ms: u64) -> Self {
        Self {
            phase: SharedPhase::CoolingDown,
            cooldown_until_ms: Some(until_ms),
            episode: None,
        }
    }

    /// The same change, belonging to `episode`.
    pub fn in_episode(mut self, episode: impl Into<String>) -> Self {
        self.episode = Some(episode.into());
        self
    }
}

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
