//! The key schema, and how an endpoint is named across instances.
//!
//! Every key and channel starts with `{prefix}:` so several gateways can share one Redis:
//!
//! | key / channel | type | holds |
//! |---|---|---|
//! | `{p}:episode:{endpoint}` | string, PX | token of the open failure episode (one per outage) |
//! | `{p}:lease:prober:{endpoint}` | string, PX | holder of the prober lease |
//! | `{p}:health:view` | hash | endpoint → latest [`HealthNews`](super::HealthNews) (JSON) |
//! | `{p}:health:until` | hash | endpoint → cooldown deadline, unix ms (only grows) |
//! | `{p}:health:news` | channel | each phase change as published |
//! | `{p}:session:{session key}` | string, PX | the session's endpoint |
//! | `{p}:session:news` | channel | each binding made, moved or dropped |
//! | `{p}:totals` | hash | cluster-wide counter sums |
//! | `{p}:totals:{instance}` | hash, PX | one instance's own flushed counters |
//! | `{p}:totals:fence` | hash | instance → `holder seq` of its last applied flush |
//! | `{p}:instances` | hash | instance → last heard, unix ms (Redis clock) |
//!
//! `{endpoint}` is [`EndpointId`]'s wire form `name@fingerprint`: instances whose configs give one
//! name different base URLs use different keys, so they never share an episode or a lease.

use std::fmt;

/// A stable 64-bit fingerprint of an endpoint's base URL (FNV-1a over the URL without trailing
/// slashes). Stable across builds and Rust versions, unlike `std`'s hasher, because every instance
/// in a cluster must compute the same value. Not a security measure: it only tells configurations
/// apart.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UrlFingerprint(pub u64);

impl UrlFingerprint {
    /// The fingerprint of `base_url`.
    pub fn of(base_url: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in base_url.trim_end_matches('/').bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self(h)
    }

    /// Parses the 16-hex-digit form.
    pub fn parse(hex: &str) -> Option<Self> {
        if hex.len() != 16 {
            return None;
        }
        u64::from_str_radix(hex, 16).ok().map(Self)
    }
}

impl fmt::Display for UrlFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for UrlFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UrlFingerprint({self})")
    }
}

impl serde::Serialize for UrlFingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for UrlFingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).ok_or_else(|| serde::de::Error::custom("expected 16 hex digits"))
    }
}

/// An endpoint as the cluster knows it: its configured name and its base URL's fingerprint.
/// Two instances mean the same endpoint only when both match.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId {
    name: String,
    fingerprint: UrlFingerprint,
}

impl EndpointId {
    /// The identity of the endpoint `name` at `base_url` (as the validated config holds it).
    pub fn new(name: &str, base_url: &str) -> Self {
        Self {
            name: name.to_owned(),
            fingerprint: UrlFingerprint::of(base_url),
        }
    }

    /// From parts already known (e.g. from news).
    pub fn from_parts(name: String, fingerprint: UrlFingerprint) -> Self {
        Self { name, fingerprint }
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The base URL's fingerprint.
    pub fn fingerprint(&self) -> UrlFingerprint {
        self.fingerprint
    }

    /// `name@fingerprint`, the form used in keys, hash fields and stored session bindings.
    pub fn wire(&self) -> String {
        format!("{}@{}", self.name, self.fingerprint)
    }

    /// Parses [`EndpointId::wire`]. The fingerprint is the part after the *last* `@`, so names may
    /// contain `@`.
    pub fn parse_wire(s: &str) -> Option<Self> {
        let (name, fp) = s.rsplit_once('@')?;
        Some(Self {
            name: name.to_owned(),
            fingerprint: UrlFingerprint::parse(fp)?,
        })
    }
}

impl fmt::Debug for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EndpointId({})", self.wire())
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Builds every key and channel name under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
    /// The prefix of the channels: keys live in one numbered database, but Redis's publish and
    /// subscribe span them all, so a channel names the database too (all but database 0, whose
    /// channel names stay as they were).
    channel_prefix: String,
}

impl Keys {
    /// Keys under `prefix`, in database 0.
    pub fn new(prefix: &str) -> Self {
        Self::in_db(prefix, 0)
    }

    /// Keys under `prefix` in database `db`.
    pub fn in_db(prefix: &str, db: i64) -> Self {
        Self {
            prefix: prefix.to_owned(),
            channel_prefix: if db == 0 {
                prefix.to_owned()
            } else {
                format!("{prefix}@db{db}")
            },
        }
    }

    /// The failure-episode claim of an endpoint.
    pub fn episode(&self, ep: &EndpointId) -> String {
        format!("{}:episode:{}", self.prefix, ep.wire())
    }

    /// The prober lease of an endpoint.
    pub fn prober_lease(&self, ep: &EndpointId) -> String {
        format!("{}:lease:prober:{}", self.prefix, ep.wire())
    }

    /// Hash: endpoint → latest health news.
    pub fn health_view(&self) -> String {
        format!("{}:health:view", self.prefix)
    }

    /// Hash: endpoint → cooldown deadline (unix ms).
    pub fn health_until(&self) -> String {
        format!("{}:health:until", self.prefix)
    }

    /// Channel of health news.
    pub fn health_channel(&self) -> String {
        format!("{}:health:news", self.channel_prefix)
    }

    /// A session's binding.
    pub fn session(&self, session: &str) -> String {
        format!("{}:session:{session}", self.prefix)
    }

    /// Channel of session news.
    pub fn session_channel(&self) -> String {
        format!("{}:session:news", self.channel_prefix)
    }

    /// Hash: cluster-wide counter sums.
    pub fn totals(&self) -> String {
        format!("{}:totals", self.prefix)
    }

    /// Hash: one instance's own flushed counters.
    pub fn instance_totals(&self, instance: &str) -> String {
        format!("{}:totals:{instance}", self.prefix)
    }

    /// Hash: instance → `holder seq` of its last applied flush.
    pub fn totals_fence(&self) -> String {
        format!("{}:totals:fence", self.prefix)
    }

    /// Hash: instance → last heard (unix ms).
    pub fn instances(&self) -> String {
        format!("{}:instances", self.prefix)
    }

    /// Hash: instance name → the process (holder) that last beat under it.
    pub fn instance_holders(&self) -> String {
        format!("{}:instance-holders", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_stable_and_ignores_trailing_slash() {
        // FNV-1a of the empty string is the offset basis: the algorithm, not a build, decides.
        assert_eq!(UrlFingerprint::of("").0, 0xcbf2_9ce4_8422_2325);
        assert_eq!(
            UrlFingerprint::of("https://api.anthropic.com/"),
            UrlFingerprint::of("https://api.anthropic.com")
        );
        assert_ne!(
            UrlFingerprint::of("https://a.example"),
            UrlFingerprint::of("https://b.example")
        );
        let id = EndpointId::new("re@lay", "https://relay.example/api");
        assert_eq!(EndpointId::parse_wire(&id.wire()), Some(id.clone()));
        assert_eq!(EndpointId::parse_wire("x@nothex"), None);
        let k = Keys::new("gw1");
        assert!(k.episode(&id).starts_with("gw1:episode:re@lay@"));
    }

    /// Keys are per database already; channels span them all, so they name the database
    /// (database 0 keeps the names it had).
    #[test]
    fn channels_name_their_database() {
        let zero = Keys::in_db("gw", 0);
        assert_eq!(zero.health_channel(), "gw:health:news");
        assert_eq!(zero.session_channel(), "gw:session:news");
        let two = Keys::in_db("gw", 2);
        assert_eq!(two.health_channel(), "gw@db2:health:news");
        assert_eq!(two.session_channel(), "gw@db2:session:news");
        assert_eq!(
            two.health_view(),
            zero.health_view(),
            "keys are the database's own"
        );
    }
}
