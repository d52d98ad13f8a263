//! The news instances send each other: phase changes of endpoints and session bindings, as JSON on
//! the pub/sub channel and in the shared view.

use serde::{Deserialize, Serialize};

use crate::cluster::keys::{EndpointId, UrlFingerprint};

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

/// A binding made, moved or dropped by another instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionNews {
    /// The session key.
    pub session: String,
    /// The endpoint (`name@fingerprint`), or `None` when the binding was dropped.
    pub endpoint: Option<String>,
    /// The binding's TTL.
    pub ttl_ms: u64,
    /// The instance that made the change.
    pub origin: String,
}

impl SessionNews {
    /// The endpoint bound, parsed.
    pub fn endpoint_id(&self) -> Option<EndpointId> {
        self.endpoint.as_deref().and_then(EndpointId::parse_wire)
    }
}
