//! Session affinity: requests of one client session go to the endpoint that served the session
//! last, so the upstream's prompt cache keeps hitting.
//!
//! The key is the `X-Claude-Code-Session-Id` header, else the `session_id` inside the body's
//! `metadata.user_id` (Claude Code sends a JSON-encoded string there; older versions a
//! `user_…_account_…_session_<id>` string), else there is none and the request is balanced
//! normally; with the request's model beside it ([`binding_key`]). A binding yields to health: the attempt loop only uses it while the endpoint is
//! admitted, and whichever endpoint then serves the session becomes its new binding — so a
//! session that moved off an ejected endpoint stays moved when that endpoint recovers.
//!
//! Memory is bounded: the map is split into shards (one for up to 2,047 sessions, at most 16),
//! each holding at most its share of `max_sessions`; bindings unused for `ttl` expire, and a full
//! shard drops its least recently used binding. (Hand-written rather than a cache crate so that expiry follows the registry
//! clock, which tests drive with tokio's paused time.)

use std::borrow::Cow;
use std::hash::BuildHasher;
use std::sync::LazyLock;

use hashbrown::{DefaultHashBuilder, HashMap};
use http::HeaderMap;
use memchr::memmem;
use parking_lot::Mutex;

use crate::clock::{Clock, ms};
use crate::config::AffinityConfig;
use crate::wire::json_top;

/// Header Claude Code sends with its session id.
pub const SESSION_HEADER: &str = "x-claude-code-session-id";

/// Longest session key accepted; longer ones are ignored rather than stored.
const MAX_KEY_LEN: usize = 256;

/// Most shards, for a map large enough to want them (see [`shards_for`]).
const SHARDS: usize = 16;

/// Sessions per shard below which the map has fewer shards: each shard drops its least recently
/// used binding when full, so a small map split 16 ways would forget sessions long before it
/// holds `max_sessions` (sessions that hash alike push each other out), and would hold more than
/// `max_sessions` (16 shards of at least one). Up to 2,047 sessions the map is one shard, an exact
/// least-recently-used bound.
const MIN_PER_SHARD: usize = 1024;

/// How many shards a map of at most `max_sessions` has.
fn shards_for(max_sessions: usize) -> usize {
    (max_sessions / MIN_PER_SHARD).clamp(1, SHARDS)
}

struct Binding {
    endpoint: usize,
    /// The endpoint's leave count when the binding was made (see [`Affinity::lookup`]).
    leaves: u64,
    last_used_ms: u64,
}

/// A binding this instance made or changed (cluster mode: written through to the shared map by a
/// background task, never on the request path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindingChange {
    /// The session key.
    pub session: String,
    /// The endpoint it is bound to now (registry index).
    pub endpoint: usize,
    /// The endpoint it was bound to before, if any.
    pub previous: Option<usize>,
    /// The endpoint the request was bound to when it was ranked, when another served it (the
    /// bound one failed, was out, or near its quota): a deliberate move, not a late first bind.
    pub moved_from: Option<usize>,
}

/// Most binding changes kept for a writer that is not draining them; the oldest go first.
const MAX_CHANGE_LOG: usize = 8192;

/// Session → endpoint bindings.
pub struct Affinity {
    /// hashbrown's maps and hasher (foldhash, seeded per map): a request hashes its session key
    /// four times (shard and map, on lookup and on bind), and SipHash spent ~250 instructions on
    /// each.
    shards: Vec<Mutex<HashMap<Box<str>, Binding>>>,
    hasher: DefaultHashBuilder,
    per_shard: usize,
    ttl_ms: u64,
    clock: Clock,
    /// Changes made here, for the cluster writer; `None` outside cluster mode.
    changes: Mutex<Option<Vec<BindingChange>>>,
}

impl Affinity {
    /// An empty map sized by `cfg`.
    pub fn new(cfg: &AffinityConfig, clock: Clock) -> Self {
        Self {
            shards: (0..shards_for(cfg.max_sessions))
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            hasher: DefaultHashBuilder::default(),
            per_shard: cfg
                .max_sessions
                .div_ceil(shards_for(cfg.max_sessions))
                .max(1),
            ttl_ms: ms(cfg.ttl).max(1),
            clock,
            changes: Mutex::new(None),
        }
    }

    /// A map sized by `cfg` holding this one's live bindings, each moved to the endpoint index
    /// `moved` gives it (a reload that removed or inserted endpoints renumbers the others);
    /// bindings to endpoints `moved` drops are dropped. Sessions keep their endpoint, and their
    /// prompt cache, across a reload that did not touch it.
    pub fn carried(&self, cfg: &AffinityConfig, moved: impl Fn(usize) -> Option<usize>) -> Self {
        let next = Self::new(cfg, self.clock);
        let now = self.clock.now_ms();
        let mut live: Vec<(Box<str>, Binding)> = Vec::new();
        for shard in &self.shards {
            for (k, b) in shard.lock().iter() {
                if now.saturating_sub(b.last_used_ms) >= self.ttl_ms {
                    continue;
                }
                if let Some(endpoint) = moved(b.endpoint) {
                    live.push((
                        k.clone(),
                        Binding {
                            endpoint,
                            leaves: b.leaves,
                            last_used_ms: b.last_used_ms,
                        },
                    ));
                }
            }
        }
        // Oldest first, so that a smaller map keeps the most recently used.
        live.sort_by_key(|(_, b)| b.last_used_ms);
        for (k, b) in live {
            next.set_at(&k, b.endpoint, b.leaves, b.last_used_ms);
        }
        if self.changes.lock().is_some() {
            next.record_changes();
        }
        next
    }

    /// Starts logging binding changes for [`Affinity::take_changes`] (cluster mode).
    pub fn record_changes(&self) {
        self.changes.lock().get_or_insert_with(Vec::new);
    }

    /// Takes the binding changes made since the last call, oldest first.
    pub fn take_changes(&self) -> Vec<BindingChange> {
        self.changes
            .lock()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn log_change(
        &self,
        key: &str,
        endpoint: usize,
        previous: Option<usize>,
        moved_from: Option<usize>,
    ) {
        if let Some(log) = self.changes.lock().as_mut() {
            if log.len() >= MAX_CHANGE_LOG {
                log.remove(0);
            }
            log.push(BindingChange {
                session: key.to_owned(),
                endpoint,
                previous,
                moved_from,
            });
        }
    }

    /// Takes over a binding another instance made (cluster mode), to an endpoint and its leave
    /// count now: not logged as a change here. `None` drops the binding.
    pub fn adopt(&self, key: &str, endpoint: Option<(usize, u64)>) {
        match endpoint {
            Some((e, leaves)) => {
                self.set(key, e, leaves);
            }
            None => {
                self.shard(key).lock().remove(key);
            }
        }
    }

    /// Bindings used since `since_ms` (registry clock), for sliding their shared TTL.
    pub fn used_since(&self, since_ms: u64) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        for shard in &self.shards {
            for (k, b) in shard.lock().iter() {
                if b.last_used_ms >= since_ms {
                    out.push((k.to_string(), b.endpoint));
                }
            }
        }
        out
    }

    /// The binding's TTL.
    pub fn ttl(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.ttl_ms)
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<Box<str>, Binding>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % self.shards.len()]
    }

    /// The endpoint `key` is bound to, if the binding is alive, with that endpoint's leave count
    /// when it was bound; refreshes it. An endpoint that has left rotation since (its leave count
    /// moved on: ejected, cooling down or switched off) has lost the session, even one that sent
    /// nothing meanwhile: the caller ranks the request as unbound.
    pub fn lookup(&self, key: &str) -> Option<(usize, u64)> {
        let now = self.clock.now_ms();
        let mut shard = self.shard(key).lock();
        let b = shard.get_mut(key)?;
        if now.saturating_sub(b.last_used_ms) >= self.ttl_ms {
            shard.remove(key);
            return None;
        }
        b.last_used_ms = now;
        Some((b.endpoint, b.leaves))
    }

    /// Binds `key` to `endpoint`, which served it, at the endpoint's leave count `leaves`;
    /// `moved_from`: the endpoint the request was bound to when it was ranked (or that lost the
    /// session by leaving rotation), if another served it.
    pub fn bind(&self, key: &str, endpoint: usize, leaves: u64, moved_from: Option<usize>) {
        let previous = self.set(key, endpoint, leaves);
        if previous != Some(endpoint) {
            let moved_from = moved_from.filter(|&m| m != endpoint);
            self.log_change(key, endpoint, previous, moved_from);
        }
    }

    /// Sets the binding; returns the endpoint it held before (if alive).
    fn set(&self, key: &str, endpoint: usize, leaves: u64) -> Option<usize> {
        self.set_at(key, endpoint, leaves, self.clock.now_ms())
    }

    /// [`Affinity::set`], as used last at `now`.
    fn set_at(&self, key: &str, endpoint: usize, leaves: u64, now: u64) -> Option<usize> {
        let mut shard = self.shard(key).lock();
        if let Some(b) = shard.get_mut(key) {
            let previous = (now.saturating_sub(b.last_used_ms) < self.ttl_ms).then_some(b.endpoint);
            b.endpoint = endpoint;
            b.leaves = leaves;
            b.last_used_ms = now;
            return previous;
        }
        if shard.len() >= self.per_shard {
            let ttl = self.ttl_ms;
            shard.retain(|_, b| now.saturating_sub(b.last_used_ms) < ttl);
            if shard.len() >= self.per_shard {
                let oldest = shard
                    .iter()
                    .min_by_key(|(_, b)| b.last_used_ms)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    shard.remove(&k);
                }
            }
        }
        shard.insert(
            key.into(),
            Binding {
                endpoint,
                leaves,
                last_used_ms: now,
            },
        );
        None
    }

    /// Bindings held (live or not yet swept).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether no binding is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most bindings the map will hold.
    pub fn capacity(&self) -> usize {
        self.per_shard * self.shards.len()
    }
}

/// The session key of a request: the session header, else the session id in the body's
/// top-level `metadata` (its `user_id`), given raw.
pub fn session_key(headers: &HeaderMap, metadata: Option<&[u8]>) -> Option<String> {
    if let Some(v) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if !v.is_empty() && v.len() <= MAX_KEY_LEN {
            return Some(v.to_string());
        }
    }
    session_from_raw_user_id(json_top::member(metadata?, b"user_id")?)
}

/// Raw `metadata.user_id` values remembered per worker thread, with their session ids.
const USER_ID_MEMORY: usize = 16;

/// Longest raw `metadata.user_id` remembered (Claude Code's are about 150 bytes).
const USER_ID_MEMORY_MAX_LEN: usize = 512;

/// A raw `metadata.user_id` and the session id read from it.
type RememberedUserId = Option<(Box<[u8]>, Option<String>)>;

thread_local! {
    /// The session ids of the raw `metadata.user_id` values this thread read last, in slots
    /// chosen by the value's end (where the session id is). A session sends the same value with
    /// every request, and decoding its JSON-encoded text costs more than the rest of the key.
    /// A slot's value is compared whole, so two values that share a slot only cost a new read.
    static USER_IDS: std::cell::RefCell<[RememberedUserId; USER_ID_MEMORY]> =
        const { std::cell::RefCell::new([const { None }; USER_ID_MEMORY]) };
}

/// The session id in a raw (still JSON-encoded) `metadata.user_id` value: what
/// [`session_from_user_id`] reads from its text, remembered for the next request that sends the
/// same value.
fn session_from_raw_user_id(raw: &[u8]) -> Option<String> {
    let read = |raw: &[u8]| json_top::as_str(raw).and_then(|u| session_from_user_id(&u));
    if raw.len() > USER_ID_MEMORY_MAX_LEN {
        return read(raw);
    }
    let slot = user_id_slot(raw);
    USER_IDS.with_borrow_mut(|memory| {
        if let Some((seen, session)) = &memory[slot]
            && **seen == *raw
        {
            return session.clone();
        }
        let session = read(raw);
        memory[slot] = Some((raw.into(), session.clone()));
        session
    })
}

/// The memory slot of a raw `metadata.user_id`: from its last 16 bytes (the session id's end,
/// random in every form Claude Code sends) and its length.
fn user_id_slot(raw: &[u8]) -> usize {
    let tail = &raw[raw.len().saturating_sub(16)..];
    let mut h = raw.len() as u64;
    for chunk in tail.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(word)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    (h >> 60) as usize % USER_ID_MEMORY
}

/// The binding key of a request of `session` for `model` (as the client named it): a binding is
/// per session and model, as the upstream's prompt cache is, so one request for another model
/// (a Haiku call served elsewhere) does not move the session's main traffic. At most
/// [`MAX_KEY_LEN`] bytes of the model are kept, after a `|`.
pub fn binding_key(session: String, model: Option<&str>) -> String {
    let Some(model) = model else {
        return session;
    };
    let mut end = model.len().min(MAX_KEY_LEN);
    while !model.is_char_boundary(end) {
        end -= 1;
    }
    let mut key = session;
    // At most one reallocation, sized for both.
    key.reserve_exact(1 + end);
    key.push('|');
    key.push_str(&model[..end]);
    key
}

/// The session id inside a `metadata.user_id` value.
pub fn session_from_user_id(user_id: &str) -> Option<String> {
    // Claude Code's JSON form starts with `{`; anything else is the older plain form. The JSON
    // form's `session_id` is read from its top level without parsing the rest.
    let json = user_id.trim_start().starts_with('{');
    let id: Cow<'_, str> = match json
        .then(|| json_top::member(user_id.as_bytes(), b"session_id"))
        .flatten()
    {
        Some(raw) => json_top::as_str(raw)?,
        None => {
            static SESSION: LazyLock<memmem::FinderRev<'static>> =
                LazyLock::new(|| memmem::FinderRev::new(b"_session_"));
            let at = SESSION.rfind(user_id)?;
            Cow::Borrowed(&user_id[at + "_session_".len()..])
        }
    };
    let id = id.trim();
    (!id.is_empty() && id.len() <= MAX_KEY_LEN).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The endpoint `key` is bound to (bindings here are made at leave count 0).
    fn bound(a: &Affinity, key: &str) -> Option<usize> {
        a.lookup(key).map(|(endpoint, leaves)| {
            assert_eq!(leaves, 0);
            endpoint
        })
    }

    fn cfg(max: usize, ttl: Duration) -> AffinityConfig {
        AffinityConfig {
            enabled: true,
            ttl,
            max_sessions: max,
        }
    }

    #[test]
    fn key_sources_in_order() {
        let metadata = |b: &'static [u8]| json_top::member(b, b"metadata");
        let mut h = HeaderMap::new();
        let body = metadata(
            br#"{"model":"m","metadata":{"user_id":"{\"device_id\":\"d\",\"account_uuid\":\"a\",\"session_id\":\"s-json\"}"},"messages":[]}"#,
        );
        assert_eq!(session_key(&h, body).as_deref(), Some("s-json"));
        let legacy =
            metadata(br#"{"metadata":{"user_id":"user_abc_account_123_session_s-legacy"}}"#);
        assert_eq!(session_key(&h, legacy).as_deref(), Some("s-legacy"));
        h.insert(SESSION_HEADER, http::HeaderValue::from_static("s-header"));
        assert_eq!(session_key(&h, body).as_deref(), Some("s-header"));
        let none = metadata(br#"{"metadata":{"user_id":"plain-user"}}"#);
        assert_eq!(session_key(&HeaderMap::new(), none), None);
        assert_eq!(session_key(&HeaderMap::new(), metadata(b"not json")), None);
    }

    /// The remembered user ids answer exactly what reading the value answers, whatever the order:
    /// 200 values (more than the memory's slots, so they push each other out) and values that
    /// differ only before their last 16 bytes (the same slot), read over and over.
    #[test]
    fn remembered_user_ids_read_as_the_value_reads() {
        let values: Vec<String> = (0..200)
            .map(|i| match i % 4 {
                0 => format!(
                    r#""{{\"device_id\":\"d{i}\",\"account_uuid\":\"\",\"session_id\":\"s-{i:08x}\"}}""#
                ),
                1 => format!(r#""user_{i}_account__session_legacy-{i}""#),
                // The same end for all of these: only the start tells them apart.
                2 => format!(r#""{{\"session_id\":\"x{i}\",\"device_id\":\"same-end-0123456789\"}}""#),
                _ => format!(r#""no session here {i}""#),
            })
            .collect();
        let uncached = |raw: &[u8]| json_top::as_str(raw).and_then(|u| session_from_user_id(&u));
        let mut rng = fastrand::Rng::with_seed(7);
        let mut hits = 0;
        for round in 0..5_000 {
            // Mostly a few hot values, as a gateway's sessions are; sometimes any of them.
            let i = if round % 3 == 0 {
                rng.usize(..values.len())
            } else {
                rng.usize(..6)
            };
            let raw = values[i].as_bytes();
            let want = uncached(raw);
            hits += usize::from(want.is_some());
            assert_eq!(
                session_from_raw_user_id(raw),
                want,
                "value {i}: {}",
                values[i]
            );
        }
        assert!(hits > 1_000, "the values hold sessions: {hits}");
        assert_eq!(
            session_from_raw_user_id(values[2].as_bytes()).as_deref(),
            Some("x2")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bindings_expire_after_ttl_of_disuse() {
        let a = Affinity::new(&cfg(100, Duration::from_secs(60)), Clock::new());
        a.bind("s", 2, 0, None);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(bound(&a, "s"), Some(2), "use refreshes the binding");
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(bound(&a, "s"), Some(2));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(bound(&a, "s"), None);
        assert!(a.is_empty());
    }

    /// A small map forgets nothing while it holds fewer than `max_sessions`, and never holds more
    /// (audit: split 16 ways, 16 sessions in a map of 32 lost bindings, and a map of 2 held 4).
    #[tokio::test(start_paused = true)]
    async fn a_small_map_keeps_exactly_max_sessions() {
        for max in [1, 2, 32, 100, 2047] {
            let a = Affinity::new(&cfg(max, Duration::from_secs(3600)), Clock::new());
            for i in 0..max {
                tokio::time::advance(Duration::from_millis(1)).await;
                a.bind(&format!("s{i}"), i % 3, 0, None);
            }
            for i in 0..max {
                tokio::time::advance(Duration::from_millis(1)).await;
                assert_eq!(bound(&a, &format!("s{i}")), Some(i % 3), "max {max}: s{i}");
            }
            tokio::time::advance(Duration::from_millis(1)).await;
            a.bind("one-more", 0, 0, None);
            assert_eq!(a.len(), max, "max {max}");
            assert_eq!(
                bound(&a, "s0"),
                None,
                "max {max}: the least recently used went"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn map_stays_bounded_and_drops_least_recently_used() {
        let a = Affinity::new(&cfg(1600, Duration::from_secs(3600)), Clock::new());
        a.bind("keep", 1, 0, None);
        for i in 0..10_000 {
            tokio::time::advance(Duration::from_millis(1)).await;
            a.bind(&format!("s{i}"), i % 3, 0, None);
            if i % 100 == 0 {
                assert_eq!(bound(&a, "keep"), Some(1));
            }
        }
        assert!(a.len() <= a.capacity(), "{} > {}", a.len(), a.capacity());
        assert_eq!(bound(&a, "keep"), Some(1), "recently used survives");
        assert_eq!(bound(&a, "s0"), None, "least recently used went first");
        assert_eq!(bound(&a, "s9999"), Some(9999 % 3));
    }
}
